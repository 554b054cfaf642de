"""Scaling of ``ddf.genai.generate`` with the number of Dask workers.

One run starts the fake server once (a separate process, fixed latency), then answers the same
rows with the same partitions once per variant, each variant in its own fresh driver subprocess:

* ``pandas``    ``df.genai.generate(column="prompt", max_concurrent=32, checkpoint=...)`` in the
                driver itself: the single-process baseline
* ``dask-K``    a ``distributed.LocalCluster(n_workers=K, threads_per_worker=1, processes=True)``
                and ``ddf.genai.generate(column="prompt", max_concurrent=32 * K, checkpoint=...)``
                for K = 1, 2, 4: each worker runs one partition at a time with 32 requests in flight

Why ``max_concurrent = 32 per worker``: with a fixed 50 ms latency a partition with C requests in
flight answers at most C / 0.05 rows/s, so a fixed *total* would make every worker count equally
fast by construction (latency-bound). Scaling the total with the workers asks the question Dask
answers: do more processes give more rows/s? 32 is low enough that one worker is far from
CPU-bound (32 / 0.05 s = 640 rows/s, a fraction of a core for our client), so 1 -> 2 workers
should scale almost linearly; the ideal is 640 x K rows/s. On a 2-core machine the fake server and
K worker processes share two cores, so 4 workers cannot beat 2 once the CPU is the bottleneck: the
"worker CPU" and "server CPU" columns show where the cores went.

The cluster is started, and warmed up (imports, one tiny run) before the timing; the timed part
is ``out.compute()`` only, and every answer is checked (``"echo: " + prompt``).

    python benchmarks/bench_dask.py                       # 12,000 rows, 24 partitions, 50 ms
    python benchmarks/bench_dask.py --workers 1,2 --n 6000
    python benchmarks/bench_dask.py --repeat 3             # medians of 3 interleaved rounds
    python benchmarks/bench_dask.py --json /tmp/dask.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def make_prompts(n: int) -> list[str]:
    """Distinct prompts (dedupe must not skip any), each answered with "echo: " + prompt."""
    return [f"Row {i}: summarize record number {i} in one line." for i in range(n)]


def _reset_server(url: str) -> None:
    import urllib.request

    base = url.removesuffix("/v1")
    request = urllib.request.Request(base + "/reset", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(request, timeout=30) as response:
        response.read()


def _process_cpu() -> float:
    return time.process_time()


def worker(args: argparse.Namespace) -> None:
    """Child process: one variant, from cluster start to the checked answers; emits JSON."""
    import pandas as pd

    import gen_ai_frames  # noqa: F401  (registers df.genai)

    prompts = make_prompts(args.n)
    df = pd.DataFrame({"prompt": prompts})
    tmp = tempfile.mkdtemp(prefix="bench_dask_", dir=args.tmp_dir)
    options = {"provider": "openai", "endpoint": args.url, "model_name": "m", "chunk_size": args.chunk_size}
    extra: dict[str, Any] = {}
    try:
        if args._worker == "pandas":
            total = args.per_worker
            _reset_server(args.url)
            with _common.measure() as m:
                out = df.genai.generate(column="prompt", max_concurrent=total, progress=False,
                                        checkpoint=os.path.join(tmp, "run.ckpt"), **options)
            extra.update(workers=0, worker_cpu_s=m.cpu_s, per_partition=total)
        else:
            import dask.dataframe as dd
            import distributed

            import gen_ai_frames.dask  # noqa: F401  (registers ddf.genai)
            from gen_ai_frames.dask import plan_concurrency

            k = int(args._worker.split("-")[1])
            total = args.per_worker * k
            with distributed.LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                                          dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
                ddf = dd.from_pandas(df, npartitions=args.npartitions, sort=False)
                # Warm-up: imports and a first connection on every worker, outside the timing.
                client.run(lambda: __import__("gen_ai_frames.dask"))
                warm = dd.from_pandas(pd.DataFrame({"prompt": [f"warm-up {i}" for i in range(4 * k)]}),
                                      npartitions=k, sort=False)
                warm.genai.generate(column="prompt", **options).compute()
                out_lazy = ddf.genai.generate(column="prompt", max_concurrent=total,
                                              checkpoint=os.path.join(tmp, "run.ckpt"), **options)
                extra["per_partition"] = plan_concurrency(total, args.npartitions)[1]
                _reset_server(args.url)
                cpu0 = client.run(_process_cpu)
                with _common.measure() as m:
                    out = out_lazy.compute()
                cpu1 = client.run(_process_cpu)
                extra.update(workers=k, worker_cpu_s=sum(cpu1[w] - cpu0[w] for w in cpu1 if w in cpu0))
        answers = out["response"].tolist()
        correct = sum(1 for a, p in zip(answers, prompts) if a == "echo: " + p) if len(answers) == len(prompts) else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _common.emit_result({"variant": args._worker, "n": args.n, "max_concurrent": total, **m.as_dict(),
                         "correct": correct, **extra})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12_000, help="rows (default 12000)")
    p.add_argument("--npartitions", type=int, default=24, help="partitions, the same for every variant (24)")
    p.add_argument("--workers", default="1,2,4", help="worker counts to run (default 1,2,4)")
    p.add_argument("--per-worker", type=int, default=32, help="max_concurrent per worker (default 32)")
    p.add_argument("--chunk-size", type=int, default=500, help="checkpoint chunk_size (default 500)")
    p.add_argument("--latency", type=float, default=0.05, help="fixed server latency, s (default 0.05)")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds over all variants; medians reported")
    p.add_argument("--no-pandas", action="store_true", help="skip the single-process pandas baseline")
    p.add_argument("--tmp-dir", default=None, help="parent directory of the checkpoints (default: system temp)")
    p.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    p.add_argument("--timeout", type=float, default=600, help="per-variant timeout (s)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.worker_counts = [int(k) for k in args.workers.split(",") if k.strip()]
    return args


def worker_cmd(args: argparse.Namespace, variant: str, url: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--url", url,
           "--n", str(args.n), "--npartitions", str(args.npartitions), "--per-worker", str(args.per_worker),
           "--chunk-size", str(args.chunk_size)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    _common.print_environment()
    import dask
    import distributed

    print(f"# dask {dask.__version__}, distributed {distributed.__version__}")
    print(f"# bench_dask: N={args.n}, npartitions={args.npartitions}, max_concurrent={args.per_worker} per worker, "
          f"chunk_size={args.chunk_size}, fixed latency {args.latency * 1000:g} ms, checkpoint on, "
          f"1 thread per worker")
    variants = ([] if args.no_pandas else ["pandas"]) + [f"dask-{k}" for k in args.worker_counts]
    runs: list[dict[str, Any]] = []
    with _common.FakeServerProcess(["--latency", str(args.latency)]) as server:
        print(f"# fake server pid {server.pid} at {server.url}")
        for run_no in range(1, args.repeat + 1):
            for variant in variants:
                result = _common.run_measured_worker(server, worker_cmd(args, variant, server.url),
                                                     timeout=args.timeout)
                result.pop("stderr", None)
                n = result["n"]
                ideal = result["max_concurrent"] / args.latency
                result.update(run=run_no, rows_per_s=n / result["wall_s"], ideal=ideal,
                              worker_cpu_ms=result["worker_cpu_s"] * 1000 / n,
                              server_cpu_ms=result["server_cpu_s"] * 1000 / n, check=f"{result['correct']}/{n}")
                runs.append(result)
                print(f"  run {run_no} {variant:8s} {result['wall_s']:6.2f} s  {result['rows_per_s']:6.0f} rows/s  "
                      f"(ideal {ideal:.0f})  correct {result['check']}  "
                      f"bg load {result['background_cores']:.2f} cores", flush=True)
    summary = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {k: mine[0][k] for k in ("variant", "max_concurrent", "per_partition", "ideal")}
        for key in ("wall_s", "rows_per_s", "worker_cpu_ms", "server_cpu_ms", "background_cores"):
            row[key] = _common.median([r[key] for r in mine])
        row["max_in_flight"] = max(r["max_in_flight"] for r in mine)
        row["efficiency"] = row["rows_per_s"] / row["ideal"]
        row["check"] = f"{sum(r['correct'] for r in mine)}/{sum(r['n'] for r in mine)}"
        summary.append(row)
    base = next((r["rows_per_s"] for r in summary if r["variant"] == "dask-1"), None)
    for r in summary:
        r["speedup"] = None if base is None or r["variant"] == "pandas" else r["rows_per_s"] / base
    columns = [("variant", "variant", ""), ("max_concurrent", "max_concurrent (total)", "d"),
               ("per_partition", "per partition", "d"), ("wall_s", "wall s", ".2f"),
               ("rows_per_s", "rows/s", ".0f"), ("ideal", "ideal rows/s", ".0f"),
               ("efficiency", "of ideal", ".0%"), ("speedup", "vs 1 worker", ".2f"),
               ("worker_cpu_ms", "worker CPU ms/row", ".3f"), ("server_cpu_ms", "server CPU ms/row", ".3f"),
               ("max_in_flight", "max in flight", "d"), ("background_cores", "bg load (cores)", ".2f"),
               ("check", "correct", "")]
    print(f"\nMedian of {args.repeat} run(s) per variant:" if args.repeat > 1 else "\nResults:")
    print(_common.format_table(summary, columns))
    print("\n'worker CPU' is the CPU of the process(es) running the partitions (the driver for pandas, the"
          " workers for dask) during compute(); 'ideal' = max_concurrent / latency.")
    failed = [r for r in runs if r["correct"] != r["n"]]
    for r in failed:
        print(f"!! {r['variant']}: {r['check']} answers correct", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": runs, "summary": summary},
            indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
