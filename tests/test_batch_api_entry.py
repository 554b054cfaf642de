"""Batch mode through the other entry points: the CLI (``--batch``, ``--no-wait``) and Dask."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from gen_ai_frames import batch
from gen_ai_frames.batch import read_batch_records
from gen_ai_frames.cli import main
from gen_ai_frames.testing import FakeServer

from .conftest import FAKE_KEY


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(api_key=FAKE_KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def sleep(seconds: float) -> None:
        pass

    monkeypatch.setattr(batch, "sleep", sleep)
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def _input(tmp_path: Path, n: int) -> tuple[pd.DataFrame, Path]:
    df = pd.DataFrame({"id": range(n), "prompt": [f"question {i}" for i in range(n)]})
    source = tmp_path / "in.csv"
    df.to_csv(source, index=False)
    return df, source


def test_cli_batch_records_next_to_the_output(server: FakeServer, tmp_path: Path) -> None:
    df, source = _input(tmp_path, 25)
    target = tmp_path / "out.parquet"
    args = ["generate", str(source), "-o", str(target), "--column", "prompt", "--endpoint", server.url,
            "--model", "gpt-4o-mini", "--no-progress", "--batch"]
    assert main(args) == 0
    out = pd.read_parquet(target)
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    ckpt = tmp_path / "out.parquet.ckpt"  # no --checkpoint: recorded next to the output
    assert ckpt.is_dir()
    assert server.stats()["batches"]["created"] == 1
    assert main(args) == 0  # again: every row restored, nothing submitted
    assert server.stats()["batches"]["created"] == 1


def test_cli_no_wait_then_the_same_command_collects(server: FakeServer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    df, source = _input(tmp_path, 10)
    server.configure(batch_polls_per_state=3)
    target, ckpt = tmp_path / "out.parquet", tmp_path / "run.ckpt"
    args = ["generate", str(source), "-o", str(target), "--column", "prompt", "--endpoint", server.url,
            "--model", "gpt-4o-mini", "--no-progress", "--batch", "--checkpoint", str(ckpt)]
    assert main([*args, "--no-wait"]) == 1  # the rows are pending: they count as failed for now
    assert "BatchPendingError" in capsys.readouterr().err
    assert pd.read_parquet(target)["response"].isna().all()
    assert main(args) == 0
    assert pd.read_parquet(target)["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert server.stats()["batches"]["created"] == 1
    assert sum(len(read_batch_records(d)) for d in ckpt.iterdir() if d.is_dir()) == 1


def test_dask_batch_mode(server: FakeServer, tmp_path: Path) -> None:
    dd = pytest.importorskip("dask.dataframe")
    import gen_ai_frames.dask  # noqa: F401  (registers ddf.genai)
    df = pd.DataFrame({"prompt": [f"row {i}" for i in range(30)]})
    ddf = dd.from_pandas(df, npartitions=3, sort=False)
    out = ddf.genai.generate(column="prompt", endpoint=server.url, model_name="gpt-4o-mini", api_key=FAKE_KEY,
                             mode="batch", checkpoint=tmp_path / "run.ckpt", progress=False)
    result = out.compute(scheduler="synchronous")
    assert result["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert server.stats()["batches"]["created"] == 3  # one per partition
    assert set(server.stats()["batches"]["submitted"].values()) == {1}


# The CLI over a file of several input batches submits every batch before waiting for any, so the
# provider runs them side by side (a file takes about its slowest batch, not the sum).


def _args(tmp_path: Path, server: FakeServer, n: int, *extra: str) -> tuple[pd.DataFrame, list[str]]:
    df = pd.DataFrame({"id": range(n), "prompt": [f"question {i}" for i in range(n)]})
    source = tmp_path / "in.csv"
    df.to_csv(source, index=False)
    args = ["generate", str(source), "-o", str(tmp_path / "out.parquet"), "--column", "prompt",
            "--endpoint", server.url, "--model", "gpt-4o-mini", "--no-progress", "--batch",
            "--batch-rows", "10", "--checkpoint", str(tmp_path / "run.ckpt"), *extra]
    return df, args


def test_every_input_batch_is_submitted_before_any_is_waited_for(server: FakeServer, tmp_path: Path) -> None:
    server.configure(batch_polls_per_state=3)  # each batch needs several polls to finish
    df, args = _args(tmp_path, server, 35)
    assert main(args) == 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    events = server.stats()["batches"]["events"]
    created = [i for i, (event, _) in enumerate(events) if event == "created"]
    finished = [i for i, (event, _) in enumerate(events) if event != "created"]
    assert len(created) == 4 and len(finished) == 4  # 35 rows in input batches of 10: four
    assert max(created) < min(finished), events  # all four were running at the provider at once
    # Each input batch's checkpoint records exactly one provider batch: none was submitted twice.
    shards = sorted(d for d in (tmp_path / "run.ckpt").iterdir() if d.is_dir())
    assert [len(read_batch_records(d)) for d in shards] == [1, 1, 1, 1]
    assert server.stats()["batches"]["rows"] == 35


def test_a_resumed_file_submits_only_what_no_batch_covers(server: FakeServer, tmp_path: Path) -> None:
    df, args = _args(tmp_path, server, 25)
    assert main([*args, "--no-wait"]) == 1  # submitted, pending
    assert server.stats()["batches"]["created"] == 3
    assert main(args) == 0  # the submit pass finds the three recorded; the collect pass downloads them
    assert server.stats()["batches"]["created"] == 3
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]


def test_a_bad_key_stops_the_submit_pass_with_no_output(server: FakeServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-000000000000")
    _, args = _args(tmp_path, server, 25)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the run stopped: AuthenticationError" in err and "Traceback" not in err
    assert "suggestion: Check the API key: set the OPENAI_API_KEY environment variable" in err
    assert "sk-wrong-key" not in err
    assert not (tmp_path / "out.parquet").exists()
    assert server.stats()["batches"]["created"] == 0
