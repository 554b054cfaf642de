"""Back-pressure shared by all requests of a run: request and token rate limits, a run-wide pause
when the provider says to wait, and concurrency that adapts to 429s.

Everything here is driven by an injectable clock so tests need not sleep.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping

from .errors import ConfigurationError

__all__ = ["AdaptiveConcurrency", "RateLimiter", "parse_duration", "ratelimit_wait"]

Clock = Callable[[], float]


class RateLimiter:
    """Spaces request starts to ``requests_per_minute`` and spends a ``tokens_per_minute`` budget.

    Requests are spaced evenly rather than let through in bursts, which is what providers' limiters
    reward. The token budget refills continuously; a request's cost is estimated before sending and
    corrected with the usage the answer reports (:meth:`correct`).

    >>> limiter = RateLimiter(requests_per_minute=600)
    >>> [round(limiter.reserve(tokens=0, now=100.0), 6) for _ in range(3)]
    [0.0, 0.1, 0.2]
    """

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 *, clock: Clock = time.monotonic) -> None:
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigurationError(f"{name} must be a number > 0 or None, got {value!r}")
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

    def correct(self, estimated: int, actual: int) -> None:
        """Give back (or take) the difference between a request's estimated and reported tokens."""
        if self.tokens_per_minute:
            self._tokens = min(self.tokens_per_minute, self._tokens + estimated - actual)

    async def acquire(self, tokens: int) -> float:
        wait = self.reserve(tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait


class AdaptiveConcurrency:
    """A semaphore whose limit halves on a burst of 429s and grows back by one per window of successes.

    Additive increase, multiplicative decrease (as TCP does): it finds the rate a provider accepts
    without being told, and never exceeds ``maximum``.

    >>> limit = AdaptiveConcurrency(8, clock=lambda: 0.0)
    >>> limit.on_rate_limited(); limit.limit
    4
    >>> limit.on_rate_limited(); limit.limit  # the same burst: cut once
    4
    """

    #: 429s closer together than this count as one burst and cut the limit once.
    BURST_WINDOW_S = 1.0

    def __init__(self, maximum: int, *, clock: Clock = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self._clock = clock
        self._last_cut = float("-inf")
        self._successes = 0
        self._changed = asyncio.Event()

    async def acquire(self) -> None:
        while self.in_flight >= self.limit:
            self._changed.clear()
            await self._changed.wait()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def on_rate_limited(self) -> None:
        now = self._clock()
        if now - self._last_cut >= self.BURST_WINDOW_S:
            self.limit = max(1, self.limit // 2)
            self._last_cut = now
            self._successes = 0

    def on_success(self) -> None:
        if self.limit < self.maximum:
            self._successes += 1
            if self._successes >= self.limit:
                self.limit += 1
                self._successes = 0
                self._wake()

    def _wake(self) -> None:
        self._changed.set()


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


def ratelimit_wait(headers: Mapping[str, str]) -> float | None:
    """How long the provider's rate-limit headers say to wait before the next request, if at all.

    Reads OpenAI-style ``x-ratelimit-remaining-requests`` / ``-tokens`` with their ``-reset-``
    durations: a budget at zero means wait for its reset.

    >>> ratelimit_wait({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    1.5
    >>> ratelimit_wait({"x-ratelimit-remaining-requests": "12"}) is None
    True
    """
    wait = None
    for kind in ("requests", "tokens"):
        remaining = headers.get(f"x-ratelimit-remaining-{kind}")
        if remaining is None:
            continue
        try:
            exhausted = float(remaining) <= 0
        except ValueError:
            continue
        if exhausted:
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", "1s")) or 1.0
            wait = max(wait or 0.0, reset)
    return wait
