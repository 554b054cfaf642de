"""Nothing received is lost.

Crash tests: a generation killed with SIGKILL at random moments resumes to the same frame,
re-sending at most ``max_concurrent + 2 * chunk_size`` prompts per kill at the default chunk size,
and at most ``3 * max_concurrent + 2 * chunk_size`` with a checkpoint write per answer (chunk_size=1,
where the background writer groups whatever is pending into one part). And a run that stops early
(interrupted, a fatal error, ``max_cost``) writes every answer it received before it ends, while
the rows it never answered are not stored as failed, so the same call sends them once fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers the accessor)
from gen_ai_frames import create_client, runner
from gen_ai_frames.checkpoint import Checkpoint, read_checkpoint, run_fingerprint
from gen_ai_frames.errors import APIConnectionError, AuthenticationError
from gen_ai_frames.options import RunOptions
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.runner import run_rows

from .conftest import FAST_RETRY

SCRIPT = Path(__file__).with_name("_generate_in_subprocess.py")
ROWS, MAX_CONCURRENT, CHUNK_SIZE, KILLS = 3000, 16, 100, 3


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stderr=subprocess.PIPE)


def kill_mid_run(process: subprocess.Popen[bytes], server: Any, rng: random.Random,
                 after: tuple[int, int] = (50, 400)) -> None:
    """Wait until the run has sent a random number of requests in ``after``, then SIGKILL it a
    random moment later."""
    before = server.stats()["requests"]
    deadline = time.monotonic() + 60
    while server.stats()["requests"] < before + rng.randint(*after):
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run never started sending"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rows", "max_concurrent", "chunk_size", "latency", "bound"),
    [
        (ROWS, MAX_CONCURRENT, CHUNK_SIZE, 0.005, MAX_CONCURRENT + 2 * CHUNK_SIZE),
        # A write per answer at 640 answers/s: writes must not hold up receiving.
        (1500, 32, 1, 0.05, 3 * 32 + 2 * 1),
    ],
    ids=["default-chunk", "chunk-1"],
)
def test_sigkill_at_random_moments_then_resume(fake_server: Any, tmp_path: Path, rows: int,
                                               max_concurrent: int, chunk_size: int, latency: float,
                                               bound: int) -> None:
    fake_server.configure(latency=latency)
    rng = random.Random(20261126)
    df = pd.DataFrame({"prompt": [f"row {i}" for i in range(rows)], "n": range(rows)})
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "run.ckpt"
    df.to_parquet(source)
    args = [str(source), str(target), str(ckpt), fake_server.url, "--max-concurrent", str(max_concurrent),
            "--chunk-size", str(chunk_size)]

    for _ in range(KILLS):
        kill_mid_run(start(args), fake_server, rng)
        assert not target.exists()
    stats_before_final = fake_server.stats()["requests"]
    assert stats_before_final < rows, "the kills came too late to interrupt the run"
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
    assert resent <= KILLS * bound, resent
    stored = read_checkpoint(ckpt)
    assert stored["response"].tolist() == expected["response"].tolist()


# ------------------------------------------------------------------------------------------ stopping early


def _prompts(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"row {i}" for i in range(n)]})


def test_rows_never_answered_after_a_401_are_not_stored_as_failed(fake_server: Any, tmp_path: Path) -> None:
    fake_server.configure(api_key="the-right-key")
    df, ckpt = _prompts(40), tmp_path / "run.ckpt"
    options: dict[str, Any] = {"column": "prompt", "endpoint": fake_server.url, "model_name": "m",
                               "checkpoint": ckpt, "progress": False, "max_concurrent": 5, "details": True}
    with pytest.raises(AuthenticationError):  # the run stops early: every row would fail alike
        df.genai.generate(api_key="a-wrong-key", **options)
    assert fake_server.stats()["requests"] >= 1
    assert len(read_checkpoint(ckpt)) == 0  # an error of the run, not of any row: nothing stored

    out = df.genai.generate(api_key="the-right-key", **options)  # the same line, key fixed
    assert out["error"].isna().all() and out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert read_checkpoint(ckpt)["error"].isna().all() and len(read_checkpoint(ckpt)) == 40


def test_rows_never_answered_while_the_server_was_down_are_sent_once_it_is_up(tmp_path: Path) -> None:
    from gen_ai_frames.testing import FakeServer

    with FakeServer() as server:
        port = server.port
    df, ckpt = _prompts(10), tmp_path / "run.ckpt"
    client = create_client(endpoint=f"http://127.0.0.1:{port}/v1", model_name="m", retry=FAST_RETRY)
    with pytest.raises(APIConnectionError, match="could not connect"):
        df.genai.generate(column="prompt", client=client, checkpoint=ckpt, progress=False)
    assert len(read_checkpoint(ckpt)) == 0

    with FakeServer(port=port) as server:  # the server is up now: the same call answers every row
        out = df.genai.generate(column="prompt", client=client, checkpoint=ckpt, progress=False)
        assert out["error"].isna().all() and server.stats()["requests"] == 10


def test_a_fatal_error_writes_every_answer_received_first(fake_server: Any, tmp_path: Path) -> None:
    prompts = [f"row {i}" for i in range(50)]
    prompts[30] += " [[status=401]]"
    df, ckpt = pd.DataFrame({"prompt": prompts}), tmp_path / "run.ckpt"
    with pytest.raises(AuthenticationError):
        df.genai.generate(column="prompt", endpoint=fake_server.url, model_name="m", checkpoint=ckpt,
                          progress=False, max_concurrent=1, chunk_size=1000)  # one chunk: never full
    stored = read_checkpoint(ckpt)
    assert stored["prompt"].tolist() == prompts[:30] and stored["error"].isna().all()


def test_max_cost_writes_every_answer_received_first(fake_server: Any, tmp_path: Path) -> None:
    df, ckpt = _prompts(200), tmp_path / "run.ckpt"
    out = df.genai.generate(column="prompt", endpoint=fake_server.url, model_name="m", checkpoint=ckpt,
                            progress=False, max_concurrent=4, chunk_size=1000, max_cost=0.0005,
                            prices={"m": (1.0, 1.0)}, details=True)
    answered = out["response"].notna().sum()
    assert 0 < answered < 200 and out["error_type"].dropna().eq("NotSentError").all()
    stored = read_checkpoint(ckpt)
    assert len(stored) == answered and stored["error"].isna().all()


@pytest.mark.parametrize("chunk_size", [1, 10_000])
def test_an_interrupt_writes_every_answer_received_first(fake_server: Any, tmp_path: Path,
                                                          chunk_size: int) -> None:
    """Ctrl-C (or Jupyter's stop button) cancels the run: what arrived is saved before it ends,
    including answers that arrived while a write was in progress."""
    fake_server.configure(latency=0.02)
    ckpt = tmp_path / "run.ckpt"
    client = create_client(endpoint=fake_server.url, model_name="m")
    prompts = [f"row {i}" for i in range(2000)]

    async def interrupted() -> None:
        options = RunOptions(checkpoint=ckpt, chunk_size=chunk_size, max_concurrent=8, progress=False)
        task = asyncio.ensure_future(run_rows(prompts, client=client, options=options))
        while fake_server.stats()["requests"] < 100:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(interrupted())
    sent = fake_server.stats()["requests"]
    stored = read_checkpoint(ckpt)
    assert sent - 8 <= len(stored) <= sent and stored["error"].isna().all()
    with Checkpoint.open(ckpt, run_fingerprint(client, GenerationParams())):
        pass  # the lock was released


def test_slow_answers_are_written_without_waiting_for_a_full_chunk(
    fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "FLUSH_INTERVAL_S", 0.05)  # the default is 10 s
    ckpt = tmp_path / "run.ckpt"
    client = create_client(endpoint=fake_server.url, model_name="m")
    prompts = ["a", "b", "c", "slow [[sleep=30]]"]

    async def main() -> None:
        options = RunOptions(timeout=60, checkpoint=ckpt, chunk_size=100, max_concurrent=4, progress=False)
        task = asyncio.ensure_future(run_rows(prompts, client=client, options=options))
        try:
            # The chunk never fills, yet the three answers reach the disk while the fourth is pending.
            for _ in range(3000):
                if (ckpt / "manifest.json").exists() and len(read_checkpoint(ckpt)) == 3:
                    break
                assert not task.done()
                await asyncio.sleep(0.01)
            assert sorted(read_checkpoint(ckpt)["prompt"]) == ["a", "b", "c"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


@pytest.mark.slow
def test_sigterm_on_a_script_saves_every_answer_received_and_releases_the_lock(fake_server: Any,
                                                                              tmp_path: Path) -> None:
    """A scheduler stopping a Python script that runs df.genai.generate: SIGTERM acts as Ctrl-C."""
    fake_server.configure(latency=0.05)
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "run.ckpt"
    pd.DataFrame({"prompt": [f"row {i}" for i in range(2000)]}).to_parquet(source)
    # One chunk for the whole run: without the SIGTERM handling nothing would reach the disk.
    process = start([str(source), str(target), str(ckpt), fake_server.url, "--max-concurrent", "16",
                     "--chunk-size", "100000"])
    deadline = time.monotonic() + 60
    while fake_server.stats()["requests"] < 150:
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the run never started sending"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and not target.exists()
    assert b"KeyboardInterrupt" in err  # the run stopped as Ctrl-C stops it
    sent = fake_server.stats()["requests"]
    stored = read_checkpoint(ckpt)
    assert sent - 16 <= len(stored) <= sent and stored["error"].isna().all()
    with Checkpoint.open(ckpt, run_fingerprint(create_client(endpoint=fake_server.url, model_name="m"),
                                               GenerationParams())):
        pass  # the lock was released
