"""The accessor's overhead: ``df.genai.generate`` with chunks and a checkpoint vs a bare batch call.

One run starts the fake server once with lognormal latency and a slow tail, then answers the same
20,000 distinct prompts twice, each variant in its own fresh subprocess:

* ``batch``     ``client.generate_batch_response(prompts, max_concurrent=128)``
                (no chunks, no checkpoint)
* ``accessor``  ``df.genai.generate(column="prompt", client=client, chunk_size=500,
                checkpoint=<new dir in a temp dir>, max_concurrent=128, progress=False)``

Both use the defaults otherwise (max_tokens=256, timeout=60, max_retries=3). Target: accessor
rows/s >= 0.9 x batch rows/s.

Latency model (the fake server's): every request sleeps a lognormal time with median 50 ms and
sigma 1.0 (mean ~82 ms, p99 ~0.5 s, p99.9 ~1.1 s, the slowest of 20,000 ~2-3 s), and 0.1 % of the
prompts (the "slow" chaos fault, chosen by a hash of seed and prompt, so the *same* ~20 prompts in
both variants) sleep 3 s more: a tail of seconds that would stall a runner that waits for each
chunk to finish before starting the next. Before each variant the server is reseeded (POST /config
seed) and reset, so both variants get the same sequence of latency draws and the same slow prompts.

    python benchmarks/bench_accessor.py                    # 20,000 rows, C=128
    python benchmarks/bench_accessor.py --repeat 3
    python benchmarks/bench_accessor.py --n 5000 --profile py-spy --variants accessor
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

VARIANTS = ("batch", "accessor")
TARGET = 0.9  # accessor rows/s / batch rows/s, at least


def make_prompts(n: int) -> list[str]:
    """Distinct prompts (dedupe must not skip any), each answered with "echo: " + prompt."""
    return [f"Row {i}: summarize record number {i} in one line." for i in range(n)]


def expected(prompt: str) -> str:
    return "echo: " + prompt


def worker(args: argparse.Namespace) -> None:
    """Child process: run one variant, measure it, check every answer, emit JSON."""
    import aiohttp  # noqa: F401  (our transport imports it lazily: keep imports out of the timing)
    import pandas as pd

    import gen_ai_frames  # registers df.genai
    from gen_ai_frames.checkpoint import read_checkpoint

    prompts = make_prompts(args.n)
    client = gen_ai_frames.create_client(provider="openai", endpoint=args.url, model_name="m")
    tmp = tempfile.mkdtemp(prefix="bench_accessor_", dir=args.tmp_dir)
    checkpoint = os.path.join(tmp, "run.ckpt")
    extra: dict[str, Any] = {}
    try:
        if args._worker == "batch":
            def send() -> list[Any]:
                return client.generate_batch_response(prompts, max_concurrent=args.max_concurrent)
        else:
            df = pd.DataFrame({"prompt": prompts})

            def send() -> list[Any]:
                out = df.genai.generate(column="prompt", client=client, chunk_size=args.chunk_size,
                                        checkpoint=checkpoint, max_concurrent=args.max_concurrent, progress=False)
                extra["error_count"] = int(out["error"].notna().sum())
                return out["response"].tolist()

        gc.collect()
        with _common.maybe_cprofile(args._cprofile), _common.measure() as m:
            answers = timed_send(send)
        correct = (sum(1 for a, p in zip(answers, prompts) if a == expected(p))
                   if len(answers) == len(prompts) else 0)
        if args._worker == "accessor":
            stored = read_checkpoint(checkpoint)
            extra["checkpoint_rows"] = len(stored)
            extra["checkpoint_correct"] = int(sum(1 for p, a in zip(stored["prompt"], stored["response"])
                                                  if a == expected(p)))
            extra["checkpoint_files"] = len(os.listdir(checkpoint))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _common.emit_result({"variant": args._worker, "n": args.n, **m.as_dict(), "correct": correct,
                         "answers": len(answers), **extra})


def timed_send(send: Callable[[], list[Any]]) -> list[Any]:
    """The measured call; its name marks the send phase in py-spy stacks."""
    return send()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="rows (default 20000)")
    p.add_argument("--max-concurrent", type=int, default=128, help="requests in flight (default 128)")
    p.add_argument("--chunk-size", type=int, default=500, help="accessor chunk_size (default 500)")
    p.add_argument("--latency-median", type=float, default=0.05, help="lognormal median latency, s (default 0.05)")
    p.add_argument("--latency-sigma", type=float, default=1.0, help="lognormal sigma (default 1.0)")
    p.add_argument("--slow-fraction", type=float, default=0.001,
                   help="fraction of prompts that sleep --slow-seconds more (default 0.001)")
    p.add_argument("--slow-seconds", type=float, default=3.0, help="extra sleep of the slow prompts (default 3)")
    p.add_argument("--seed", type=int, default=1234, help="fake server seed, the same for both variants")
    p.add_argument("--repeat", type=int, default=1, help="rounds over both variants; medians are reported")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of batch,accessor")
    p.add_argument("--tmp-dir", default=None, help="parent directory of the checkpoint (default: system temp)")
    p.add_argument("--json", metavar="PATH", help="also write all measurements to this JSON file")
    p.add_argument("--profile", choices=("cprofile", "py-spy"), help="profile each variant (distorts timings!)")
    p.add_argument("--profile-dir", default=None, help="where profiles go (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=600, help="per-worker timeout (s)")
    p.add_argument("--_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--_cprofile", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    return args


def worker_cmd(args: argparse.Namespace, variant: str, url: str, profile_dir: Path | None, run_no: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", variant, "--url", url, "--n", str(args.n),
           "--max-concurrent", str(args.max_concurrent), "--chunk-size", str(args.chunk_size)]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    return _common.with_profiler(cmd, args.profile, profile_dir, f"{variant}-{run_no}", rate=250)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    profile_dir = None
    if args.profile:
        profile_dir = Path(args.profile_dir or tempfile.mkdtemp(prefix="bench_accessor_prof_"))
        profile_dir.mkdir(parents=True, exist_ok=True)

    mean_latency = (args.latency_median * math.exp(args.latency_sigma ** 2 / 2)
                    + args.slow_fraction * args.slow_seconds)
    floor = args.n * mean_latency / args.max_concurrent
    _common.print_environment()
    print(f"# bench_accessor: N={args.n}, max_concurrent={args.max_concurrent}, chunk_size={args.chunk_size}, "
          f"latency lognormal(median={args.latency_median * 1000:g} ms, sigma={args.latency_sigma:g}) + "
          f"{args.slow_fraction:g} of prompts +{args.slow_seconds:g} s, seed={args.seed}, repeat={args.repeat}")
    print(f"# mean latency ~{mean_latency * 1000:.0f} ms -> latency-bound floor ~{floor:.1f} s "
          f"(~{args.n / floor:.0f} rows/s) if the machine were infinitely fast")
    server_args = ["--latency-median", str(args.latency_median), "--latency-sigma", str(args.latency_sigma),
                   "--seed", str(args.seed), "--chaos-slow-seconds", str(args.slow_seconds)]
    if args.slow_fraction > 0:
        server_args += ["--chaos", json.dumps({"slow": args.slow_fraction})]
    runs: list[dict[str, Any]] = []
    with _common.FakeServerProcess(server_args) as server:
        print(f"# fake server pid {server.pid} at {server.url}")
        for run_no in range(1, args.repeat + 1):
            for variant in args.variant_list:
                server.configure(seed=args.seed)  # same latency draws and slow prompts for every variant
                result = _common.run_measured_worker(
                    server, worker_cmd(args, variant, server.url, profile_dir, run_no), timeout=args.timeout)
                result.pop("stderr", None)
                n = result["n"]
                result.update(run=run_no, rows_per_s=n / result["wall_s"], cpu_ms=result["cpu_s"] * 1000 / n,
                              server_cpu_ms=result["server_cpu_s"] * 1000 / n, check=f"{result['correct']}/{n}")
                if "checkpoint_rows" in result:
                    result["ckpt"] = f"{result['checkpoint_correct']}/{result['checkpoint_rows']}"
                runs.append(result)
                print(f"  run {run_no} {variant:8s} {result['wall_s']:6.2f} s  {result['rows_per_s']:6.0f} rows/s  "
                      f"{result['cpu_ms']:.3f} ms CPU/row  correct {result['check']}  requests "
                      f"{result['server_requests']}  background load {result['background_cores']:.2f} cores",
                      flush=True)

    columns = [("variant", "variant", ""), ("wall_s", "wall s", ".2f"), ("rows_per_s", "rows/s", ".0f"),
               ("cpu_ms", "client CPU ms/row", ".3f"), ("server_cpu_ms", "server CPU ms/row", ".3f"),
               ("server_requests", "requests", "d"), ("max_in_flight", "max in flight", "d"),
               ("background_cores", "bg load (cores)", ".2f"), ("check", "correct", ""),
               ("ckpt", "checkpoint ok/rows", "")]
    if args.repeat > 1:
        print("\nAll runs:")
        print(_common.format_table(runs, [("run", "run", "d"), *columns]))
    summary = []
    for variant in args.variant_list:
        mine = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant}
        for key in ("wall_s", "rows_per_s", "cpu_ms", "server_cpu_ms", "background_cores"):
            row[key] = _common.median([r[key] for r in mine])
        row["server_requests"] = max(r["server_requests"] for r in mine)
        row["max_in_flight"] = max(r["max_in_flight"] for r in mine)
        row["check"] = f"{sum(r['correct'] for r in mine)}/{sum(r['n'] for r in mine)}"
        if all("ckpt" in r for r in mine):
            row["ckpt"] = (f"{sum(r['checkpoint_correct'] for r in mine)}/"
                           f"{sum(r['checkpoint_rows'] for r in mine)}")
        summary.append(row)
    print(f"\nMedian of {args.repeat} run(s) per variant:" if args.repeat > 1 else "\nResults:")
    print(_common.format_table(summary, columns))
    by = {r["variant"]: r for r in summary}
    ratio = None
    if "batch" in by and "accessor" in by:
        ratio = by["accessor"]["rows_per_s"] / by["batch"]["rows_per_s"]
        print(f"\naccessor/batch rows/s = {ratio:.3f}  (target >= {TARGET}: {'PASS' if ratio >= TARGET else 'MISS'})")
        if args.repeat > 1:
            per_run = [a["rows_per_s"] / b["rows_per_s"] for a, b in zip(
                [r for r in runs if r["variant"] == "accessor"], [r for r in runs if r["variant"] == "batch"])]
            print("per-run ratios: " + ", ".join(f"{x:.3f}" for x in per_run))
    failed = [r for r in runs if r["correct"] != r["n"]
              or ("checkpoint_rows" in r and (r["checkpoint_rows"] != r["n"] or r["checkpoint_correct"] != r["n"]))]
    for r in failed:
        print(f"!! {r['variant']} run {r['run']}: {r['check']} answers correct, checkpoint {r.get('ckpt')}",
              file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "args": {
            k: v for k, v in vars(args).items() if not k.startswith("_")}, "runs": runs, "summary": summary,
            "ratio": ratio}, indent=2))
    if profile_dir is not None:
        print(f"\nProfiles in {profile_dir}")
        for path in sorted(profile_dir.glob("*.collapsed")):
            # Checkpoint writes run in worker threads (asyncio.to_thread): count those stacks too.
            print(f"\n== {path.name}: send phase only (stacks through timed_send, plus worker threads), "
                  "% of samples ==")
            print(_common.summarize_collapsed(path, must_contain=("timed_send", "Thread._bootstrap")))
        for txt in sorted(profile_dir.glob("*.prof.txt")):
            print(f"  {txt}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
