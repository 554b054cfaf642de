"""polars: typed columns, the expression namespace, lazy frames in batches, and checkpoints shared
with pandas. The behaviour tests shared with pandas are in test_accessor.py (the ``lib`` fixture)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pl = pytest.importorskip("polars")

import gen_ai_frames  # noqa: E402, F401  (registers df.genai for pandas and polars)
from gen_ai_frames import ConfigurationError, create_client  # noqa: E402
from gen_ai_frames.checkpoint import read_checkpoint  # noqa: E402
from gen_ai_frames.polars import generate  # noqa: E402
from gen_ai_frames.runner import DETAIL_COLUMNS  # noqa: E402

from .conftest import FAST_RETRY  # noqa: E402

ALL_KINDS = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "mood": {"type": "string", "enum": ["happy", "sad", "meh"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "moods": {"type": "array", "items": {"type": "string", "enum": ["up", "down"]}},
        "place": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "floor": {"type": "integer"}},
            "required": ["city", "floor"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "ok", "mood", "tags", "moods", "place"],
    "additionalProperties": False,
}


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def reviews(n: int = 6) -> dict[str, list[Any]]:
    return {"review": [f"review number {i}" for i in range(n)], "product": [f"p{i % 3}" for i in range(n)]}


# ------------------------------------------------------------------------------------------ typed columns


def test_schema_fields_are_typed_polars_columns_with_the_values_pandas_gets(client: Any) -> None:
    data = {"text": ["first text", None, "third one"]}
    out = pl.DataFrame(data).genai.generate("text", client=client, schema=ALL_KINDS, progress=False)
    assert out.schema == pl.Schema({
        "text": pl.String, "response": pl.String, "error": pl.String, "name": pl.String, "age": pl.Int64,
        "score": pl.Float64, "ok": pl.Boolean, "mood": pl.Enum(["happy", "sad", "meh"]),
        "tags": pl.List(pl.String), "moods": pl.List(pl.Enum(["up", "down"])),
        "place": pl.Struct({"city": pl.String, "floor": pl.Int64}),
    })
    assert out.row(1, named=True)["age"] is None and out["error"][1] is not None  # the missing prompt
    expected = pd.DataFrame(data).genai.generate("text", client=client, schema=ALL_KINDS, progress=False)
    for name in ["name", "age", "score", "ok", "mood"]:
        assert out[name].to_list() == [None if pd.isna(v) else v for v in expected[name]], name
    for name in ["tags", "moods", "place"]:
        assert out[name].to_list() == expected[name].array._pa_array.to_pylist(), name


def test_classify_labels_are_an_enum_of_exactly_the_labels_with_a_confidence(client: Any) -> None:
    labels = ["positive", "negative", "mixed"]
    out = pl.DataFrame(reviews()).genai.classify("review", labels=labels, client=client, progress=False)
    assert out.schema["label"] == pl.Enum(labels) and out.schema["confidence"] == pl.Float64
    assert out["label"].null_count() == 0 and set(out["label"].to_list()) <= set(labels)
    assert all(0 < c <= 1 for c in out["confidence"].to_list())
    multi = pl.DataFrame(reviews()).genai.classify("review", labels=["x", "y"], multi_label=True,
                                                   client=client, progress=False)
    assert multi.schema["labels"] == pl.List(pl.Enum(["x", "y"]))


def test_extract_fields_are_typed(client: Any) -> None:
    out = pl.DataFrame({"bio": ["Ada, 36"]}).genai.extract("bio", fields={"who": "the name", "year": int},
                                                             client=client, progress=False)
    assert out.schema["who"] == pl.String and out.schema["year"] == pl.Int64 and out["error"][0] is None


def test_values_that_are_not_text_fail_only_their_rows(client: Any, fake_server: Any) -> None:
    out = pl.DataFrame({"prompt": [7, None, 9]}).genai.generate("prompt", client=client, progress=False)
    assert out["response"].to_list() == [None] * 3
    assert out["error"].to_list() == ["the prompt is int 7, not text", "the prompt is missing (None or NaN)",
                                      "the prompt is int 9, not text"]
    texts = pl.DataFrame({"prompt": ["fine", "  ", None]}).genai.generate("prompt", client=client, progress=False)
    assert texts["error"].to_list() == [None, "the prompt is empty or only whitespace",
                                         "the prompt is missing (None or NaN)"]
    assert fake_server.stats()["requests"] == 1


def test_estimate_is_the_same_as_pandas() -> None:
    data = {"q": ["What is 2 + 2?", "Name a colour.", "What is 2 + 2?", None]}
    options = {"model_name": "gpt-4o-mini", "max_tokens": 10, "system_prompt": "Be brief."}
    assert pl.DataFrame(data).genai.estimate("q", **options) == pd.DataFrame(data).genai.estimate("q", **options)


# ------------------------------------------------------------------------------------------ expressions


def test_expression_namespace_inside_with_columns(client: Any, fake_server: Any) -> None:
    df = pl.DataFrame(reviews())
    out = df.with_columns(pl.col("review").genai.generate(client=client, progress=False).struct.unnest())
    assert out.columns == ["review", "product", "response", "error"]
    assert out["response"].to_list() == [f"echo: review number {i}" for i in range(6)]
    assert out["error"].to_list() == [None] * 6 and out.schema["response"] == pl.String
    assert fake_server.stats()["requests"] == 6

    answer = df.select(pl.col("review").genai.generate(client=client, progress=False,
                                                       max_tokens=7).struct.field("response").alias("a"))
    assert answer["a"].to_list() == out["response"].to_list()


def test_expression_struct_keeps_errors_details_and_typed_fields(client: Any) -> None:
    df = pl.DataFrame({"review": ["fine", None, "[[status=400]] bad"]})
    expr = pl.col("review").genai.generate(client=client, progress=False, details=True)
    out = df.with_columns(expr)
    assert out.columns == ["review", "response"]  # one struct column, named response_column
    spread = out.unnest("response")
    assert spread.columns == ["review", "response", "error", *DETAIL_COLUMNS]
    assert spread["error_type"].to_list() == [None, "InvalidPromptError", "BadRequestError"]
    typed = df.with_columns(pl.col("review").genai.classify(labels=["a", "b"], client=client,
                                                            progress=False).struct.unnest())
    assert typed.schema["label"] == pl.Enum(["a", "b"]) and typed.schema["confidence"] == pl.Float64


def test_template_form_over_several_columns(client: Any) -> None:
    df = pl.DataFrame({"city": ["Paris", None, "Rome"], "country": ["France", "Spain", "Italy"]})
    template = "Is {city} in {country}?"
    by_function = df.with_columns(generate(template, client=client, progress=False).struct.unnest())
    by_struct = df.with_columns(
        pl.struct("city", "country").genai.generate(template=template, client=client, progress=False)
        .struct.unnest()
    )
    from polars.testing import assert_frame_equal

    assert_frame_equal(by_function, by_struct)
    assert by_function["response"].to_list() == ["echo: Is Paris in France?", None, "echo: Is Rome in Italy?"]
    assert by_function["error"][1] == "template field(s) ['city'] are missing in this row"
    one = df.with_columns(pl.col("country").genai.generate(template="Capital of {country}?", client=client,
                                                           progress=False).struct.field("response"))
    assert one["response"][0] == "echo: Capital of France?"


def test_expression_checks_options_and_template_when_built(client: Any, fake_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'max_tokens'"):
        pl.col("review").genai.generate(client=client, max_token=5)
    with pytest.raises(ConfigurationError, match="no {column} field"):
        pl.struct("a").genai.generate(template="no fields", client=client)
    with pytest.raises(ConfigurationError, match="column 'nope' not found"):
        pl.DataFrame({"a": ["x"]}).with_columns(
            pl.struct("a").genai.generate(template="{nope}", client=client, progress=False))
    assert fake_server.stats()["requests"] == 0


def test_expression_resumes_from_its_checkpoint(client: Any, fake_server: Any, tmp_path: Path) -> None:
    df = pl.DataFrame(reviews(30))
    expr = pl.col("review").genai.generate(client=client, checkpoint=tmp_path / "c", progress=False)
    first = df.with_columns(expr.struct.unnest())
    fake_server.reset()
    again = df.with_columns(expr.struct.unnest())
    assert fake_server.stats()["requests"] == 0 and first.equals(again)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("first_library", ["pandas", "polars"])
def test_a_checkpoint_resumes_across_libraries(first_library: str, client: Any, fake_server: Any,
                                               tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    data = {"prompt": [f"q{i}" for i in range(40)] + [None, "q0", "[[status=400]] x"]}
    frames = {"pandas": pd.DataFrame(data), "polars": pl.DataFrame(data)}
    second_library = "polars" if first_library == "pandas" else "pandas"
    # The first run stops half way (20 rows), as a crash would.
    half = frames[first_library].head(20)
    half.genai.generate("prompt", client=client, checkpoint=ckpt, details=True, progress=False)
    fake_server.reset()
    out = frames[second_library].genai.generate("prompt", client=client, checkpoint=ckpt, details=True,
                                                progress=False)
    # Rows are matched by (prompt, occurrence): the second "q0" is a row the first run never had.
    assert sorted(fake_server.stats()["per_prompt"]) == sorted(
        [f"q{i}" for i in range(20, 40)] + ["q0", "[[status=400]] x"])
    responses = out["response"].to_list() if second_library == "polars" else [
        None if pd.isna(v) else v for v in out["response"]]
    assert responses == [f"echo: q{i}" for i in range(40)] + [None, "echo: q0", None]
    fake_server.reset()
    frames[first_library].genai.generate("prompt", client=client, checkpoint=ckpt, details=True, progress=False)
    assert fake_server.stats()["requests"] == 0  # and back again
    assert len(read_checkpoint(ckpt)) == 42  # the missing prompt is never stored


# ------------------------------------------------------------------------------------------ lazy frames


def test_lazy_scan_of_a_parquet_file_in_batches(client: Any, fake_server: Any, tmp_path: Path) -> None:
    rows, batch = 5000, 700
    prompts = [None if i % 97 == 0 else f"row {i}" for i in range(rows)]
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "run.ckpt"
    pl.DataFrame({"prompt": prompts, "n": range(rows)}).write_parquet(source, row_group_size=333)
    lf = pl.scan_parquet(source)

    # A first run over the first 2000 rows only: the batches it finished resume below.
    lf.head(2000).genai.generate("prompt", client=client, batch_rows=batch, checkpoint=ckpt, progress=False)
    fake_server.reset()
    result = lf.genai.generate("prompt", client=client, batch_rows=batch, checkpoint=ckpt, output=target,
                               progress=False)
    assert isinstance(result, pl.LazyFrame)
    out = result.collect()
    assert out.columns == ["prompt", "n", "response", "error"] and out["n"].to_list() == list(range(rows))
    assert out["response"].to_list() == [None if p is None else "echo: " + p for p in prompts]
    assert out["error"].null_count() == rows - prompts.count(None)
    sent = fake_server.stats()["per_prompt"]
    # Batch 3 (rows 1400-2099) held rows 1400-1999 in the first run: they are restored, not resent.
    assert sorted(sent) == sorted(p for p in prompts[2000:] if p is not None)
    assert sorted(p.name for p in ckpt.glob("batch-*")) == [f"batch-{i:06d}" for i in range(1, 9)]
    assert pl.read_parquet(target).height == rows

    fake_server.reset()
    in_memory = lf.genai.generate("prompt", client=client, batch_rows=batch, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] == 0 and in_memory.collect().equals(out)
    from gen_ai_frames.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="resume=False"):  # batches are matched by number
        lf.genai.generate("prompt", client=client, batch_rows=batch + 1, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_lazy_output_keeps_typed_columns_and_checks_before_sending(client: Any, fake_server: Any,
                                                                  tmp_path: Path) -> None:
    source = tmp_path / "in.parquet"
    pl.DataFrame(reviews(10)).write_parquet(source)
    lf = pl.scan_parquet(source)
    out = lf.genai.generate("review", client=client, schema="mood happy|sad, n int", batch_rows=4,
                            output=tmp_path / "out.parquet", progress=False).collect()
    assert out.schema["mood"] == pl.Enum(["happy", "sad"]) and out.schema["n"] == pl.Int64
    assert out["mood"].null_count() == 0
    fake_server.reset()
    with pytest.raises(ConfigurationError, match="column 'nope' not found"):
        lf.genai.generate("nope", client=client)
    with pytest.raises(ConfigurationError, match="batch_rows"):
        lf.genai.generate("review", client=client, batch_rows=0)
    with pytest.raises(ConfigurationError, match="overwrite=True"):
        lf.genai.generate("review", client=client, response_column="product")
    assert fake_server.stats()["requests"] == 0
    empty = lf.filter(pl.col("review") == "none").genai.generate("review", client=client,
                                                                 output=tmp_path / "e.parquet")
    assert empty.collect().columns == ["review", "product", "response", "error"]


# ------------------------------------------------------------------------------------------ import


def test_importing_the_package_does_not_import_polars_and_registers_once_it_is(tmp_path: Path) -> None:
    code = (
        "import sys, gen_ai_frames\n"
        "assert 'polars' not in sys.modules\n"
        "import polars as pl\n"
        "assert hasattr(pl.DataFrame, 'genai') and hasattr(pl.LazyFrame, 'genai')\n"
        "assert hasattr(pl.col('x'), 'genai')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_the_package_imports_without_polars(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['polars'] = None  # as if polars were not installed\n"
        "import pandas as pd, gen_ai_frames\n"
        "assert hasattr(pd.DataFrame, 'genai')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_the_key_never_appears_in_a_polars_error(fake_server: Any) -> None:
    fake_server.configure(api_key="the-right-key")
    bad = create_client(endpoint=fake_server.url, model_name="m", api_key="sk-wrong-SECRET-123")
    from gen_ai_frames import AuthenticationError

    with pytest.raises(AuthenticationError) as caught:
        pl.DataFrame({"q": ["a"]}).with_columns(pl.col("q").genai.generate(client=bad, progress=False))
    assert "SECRET" not in str(caught.value)


# ------------------------------------------------------------------------------------------ docs


def test_the_examples_of_docs_polars_run(client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    page = Path(__file__).resolve().parent.parent / "docs" / "polars.md"
    blocks = re.findall(r"<!-- example: polars -->\n```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"client": client}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_plan_on_a_polars_frame_matches_pandas_and_keeps_its_sample(fake_server: Any, tmp_path: Path) -> None:
    client = create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)
    rows = {"topic": ["cats", "dogs", "", None, "cats", "owls"]}
    template = "Tell me about {topic}"
    plans = {}
    for name, df in {"pandas": pd.DataFrame(rows), "polars": pl.DataFrame(rows)}.items():
        plans[name] = df.genai.plan(template=template, client=client, sample=0)
    assert fake_server.stats()["requests"] == 0
    keys = ("rows", "invalid_rows", "duplicate_rows", "requests", "examples", "warnings")
    assert {k: getattr(plans["polars"], k) for k in keys} == {k: getattr(plans["pandas"], k) for k in keys}
    assert any("topic" in warning for warning in plans["polars"].warnings)  # empty in 2 of 6 rows

    df = pl.DataFrame(rows)
    plan = df.genai.plan(template=template, client=client, sample=2, checkpoint=tmp_path / "c")
    assert fake_server.stats()["requests"] == 2 and plan.sample_kept
    df.genai.generate(template=template, client=client, checkpoint=tmp_path / "c", progress=False)
    # the sample's 2 answers were kept: the run sent only the rest of the plan's requests
    assert fake_server.stats()["requests"] == plans["polars"].requests
