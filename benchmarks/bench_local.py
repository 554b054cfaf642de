"""The embedded model's speed: rows/s and tokens/s of ``provider="local"`` on the demo data.

What ``gen-ai-frames demo`` does, timed: the 20 bundled product reviews
(``gen_ai_frames/data/sample_reviews.csv``) through the demo's template, answered by the bundled
SmolLM2-135M-Instruct (Q4_1 GGUF) with ``df.genai.generate(..., max_tokens=16, temperature=0)``,
default local settings (one model instance, half the cores as threads). Each round runs in a fresh
worker subprocess: the library probe (a subprocess the first time per build, then a cached verdict)
and model loading are timed apart from answering, and one warm-up prompt is answered before the
clock starts.

Several llama-cpp-python builds can be compared by giving each one's interpreter, e.g. the portable
build in the main environment and a native build in a virtualenv (see RESULTS.md for the commands)::

    python benchmarks/bench_local.py                                   # this interpreter's build
    python benchmarks/bench_local.py --repeat 3 \\
        --python portable=python --python native=/tmp/native/bin/python

Rounds of the builds are interleaved (portable, native, portable, native, ...) so that load from
other processes on a shared machine hits both alike; every round reports the CPU that other
processes used meanwhile ("bg cores"). The worker prints which SIMD extensions the library uses
(``llama_print_system_info``) so the table says what was compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

#: The SIMD features reported by llama.cpp that tell a portable build from a native one.
FEATURES = ("AVX", "AVX2", "AVX_VNNI", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
            "AVX512_BF16", "AMX_INT8")


def worker(args: argparse.Namespace) -> None:
    """Child process: load the model, answer the demo rows once, emit JSON."""
    import importlib.metadata

    import pandas as pd

    import gen_ai_frames  # registers df.genai
    from gen_ai_frames import create_client
    from gen_ai_frames.cli import DEMO_TEMPLATE

    data = Path(gen_ai_frames.__file__).parent / "data" / "sample_reviews.csv"
    frame = pd.read_csv(data).head(args.rows)
    from gen_ai_frames.providers.local import bundled_model_path, probe_library

    started = time.perf_counter()
    probe_library(bundled_model_path())  # a subprocess the first time per build, then a cached verdict
    probe_s = time.perf_counter() - started
    started = time.perf_counter()
    client = create_client(provider="local")  # loads the model
    load_s = time.perf_counter() - started
    client.generate_batch_response(["Hi"], max_tokens=2)  # warm-up: first-call allocations

    import llama_cpp  # already loaded by the client: only read what the build says about itself

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = {name: value.strip() == "1" for name, _, value in
                (part.strip().partition(" = ") for part in info.split("|")) if name in FEATURES}
    with _common.measure() as m:
        out = frame.genai.generate(template=DEMO_TEMPLATE, client=client, max_tokens=args.max_tokens,
                                   temperature=0, progress=False, details=True)
    failed = int(out["error"].notna().sum())
    completion = int(out["completion_tokens"].fillna(0).sum())
    prompt = int(out["prompt_tokens"].fillna(0).sum())
    _common.emit_result({
        "rows": len(out), "failed": failed, "probe_s": probe_s, "load_s": load_s, **m.as_dict(),
        "rows_per_s": len(out) / m.wall_s, "completion_tokens": completion, "prompt_tokens": prompt,
        "tokens_per_s": completion / m.wall_s, "prompt_tokens_per_s": prompt / m.wall_s,
        "simd": " ".join(name for name in FEATURES if features.get(name)),
        "llama_cpp": importlib.metadata.version("llama-cpp-python"),
        "library": str(Path(llama_cpp.__file__).parent),
        "n_threads": client.provider.n_threads,  # type: ignore[attr-defined]
        "answers": out["response"].tolist(),
    })


def run_round(label: str, python: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, __file__, "--_worker", "--rows", str(args.rows), "--max-tokens", str(args.max_tokens)]
    busy0, _ = _common.system_busy_seconds()
    child0, t0 = _common.children_cpu_seconds(), time.monotonic()
    result = _common.run_worker(cmd, timeout=900)
    elapsed = time.monotonic() - t0
    busy1, _ = _common.system_busy_seconds()
    own = _common.children_cpu_seconds() - child0
    result.update(build=label, background_cores=max(0.0, (busy1 - busy0) - own) / elapsed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", metavar="LABEL=INTERPRETER",
                        help="a build to measure (repeatable); default: this interpreter's")
    parser.add_argument("--rows", type=int, default=20, help="demo rows to answer (at most 20)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="rounds per build, interleaved")
    parser.add_argument("--json", help="also save every measurement to this file")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        worker(args)
        return

    builds = [spec.partition("=")[::2] for spec in (args.python or [f"this={sys.executable}"])]
    _common.print_environment()
    results = [run_round(label, python, args) for _ in range(args.repeat) for label, python in builds]
    columns = [("build", "build", ""), ("simd", "SIMD in use", ""), ("probe_s", "probe s", ".2f"),
               ("load_s", "load s", ".2f"),
               ("wall_s", "answer s", ".2f"), ("rows_per_s", "rows/s", ".2f"),
               ("tokens_per_s", "tokens/s", ".1f"), ("prompt_tokens_per_s", "prompt tok/s", ".0f"),
               ("failed", "failed", "d"), ("background_cores", "bg cores", ".2f")]
    print(_common.format_table(results, columns))
    if len(builds) > 1:
        medians = {label: _common.median([r["rows_per_s"] for r in results if r["build"] == label])
                   for label, _ in builds}
        first = builds[0][0]
        print("median rows/s: " + ", ".join(f"{label} {value:.2f} ({value / medians[first]:.2f}x {first})"
                                             for label, value in medians.items()))
        answers = {label: next(r["answers"] for r in results if r["build"] == label) for label, _ in builds}
        same = len({json.dumps(a) for a in answers.values()}) == 1
        print(f"same answers from every build: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "results": results},
                                              indent=1))


if __name__ == "__main__":
    main()
