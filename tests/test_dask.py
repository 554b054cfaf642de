"""``ddf.genai.generate`` on a real multi-process Dask cluster, against the fake server in this process.

The cluster (2 worker processes, 1 thread each, started by nannies) is created once for the module:
workers reach the fake server over loopback at ``server.url``. The worker processes are spawned
without the developer's API keys in their environment, like every test here.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

import gen_ai_frames.dask  # noqa: E402,F401  (registers ddf.genai)
from gen_ai_frames import ConfigurationError, create_client  # noqa: E402
from gen_ai_frames.checkpoint import Checkpoint, checkpoint_status, read_checkpoint  # noqa: E402
from gen_ai_frames.cli import main as cli_main  # noqa: E402
from gen_ai_frames.dask import (  # noqa: E402
    _ClientConfig,
    _generate_partition,
    _partition_number,
    partition_checkpoint,
    plan_concurrency,
)
from gen_ai_frames.shards import ShardedCheckpoint  # noqa: E402
from gen_ai_frames.testing import FakeServer  # noqa: E402

from .conftest import FAKE_KEY, KEY_VARIABLES  # noqa: E402

# No pytestmark filterwarnings here: starting and closing the cluster, and the SIGKILLed worker and
# its rescheduled task, are reported by distributed through logging, not warnings.


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeServer) -> Iterator[FakeServer]:
    """The module's server with fresh counters and default settings."""
    server.configure(latency=0.0, api_key=None)
    server.reset()
    yield server
    server.configure(latency=0.0, api_key=None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.Client]:
    with pytest.MonkeyPatch.context() as env:
        # Worker processes copy this environment when spawned (and when a nanny restarts one).
        for name in KEY_VARIABLES:
            env.delenv(name, raising=False)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as local, distributed.Client(local) as client:
            yield client


def frame(n: int, *, offset: int = 0) -> pd.DataFrame:
    """Distinct prompts, with a non-default index (the result must keep it)."""
    prompts = [f"row {i}" for i in range(offset, offset + n)]
    index = pd.Index(pd.array([f"id-{i}" for i in range(offset, offset + n)], dtype="string"), name="id")
    # "string" dtype: what Dask turns text columns (and indexes) into, so both sides start from the same data.
    return pd.DataFrame({"prompt": pd.array(prompts, dtype="string"), "n": range(n)}, index=index)


def options(server: FakeServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "endpoint": server.url, "model_name": "m", **extra}


def job_of(out: dd.DataFrame) -> Any:
    """The ``_PartitionJob`` every task of ``out`` runs with (an argument of its MapPartitions)."""
    return next(op for op in out.expr.operands if type(op).__name__ == "_PartitionJob")


def echo(df: pd.DataFrame) -> pd.DataFrame:
    expected = df.assign(response=["echo: " + p for p in df["prompt"]], error=pd.NA)
    return expected.astype({"response": "string", "error": "string"})


# --------------------------------------------------------------------------------------------------
# On the cluster


def test_cluster_output_equals_pandas_accessor(cluster: distributed.Client, fake: FakeServer) -> None:
    fake.configure(api_key=FAKE_KEY)  # the key must reach the worker processes inside the task
    df = frame(40)
    # Rows that fail without a request, one that fails at the server, and duplicates across partitions.
    df.loc["id-3", "prompt"] = None
    df.loc["id-17", "prompt"] = "   "
    df.loc["id-25", "prompt"] = "bad [[status=400]]"
    df.loc["id-38", "prompt"] = "row 1"
    ddf = dd.from_pandas(df, npartitions=4, sort=False)
    opts = options(fake, api_key=FAKE_KEY, details=True, max_concurrent=8)

    out = ddf.genai.generate(column="prompt", **opts)
    assert isinstance(out, dd.DataFrame)
    result = out.compute()
    expected = df.genai.generate(column="prompt", progress=False, **opts)

    # latency_s is a measurement: equal in type and presence only.
    assert result["latency_s"].notna().equals(expected["latency_s"].notna())
    pd.testing.assert_frame_equal(result.drop(columns="latency_s"), expected.drop(columns="latency_s"))
    pd.testing.assert_series_equal(out._meta.dtypes, result.dtypes)
    assert result.loc["id-25", "status_code"] == 400 and result.loc["id-3", "error_type"] == "InvalidPromptError"


def test_template_and_default_columns(cluster: distributed.Client, fake: FakeServer) -> None:
    df = pd.DataFrame({"city": pd.array(["Paris", None, "Rome"], dtype="string")})
    out = dd.from_pandas(df, npartitions=2, sort=False).genai.generate(template="Where is {city}?", **options(fake))
    assert list(out.columns) == ["city", "response", "error"]
    result = out.compute()
    expected = df.genai.generate(template="Where is {city}?", progress=False, **options(fake))
    pd.testing.assert_frame_equal(result, expected)


def test_checkpointed_run_resumes_without_sending(cluster: distributed.Client, fake: FakeServer,
                                                  tmp_path: Path) -> None:
    df = frame(60)
    ddf = dd.from_pandas(df, npartitions=3, sort=False)
    root = tmp_path / "run.ckpt"
    out = ddf.genai.generate(column="prompt", checkpoint=root, chunk_size=7, **options(fake))
    first = out.compute()
    pd.testing.assert_frame_equal(first, echo(df))
    assert fake.stats()["requests"] == 60
    assert sorted(p.name for p in root.iterdir()) == ["partition-00000", "partition-00001", "partition-00002",
                                                      "run.json"]
    stored = pd.concat(read_checkpoint(partition_checkpoint(root, i)) for i in range(3))
    assert sorted(stored["response"]) == sorted(first["response"])
    # The run as a whole: one read, one status, as for any checkpoint.
    whole = read_checkpoint(root)
    assert whole.index.names == ["partition", "position"] and len(whole) == 60
    assert sorted(whole["response"]) == sorted(first["response"])
    status = checkpoint_status(root)
    assert (status["kind"], status["shards"], status["total_shards"]) == ("partitions", 3, 3)
    assert (status["total"], status["done"], status["failed"]) == (60, 60, 0)

    fake.reset()
    pd.testing.assert_frame_equal(out.compute(), first)  # the same lazy frame again
    again = ddf.genai.generate(column="prompt", checkpoint=root, chunk_size=7, **options(fake))
    pd.testing.assert_frame_equal(again.compute(), first)  # a new call on the same checkpoint
    assert fake.stats()["requests"] == 0

    # resume=False discards what was stored before the call; recomputing that frame then resumes.
    fresh = ddf.genai.generate(column="prompt", checkpoint=root, resume=False, **options(fake))
    pd.testing.assert_frame_equal(fresh.compute(), first)
    assert fake.stats()["requests"] == 60
    fresh.compute()
    assert fake.stats()["requests"] == 60


def test_total_max_concurrent_is_split(cluster: distributed.Client, fake: FakeServer) -> None:
    fake.configure(latency=0.05)
    df = frame(160)
    out = dd.from_pandas(df, npartitions=4, sort=False).genai.generate(column="prompt", max_concurrent=4, **options(fake))
    pd.testing.assert_frame_equal(out.compute(), echo(df))
    max_in_flight = fake.stats()["max_in_flight"]
    assert max_in_flight <= 4
    # Each partition gets 2: more than 2 at once proves two partitions ran side by side.
    assert max_in_flight > 2, max_in_flight


@pytest.mark.parametrize("where", ["call", "client"])
def test_rate_limit_is_a_run_total(cluster: distributed.Client, fake: FakeServer, where: str) -> None:
    df = frame(100)
    ddf = dd.from_pandas(df, npartitions=2, sort=False)
    if where == "call":
        out = ddf.genai.generate(column="prompt", requests_per_minute=6000, max_concurrent=16, **options(fake))
    else:  # the client's default limit is a run total too
        client = create_client(requests_per_minute=6000, **options(fake))
        out = ddf.genai.generate(column="prompt", client=client, max_concurrent=16)
    # On a cluster the run's one coordinator holds the limit (tests/test_dask_limits.py); the
    # partitions pace nothing on their own.
    job = job_of(out)
    assert job.options.requests_per_minute is None
    assert job.coordinator.settings().result()["requests_per_minute"] == 6000
    # 6000/min for the run = 100 requests/s for both partitions together: 100 rows take >= 0.98 s
    # (a limiter is never early). Each partition at the full rate would take ~0.5 s.
    started = time.monotonic()
    result = out.compute()
    assert time.monotonic() - started >= 0.95
    pd.testing.assert_frame_equal(result, echo(df))


def test_key_from_callers_environment_reaches_workers(cluster: distributed.Client, fake: FakeServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake.configure(api_key=FAKE_KEY)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)  # the workers' environment has no key
    df = frame(6)
    out = dd.from_pandas(df, npartitions=2, sort=False).genai.generate(column="prompt", **options(fake))
    pd.testing.assert_frame_equal(out.compute(), echo(df))


def test_plan_follows_the_cluster(cluster: distributed.Client, fake: FakeServer) -> None:
    assert plan_concurrency(64, 10) == (2, 32)  # 2 worker threads
    assert plan_concurrency(64, 1) == (1, 64)
    assert plan_concurrency(64, 10, partitions_in_flight=8) == (8, 8)
    ddf = dd.from_pandas(frame(20), npartitions=10, sort=False)
    # On a cluster each partition may use the total: the run's coordinator shares it out among the
    # partitions running, starting from the plan (64 over 2 threads: 32 each).
    job = job_of(ddf.genai.generate(column="prompt", max_concurrent=64, **options(fake)))
    assert job.options.max_concurrent == 64 and job.coordinator.settings().result()["in_flight"] == 2
    job = job_of(ddf.genai.generate(column="prompt", max_concurrent=64, partitions_in_flight=8, **options(fake)))
    assert job.coordinator.settings().result()["in_flight"] == 8
    with dask.config.set(scheduler="threads"):  # no cluster: the static split of before
        assert job_of(ddf.genai.generate(column="prompt", max_concurrent=64, partitions_in_flight=8,
                                         **options(fake))).options.max_concurrent == 8


def test_killed_worker_loses_no_finished_rows(cluster: distributed.Client, fake: FakeServer,
                                              tmp_path: Path) -> None:
    rows, total, chunk = 600, 8, 10
    per_partition = total // 2  # 2 worker threads
    fake.configure(latency=0.05)  # 160 rows/s: the run takes ~4 s
    df = frame(rows)
    root = tmp_path / "run.ckpt"
    out = dd.from_pandas(df, npartitions=4, sort=False).genai.generate(
        column="prompt", checkpoint=root, chunk_size=chunk, max_concurrent=total, **options(fake))
    pids = cluster.run(os.getpid)

    future = cluster.compute(out)
    deadline = time.monotonic() + 60
    while fake.stats()["requests"] < 100:
        assert not future.done(), "the run ended before the kill"
        assert time.monotonic() < deadline, "the run never started sending"
        time.sleep(0.01)
    busy = [worker for worker, keys in cluster.processing().items() if keys]
    assert busy, "no worker was running a partition"
    victim = busy[0]
    os.kill(pids[victim], signal.SIGKILL)
    sent_at_kill = fake.stats()["requests"]

    result = future.result(timeout=120)
    pd.testing.assert_frame_equal(result, echo(df))
    assert sent_at_kill < rows, "the kill came too late to interrupt the run"
    per_prompt = fake.stats()["per_prompt"]
    assert set(per_prompt) == set(df["prompt"])
    resent = sum(count - 1 for count in per_prompt.values())
    # One partition was in flight on the killed worker: its requests in flight plus at most two
    # chunks not yet in its checkpoint are sent again; everything it had stored is not.
    assert 0 < resent <= per_partition + 2 * chunk, resent
    assert pids[victim] not in cluster.run(os.getpid).values()
    cluster.wait_for_workers(2, timeout=60)  # the nanny restarted it: later tests get 2 workers


# --------------------------------------------------------------------------------------------------
# Without a cluster: the local schedulers, validation, secrets


def test_local_schedulers(fake: FakeServer) -> None:
    df = frame(20)
    out = dd.from_pandas(df, npartitions=3, sort=False).genai.generate(column="prompt", **options(fake))
    for scheduler in ("sync", "threads"):
        pd.testing.assert_frame_equal(out.compute(scheduler=scheduler), echo(df))


def test_plan_for_local_schedulers() -> None:
    assert plan_concurrency(64, 10, scheduler=dask.local.get_sync) == (1, 64)
    with dask.config.set(num_workers=3):
        assert plan_concurrency(64, 10, scheduler=dask.threaded.get) == (3, 21)
    assert plan_concurrency(3, 10, partitions_in_flight=4) == (4, 1)
    with pytest.raises(ConfigurationError, match="partitions_in_flight"):
        plan_concurrency(8, 4, partitions_in_flight=0)


def test_key_stays_out_of_reprs_and_graph(fake: FakeServer) -> None:
    ddf = dd.from_pandas(frame(4), npartitions=2)
    out = ddf.genai.generate(column="prompt", **options(fake, api_key=FAKE_KEY))
    assert FAKE_KEY not in repr(out.__dask_graph__())
    assert FAKE_KEY not in repr(dict(out.__dask_graph__()))
    assert FAKE_KEY not in repr(out.expr) and FAKE_KEY not in str(out.expr.operands)
    config = _ClientConfig(None, options(fake, api_key=FAKE_KEY))
    assert FAKE_KEY not in repr(config)
    with_client = _ClientConfig(create_client(**options(fake, api_key=FAKE_KEY)), {})
    assert FAKE_KEY not in repr(with_client)


def test_unpicklable_client_is_refused_early(fake: FakeServer) -> None:
    ddf = dd.from_pandas(frame(4), npartitions=2)
    client = create_client(verify=ssl.create_default_context(), **options(fake))
    with pytest.raises(ConfigurationError, match="cannot be sent to Dask workers"):
        ddf.genai.generate(column="prompt", client=client)


def test_bad_options_fail_when_called_not_on_workers(fake: FakeServer, tmp_path: Path) -> None:
    ddf = dd.from_pandas(frame(4), npartitions=2)
    with pytest.raises(ConfigurationError, match="column 'text' not found"):
        ddf.genai.generate(column="text", **options(fake))
    with pytest.raises(ConfigurationError, match="column 'nope' not found"):
        ddf.genai.generate(template="Hi {nope}", **options(fake))
    with pytest.raises(ConfigurationError, match="only s3:// object storage"):
        ddf.genai.generate(column="prompt", checkpoint="gs://bucket/run", **options(fake))
    with pytest.raises(ConfigurationError, match="already has column"):
        ddf.assign(response="x").genai.generate(column="prompt", **options(fake))
    with pytest.raises(ConfigurationError, match="max_concurrent"):
        ddf.genai.generate(column="prompt", max_concurrent=0, **options(fake))
    with pytest.raises(ConfigurationError, match="not both"):
        ddf.genai.generate(column="prompt", client=create_client(**options(fake)), model_name="m")
    pandas_run = tmp_path / "pandas.ckpt"
    Checkpoint.open(pandas_run, {}).close()
    with pytest.raises(ConfigurationError, match="checkpoint of a pandas run"):
        ddf.genai.generate(column="prompt", checkpoint=pandas_run, **options(fake))
    cli_run = tmp_path / "cli.ckpt"
    ShardedCheckpoint.create(cli_run, "batches", {}, shard_rows=10, input_rows=10)
    with pytest.raises(ConfigurationError, match="checkpoint of the command line"):
        ddf.genai.generate(column="prompt", checkpoint=cli_run, **options(fake))


def test_each_partition_keeps_its_checkpoint_when_selected(fake: FakeServer, tmp_path: Path) -> None:
    """Dask renumbers tasks when partitions are selected; the checkpoint must follow the data."""
    df = frame(30)
    root = tmp_path / "run.ckpt"
    out = dd.from_pandas(df, npartitions=3, sort=False).genai.generate(column="prompt", checkpoint=root,
                                                                        **options(fake))
    pd.testing.assert_frame_equal(out.partitions[2].compute(scheduler="sync"), echo(df.iloc[20:]))
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["partition-00002"]
    assert read_checkpoint(partition_checkpoint(root, 2))["prompt"].tolist() == df["prompt"].iloc[20:].tolist()
    pd.testing.assert_frame_equal(out.head(3, compute=False).compute(scheduler="sync"), echo(df.iloc[:3]))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["partition-00000", "partition-00002"]
    fake.reset()
    pd.testing.assert_frame_equal(out.compute(scheduler="sync"), echo(df))
    assert fake.stats()["requests"] == 10  # only partition 1 was left


def test_overwrite_and_details_meta(fake: FakeServer) -> None:
    df = frame(5).assign(response="old")
    ddf = dd.from_pandas(df, npartitions=2, sort=False)
    out = ddf.genai.generate(column="prompt", overwrite=True, details=True, **options(fake))
    expected = df.genai.generate(column="prompt", overwrite=True, details=True, progress=False, **options(fake))
    assert list(out.columns) == list(expected.columns)
    pd.testing.assert_series_equal(out._meta.dtypes, expected.dtypes)
    pd.testing.assert_series_equal(out.compute(scheduler="sync")["response"], expected["response"])


def test_resume_false_starts_over_once_per_run(fake: FakeServer, tmp_path: Path) -> None:
    """A task Dask runs again (its worker died) must resume, even with resume=False."""
    part = frame(10)
    ddf = dd.from_pandas(part, npartitions=1, sort=False)
    root = tmp_path / "run.ckpt"
    ddf.genai.generate(column="prompt", checkpoint=root, **options(fake)).compute(scheduler="sync")
    assert fake.stats()["requests"] == 10

    fresh = ddf.genai.generate(column="prompt", checkpoint=root, resume=False, **options(fake))
    job = job_of(fresh)
    fake.reset()
    pd.testing.assert_frame_equal(_generate_partition(part, job, _partition_number(0)), echo(part))
    assert fake.stats()["requests"] == 10  # first attempt: started over
    assert json.loads((partition_checkpoint(root, 0) / "shard.json").read_text())["run_id"] == job.run_id
    pd.testing.assert_frame_equal(_generate_partition(part, job, _partition_number(0)), echo(part))
    assert fake.stats()["requests"] == 10  # the retry resumed


def test_max_cost_is_a_run_budget_split_over_partitions(fake: FakeServer) -> None:
    fake.reset()
    df = pd.DataFrame({"prompt": [f"question {i}" for i in range(20)]})
    ddf = dd.from_pandas(df, npartitions=2, sort=False)
    dollar_a_token = {"m": (1_000_000.0, 1_000_000.0)}  # each row: 2 + 3 tokens = $5
    out = ddf.genai.generate(column="prompt", max_cost=20, prices=dollar_a_token, max_concurrent=1,
                             details=True, **options(fake)).compute(scheduler="sync")
    answered = out["response"].notna()
    # Each partition may spend $10 (2 rows); one request already in flight may still finish.
    assert 4 <= answered.sum() <= 6 and fake.stats()["requests"] == answered.sum()
    assert set(out.loc[~answered, "error_type"]) == {"NotSentError"}
    with pytest.raises(ConfigurationError, match="max_cost needs the price"):
        ddf.genai.generate(column="prompt", max_cost=1, **options(fake))  # checked on the caller's side


def test_gen_ai_frames_status_reads_a_dask_checkpoint(fake: FakeServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": ["a", "b [[status=400]]", "c", "d"]})
    root = tmp_path / "run.ckpt"
    dd.from_pandas(df, npartitions=2, sort=False).genai.generate(
        column="prompt", checkpoint=root, **options(fake)).compute(scheduler="sync")
    assert cli_main(["status", str(root)]) == 0
    out = capsys.readouterr().out
    assert "partitions: 2 of 2" in out and "answered:   3" in out and "failed:     1" in out
    assert "  BadRequestError: 1" in out and "model:      m (openai" in out
