"""``gen-ai-frames plan``: in-process through ``main([...])`` (and once as a real subprocess) against
the fake server on loopback, which counts the requests it gets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames.cli import main

from .conftest import FAKE_KEY


@pytest.fixture
def server() -> Iterator[Any]:
    from gen_ai_frames.testing import FakeServer

    with FakeServer() as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_input(path: Path) -> Path:
    # 7 rows: "q1" three times, one missing prompt; 4 distinct prompts to send at temperature 0.
    pd.DataFrame({"id": range(7), "prompt": ["q0", "q1", "q1", "q2", None, "q1", "q3"]}).to_csv(
        path, index=False
    )
    return path


def plan_args(server: Any, source: Path, *extra: object) -> list[object]:
    return ["plan", source, "--column", "prompt", "--endpoint", server.url, "--model", "m", *extra]


def test_plan_prints_the_report_and_sends_only_the_sample(server: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    source = write_input(tmp_path / "in.csv")
    code, out, err = run(capsys, *plan_args(server, source, "--sample", "2", "--max-tokens", "50"))
    assert code == 0, err
    assert server.stats()["requests"] == 2
    assert out.startswith("plan for m (openai): will pay for 4 requests of 7 rows")
    for line in ("duplicates sent once (dedupe): 2", "cannot be sent (missing or empty prompt): 1",
                 "sent: 2 of 2 asked, 2 answered", "latency:", "example prompts:"):
        assert line in out
    assert not list(tmp_path.glob("*.ckpt"))


def test_sample_zero_sends_nothing_and_creates_nothing(server: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = write_input(tmp_path / "in.csv")
    code, out, _ = run(capsys, *plan_args(server, source, "--sample", "0", "--checkpoint", tmp_path / "c"))
    assert code == 0 and "none (sample=0)" in out
    assert server.stats()["requests"] == 0
    assert not (tmp_path / "c").exists()


def test_a_wrong_key_stops_after_one_request(server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server.configure(api_key="the-right-key")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    source = write_input(tmp_path / "in.csv")
    code, out, _ = run(capsys, *plan_args(server, source, "--sample", "3"))
    assert code == 1
    assert server.stats()["requests"] == 1
    assert "STOPPED: AuthenticationError" in out and FAKE_KEY not in out


def test_the_samples_answers_are_kept_in_generates_batch_checkpoints(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_input(tmp_path / "in.csv")
    checkpoint = tmp_path / "run.ckpt"
    flags = ("--checkpoint", checkpoint, "--batch-rows", "3")
    # Batches of 3 rows, dedupe within a batch as generate does: [q0 q1 q1] [q2 - q1] [q3] -> 5 requests.
    code, out, err = run(capsys, *plan_args(server, source, "--sample", "3", *flags))
    assert code == 0, err
    assert "will pay for 2 requests of 7 rows" in out and "requests to send: 5" in out
    assert server.stats()["requests"] == 3
    code, _, err = run(capsys, "generate", source, "-o", tmp_path / "out.parquet", "--column", "prompt",
                       "--endpoint", server.url, "--model", "m", "--no-progress", *flags)
    assert code == 1, err  # the row without a prompt fails; every other row is answered
    assert server.stats()["requests"] == 5  # generate sent the two the plan had not
    out_frame = pd.read_parquet(tmp_path / "out.parquet")
    assert out_frame["response"].notna().sum() == 6
    code, out, _ = run(capsys, *plan_args(server, source, *flags))
    assert "answered in the checkpoint: 6" in out and "will pay for 0 requests" in out
    assert server.stats()["requests"] == 5


def test_bad_flags_are_refused_before_any_request(server: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = write_input(tmp_path / "in.csv")
    code, _, err = run(capsys, *plan_args(server, source, "--sample", "-1"))
    assert code == 2 and "sample must be an integer >= 0" in err
    code, _, err = run(capsys, *plan_args(server, source, "--max-tokns", "5"))
    assert code == 2 and "did you mean --max-tokens" in err
    code, _, err = run(capsys, "plan", tmp_path / "missing.csv", "--column", "prompt")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, *plan_args(server, source, "--no-resume"))
    assert code == 2 and "--checkpoint" in err
    assert server.stats()["requests"] == 0


def test_help_lists_generates_flags_and_the_sample(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0
    for flag in ("--sample", "--context-window", "--max-tokens", "--checkpoint", "--max-cost", "--schema",
                 "--requests-per-minute", "--batch-rows", "--template"):
        assert flag in out


def test_plan_as_a_real_subprocess(server: Any, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.csv")
    done = subprocess.run(
        [sys.executable, "-m", "gen_ai_frames", *map(str, plan_args(server, source, "--sample", "1"))],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "will pay for 4 requests of 7 rows" in done.stdout
    assert server.stats()["requests"] == 1
