"""Where a run's memory goes: RSS and Arrow's pool at each phase boundary of one ``generate`` call.

``bench_scale.py`` gives one peak per run; this names the step that adds to it. One call of
``df.genai.generate`` (or polars') runs in this process against the fake server at zero latency;
the runner's steps are wrapped to print, on entry (``>``) and exit (``<``):

* ``rss``: the process's RSS over its RSS once the frame was built;
* ``peak``: the process's peak RSS since then, over the same baseline (``VmHWM``, reset at the
  baseline): a step whose ``peak`` is above both its ``rss`` figures peaked inside;
* ``pool``: bytes Arrow's default pool has allocated (``pa.total_allocated_bytes``);
* ``malloc``: bytes glibc's malloc has handed out (``mallinfo2``: NumPy and Python's big objects).

RSS that grows while ``pool`` and ``malloc`` do not is memory an allocator kept after it was freed
(section 12 of RESULTS.md found two such cases this way).

    python benchmarks/phase_memory.py --rows 300000 --checkpoint
    python benchmarks/phase_memory.py --rows 300000 --frontend polars
    ARROW_DEFAULT_MEMORY_POOL=jemalloc python benchmarks/phase_memory.py --rows 100000 --checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import bench_scale  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out, or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class PhasePrinter:
    """Prints RSS, Arrow's pool and malloc, relative to a baseline, at each wrapped step."""

    def __init__(self) -> None:
        self.base_rss = 0

    def show(self, label: str) -> None:
        import pyarrow as pa

        malloc = _malloc_in_use()
        print(
            f"{label:32s} rss +{(bench_scale.rss_bytes() - self.base_rss) / 1e6:7.1f} MB"
            f"  peak +{(bench_scale.peak_rss_bytes() - self.base_rss) / 1e6:7.1f} MB"
            f"  pool {pa.total_allocated_bytes() / 1e6:7.1f} MB"
            + ("" if malloc is None else f"  malloc {malloc / 1e6:7.1f} MB"),
            flush=True,
        )

    def wrap(self, owner: Any, name: str, label: str | None = None) -> None:
        """Print on entry to and exit from ``owner.name`` (a function or a coroutine function)."""
        function = getattr(owner, name)
        label = label or name
        if asyncio.iscoroutinefunction(function):

            @functools.wraps(function)
            async def wrapped(*args: Any, **kwargs: Any) -> Any:
                self.show("> " + label)
                try:
                    return await function(*args, **kwargs)
                finally:
                    self.show("< " + label)

        else:

            @functools.wraps(function)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                self.show("> " + label)
                try:
                    return function(*args, **kwargs)
                finally:
                    self.show("< " + label)

        setattr(owner, name, wrapped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--frontend", choices=("pandas", "polars"), default="pandas")
    p.add_argument("--checkpoint", action="store_true", help="run with a checkpoint in a temporary directory")
    args = p.parse_args(argv)

    import aiohttp  # noqa: F401  (imported lazily by the transport: keep it out of the figures)
    import pyarrow as pa

    import gen_ai_frames
    import gen_ai_frames.checkpoint as checkpoint
    import gen_ai_frames.memory
    import gen_ai_frames.results as results
    import gen_ai_frames.runner as runner

    printer = PhasePrinter()
    printer.wrap(runner, "_row_keys", "row keys")
    printer.wrap(runner, "_send_groups", "send")
    printer.wrap(runner._Writer, "close", "last checkpoint write")
    printer.wrap(results.ResultBuffer, "columns", "result columns")
    printer.wrap(checkpoint.Checkpoint, "close", "checkpoint close")
    printer.wrap(runner.RowResults, "frame_columns", "pandas columns")
    if args.frontend == "polars":
        import gen_ai_frames.polars as polars_front

        printer.wrap(polars_front, "frame_prompts", "polars prompts")
        printer.wrap(polars_front, "result_series", "polars columns")
    else:
        import gen_ai_frames.accessor as accessor

        printer.wrap(accessor, "build_prompts", "pandas prompts")

    print(f"# phase_memory: frontend={args.frontend}, rows={args.rows:,}, checkpoint={args.checkpoint}, "
          f"Arrow pool {pa.default_memory_pool().backend_name}")
    with _common.FakeServerProcess(["--latency", "0"]) as server, tempfile.TemporaryDirectory() as tmp:
        prompts = bench_scale.make_prompts(args.rows)
        frame = bench_scale.make_frame(args.frontend, prompts)
        del prompts
        gc.collect()
        client = gen_ai_frames.create_client(provider="openai", endpoint=server.url, model_name="m")
        bench_scale.load_arrow_compute()  # as bench_scale.py: ~50 MB of library, once per process
        printer.base_rss = bench_scale.rss_bytes()
        bench_scale.reset_peak_rss()
        printer.show("start")
        out = frame.genai.generate(
            "prompt", client=client, chunk_size=2000, max_concurrent=128, progress=False,
            checkpoint=os.path.join(tmp, "run.ckpt") if args.checkpoint else None,
        )
        printer.show("returned")
        # What the allocators keep of memory already freed: the RSS each release gives back.
        pa.default_memory_pool().release_unused()
        printer.show("after Arrow pool release")
        trim = gen_ai_frames.memory._malloc_trim()  # the package's own handle on glibc's
        if trim is not None:
            trim(0)
            printer.show("after malloc_trim")
        correct, returned = bench_scale.check_output(args.frontend, out)
    print(f"# {correct}/{len(out)} rows answered right; returned columns {returned / 1e6:.1f} MB")
    return 0 if correct == len(out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
