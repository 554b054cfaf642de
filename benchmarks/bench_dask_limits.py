"""One rate limit, one budget for a whole Dask run: what the shared limiter achieves and costs.

Everything runs against the fake server in its own process, on a ``distributed.LocalCluster`` of
2 worker processes with 1 thread each, with 8 partitions of uneven size
(``SHAPE``: 1, 6, 2, 4, 1, 5, 2, 3 parts of the rows):

* ``primitives``  the round trip of each Dask coordination primitive a shared limiter could be
                  built on, called from inside a worker task (where partitions run): an Actor
                  method (one request per call, and a lease of 64 request slots per call), a
                  Semaphore acquire + release, a Variable get, a Lock acquire + release, an
                  event (``log_event``, one way: it cannot answer; distributed 2026 has no Pub/Sub).
* ``learned``     the server enforces 600 requests/min (token bucket, OpenAI-style headers); the
                  client is told nothing: rows failed, 429s, utilisation of the limit.
* ``told``        the same with ``requests_per_minute=600``; also ``told-static``: the static
                  split of before (each partition paced to its share), for comparison.
* ``budget``      ``max_cost`` set to half the run's cost: spend against budget + one request
                  per worker; also ``budget-static``.
* ``overhead``    no limits, no latency, as fast as the machine goes (~2,000 requests/s on an idle
                  2-core machine): rows/s of the shared limiter against the static split.

Utilisation is successful requests / (limit x wall time of ``compute()``): the start-up of the
tasks and the tail of the run (the last partitions alone) count against it.

    python benchmarks/bench_dask_limits.py                     # all, about 5 minutes
    python benchmarks/bench_dask_limits.py --only primitives,overhead
    python benchmarks/bench_dask_limits.py --rows 700 --json /tmp/limits.json
    python benchmarks/bench_dask_limits.py --only learned,overhead --repeat 3 --timeline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import gen_ai_frames.dask  # noqa: E402,F401  (registers ddf.genai)

SHAPE = [1, 6, 2, 4, 1, 5, 2, 3]
SCENARIOS = ("primitives", "learned", "told", "budget", "overhead")


def uneven(rows: int, shape: list[int] = SHAPE) -> Any:
    import dask
    import dask.dataframe as dd
    import pandas as pd

    sizes = [rows * s // sum(shape) for s in shape]
    sizes[-1] += rows - sum(sizes)
    df = pd.DataFrame({"prompt": [f"question {i}" for i in range(rows)]})
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    parts = [df.iloc[a:b] for a, b in zip(bounds, bounds[1:])]
    return dd.from_delayed([dask.delayed(p) for p in parts], meta=df.iloc[:0], verify_meta=False)


# --------------------------------------------------------------------------------- primitives
def _probe(kind: str, calls: int, actor: Any = None) -> float:
    """Seconds per call of one primitive, measured inside a worker task."""
    import distributed

    from gen_ai_frames.coordinator import _empty_report

    costs = {"requests": 1.0}
    if kind == "actor":
        def call() -> None:
            actor.lease("probe", 1, costs, _empty_report()).result()
    elif kind == "actor-lease64":
        def call() -> None:
            actor.lease("probe", 64, costs, _empty_report()).result()
    elif kind == "semaphore":
        sem = distributed.Semaphore(max_leases=10_000, name="bench-sem")

        def call() -> None:
            sem.acquire()
            sem.release()
    elif kind == "variable":
        variable = distributed.Variable("bench-var")
        variable.set(0)

        def call() -> None:
            variable.get()
    elif kind == "lock":
        lock = distributed.Lock("bench-lock")

        def call() -> None:
            lock.acquire()
            lock.release()
    elif kind == "event":
        worker = distributed.get_worker()

        def call() -> None:
            worker.log_event("bench-event", 1)
    else:
        raise ValueError(kind)
    for _ in range(20):  # warm up: connections, first-use costs
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def primitives(client: Any, calls: int) -> list[dict[str, Any]]:
    from gen_ai_frames.coordinator import RunCoordinator

    actor = client.submit(RunCoordinator, max_concurrent=64, npartitions=1, actor=True).result()
    workers = sorted(client.scheduler_info()["workers"])
    rows = []
    for kind in ("actor", "actor-lease64", "semaphore", "variable", "lock", "event"):
        # Run on the worker that does not hold the actor when possible: a real partition may be
        # anywhere, usually on another worker.
        per_call = client.submit(_probe, kind, calls, actor, workers=[workers[-1]], pure=False).result()
        per_request = per_call / 64 if kind == "actor-lease64" else per_call
        rows.append({"primitive": kind, "us_per_call": per_call * 1e6, "us_per_request": per_request * 1e6,
                     "requests_per_s_one_caller": 1 / per_request})
        print(f"  {kind:14s} {per_call * 1e6:9.0f} us/call {per_request * 1e6:9.1f} us/request", flush=True)
    return rows


# --------------------------------------------------------------------------------- scenarios
def run(client: Any, server: Any, name: str, rows: int, *, static: bool = False, server_rpm: float | None,
        latency: float = 0.0, shape: list[int] = SHAPE, timeline: bool = False,
        **options: Any) -> dict[str, Any]:
    import gen_ai_frames.dask as gdask

    server.configure(rate_limit_rpm=server_rpm, latency=latency)
    server.reset()
    real = gdask._distributed_client
    if static:  # the split of before: no coordinator, each partition its share
        gdask._distributed_client = lambda scheduler: None
    try:
        out = uneven(rows, shape).genai.generate(
            column="prompt", provider="openai", endpoint=server.url, model_name="m", api_key="sk-bench",
            progress=False, details=True, **options)
    finally:
        gdask._distributed_client = real
    topics = set(client.get_events()) if timeline else set()
    cpu = _cpu(client, server)
    started = time.monotonic()
    wall = time.time()
    result = out.compute()
    elapsed = time.monotonic() - started
    cpu = {name: used - cpu[name] for name, used in _cpu(client, server).items()}
    stats = server.stats()
    answered = int(result["response"].notna().sum())
    tokens = result["prompt_tokens"].fillna(0).sum() + result["completion_tokens"].fillna(0).sum()
    row = {
        "scenario": name,
        "rows": rows,
        "answered": answered,
        "failed": int(result["error"].notna().sum()),
        "not_sent": int((result["error_type"] == "NotSentError").sum()),
        "requests": stats["requests"],
        "429s": stats["outcome_counts"].get("rate_limited", 0),
        "elapsed_s": elapsed,
        "rows_per_s": answered / elapsed,
        "tokens": int(tokens),
        # CPU seconds per 1,000 rows: less sensitive to other processes' load than rows/s.
        "workers_cpu_ms_per_row": cpu["workers"] / rows * 1e3,
        "scheduler_cpu_ms_per_row": cpu["scheduler"] / rows * 1e3,
        "server_cpu_ms_per_row": cpu["server"] / rows * 1e3,
    }
    row["429_share"] = row["429s"] / rows
    if server_rpm:
        row["utilisation"] = answered / (server_rpm / 60 * elapsed)
    print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if timeline and not static:
        row["timeline"] = _timeline(client, topics, wall)
        if row["timeline"]:
            row["exchanges"] = row["timeline"][-1]["exchanges"]
            print(f"    {row['exchanges']} exchanges with the coordinator", flush=True)
    return row


def _process_cpu() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _cpu(client: Any, server: Any) -> dict[str, float]:
    """CPU seconds used so far by the worker processes, the scheduler and the fake server."""
    return {
        "workers": sum(client.run(_process_cpu).values()),
        "scheduler": client.run_on_scheduler(_process_cpu),
        "server": server.cpu_seconds(),
    }


def _timeline(client: Any, before: set[str], wall: float) -> list[dict[str, Any]]:
    """When the 429s came: the coordinator's progress events of this run (one at most every
    PUBLISH_S), as seconds since ``compute()`` began, requests and 429s since the previous event,
    and the rate-limit status."""
    time.sleep(1.0)  # the last event travels worker -> scheduler
    events = [(at, msg) for topic, items in client.get_events().items()
              if topic.startswith("gen-ai-frames-") and topic not in before for at, msg in items]
    events.sort(key=lambda event: event[0])
    rows, requests, limited = [], 0, 0
    for at, msg in events:
        rows.append({"t": round(at - wall, 2), "requests": msg["requests"] - requests,
                     "429s": msg["rate_limited"] - limited, "status": msg["status"],
                     "exchanges": msg.get("exchanges")})
        requests, limited = msg["requests"], msg["rate_limited"]
    for entry in rows:
        if entry["429s"]:
            print(f"    t={entry['t']:6.2f} s  +{entry['requests']:3d} requests  +{entry['429s']:2d} 429s  "
                  f"{entry['status']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=700, help="rows of the 600/min scenarios (~70 s each)")
    parser.add_argument("--fast-rows", type=int, default=20_000, help="rows of the overhead scenario")
    parser.add_argument("--calls", type=int, default=300, help="calls per primitive")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of each scenario but primitives")
    parser.add_argument("--timeline", action="store_true",
                        help="print when the 429s came (the coordinator's progress events)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    import distributed

    _common.print_environment()
    results: dict[str, Any] = {}
    with _common.FakeServerProcess([]) as server, distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, distributed.Client(cluster) as client:
        uneven(16).genai.generate(column="prompt", provider="openai", endpoint=server.url, model_name="m",
                                  api_key="sk-bench", progress=False).compute()  # warm up the workers
        if "primitives" in only:
            print("primitives (round trip from a worker task):", flush=True)
            results["primitives"] = primitives(client, args.calls)
        runs = results.setdefault("runs", [])
        for _ in range(args.repeat):
            scenarios(client, server, args, only, runs)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": _common.environment(), "results": results},
                                              indent=2, default=float))
    summary(results.get("runs", []))
    return 0


def scenarios(client: Any, server: Any, args: argparse.Namespace, only: set[str], runs: list) -> None:
    """One round of every scenario asked for but ``primitives``."""
    if "learned" in only:
        runs.append(run(client, server, "learned", args.rows, server_rpm=600, latency=0.05, max_concurrent=32,
                        timeline=args.timeline))
    if "told" in only:
        runs.append(run(client, server, "told", args.rows, server_rpm=600, latency=0.05, max_concurrent=32,
                        requests_per_minute=600))
        runs.append(run(client, server, "told-static", args.rows, static=True, server_rpm=600, latency=0.05,
                        max_concurrent=32, requests_per_minute=600))
    if "budget" in only:
        budget_rows = 400
        shape = [1, 1, 1, 1, 1, 1, 30, 30]  # six tiny partitions, two big ones
        budget = 5.0 * budget_rows / 2  # "question N": 2 + 3 tokens at $1 a token = $5 a row
        for name, static in (("budget", False), ("budget-static", True)):
            row = run(client, server, name, budget_rows, static=static, server_rpm=None, shape=shape,
                      max_concurrent=16, max_cost=budget, prices={"m": (1e6, 1e6)})
            row.update(budget=budget, spend=float(row["tokens"]), bound=budget + 2 * 5.0)
            runs.append(row)
    if "overhead" in only:
        for name, static in (("overhead-static", True), ("overhead-shared", False),
                             ("overhead-static", True), ("overhead-shared", False)):
            runs.append(run(client, server, name, args.fast_rows, static=static, server_rpm=None,
                            max_concurrent=64, timeline=args.timeline))


def summary(runs: list[dict[str, Any]]) -> None:
    """Medians over the rounds: the 429 share and utilisation of ``learned``, and the paired
    shared / static rows/s ratio of ``overhead`` (each shared run against the static run before it)."""
    learned = [r for r in runs if r["scenario"] == "learned"]
    if learned:
        shares = [r["429_share"] for r in learned]
        use = [r["utilisation"] for r in learned]
        print(f"learned: 429 share {', '.join(f'{s:.1%}' for s in shares)} "
              f"(median {_common.median(shares):.1%}, max {max(shares):.1%}); "
              f"utilisation median {_common.median(use):.3f}, min {min(use):.3f}; "
              f"failed {sum(r['failed'] for r in learned)}", flush=True)
    ratios = []
    static = None
    for r in runs:
        if r["scenario"] == "overhead-static":
            static = r
        elif r["scenario"] == "overhead-shared" and static is not None:
            ratios.append(r["rows_per_s"] / static["rows_per_s"])
    cpu = []
    static = None
    for r in runs:
        if r["scenario"] == "overhead-static":
            static = r
        elif r["scenario"] == "overhead-shared" and static is not None:
            cpu.append(r["workers_cpu_ms_per_row"] / static["workers_cpu_ms_per_row"])
    if cpu:
        print(f"overhead: workers' CPU per row, shared / static {', '.join(f'{x:.2f}' for x in cpu)} "
              f"(median {_common.median(cpu):.2f})", flush=True)
    if ratios:
        print(f"overhead: shared / static {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {_common.median(ratios):.2f}, min {min(ratios):.2f})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
