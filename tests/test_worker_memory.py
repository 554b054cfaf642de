"""The runner's worker threads hand the Arrow memory they freed back to the system (issue 19).

Arrow's default pool keeps the pages a thread freed for that thread's next use. The runner builds
big short-lived arrays on worker threads (row keys, checkpoint parts, merges) that then sit idle:
under load several threads each kept their own, and a checkpointed million-row run held hundreds of
MB more than it used.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from gen_ai_frames.runner import in_thread

# Four worker threads at once each build and drop ~65 MB of Arrow arrays; the RSS the process
# keeps afterwards is printed. Run in a fresh process: a test suite's earlier allocations would
# blur what these threads keep.
_FOUR_THREADS = textwrap.dedent(
    """
    import asyncio, json, sys
    import pyarrow as pa
    from gen_ai_frames.runner import in_thread

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def build_and_drop():
        parts = [pa.array(["x" * 60] * 50_000) for _ in range(20)]
        return sum(part.nbytes for part in parts)

    async def main(run):
        pa.array([1]).cast(pa.float64())  # Arrow's kernels loaded before the baseline
        before = rss()
        built = await asyncio.gather(*(run(build_and_drop) for _ in range(4)))
        return rss() - before, sum(built)

    run = in_thread if sys.argv[1] == "in_thread" else asyncio.to_thread
    print(json.dumps(asyncio.run(main(run))))
    """
)


def _kept_after_four_threads(how: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _FOUR_THREADS, how], capture_output=True, text=True, timeout=120, check=True
    )
    kept, built = json.loads(done.stdout)
    return kept, built


def test_worker_threads_give_back_the_arrow_memory_they_freed():
    kept, built = _kept_after_four_threads("in_thread")
    assert built > 200e6  # four threads built ~65 MB each at the same time
    # Through asyncio.to_thread each thread keeps its ~65 MB: ~250-400 MB here.
    assert kept < 100e6, f"{kept / 1e6:.0f} MB still held after the threads freed {built / 1e6:.0f} MB"


def test_in_thread_returns_the_result_and_raises_the_error():
    assert asyncio.run(in_thread(divmod, 7, 2)) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(in_thread(divmod, 1, 0))
