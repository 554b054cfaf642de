"""One rate limit, one pause, one budget and one progress bar for a whole Dask run, on a real
``LocalCluster`` (2 workers, 1 thread each, in this process so it starts fast) against the fake
server enforcing a per-minute limit with OpenAI-style headers.

Counts only, no timing: rows failed, 429s against the rows, spend against the budget, requests
sent during another partition's Retry-After window, bars made. Speeds are in
benchmarks/bench_dask_limits.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

import gen_ai_frames.dask  # noqa: E402,F401  (registers ddf.genai)
from gen_ai_frames.testing import FakeServer  # noqa: E402

from .conftest import KEY_VARIABLES  # noqa: E402
from .test_dask_limits_unit import RecordingBar  # noqa: E402

# Uneven partitions, as a real split of a file is.
SIZES = [3, 25, 8, 14, 2, 20, 6, 12]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeServer) -> Iterator[FakeServer]:
    server.configure(latency=0.0, rate_limit_rpm=None, chaos={})
    server.reset()
    yield server
    server.configure(latency=0.0, rate_limit_rpm=None, chaos={})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as env:
        for name in KEY_VARIABLES:
            env.delenv(name, raising=False)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=":0") as local, distributed.Client(local) as client:
            yield client


def uneven(sizes: list[int] = SIZES, prompts: list[str] | None = None) -> dd.DataFrame:
    prompts = prompts or [f"question {i}" for i in range(sum(sizes))]
    df = pd.DataFrame({"prompt": prompts})
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    parts = [df.iloc[a:b] for a, b in zip(bounds, bounds[1:])]
    return dd.from_delayed([dask.delayed(p) for p in parts], meta=df.iloc[:0], verify_meta=False)


def options(fake: FakeServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "endpoint": fake.url, "model_name": "m", "api_key": "sk-test",
            "progress": False, **extra}


def rate_limited(fake: FakeServer) -> int:
    return fake.stats()["outcome_counts"].get("rate_limited", 0)


def test_told_nothing_the_run_learns_one_limit(cluster: Any, fake: FakeServer) -> None:
    fake.configure(rate_limit_rpm=1200)  # 20/s, a bucket of 1 s
    rows = sum(SIZES)
    out = uneven().genai.generate(column="prompt", max_concurrent=16, **options(fake)).compute()
    assert out["error"].isna().all() and len(out) == rows
    # The headers of the first answers state the limit; every partition paces to the one pace.
    assert rate_limited(fake) <= 0.1 * rows, fake.stats()["outcome_counts"]


def test_told_nothing_the_start_does_not_overrun_the_limit(cluster: Any, fake: FakeServer) -> None:
    # 5/s, a bucket of 5 requests; answers take 50 ms, so the limit is not known at once.
    fake.configure(rate_limit_rpm=300, latency=0.05)
    sizes = [s // 2 for s in SIZES]
    rows = sum(sizes)
    out = uneven(sizes).genai.generate(column="prompt", max_concurrent=64, **options(fake)).compute()
    assert out["error"].isna().all() and len(out) == rows
    # Every partition slow-starting at once (8 requests each, then one more per answer) at a limit
    # nobody knows yet would overrun the bucket (~10 429s); one probe learns it first.
    assert rate_limited(fake) <= 1, fake.stats()["outcome_counts"]


def test_an_unpaced_run_costs_few_round_trips(cluster: Any, fake: FakeServer) -> None:
    before = set(cluster.get_events())
    rows = 3000
    out = uneven([rows // 8] * 8).genai.generate(column="prompt", max_concurrent=16, **options(fake))
    assert out.compute()["error"].isna().all()
    deadline = time.monotonic() + 30  # the last event travels worker -> scheduler -> this client
    while time.monotonic() < deadline:
        events = [msg for topic, items in cluster.get_events().items()
                  if topic.startswith("gen-ai-frames-") and topic not in before for _, msg in items]
        if events and events[-1]["finished"]:
            break
        time.sleep(0.05)
    assert events[-1]["requests"] == rows
    # Nothing paces the run: no slots to lease (64 at a time would take ~100 leases), only
    # reports about once a second per partition, and a few at its start and end.
    assert events[-1]["exchanges"] <= rows / 30, events[-1]


def test_told_the_limit_the_partitions_share_it(cluster: Any, fake: FakeServer) -> None:
    fake.configure(rate_limit_rpm=1200)
    rows = sum(SIZES)
    out = uneven().genai.generate(column="prompt", max_concurrent=16, requests_per_minute=1200,
                                  **options(fake)).compute()
    assert out["error"].isna().all()
    # Split statically, each of the 8 partitions would be paced to 150/min; any partition alone at
    # the full 1,200/min beside another would overrun the bucket: a shared pace stays within it.
    assert rate_limited(fake) <= 0.02 * rows + 1, fake.stats()["outcome_counts"]


def test_one_budget_first_come(cluster: Any, fake: FakeServer) -> None:
    sizes = [1, 1, 1, 1, 1, 1, 20, 20]  # $5 a row ("question N": 2 + 3 tokens at $1 each)
    budget = 5 * sum(sizes) / 2  # half the run: $115, 23 rows
    out = uneven(sizes).genai.generate(
        column="prompt", max_cost=budget, prices={"m": (1e6, 1e6)}, max_concurrent=4, details=True,
        **options(fake)).compute()
    answered = out["response"].notna()
    spend = 1.0 * (out["prompt_tokens"].fillna(0) + out["completion_tokens"].fillna(0)).sum()
    # At most one request in flight per worker beyond the budget...
    assert spend <= budget + 2 * 5, spend
    # ...and the whole budget is used, first come first served. Split over the 8 partitions
    # ($14.4 each) the six one-row partitions would leave most of theirs unspent (~12 rows).
    assert spend >= budget, spend
    assert fake.stats()["requests"] == answered.sum()
    assert set(out.loc[~answered, "error_type"]) == {"NotSentError"}


def test_a_pause_one_worker_is_asked_for_holds_the_other(cluster: Any, fake: FakeServer) -> None:
    fake.configure(latency=0.02)
    prompts = [f"question {i}" for i in range(240)]
    # The 10th row of the first partition is refused once, with Retry-After: 2 s.
    prompts[10] = "question [[fail_times=1]] [[status=429]] [[retry_after=2]]"
    out = uneven([120, 120], prompts).genai.generate(column="prompt", max_concurrent=16,
                                                     **options(fake)).compute()
    assert out["error"].isna().all()
    stats = fake.stats()
    assert stats["retry_after_windows_opened"] == 1
    # The other partition, on the other worker, hears of the pause with its next lease: a few
    # requests may arrive in the window before that, not the ~2 s x 400/s it would send unpaused.
    assert stats["retry_after_violations"] <= 40, stats["retry_after_violation_details"][:5]


def test_one_progress_bar_for_the_run(cluster: Any, fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    RecordingBar.made = []
    prompts = [f"question {i}" for i in range(sum(SIZES))]
    prompts[5] = "bad [[status=400]]"
    prompts[40] = "bad [[status=400]]"
    out = uneven(prompts=prompts).genai.generate(column="prompt", **{**options(fake), "progress": True})
    out.compute()
    deadline = time.monotonic() + 30  # the last event travels worker -> scheduler -> this client
    while not (RecordingBar.made and RecordingBar.made[-1].closed) and time.monotonic() < deadline:
        time.sleep(0.05)
    (bar,) = RecordingBar.made  # one bar for the 8 partitions, none per partition
    assert (bar.total, bar.n, bar.closed) == (sum(SIZES), sum(SIZES), True)
    assert bar.postfix["errors"] == 2


def test_without_a_cluster_limits_are_split_as_before(cluster: Any, fake: FakeServer) -> None:
    with dask.config.set(scheduler="threads"):
        out = uneven().genai.generate(column="prompt", max_concurrent=16, requests_per_minute=1200,
                                      **options(fake))
        job = next(op for op in out.expr.operands if type(op).__name__ == "_PartitionJob")
        assert job.coordinator is None
        assert job.options.requests_per_minute < 1200 and job.options.max_concurrent < 16
        assert out.compute()["error"].isna().all()
