"""Matching 10 million rows against a checkpoint by key (issue 19): hash, read stored keys, match.

Writes a synthetic checkpoint of N records (default 10,000,000: distinct ~55-character prompts and
~30-character answers) with the Checkpoint API, ``--part-rows`` (500,000) records per append, then,
in a fresh subprocess (so nothing the writer built is in memory; the files are in the page cache),
times what a resume does before its first request:

* ``hash``    ``keys_for(prompts, ckpt.key_scheme)`` of the caller's N prompts, given as an Arrow
              string array (a pandas ``str`` column's storage), and again from a Python list
* ``open``    ``Checkpoint.open`` (the manifest, the footer of every part)
* ``stored``  ``ckpt.stored_keys()``: only the key columns of every part
* ``match``   ``match_keys(keys, stored)``: the frame is unchanged, so each row is found where it
              was stored (a linear check)
* ``match_shuffled``  the same rows in a random order: every row goes through the hash index
              (reported apart: a frame reordered since the run is the worst case)

and checks that every row was found at its own record. The target is hash (Arrow input) + open +
stored + match <= 30 s. ``--legacy-sample`` rows are also keyed the old way (``row_keys``, a Python
loop), for comparison.

    python benchmarks/bench_keys.py                       # 10,000,000 rows
    python benchmarks/bench_keys.py --rows 1000000 --part-rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gen_ai_frames.checkpoint import Checkpoint, row_keys  # noqa: E402
from gen_ai_frames.keys import keys_for, match_keys  # noqa: E402

FINGERPRINT = {"provider": "openai", "model": "bench", "max_tokens": 16}
MARKER = "BENCH_KEYS "


def prompts_of(lo: int, hi: int) -> pa.Array:
    """Distinct ~55-character prompts, built with Arrow compute (no Python string per row)."""
    numbers = pa.array(np.arange(lo, hi, dtype=np.int64)).cast(pa.string())
    padded = pa.compute.utf8_lpad(numbers, width=9, padding="0")
    return pa.compute.binary_join_element_wise(
        "Summarize customer review number ", padded, " in one line please.", ""
    )


def write_checkpoint(path: Path, rows: int, part_rows: int) -> float:
    start = time.perf_counter()
    # compact_every above the number of appends: the parts stay as written (merging them would only
    # add write time; reading keys costs per row, not per part).
    with Checkpoint.open(path, FINGERPRINT, resume=False, compact_every=max(2, rows // part_rows + 2)) as ckpt:
        for lo in range(0, rows, part_rows):
            hi = min(rows, lo + part_rows)
            prompts = prompts_of(lo, hi)
            keys = keys_for(prompts, ckpt.key_scheme)
            answers = pa.compute.binary_join_element_wise("The answer to row ", prompts.cast(pa.string()), "", "")
            ckpt.append(
                pa.table(
                    {
                        "position": pa.array(np.arange(lo, hi, dtype=np.int64)),
                        "prompt_hash": keys.hex_array(),
                        "occurrence": pa.array(keys.occurrence),
                        "prompt": prompts,
                        "response": pa.compute.utf8_slice_codeunits(answers, 0, 30),
                    }
                )
            )
    return time.perf_counter() - start


def measure(path: Path, rows: int, legacy_sample: int) -> dict[str, float | int | str]:
    prompts = prompts_of(0, rows)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ckpt = Checkpoint.open(path, FINGERPRINT)
    t1 = time.perf_counter()
    keys = keys_for(prompts, ckpt.key_scheme)
    t2 = time.perf_counter()
    stored = ckpt.stored_keys()
    t3 = time.perf_counter()
    found = match_keys(keys, stored)
    t4 = time.perf_counter()
    assert (found == np.arange(rows)).all(), "a row was not matched to its own record"
    ckpt.close()
    order = np.random.default_rng(0).permutation(rows)
    shuffled = type(keys)(keys.hashes[order], keys.occurrence[order])
    t_shuffle = time.perf_counter()
    found = match_keys(shuffled, stored)
    match_shuffled = time.perf_counter() - t_shuffle
    assert (found == order).all(), "a shuffled row was not matched to its own record"
    del shuffled, found
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    as_list = prompts.to_pylist()
    t5 = time.perf_counter()
    from_list = keys_for(as_list, ckpt.key_scheme)
    t6 = time.perf_counter()
    assert (from_list.hashes == keys.hashes).all()
    del as_list, from_list
    result: dict[str, float | int | str] = {
        "rows": rows,
        "scheme": ckpt.key_scheme,
        "open_s": t1 - t0,
        "hash_arrow_s": t2 - t1,
        "stored_keys_s": t3 - t2,
        "match_s": t4 - t3,
        "match_shuffled_s": match_shuffled,
        "total_s": t4 - t0,
        "hash_list_s": t6 - t5,
        "peak_rss_over_prompts_mb": (rss_after - rss_before) / 1024,
    }
    if legacy_sample:
        sample = prompts.slice(0, legacy_sample).to_pylist()
        t7 = time.perf_counter()
        row_keys(sample)
        result["legacy_row_keys_s"] = time.perf_counter() - t7
        result["legacy_sample"] = legacy_sample
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--part-rows", type=int, default=500_000)
    parser.add_argument("--legacy-sample", type=int, default=1_000_000)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.measure is not None:
        print(MARKER + json.dumps(measure(args.measure, args.rows, args.legacy_sample)), flush=True)
        return
    directory = Path(tempfile.mkdtemp(prefix="bench_keys_"))
    try:
        path = directory / "run.ckpt"
        written = write_checkpoint(path, args.rows, args.part_rows)
        size = sum(f.stat().st_size for f in path.glob("part-*.parquet"))
        print(f"wrote {args.rows:,} records in {written:.1f} s ({size / 1e6:,.0f} MB of parts)", flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--legacy-sample", str(args.legacy_sample),
             "--measure", str(path)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        line = next(x for x in child.stdout.splitlines() if x.startswith(MARKER))
        result = json.loads(line[len(MARKER):])
        print(json.dumps(result, indent=1))
        with open("/proc/loadavg") as f:
            print("loadavg:", f.read().strip())
        verdict = "meets" if result["total_s"] <= 30 else "MISSES"
        print(f"open + hash + stored_keys + match: {result['total_s']:.1f} s ({verdict} the 30 s target)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
