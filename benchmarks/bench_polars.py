"""polars vs pandas: the same 20,000 rows through ``df.genai.generate`` of each library, same server,
same run; and the peak memory of ``lf.genai.generate`` over a lazy scan of a large Parquet file.

Throughput part: the fake server is started once (lognormal latency, median 50 ms, sigma 1.0, and
0.1 % of prompts 3 s slower, as in bench_accessor.py); each variant runs in its own fresh subprocess,
with the server reseeded before each so both get the same latency draws and slow prompts:

* ``pandas``  ``pd.DataFrame(...).genai.generate(column="prompt", client=client, chunk_size=500,
              checkpoint=<new dir>, max_concurrent=128, progress=False)``
* ``polars``  the same call on ``pl.DataFrame(...)``
* ``expr``    ``pl_df.with_columns(pl.col("prompt").genai.generate(...same options...).struct.unnest())``

Targets: polars rows/s >= 0.95 x pandas rows/s, polars client CPU per row <= 1.05 x pandas'. Rounds
are interleaved (``--repeat``), medians reported.

Memory part (``--lazy-rows``): a helper subprocess writes a Parquet file of N distinct short prompts;
a fresh worker runs ``pl.scan_parquet(IN).genai.generate("prompt", client=client, output=OUT,
checkpoint=DIR, batch_rows=50_000, max_concurrent=128, progress=False)`` (then scans OUT lazily to
check every answer) and reports its peak RSS (``ru_maxrss``, taken before the check); a worker that only
imports polars and gen_ai_frames gives the floor. The fake server answers with no latency.

    python benchmarks/bench_polars.py --repeat 3                      # 20,000 rows, C=128
    python benchmarks/bench_polars.py --variants "" --lazy-rows 100000,1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("pandas", "polars", "expr")
THROUGHPUT_TARGET = 0.95  # polars rows/s / pandas rows/s, at least
CPU_TARGET = 1.05  # polars client CPU per row / pandas', at most


def make_prompts(n: int) -> list[str]:
    return [f"Row {i}: summarize record number {i} in one line." for i in range(n)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    """Child process: run one variant, measure it, check every answer, emit JSON."""
    import aiohttp  # noqa: F401  (imported lazily by the transport: keep it out of the timing)
    import pandas as pd
    import polars as pl

    import gen_ai_frames
    from gen_ai_frames.checkpoint import read_checkpoint

    if args._worker == "floor":
        _common.emit_result({"variant": "floor", "peak_rss_mib": peak_rss_mib()})
        return
    client = gen_ai_frames.create_client(provider="openai", endpoint=args.url, model_name="m")
    tmp = tempfile.mkdtemp(prefix="bench_polars_", dir=args.tmp_dir)
    checkpoint = os.path.join(tmp, "run.ckpt")
    options = {"client": client, "checkpoint": checkpoint, "max_concurrent": args.max_concurrent,
               "progress": False}
    extra: dict[str, Any] = {}
    try:
        if args._worker == "lazy":
            output = os.path.join(tmp, "out.parquet")
            lf = pl.scan_parquet(args.input)
            gc.collect()
            with _common.measure() as m:
                result = lf.genai.generate("prompt", output=output, batch_rows=args.batch_rows, **options)
            peak = peak_rss_mib()
            check = result.select(
                rows=pl.len(), correct=(pl.col("response") == pl.lit("echo: ") + pl.col("prompt")).sum()
            ).collect()
            _common.emit_result({"variant": "lazy", "n": int(check["rows"][0]), **m.as_dict(),
                                 "correct": int(check["correct"][0]), "peak_rss_mib": peak,
                                 "output_mib": os.path.getsize(output) / 2**20})
            return
        prompts = make_prompts(args.n)
        options["chunk_size"] = args.chunk_size
        send: Callable[[], list[Any]]
        if args._worker == "pandas":
            df = pd.DataFrame({"prompt": prompts})

            def send() -> list[Any]:
                return df.genai.generate(column="prompt", **options)["response"].tolist()
        elif args._worker == "polars":
            frame = pl.DataFrame({"prompt": prompts})

            def send() -> list[Any]:
                return frame.genai.generate("prompt", **options)["response"].to_list()
        else:
            frame = pl.DataFrame({"prompt": prompts})

            def send() -> list[Any]:
                expr = pl.col("prompt").genai.generate(**options).struct.unnest()
                return frame.with_columns(expr)["response"].to_list()

        gc.collect()
        with _common.measure() as m:
            answers = send()
        correct = sum(1 for a, p in zip(answers, prompts) if a == "echo: " + p) if len(answers) == len(prompts) else 0
        stored = read_checkpoint(checkpoint)
        extra["checkpoint_rows"] = len(stored)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _common.emit_result({"variant": args._worker, "n": args.n, **m.as_dict(), "correct": correct, **extra})


def make_input(path: str, rows: int) -> None:
    """Helper subprocess: the Parquet input of the memory part."""
    import polars as pl

    pl.DataFrame({"id": range(rows), "prompt": make_prompts(rows)}).write_parquet(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="rows of the throughput part (default 20000)")
    p.add_argument("--max-concurrent", type=int, default=128, help="requests in flight (default 128)")
    p.add_argument("--chunk-size", type=int, default=500, help="chunk_size (default 500)")
    p.add_argument("--latency-median", type=float, default=0.05, help="lognormal median latency, s")
    p.add_argument("--latency-sigma", type=float, default=1.0, help="lognormal sigma")
    p.add_argument("--slow-fraction", type=float, default=0.001, help="fraction of prompts 3 s slower")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; medians are reported")
    p.add_argument("--variants", default="pandas,polars,expr", help="comma-separated subset of pandas,polars,expr")
    p.add_argument("--lazy-rows", default="", help="comma-separated input sizes of the memory part (e.g. 1000000)")
    p.add_argument("--batch-rows", type=int, default=50_000, help="lf.genai.generate batch_rows (default 50000)")
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--_worker", choices=(*VARIANTS, "lazy", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--_make-input", dest="make_input", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variant_list if v not in VARIANTS]:
        p.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    args.lazy_sizes = [int(v) for v in args.lazy_rows.split(",") if v.strip()]
    return args


def worker_cmd(args: argparse.Namespace, variant: str, url: str, **more: Any) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--url", url, "--n", str(args.n),
           "--max-concurrent", str(args.max_concurrent), "--chunk-size", str(args.chunk_size),
           "--batch-rows", str(args.batch_rows)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    for key, value in more.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def throughput(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    mean_latency = args.latency_median * math.exp(args.latency_sigma ** 2 / 2) + args.slow_fraction * 3.0
    print(f"# throughput: N={args.n}, max_concurrent={args.max_concurrent}, chunk_size={args.chunk_size}, "
          f"latency lognormal(median={args.latency_median * 1000:g} ms, sigma={args.latency_sigma:g}) + "
          f"{args.slow_fraction:g} of prompts +3 s (mean ~{mean_latency * 1000:.0f} ms), repeat={args.repeat}")
    server_args = ["--latency-median", str(args.latency_median), "--latency-sigma", str(args.latency_sigma),
                   "--seed", str(args.seed), "--chaos-slow-seconds", "3"]
    if args.slow_fraction > 0:
        server_args += ["--chaos", json.dumps({"slow": args.slow_fraction})]
    runs: list[dict[str, Any]] = []
    with _common.FakeServerProcess(server_args) as server:
        for run_no in range(1, args.repeat + 1):
            for variant in args.variant_list:
                server.configure(seed=args.seed)
                result = _common.run_measured_worker(server, worker_cmd(args, variant, server.url),
                                                     timeout=args.timeout)
                result.pop("stderr", None)
                n = result["n"]
                result.update(run=run_no, rows_per_s=n / result["wall_s"], cpu_ms=result["cpu_s"] * 1000 / n,
                              check=f"{result['correct']}/{n}", ckpt=f"{result['checkpoint_rows']}/{n}")
                runs.append(result)
                print(f"  run {run_no} {variant:7s} {result['wall_s']:6.2f} s  {result['rows_per_s']:6.0f} rows/s  "
                      f"{result['cpu_ms']:.3f} ms CPU/row  correct {result['check']}  "
                      f"bg load {result['background_cores']:.2f} cores", flush=True)
    summary = []
    for variant in args.variant_list:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant}
        for key in ("wall_s", "rows_per_s", "cpu_ms", "background_cores"):
            row[key] = _common.median([r[key] for r in mine])
        row["check"] = f"{sum(r['correct'] for r in mine)}/{sum(r['n'] for r in mine)}"
        summary.append(row)
    columns = [("variant", "variant", ""), ("wall_s", "wall s", ".2f"), ("rows_per_s", "rows/s", ".0f"),
               ("cpu_ms", "client CPU ms/row", ".3f"), ("background_cores", "bg load (cores)", ".2f"),
               ("check", "correct", "")]
    print(f"\nMedian of {args.repeat} round(s) per variant:")
    print(_common.format_table(summary, columns))
    by = {r["variant"]: r for r in summary}
    ok = True
    for variant in ("polars", "expr"):
        if variant in by and "pandas" in by:
            speed = by[variant]["rows_per_s"] / by["pandas"]["rows_per_s"]
            cpu = by[variant]["cpu_ms"] / by["pandas"]["cpu_ms"]
            ok &= speed >= THROUGHPUT_TARGET and cpu <= CPU_TARGET
            print(f"{variant}/pandas rows/s = {speed:.3f} (target >= {THROUGHPUT_TARGET}: "
                  f"{'PASS' if speed >= THROUGHPUT_TARGET else 'MISS'}); client CPU/row = {cpu:.3f} "
                  f"(target <= {CPU_TARGET}: {'PASS' if cpu <= CPU_TARGET else 'MISS'})")
    failed = [r for r in runs if r["correct"] != r["n"] or r["checkpoint_rows"] != r["n"]]
    return runs, summary, ok and not failed


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    print(f"\n# memory: lf.genai.generate over scan_parquet, batch_rows={args.batch_rows}, "
          f"max_concurrent={args.max_concurrent}, no latency")
    results = []
    tmp = tempfile.mkdtemp(prefix="bench_polars_mem_", dir=args.tmp_dir)
    try:
        with _common.FakeServerProcess(["--latency", "0"]) as server:
            floor = _common.run_worker(worker_cmd(args, "floor", server.url))
            print(f"  floor (imports only): peak RSS {floor['peak_rss_mib']:.0f} MiB")
            for rows in args.lazy_sizes:
                path = os.path.join(tmp, f"in-{rows}.parquet")
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_make-input", path, "--n",
                                str(rows)], check=True, env=_common.subprocess_env())
                result = _common.run_measured_worker(server, worker_cmd(args, "lazy", server.url, input=path),
                                                     timeout=args.timeout)
                result.pop("stderr", None)
                result.update(rows=rows, floor_mib=floor["peak_rss_mib"],
                              input_mib=os.path.getsize(path) / 2**20, rows_per_s=result["n"] / result["wall_s"])
                results.append(result)
                print(f"  {rows:>9,} rows: peak RSS {result['peak_rss_mib']:.0f} MiB (floor "
                      f"{floor['peak_rss_mib']:.0f}), input {result['input_mib']:.1f} MiB, output "
                      f"{result['output_mib']:.1f} MiB, {result['wall_s']:.0f} s ({result['rows_per_s']:.0f} rows/s), "
                      f"correct {result['correct']}/{rows}, bg load {result['background_cores']:.2f} cores", flush=True)
                os.remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_input:
        make_input(args.make_input, args.n)
        return 0
    if args._worker:
        worker(args)
        return 0
    _common.print_environment()
    ok = True
    runs: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    if args.variant_list:
        runs, summary, ok = throughput(args)
    mem = memory(args) if args.lazy_sizes else []
    ok &= all(r["correct"] == r["rows"] for r in mem)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "runs": runs,
                                               "summary": summary, "memory": mem}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
