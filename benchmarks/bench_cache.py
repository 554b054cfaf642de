"""Response cache: its CPU cost when every row misses, and the speed of a fully cached rerun.

Three variants of ``df.genai.generate`` over the same N distinct prompts, each in a fresh worker
process, against the fake server (a separate process) at a fixed latency:

* ``off``: no cache;
* ``on``: a new, empty cache file: every row is a miss, is sent and is stored;
* ``rerun``: the same rows again on the file ``on`` filled: every row is a hit, nothing is sent.

Targets: client CPU per row of ``on`` <= 1.15 x that of ``off``; ``rerun`` >= 20 x faster (wall
time) than ``off`` at 50 ms latency. The timing covers the ``generate`` call only (imports, client
and frame are built before it), including the cache's lookups, its batched writes and its close.

    python benchmarks/bench_cache.py                 # 20,000 rows, C=128, 50 ms, 3 rounds
    python benchmarks/bench_cache.py --n 2000 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("off", "on", "rerun")
CPU_TARGET = 1.15  # on / off client CPU per row, at most
SPEED_TARGET = 20.0  # off / rerun wall time, at least


def make_prompts(n: int) -> list[str]:
    return [f"Row {i}: summarize record number {i} in one line." for i in range(n)]


def worker(args: argparse.Namespace) -> None:
    """Child process: run one variant, measure the generate call, check every answer, emit JSON."""
    import aiohttp  # noqa: F401  (imported lazily by the transport: keep it out of the timing)
    import pandas as pd

    import gen_ai_frames
    import gen_ai_frames.cache  # noqa: F401

    prompts = make_prompts(args.n)
    client = gen_ai_frames.create_client(provider="openai", endpoint=args.url, model_name="m")
    df = pd.DataFrame({"prompt": prompts})
    cache = None if args._worker == "off" else args.cache_path
    gc.collect()
    with _common.measure() as m:
        out = df.genai.generate(column="prompt", client=client, cache=cache, details=True,
                                max_concurrent=args.max_concurrent, progress=False)
    correct = int(sum(1 for a, p in zip(out["response"], prompts) if a == "echo: " + p))
    cached = int(out["cached"].sum())
    size = os.path.getsize(cache) if cache else 0
    _common.emit_result({"variant": args._worker, "n": args.n, **m.as_dict(), "correct": correct,
                         "cached": cached, "cache_bytes": size})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="rows (default 20000)")
    p.add_argument("--max-concurrent", type=int, default=128, help="requests in flight (default 128)")
    p.add_argument("--latency", type=float, default=0.05, help="fake server latency, s (default 0.05)")
    p.add_argument("--repeat", type=int, default=3, help="rounds over the three variants (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    p.add_argument("--timeout", type=float, default=900, help="per-worker timeout (s)")
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--cache-path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    _common.print_environment()
    print(f"# bench_cache: N={args.n}, max_concurrent={args.max_concurrent}, fixed latency "
          f"{args.latency * 1000:g} ms, repeat={args.repeat}")
    runs: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        with _common.FakeServerProcess(["--latency", str(args.latency)]) as server:
            print(f"# fake server pid {server.pid} at {server.url}")
            for run_no in range(1, args.repeat + 1):
                db = tmp / f"round-{run_no}.sqlite3"
                for variant in VARIANTS:
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant,
                           "--url", server.url, "--n", str(args.n),
                           "--max-concurrent", str(args.max_concurrent), "--cache-path", str(db)]
                    result = _common.run_measured_worker(server, cmd, timeout=args.timeout)
                    result.pop("stderr", None)
                    n = result["n"]
                    result.update(run=run_no, rows_per_s=n / result["wall_s"],
                                  cpu_ms=result["cpu_s"] * 1000 / n, check=f"{result['correct']}/{n}")
                    runs.append(result)
                    print(f"  run {run_no} {variant:5s} {result['wall_s']:7.3f} s  "
                          f"{result['rows_per_s']:8.0f} rows/s  {result['cpu_ms']:.3f} ms CPU/row  "
                          f"correct {result['check']}  cached {result['cached']}  "
                          f"requests {result['server_requests']}  "
                          f"bg load {result['background_cores']:.2f} cores",
                          flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    columns = [("variant", "variant", ""), ("wall_s", "wall s", ".3f"), ("rows_per_s", "rows/s", ".0f"),
               ("cpu_ms", "client CPU ms/row", ".3f"), ("server_requests", "requests", "d"),
               ("cached", "cached rows", "d"), ("background_cores", "bg load (cores)", ".2f"),
               ("check", "correct", "")]
    print("\nAll runs:")
    print(_common.format_table(runs, [("run", "run", "d"), *columns]))
    summary = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {"variant": variant, **{key: _common.median([r[key] for r in mine]) for key in
                                                   ("wall_s", "rows_per_s", "cpu_ms", "background_cores")},
                            "server_requests": max(r["server_requests"] for r in mine),
                            "cached": min(r["cached"] for r in mine),
                            "check": f"{sum(r['correct'] for r in mine)}/{sum(r['n'] for r in mine)}"}
    print(f"\nMedian of {args.repeat} round(s):")
    print(_common.format_table(list(summary.values()), columns))
    cpu_ratio = summary["on"]["cpu_ms"] / summary["off"]["cpu_ms"]
    speedup = summary["off"]["wall_s"] / summary["rerun"]["wall_s"]
    per_round = [(on["cpu_s"] / off["cpu_s"], off["wall_s"] / rerun["wall_s"]) for off, on, rerun in
                 zip(*[[r for r in runs if r["variant"] == v] for v in VARIANTS])]
    print(f"\nclient CPU per row, cache on (all misses) / off = {cpu_ratio:.3f} "
          f"(target <= {CPU_TARGET}: {'PASS' if cpu_ratio <= CPU_TARGET else 'MISS'})")
    print(f"wall time, uncached / fully cached rerun = {speedup:.1f}x "
          f"(target >= {SPEED_TARGET:g}x: {'PASS' if speedup >= SPEED_TARGET else 'MISS'})")
    print("per round (CPU ratio, speedup): " + ", ".join(f"({c:.3f}, {s:.1f}x)" for c, s in per_round))
    failed = [r for r in runs if r["correct"] != r["n"]
              or (r["variant"] == "rerun" and (r["server_requests"] != 0 or r["cached"] != r["n"]))
              or (r["variant"] != "rerun" and r["server_requests"] != r["n"])]
    for r in failed:
        print(f"!! {r['variant']} run {r['run']}: {r['check']} correct, {r['server_requests']} requests, "
              f"{r['cached']} cached", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": runs,
            "summary": summary, "cpu_ratio": cpu_ratio, "speedup": speedup}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
