"""Back-pressure shared by all requests of a run: the rate limits the user gives, the pace learned
from the provider's rate-limit headers or from its 429s, and a run-wide pause when it says to wait.

Everything here is driven by an injectable clock so tests need not sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .errors import NotSentError

__all__ = [
    "Pace",
    "RateLimiter",
    "SharedLimits",
    "current_shared_limits",
    "parse_duration",
    "ratelimit_wait",
    "sharing_limits",
    "stated_limits",
    "validate_limits",
]

Clock = Callable[[], float]


def validate_limits(
    requests_per_minute: object = None, tokens_per_minute: object = None, rate_limit_timeout: object = 600.0
) -> None:
    """Check a run's rate limits (each a number > 0, or None) and its ``rate_limit_timeout`` (seconds > 0).

    >>> validate_limits(requests_per_minute=0)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: requests_per_minute must be a number > 0 or None, got 0
    """
    for name, value in (
        ("requests_per_minute", requests_per_minute),
        ("tokens_per_minute", tokens_per_minute),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise ConfigurationError(f"{name} must be a number > 0 or None, got {value!r}")
    value = rate_limit_timeout
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"rate_limit_timeout must be a number of seconds > 0, got {value!r}")


class RateLimiter:
    """Spaces request starts to ``requests_per_minute`` and spends a ``tokens_per_minute`` budget.

    Requests are spaced evenly rather than let through in bursts, which is what providers' limiters
    reward. The token budget refills continuously; a request's cost is estimated before sending and
    corrected with the usage the answer reports (:meth:`correct`).

    >>> limiter = RateLimiter(requests_per_minute=600)
    >>> [round(limiter.reserve(tokens=0, now=100.0), 6) for _ in range(3)]
    [0.0, 0.1, 0.2]
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        validate_limits(requests_per_minute, tokens_per_minute)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self._clock = clock
        self._next_request = 0.0
        # The token bucket starts full: one minute's budget, as providers' own limits do.
        self._tokens = float(tokens_per_minute or 0)
        self._tokens_at = clock()

    def reserve(self, tokens: int, now: float | None = None) -> float:
        """Book a request costing ``tokens``; return how long to wait before sending it."""
        now = self._clock() if now is None else now
        wait = 0.0
        if self.requests_per_minute:
            start = max(now, self._next_request)
            self._next_request = start + 60.0 / self.requests_per_minute
            wait = start - now
        if self.tokens_per_minute:
            rate = self.tokens_per_minute / 60.0
            self._tokens = min(self.tokens_per_minute, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            # A request larger than the whole budget waits for a full bucket, never forever.
            cost = min(tokens, self.tokens_per_minute)
            self._tokens -= cost
            if self._tokens < 0:
                wait = max(wait, -self._tokens / rate)
        return wait

    def unbook(self, requests: int, now: float | None = None) -> None:
        """Give back ``requests`` request slots booked ahead and never used; never earlier than now."""
        if self.requests_per_minute:
            now = self._clock() if now is None else now
            self._next_request = max(now, self._next_request - requests * 60.0 / self.requests_per_minute)

    def correct(self, estimated: int, actual: int) -> None:
        """Give back (or take) the difference between a request's estimated and reported tokens."""
        if self.tokens_per_minute:
            self._tokens = min(self.tokens_per_minute, self._tokens + estimated - actual)

    async def acquire(self, tokens: int) -> float:
        wait = self.reserve(tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait


class _Budget:
    """One limit the provider stated, paced as a virtual-time scheduler (GCRA): a request may start
    ``tolerance`` seconds ahead of its even slot, which spends at most half the burst the server
    showed, keeping the other half for jitter."""

    __slots__ = ("limit", "rate", "tolerance", "tat")

    def __init__(self, limit: float, now: float) -> None:
        self.limit = limit
        self.rate = limit / 60.0  # providers state limits per minute (RPM, TPM)
        self.tolerance = 0.0
        self.tat = now  # theoretical arrival time of the next unit

    def seen_remaining(self, remaining: float) -> None:
        self.tolerance = max(self.tolerance, 0.5 * remaining / self.rate)


class Pace:
    """The run's pace as learned from the provider, shared by every request of the run.

    * Stated limits: answers carrying OpenAI-style ``x-ratelimit-limit-requests`` / ``-tokens`` or
      Anthropic-style ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-limit``
      headers set a per-minute budget each; request starts are spaced to all of them.
    * No stated limit: a 429 sets a request rate (the rate answers came back at, a little less)
      and each further 429 cuts it by :attr:`DECREASE`; every answer while the pace binds raises it
      by :attr:`INCREASE` (additive increase, multiplicative decrease, in requests per second).
    * Until the first answer or 429 the run opens its concurrency gradually (slow start, as TCP
      does): a burst of ``max_concurrent`` requests at a limit it does not know yet would mostly
      come back as 429s.

    >>> pace = Pace(64, clock=lambda: 0.0)
    >>> pace.window, pace.learn({"x-ratelimit-limit-requests": "600"}), pace.window
    (8, None, 64)
    >>> [round(pace.reserve({"requests": 1}), 3) for _ in range(3)], pace.status
    ([0.0, 0.1, 0.2], 'rate limited: 10.0 req/s')
    """

    INITIAL_WINDOW = 8
    #: Factor applied to the pace on a 429 (at most once per round of requests).
    DECREASE = 0.8
    #: Fraction the pace grows by per answer received while it binds.
    INCREASE = 0.003
    #: Seconds of answers the rate measured at the first 429 looks back on, at most.
    WINDOW_S = 10.0
    #: Once paced, a 429 cuts the pace only if 429s of REFUSED or more requests are among the last
    #: RECENT outcomes: 429s that come at random (a 5 % rate of them) rarely do.
    RECENT = 10
    REFUSED = 3

    def __init__(self, maximum: int, *, clock: Clock = time.monotonic, slow_start: bool = True) -> None:
        self.maximum = maximum
        self.window = min(maximum, self.INITIAL_WINDOW) if slow_start else maximum
        self._slow_start = True  # one more slot per answer; after a cut, one per window of answers
        self._grown = 0
        self.in_flight = 0
        #: A cap on the window set from outside (a Dask partition's share of its run's total).
        self.cap = maximum
        self._clock = clock
        #: Requests waiting for a slot, first come first served (see :meth:`_hand_out`).
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.started = clock()
        #: Per-minute limits the provider stated, by kind ("requests", "tokens", ...).
        self.budgets: dict[str, _Budget] = {}
        #: Requests per second learned from 429s (None: no 429 yet, or limits are stated).
        self.rate: float | None = None
        self._adaptive: _Budget | None = None
        #: Multiplier on the stated budgets after 429s despite them (another client shares the key).
        self.scale = 1.0
        self._last_cut = float("-inf")
        self._answers: collections.deque[float] = collections.deque()
        #: The last outcomes: None for an answer, the request's key for a 429. 429s of one request
        #: alone (a lone 429 among answers, or one request refused again and again) are noise.
        self._recent: collections.deque[object] = collections.deque(maxlen=self.RECENT)
        self._binding = False
        #: Changes whenever the pace does: a request booked under an older pace books again.
        self.generation = 0

    # Concurrency -------------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait for a slot under ``min(window, cap)``; slots go to waiters in arrival order."""
        if not self._waiters and self.in_flight < min(self.window, self.cap):
            self.in_flight += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            elif turn in self._waiters:  # not yet skipped by _hand_out
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        """Give the free slots to the first waiters, one each. Only as many waiters wake as there
        are slots: with 64 workers over a cap of 32, waking them all on every release (an event)
        cost each answer 32 wake-ups that found no slot."""
        while self._waiters and self.in_flight < min(self.window, self.cap):
            turn = self._waiters.popleft()
            if not turn.done():
                self.in_flight += 1  # taken on the waiter's behalf: no one can overtake it
                turn.set_result(None)

    def _open_fully(self) -> None:
        if self.window < self.maximum:
            self.window = self.maximum
            self._hand_out()

    # Pacing ------------------------------------------------------------------------------------

    def reserve(self, costs: Mapping[str, float], now: float | None = None) -> float:
        """Book one request costing ``costs`` (units per kind: ``{"requests": 1, "tokens": 300}``);
        return how long to wait before sending it."""
        now = self._clock() if now is None else now
        paced = [(budget, costs.get(kind, 0.0)) for kind, budget in self.budgets.items()]
        if self._adaptive is not None:
            paced.append((self._adaptive, 1.0))
        if not paced:
            return 0.0
        wait = 0.0
        for budget, _ in paced:
            wait = max(wait, budget.tat - budget.tolerance - now)
        # The pace binds when its slots are booked ahead of now: only then may it grow.
        self._binding = wait > 0 or any(budget.tat > now for budget, _ in paced)
        start = now + wait
        for budget, units in paced:
            rate = budget.rate * (self.scale if budget is not self._adaptive else 1.0)
            budget.tat = max(budget.tat, start) + units / rate
        return wait

    def unbook(self, requests: int, now: float | None = None) -> None:
        """Give back ``requests`` slots booked ahead and never used (a Dask partition that ended
        with slots leased): the next bookings may take their time. Never earlier than ``now``."""
        now = self._clock() if now is None else now
        stated = self.budgets.get("requests")
        for budget, rate in ((stated, None), (self._adaptive, None)):
            if budget is not None:
                rate = budget.rate * (self.scale if budget is stated else 1.0)
                budget.tat = max(now, budget.tat - requests / rate)

    def on_answer(self, now: float | None = None) -> None:
        """A response other than a 429 came back (an answer, or an error the server served): slow
        start opens, and a binding pace recovers a little."""
        now = self._clock() if now is None else now
        self._answers.append(now)
        self._recent.append(None)
        while self._answers and self._answers[0] < now - self.WINDOW_S:
            self._answers.popleft()
        if self.window < self.maximum:
            self._grown += 1
            if self._slow_start or self._grown >= self.window:
                self.window += 1
                self._grown = 0
                self._hand_out()
        if self._binding:
            if self._adaptive is not None:
                self._adaptive.rate *= 1 + self.INCREASE
                self.rate = self._adaptive.rate
            if self.scale < 1.0:
                self.scale = min(1.0, self.scale * (1 + self.INCREASE))

    def on_rate_limited(self, sent_at: float, now: float | None = None, key: object = None) -> None:
        """A request (``key``: the same for each attempt of a row) sent at ``sent_at`` got a 429:
        slow down, once per round of requests (429s of requests sent before the last cut were sent
        at the old pace and say nothing new)."""
        now = self._clock() if now is None else now
        key = object() if key is None else key
        self._recent.append(key)
        if sent_at <= self._last_cut:
            return
        refused = {k for k in self._recent if k is not None}
        if (self.budgets or self._adaptive is not None) and len(refused) < self.REFUSED:
            return  # 429s of one request only: noise, or a request too large, not this run's pace
        self._last_cut = now
        self.generation += 1  # slots booked at the old pace are booked again, at the new one
        if self.budgets:
            self.scale = max(0.05, self.scale * self.DECREASE)
            for kind, budget in self.budgets.items():
                # The refused request held the slot at `now`: the next one comes a slot later.
                slot = 1 / (budget.rate * self.scale) if kind == "requests" else 0.0
                budget.tat = min(budget.tat, now + slot)
        elif self._adaptive is not None:
            # Never below what the server has been serving: 429s that come at random (an overloaded
            # server, another client) must not drive the pace down and down.
            served = self._served_rate(now) * 0.95
            self._adaptive.rate = max(self._adaptive.rate * self.DECREASE, served, 1 / 60)
            self._adaptive.tat = now + 1 / self._adaptive.rate
            self.rate = self._adaptive.rate
        else:
            answered = self._served_rate(now)
            if not answered:
                # Nothing got through yet: there is no rate to measure, so halve the concurrency,
                # which then grows back by one per window of answers.
                self.window = max(1, min(self.window, self.in_flight + 1) // 2)
                self._slow_start = False
                return
            self.rate = max(answered * 0.9, 1 / 60)
            self._adaptive = _Budget(self.rate * 60, now)
            self._adaptive.tat = now + 1 / self.rate
        self._open_fully()  # from now on the pace, not the concurrency, holds the run back

    def _served_rate(self, now: float) -> float:
        """Responses other than 429 per second, over the last :attr:`WINDOW_S` seconds at most."""
        span = max(0.1, min(self.WINDOW_S, now - self.started))
        return sum(1 for t in self._answers if t >= now - span) / span

    def learn(self, headers: Mapping[str, str], now: float | None = None) -> tuple[float, str] | None:
        """Take the limits stated in an answer's headers. Returns ``(seconds, header)`` when a budget
        is used up and the run must wait for its reset, else None."""
        now = self._clock() if now is None else now
        wait: tuple[float, str] | None = None
        for kind, limit, remaining, reset, header in stated_limits(headers):
            if limit is not None and limit > 0:
                budget = self.budgets.get(kind)
                if budget is None or budget.limit != limit:
                    budget = self.budgets[kind] = _Budget(limit, now)
                    self._adaptive = None  # stated limits replace what 429s taught
                    self.rate = None
                    self._open_fully()
                if remaining is not None:
                    budget.seen_remaining(remaining)
            if remaining is not None and remaining <= 0:
                reset = 1.0 if reset is None else reset
                if wait is None or reset > wait[0]:
                    wait = (reset, header)
        return wait

    def limit_concurrency(self, cap: int) -> None:
        """Cap the requests in flight (a partition's share of a run spread over processes), below
        the window slow start opens."""
        self.cap = max(1, cap)
        self._hand_out()

    @property
    def request_rate(self) -> float | None:
        """Requests per second the pace allows now; None when nothing learned paces requests.

        >>> pace = Pace(8, clock=lambda: 0.0)
        >>> pace.request_rate, pace.learn({"x-ratelimit-limit-requests": "600"}), pace.request_rate
        (None, None, 10.0)
        """
        requests = self.budgets.get("requests")
        if requests is not None:
            return requests.rate * self.scale
        if self._adaptive is not None:
            return self._adaptive.rate
        return None

    @property
    def status(self) -> str | None:
        """What the progress bar shows, e.g. ``"rate limited: 8.3 req/s"``; None when not paced."""
        parts = []
        requests = self.budgets.get("requests")
        if requests is not None:
            parts.append(f"{requests.rate * self.scale:.1f} req/s")
        elif self._adaptive is not None:
            parts.append(f"{self._adaptive.rate:.1f} req/s")
        for kind in ("tokens", "input-tokens", "output-tokens"):
            budget = self.budgets.get(kind)
            if budget is not None:
                parts.append(f"{budget.rate * self.scale:,.0f} {kind}/s")
        return "rate limited: " + ", ".join(parts) if parts else None


class SharedLimits(Protocol):
    """Limits an engine shares with the engines of other processes of the same run (a Dask run):
    one pace, one pause, one budget. The engine consults it instead of its own pace and limiter
    when one is given (``Engine(shared=...)``, or :func:`sharing_limits` around the run);
    :class:`gen_ai_frames.coordinator.SharedRun` is the implementation.

    Times are this process's ``time.monotonic``.
    """

    #: Changes when the shared pace does: a request booked under an older one books again.
    generation: int
    #: Until when the whole run is paused (a 429 with Retry-After anywhere in the run).
    paused_until: float
    #: Set once the run's budget is spent: the error for the rows not sent.
    stopped: NotSentError | None

    def attach(self, pace: Pace) -> None:
        """The engine's own pace, whose concurrency the shared limits may set."""

    async def reserve(self, costs: Mapping[str, float]) -> float:
        """Book one request; seconds to wait before sending it."""
        ...

    def settle(
        self,
        outcome: str,
        *,
        sent_at: float | None = None,
        key: object = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        estimated: int = 0,
    ) -> None:
        """A booked request ended: ``"answered"``, ``"served"`` (an error the server answered),
        ``"rate_limited"`` (a 429) or ``"failed"`` (no response: not sent, timed out, refused)."""

    def learn(self, headers: Mapping[str, str]) -> None:
        """An answer's headers (its stated rate limits apply to the whole run)."""

    def pause(self, seconds: float, reason: str) -> None:
        """Pause the whole run."""

    async def close(self) -> None:
        """The engine's run is over."""

    def start(self, total: int, done: int, errors: int) -> None:
        """The runner's rows: ``done`` of ``total`` answered before (resumed), ``errors`` of them failed."""

    def advance(self, rows: int, failed: bool) -> None:
        """The runner stored ``rows`` more results (the run's one progress bar counts them)."""


_shared: contextvars.ContextVar[SharedLimits | None] = contextvars.ContextVar(
    "gen_ai_frames_shared_limits", default=None
)


def current_shared_limits() -> SharedLimits | None:
    """The shared limits set by :func:`sharing_limits` around this code, if any.

    >>> current_shared_limits() is None
    True
    """
    return _shared.get()


@contextlib.contextmanager
def sharing_limits(limits: SharedLimits | None) -> Iterator[None]:
    """Runs started inside (their engines and progress) use ``limits``: how a Dask partition task
    hands the run's shared limits to the pandas accessor it calls, without a new option."""
    token = _shared.set(limits)
    try:
        yield
    finally:
        _shared.reset(token)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """Seconds in a rate-limit reset header: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1.5"``.

    >>> parse_duration("6m0s"), parse_duration("20ms"), parse_duration("2"), parse_duration("soon")
    (360.0, 0.02, 2.0, None)
    """
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


_OPENAI_KINDS = ("requests", "tokens")
_ANTHROPIC_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number else None  # NaN is no number


def _until(value: str | None) -> float | None:
    """Seconds until an RFC 3339 time (Anthropic's reset headers), never negative."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


Limit = tuple[str, float | None, float | None, float | None, str]


def stated_limits(headers: Mapping[str, str]) -> Iterator[Limit]:
    """``(kind, limit, remaining, reset seconds, reset header)`` for every limit an answer states.

    Header names must be lower-case. OpenAI-style ``x-ratelimit-{limit,remaining,reset}-{kind}``
    (resets as durations, ``"6m0s"``) and Anthropic-style ``anthropic-ratelimit-{kind}-{limit,
    remaining,reset}`` (resets as RFC 3339 times).

    >>> list(stated_limits({"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "7",
    ...                     "x-ratelimit-reset-requests": "120ms"}))
    [('requests', 500.0, 7.0, 0.12, 'x-ratelimit-reset-requests')]
    """
    for kind in _OPENAI_KINDS:
        limit = headers.get(f"x-ratelimit-limit-{kind}")
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if limit is not None or remaining is not None:
            reset_header = f"x-ratelimit-reset-{kind}"
            reset = headers.get(reset_header)
            yield (
                kind,
                _number(limit),
                _number(remaining),
                None if reset is None else parse_duration(reset),
                reset_header,
            )
    for kind in _ANTHROPIC_KINDS:
        prefix = f"anthropic-ratelimit-{kind}-"
        limit, remaining = headers.get(prefix + "limit"), headers.get(prefix + "remaining")
        if limit is not None or remaining is not None:
            yield (
                kind,
                _number(limit),
                _number(remaining),
                _until(headers.get(prefix + "reset")),
                prefix + "reset",
            )


def ratelimit_wait(headers: Mapping[str, str]) -> float | None:
    """How long the provider's rate-limit headers say to wait before the next request, if at all:
    a budget at zero means wait for its reset (1 s when the reset is not stated).

    >>> ratelimit_wait({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    1.5
    >>> ratelimit_wait({"x-ratelimit-remaining-requests": "12"}) is None
    True
    """
    wait = None
    for _kind, _limit, remaining, reset, _header in stated_limits(headers):
        if remaining is not None and remaining <= 0:
            wait = max(wait or 0.0, reset or 1.0)
    return wait
