"""Fault injection: 2,000 prompts against a server that fails 30 % of requests in every way a real
provider does. Every row must end with an answer or an error that fits the last fault it met;
no row lost or duplicated, order kept, and no request sent inside a Retry-After wait (checked at the
client, see tests/_retry_after_watch.py: the server's window count depends on timing)."""

from __future__ import annotations

import errno
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames.checkpoint as checkpoint_module
from gen_ai_frames import RetryPolicy, create_client
from gen_ai_frames.checkpoint import CheckpointError, read_checkpoint
from gen_ai_frames.testing import FakeServer

from . import _retry_after_watch
from ._retry_after_watch import Event, read_log, violations, watch_retry_after
from .test_crash_resume import SCRIPT, kill_mid_run

WATCH = Path(_retry_after_watch.__file__)

CHAOS = {"429_retry_after": 0.02, "429_plain": 0.03, "500": 0.03, "502": 0.03, "503": 0.03, "529": 0.02,
         "reset": 0.03, "slow": 0.01, "html": 0.03, "wrong_shape": 0.03, "truncated": 0.02, "length": 0.01,
         "content_filter": 0.01}
assert round(sum(CHAOS.values()), 6) == 0.30

#: What a row's error must be when its last attempt met this fault, and a word its suggestion must hold.
EXPECTED = {
    "429_retry_after": ("RateLimitError", "max_concurrent"), "429_plain": ("RateLimitError", "max_concurrent"),
    "500": ("ServerError", "retry later"), "502": ("ServerError", "retry later"),
    "503": ("ServerError", "retry later"), "529": ("ServerError", "overloaded"),
    "reset": ("APIConnectionError", "server"), "truncated": ("APIConnectionError", "server"),
    "slow": ("APITimeoutError", "timeout"), "html": ("MalformedResponseError", "endpoint"),
    "wrong_shape": ("MalformedResponseError", "endpoint"), "content_filter": ("ContentFilterError", "rephrase"),
}
# An answer comes back in milliseconds, but on a loaded machine in up to ~1 s (0.8 s seen at load 6):
# TIMEOUT leaves room for that, and a "slow" fault (SLOW s) always outlasts it.
ROWS, TIMEOUT, SLOW = 2000, 5.0, 30.0
FAST_RETRY = RetryPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.1)


@pytest.fixture
def chaos_server() -> Any:
    with FakeServer(latency=0.002, chaos=CHAOS, seed=11, chaos_retry_after=0.3, chaos_slow_seconds=SLOW,
                    retry_after_grace=0.15) as server:
        yield server


def frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"chaos prompt {i}" for i in range(ROWS)], "n": range(ROWS)})


def check_every_row_fits_its_last_fault(out: pd.DataFrame, stats: dict[str, Any],
                                        events: list[Event]) -> None:
    assert len(out) == ROWS and out["n"].tolist() == list(range(ROWS))  # nothing lost, order kept
    outcomes = stats["outcomes"]
    counted: dict[str, int] = {}
    for prompt, response, error_type, suggestion in zip(out["prompt"], out["response"], out["error_type"],
                                                        out["error_suggestion"]):
        last = outcomes[prompt][-1]
        counted[last] = counted.get(last, 0) + 1
        if last in ("ok", "length"):
            assert pd.isna(error_type) and response.startswith("echo: "), (prompt, last, error_type)
            if last == "ok":
                assert response == "echo: " + prompt
        else:
            kind, word = EXPECTED[last]
            assert pd.isna(response) and error_type == kind, (prompt, outcomes[prompt], error_type)
            assert word in suggestion, (kind, suggestion)
    injected = {kind for kind in stats["outcome_counts"] if kind != "ok"}
    assert injected == set(CHAOS), injected  # the run really met every kind of fault
    assert len(counted) >= 5, counted  # and rows really ended on several of them
    assert stats["retry_after_windows_opened"] > 0
    # The client heard 429s asking it to wait, and sent nothing after one came back until its wait
    # was over. (Not the server's retry_after_violations: it also counts requests sent before the
    # 429 came back that reached the server after its grace period, as they do on a loaded machine.)
    assert sum(kind == "429" for _, kind, _, _ in events) > 0
    assert sum(kind == "send" for _, kind, _, _ in events) >= ROWS
    assert violations(events) == []


@pytest.mark.slow
def test_chaos_through_the_accessor_with_a_checkpoint(
        chaos_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = watch_retry_after(monkeypatch)
    client = create_client(endpoint=chaos_server.url, model_name="m", retry=FAST_RETRY)
    out = frame().genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", max_concurrent=32,
                                 chunk_size=200, timeout=TIMEOUT, details=True, progress=False)
    check_every_row_fits_its_last_fault(out, chaos_server.stats(), events)
    stored = read_checkpoint(tmp_path / "c")
    assert stored.index.tolist() == list(range(ROWS))  # one record per row, none duplicated
    assert stored["response"].fillna("").tolist() == out["response"].fillna("").tolist()


@pytest.mark.slow
def test_chaos_killed_mid_run_and_resumed(chaos_server: Any, tmp_path: Path) -> None:
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "c"
    frame().to_parquet(source)
    log = tmp_path / "sends.log"  # every process's requests and 429s, by process id
    args = [sys.executable, str(WATCH), str(log), str(SCRIPT), str(source), str(target), str(ckpt),
            chaos_server.url, "--max-concurrent", "32", "--chunk-size", "200", "--timeout", str(TIMEOUT),
            "--fast-retry"]
    rng = random.Random(5)
    for _ in range(2):
        kill_mid_run(subprocess.Popen(args, stderr=subprocess.PIPE), chaos_server, rng, after=(200, 600))
    assert not target.exists()
    subprocess.run(args, check=True, timeout=300)
    out = pd.read_parquet(target)
    events = read_log(log)
    assert len({pid for pid, _, _, _ in events}) == 3  # the two killed runs and the one that finished
    check_every_row_fits_its_last_fault(out, chaos_server.stats(), events)


def test_failed_checkpoint_write_stops_the_run_and_resume_recovers(
        fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = create_client(endpoint=fake_server.url, model_name="m")
    df = frame().head(300)
    real_write = checkpoint_module.write_atomic
    writes = 0

    def disk_full_on_third_part(final: Path, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        if final.name.startswith("part-"):
            writes += 1
            if writes == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(final, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_atomic", disk_full_on_third_part)
    with pytest.raises(CheckpointError) as caught:
        df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", chunk_size=50,
                          max_concurrent=4, progress=False)
    assert "No space left" in str(caught.value) and str(tmp_path / "c") in str(caught.value)
    monkeypatch.setattr(checkpoint_module, "write_atomic", real_write)
    saved = read_checkpoint(tmp_path / "c")
    assert 100 <= len(saved) < 300  # the two parts written before the failure are intact
    fake_server.reset()
    out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", progress=False)
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert fake_server.stats()["requests"] == 300 - len(saved)  # only the unsaved rows are sent again
