"""df.genai.generate against the fake server on a real loopback socket.

The behaviour tests run for every frame library (the ``lib`` fixture): pandas' ``df.genai`` and
polars' (``gen_ai_frames.polars``), which must behave alike. pandas-only behaviour (indexes,
MultiIndex columns, mixed-type columns) is tested on pandas alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
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


class Frames:
    """One frame library, seen the same way by the tests: build a frame, run, read a column."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pl: Any = None
        if name == "polars":
            self.pl = pytest.importorskip("polars")
            import gen_ai_frames.polars  # noqa: F401  (registers df.genai for polars)

    def __repr__(self) -> str:
        return self.name

    def frame(self, data: dict[str, Sequence[Any]]) -> Any:
        if self.pl is not None:
            return self.pl.DataFrame(data, strict=False)
        return pd.DataFrame(data)

    def values(self, out: Any, name: str) -> list[Any]:
        """A column's values, None where missing."""
        if self.pl is not None:
            return out.get_column(name).to_list()
        return [None if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else v for v in out[name].tolist()]

    def columns(self, out: Any) -> list[str]:
        return list(out.columns)

    def height(self, out: Any) -> int:
        return len(out)

    def assert_equal(self, left: Any, right: Any) -> None:
        if self.pl is not None:
            from polars.testing import assert_frame_equal

            assert_frame_equal(left, right)
        else:
            pd.testing.assert_frame_equal(left, right)

    def with_column(self, df: Any, name: str, values: Any) -> Any:
        if self.pl is not None:
            column = self.pl.Series(name, values) if isinstance(values, list) else self.pl.lit(values)
            return df.with_columns(column.alias(name))
        return df.assign(**{name: values})

    def dtype(self, out: Any, name: str) -> str:
        """The column's type in the library's own words, for the checks below."""
        return str(out.schema[name] if self.pl is not None else out[name].dtype)


@pytest.fixture(params=["pandas", "polars"])
def lib(request: pytest.FixtureRequest) -> Frames:
    return Frames(request.param)


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def generate(df: Any, client: Any, **options: Any) -> Any:
    options.setdefault("progress", False)
    if "template" not in options:
        options.setdefault("column", "prompt")
    return df.genai.generate(client=client, **options)


def prompts_frame(n: int, lib: Frames | None = None, **index: Any) -> Any:
    data = {"prompt": [f"question {i}" for i in range(n)], "n": list(range(n))}
    if lib is not None:
        return lib.frame(data)
    return pd.DataFrame(data, **index)


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


def test_answers_land_on_their_rows_in_order(lib: Frames, client: Any, fake_server: Any) -> None:
    fake_server.configure(latency=0.01)
    df = lib.frame({"prompt": [f"question {i}" for i in range(40)], "n": list(range(40))})
    out = generate(df, client, max_concurrent=7)
    assert lib.values(out, "response") == [f"echo: question {i}" for i in range(40)]
    assert lib.values(out, "n") == list(range(40)) and lib.values(out, "error") == [None] * 40
    assert lib.columns(out) == ["prompt", "n", "response", "error"]
    assert lib.columns(df) == ["prompt", "n"]  # the caller's frame is untouched
    if lib.pl is not None:
        assert out.schema["response"] == lib.pl.String and out.schema["error"] == lib.pl.String


def test_template_fills_prompts_from_columns(lib: Frames, client: Any) -> None:
    df = lib.frame({"city": ["Paris", "Rome", None], "country": ["France", "Italy", "Spain"]})
    out = generate(df, client, template="Is {city} in {country}?")
    assert lib.values(out, "response")[:2] == ["echo: Is Paris in France?", "echo: Is Rome in Italy?"]
    assert lib.values(out, "response")[2] is None
    error = lib.values(out, "error")[2]
    assert "city" in error and "missing" in error
    assert error == "template field(s) ['city'] are missing in this row"


def test_template_treats_nan_as_missing(lib: Frames, client: Any) -> None:
    df = lib.frame({"city": ["Paris", "Rome"], "score": [1.5, float("nan")]})
    out = generate(df, client, template="{city} scores {score}")
    assert lib.values(out, "response") == ["echo: Paris scores 1.5", None]
    assert lib.values(out, "error")[1] == "template field(s) ['score'] are missing in this row"


def test_existing_columns_are_not_overwritten_without_consent(lib: Frames, client: Any) -> None:
    df = lib.with_column(prompts_frame(2, lib), "response", "old")
    with pytest.raises(ConfigurationError, match="overwrite=True"):
        generate(df, client)
    out = generate(df, client, overwrite=True)
    assert lib.values(out, "response") == ["echo: question 0", "echo: question 1"]
    assert lib.columns(out) == ["prompt", "n", "response", "error"]  # replaced where it was
    assert lib.values(df, "response") == ["old", "old"]
    renamed = generate(df, client, response_column="answer", error_column="problem")
    assert lib.values(renamed, "answer") == ["echo: question 0", "echo: question 1"]
    assert "problem" in lib.columns(renamed)


def test_unknown_column_and_bad_options_fail_before_sending(lib: Frames, client: Any,
                                                            fake_server: Any) -> None:
    df = prompts_frame(2, lib)
    with pytest.raises(ConfigurationError, match="column 'missing' not found"):
        generate(df, client, column="missing")
    with pytest.raises(ConfigurationError, match="exactly one of column= .* or template="):
        generate(df, client, column="prompt", template="{prompt}")
    with pytest.raises(ConfigurationError, match="did you mean 'max_tokens'"):
        generate(df, client, max_token=5)
    with pytest.raises(ConfigurationError, match="template field"):
        generate(df, client, column=None, template="{}")
    assert fake_server.stats()["requests"] == 0


def test_empty_frame_returns_at_once(lib: Frames, client: Any, fake_server: Any) -> None:
    out = generate(prompts_frame(0, lib), client, details=True)
    assert lib.height(out) == 0 and {"response", "error", *DETAIL_COLUMNS} <= set(lib.columns(out))
    assert fake_server.stats()["requests"] == 0


def test_details_columns(lib: Frames, client: Any) -> None:
    df = lib.frame({"prompt": ["fine", "[[status=400]] broken", ""]})
    out = generate(df, client, details=True)
    assert lib.columns(out) == ["prompt", "response", "error", *DETAIL_COLUMNS]
    ok, bad, empty = ({name: lib.values(out, name)[i] for name in lib.columns(out)} for i in range(3))
    assert ok["finish_reason"] == "stop" and ok["attempts"] == 1 and ok["completion_tokens"] > 0
    assert ok["prompt_tokens"] > 0 and ok["latency_s"] > 0 and ok["error_type"] is None
    assert bad["error_type"] == "BadRequestError" and bad["status_code"] == 400 and bad["error_suggestion"]
    assert empty["error_type"] == "InvalidPromptError" and empty["attempts"] == 0
    if lib.pl is None:
        assert out["status_code"].dtype == "Int64" and out["latency_s"].dtype == "Float64"
    else:
        assert out.schema["status_code"] == lib.pl.Int64 and out.schema["latency_s"] == lib.pl.Float64


def test_bad_values_in_the_prompt_column_fail_only_their_rows(client: Any) -> None:
    df = pd.DataFrame({"prompt": ["fine", None, np.nan, 7, b"raw", {"a": 1}, "   ", "also fine"]})
    out = generate(df, client)
    assert out["response"].notna().tolist() == [True] + [False] * 6 + [True]
    assert out["error"].iloc[3] == "the prompt is int 7, not text"


def test_dedupe_sends_identical_prompts_once_at_temperature_zero(lib: Frames, client: Any,
                                                                 fake_server: Any) -> None:
    df = lib.frame({"prompt": ["same", "other", "same", "same"]})
    out = generate(df, client)
    assert lib.values(out, "response") == ["echo: same", "echo: other", "echo: same", "echo: same"]
    assert fake_server.stats()["requests"] == 2
    fake_server.reset()
    generate(df, client, temperature=0.7)  # sampling: each row deserves its own draw
    assert fake_server.stats()["requests"] == 4
    fake_server.reset()
    generate(df, client, dedupe=False)
    assert fake_server.stats()["requests"] == 4


def test_concurrency_does_not_drain_at_chunk_boundaries(lib: Frames, client: Any, fake_server: Any) -> None:
    fake_server.configure(latency=0.05)
    generate(prompts_frame(64, lib), client, chunk_size=4, max_concurrent=8)
    # Draining at each chunk would cap requests in flight at the chunk size.
    assert fake_server.stats()["max_in_flight"] == 8


def test_progress_bar_on_and_off(lib: Frames, client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    generate(prompts_frame(5, lib), client, progress=False)
    assert capsys.readouterr().err == ""
    generate(lib.frame({"prompt": ["[[status=400]] x", "a", "b", "c", "d"]}), client, progress=True)
    err = capsys.readouterr().err
    assert "5/5" in err and "errors=1" in err


def test_checkpoint_resume_sends_only_missing_rows(lib: Frames, client: Any, fake_server: Any,
                                                   tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = prompts_frame(20, lib)
    first = generate(df, client, checkpoint=ckpt, chunk_size=6)
    assert fake_server.stats()["requests"] == 20
    fake_server.reset()
    again = generate(df, client, checkpoint=ckpt)
    assert fake_server.stats()["requests"] == 0
    lib.assert_equal(first, again)
    # Append two rows, edit one and insert one at the top: only those four are sent.
    prompts = ["brand new", *lib.values(df, "prompt"), "question 20", "question 21"]
    prompts[5] = "edited prompt"
    edited = lib.frame({"prompt": prompts, "n": [-1, *range(22)]})
    out = generate(edited, client, checkpoint=ckpt)
    assert sorted(fake_server.stats()["per_prompt"]) == ["brand new", "edited prompt", "question 20", "question 21"]
    assert lib.values(out, "response") == ["echo: " + p for p in prompts]


def test_read_checkpoint_gives_back_the_results(lib: Frames, client: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = lib.frame({"prompt": ["a", "[[status=400]] b", "c"]})
    out = generate(df, client, checkpoint=ckpt)
    stored = read_checkpoint(ckpt)
    assert stored["prompt"].tolist() == lib.values(df, "prompt")
    assert stored["response"].tolist()[::2] == lib.values(out, "response")[::2]
    assert stored["error"].iloc[1] == lib.values(out, "error")[1]


def test_changed_settings_refuse_to_resume(lib: Frames, client: Any, fake_server: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = prompts_frame(3, lib)
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


def test_second_run_on_a_locked_checkpoint_is_refused(lib: Frames, client: Any, fake_server: Any,
                                                       tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    holder = Checkpoint.open(ckpt, {"someone": "else"})
    try:
        with pytest.raises(CheckpointLockedError):
            generate(prompts_frame(3, lib), client, checkpoint=ckpt)
    finally:
        holder.close()
    assert fake_server.stats()["requests"] == 0


def test_retry_errors_resends_only_failed_rows(lib: Frames, client: Any, fake_server: Any,
                                              tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    df = lib.frame({"prompt": ["a", "b [[status=400]]", "c", "d [[status=400]]"]})
    first = generate(df, client, checkpoint=ckpt)
    assert [e is not None for e in lib.values(first, "error")] == [False, True, False, True]
    fake_server.reset()
    generate(df, client, checkpoint=ckpt)  # plain resume keeps the failures
    assert fake_server.stats()["requests"] == 0
    generate(df, client, checkpoint=ckpt, retry_errors=True)
    assert sorted(fake_server.stats()["per_prompt"]) == ["b [[status=400]]", "d [[status=400]]"]


def test_works_inside_a_running_loop_and_async(lib: Frames, client: Any) -> None:
    df = prompts_frame(4, lib)

    async def notebook_cell() -> tuple[Any, Any]:
        return generate(df, client), await df.genai.agenerate(column="prompt", client=client, progress=False)

    sync_out, async_out = asyncio.run(notebook_cell())
    lib.assert_equal(sync_out, async_out)


def test_client_options_build_a_client(lib: Frames, fake_server: Any) -> None:
    out = prompts_frame(2, lib).genai.generate(column="prompt", provider="openai", endpoint=fake_server.url,
                                               model_name="m", progress=False)
    assert lib.values(out, "response") == ["echo: question 0", "echo: question 1"]
    with pytest.raises(ConfigurationError, match="not both"):
        prompts_frame(2, lib).genai.generate(column="prompt", client=create_client(endpoint=fake_server.url,
                                             model_name="m"), model_name="x")


def test_fatal_error_raises_after_saving_progress(lib: Frames, fake_server: Any, tmp_path: Path) -> None:
    fake_server.configure(api_key="right-key")
    bad = create_client(endpoint=fake_server.url, model_name="m", api_key="wrong-key")
    from gen_ai_frames import AuthenticationError

    with pytest.raises(AuthenticationError) as caught:
        generate(prompts_frame(50, lib), bad, checkpoint=tmp_path / "c", max_concurrent=2)
    assert fake_server.stats()["requests"] <= 2
    assert "wrong-key" not in str(caught.value)


def test_read_checkpoint_follows_rows_inserted_above(lib: Frames, client: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    generate(lib.frame({"prompt": ["a", "b"]}), client, checkpoint=ckpt)
    generate(lib.frame({"prompt": ["new", "a", "b"]}), client, checkpoint=ckpt)
    stored = read_checkpoint(ckpt)
    assert stored["prompt"].tolist() == ["new", "a", "b"]
    assert stored["response"].tolist() == ["echo: new", "echo: a", "echo: b"]


def test_template_over_list_columns(lib: Frames, client: Any) -> None:
    df = lib.frame({"tags": [["a", "b"], ["c"], None]})
    out = generate(df, client, template="Tags: {tags}")
    assert lib.values(out, "response")[:2] == ["echo: Tags: ['a', 'b']", "echo: Tags: ['c']"]
    assert "missing" in lib.values(out, "error")[2]


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


def test_repair_true_on_the_accessor_resends_only_the_rows_of_a_damaged_part(lib: Frames, client: Any,
                                                                             fake_server: Any,
                                                                             tmp_path: Path) -> None:
    from gen_ai_frames.checkpoint import CheckpointCorruptError

    df, ckpt = prompts_frame(6, lib), tmp_path / "run.ckpt"
    generate(df, client, checkpoint=ckpt, chunk_size=2, max_concurrent=1)
    damaged = sorted(ckpt.glob("part-*.parquet"))[0]
    damaged.write_bytes(b"PAR1 damaged")
    fake_server.reset()
    with pytest.raises(CheckpointCorruptError):
        generate(df, client, checkpoint=ckpt)
    with pytest.warns(UserWarning, match=damaged.name):
        out = generate(df, client, checkpoint=ckpt, repair=True)
    assert lib.values(out, "response") == [f"echo: question {i}" for i in range(6)]
    assert 0 < fake_server.stats()["requests"] < 6
