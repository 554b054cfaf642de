"""run_sync, the bridge from sync entry points to the async core."""

from __future__ import annotations

import asyncio
import threading

from gen_ai_frames._sync import run_sync


class _CountsReprs:
    """A result that records every repr of itself (a big frame's repr costs memory and time)."""

    def __init__(self) -> None:
        self.reprs = 0

    def __repr__(self) -> str:
        self.reprs += 1
        return "<counted>"


def test_run_sync_returns_the_result_without_ever_building_its_repr():
    # Python 3.11's asyncio.run reprs its task (and so the result) in the main thread while it
    # restores the SIGINT handler: for a million-row frame that was the run's peak memory.
    assert threading.current_thread() is threading.main_thread()
    result = _CountsReprs()

    async def answer() -> _CountsReprs:
        await asyncio.sleep(0)
        return result

    assert run_sync(answer()) is result
    assert result.reprs == 0


def test_run_sync_inside_a_running_loop_returns_the_result_too():
    result = _CountsReprs()

    async def answer() -> _CountsReprs:
        return result

    async def notebook_cell() -> None:
        assert run_sync(answer()) is result  # a fresh loop in a worker thread

    asyncio.run(notebook_cell())  # returns None: this test's own asyncio.run has nothing to repr
    assert result.reprs == 0
