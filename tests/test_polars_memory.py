"""polars without needless copies: result columns keep the run's chunks and buffers, an all-null
column is polars' own, and chunked prompts from either library resume the other's checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pl = pytest.importorskip("polars")

import gen_ai_frames  # noqa: E402, F401  (registers df.genai for pandas and polars)
import gen_ai_frames.prompts as prompts_module  # noqa: E402
from gen_ai_frames import create_client  # noqa: E402
from gen_ai_frames.options import RunOptions  # noqa: E402
from gen_ai_frames.polars import output_dtypes, result_series  # noqa: E402
from gen_ai_frames.runner import RowResults  # noqa: E402

from .conftest import FAST_RETRY  # noqa: E402

NAMES = {"response": "response", "error": "error"}


def answers(chunks: int, rows: int = 50) -> pa.ChunkedArray:
    """Text answers in ``chunks`` chunks (the run's output windows), long enough to live in buffers
    (polars keeps strings of up to 12 bytes inside its views)."""
    return pa.chunked_array(
        [pa.array([f"echo: a long enough answer {c}-{i}" for i in range(rows)], pa.large_string())
         for c in range(chunks)]
    )


def test_result_columns_keep_the_runs_chunks_and_text_buffers() -> None:
    response = answers(4)
    errors = pa.chunked_array([pa.array(["boom" if i == 3 else None for i in range(50)], pa.large_string())] * 4)
    series = result_series(RowResults({"response": response, "error": errors}), RunOptions(), NAMES)
    out = {s.name: s for s in series}
    assert out["response"].to_list() == response.to_pylist()
    assert out["error"].to_list() == errors.to_pylist()
    assert {s.name: s.dtype for s in series} == output_dtypes(RunOptions())
    # No rechunk: one polars chunk per Arrow chunk, each reading the Arrow chunk's own text buffer.
    assert out["response"].n_chunks() == 4
    newest = pl.CompatLevel.newest()
    for chunk, source in zip(out["response"].get_chunks(), response.chunks):
        held = {b.address for b in chunk.to_arrow(compat_level=newest).buffers()[2:]}
        assert held == {source.buffers()[2].address}


def test_result_columns_hold_the_text_and_polars_views_only() -> None:
    """The run's text goes to polars as ``string_view`` over its own character buffers: once the
    run's results are let go of, Arrow holds the characters and one 16-byte view a row, no copy of
    the text and none of the run's offsets (8 bytes a row) or its all-null error column."""
    rows = 40_000
    before = pa.total_allocated_bytes()
    response = answers(4, rows // 4)
    errors = pa.chunked_array([pa.nulls(rows // 4, pa.large_string())] * 4)
    text = sum(chunk.buffers()[2].size for chunk in response.chunks)
    results = RowResults({"response": response, "error": errors})
    del response, errors
    series = result_series(results, RunOptions(), NAMES)
    del results
    held = pa.total_allocated_bytes() - before
    assert text + 16 * rows <= held <= text + 16 * rows + 64 * 1024
    assert [s.to_list()[-1] for s in series] == [f"echo: a long enough answer 3-{rows // 4 - 1}", None]


def test_an_all_null_column_is_a_typed_null_column() -> None:
    n = 70_000
    response = answers(2, n // 2)
    nothing = pa.chunked_array([pa.nulls(n // 2, pa.large_string())] * 2)
    run = RunOptions(details=True)
    arrays = {"response": response, "error": nothing}
    for name in ("error_type", "error_suggestion", "finish_reason"):
        arrays[name] = nothing
    for name, kind in (("status_code", pa.int64()), ("attempts", pa.int64()), ("prompt_tokens", pa.int64()),
                       ("completion_tokens", pa.int64()), ("latency_s", pa.float64()), ("logprob", pa.float64()),
                       ("cached", pa.bool_())):
        arrays[name] = pa.chunked_array([pa.nulls(n // 2, kind)] * 2)
    series = result_series(RowResults(arrays), run, {name: name for name in output_dtypes(run)})
    dtypes = output_dtypes(run)
    for s in series:
        assert s.dtype == dtypes[s.name] and len(s) == n
        if s.name != "response":
            assert s.null_count() == n, s.name
    # An empty run: no rows, still every column with its type.
    empty = result_series(
        RowResults({"response": pa.chunked_array([], pa.large_string()),
                    "error": pa.chunked_array([], pa.large_string())}), RunOptions(), NAMES)
    assert [(s.name, s.dtype, len(s)) for s in empty] == [("response", pl.String, 0), ("error", pl.String, 0)]


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


TEXTS = [f"question {i % 11}" for i in range(60)] + [None, "  ", "question 0", "\u3000", "last one"]


def chunked_polars() -> Any:
    """The prompts as a polars frame whose column has several chunks."""
    parts = [pl.DataFrame({"prompt": TEXTS[lo:lo + 13]}, schema={"prompt": pl.String})
             for lo in range(0, len(TEXTS), 13)]
    df = pl.concat(parts, rechunk=False)
    assert df.get_column("prompt").n_chunks() > 1
    return df


def chunked_pandas(tmp_path: Path) -> pd.DataFrame:
    """The prompts as a pandas frame read from a Parquet file of several row groups."""
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": pa.array(TEXTS, pa.large_string())}), path, row_group_size=9)
    df = pd.read_parquet(path)
    assert df["prompt"].array._pa_array.num_chunks > 1
    return df


@pytest.mark.parametrize("first", ["polars", "pandas"])
def test_chunked_prompts_resume_across_libraries_with_nothing_sent_again(
    first: str, client: Any, fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", 5)  # pieces inside the chunks, too
    frames = {"polars": chunked_polars(), "pandas": chunked_pandas(tmp_path)}
    second = "pandas" if first == "polars" else "polars"
    ckpt = tmp_path / "run.ckpt"
    frames[first].genai.generate("prompt", client=client, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] > 0
    fake_server.reset()
    out = frames[second].genai.generate("prompt", client=client, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] == 0
    responses = out["response"].to_list() if second == "polars" else [
        None if pd.isna(v) else v for v in out["response"]]
    assert responses == [None if t is None or not t.strip() else f"echo: {t}" for t in TEXTS]


def test_the_expression_namespace_over_a_chunked_column(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", 4)
    out = chunked_polars().with_columns(pl.col("prompt").genai.generate(client=client, progress=False).struct.unnest())
    assert out["response"].to_list() == [None if t is None or not t.strip() else f"echo: {t}" for t in TEXTS]
    assert out["error"].is_null().to_list() == [t is not None and bool(t.strip()) for t in TEXTS]
    assert out.schema["response"] == pl.String and out.schema["error"] == pl.String


# A run's result columns (400,000 rows in 16 windows, and an error column without a value) turned
# into polars columns, in a fresh process whose Arrow pool peak is then read (it is the process's
# peak: a test suite's earlier allocations would hide it).
_CONVERT_AND_PEAK = textwrap.dedent(
    """
    import json
    import pyarrow as pa
    from gen_ai_frames.options import RunOptions
    from gen_ai_frames.polars import result_series
    from gen_ai_frames.runner import RowResults

    rows, windows = 400_000, 16
    per = rows // windows
    response = pa.chunked_array(
        [pa.array([f"echo: a long enough answer {w}-{i}" for i in range(per)], pa.large_string())
         for w in range(windows)])
    error = pa.chunked_array([pa.nulls(per, pa.large_string()) for _ in range(windows)])
    held = pa.total_allocated_bytes()
    results = RowResults({"response": response, "error": error})
    del response, error
    series = result_series(results, RunOptions(), {"response": "response", "error": "error"})
    assert series[0].to_list()[-1] == f"echo: a long enough answer {windows - 1}-{per - 1}"
    print(json.dumps([held, pa.default_memory_pool().max_memory(), per]))
    """
)


def test_converting_the_columns_never_holds_the_offsets_and_all_the_views_at_once() -> None:
    """The error column without a value goes first, then the response's offsets (8 bytes a row)
    go chunk by chunk as polars' views (16 bytes a row) are made: the conversion's peak is what the
    run held plus about one window's views. Casting whole columns would add 16 bytes for every row
    (6.4 MB here); the error column taken last, 8."""
    done = subprocess.run([sys.executable, "-c", _CONVERT_AND_PEAK], capture_output=True, text=True,
                          timeout=120, check=True)
    held, peak, per_window = json.loads(done.stdout)
    assert peak - held < 2 * 16 * per_window, f"the conversion added {(peak - held) / 1e6:.1f} MB to {held / 1e6:.1f} MB"
