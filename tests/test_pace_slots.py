"""Pace's concurrency slots: waiters are woken one per free slot, in arrival order, and a waiter
cancelled while being handed a slot passes it on (issue 18: 64 engine workers under a cap of 32
all woke on every release)."""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

import pytest

from gen_ai_frames.ratelimit import Pace


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _counting(pace: Pace) -> tuple[list[int], list[asyncio.Task[None]]]:
    """64 workers acquiring ``pace``; each records its number when it gets a slot."""
    order: list[int] = []

    async def worker(i: int) -> None:
        await pace.acquire()
        order.append(i)

    return order, [asyncio.ensure_future(worker(i)) for i in range(64)]


class _Resumptions:
    """Counts how often a ``Pace.acquire`` frame runs: a profiler sees a coroutine's frame called
    again each time it resumes, so a waiter woken to find no slot counts too."""

    def __init__(self) -> None:
        self.n = 0

    def __enter__(self) -> _Resumptions:
        code = Pace.acquire.__code__

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code is code:
                self.n += 1

        sys.setprofile(profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def test_each_release_wakes_one_waiter_in_arrival_order() -> None:
    async def main() -> None:
        pace = Pace(64, clock=lambda: 0.0, slow_start=False)
        pace.limit_concurrency(32)
        order, tasks = _counting(pace)
        await _settle()
        assert pace.in_flight == 32 and order == list(range(32))
        with _Resumptions() as resumed:
            for k in range(32):
                pace.release()
                await _settle()
                assert pace.in_flight == 32  # the freed slot went straight to the next waiter
                assert order[-1] == 32 + k  # first come, first served
        assert resumed.n == 32  # one wake-up per release, not one per waiter
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_larger_cap_or_window_lets_that_many_waiters_in() -> None:
    async def main() -> None:
        pace = Pace(64, clock=lambda: 0.0)  # slow start: 8 slots until answers open it
        order, tasks = _counting(pace)
        await _settle()
        assert len(order) == 8
        pace.on_answer()  # slow start: one more slot per answer
        await _settle()
        assert len(order) == 9
        pace.limit_concurrency(4)  # a smaller cap wakes no one and takes no slot back
        await _settle()
        assert len(order) == 9 and pace.in_flight == 9
        pace.release()
        pace.release()
        await _settle()
        assert len(order) == 9  # 7 in flight, still over the cap of 4
        pace.limit_concurrency(64)
        pace._open_fully()
        await _settle()
        assert sorted(order) == list(range(64)) and pace.in_flight == 62
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_waiter_cancelled_while_handed_a_slot_passes_it_on() -> None:
    async def main() -> None:
        pace = Pace(1, clock=lambda: 0.0, slow_start=False)
        await pace.acquire()
        first = asyncio.ensure_future(pace.acquire())
        second = asyncio.ensure_future(pace.acquire())
        await _settle()
        pace.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs
        await _settle()
        assert first.cancelled()
        assert second.done() and pace.in_flight == 1  # the slot went on to `second`
        third = asyncio.ensure_future(pace.acquire())
        await _settle()
        third.cancel()  # cancelled while waiting: leaves the queue, takes no slot
        await _settle()
        pace.release()
        assert pace.in_flight == 0
        await pace.acquire()  # nothing leaked: the one slot is free
        assert pace.in_flight == 1

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(5))
def test_in_flight_never_exceeds_the_cap_under_random_releases(seed: int) -> None:
    rng = random.Random(seed)

    async def main() -> None:
        pace = Pace(64, clock=lambda: 0.0, slow_start=False)
        pace.limit_concurrency(16)
        most = {"n": 0}

        async def request() -> None:
            await pace.acquire()
            most["n"] = max(most["n"], pace.in_flight)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            if rng.random() < 0.1:
                pace.limit_concurrency(rng.choice([4, 16, 32]))
            pace.release()

        await asyncio.gather(*(request() for _ in range(500)))
        assert pace.in_flight == 0 and not pace._waiters
        assert most["n"] <= 32

    asyncio.run(main())
