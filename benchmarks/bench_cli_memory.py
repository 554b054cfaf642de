"""Peak memory of ``gen-ai-frames generate`` on a 100,000-row and a 1,000,000-row Parquet input.

The CLI streams its input in batches of ``--batch-rows`` rows (default 50,000) and appends each
answered batch to the output, so its peak RSS should follow the batch size, not the file size.
Target: peak RSS at 1,000,000 rows <= 1.5 x peak RSS at 100,000 rows.

For each size, the script writes a Parquet input of short distinct prompts (``pandas.to_parquet``
defaults, i.e. what a user would have), then runs, in a fresh child process::

    python -m gen_ai_frames generate IN.parquet -o OUT.parquet --column prompt \\
        --endpoint URL --model m --max-concurrent 128 --no-progress [--batch-rows N] [--checkpoint DIR]

against the fake server started once as a separate process
(``python -m gen_ai_frames.testing.fake_server --port 0 --latency 0``). The child's peak RSS is its
``ru_maxrss`` from ``os.wait4``, cross-checked with the ``VmHWM`` of ``/proc/PID/status`` polled while
it runs. A third child that only imports the CLI gives the floor every run pays. Afterwards the
output is read back and every row must hold ``"echo: " + prompt``, in order.

The parent stays small on purpose: on Linux a child's ``ru_maxrss`` also counts the RSS of the parent
image it was forked (or vforked) from, up to its exec. Building a 1,000,000-row frame in the parent
would add the parent's ~400 MiB to the child's figure, so inputs are written and outputs checked in
helper subprocesses (so is the fake server's ``/stats``, a large body after a million prompts), and the
script refuses to report a child whose peak is not above the parent's peak at the time it started.

    python benchmarks/bench_cli_memory.py                     # 100k and 1M rows (the 1M run takes minutes)
    python benchmarks/bench_cli_memory.py --sizes 20000,200000 --checkpoint
    python benchmarks/bench_cli_memory.py --json /tmp/cli_memory.json
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TARGET = 1.5  # peak RSS of the largest input / peak RSS of the smallest, at most


def make_input(path: Path, rows: int) -> None:
    """Helper subprocess: write the Parquet input (pandas defaults: one row group up to 1Mi rows)."""
    import pandas as pd

    prompts = [f"Row {i}: summarize record {i}." for i in range(rows)]
    pd.DataFrame({"id": range(rows), "prompt": prompts}).to_parquet(path, index=False)


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_child(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``; return its exit status, wall time, peak RSS (MiB) and stderr tail."""
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_common.subprocess_env(),
                                cwd=str(_common.REPO_ROOT))
        polled = None
        while True:
            # wait4 gives this very child's rusage; RUSAGE_CHILDREN would be the max over all children.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            polled = _vm_hwm_mib(proc.pid) or polled  # VmHWM only grows: the last read is the best
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-2000:]
    peak = usage.ru_maxrss / 1024
    if peak <= parent:
        raise SystemExit(f"the parent's peak RSS ({parent:.0f} MiB) is not below the child's ({peak:.0f} MiB): "
                         "the child's ru_maxrss may be the parent's, so it is not reported")
    return {"exit": proc.returncode, "wall_s": wall, "peak_rss_mib": peak, "polled_vm_hwm_mib": polled,
            "parent_peak_rss_mib": parent, "stderr": tail}


def helper(*args: object) -> str:
    """Run this script's ``--_helper`` mode in a subprocess, so its memory is not the parent's."""
    done = subprocess.run([sys.executable, __file__, "--_helper", *map(str, args)], check=True,
                          env=_common.subprocess_env(), stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


def count_requests(base_url: str) -> None:
    """Helper subprocess: print the fake server's request count (/stats also maps every prompt)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base_url + "/stats", timeout=120) as response:
        print(json.loads(response.read())["requests"])


def check_output(path: Path, rows: int) -> None:
    """Helper subprocess: every row answered with its own echo, in order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt", "response", "error"])
    assert table.num_rows == rows, f"{path}: {table.num_rows} rows, expected {rows}"
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response").to_pylist()
    bad = sum(r != "echo: " + p for p, r in zip(prompts, responses))
    assert bad == 0 and table.column("error").null_count == rows, f"{path}: {bad} wrong answers"


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--_helper":
        what, path, rows = sys.argv[2:]
        if what == "requests":
            count_requests(path)
        else:
            (make_input if what == "make" else check_output)(Path(path), int(rows))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts (default: %(default)s)")
    parser.add_argument("--batch-rows", type=int, default=None, help="--batch-rows of the CLI (default: its own)")
    parser.add_argument("--max-concurrent", type=int, default=128)
    parser.add_argument("--checkpoint", action="store_true", help="also pass --checkpoint (a fresh directory)")
    parser.add_argument("--workdir", default=None, help="where inputs and outputs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the measurements to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cli_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"sizes": {}, "environment": _common.environment()}
    _common.print_environment()
    try:
        floor = run_child([sys.executable, "-c", "import gen_ai_frames.cli"])
        results["import_only_peak_rss_mib"] = floor["peak_rss_mib"]
        print(f"import only: peak RSS {floor['peak_rss_mib']:.0f} MiB")
        with _common.FakeServerProcess(["--latency", "0"]) as server:
            for rows in sizes:
                source, target = workdir / f"in_{rows}.parquet", workdir / f"out_{rows}.parquet"
                helper("make", source, rows)
                cmd = [sys.executable, "-m", "gen_ai_frames", "generate", str(source), "-o", str(target),
                       "--column", "prompt", "--endpoint", server.url, "--model", "m",
                       "--max-concurrent", str(args.max_concurrent), "--no-progress"]
                if args.batch_rows is not None:
                    cmd += ["--batch-rows", str(args.batch_rows)]
                if args.checkpoint:
                    ckpt = workdir / f"ckpt_{rows}"
                    shutil.rmtree(ckpt, ignore_errors=True)
                    cmd += ["--checkpoint", str(ckpt)]
                server.reset()
                print(f"{rows:>9,} rows: running {' '.join(cmd[1:3])} generate ...", flush=True)
                child = run_child(cmd)
                if child["exit"] != 0:
                    print(child["stderr"], file=sys.stderr)
                    raise SystemExit(f"the CLI exited with {child['exit']}")
                helper("check", target, rows)
                requests = int(helper("requests", server.base_url, 0))
                child.pop("stderr")
                child.update(rows=rows, requests=requests, rows_per_s=rows / child["wall_s"])
                results["sizes"][str(rows)] = child
                print(f"{rows:>9,} rows: peak RSS {child['peak_rss_mib']:7.1f} MiB (polled VmHWM "
                      f"{child['polled_vm_hwm_mib'] or 0:.1f}), {child['wall_s']:7.1f} s "
                      f"({child['rows_per_s']:,.0f} rows/s), {requests:,} requests, every answer correct",
                      flush=True)
                target.unlink()
                source.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = results["sizes"][str(min(sizes))], results["sizes"][str(max(sizes))]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    results["ratio"] = ratio
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(f"peak RSS {max(sizes):,} rows / {min(sizes):,} rows = {large['peak_rss_mib']:.1f} / "
          f"{small['peak_rss_mib']:.1f} MiB = {ratio:.2f}x (target <= {TARGET}x): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
