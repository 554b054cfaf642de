"""Structured output's client cost: the same run with a 5-field schema and without one.

One fake server (zero latency, its own process) answers N distinct prompts twice per round, each
variant in its own fresh subprocess, through ``df.genai.generate(column="prompt", client=client,
max_concurrent=128, progress=False)``:

* ``plain``   no schema: the server echoes the prompt;
* ``schema``  ``schema="name, age int, score float, ok bool, mood happy|sad|meh"``: the server
              answers JSON that matches (see gen_ai_frames.testing.schema_answers), the client
              validates every answer and builds five typed columns.

Client CPU per row (``time.process_time()`` of the worker over the call) is the figure: target
schema <= 1.2 x plain. Every answer is checked (plain: the echo; schema: every field of every row).

    python benchmarks/bench_structured.py                    # 20,000 rows, 3 rounds
    python benchmarks/bench_structured.py --n 5000 --repeat 1
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SCHEMA = "name, age int, score float, ok bool, mood happy|sad|meh"
TARGET = 1.2  # schema CPU/row over plain CPU/row, at most
VARIANTS = ("plain", "schema")


def worker(args: argparse.Namespace) -> None:
    """Child process: one variant, measured, every answer checked, JSON out."""
    import aiohttp  # noqa: F401  (keep imports out of the timing)
    import pandas as pd

    import gen_ai_frames
    from gen_ai_frames.schema import Schema
    from gen_ai_frames.testing.schema_answers import conforming_answer

    prompts = [f"Row {i}: describe record number {i}." for i in range(args.n)]
    client = gen_ai_frames.create_client(provider="openai", endpoint=args.url, model_name="m")
    df = pd.DataFrame({"prompt": prompts})
    options: dict[str, Any] = {"schema": SCHEMA} if args._worker == "schema" else {}
    gc.collect()
    with _common.measure() as m:
        out = df.genai.generate(column="prompt", client=client, max_concurrent=args.max_concurrent,
                                progress=False, **options)
    if args._worker == "schema":
        schema = Schema.parse(SCHEMA).json_schema
        fields = list(schema["properties"])
        correct = sum(
            all(row[name] == value for name, value in conforming_answer(schema, prompt).items())
            for prompt, row in zip(prompts, out[fields].to_dict("records"))
        )
    else:
        correct = int((out["response"] == ["echo: " + p for p in prompts]).sum())
    _common.emit_result({"variant": args._worker, "n": args.n, **m.as_dict(), "correct": correct,
                         "errors": int(out["error"].notna().sum())})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--max-concurrent", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--url")
    p.add_argument("--_worker", choices=VARIANTS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    _common.print_environment()
    print(f"# bench_structured: N={args.n}, max_concurrent={args.max_concurrent}, schema={SCHEMA!r}, "
          f"repeat={args.repeat}, zero latency")
    runs: list[dict[str, Any]] = []
    with _common.FakeServerProcess([]) as server:
        for run_no in range(1, args.repeat + 1):
            for variant in VARIANTS:  # interleaved, so background load hits both alike
                cmd = [sys.executable, __file__, "--_worker", variant, "--n", str(args.n), "--max-concurrent",
                       str(args.max_concurrent), "--url", server.url]
                result = _common.run_measured_worker(server, cmd)
                result.pop("stderr", None)
                result.update(run=run_no, rows_per_s=args.n / result["wall_s"],
                              cpu_ms=result["cpu_s"] * 1000 / args.n, check=f"{result['correct']}/{args.n}")
                runs.append(result)
                print(f"  run {run_no} {variant:6s} {result['rows_per_s']:7.0f} rows/s  {result['cpu_ms']:.3f} ms "
                      f"CPU/row  correct {result['check']}  bg load {result['background_cores']:.2f}", flush=True)
    summary = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        summary.append({"variant": variant, "rows_per_s": _common.median([r["rows_per_s"] for r in mine]),
                        "cpu_ms": _common.median([r["cpu_ms"] for r in mine]),
                        "check": f"{sum(r['correct'] for r in mine)}/{args.n * len(mine)}"})
    print(_common.format_table(summary, [("variant", "variant", ""), ("rows_per_s", "rows/s", ".0f"),
                                         ("cpu_ms", "client CPU ms/row", ".3f"), ("check", "correct", "")]))
    ratio = summary[1]["cpu_ms"] / summary[0]["cpu_ms"]
    print(f"\nschema/plain client CPU per row = {ratio:.3f}  (target <= {TARGET}: "
          f"{'PASS' if ratio <= TARGET else 'MISS'})")
    return 0 if all(r["correct"] == args.n for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
