"""The runner's worker threads hand the memory they freed back to the system (issue 19).

Arrow's default pool keeps the pages a thread freed for that thread's next use, and glibc's malloc
(NumPy's arrays) keeps freed heap pages once a big free has raised its mmap threshold. The runner
builds big short-lived arrays on worker threads (row keys, checkpoint parts, merges) that then sit
idle: under load several threads each kept their own, and a checkpointed million-row run held
hundreds of MB more than it used.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from gen_ai_frames.memory import _malloc_trim, in_thread

# Four worker calls each build and drop ~65 MB of Arrow arrays (``arrow``, four threads at once)
# or NumPy arrays (``numpy``, one after another); the RSS the process keeps afterwards is printed. Run in a fresh process: a
# test suite's earlier allocations would blur what these threads keep.
_FOUR_THREADS = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np
    import pyarrow as pa
    from gen_ai_frames.memory import in_thread

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def build_and_drop_arrow():
        # Built by Arrow alone (a take), not from a Python list: glibc's share stays out of it.
        one = pa.array(["x" * 60])
        index = pa.array(np.zeros(50_000, dtype=np.int32))
        parts = [one.take(index) for _ in range(20)]
        return sum(part.nbytes for part in parts)

    def build_and_drop_numpy():
        first = np.ones(30_000_000 // 8)  # a big free raises glibc's mmap threshold ...
        del first
        parts = [np.ones(4_000_000 // 8) for _ in range(16)]  # ... so these come from its heaps
        return sum(part.nbytes for part in parts)

    async def main(run, work, together):
        pa.array([1]).cast(pa.float64())  # Arrow's kernels loaded before the baseline
        before = rss()
        if together:
            built = await asyncio.gather(*(run(work) for _ in range(4)))
        else:
            built = [await run(work) for _ in range(4)]
        return rss() - before, sum(built)

    run = in_thread if sys.argv[1] == "in_thread" else asyncio.to_thread
    arrow = sys.argv[2] == "arrow"
    # NumPy's calls run one after another: when threads overlap, what glibc keeps in a thread
    # arena's top chunk (which malloc_trim leaves) depends on their interleaving.
    work = build_and_drop_arrow if arrow else build_and_drop_numpy
    print(json.dumps(asyncio.run(main(run, work, together=arrow))))
    """
)


def _kept_after_four_threads(how: str, kind: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _FOUR_THREADS, how, kind],
        capture_output=True, text=True, timeout=120, check=True,
    )
    kept, built = json.loads(done.stdout)
    return kept, built


def test_worker_threads_give_back_the_arrow_memory_they_freed():
    kept, built = _kept_after_four_threads("in_thread", "arrow")
    assert built > 200e6  # four threads built ~65 MB each at the same time
    # Through asyncio.to_thread each thread keeps its ~65 MB: ~250-400 MB here.
    assert kept < 100e6, f"{kept / 1e6:.0f} MB still held after the threads freed {built / 1e6:.0f} MB"


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc's malloc_trim only")
def test_worker_threads_give_back_the_numpy_memory_they_freed():
    kept, built = _kept_after_four_threads("in_thread", "numpy")
    assert built > 200e6
    # Through asyncio.to_thread glibc keeps ~94 MB of it here; through in_thread, none.
    assert kept < 50e6, f"{kept / 1e6:.0f} MB still held after the threads freed {built / 1e6:.0f} MB"


def test_in_thread_returns_the_result_and_raises_the_error():
    assert asyncio.run(in_thread(divmod, 7, 2)) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(in_thread(divmod, 1, 0))


def test_a_run_hands_back_its_row_arrays_once_they_are_freed(
    fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's row numbers (4 bytes a row) are freed only when it returns, just before the caller
    builds its frame: the release must come after that, or glibc keeps their pages for the whole
    conversion (where polars without a checkpoint peaks)."""
    import weakref

    import gen_ai_frames.runner as runner
    from gen_ai_frames import create_client
    from gen_ai_frames.options import RunOptions

    client = create_client(endpoint=fake_server.url, model_name="m")
    alive: list[weakref.ref] = []
    row_numbers = runner._row_numbers

    def watched(rows: Any) -> Any:
        kept = row_numbers(rows)
        alive.append(weakref.ref(kept))
        return kept

    released: list[bool] = []
    monkeypatch.setattr(runner, "_row_numbers", watched)
    monkeypatch.setattr(runner, "release_unused", lambda: released.append(alive[0]() is None))
    results = asyncio.run(runner.run_rows(["a", "b"], client=client, options=RunOptions(progress=False)))
    assert results.columns["response"] == ["echo: a", "echo: b"]
    assert len(alive) == 1 and released == [True]
