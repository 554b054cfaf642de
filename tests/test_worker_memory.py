"""The runner's worker threads hand the Arrow memory they freed back to the system (issue 19).

Arrow's default pool keeps the pages a thread freed for that thread's next use. The runner builds
big short-lived arrays on worker threads (row keys, checkpoint parts, merges) that then sit idle:
under load several threads each kept their own, and a checkpointed million-row run held hundreds of
MB more than it used.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from gen_ai_frames.runner import in_thread


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _build_and_drop_60_mb() -> int:
    parts = [pa.array(["x" * 60] * 50_000) for _ in range(20)]
    return sum(part.nbytes for part in parts)


def test_worker_threads_give_back_the_arrow_memory_they_freed():
    async def four_at_once(run) -> tuple[int, int]:
        before = _rss()
        built = await asyncio.gather(*(run(_build_and_drop_60_mb) for _ in range(4)))
        return _rss() - before, sum(built)

    kept, built = asyncio.run(four_at_once(in_thread))
    assert built > 200e6  # four threads built ~65 MB each at the same time
    # Without the release each thread keeps its ~65 MB (asyncio.to_thread here: ~400 MB).
    assert kept < 100e6, f"{kept / 1e6:.0f} MB still held after the threads freed {built / 1e6:.0f} MB"


def test_in_thread_returns_the_result_and_raises_the_error():
    assert asyncio.run(in_thread(divmod, 7, 2)) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(in_thread(divmod, 1, 0))
