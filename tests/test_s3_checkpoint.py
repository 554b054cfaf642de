"""Checkpoints on S3-compatible object storage, against moto's S3 server on 127.0.0.1.

The server is started by these tests; credentials are fake and set here. Lease expiry is tested by
moving the lease clock (``gen_ai_frames.storage._now``) forward, never by sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers the accessor)
from gen_ai_frames import create_client, storage
from gen_ai_frames.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointLockedError,
    checkpoint_status,
    make_records,
    read_checkpoint,
    repair_checkpoint,
)
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.options import RunOptions
from gen_ai_frames.testing import FakeServer

moto_server = pytest.importorskip("moto.server")

ACCESS_KEY = "AKIAFAKEDONOTLEAK0001"
SECRET_KEY = "fake-secret-DO-NOT-LEAK-6b1e9d"
SCRIPT = Path(__file__).with_name("_generate_in_subprocess.py")
AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a loopback port, and the AWS_* environment pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]  # port 0: the one the OS chose
    endpoint = f"http://127.0.0.1:{port}"
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as env:
        for name in AWS_VARIABLES:
            env.delenv(name, raising=False)
        # No developer's real AWS config may be read: empty files.
        env.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


def stored_objects(bucket: str, endpoint: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def later(seconds: float) -> Any:
    """A lease clock ``seconds`` ahead of the real one."""
    return lambda: time.time() + seconds


def prompts(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"row {i}" for i in range(n)]})


# ------------------------------------------------------------------------------------------ a run


def test_a_run_writes_an_s3_checkpoint_and_a_second_run_resumes_from_it(
    fake: FakeServer, bucket: str
) -> None:
    url = f"s3://{bucket}/runs/first.ckpt"
    client = create_client(endpoint=fake.url, model_name="m")
    df = prompts(30)
    out = df.genai.generate(column="prompt", client=client, checkpoint=url, chunk_size=7, progress=False)
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(30)]
    sent = fake.stats()["requests"]
    assert sent == 30

    again = df.genai.generate(column="prompt", client=client, checkpoint=url, chunk_size=7, progress=False)
    assert again["response"].tolist() == out["response"].tolist()
    assert fake.stats()["requests"] == sent  # everything came from the checkpoint

    stored = read_checkpoint(url)
    assert stored["response"].tolist() == out["response"].tolist()
    status = checkpoint_status(url)
    assert (status["kind"], status["total"], status["done"], status["path"]) == ("single", 30, 30, url)
    names = storage.object_storage(url, None).names()
    assert "manifest.json" in names and storage.LEASE not in names  # the lease is released


def test_storage_options_instead_of_the_environment_and_never_stored(
    fake: FakeServer, bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # dead: only storage_options is right
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": s3_endpoint}
    url = f"s3://{bucket}/opts.ckpt"
    client = create_client(endpoint=fake.url, model_name="m")
    out = prompts(5).genai.generate(
        column="prompt", client=client, checkpoint=url, storage_options=options, progress=False
    )
    assert out["error"].isna().all()
    assert read_checkpoint(url, storage_options=options)["response"].tolist()[0] == "echo: row 0"

    objects = stored_objects(bucket, s3_endpoint)
    assert any(key.endswith("manifest.json") for key in objects)
    for key, body in objects.items():
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, key
    run = RunOptions(checkpoint=url, storage_options=options)
    assert SECRET_KEY not in repr(run) and ACCESS_KEY not in repr(run)
    assert SECRET_KEY not in repr(storage.object_storage(url, options))

    # An error names what to check, never the credentials.
    with pytest.raises(CheckpointError, match="bucket does not exist") as caught:
        Checkpoint.open(f"s3://no-such-{bucket}/run", {}, storage_options=options)
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)


def test_bad_object_store_input_is_refused_before_any_request(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="only s3:// object storage"):
        Checkpoint.open("gs://bucket/run", {})
    with pytest.raises(ConfigurationError, match="never in the URL") as caught:
        Checkpoint.open(f"s3://{ACCESS_KEY}:{SECRET_KEY}@bucket/run", {})
    assert SECRET_KEY not in str(caught.value)
    with pytest.raises(ConfigurationError, match="local path"):
        Checkpoint.open(tmp_path / "run.ckpt", {}, storage_options={"anon": True})
    with pytest.raises(ConfigurationError, match="storage_options must be a dict"):
        RunOptions(storage_options="endpoint_url=x")  # type: ignore[arg-type]


def test_a_missing_bucket_says_so(s3_endpoint: str) -> None:
    with pytest.raises(CheckpointError, match="bucket does not exist"):
        Checkpoint.open(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", {})


# ------------------------------------------------------------------------------------------ the lease


def test_a_live_lease_refuses_a_second_writer_and_is_released_on_close(bucket: str) -> None:
    url = f"s3://{bucket}/lease.ckpt"
    first = Checkpoint.open(url, {"model": "m"})
    first.append(make_records(["a"], responses=["A"]))
    with pytest.raises(CheckpointLockedError, match="being used by another run") as caught:
        Checkpoint.open(url, {"model": "m"})
    assert f"process {os.getpid()}" in str(caught.value)
    first.close()
    with Checkpoint.open(url, {"model": "m"}) as second:
        assert second.records()["response"].tolist() == ["A"]


def test_renewal_keeps_the_lease_and_an_expired_one_is_taken_over(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/renew.ckpt"
    first = Checkpoint.open(url, {"model": "m"})
    lease = first._lock
    assert isinstance(lease, storage._Lease)
    # 50 s on, the holder renews (as its thread does every 20 s): 70 s on, it is still held.
    monkeypatch.setattr(storage, "_now", later(50))
    lease.renew()
    monkeypatch.setattr(storage, "_now", later(70))
    with pytest.raises(CheckpointLockedError):
        Checkpoint.open(url, {"model": "m"})
    # Not renewed for longer than the lease: the next run takes it over.
    monkeypatch.setattr(storage, "_now", later(50 + storage.LEASE_SECONDS + 1))
    with Checkpoint.open(url, {"model": "m"}) as second:
        second.append(make_records(["b"], responses=["B"]))
    first.close()
    assert read_checkpoint(url)["response"].tolist() == ["B"]


def test_a_writer_that_lost_its_lease_cannot_overwrite_the_new_writer(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/fenced.ckpt"
    stale = Checkpoint.open(url, {"model": "m"})
    stale.append(make_records(["a"], responses=["old"]))
    monkeypatch.setattr(storage, "_now", later(storage.LEASE_SECONDS + 1))  # stale paused too long
    new = Checkpoint.open(url, {"model": "m"})
    new.append(make_records(["a"], responses=["new"]))

    with pytest.raises(CheckpointLockedError, match="stopped writing"):
        stale.append(make_records(["a"], responses=["stale"]))
    # Even when the stale writer skips the lease check (it woke up right after checking), its
    # conditional writes fail instead of overwriting the new writer's manifest or parts.
    monkeypatch.setattr(stale._lock, "check", lambda: None)
    with pytest.raises(CheckpointLockedError, match="changed by another run"):
        stale.append(make_records(["a"], responses=["stale"]))
    new.append(make_records(["c"], responses=["C"]))
    new.close()
    stale.close()
    assert read_checkpoint(url)["response"].tolist() == ["new", "C"]


# ------------------------------------------------------------------------------------------ processes

HOLDER = textwrap.dedent(
    """
    import sys
    from gen_ai_frames.checkpoint import Checkpoint, make_records
    ckpt = Checkpoint.open(sys.argv[1], {"model": "m"})
    ckpt.append(make_records(["a", "b"], responses=["A", "B"]))
    print("ready", flush=True)
    sys.stdin.readline()
    ckpt.close()
    """
)


def test_a_second_run_is_refused_while_the_first_process_lives_and_takes_over_after_sigkill(
    bucket: str, fake: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/held.ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        client = create_client(endpoint=fake.url, model_name="m")
        df = pd.DataFrame({"prompt": ["a", "b", "c"]})
        with pytest.raises(CheckpointLockedError, match=f"process {holder.pid}"):
            df.genai.generate(column="prompt", client=client, checkpoint=url, progress=False)
        assert fake.stats()["requests"] == 0  # refused before sending anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        if holder.stdin is not None:
            holder.stdin.close()
        if holder.stdout is not None:
            holder.stdout.close()
    # Killed: its lease lives on until it expires, then the next run takes over and resumes.
    with pytest.raises(CheckpointLockedError):
        Checkpoint.open(url, {"model": "m"})
    monkeypatch.setattr(storage, "_now", later(storage.LEASE_SECONDS + 1))
    with Checkpoint.open(url, {"model": "m"}) as ckpt:
        assert ckpt.records()["response"].tolist() == ["A", "B"]


def test_a_sigkilled_generate_resumes_from_its_s3_checkpoint(
    bucket: str, fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 400
    fake.configure(latency=0.01)
    df = prompts(rows)
    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    df.to_parquet(source)
    url = f"s3://{bucket}/killed.ckpt"
    args = [str(source), str(target), url, fake.url, "--max-concurrent", "8", "--chunk-size", "20"]
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:  # wait until some answers are stored on S3, then kill it mid-run
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run stored nothing"
        try:
            if checkpoint_status(url)["total"] >= 60:
                break
        except CheckpointError:
            pass  # no manifest yet
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()  # type: ignore[union-attr]
    stored = checkpoint_status(url)["total"]
    assert 60 <= stored < rows and not target.exists()

    monkeypatch.setattr(storage, "_now", later(storage.LEASE_SECONDS + 1))  # the dead run's lease expired
    fake.configure(latency=0.0)
    before = fake.stats()["requests"]
    client = create_client(endpoint=fake.url, model_name="m")
    out = df.genai.generate(column="prompt", client=client, checkpoint=url, progress=False)
    assert out["response"].tolist() == [f"echo: row {i}" for i in range(rows)]
    assert fake.stats()["requests"] - before <= rows - stored  # the stored rows were not sent again
    assert read_checkpoint(url)["response"].tolist() == out["response"].tolist()


# ------------------------------------------------------------------------------------------ shards


def test_cli_batches_status_and_repair_on_s3(
    bucket: str, fake: FakeServer, tmp_path: Path, s3_endpoint: str
) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    prompts(25).to_csv(source, index=False)
    url = f"s3://{bucket}/cli.ckpt"
    command = [sys.executable, "-m", "gen_ai_frames", "generate", str(source), "-o", str(target),
               "--column", "prompt", "--endpoint", fake.url, "--model", "m", "--checkpoint", url,
               "--batch-rows", "10", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # status with --storage-options instead of the environment's endpoint and keys
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET"))}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # dead: only --storage-options is right
    options = json.dumps({"endpoint_url": s3_endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY})
    status = subprocess.run([sys.executable, "-m", "gen_ai_frames", "status", url, "--json",
                             "--storage-options", options], capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 0, status.stderr
    assert SECRET_KEY not in status.stdout + status.stderr
    info = json.loads(status.stdout)
    assert (info["kind"], info["batches"], info["answered"], info["remaining"]) == ("batches", 3, 25, 0)
    assert info["path"] == url

    frame = read_checkpoint(url)
    assert frame.index.names == ["batch", "position"] and len(frame) == 25
    report = repair_checkpoint(url)
    assert report["kind"] == "batches" and report["dropped"] == []

    # The same run again: every batch resumes from S3, nothing is sent.
    before = fake.stats()["requests"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert fake.stats()["requests"] == before


def test_status_of_an_s3_path_with_nothing_there_or_without_credentials(bucket: str) -> None:
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", "status", f"s3://{bucket}/nothing"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"no checkpoint at 's3://{bucket}/nothing'" in done.stderr
    # Half the credentials: one clear line naming what to check, not a traceback.
    options = json.dumps({"key": ACCESS_KEY})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET"))}
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", "status", f"s3://{bucket}/nothing",
                           "--storage-options", options], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "check the credentials and endpoint" in done.stderr


def test_a_dask_run_with_an_s3_checkpoint(
    bucket: str, fake: FakeServer, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    distributed = pytest.importorskip("distributed")
    dd = pytest.importorskip("dask.dataframe")
    import gen_ai_frames.dask  # noqa: F401  (registers ddf.genai)
    url = f"s3://{bucket}/dask.ckpt"
    df = prompts(24)
    # The workers are spawned with a dead endpoint (port 9, never a remote host): only storage_options,
    # sent with the tasks, has the right one.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    s3 = {"storage_options": {"endpoint_url": s3_endpoint}}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster):
        ddf = dd.from_pandas(df, npartitions=4)
        out = ddf.genai.generate(column="prompt", provider="openai", endpoint=fake.url, model_name="m",
                                 checkpoint=url, **s3).compute()
        assert sorted(out["response"].tolist()) == sorted(f"echo: {p}" for p in df["prompt"])
        sent = fake.stats()["requests"]
        again = ddf.genai.generate(column="prompt", provider="openai", endpoint=fake.url, model_name="m",
                                   checkpoint=url, **s3).compute()
        assert again["response"].tolist() == out["response"].tolist()
        assert fake.stats()["requests"] == sent  # every partition resumed from S3
    frame = read_checkpoint(url, **s3)
    assert frame.index.names == ["partition", "position"] and len(frame) == 24
    status = checkpoint_status(url, **s3)
    assert (status["kind"], status["shards"], status["done"]) == ("partitions", 4, 24)


# ------------------------------------------------------------------------------------------ batch mode


def test_a_batch_run_records_its_batches_in_an_s3_checkpoint(
    bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from gen_ai_frames import batch
    from gen_ai_frames.batch import BATCH_RECORDS, read_batch_records

    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(batch, "sleep", no_wait)
    monkeypatch.chdir(tmp_path)  # nothing may land in a local directory named like the URL
    url = f"s3://{bucket}/runs/batch.ckpt"
    df = prompts(40)
    with FakeServer(api_key="sk-batch") as server:
        client = create_client(endpoint=server.url, model_name="m", api_key="sk-batch")
        out = df.genai.generate(column="prompt", client=client, mode="batch", checkpoint=url, progress=False)
        assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
        again = df.genai.generate(column="prompt", client=client, mode="batch", checkpoint=url, progress=False)
        assert again["response"].tolist() == out["response"].tolist()
        assert server.stats()["batches"]["created"] == 1  # the second call found the answers, sent nothing
    [record] = read_batch_records(url)
    assert record["state"] == "collected" and record["requests"] == 40
    objects = stored_objects(bucket, s3_endpoint)
    assert f"runs/batch.ckpt/{BATCH_RECORDS}" in objects
    assert not any(b"sk-batch" in data for data in objects.values())
    assert list(tmp_path.iterdir()) == []
