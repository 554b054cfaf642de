"""Structured output end to end: typed columns, validation and retries, classify, extract, the
client's parsed values, checkpoints and the CLI. The server answers from the schema it is sent."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import ConfigurationError, SchemaValidationError
from gen_ai_frames.checkpoint import CheckpointMismatchError
from gen_ai_frames.client import Client
from gen_ai_frames.testing.schema_answers import conforming_answer, violating_answer

from .conftest import chat_answer

Build = Callable[..., Client]


class SchemaServer:
    """An OpenAI-compatible handler that answers with JSON matching the request's schema.

    A prompt containing ``broken`` gets invalid JSON, ``violate`` a schema violation, each the first
    ``bad_times`` times it is asked; ``logprob`` is returned when the request asks for logprobs.
    """

    def __init__(self, bad_times: int = 1, logprob: float | None = -0.1) -> None:
        self.bad_times, self.logprob = bad_times, logprob
        self.asked: Counter[str] = Counter()
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
        self.asked[prompt] += 1
        schema = body["response_format"]["json_schema"]["schema"]
        bad = self.asked[prompt] <= self.bad_times
        if "broken" in prompt and bad:
            text = '{"oops": '
        elif "violate" in prompt and bad:
            text = json.dumps(violating_answer(schema, prompt))
        else:
            text = json.dumps(conforming_answer(schema, prompt))
        answer = chat_answer(text)
        if body.get("logprobs") and self.logprob is not None:
            answer["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": self.logprob},
                                                            {"token": "y", "logprob": self.logprob}]}
        return httpx.Response(200, json=answer)


ALL_KINDS = "name, age int, score float, ok bool, mood happy|sad|meh, tags list[str]"


def test_every_field_kind_becomes_a_typed_column_with_na_on_failed_rows(mock_client: Build) -> None:
    server = SchemaServer(bad_times=99)
    df = pd.DataFrame({"text": ["first", "second", "violate me", None]})
    out = df.genai.generate(column="text", client=mock_client(server), schema=ALL_KINDS, progress=False)
    assert str(out["age"].dtype) == "Int64" and str(out["score"].dtype) == "Float64"
    assert str(out["ok"].dtype) == "boolean" and str(out["name"].dtype) == "string"
    assert isinstance(out["mood"].dtype, pd.CategoricalDtype)
    assert out["mood"].cat.categories.tolist() == ["happy", "sad", "meh"]
    assert str(out["tags"].dtype) == "list<item: string>[pyarrow]"
    expected = conforming_answer(json.loads(json.dumps(server.bodies[0]["response_format"]["json_schema"]["schema"])),
                                 "first")
    assert out.loc[0, "age"] == expected["age"] == 5 and out.loc[0, "name"] == expected["name"]
    assert json.loads(out.loc[0, "response"]) == expected  # response keeps the raw JSON
    for row in (2, 3):  # a schema violation (after its retry) and a missing prompt
        assert out.loc[row, ["name", "age", "score", "ok", "mood", "tags"]].isna().all()
    assert out.loc[2, "error"].startswith("the answer does not match the schema: at 'name'")


def test_a_bad_answer_is_asked_again_with_its_mistake_and_the_retry_is_counted(mock_client: Build) -> None:
    server = SchemaServer(bad_times=1)
    df = pd.DataFrame({"text": ["broken once", "violate once"]})
    out = df.genai.generate(column="text", client=mock_client(server), schema="n int", details=True, progress=False)
    assert out["error"].isna().all() and out["n"].tolist() == [len("broken once"), len("violate once")]
    assert out["attempts"].tolist() == [2, 2] and out["prompt_tokens"].tolist() == [6, 6]  # both answers paid
    retry = next(b for b in server.bodies if len(b["messages"]) > 1)["messages"]
    assert retry[1]["role"] == "assistant" and retry[2]["role"] == "user"
    assert "does not match the required JSON schema" in retry[2]["content"]


@pytest.mark.parametrize(("retries", "requests"), [(0, 1), (1, 2), (3, 4)])
def test_schema_retries_bounds_the_asks_then_the_row_fails(mock_client: Build, retries: int, requests: int) -> None:
    server = SchemaServer(bad_times=99)
    out = pd.DataFrame({"text": ["broken always"]}).genai.generate(
        column="text", client=mock_client(server), schema="n int", schema_retries=retries, details=True,
        progress=False)
    assert len(server.bodies) == requests
    assert out.loc[0, "error_type"] == "SchemaValidationError" and "not valid JSON" in out.loc[0, "error"]
    assert out.loc[0, "attempts"] == requests and pd.isna(out.loc[0, "n"])


def test_classify_only_yields_labels_with_a_confidence(mock_client: Build) -> None:
    labels = ["positive", "negative", "mixed"]
    df = pd.DataFrame({"review": [f"review number {i}" for i in range(30)] + ["violate"]})
    out = df.genai.classify("review", labels=labels, client=mock_client(SchemaServer(bad_times=99)),
                            progress=False)
    assert out["label"].cat.categories.tolist() == labels
    assert set(out["label"].dropna()) <= set(labels) and out["label"].notna().sum() == 30
    assert pd.isna(out["label"].iloc[-1]) and out["error"].iloc[-1].startswith("the answer does not match")
    assert math.isclose(out["confidence"].iloc[0], math.exp(-0.2))
    assert pd.isna(out["confidence"].iloc[-1])


def test_classify_confidence_is_na_where_the_provider_gives_no_logprobs(mock_client: Build) -> None:
    out = pd.DataFrame({"review": ["a", "b"]}).genai.classify(
        "review", labels=["yes", "no"], client=mock_client(SchemaServer(logprob=None)), progress=False)
    assert out["label"].notna().all() and out["confidence"].isna().all()


def test_classify_multi_label_is_a_list_of_labels(mock_client: Build) -> None:
    out = pd.DataFrame({"review": ["a", "bb", "ccc"]}).genai.classify(
        "review", labels=["x", "y"], multi_label=True, client=mock_client(SchemaServer()), progress=False)
    assert all(set(value) <= {"x", "y"} and len(value) >= 1 for value in out["labels"])


@pytest.mark.parametrize(("labels", "message"), [([], "non-empty list"), ("a,b", "non-empty list"),
                                                  (["a", "a"], "must differ"), (["a", ""], "non-empty strings")])
def test_classify_bad_labels_fail_before_any_request(mock_client: Build, labels: Any, message: str) -> None:
    server = SchemaServer()
    with pytest.raises(ConfigurationError, match=message):
        pd.DataFrame({"t": ["a"]}).genai.classify("t", labels=labels, client=mock_client(server))
    assert server.bodies == []


def test_extract_fields_are_typed_and_their_descriptions_are_sent(mock_client: Build) -> None:
    server = SchemaServer()
    out = pd.DataFrame({"bio": ["Ada worked in 1843."]}).genai.extract(
        "bio", fields={"person": "the person described", "year": int, "topics": list[str]},
        client=mock_client(server), progress=False)
    assert str(out["person"].dtype) == "string" and str(out["year"].dtype) == "Int64"
    sent = server.bodies[0]["response_format"]["json_schema"]["schema"]["properties"]
    assert sent["person"]["description"] == "the person described"


def test_the_client_returns_model_instances_or_dicts_and_errors_per_row(mock_client: Build) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        n: int
        word: str

    client = mock_client(SchemaServer(bad_times=99))
    answers, errors = client.generate_batch_response(["one", "violate"], schema=Answer, return_error=True)
    assert isinstance(answers[0], Answer) and answers[0].n == 3 and answers[1] is None
    assert errors[0] is None and errors[1]["type"] == "SchemaValidationError"
    assert client.generate_batch_response(["one"], schema="n int") == [{"n": 3}]


def test_field_columns_follow_the_overwrite_rules_and_prefix(mock_client: Build) -> None:
    df = pd.DataFrame({"text": ["a"], "age": [1]})
    client = mock_client(SchemaServer())
    with pytest.raises(ConfigurationError, match=r"already has column\(s\) \['age'\].*prefix="):
        df.genai.generate(column="text", client=client, schema="age int")
    out = df.genai.generate(column="text", client=client, schema="age int", prefix="llm_", progress=False)
    assert out["age"].tolist() == [1] and out["llm_age"].tolist() == [1]
    with pytest.raises(ConfigurationError, match="has the name of a result column"):
        df.genai.generate(column="text", client=client, schema="error str")


def test_resume_restores_the_typed_columns_and_a_changed_schema_is_refused(mock_client: Build,
                                                                         tmp_path: Path) -> None:
    server = SchemaServer()
    client, ckpt = mock_client(server), tmp_path / "run.ckpt"
    df = pd.DataFrame({"text": ["a", "bb"]})
    first = df.genai.generate(column="text", client=client, schema=ALL_KINDS, checkpoint=ckpt, progress=False)
    asked = len(server.bodies)
    again = df.genai.generate(column="text", client=client, schema=ALL_KINDS, checkpoint=ckpt, progress=False)
    assert len(server.bodies) == asked
    pd.testing.assert_frame_equal(first, again)
    with pytest.raises(CheckpointMismatchError, match="schema"):
        df.genai.generate(column="text", client=client, schema="name, age float", checkpoint=ckpt, progress=False)


def test_a_bad_schema_fails_before_any_request(mock_client: Build) -> None:
    server = SchemaServer()
    df = pd.DataFrame({"t": ["a"]})
    for schema, message in [("name, age integer", "unknown type 'integer'"), ({"type": "string"}, "an object"),
                            (42, "pydantic model class"), ("", "must not be empty")]:
        with pytest.raises(ConfigurationError, match=message):
            df.genai.generate(column="t", client=mock_client(server), schema=schema)
    assert server.bodies == []


def test_schema_validation_error_is_a_request_error_with_a_suggestion() -> None:
    error = SchemaValidationError("the answer does not match the schema: at 'n': 'x' is not of type 'integer'")
    assert "schema_retries" in error.suggestion and error.to_dict()["type"] == "SchemaValidationError"


def test_cli_schema_writes_typed_columns(tmp_path: Path) -> None:
    from gen_ai_frames.cli import main
    from gen_ai_frames.testing.hostile import HostileServer, Reply, chat

    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    source.write_text("text\nfirst\nsecond\n")
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"},
                                                                        "mood": {"enum": ["x", "y"]}}}))
    script = {"first": Reply(json=chat('{"n": 1, "mood": "y"}')), "second": Reply(json=chat('{"n": "two"}'))}
    with HostileServer(script) as server:
        for schema in ("n int, mood x|y", str(schema_file)):
            code = main(["generate", str(source), "-o", str(target), "--column", "text", "--endpoint", server.url,
                         "--model", "m", "--no-progress", "--schema", schema, "--schema-retries", "0"])
            assert code == 1  # the second row breaks the schema
            table = pq.read_table(target)
            assert str(table.schema.field("n").type) == "int64"
            assert str(table.schema.field("mood").type) == "dictionary<values=string, indices=int32, ordered=0>"
            assert table.column("n").to_pylist() == [1, None] and table.column("mood").to_pylist() == ["y", None]
        sent = [json.loads(r.body)["response_format"]["json_schema"]["schema"] for r in server.requests]
        assert sent[0]["properties"]["mood"]["enum"] == ["x", "y"]


def test_cli_classify_writes_a_label_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen_ai_frames.cli import main
    from gen_ai_frames.testing.hostile import HostileServer, Reply, chat

    source, target = tmp_path / "in.csv", tmp_path / "out.parquet"
    source.write_text("review\ngood\nbad\n")
    script = {"good": Reply(json=chat('{"label": "positive"}')), "bad": Reply(json=chat('{"label": "negative"}'))}
    with HostileServer(script) as server:
        code = main(["classify", str(source), "-o", str(target), "--column", "review", "--labels",
                     "positive,negative", "--endpoint", server.url, "--model", "m", "--no-progress"])
        assert code == 0, capsys.readouterr().err
        body = json.loads(server.requests[0].body)
    table = pq.read_table(target)
    assert table.column("label").to_pylist() == ["positive", "negative"]
    assert table.column("confidence").to_pylist() == [None, None]  # chat() answers carry no logprobs
    assert body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == ["positive", "negative"]
    assert body["logprobs"] is True and "positive, negative" in body["messages"][0]["content"]


def test_dask_takes_the_same_schema_and_gives_the_same_typed_columns(tmp_path: Path) -> None:
    dd = pytest.importorskip("dask.dataframe")
    import gen_ai_frames.dask  # noqa: F401  (registers ddf.genai)
    from gen_ai_frames.testing.hostile import HostileServer, Reply, chat

    script = {f"row {i}": Reply(json=chat(json.dumps({"n": i, "mood": "x" if i % 2 else "y"}))) for i in range(4)}
    df = pd.DataFrame({"text": [f"row {i}" for i in range(4)]})
    with HostileServer(script) as server:
        lazy = dd.from_pandas(df, npartitions=2).genai.generate(
            column="text", endpoint=server.url, model_name="m", schema="n int, mood x|y",
            checkpoint=tmp_path / "run")
        assert str(lazy.dtypes["n"]) == "Int64" and isinstance(lazy.dtypes["mood"], pd.CategoricalDtype)
        out = lazy.compute(scheduler="sync")
    assert out["n"].tolist() == [0, 1, 2, 3] and out["mood"].tolist() == ["y", "x", "y", "x"]
    assert out["mood"].cat.categories.tolist() == ["x", "y"]


DOC = Path(__file__).resolve().parent.parent / "docs" / "structured-output.md"


def test_the_structured_output_doc_examples_run_against_the_fake_server(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from gen_ai_frames.testing import FakeServer

    examples = dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL))
    assert set(examples) == {"generate", "classify", "extract", "client"}
    first_block = re.search(r"```python\n(from pydantic import BaseModel.*?)```", DOC.read_text(), re.DOTALL)
    assert first_block is not None
    namespace: dict[str, Any] = {}
    with FakeServer() as server:
        exec(first_block.group(1), namespace)  # noqa: S102 - the doc's own code
        for name in ("generate", "classify", "extract", "client"):
            exec(examples[name].replace("https://api.example.com/v1", server.url), namespace)  # noqa: S102
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["category Int64", "['positive', 'negative', 'mixed']", "['string', 'Int64']",
                       "Review"]


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "gemini", "vllm"])
def test_classify_never_leaves_the_labels_against_a_server_that_breaks_answers(provider: str) -> None:
    from gen_ai_frames import create_client
    from gen_ai_frames.testing import FakeServer

    labels = ["red", "green", "blue"]
    df = pd.DataFrame({"text": [f"item {i}" for i in range(60)]})
    with FakeServer(schema_broken_rate=0.2, schema_violation_rate=0.2, seed=3) as server:
        client = create_client(provider=provider, endpoint=server.endpoint_for(provider), model_name="m",
                               api_key="k")
        out = df.genai.classify("text", labels=labels, client=client, schema_retries=0, progress=False)
        again = df.genai.classify("text", labels=labels, client=client, progress=False)  # one retry each
    assert out["label"].cat.categories.tolist() == labels and set(out["label"].dropna()) <= set(labels)
    if provider != "anthropic":  # a tool's input is always JSON: only violations there
        assert out["error"].str.contains("not valid JSON").sum() > 0
    assert out["label"].isna().sum() == out["error"].notna().sum() > 0
    assert again["error"].isna().all() and again["label"].notna().all()
