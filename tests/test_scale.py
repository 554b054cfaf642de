"""Many rows on one machine, at CI size (issue 19): results held as columns, resume by keys alone.

The figures (rows/s, memory per row, seconds to resume ten million rows) are measured by
benchmarks/bench_scale.py; here the same paths are checked for correctness on a few thousand rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gen_ai_frames import create_client
from gen_ai_frames.checkpoint import Checkpoint, checkpoint_status, read_checkpoint

from .conftest import FAST_RETRY


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def _frame(n: int) -> pd.DataFrame:
    """Distinct prompts, some repeated, a few missing or blank, and a few the server refuses."""
    prompts: list[Any] = [f"review {i:06d}" for i in range(n)]
    for i in range(0, n, 97):
        prompts[i] = "the same question"
    for i in range(5, n, 331):
        prompts[i] = None
    for i in range(7, n, 577):
        prompts[i] = "   "
    for i in range(11, n, 401):
        prompts[i] = f"[[status=400]] bad {i}"
    return pd.DataFrame({"prompt": pd.array(prompts, dtype="string")})


def _expected(df: pd.DataFrame) -> list[Any]:
    return [
        None if p is pd.NA or not str(p).strip() or str(p).startswith("[[status") else f"echo: {p}"
        for p in df["prompt"]
    ]


def test_thousands_of_rows_out_of_order_land_on_their_rows(
    fake_server: Any, client: Any, tmp_path: Path
) -> None:
    df = _frame(6000)
    out = df.genai.generate(
        column="prompt",
        client=client,
        checkpoint=tmp_path / "run.ckpt",
        max_concurrent=64,
        chunk_size=500,
        progress=False,
    )
    assert out["response"].tolist() == [pd.NA if v is None else v for v in _expected(df)]
    failed = out["error"].notna()
    assert failed.sum() == sum(v is None for v in _expected(df))
    # Duplicates are sent once: one request per distinct sendable prompt.
    sendable = df["prompt"].dropna()
    sendable = sendable[sendable.str.strip() != ""]
    assert fake_server.stats()["requests"] == sendable.nunique()
    # Every answered or refused row is stored once, at its position, with its prompt.
    stored = read_checkpoint(tmp_path / "run.ckpt")
    assert len(stored) == len(sendable)
    assert stored["prompt"].tolist() == df["prompt"][stored.index].tolist()


def test_a_resume_sends_only_new_rows_and_reads_answers_after_sending(
    fake_server: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    df = _frame(4000)
    first = df.genai.generate(column="prompt", client=client, checkpoint=checkpoint, progress=False)
    sent_first = fake_server.stats()["requests"]

    # New rows above and among the old ones, and the old rows in another order.
    rng = np.random.default_rng(7)
    old = df.iloc[rng.permutation(len(df))]
    new = pd.DataFrame({"prompt": pd.array([f"new {i}" for i in range(300)], dtype="string")})
    bigger = pd.concat([new.iloc[:150], old, new.iloc[150:]], ignore_index=True)

    reads: list[int] = []
    load = Checkpoint.load_results

    def spy(self: Checkpoint, *args: Any, **kwargs: Any) -> Any:
        reads.append(fake_server.stats()["requests"])
        return load(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "load_results", spy)
    again = bigger.genai.generate(column="prompt", client=client, checkpoint=checkpoint, progress=False)

    assert fake_server.stats()["requests"] == sent_first + 300  # only the new rows
    assert reads and min(reads) == sent_first + 300  # stored answers read once the new rows were sent
    expected = dict(zip(first["prompt"].fillna("<NA>"), first["response"]))
    for prompt, response in zip(again["prompt"].fillna("<NA>"), again["response"]):
        if prompt.startswith("new "):
            assert response == f"echo: {prompt}"
        elif prompt in expected:
            assert response is expected[prompt] or response == expected[prompt]
    # The moved rows are stored again at their new positions: a third run finds them in place
    # and stores nothing more.
    sendable = bigger["prompt"].notna() & (bigger["prompt"].fillna("").str.strip() != "")
    stored = read_checkpoint(checkpoint)
    assert set(np.flatnonzero(sendable.to_numpy())) <= set(stored.index)
    parts = checkpoint_status(checkpoint)["parts"]
    bigger.genai.generate(column="prompt", client=client, checkpoint=checkpoint, progress=False)
    assert fake_server.stats()["requests"] == sent_first + 300
    assert checkpoint_status(checkpoint)["parts"] == parts  # nothing written: nothing moved


def test_a_resume_with_retry_errors_resends_only_the_failed_rows(
    fake_server: Any, client: Any, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    df = _frame(3000)
    first = df.genai.generate(column="prompt", client=client, checkpoint=checkpoint, progress=False)
    refused = int(first["prompt"].str.startswith("[[status").sum())
    before = fake_server.stats()["requests"]
    again = df.genai.generate(
        column="prompt", client=client, checkpoint=checkpoint, retry_errors=True, progress=False
    )
    assert fake_server.stats()["requests"] - before == refused
    pd.testing.assert_series_equal(again["response"], first["response"])


def test_returned_text_columns_are_arrow_backed(fake_server: Any, client: Any) -> None:
    df = _frame(500)
    out = df.genai.generate(column="prompt", client=client, progress=False)
    assert out["response"].dtype == "string" and out["response"].dtype.storage == "pyarrow"
    assert out["error"].dtype.storage == "pyarrow"
