"""The coordinator's probe before the run's first response, its unbounded grants when nothing paces
the run, the news it pushes to unbounded partitions, and slots a pause voids: injected clocks, no
cluster (tests/test_dask_limits.py has the LocalCluster side).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import gen_ai_frames.coordinator as coordination
from gen_ai_frames.coordinator import LEASE_S, PROBE_MAX_S, SharedRun

from .test_dask_limits_unit import REQUEST, Clock, coordinator, report

HEADERS = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "9",
           "x-ratelimit-reset-requests": "100ms"}


def test_told_nothing_one_request_goes_out_until_the_first_response() -> None:
    clock = Clock()
    run = coordinator(clock, max_concurrent=64, npartitions=8)
    # Neither the user nor the provider said a limit yet: one probe for the whole run, not a
    # burst of every partition's slow start at a limit nobody knows.
    first = run.lease("a", 64, REQUEST, {})
    assert len(first["waits"]) == 1 and first["probe"] is True and first["unbounded"] is False
    assert run.lease("b", 64, REQUEST, {})["waits"] == []
    assert run.lease("a", 64, REQUEST, {})["waits"] == []  # a's probe is still in flight
    # Its answer states 600/min: every partition paces to it, a lease period at a time.
    grant = run.lease("a", 64, REQUEST, report(answers=1, settled=1, headers=HEADERS))
    assert grant["probe"] is False and grant["paced"] is True
    assert grant["waits"] == pytest.approx([0.0, 0.1])
    assert run.lease("b", 64, REQUEST, {})["waits"] == pytest.approx([0.2, 0.3])


def test_a_run_told_its_limit_does_not_probe() -> None:
    run = coordinator(Clock(), requests_per_minute=600)
    grant = run.lease("a", 64, REQUEST, {})
    assert grant["probe"] is False and len(grant["waits"]) == round(10 * LEASE_S)


def test_a_probe_that_failed_or_never_ends_does_not_hold_the_run() -> None:
    clock = Clock()
    run = coordinator(clock)
    run.lease("a", 8, REQUEST, {})
    # No response at all (a connection refused): nothing learned, but the run goes on unpaced.
    grant = run.lease("a", 8, REQUEST, report(settled=1))
    assert grant["probe"] is False and grant["unbounded"] is True
    hung = coordinator(clock)
    assert len(hung.lease("a", 8, REQUEST, {})["waits"]) == 1
    clock.now += PROBE_MAX_S / 2
    assert hung.lease("b", 8, REQUEST, {})["waits"] == []
    clock.now += PROBE_MAX_S / 2  # the probe hangs: the run stops waiting for it
    assert hung.lease("b", 8, REQUEST, {})["unbounded"] is True


def test_an_unpaced_run_sends_without_waiting_on_leases() -> None:
    clock = Clock()
    run = coordinator(clock, npartitions=1)
    calls: list[int] = []

    def call(member: str, want: int, costs: dict, news: dict) -> dict:
        calls.append(want)
        return run.lease(member, want, costs, news)

    shared = SharedRun(call, "a", want=64, clock=clock)

    async def go() -> list[float]:
        waits = [await shared.reserve(REQUEST)]  # the probe
        shared.settle("answered")
        while not shared.unbounded:  # its answer goes to the coordinator at once
            await asyncio.sleep(0.01)
        for _ in range(500):
            waits.append(await shared.reserve(REQUEST))
            shared.settle("answered")
        await shared.close()
        return waits

    waits = asyncio.run(go())
    assert waits == [0.0] * 501
    # With slots it would lease 64 at a time: 16 leases or more for 500 requests.
    assert len(calls) <= 5, calls
    assert run.requests == 501 and run.members["a"].outstanding == 0


def test_news_reaches_a_watching_partition_without_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reports of an unbounded partition every minute: only the pushed news can reach it in time.
    monkeypatch.setattr(coordination, "UNBOUNDED_REPORT_S", 60.0)
    clock = Clock()
    run = coordinator(clock)
    run.lease("x", 0, REQUEST, report(settled=1, answers=1))  # the probe came back: unbounded
    calls = {"a": 0, "b": 0}

    def caller(name: str) -> Any:
        def call(*args: Any) -> dict:
            calls[name] += 1
            return run.lease(*args)
        return call

    a = SharedRun(caller("a"), "a", clock=clock, watch=run.watch)
    b = SharedRun(caller("b"), "b", clock=clock, watch=run.watch)

    async def go() -> None:
        await a.reserve(REQUEST)
        await b.reserve(REQUEST)
        assert a.unbounded and b.unbounded and b._watching
        before = calls["b"]
        a.pause(5.0, "rate limited")  # a's 429: its urgent lease tells the coordinator
        for _ in range(500):  # at most 5 s, far below b's report period
            if b.paused_until > clock.now:
                break
            await asyncio.sleep(0.01)
        assert b.paused_until == pytest.approx(clock.now + 5.0) and b.pause_reason == "rate limited"
        assert calls["b"] == before + 1  # one exchange, on the news
        await a.close()
        await b.close()

    asyncio.run(go())


def test_wait_news_returns_on_news_or_after_its_timeout() -> None:
    clock = Clock()
    run = coordinator(clock)

    async def go() -> tuple[int, int]:
        waiting = asyncio.ensure_future(run.wait_news(run.news, timeout=30.0))
        await asyncio.sleep(0)
        run.lease("a", 0, REQUEST, report(pause=(2.0, "rate limited")))
        told = await waiting
        quiet = await run.wait_news(run.news, timeout=0.01)
        return told, quiet

    told, quiet = asyncio.run(go())
    assert told == 1 and quiet == 1 and run._watchers == []


def test_a_pause_voids_slots_booked_before_its_end() -> None:
    clock = Clock()
    run = coordinator(clock, requests_per_minute=6000)  # 100/s: 20 slots a lease
    shared = SharedRun(lambda *args: run.lease(*args), "a", want=64, clock=clock)

    async def go() -> float:
        await shared.reserve(REQUEST)
        assert len(shared._slots) == 19
        shared.pause(0.1, "rate limited")
        # Used after the pause, the slots booked for its 0.1 s would go out all at once.
        left = list(shared._slots)
        assert left and all(at >= clock.now + 0.1 for at in left)
        assert shared._report["expired"] == 19 - len(left)
        wait = await shared.reserve(REQUEST)
        await shared.close()
        return wait

    assert asyncio.run(go()) >= 0.1 - 1e-9
