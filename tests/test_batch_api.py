"""Batch mode (issue 15): every provider's Batch API end to end against the fake server.

The poll loop's sleep is replaced, so no test waits; the fake server advances a batch's state at
each poll. The server counts, per ``custom_id``, how often a row was submitted in a batch, and per
prompt how often it was answered: "exactly once" is checked on both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers the accessor)
from gen_ai_frames import batch, create_client
from gen_ai_frames.batch import BATCH_RECORDS, read_batch_records
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.pricing import batch_price_for, price_for
from gen_ai_frames.providers.batches import OpenAIBatches
from gen_ai_frames.testing import FakeServer

from .conftest import FAKE_KEY

PROVIDERS = {
    "openai": "gpt-4o-mini",
    "azure": "my-deployment",
    "anthropic": "claude-3-haiku",
    "gemini": "gemini-2.0-flash",
}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(api_key=FAKE_KEY) as running:
        yield running


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The poll loop's waits, recorded instead of slept."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(batch, "sleep", sleep)
    return waits


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"row {i}" for i in range(n)], "n": range(n)})


def _generate(df: pd.DataFrame, server: FakeServer, ckpt: Path | None, provider: str = "openai",
              **options: Any) -> pd.DataFrame:
    options.setdefault("progress", False)
    return df.genai.generate(column="prompt", provider=provider, model_name=PROVIDERS[provider], api_key=FAKE_KEY,
                             endpoint=server.endpoint_for(provider), mode="batch", checkpoint=ckpt, **options)


def _echo(df: pd.DataFrame) -> list[str]:
    return ["echo: " + p for p in df["prompt"]]


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_a_1000_row_batch_run_end_to_end(server: FakeServer, tmp_path: Path, provider: str,
                                         no_waiting: list[float]) -> None:
    df, ckpt = _frame(1000), tmp_path / "run.ckpt"
    server.configure(batch_polls_per_state=2)
    out = _generate(df, server, ckpt, provider, details=True)
    assert out["response"].tolist() == _echo(df)
    assert out["error"].isna().all() and (out["attempts"] == 1).all()
    stats = server.stats()
    assert stats["batches"]["created"] == 1 and stats["batches"]["rows"] == 1000
    assert set(stats["batches"]["submitted"].values()) == {1}
    assert set(stats["per_prompt"]) == set(df["prompt"]) and set(stats["per_prompt"].values()) == {1}
    assert read_checkpoint(ckpt)["response"].tolist() == _echo(df)
    [record] = read_batch_records(ckpt)
    assert record["state"] == "collected" and record["batch_id"] and record["requests"] == 1000
    assert no_waiting and max(no_waiting) <= 60  # it polled with backoff, capped at poll_interval

    again = _generate(df, server, ckpt, provider)  # the same call again: all restored, nothing sent
    assert again["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 1 and server.stats()["batches"]["polls"] == stats["batches"]["polls"]


def test_rows_are_split_by_the_providers_request_and_byte_limits(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df = _frame(1000)
    monkeypatch.setattr(OpenAIBatches, "max_requests", 300)
    out = _generate(df, server, tmp_path / "a.ckpt")
    assert out["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 4  # 300 + 300 + 300 + 100
    assert [r["requests"] for r in read_batch_records(tmp_path / "a.ckpt")] == [300, 300, 300, 100]

    monkeypatch.setattr(OpenAIBatches, "max_bytes", 40_000)  # each line is ~200 bytes
    server.reset()
    out = _generate(df, server, tmp_path / "b.ckpt")
    assert out["response"].tolist() == _echo(df)
    records = read_batch_records(tmp_path / "b.ckpt")
    assert len(records) == server.stats()["batches"]["created"] > 4
    assert sum(r["requests"] for r in records) == 1000
    assert set(server.stats()["batches"]["submitted"].values()) == {1}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("ending", ["expired", "cancelled"])
def test_an_expired_batch_with_half_done_resubmits_only_the_other_half(
    server: FakeServer, tmp_path: Path, provider: str, ending: str
) -> None:
    df, ckpt = _frame(100), tmp_path / "run.ckpt"
    server.configure(batch_outcomes=[ending], batch_fraction=0.5)
    out = _generate(df, server, ckpt, provider)
    assert out["response"].tolist() == _echo(df) and out["error"].isna().all()
    stats = server.stats()
    assert stats["batches"]["created"] == 2
    first, second = read_batch_records(ckpt)
    assert first["requests"] == 100 and first["outcome"] == ending
    assert second["requests"] == 50  # only the rows without an answer
    assert set(stats["per_prompt"].values()) == {1}  # every row answered exactly once


def test_a_failed_batch_is_resubmitted_once_per_call(server: FakeServer, tmp_path: Path) -> None:
    df, ckpt = _frame(20), tmp_path / "run.ckpt"
    server.configure(batch_outcomes=["failed", "failed"])
    out = _generate(df, server, ckpt, details=True)
    assert server.stats()["batches"]["created"] == 2  # the rows again, once; then they fail
    assert out["response"].isna().all()
    assert set(out["error_type"]) == {"BatchExpiredError"}
    assert "failed" in out["error"][0] and "same checkpoint" in out["error_suggestion"][0]
    assert len(read_checkpoint(ckpt)) == 0  # not stored: the next call submits them again

    out = _generate(df, server, ckpt)
    assert out["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 3


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_per_row_errors_land_in_the_error_column(server: FakeServer, tmp_path: Path, provider: str) -> None:
    prompts = ["fine", "bad [[status=400]]", "long [[context_length]]", "also fine"]
    df = pd.DataFrame({"prompt": prompts})
    out = _generate(df, server, tmp_path / "run.ckpt", provider, details=True)
    assert out["response"].fillna("-").tolist() == ["echo: fine", "-", "-", "echo: also fine"]
    assert out["error_type"].tolist()[1:3] == ["BadRequestError", "ContextLengthError"]
    assert "400" in out["error"][1] and out["status_code"].tolist()[1:3] == [400, 400]
    assert out["error_suggestion"].notna().tolist() == [False, True, True, False]
    stored = read_checkpoint(tmp_path / "run.ckpt")  # row errors are stored, as in realtime runs
    assert stored["error_type"].tolist()[1:3] == ["BadRequestError", "ContextLengthError"]


def test_wait_false_submits_and_a_second_call_collects(server: FakeServer, tmp_path: Path) -> None:
    df, ckpt = _frame(30), tmp_path / "run.ckpt"
    server.configure(batch_polls_per_state=3)
    out = _generate(df, server, ckpt, wait=False, details=True)
    assert out["response"].isna().all() and set(out["error_type"]) == {"BatchPendingError"}
    assert out["error"][0].startswith("batch submitted") and "same checkpoint" in out["error"][0]
    assert server.stats()["batches"]["created"] == 1 and len(read_checkpoint(ckpt)) == 0

    out = _generate(df, server, ckpt, wait=False)  # not finished yet: still pending, not resubmitted
    assert server.stats()["batches"]["created"] == 1

    out = _generate(df, server, ckpt)  # waits and collects
    assert out["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 1
    assert set(server.stats()["batches"]["submitted"].values()) == {1}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_schema_in_batch_mode(server: FakeServer, tmp_path: Path, provider: str) -> None:
    df = pd.DataFrame({"prompt": ["Ann is 31", "Bob is 42"]})
    out = _generate(df, server, tmp_path / "run.ckpt", provider, schema="name, age int")
    assert out["error"].isna().all()
    assert out["age"].dtype == "Int64" and out["age"].notna().all()
    assert out["name"].notna().all()
    assert all(isinstance(json.loads(text), dict) for text in out["response"])


def test_an_answer_that_breaks_the_schema_is_a_row_error(server: FakeServer, tmp_path: Path) -> None:
    server.configure(schema_violation_rate=1.0)
    df = pd.DataFrame({"prompt": ["Ann is 31"]})
    out = _generate(df, server, tmp_path / "run.ckpt", schema="name, age int", details=True)
    assert out["error_type"].tolist() == ["SchemaValidationError"]
    assert "retry_errors" in out["error_suggestion"][0]


@pytest.mark.parametrize("provider", ["groq", "ollama", "vllm"])
def test_a_provider_without_a_batch_api_fails_before_sending(server: FakeServer, tmp_path: Path,
                                                             provider: str) -> None:
    client = create_client(provider=provider, endpoint=server.url, model_name="m", api_key=FAKE_KEY)
    with pytest.raises(ConfigurationError, match="no batch API"):
        _frame(3).genai.generate(column="prompt", client=client, mode="batch", checkpoint=tmp_path / "c")
    assert server.stats()["requests"] == 0 and not (tmp_path / "c").exists()


def test_mode_must_be_realtime_or_batch() -> None:
    with pytest.raises(ConfigurationError, match="'realtime' or 'batch'"):
        _frame(1).genai.generate(column="prompt", model_name="m", mode="batched")


def test_without_a_checkpoint_the_accessor_uses_the_documented_default(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    df = _frame(10)
    out = _generate(df, server, None)
    assert out["response"].tolist() == _echo(df)
    [made] = list(tmp_path.glob("genai-batch-*.ckpt"))
    assert len(read_checkpoint(made)) == 10 and (made / BATCH_RECORDS).exists()
    _generate(df, server, None)  # the same call finds it: nothing submitted again
    assert server.stats()["batches"]["created"] == 1


def test_nothing_to_send_makes_no_default_checkpoint(server: FakeServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Dask computes the output's columns on an empty frame: that must leave nothing behind.
    monkeypatch.chdir(tmp_path)
    out = _generate(_frame(0), server, None)
    assert list(out.columns) == ["prompt", "n", "response", "error"] and len(out) == 0
    out = _generate(pd.DataFrame({"prompt": [None, "  "]}), server, None)
    assert out["error"].notna().all()
    assert list(tmp_path.iterdir()) == [] and server.stats()["requests"] == 0


def test_the_run_level_functions_need_a_checkpoint(server: FakeServer) -> None:
    import asyncio

    from gen_ai_frames.options import RunOptions
    from gen_ai_frames.runner import run_rows

    client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY)
    with pytest.raises(ConfigurationError, match="needs a checkpoint"):
        asyncio.run(run_rows(["a"], client=client, options=RunOptions(mode="batch")))
    assert server.stats()["requests"] == 0


def test_the_client_batch_call_takes_mode_batch(server: FakeServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = create_client(endpoint=server.url, model_name="gpt-4o-mini", api_key=FAKE_KEY)
    prompts = ["a", "b", "c [[status=400]]"]
    responses, errors = client.generate_batch_response(prompts, mode="batch", return_error=True)
    assert responses == ["echo: a", "echo: b", None]
    assert errors[0] is None and errors[2]["type"] == "BadRequestError" and errors[2]["suggestion"]
    assert len(list(tmp_path.glob("genai-batch-*.ckpt"))) == 1  # the documented default checkpoint
    pending = client.generate_batch_response(["d"], mode="batch", wait=False, return_error=True)[1][0]
    assert pending["type"] == "BatchPendingError" and pending["sent"] is False
    assert client.generate_batch_response(["d"], mode="batch") == ["echo: d"]  # collected, not resubmitted
    assert server.stats()["batches"]["created"] == 2


def test_dedupe_sends_identical_prompts_once_and_answers_every_row(server: FakeServer, tmp_path: Path) -> None:
    df = pd.DataFrame({"prompt": ["same", "other", "same", "same"]})
    out = _generate(df, server, tmp_path / "run.ckpt")
    assert out["response"].tolist() == ["echo: same", "echo: other", "echo: same", "echo: same"]
    assert server.stats()["batches"]["rows"] == 2


def test_edited_rows_are_submitted_again_answered_ones_never(server: FakeServer, tmp_path: Path) -> None:
    df, ckpt = _frame(20), tmp_path / "run.ckpt"
    _generate(df, server, ckpt)
    edited = df.copy()
    edited.loc[3, "prompt"] = "row 3 edited"
    out = _generate(edited, server, ckpt)
    assert out["response"].tolist() == _echo(edited)
    records = read_batch_records(ckpt)
    assert [r["requests"] for r in records] == [20, 1]


def test_batch_prices_are_half_and_estimate_uses_them() -> None:
    assert batch_price_for("gpt-4o-mini") == tuple(p / 2 for p in price_for("gpt-4o-mini"))  # type: ignore[union-attr]
    assert batch_price_for("claude-3-haiku-20240307") == (0.125, 0.625)
    assert batch_price_for("my-model", {"my-model": (1.0, 3.0)}) == (0.5, 1.5)
    assert batch_price_for("unknown-model") is None
    df = _frame(100)
    realtime = df.genai.estimate(column="prompt", model_name="gpt-4o-mini", max_tokens=50)
    batched = df.genai.estimate(column="prompt", model_name="gpt-4o-mini", max_tokens=50, mode="batch")
    assert batched.max_cost_usd == pytest.approx(realtime.max_cost_usd / 2)  # type: ignore[operator]


def test_max_cost_applies_to_what_is_submitted(server: FakeServer, tmp_path: Path) -> None:
    df, ckpt = _frame(100), tmp_path / "run.ckpt"
    # Each row at batch prices: ~2 prompt tokens and 100 answer tokens of gpt-4o-mini: ~$0.00003.
    out = _generate(df, server, ckpt, max_tokens=100, max_cost=0.0006, details=True)
    submitted = server.stats()["batches"]["rows"]
    assert submitted == 19  # 0.0006 / ((2 x 0.075 + 100 x 0.30) / 1e6): at realtime prices it would be 9
    assert out["response"].notna().sum() == submitted
    assert set(out["error_type"].dropna()) == {"NotSentError"}
    assert len(read_checkpoint(ckpt)) == submitted  # the unsent rows are not stored: a later run sends them


def test_no_key_in_the_batch_records(server: FakeServer, tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    _generate(_frame(5), server, ckpt, provider="azure")
    for name in os.listdir(ckpt):
        assert FAKE_KEY.encode() not in (ckpt / name).read_bytes()


def test_a_lost_create_answer_is_found_at_the_provider_not_resubmitted(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create call reached the provider but its answer was lost (a crash, a dropped connection):
    the intent has no batch id; the next call finds the batch by the recorded file id and polls it."""
    df, ckpt = _frame(10), tmp_path / "run.ckpt"

    def lost(self: OpenAIBatches, response: Any) -> str:
        raise KeyboardInterrupt  # the process dies with the batch created

    with monkeypatch.context() as patch:
        patch.setattr(OpenAIBatches, "parse_created", lost)
        with pytest.raises(KeyboardInterrupt):
            _generate(df, server, ckpt)
    [intent] = read_batch_records(ckpt)
    assert intent["state"] == "intent" and intent["file_id"] and intent["batch_id"] is None
    out = _generate(df, server, ckpt)
    assert out["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 1 and set(server.stats()["per_prompt"].values()) == {1}


def test_an_intent_whose_batch_was_never_created_is_submitted(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    df, ckpt = _frame(10), tmp_path / "run.ckpt"

    def dies(self: OpenAIBatches, file_id: Any, lines: Any, tag: str) -> Any:
        raise KeyboardInterrupt  # after the upload, before the create call

    with monkeypatch.context() as patch:
        patch.setattr(OpenAIBatches, "create_request", dies)
        with pytest.raises(KeyboardInterrupt):
            _generate(df, server, ckpt)
    assert server.stats()["batches"]["created"] == 0
    out = _generate(df, server, ckpt)
    assert out["response"].tolist() == _echo(df)
    assert server.stats()["batches"]["created"] == 1
    assert [r["state"] for r in read_batch_records(ckpt)] == ["abandoned", "collected"]


def test_resume_false_forgets_the_recorded_batches(server: FakeServer, tmp_path: Path) -> None:
    df, ckpt = _frame(5), tmp_path / "run.ckpt"
    _generate(df, server, ckpt)
    _generate(df, server, ckpt, resume=False)
    assert server.stats()["batches"]["created"] == 2
    assert len(read_batch_records(ckpt)) == 1


def test_the_progress_bar_shows_the_batch_states(server: FakeServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from gen_ai_frames import runner

    shown: list[str | None] = []
    original = runner._Progress.show_status

    def record(self: Any, status: str | None) -> None:
        shown.append(status)
        original(self, status)

    monkeypatch.setattr(runner._Progress, "show_status", record)
    server.configure(batch_polls_per_state=2)
    _generate(_frame(5), server, tmp_path / "run.ckpt")
    states = " ".join(s for s in shown if s)
    assert "validating" in states and "in_progress" in states and "finalizing" in states
    assert "/5" in states and shown[-1] is None


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_a_batch_cancelled_at_the_provider_has_its_unanswered_rows_resubmitted(
    server: FakeServer, tmp_path: Path, provider: str
) -> None:
    import httpx

    from gen_ai_frames.providers.batches import batch_dialect

    df, ckpt = _frame(40), tmp_path / "run.ckpt"
    server.configure(batch_polls_per_state=2)
    _generate(df, server, ckpt, provider, wait=False)
    [record] = read_batch_records(ckpt)
    client = create_client(provider=provider, model_name=PROVIDERS[provider], api_key=FAKE_KEY,
                           endpoint=server.endpoint_for(provider))
    cancel = batch_dialect(client.provider).cancel_request(record["batch_id"])  # e.g. from the console
    assert httpx.request(cancel.method, cancel.url, headers=cancel.headers, content=cancel.body).status_code == 200

    out = _generate(df, server, ckpt, provider)
    assert out["response"].tolist() == _echo(df)
    first, second = read_batch_records(ckpt)
    assert first["outcome"] == "cancelled" and second["outcome"] == "completed"
    answered_first = len(server.app.batch_api.batches[record["batch_id"]].answers)
    assert second["requests"] == 40 - answered_first  # only the rows the cancelled batch left
    assert sum(server.stats()["batches"]["submitted"].values()) == 40 + second["requests"]


@pytest.mark.parametrize(("name", "value"), [("poll_interval", None), ("poll_interval", 0), ("wait", "no")])
def test_batch_options_are_checked(name: str, value: Any) -> None:
    from gen_ai_frames.options import RunOptions

    with pytest.raises(ConfigurationError, match=name):
        RunOptions(**{name: value})
