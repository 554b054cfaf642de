"""Batch mode survives SIGKILL at any moment without submitting a row twice (issue 15).

A real subprocess runs ``df.genai.generate(mode="batch")`` against the fake server and is killed
right after the provider answered the create call (before the batch id was recorded), right after
the upload, and at random moments while it polls; the next call with the same checkpoint finishes
the run. Every row must be submitted exactly once and answered exactly once, and the result equal
to a run that was never interrupted.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from gen_ai_frames.batch import read_batch_records
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.testing import FakeServer

from .conftest import FAKE_KEY

SCRIPT = Path(__file__).with_name("_batch_in_subprocess.py")
ROWS = 1000
PROVIDERS = ["openai", "azure", "anthropic", "gemini"]

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(api_key=FAKE_KEY) as running:
        yield running


def _setup(tmp_path: Path) -> tuple[pd.DataFrame, Path, Path, Path]:
    df = pd.DataFrame({"prompt": [f"row {i}" for i in range(ROWS)], "n": range(ROWS)})
    source = tmp_path / "in.parquet"
    df.to_parquet(source)
    return df, source, tmp_path / "out.parquet", tmp_path / "run.ckpt"


def _args(source: Path, target: Path, ckpt: Path, provider: str, server: FakeServer) -> list[str]:
    return [sys.executable, str(SCRIPT), str(source), str(target), str(ckpt), provider,
            server.endpoint_for(provider), FAKE_KEY]


def _finish(args: list[str]) -> None:
    final = subprocess.run(args, capture_output=True, timeout=300)
    assert final.returncode == 0, final.stderr.decode()


def _check(df: pd.DataFrame, target: Path, ckpt: Path, server: FakeServer, batches: int = 1) -> None:
    out = pd.read_parquet(target)
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert out["error"].isna().all() and out["n"].tolist() == df["n"].tolist()
    stats = server.stats()
    assert stats["batches"]["created"] == batches
    submitted = stats["batches"]["submitted"]
    assert len(submitted) == ROWS and set(submitted.values()) == {1}  # each row submitted once
    assert set(stats["per_prompt"]) == set(df["prompt"]) and set(stats["per_prompt"].values()) == {1}
    assert read_checkpoint(ckpt)["response"].tolist() == out["response"].tolist()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sigkill_right_after_the_submit_call_then_resume(server: FakeServer, tmp_path: Path,
                                                          provider: str) -> None:
    df, source, target, ckpt = _setup(tmp_path)
    args = _args(source, target, ckpt, provider, server)
    killed = subprocess.run([*args, "--kill-after-create"], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert server.stats()["batches"]["created"] == 1 and not target.exists()
    [intent] = read_batch_records(ckpt)
    assert intent["state"] == "intent" and intent["batch_id"] is None  # the answer never got recorded
    _finish(args)
    _check(df, target, ckpt, server)


@pytest.mark.parametrize("provider", ["openai", "azure"])
def test_sigkill_right_after_the_upload_then_resume(server: FakeServer, tmp_path: Path, provider: str) -> None:
    df, source, target, ckpt = _setup(tmp_path)
    args = _args(source, target, ckpt, provider, server)
    killed = subprocess.run([*args, "--kill-after-upload"], capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert server.stats()["batches"]["uploads"] == 1 and server.stats()["batches"]["created"] == 0
    _finish(args)
    _check(df, target, ckpt, server)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sigkill_at_random_moments_while_polling_then_resume(server: FakeServer, tmp_path: Path,
                                                             provider: str) -> None:
    rng = random.Random(f"batch-{provider}")
    server.configure(batch_polls_per_state=25)
    df, source, target, ckpt = _setup(tmp_path)
    args = _args(source, target, ckpt, provider, server)
    for _ in range(3):
        process = subprocess.Popen(args, stderr=subprocess.PIPE)
        goal = server.stats()["batches"]["polls"] + rng.randint(1, 20)
        deadline = time.monotonic() + 120
        while server.stats()["batches"]["polls"] < goal:
            assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run never polled"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()  # type: ignore[union-attr]
        assert not target.exists()
    assert server.stats()["batches"]["created"] == 1
    _finish(args)
    _check(df, target, ckpt, server)
