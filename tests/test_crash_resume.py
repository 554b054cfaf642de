"""Crash test: a generation killed with SIGKILL at random moments resumes to the same frame,
re-sending at most ``max_concurrent + 2 * chunk_size`` prompts per kill."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames.checkpoint import read_checkpoint

SCRIPT = Path(__file__).with_name("_generate_in_subprocess.py")
ROWS, MAX_CONCURRENT, CHUNK_SIZE, KILLS = 3000, 16, 100, 3


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stderr=subprocess.PIPE)


def kill_mid_run(process: subprocess.Popen[bytes], server: Any, rng: random.Random) -> None:
    """Wait until the run is sending, then SIGKILL it a random moment later."""
    before = server.stats()["requests"]
    deadline = time.monotonic() + 60
    while server.stats()["requests"] < before + rng.randint(50, 400):
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run never started sending"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()  # type: ignore[union-attr]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(fake_server: Any, tmp_path: Path) -> None:
    fake_server.configure(latency=0.005)
    rng = random.Random(20261126)
    df = pd.DataFrame({"prompt": [f"row {i}" for i in range(ROWS)], "n": range(ROWS)})
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "run.ckpt"
    df.to_parquet(source)
    args = [str(source), str(target), str(ckpt), fake_server.url, "--max-concurrent", str(MAX_CONCURRENT),
            "--chunk-size", str(CHUNK_SIZE)]

    for _ in range(KILLS):
        kill_mid_run(start(args), fake_server, rng)
        assert not target.exists()
    stats_before_final = fake_server.stats()["requests"]
    assert stats_before_final < ROWS, "the kills came too late to interrupt the run"
    final = start(args)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()

    out = pd.read_parquet(target)[["prompt", "n", "response", "error"]]
    expected = df.assign(response=["echo: " + p for p in df["prompt"]], error=pd.NA)
    expected = expected.astype({"response": "string", "error": "string"})
    pd.testing.assert_frame_equal(out, expected)
    per_prompt = fake_server.stats()["per_prompt"]
    assert set(per_prompt) == set(df["prompt"])
    resent = sum(count - 1 for count in per_prompt.values())
    assert resent <= KILLS * (MAX_CONCURRENT + 2 * CHUNK_SIZE), resent
    stored = read_checkpoint(ckpt)
    assert stored["response"].tolist() == expected["response"].tolist()
