"""Many rows on one machine: throughput, memory and resume time of ``df.genai.generate`` (issue 19).

The fake server answers at zero latency (``--latency 0``), so the client's own work per row is what
is measured. Each variant runs in its own fresh subprocess:

* ``plain``     ``df.genai.generate(column="prompt", client=client, chunk_size=2000,
                max_concurrent=128, progress=False)`` over N distinct ~55-character prompts
* ``ckpt``      the same with ``checkpoint=<dir>`` (the checkpoint is kept for ``resume``)
* ``resume``    the same call again on the finished checkpoint: nothing is sent (checked with the
                server's request count); its wall time is the time to the first request of a resume
* ``synthetic`` writes an M-row checkpoint directly (no server, ``--synthetic-rows``, default
                10,000,000), then resumes it with one new row appended to the frame: the wall time of
                that call is the time to the first (and only) request

``--frontend`` picks who runs ``plain`` and ``ckpt`` (issue 19 asks the same of each):

* ``pandas``    ``df.genai.generate`` (the default; the only one for ``resume`` and ``synthetic``)
* ``polars``    ``pl_df.genai.generate`` over a polars frame of the same prompts
* ``dask``      ``ddf.genai.generate(...).compute(scheduler="synchronous")`` over ONE partition
                holding every row: what one Dask worker runs for one partition (the partition's
                sharded checkpoint included). The Dask frame is built before the baseline RSS.

Memory: ``peak RSS over the frame`` is the process's peak RSS (``VmHWM``) minus its RSS once the
input frame is built; the peak is reset at that moment (``/proc/self/clear_refs``), so building the
frame (a million Python strings, or ``dd.from_pandas``, which peaks at ~135 MB over the frame while it
tokenizes it) cannot hide the call's own peak. The ``dask`` front end imports ``distributed`` before
that moment (~35 MB of modules that every Dask worker has loaded, imported by ``compute()``), and
every front end loads Arrow's compute kernels before it (:func:`load_arrow_compute`: ~50 MB of library
that building a pandas frame of text loads anyway, a polars frame not). ``returned`` is the deep
memory size of the columns the call added (pandas' ``memory_usage(deep=True)``; for polars,
``estimated_size()`` plus the 16-byte view of each text value, which polars holds and its estimate
leaves out), and ``peak / returned`` their ratio (issue 19's target: <= 2 at 1,000,000 rows).

``s to first send``: seconds from the call to the moment the runner starts sending (for a resume,
once the rows are matched against the checkpoint; the stored answers are read after that). Only
code with the runner's ``_send_groups`` step reports it.

    python benchmarks/bench_scale.py                          # 1,000,000 rows, all variants
    python benchmarks/bench_scale.py --rows 200000 --variants plain,ckpt,resume
    python benchmarks/bench_scale.py --variants synthetic --synthetic-rows 10000000
    python benchmarks/bench_scale.py --frontend polars --variants plain,ckpt
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("plain", "ckpt", "resume", "synthetic")
FRONTENDS = ("pandas", "polars", "dask")


def make_prompts(n: int, start: int = 0) -> list[str]:
    """Distinct prompts of ~55 characters (dedupe must not skip any)."""
    return [f"Summarize customer review number {i:09d} in one line." for i in range(start, start + n)]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The peak RSS of this process's memory (``VmHWM``), which :func:`reset_peak_rss` resets.

    Not ``ru_maxrss``: it also keeps the peak seen when any thread of the process exited (the
    kernel folds it in then), which no reset clears."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Start the peak RSS over from the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss_bytes() < rss_bytes() + 16 * 2**20  # the reset took


def load_arrow_compute() -> None:
    """Load Arrow's compute kernels now, as building a pandas frame of text already has.

    The first compute call of a process (a cast, a take) maps and initialises Arrow's kernel library:
    about 50 MB of RSS, once per process, whatever the rows. A pandas frame's construction makes that
    call; a polars frame's does not. Without this the polars figures would carry it and pandas' not.
    """
    import pyarrow as pa

    pa.array([1]).cast(pa.float64())


def write_synthetic(path: str, rows: int, url: str) -> float:
    """An answered checkpoint of ``rows`` rows, written part by part as a run would; returns seconds."""
    import gen_ai_frames
    from gen_ai_frames.checkpoint import Checkpoint, make_records, run_fingerprint
    from gen_ai_frames.options import RunOptions

    # The fingerprint of the resuming call: same provider, endpoint, model and parameters.
    client = gen_ai_frames.create_client(provider="openai", endpoint=url, model_name="m")
    fingerprint = run_fingerprint(client, RunOptions().params)
    started = time.perf_counter()
    prompts = make_prompts(rows)  # distinct, so keys counted per part equal keys over the whole frame
    part = 500_000
    with Checkpoint.open(path, fingerprint) as store:
        for lo in range(0, rows, part):
            chunk = prompts[lo : lo + part]
            records = make_records(chunk, positions=range(lo, lo + len(chunk)),
                                   responses=["echo: " + p for p in chunk])
            store.append(records)
    return time.perf_counter() - started


def _time_first_send() -> list[float]:
    """Note when the run starts sending (the first request of a resume): the runner's send step
    is wrapped; the list gets that moment. Code without that step (another version) notes nothing."""
    import gen_ai_frames.runner as runner

    moments: list[float] = []
    send = getattr(runner, "_send_groups", None)
    if send is None:
        return moments

    async def timed(*args: Any, **kwargs: Any) -> Any:
        if not moments:
            moments.append(time.perf_counter())
        return await send(*args, **kwargs)

    runner._send_groups = timed
    return moments


def make_frame(frontend: str, prompts: list[str]) -> Any:
    """The input frame of ``frontend``: a pandas, polars or one-partition Dask frame."""
    import pandas as pd

    if frontend == "polars":
        import polars as pl

        return pl.DataFrame({"prompt": prompts})
    df = pd.DataFrame({"prompt": prompts})
    if frontend == "dask":
        import dask.dataframe as dd

        import distributed  # noqa: F401  (compute() imports it; every worker has it loaded)

        import gen_ai_frames.dask  # noqa: F401  (registers ddf.genai)

        return dd.from_pandas(df, npartitions=1)
    return df


def check_output(frontend: str, out: Any) -> tuple[int, int]:
    """Rows answered right, and the bytes of the columns the call added (``response``, ``error``)."""
    if frontend == "polars":
        import polars as pl

        added = out.select("response", "error")
        correct = out.select((pl.col("response") == "echo: " + pl.col("prompt")).sum()).item()
        # polars holds text as one 16-byte view a row plus the characters, and estimated_size()
        # counts only the characters: 61 MB of a million answers that hold 77 MB.
        views = sum(16 * (s.len() - s.null_count()) for s in added.iter_columns() if s.dtype == pl.String)
        return int(correct), int(added.estimated_size()) + views
    added = out[["response", "error"]]
    correct = int((added["response"] == "echo: " + out["prompt"]).sum())
    return correct, int(added.memory_usage(deep=True, index=False).sum())


def worker(args: argparse.Namespace) -> None:
    import aiohttp  # noqa: F401  (imported lazily by the transport: keep it out of the timing)

    import gen_ai_frames  # registers df.genai, and pl_df.genai / ddf.genai when installed

    variant = args._worker
    extra: dict[str, Any] = {}
    n = args.rows
    if variant == "synthetic":
        n = args.synthetic_rows
        if not os.path.exists(os.path.join(args.checkpoint, "manifest.json")):
            extra["write_s"] = write_synthetic(args.checkpoint, n, args.url)
        gc.collect()
        prompts = make_prompts(n) + make_prompts(1, start=n)
    else:
        prompts = make_prompts(n)
    frame = make_frame(args.frontend, prompts)
    del prompts
    gc.collect()
    client = gen_ai_frames.create_client(provider="openai", endpoint=args.url, model_name="m")
    first_send = _time_first_send()
    load_arrow_compute()
    base_rss = rss_bytes()
    peak_was_reset = reset_peak_rss()
    checkpoint = None if variant == "plain" else args.checkpoint
    kwargs = dict(client=client, chunk_size=args.chunk_size, checkpoint=checkpoint,
                  max_concurrent=args.max_concurrent, progress=False)
    started = time.perf_counter()
    with _common.measure() as m:
        if args.frontend == "dask":
            out = frame.genai.generate("prompt", **kwargs).compute(scheduler="synchronous")
        else:
            out = frame.genai.generate("prompt", **kwargs)
    peak = peak_rss_bytes()
    correct, returned = check_output(args.frontend, out)
    _common.emit_result({
        "variant": variant, "n": len(out), **m.as_dict(), "correct": correct,
        "peak_over_frame_mb": (peak - base_rss) / 1e6,
        "returned_mb": returned / 1e6,
        "to_first_send_s": (first_send[0] - started) if first_send else None,
        "peak_reset": peak_was_reset,
        **extra,
    })


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of plain/ckpt/resume (default 1,000,000)")
    p.add_argument("--synthetic-rows", type=int, default=10_000_000, help="rows of the synthetic checkpoint")
    p.add_argument("--max-concurrent", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=2000)
    p.add_argument("--variants", default=None, help="default: all for pandas, plain,ckpt for the others")
    p.add_argument("--frontend", choices=FRONTENDS, default="pandas",
                   help="who runs plain/ckpt: the pandas accessor, polars, or one Dask partition")
    p.add_argument("--tmp-dir", default=None, help="where checkpoints go (default: system temp)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.frontend == "pandas" else ("plain", "ckpt"))
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    if args.frontend != "pandas" and not set(args.variant_list) <= {"plain", "ckpt"}:
        p.error(f"--frontend {args.frontend} runs the plain and ckpt variants only")
    if "resume" in args.variant_list and "ckpt" not in args.variant_list:
        p.error("resume needs the ckpt variant in the same run (it resumes that checkpoint)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    _common.print_environment()
    print(f"# bench_scale: frontend={args.frontend}, rows={args.rows:,}, synthetic={args.synthetic_rows:,}, "
          f"max_concurrent={args.max_concurrent}, chunk_size={args.chunk_size}, zero latency")
    tmp = tempfile.mkdtemp(prefix="bench_scale_", dir=args.tmp_dir)
    runs = []
    try:
        with _common.FakeServerProcess(["--latency", "0"]) as server:
            for variant in args.variant_list:
                ckpt = os.path.join(tmp, "synthetic.ckpt" if variant == "synthetic" else "run.ckpt")
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--url", server.url,
                       "--rows", str(args.rows), "--synthetic-rows", str(args.synthetic_rows),
                       "--max-concurrent", str(args.max_concurrent), "--chunk-size", str(args.chunk_size),
                       "--checkpoint", ckpt, "--frontend", args.frontend]
                result = _common.run_measured_worker(server, cmd, timeout=args.timeout)
                result.pop("stderr", None)
                n = result["n"]
                result.update(over_returned=result["peak_over_frame_mb"] / result["returned_mb"])
                result.update(rows_per_s=n / result["wall_s"], cpu_us=result["cpu_s"] * 1e6 / n,
                              bytes_per_row=result["peak_over_frame_mb"] * 1e6 / n, check=f"{result['correct']}/{n}")
                runs.append(result)
                if not result.get("peak_reset", True):
                    print("  (this kernel refused to reset the peak RSS: it may include building the frame)")
                print(f"  {variant:9s} {result['wall_s']:8.2f} s  {result['rows_per_s']:8.0f} rows/s  "
                      f"peak +{result['peak_over_frame_mb']:.0f} MB  requests {result['server_requests']}  "
                      f"bg load {result['background_cores']:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    columns = [("variant", "variant", ""), ("n", "rows", "d"), ("wall_s", "wall s", ".2f"),
               ("rows_per_s", "rows/s", ".0f"), ("cpu_us", "client CPU us/row", ".1f"),
               ("peak_over_frame_mb", "peak RSS over frame MB", ".0f"), ("bytes_per_row", "bytes/row", ".0f"),
               ("returned_mb", "returned columns MB", ".0f"), ("over_returned", "peak / returned", ".2f"),
               ("to_first_send_s", "s to first send", ".2f"), ("server_requests", "requests", "d"),
               ("background_cores", "bg load (cores)", ".2f"), ("check", "correct", "")]
    print()
    print(_common.format_table(runs, columns))
    by = {r["variant"]: r for r in runs}
    if "plain" in by and "ckpt" in by:
        print(f"\ncheckpoint / plain rows/s = {by['ckpt']['rows_per_s'] / by['plain']['rows_per_s']:.2f} "
              "(target >= 0.9)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
