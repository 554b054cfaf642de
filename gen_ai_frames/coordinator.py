"""One rate limit, one pause, one budget and one progress for a run spread over many processes.

A Dask run answers its partitions in several worker processes, against one provider account: the
provider's limits are per account, so the run must behave as one client. :class:`RunCoordinator`
holds what the run shares (the user's rate limits, the pace learned from the provider's headers and
429s, the run-wide pause, the budget and the progress); it lives in one place (a Dask Actor) and
every partition talks to it through a :class:`SharedRun`, which the engine consults through the
:class:`~gen_ai_frames.ratelimit.SharedLimits` seam.

Round trips are what a shared limiter costs, so a partition never asks per request: it *leases*
request slots in batches (as many as the pace allows in :data:`LEASE_S` seconds) and sends what it
learned (answers, 429s, headers, spend, rows done) with its next lease. Urgent news (a 429, a pause)
triggers a lease at once. When nothing paces the run (no limit given or learned, no budget), a
grant is *unbounded*: the partition sends without slots until a later exchange tells it otherwise.
Its exchanges are then only reports (every :data:`UNBOUNDED_REPORT_S` when the run's news is pushed
to it, see :meth:`RunCoordinator.wait_news`, else every :data:`LEASE_S`): a round trip to a Dask
Actor costs milliseconds of CPU, which a run as fast as the machine goes would pay in throughput.

Until the run hears its first response, only :data:`PROBES` request goes out run-wide (for at most
:data:`PROBE_MAX_S`): the provider's headers on that answer state the limit, which every partition
then paces to from a full bucket, where a burst of every partition's slow start at a limit not
known yet would mostly come back as 429s.

Nothing here imports Dask: the coordinator is a plain object, so it is tested without a cluster.

>>> coordinator = RunCoordinator(max_concurrent=8, requests_per_minute=600, npartitions=2,
...                              clock=lambda: 100.0)
>>> grant = coordinator.lease("p0", 4, {"requests": 1.0}, {})
>>> [round(w, 2) for w in grant["waits"]], grant["concurrency"]
([0.0, 0.1], 4)
>>> told_nothing = RunCoordinator(max_concurrent=8, npartitions=2, clock=lambda: 100.0)
>>> [len(told_nothing.lease(p, 4, {"requests": 1.0}, {})["waits"]) for p in ("p0", "p1")]
[1, 0]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import NotSentError
from .pricing import Spend, budget_spent
from .ratelimit import Pace, RateLimiter

__all__ = ["LEASE_S", "PROBES", "PROBE_MAX_S", "RunCoordinator", "SharedRun"]

logger = logging.getLogger("gen_ai_frames")

#: Seconds of the run's pace one lease covers; also how often a partition reports (at most).
LEASE_S = 0.2
#: Seconds between two progress events of the coordinator (and one when the run ends).
PUBLISH_S = 0.5
#: Seconds a lease may take before the coordinator counts as lost (its worker died).
LOST_AFTER_S = 15.0
#: Requests in flight run-wide before the run's first response, when nothing paces it yet.
PROBES = 1
#: Seconds the probe may take before the run goes on without it (a server that never answers
#: must not hold the run to one request at a time).
PROBE_MAX_S = 5.0
#: Seconds between two leases of a partition waiting for the probe's answer.
PROBE_POLL_S = 0.05
#: Seconds between two reports of an unbounded partition told of the run's news as it happens.
UNBOUNDED_REPORT_S = 1.0
#: Seconds a news watch waits on the coordinator's side before it answers anyway.
NEWS_WAIT_S = 10.0

Clock = Callable[[], float]


@dataclass
class _Member:
    """One partition task of the run, as the coordinator sees it."""

    outstanding: int = 0  # slots leased and not yet given back or used up
    total: int = 0
    done: int = 0
    errors: int = 0
    finished: bool = False


def _empty_report() -> dict[str, Any]:
    return {
        "answers": 0,  # responses other than 429 (they open the pace)
        "rate_limited": [],  # (seconds ago it was sent, request key) of each 429
        "headers": None,  # the rate-limit headers of the latest answer
        "pause": None,  # (seconds, reason): a pause the server asked for
        "settled": 0,  # slots used (request sent, or given up)
        "free": 0,  # requests sent without a slot (an unbounded grant), ended
        "returned": 0,  # slots not used, still ahead (the partition ended): their time is free again
        "expired": 0,  # slots not used in time, or booked under an old pace: their time is gone
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "paid": 0,  # answers among them that were paid for
        "estimated": 0,  # tokens estimated for the answered requests (the limiter corrects them)
        "rows": 0,
        "errors": 0,
        "total": None,  # rows of the partition, done before it started (resumed), errors before
        "done": 0,
        "failed_before": 0,
        "finished": False,
    }


class RunCoordinator:
    """What every partition of one run shares: see the module docstring.

    ``max_concurrent``, ``requests_per_minute``, ``tokens_per_minute`` and ``max_cost`` are run
    totals. ``in_flight`` is how many partitions are expected to run at once (the concurrency
    share before they all registered). ``publish`` hears progress snapshots (a dict) at most every
    :data:`PUBLISH_S` seconds and when the last partition ends.
    """

    def __init__(
        self,
        *,
        max_concurrent: int = 64,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_cost: float | None = None,
        price: tuple[float, float] | None = None,
        npartitions: int = 1,
        in_flight: int | None = None,
        publish: Callable[[dict[str, Any]], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_cost = max_cost
        self.price = price
        self.npartitions = npartitions
        self.in_flight = npartitions if in_flight is None else max(1, min(in_flight, npartitions))
        self._publish = publish
        self._clock = clock
        self.rounds = 0
        #: Changes when what partitions are granted does (a pause, a pace, a stop): see wait_news.
        self.news = 0
        self._watchers: list[Callable[[int], None]] = []
        self._start_round()

    def _start_round(self) -> None:
        """A fresh run: the first time, and when a new compute of the same frame starts."""
        clock = self._clock
        self.rounds += 1
        # No slow start here: each partition's own engine opens its concurrency gradually.
        self.pace = Pace(self.max_concurrent, clock=clock, slow_start=False)
        self.limiter = (
            RateLimiter(self.requests_per_minute, self.tokens_per_minute, clock=clock)
            if self.requests_per_minute or self.tokens_per_minute
            else None
        )
        self.paused_until = float("-inf")
        self.pause_reason: str | None = None
        self.spend = Spend(self.price)
        self.paid = 0  # answers paid for
        self.stop: tuple[str, str] | None = None  # (message, suggestion) once the budget is spent
        self.members: dict[str, _Member] = {}
        self.finished = 0
        self.requests = 0
        self.rate_limited = 0
        self.exchanges = 0  # leases and reports heard: what the shared limits cost in round trips
        self._published_at = float("-inf")
        #: The run heard from the provider (a response, a 429, a pause, a request ended): probing ends.
        self.heard = False
        self._probe_since: float | None = None

    # The one call partitions make ------------------------------------------------------------

    def lease(self, member: str, want: int, costs: Mapping[str, float], report: Mapping[str, Any]) -> dict:
        """Take ``member``'s ``report`` and lease it up to ``want`` request slots costing ``costs``.

        The grant: ``waits`` (seconds from now at which each slot may be used), ``paced`` (False:
        the slots are not tied to a time), ``unbounded`` (nothing paces the run: send without
        slots until told otherwise), ``probe`` (the run waits for its first response: news is
        urgent), ``generation`` (changes when the pace does: slots of an older one are void),
        ``pause`` (seconds the run stays paused), ``stop`` (the budget is spent:
        ``(message, suggestion)``), ``concurrency`` (this partition's share of ``max_concurrent``).
        """
        now = self._clock()
        m = self.members.get(member)
        if m is None:
            if self.finished and self.finished >= self.npartitions:
                self._start_round()  # every partition ended: this is a new compute of the run
            m = self.members[member] = _Member()
        self.exchanges += 1
        before = self._grant_state()
        self._apply(m, member, report, now)
        if self._grant_state() != before:
            self._tell_news()
        waits: list[float] = []
        paced = self._request_rate() is not None
        probe = self._probing(now)
        # Nothing to book or count: the partition sends freely, its reports still flow.
        unbounded = not paced and not probe and self.stop is None and not self._budgeted()
        if self.stop is None and not m.finished and want > 0 and not unbounded:
            count = self._affordable(m, self._lease_size(want), costs)
            if probe:
                if self._probe_since is None:
                    self._probe_since = now
                in_flight = sum(member.outstanding for member in self.members.values())
                count = min(count, max(0, PROBES - in_flight))
            start = max(now, self.paused_until)
            tokens = int(costs.get("tokens", 0))
            for _ in range(count):
                wait = self.pace.reserve(costs, now=start)
                if self.limiter is not None:
                    wait = max(wait, self.limiter.reserve(tokens, now=start))
                waits.append(start - now + wait)
            m.outstanding += count
        self._maybe_publish(now)
        return {
            "waits": waits,
            "paced": paced,
            "unbounded": unbounded,
            "probe": probe,
            "news": self.news,
            "generation": self.pace.generation,
            "pause": max(0.0, self.paused_until - now),
            "pause_reason": self.pause_reason,
            "stop": self.stop,
            "concurrency": self._share(),
        }

    def _apply(self, m: _Member, member: str, report: Mapping[str, Any], now: float) -> None:
        if not report:
            return
        if not self.heard and any(
            report.get(name) for name in ("answers", "rate_limited", "headers", "pause", "settled", "free")
        ):
            self.heard = True  # even a request that failed: the probe must not hold the run longer
        if report.get("total") is not None:
            m.total = report["total"]
            m.done = report.get("done", 0)
            m.errors = report.get("failed_before", 0)
        m.done += report.get("rows", 0)
        m.errors += report.get("errors", 0)
        for _ in range(report.get("answers", 0)):
            self.pace.on_answer(now)
        for age, key in report.get("rate_limited", ()):
            self.rate_limited += 1
            self.pace.on_rate_limited(now - age, now, key=(member, key))
        headers = report.get("headers")
        if headers:
            wait = self.pace.learn(headers, now)
            # No burst ahead of the pace: a lease already books up to LEASE_S ahead, and partitions
            # hear of a pause a lease later; a burst on top would empty the provider's bucket.
            for budget in self.pace.budgets.values():
                budget.tolerance = 0.0
            if wait is not None and wait[0] > 0:
                self._pause(now, wait[0], "rate limit budget used up")
        if report.get("pause"):
            seconds, reason = report["pause"]
            self._pause(now, seconds, reason)
        settled, returned = report.get("settled", 0), report.get("returned", 0)
        self.requests += settled + report.get("free", 0)
        m.outstanding = max(0, m.outstanding - settled - returned - report.get("expired", 0))
        if returned:
            self.pace.unbook(returned, now)
            if self.limiter is not None:
                self.limiter.unbook(returned, now)
        prompt, completion = report.get("prompt_tokens", 0), report.get("completion_tokens", 0)
        if prompt or completion:
            self.spend.add(prompt, completion)
            self.paid += report.get("paid", 0)
            if self.limiter is not None and report.get("estimated"):
                self.limiter.correct(report["estimated"], prompt + completion)
        if (
            self.stop is None
            and self.max_cost is not None
            and self.spend.usd is not None
            and self.spend.usd >= self.max_cost
        ):
            error = budget_spent(self.max_cost, self.spend)
            self.stop = (error.message, error.suggestion)
        if report.get("finished") and not m.finished:
            m.finished = True
            self.finished += 1
            self._maybe_publish(now, force=True)

    def _grant_state(self) -> tuple[Any, ...]:
        """What unbounded partitions must hear of at once when it changes."""
        return (self.paused_until, self.stop is None, self.pace.generation, self._request_rate() is None)

    def _tell_news(self) -> None:
        self.news += 1
        watchers, self._watchers = self._watchers, []
        for notify in watchers:
            notify(self.news)

    def watch(self, version: int, notify: Callable[[int], None]) -> None:
        """Call ``notify(news)`` once the run's news differs from ``version`` (at once if it does)."""
        if version != self.news:
            notify(self.news)
        else:
            self._watchers.append(notify)

    async def wait_news(self, version: int, timeout: float = NEWS_WAIT_S) -> int:
        """The run's news once it differs from ``version``, or after ``timeout`` seconds: a partition
        waits on this (a long poll) instead of asking every lease period. Run it in the loop (the
        thread) that runs :meth:`lease`."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def notify(news: int) -> None:
            if not future.done():
                future.set_result(news)

        self.watch(version, notify)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return self.news
        finally:
            if notify in self._watchers:
                self._watchers.remove(notify)

    def _pause(self, now: float, seconds: float, reason: str) -> None:
        if now + seconds > self.paused_until:
            self.paused_until = now + seconds
            self.pause_reason = reason

    def _request_rate(self) -> float | None:
        """Requests per second the run may send now; None when nothing paces it."""
        rates = []
        pace = self.pace.request_rate
        if pace is not None:
            rates.append(pace)
        if self.limiter is not None and self.limiter.requests_per_minute:
            rates.append(self.limiter.requests_per_minute / 60.0)
        if self.limiter is not None and self.limiter.tokens_per_minute:
            rates.append(self.limiter.tokens_per_minute / 60.0)  # at least one token a request
        return min(rates) if rates else None

    def _probing(self, now: float) -> bool:
        """Before the run's first response, when nothing paces it: one request for the run."""
        if self.heard or self._request_rate() is not None:
            return False
        return self._probe_since is None or now - self._probe_since < PROBE_MAX_S

    def _budgeted(self) -> bool:
        return self.max_cost is not None and self.price is not None

    def _lease_size(self, want: int) -> int:
        rate = self._request_rate()
        if rate is None:
            return want
        return max(1, min(want, math.ceil(rate * LEASE_S)))

    def _affordable(self, m: _Member, count: int, costs: Mapping[str, float]) -> int:
        """How many of ``count`` slots the budget can still pay for: requests in flight are counted
        at the mean cost of an answer so far (a worst case before the first answer). While less
        than a request's worth is left, a partition with none in flight may send one more, so the
        run spends at most the budget plus one request per partition."""
        if not self._budgeted():
            return count
        assert self.price is not None and self.max_cost is not None
        spent = self.spend.usd or 0.0
        if spent >= self.max_cost:
            return 0
        if self.paid:
            cost = spent / self.paid
        else:
            inputs, outputs = costs.get("input-tokens", 0.0), costs.get("output-tokens", 0.0)
            cost = (inputs * self.price[0] + outputs * self.price[1]) / 1e6
        if cost <= 0:
            return count
        in_flight = sum(member.outstanding for member in self.members.values())
        money = self.max_cost - spent - in_flight * cost
        room = math.floor(money / cost)
        if room <= 0:
            # Less than one request's worth left: one more, from a partition with none in flight.
            return 1 if money > 0 and m.outstanding == 0 else 0
        return min(count, room)

    def _share(self) -> int:
        """This partition's share of ``max_concurrent``: the total over the partitions running
        now (never fewer than expected to run at once while some have not started)."""
        active = sum(1 for m in self.members.values() if not m.finished)
        waiting = self.npartitions - len(self.members)
        divisor = max(1, active, min(self.in_flight, active + waiting))
        return max(1, self.max_concurrent // divisor)

    def settings(self) -> dict[str, Any]:
        """The run's totals as given (an Actor shows methods, not attributes)."""
        return {
            "max_concurrent": self.max_concurrent,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_cost": self.max_cost,
            "npartitions": self.npartitions,
            "in_flight": self.in_flight,
        }

    # Progress ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The run's progress: rows done of total (estimated until every partition started),
        errors, tokens, spend, rate-limit state and partitions finished."""
        members = self.members.values()
        started = len(self.members)
        total = sum(m.total for m in members)
        if 0 < started < self.npartitions:  # partitions not started yet: assume they are alike
            total = round(total * self.npartitions / started)
        now = self._clock()
        if self.paused_until > now:
            status: str | None = f"{self.pause_reason}, waiting {self.paused_until - now:.1f} s"
        else:
            status = self.pace.status
            if status is None and self.limiter is not None and self.limiter.requests_per_minute:
                status = f"limited: {self.limiter.requests_per_minute / 60:.1f} req/s"
        return {
            "round": self.rounds,
            "done": sum(m.done for m in members),
            "total": total,
            "errors": sum(m.errors for m in members),
            "tokens": self.spend.tokens,
            "spend": self.spend.usd,
            "status": status,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "exchanges": self.exchanges,
            "partitions": self.finished,
            "npartitions": self.npartitions,
            "finished": self.finished >= self.npartitions,
        }

    def _maybe_publish(self, now: float, force: bool = False) -> None:
        if self._publish is None or (not force and now - self._published_at < PUBLISH_S):
            return
        self._published_at = now
        self._publish(self.snapshot())


def _stated(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers of an answer, by lower-case name."""
    return {k.lower(): v for k, v in headers.items() if "ratelimit" in k.lower()}


class SharedRun:
    """A partition's side of the run's :class:`RunCoordinator`: the engine's
    :class:`~gen_ai_frames.ratelimit.SharedLimits` and the runner's progress feed.

    ``call(member, want, costs, report)`` is the coordinator's :meth:`RunCoordinator.lease`
    (a Dask Actor method in a worker); it blocks, so it runs in a thread, one at a time.

    ``watch(news, notify)``, if given, arranges for ``notify(news)`` to be called (from any thread)
    once the run's news differs from ``news`` (:meth:`RunCoordinator.watch`, or a long poll of
    :meth:`RunCoordinator.wait_news` in Dask): an unbounded partition then reports only every
    :data:`UNBOUNDED_REPORT_S`, and hears of a pause, a pace or a stop as soon as it happens.

    If the coordinator is lost (a lease fails: its worker died), the partition carries on alone,
    with a warning: paced by what its own engine learned and by ``fallback`` (its static share of
    the run's rate limits), or, when the run has a budget (``budgeted``), it stops sending, as the
    budget can no longer be kept.
    """

    def __init__(
        self,
        call: Callable[[str, int, dict, dict], dict],
        member: str,
        *,
        want: int = 64,
        clock: Clock = time.monotonic,
        fallback: RateLimiter | None = None,
        budgeted: bool = False,
        watch: Callable[[int, Callable[[int], None]], None] | None = None,
    ) -> None:
        self._call = call
        self._watch = watch
        self._watching = False  # a watch is armed: its notify has not come yet
        self.news = 0  # the run's news as of the last grant
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fallback = fallback
        self._budgeted = budgeted
        #: Set when the coordinator could not be reached: this partition paces itself from then.
        self.lost: BaseException | None = None
        self.member = member
        self.want = want
        self._clock = clock
        self._slots: collections.deque[float | None] = collections.deque()
        self._report = _empty_report()
        self.generation = 0
        self.paused_until = float("-inf")
        self.pause_reason: str | None = None
        self.stopped: NotSentError | None = None
        self.concurrency: int | None = None
        self._pace: Pace | None = None
        self._costs: dict[str, float] = {"requests": 1.0}
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._granted: asyncio.Event | None = None
        self._exchanged_at = float("-inf")
        self._starved = False
        self._closing = False
        self.exchanges = 0
        #: The last grant was unbounded: requests go without slots until an exchange says otherwise.
        self.unbounded = False
        #: The run waits for its first response (the coordinator's probe): news is urgent.
        self.probing = False
        self._free = 0  # requests sent without a slot and not yet ended
        self._headers: Mapping[str, str] | None = None  # the latest answer's, not yet reported
        self._heard_limits = False

    # SharedLimits ----------------------------------------------------------------------------

    def attach(self, pace: Pace) -> None:
        """The engine's pace: its concurrency follows this partition's share of the run's."""
        self._pace = pace
        # One request until the first lease tells this partition its share of the run's total.
        pace.limit_concurrency(self.concurrency or 1)

    async def reserve(self, costs: Mapping[str, float]) -> float:
        """Take one request slot (leasing more when none is left); return how long to wait."""
        self._costs = dict(costs)
        self._start()
        assert self._wake is not None and self._granted is not None
        while True:
            if self.stopped is not None:
                return 0.0
            if self.lost is not None:
                return self._alone(costs)
            if self.unbounded and not self._slots:
                self._free += 1
                return 0.0
            now = self._clock()
            self._drop_stale(now)
            if self._slots:
                at = self._slots.popleft()
                if self._runs_low(now) or now - self._exchanged_at > LEASE_S:
                    self._wake.set()  # lease more before running out: requests need not wait for it
                return 0.0 if at is None else max(0.0, at - now)
            self._granted.clear()
            if not self._starved:
                self._wake.set()
            await self._granted.wait()

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
        """A slot was used: ``outcome`` is ``"answered"``, ``"served"`` (an error the server
        answered), ``"rate_limited"`` (a 429) or ``"failed"`` (no response, or never sent)."""
        report = self._report
        if self._free:
            self._free -= 1
            report["free"] += 1
        else:
            report["settled"] += 1
        if self.probing:
            self._urgent()  # the run waits for this: the first response's news
        if outcome in ("answered", "served"):
            report["answers"] += 1
        if outcome == "answered" and (prompt_tokens or completion_tokens):
            report["prompt_tokens"] += prompt_tokens
            report["completion_tokens"] += completion_tokens
            report["estimated"] += estimated
            report["paid"] += 1
        if outcome == "rate_limited":
            age = 0.0 if sent_at is None else max(0.0, self._clock() - sent_at)
            report["rate_limited"].append((age, hash(key) if key is not None else None))
            self._urgent()

    def learn(self, headers: Mapping[str, str]) -> None:
        """An answer's headers: the rate-limit ones go to the coordinator with the next lease.
        Only the latest answer's count, so they are picked out once per lease, not per answer."""
        self._headers = headers
        if self.unbounded and not self._heard_limits and _stated(headers):
            self._heard_limits = True
            self._urgent()  # the first limit an unbounded partition hears of: pace to it now

    def pause(self, seconds: float, reason: str) -> None:
        """The server asked this partition to wait: the whole run waits."""
        until = self._clock() + seconds
        if until > self.paused_until:
            self.paused_until, self.pause_reason = until, reason
            self._void_before(until)
        current = self._report["pause"]
        if current is None or seconds > current[0]:
            self._report["pause"] = (seconds, reason)
        self._urgent()

    async def close(self) -> None:
        """The engine's run is over: stop leasing, give unused slots back, report what is left."""
        task, self._task = self._task, None
        self._closing = True
        if task is not None:
            # Let the pump end by itself: cancelled in the middle of a lease, it could not tell
            # whether its report arrived (and sending it again would count its rows twice).
            assert self._wake is not None
            self._wake.set()
            await asyncio.gather(task, return_exceptions=True)
        self._slots_back()
        if self._has_news() and self.lost is None:
            report = self._take_report()
            try:
                await asyncio.to_thread(self._call_coordinator, 0, report)
            except Exception:  # the run's answers matter more: finish() tries again
                self._merge_back(report)

    # The runner's progress feed ---------------------------------------------------------------

    def start(self, total: int, done: int, errors: int) -> None:
        """The partition's rows: ``done`` of ``total`` were answered before (resumed), ``errors`` failed."""
        self._report.update(total=total, done=done, failed_before=errors)

    def advance(self, rows: int, failed: bool) -> None:
        self._report["rows"] += rows
        self._report["errors"] += rows if failed else 0

    def finish(self) -> None:
        """The partition task ended (sync: its event loop is gone)."""
        if self.lost is not None:
            return
        self._slots_back()
        self._report["finished"] = True
        self._exchange(0)

    # Leasing ---------------------------------------------------------------------------------

    def _start(self) -> None:
        if self.lost is not None:
            return
        if self._task is None or self._task.done():
            self._closing = False
            self._loop = asyncio.get_running_loop()
            self._wake, self._granted = asyncio.Event(), asyncio.Event()
            self._task = asyncio.ensure_future(self._pump())

    def _urgent(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pump(self) -> None:
        """Leases (and reports) in the background: when slots run low, when news is urgent, and at
        least every :data:`LEASE_S` seconds while the run goes on."""
        assert self._wake is not None and self._granted is not None
        while not self._closing:
            # Starved (the last lease gave nothing: the budget, the probe in flight), the requests
            # waiting for slots do not wake the pump: it asks again later or on urgent news.
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that comes
            # as the event is set, and close() would wait for this loop forever.
            if self._starved and self.probing:
                period = PROBE_POLL_S
            elif self.unbounded and self._watching:
                period = UNBOUNDED_REPORT_S  # only reports: the news comes when it happens
            else:
                period = LEASE_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period):
                    await self._wake.wait()
            if self._closing:
                return  # close() reports what is left
            self._wake.clear()
            # Paced, only what keeps a lease period ahead: booking further would hold the run's
            # time for this partition alone. Unbounded, ask anyway: the answer may be slots.
            runs_low = self.unbounded or self._runs_low(self._clock())
            want = max(0, self.want - len(self._slots)) if runs_low else 0
            report = self._take_report()
            try:
                grant = await asyncio.to_thread(self._call_coordinator, want, report)
            except Exception as exc:  # not when cancelled: the call goes on in its thread and may land
                self._merge_back(report)
                self._lose(exc)
                self._granted.set()
                return
            self._take(want, grant)  # here, in the loop: it wakes the engine's waiting requests
            self._granted.set()

    def _exchange(self, want: int) -> None:
        """One lease, blocking (where no loop runs)."""
        report = self._take_report()
        try:
            grant = self._call_coordinator(want, report)
        except BaseException:
            self._merge_back(report)
            raise
        self._take(want, grant)

    def _call_coordinator(self, want: int, report: dict[str, Any]) -> dict[str, Any]:
        return self._call(self.member, want, self._costs, report)

    def _take(self, want: int, grant: Mapping[str, Any]) -> None:
        """Apply a grant: new slots, the run's pause, its budget stop, this partition's share."""
        self.exchanges += 1
        now = self._clock()
        self._exchanged_at = now
        if grant["generation"] != self.generation:
            self.generation = grant["generation"]
            self._slots_back(free=False)  # booked at the old pace: void
        if grant["pause"] > 0 and now + grant["pause"] > self.paused_until:
            self.paused_until = now + grant["pause"]
            self.pause_reason = grant.get("pause_reason")
            self._void_before(self.paused_until)
        self.unbounded = bool(grant.get("unbounded"))
        self.probing = bool(grant.get("probe"))
        self.news = grant.get("news", 0)
        self._arm_watch()
        if grant["stop"] is not None and self.stopped is None:
            message, suggestion = grant["stop"]
            self.stopped = NotSentError(message, suggestion=suggestion, retryable=False, sent=False)
        waits = grant["waits"]
        self._starved = want > 0 and not waits and not self._slots and not self.unbounded
        if grant["paced"]:
            self._slots.extend(now + wait for wait in waits)
        else:
            self._slots.extend(None for _ in waits)
        if grant["concurrency"] != self.concurrency:
            self.concurrency = grant["concurrency"]
            if self._pace is not None:
                self._pace.limit_concurrency(self.concurrency)

    def _take_report(self) -> dict[str, Any]:
        """The news since the last exchange, for the next one (a fresh report starts)."""
        report, self._report = self._report, _empty_report()
        headers, self._headers = self._headers, None
        if headers is not None:
            stated = _stated(headers)
            if stated:
                report["headers"] = stated
        return report

    def _notify(self, news: int) -> None:
        """The run's news changed (or the watch timed out); called from any thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the partition's loop is closed: nobody to tell
            loop.call_soon_threadsafe(self._heard, news)

    def _heard(self, news: int) -> None:
        self._watching = False
        if news != self.news:
            self._urgent()  # an exchange brings the pause, the pace or the stop
        else:
            self._arm_watch()  # nothing new (the watch timed out): watch again

    def _arm_watch(self) -> None:
        """Unbounded, watch the run's news (once at a time) rather than ask every lease period."""
        if not self.unbounded or self._watch is None or self._watching or self._closing or self.lost:
            return
        self._watching = True
        try:
            self._watch(self.news, self._notify)
        except Exception:  # the lease path notices a lost coordinator: poll every LEASE_S meanwhile
            self._watching = False

    def _merge_back(self, report: dict[str, Any]) -> None:
        """A failed exchange: keep its news for the next one."""
        current = self._report
        for name in (
            "answers",
            "settled",
            "free",
            "returned",
            "expired",
            "prompt_tokens",
            "completion_tokens",
            "estimated",
            "rows",
            "errors",
            "paid",
        ):
            current[name] = current.get(name, 0) + report.get(name, 0)
        current["rate_limited"] = report["rate_limited"] + current["rate_limited"]
        for name in ("headers", "pause", "total", "done", "failed_before"):
            if current.get(name) is None and report.get(name) is not None:
                current[name] = report[name]

    def _lose(self, exc: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = exc
        self._slots.clear()
        logger.warning(
            "gen_ai_frames.dask: the run's coordinator cannot be reached (%s: %s); this partition "
            "goes on alone, with its share of the run's limits%s",
            type(exc).__name__,
            exc,
            " and stops sending, as max_cost can no longer be kept" if self._budgeted else "",
        )
        if self._budgeted and self.stopped is None:
            self.stopped = NotSentError(
                "not sent: the run's coordinator was lost (its Dask worker died), so the run's max_cost "
                "could no longer be kept",
                suggestion="Compute again: with a checkpoint, answered rows are kept and only these "
                "are sent.",
                retryable=False,
                sent=False,
            )

    def _alone(self, costs: Mapping[str, float]) -> float:
        """A slot without the coordinator: the engine's own pace, and the static share of the limits."""
        wait = 0.0 if self._pace is None else self._pace.reserve(costs)
        if self._fallback is not None:
            wait = max(wait, self._fallback.reserve(int(costs.get("tokens", 0))))
        return wait

    def _runs_low(self, now: float) -> bool:
        """Time to lease more: unpaced, half the batch is used; paced, less than a lease period of
        slots is left."""
        if not self._slots:
            return True
        last = self._slots[-1]
        if last is None:
            return len(self._slots) < max(1, self.want // 2)
        return last - now < LEASE_S

    def _void_before(self, until: float) -> None:
        """A pause until ``until``: paced slots before its end are void (their time is gone), so
        the partitions resume at the pace booked after it, not all at once."""
        kept = collections.deque(at for at in self._slots if at is None or at >= until)
        self._report["expired"] += len(self._slots) - len(kept)
        self._slots = kept

    def _drop_stale(self, now: float) -> None:
        """A paced slot left unused for a lease period is dropped: used late, it would burst."""
        while self._slots and self._slots[0] is not None and self._slots[0] < now - LEASE_S:
            self._slots.popleft()
            self._report["expired"] += 1

    def _slots_back(self, free: bool = True) -> None:
        """Give every slot back: with ``free``, those booked ahead free their time for the other
        partitions (not when a new pace voided them: the cut already moved the schedule)."""
        now = self._clock()
        for at in self._slots:
            if free and at is not None and at > now:
                self._report["returned"] += 1
            else:
                self._report["expired"] += 1
        self._slots.clear()

    def _has_news(self) -> bool:
        empty = _empty_report()
        return any(self._report.get(name) != empty.get(name) for name in self._report)
