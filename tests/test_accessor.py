"""df.genai.generate against the fake server on a real loopback socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers the accessor)
from gen_ai_frames import ConfigurationError, create_client
from gen_ai_frames.checkpoint import (
    Checkpoint,
    CheckpointLockedError,
    CheckpointMismatchError,
    read_checkpoint,
)
from gen_ai_frames.runner import DETAIL_COLUMNS

from .conftest import FAST_RETRY


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def generate(df: pd.DataFrame, client: Any, **options: Any) -> pd.DataFrame:
    options.setdefault("progress", False)
    if "template" not in options:
        options.setdefault("column", "prompt")
    return df.genai.generate(client=client, **options)


def prompts_frame(n: int, **index: Any) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"question {i}" for i in range(n)], "n": range(n)}, **index)


@pytest.mark.parametrize(
    "index",
    [
        None,
        pd.Index([5, 3, 5, 1, 3, 9]),  # non-unique, unsorted
        pd.Index(list("fedcba"), name="key"),
        pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1), ("c", 2)]),
    ],
    ids=["range", "non-unique", "strings", "multi"],
)
def test_answers_land_on_their_rows_for_every_index_kind(client: Any, index: Any) -> None:
    df = prompts_frame(6, index=index)
    before = df.copy()
    out = generate(df, client, max_concurrent=3)
    pd.testing.assert_index_equal(out.index, df.index)
    assert out["response"].tolist() == [f"echo: question {i}" for i in range(6)]
    assert out["error"].isna().all()
    assert list(out.columns) == ["prompt", "n", "response", "error"]
    assert out["response"].dtype == "string" and out["error"].dtype == "string"
    pd.testing.assert_frame_equal(df, before)  # the caller's frame is untouched
    assert "response" not in df.columns


def test_template_fills_prompts_from_columns(client: Any) -> None:
    df = pd.DataFrame({"city": ["Paris", "Rome", None], "country": ["France", "Italy", "Spain"]})
    out = generate(df, client, template="Is {city} in {country}?")
    assert out["response"].tolist()[:2] == ["echo: Is Paris in France?", "echo: Is Rome in Italy?"]
    assert pd.isna(out["response"].iloc[2])
    assert "city" in out["error"].iloc[2] and "missing" in out["error"].iloc[2]


def test_existing_columns_are_not_overwritten_without_consent(client: Any) -> None:
    df = prompts_frame(2).assign(response="old")
    with pytest.raises(ConfigurationError, match="overwrite=True"):
        generate(df, client)
    out = generate(df, client, overwrite=True)
    assert out["response"].tolist() == ["echo: question 0", "echo: question 1"]
    assert df["response"].tolist() == ["old", "old"]
    renamed = generate(df, client, response_column="answer", error_column="problem")
    assert renamed["answer"].tolist() == ["echo: question 0", "echo: question 1"] and "problem" in renamed


def test_empty_frame_returns_at_once(client: Any, fake_server: Any) -> None:
    out = generate(prompts_frame(0), client, details=True)
    assert out.empty and {"response", "error", *DETAIL_COLUMNS} <= set(out.columns)
    assert fake_server.stats()["requests"] == 0


def test_details_columns(client: Any) -> None:
    df = pd.DataFrame({"prompt": ["fine", "[[status=400]] broken", ""]})
    out = generate(df, client, details=True)
    assert list(out.columns) == ["prompt", "response", "error", *DETAIL_COLUMNS]
    ok, bad, empty = out.iloc[0], out.iloc[1], out.iloc[2]
    assert ok["finish_reason"] == "stop" and ok["attempts"] == 1 and ok["completion_tokens"] > 0
    assert ok["prompt_tokens"] > 0 and ok["latency_s"] > 0 and pd.isna(ok["error_type"])
    assert bad["error_type"] == "BadRequestError" and bad["status_code"] == 400 and bad["error_suggestion"]
    assert empty["error_type"] == "InvalidPromptError" and empty["attempts"] == 0
    assert out["status_code"].dtype == "Int64" and out["latency_s"].dtype == "Float64"


def test_bad_values_in_the_prompt_column_fail_only_their_rows(client: Any) -> None:
    df = pd.DataFrame({"prompt": ["fine", None, np.nan, 7, b"raw", {"a": 1}, "   ", "also fine"]})
    out = generate(df, client)
    assert out["response"].notna().tolist() == [True] + [False] * 6 + [True]
    assert out["error"].iloc[3] == "the prompt is int 7, not text"


def test_dedupe_sends_identical_prompts_once_at_temperature_zero(client: Any, fake_server: Any) -> None:
    df = pd.DataFrame({"prompt": ["same", "other", "same", "same"]})
    out = generate(df, client)
    assert out["response"].tolist() == ["echo: same", "echo: other", "echo: same", "echo: same"]
    assert fake_server.stats()["requests"] == 2
    fake_server.reset()
    generate(df, client, temperature=0.7)  # sampling: each row deserves its own draw
    assert fake_server.stats()["requests"] == 4
    fake_server.reset()
    generate(df, client, dedupe=False)
    assert fake_server.stats()["requests"] == 4


def test_concurrency_does_not_drain_at_chunk_boundaries(client: Any, fake_server: Any) -> None:
    fake_server.configure(latency=0.05)
    generate(prompts_frame(64), client, chunk_size=4, max_concurrent=8)
    # Draining at each chunk would cap requests in flight at the chunk size.
    assert fake_server.stats()["max_in_flight"] == 8


def test_progress_bar_on_and_off(client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    generate(prompts_frame(5), client, progress=False)
    assert capsys.readouterr().err == ""
    generate(prompts_frame(5).assign(prompt=["[[status=400]] x", "a", "b", "c", "d"]), client, progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "errors=1" in err


def test_checkpoint_resume_sends_only_missing_rows(client: Any, fake_server: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = prompts_frame(20)
    first = generate(df, client, checkpoint=ckpt, chunk_size=6)
    assert fake_server.stats()["requests"] == 20
    fake_server.reset()
    again = generate(df, client, checkpoint=ckpt)
    assert fake_server.stats()["requests"] == 0
    pd.testing.assert_frame_equal(first, again)
    # Append two rows, edit one and insert one at the top: only those four are sent.
    edited = pd.concat([pd.DataFrame({"prompt": ["brand new"], "n": [-1]}), df, prompts_frame(22).tail(2)],
                       ignore_index=True)
    edited.loc[5, "prompt"] = "edited prompt"
    out = generate(edited, client, checkpoint=ckpt)
    assert sorted(fake_server.stats()["per_prompt"]) == ["brand new", "edited prompt", "question 20", "question 21"]
    assert out["response"].tolist() == ["echo: " + p for p in edited["prompt"]]


def test_read_checkpoint_gives_back_the_results(client: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = pd.DataFrame({"prompt": ["a", "[[status=400]] b", "c"]})
    out = generate(df, client, checkpoint=ckpt)
    stored = read_checkpoint(ckpt)
    assert stored["prompt"].tolist() == df["prompt"].tolist()
    assert stored["response"].tolist()[::2] == out["response"].tolist()[::2]
    assert stored["error"].iloc[1] == out["error"].iloc[1]


def test_changed_settings_refuse_to_resume(client: Any, fake_server: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = prompts_frame(3)
    generate(df, client, checkpoint=ckpt)
    other_model = create_client(endpoint=fake_server.url, model_name="other")
    with pytest.raises(CheckpointMismatchError, match="resume=False") as caught:
        generate(df, other_model, checkpoint=ckpt)
    assert "model" in str(caught.value)
    with pytest.raises(CheckpointMismatchError, match="max_tokens"):
        generate(df, client, checkpoint=ckpt, max_tokens=10)
    fake_server.reset()
    generate(df, other_model, checkpoint=ckpt, resume=False)  # starts over
    assert fake_server.stats()["requests"] == 3


def test_second_run_on_a_locked_checkpoint_is_refused(client: Any, fake_server: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    holder = Checkpoint.open(ckpt, {"someone": "else"})
    try:
        with pytest.raises(CheckpointLockedError):
            generate(prompts_frame(3), client, checkpoint=ckpt)
    finally:
        holder.close()
    assert fake_server.stats()["requests"] == 0


def test_retry_errors_resends_only_failed_rows(client: Any, fake_server: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = pd.DataFrame({"prompt": ["a", "b [[status=400]]", "c", "d [[status=400]]"]})
    first = generate(df, client, checkpoint=ckpt)
    assert first["error"].notna().tolist() == [False, True, False, True]
    fake_server.reset()
    generate(df, client, checkpoint=ckpt)  # plain resume keeps the failures
    assert fake_server.stats()["requests"] == 0
    generate(df, client, checkpoint=ckpt, retry_errors=True)
    assert sorted(fake_server.stats()["per_prompt"]) == ["b [[status=400]]", "d [[status=400]]"]


def test_works_inside_a_running_loop_and_async(client: Any) -> None:
    df = prompts_frame(4)

    async def notebook_cell() -> tuple[pd.DataFrame, pd.DataFrame]:
        return generate(df, client), await df.genai.agenerate(column="prompt", client=client, progress=False)

    sync_out, async_out = asyncio.run(notebook_cell())
    pd.testing.assert_frame_equal(sync_out, async_out)


def test_client_options_build_a_client(fake_server: Any) -> None:
    out = prompts_frame(2).genai.generate(column="prompt", provider="openai", endpoint=fake_server.url,
                                          model_name="m", progress=False)
    assert out["response"].tolist() == ["echo: question 0", "echo: question 1"]
    with pytest.raises(ConfigurationError, match="not both"):
        prompts_frame(2).genai.generate(column="prompt", client=create_client(endpoint=fake_server.url,
                                        model_name="m"), model_name="x")


def test_fatal_error_raises_after_saving_progress(fake_server: Any, tmp_path: Path) -> None:
    fake_server.configure(api_key="right-key")
    bad = create_client(endpoint=fake_server.url, model_name="m", api_key="wrong-key")
    from gen_ai_frames import AuthenticationError

    with pytest.raises(AuthenticationError):
        generate(prompts_frame(50), bad, checkpoint=tmp_path / "c", max_concurrent=2)
    assert fake_server.stats()["requests"] <= 2


def test_read_checkpoint_follows_rows_inserted_above(client: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    generate(pd.DataFrame({"prompt": ["a", "b"]}), client, checkpoint=ckpt)
    generate(pd.DataFrame({"prompt": ["new", "a", "b"]}), client, checkpoint=ckpt)
    stored = read_checkpoint(ckpt)
    assert stored["prompt"].tolist() == ["new", "a", "b"]
    assert stored["response"].tolist() == ["echo: new", "echo: a", "echo: b"]


def test_template_over_list_and_array_columns(client: Any) -> None:
    df = pd.DataFrame({"tags": [["a", "b"], np.array(["c"]), None]})
    out = generate(df, client, template="Tags: {tags}")
    assert out["response"].tolist()[:2] == ["echo: Tags: ['a', 'b']", "echo: Tags: ['c']"]
    assert "missing" in out["error"].iloc[2]


def test_interrupt_inside_a_running_loop_stops_sending_and_releases_the_checkpoint(
        client: Any, fake_server: Any, tmp_path: Path) -> None:
    """Jupyter's stop button raises KeyboardInterrupt in the cell: the run must not go on in the
    background, and running the cell again must resume, not hit a locked checkpoint."""
    import os
    import signal
    import threading

    fake_server.configure(latency=0.1)
    df = prompts_frame(200)
    ckpt = tmp_path / "run.ckpt"

    async def notebook_cell() -> None:
        generate(df, client, checkpoint=ckpt, max_concurrent=4, chunk_size=5)

    # Like ipykernel, run the cell on a loop without asyncio.run's own SIGINT handler, so the
    # interrupt lands in the waiting thread as KeyboardInterrupt.
    loop = asyncio.new_event_loop()
    timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(notebook_cell())
    finally:
        timer.join()
        loop.close()
    sent = fake_server.stats()["requests"]
    assert 0 < sent < 200
    threading.Event().wait(0.3)
    assert fake_server.stats()["requests"] == sent  # nothing goes on in the background
    fake_server.configure(latency=0.0)
    fake_server.reset()
    out = generate(df, client, checkpoint=ckpt)  # not locked: the interrupted run let go
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert fake_server.stats()["requests"] <= 200 - sent + 4  # answered rows were saved


def multiindex_frame() -> pd.DataFrame:
    columns = pd.MultiIndex.from_tuples([("t", "x"), ("t", "y"), ("u", "")])
    return pd.DataFrame([["first x", "first y", "u0"], ["second x", "second y", "u1"]], columns=columns)


def test_multiindex_template_field_is_refused_not_silently_the_first_sub_column(client: Any,
                                                                               fake_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="MultiIndex columns.*Flatten the columns first"):
        generate(multiindex_frame(), client, template="Say {t}")
    assert fake_server.stats()["requests"] == 0


def test_multiindex_partial_column_key_asks_for_a_tuple(client: Any, fake_server: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"selects 2 sub-columns.*column=\('t', 'x'\)"):
        multiindex_frame().genai.generate(column="t", client=client, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_multiindex_sub_column_named_by_tuple_is_used(client: Any) -> None:
    out = multiindex_frame().genai.generate(column=("t", "y"), client=client, progress=False)
    assert out["response"].tolist() == ["echo: first y", "echo: second y"]


def test_repair_true_on_the_accessor_resends_only_the_rows_of_a_damaged_part(client: Any, fake_server: Any,
                                                                             tmp_path: Path) -> None:
    from gen_ai_frames.checkpoint import CheckpointCorruptError

    df, ckpt = prompts_frame(6), tmp_path / "run.ckpt"
    generate(df, client, checkpoint=ckpt, chunk_size=2, max_concurrent=1)
    damaged = sorted(ckpt.glob("part-*.parquet"))[0]
    damaged.write_bytes(b"PAR1 damaged")
    fake_server.reset()
    with pytest.raises(CheckpointCorruptError):
        generate(df, client, checkpoint=ckpt)
    with pytest.warns(UserWarning, match=damaged.name):
        out = generate(df, client, checkpoint=ckpt, repair=True)
    assert out["response"].tolist() == [f"echo: question {i}" for i in range(6)]
    assert 0 < fake_server.stats()["requests"] < 6
