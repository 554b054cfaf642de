"""The gen-ai-frames command line, run in-process through ``main([...])`` (and twice as a real
subprocess) against the fake OpenAI-compatible server on a loopback port."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

import gen_ai_frames  # noqa: F401  (registers the accessor)
from gen_ai_frames import cli
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.cli import main
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.runner import DETAIL_COLUMNS
from gen_ai_frames.shards import ShardedCheckpoint

from .conftest import FAKE_KEY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the demo's default output lands in the cwd


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gen_args(server: Any, source: Path, target: Path, *extra: object) -> list[object]:
    return ["generate", source, "-o", target, "--endpoint", server.url, "--model", "m", "--no-progress", *extra]


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "prompt": [f"question {i}" for i in range(n)]})


def write(df: pd.DataFrame, path: Path, **options: Any) -> Path:
    name = path.name
    if name.endswith((".parquet", ".pq")):
        df.to_parquet(path, index=False, **options)
    elif name.endswith(".tsv"):
        df.to_csv(path, sep="\t", index=False)
    elif name.endswith((".csv", ".csv.gz")):
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


def read(path: Path) -> pd.DataFrame:
    name = path.name
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    if name.endswith(".tsv"):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    if name.endswith(".csv"):
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines()])


def assert_echoed(out: pd.DataFrame, prompts: list[str]) -> None:
    assert out["response"].tolist() == [f"echo: {p}" for p in prompts]
    assert out["error"].isna().all()


# ------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("source_name", ["in.csv", "in.tsv", "in.parquet", "in.jsonl"])
@pytest.mark.parametrize("target_name", ["out.parquet", "out.csv", "out.jsonl"])
def test_every_input_format_round_trips_to_every_output_format(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], source_name: str, target_name: str
) -> None:
    df = frame(12)
    source, target = write(df, tmp_path / source_name), tmp_path / target_name
    code, out, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 0, err
    assert out == ""
    result = read(target)
    assert list(result.columns) == ["id", "prompt", "response", "error"]
    assert result["id"].astype(int).tolist() == list(range(12))
    assert_echoed(result, df["prompt"].tolist())
    assert server.stats()["requests"] == 12
    assert "wrote 12 rows" in err and "12 answered, 0 failed" in err


@pytest.mark.parametrize("source_name, target_name",
                         [("in.pq", "out.ndjson"), ("in.ndjson", "out.pq"), ("in.csv.gz", "out.tsv")])
def test_extension_aliases_and_compressed_input(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                source_name: str, target_name: str) -> None:
    df = frame(5)
    source = tmp_path / source_name
    if source_name.endswith(".gz"):
        with gzip.open(source, "wt") as f:
            df.to_csv(f, index=False)
    else:
        write(df, source)
    target = tmp_path / target_name
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 0, err
    result = pd.read_csv(target, sep="\t") if target_name.endswith(".tsv") else (
        pd.read_parquet(target) if target_name.endswith(".pq") else pd.read_json(target, lines=True))
    assert_echoed(result, df["prompt"].tolist())


def test_template_builds_each_prompt_from_its_row(server: Any, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"city": ["Paris", "Oslo", "Lima"], "country": ["France", "Norway", "Peru"],
                       "rank": pd.array([1, None, 3], dtype="Int64")})
    source, target = write(df, tmp_path / "in.parquet"), tmp_path / "out.parquet"
    code, _, err = run(capsys, *gen_args(server, source, target,
                                         "--template", "Where is {city} ({country})? #{rank}"))
    assert code == 1, err  # the row whose {rank} is missing fails alone
    result = pd.read_parquet(target)
    assert result["response"].tolist()[::2] == ["echo: Where is Paris (France)? #1",
                                                "echo: Where is Lima (Peru)? #3"]
    assert result["response"].isna().tolist() == [False, True, False]
    assert "InvalidPromptError: 1" in err
    assert server.stats()["requests"] == 2


def test_details_adds_the_detail_columns(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": ["hello", "oops [[status=400]]"]})
    source, target = write(df, tmp_path / "in.csv"), tmp_path / "out.parquet"
    code, _, _ = run(capsys, *gen_args(server, source, target, "--column", "prompt", "--details"))
    assert code == 1
    result = pq.read_table(target).to_pydict()
    assert list(result) == ["prompt", "response", "error", *DETAIL_COLUMNS]
    assert result["error_type"] == [None, "BadRequestError"]
    assert result["status_code"] == [None, 400]
    assert result["finish_reason"][0] == "stop"
    assert result["attempts"] == [1, 1]


def test_failed_rows_give_exit_1_and_a_summary(server: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    prompts = ["fine", "bad one [[status=400]]", "also fine", "bad two [[status=400]]"]
    source, target = write(pd.DataFrame({"prompt": prompts}), tmp_path / "in.csv"), tmp_path / "out.csv"
    code, out, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 1
    assert out == ""
    assert "2 answered, 2 failed" in err
    assert "  BadRequestError: 2" in err
    assert "first failure, row 2: BadRequestError: HTTP 400" in err
    assert "suggestion: The provider rejected the request" in err
    assert "Traceback" not in err
    result = read(target)  # the output is still written, failures have their reason
    assert result["response"].fillna("-").tolist() == ["echo: fine", "-", "echo: also fine", "-"]
    assert result["error"].notna().tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    "extra, source_name, target_name, message",
    [
        (["--column", "nope"], "in.csv", "out.csv", "column 'nope' not found"),
        (["--template", "{nope}"], "in.csv", "out.csv", "column 'nope' not found"),
        (["--column", "prompt"], "in.xlsx", "out.csv", "unknown file type '.xlsx'"),
        (["--column", "prompt"], "in.csv", "out.txt", "unknown file type '.txt'"),
        (["--column", "prompt"], "missing.csv", "out.csv", "'missing.csv' does not exist"),
        (["--column", "prompt", "--temperature", "abc"], "in.csv", "out.csv", "invalid float value: 'abc'"),
        (["--column", "prompt", "--temperature", "5"], "in.csv", "out.csv", "temperature must be a number in [0, 2]"),
        (["--column", "prompt", "--batch-rows", "0"], "in.csv", "out.csv", "--batch-rows must be an integer >= 1"),
        (["--column", "prompt", "--no-resume"], "in.csv", "out.csv", "only apply with --checkpoint"),
        (["--column", "prompt", "--template", "{prompt}"], "in.csv", "out.csv", "not allowed with argument"),
        ([], "in.csv", "out.csv", "one of the arguments --column --template is required"),
    ],
    ids=["missing-column", "template-field", "input-extension", "output-extension", "missing-input",
         "temperature-text", "temperature-range", "batch-rows", "no-resume-alone", "column-and-template",
         "no-prompt"],
)
def test_usage_errors_exit_2_with_one_line_and_send_nothing(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], source_name: str,
    target_name: str, message: str,
) -> None:
    write(frame(3), tmp_path / "in.csv")
    source, target = Path(source_name), tmp_path / target_name
    if source_name == "in.xlsx":
        source.write_text("x")
    code, out, err = run(capsys, *gen_args(server, source, target, *extra))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gen-ai-frames: error: "), err
    assert message in err
    assert server.stats()["requests"] == 0
    assert not target.exists()


def test_a_missing_api_key_names_the_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(frame(2), tmp_path / "in.csv")
    # Not a loopback endpoint, so a key is needed; the check fails before any connection is made.
    code, _, err = run(capsys, "generate", source, "-o", tmp_path / "o.csv", "--column", "prompt",
                       "--endpoint", "https://llm.example.com/v1")
    assert code == 2
    assert err == ("gen-ai-frames: error: no API key for provider 'openai': set the OPENAI_API_KEY "
                   "environment variable\n")


def test_unreadable_input_and_output_clashes_exit_2(server: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    code, _, err = run(capsys, *gen_args(server, broken, tmp_path / "o.csv", "--column", "prompt"))
    assert code == 2 and "cannot read 'broken.parquet' as Parquet" in err.replace(str(tmp_path) + "/", "")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a"}\n[1, 2]\n')
    code, _, err = run(capsys, *gen_args(server, bad_json, tmp_path / "o.csv", "--column", "prompt"))
    assert code == 2 and "line 2 is not a JSON object" in err

    source = write(pd.DataFrame({"prompt": ["a"], "response": ["old"]}), tmp_path / "in.csv")
    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "o.csv", "--column", "prompt"))
    assert code == 2 and "already has column(s) ['response']" in err and "--response-column" in err
    code, _, err = run(capsys, *gen_args(server, source, source, "--column", "prompt"))
    assert code == 2 and "is the input file" in err
    assert server.stats()["requests"] == 0

    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "o.csv", "--column", "prompt",
                                         "--response-column", "answer"))
    assert code == 0, err
    assert read(tmp_path / "o.csv")["answer"].tolist() == ["echo: a"]


def test_csv_values_are_kept_as_written(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.csv"
    source.write_text('id,prompt,note\n007,"a, quoted ""prompt""",NA\n010,,\n')
    target = tmp_path / "out.csv"
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 1  # the empty prompt is missing
    assert "InvalidPromptError: 1" in err
    lines = target.read_text().splitlines()
    assert lines[0] == "id,prompt,note,response,error"
    assert lines[1] == '007,"a, quoted ""prompt""",NA,"echo: a, quoted ""prompt""",'
    assert lines[2].startswith("010,,,,the prompt is missing")


def test_jsonl_fields_may_come_and_go_and_change_type_between_batches(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": "p0", "n": 1, "tag": None},
            {"prompt": "p1", "n": 2.5},
            {"prompt": "p2", "tag": "x", "extra": [1, 2]},
            {"prompt": "p3", "n": None, "tag": 7}]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    target = tmp_path / "out.parquet"
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt", "--batch-rows", "1"))
    assert code == 0, err
    table = pq.read_table(target)
    assert table.column_names == ["prompt", "n", "tag", "response", "error"][:3] + ["extra", "response", "error"]
    assert table.column("n").to_pylist() == [1.0, 2.5, None, None]  # int and float -> float
    assert table.column("tag").to_pylist() == [None, None, "x", "7"]  # text and number -> text
    assert table.column("extra").to_pylist() == [None, None, [1, 2], None]
    assert table.column("response").to_pylist() == ["echo: p0", "echo: p1", "echo: p2", "echo: p3"]


def test_empty_input_writes_an_empty_output(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.csv"
    source.write_text("id,prompt\n")
    target = tmp_path / "out.parquet"
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 0, err
    table = pq.read_table(target)
    assert table.num_rows == 0 and table.column_names == ["id", "prompt", "response", "error"]


def test_small_batches_stream_in_order(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.configure(latency=0.002)
    df = frame(50)
    # Row groups of 6 rows: batches of 7 must not follow the file's row groups.
    source = write(df, tmp_path / "in.parquet", row_group_size=6)
    target = tmp_path / "out.parquet"
    code, _, err = run(capsys, "generate", source, "-o", target, "--column", "prompt", "--endpoint", server.url,
                       "--batch-rows", "7", "--max-concurrent", "8")
    assert code == 0, err
    metadata = pq.ParquetFile(target).metadata
    # One row group per batch: the output was written batch by batch.
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [7] * 7 + [1]
    assert_echoed(pd.read_parquet(target), df["prompt"].tolist())
    assert "batch 1/8: rows 1-7" in err and "batch 8/8: rows 50-50" in err  # progress on


def test_checkpoint_resume_sends_nothing_the_second_time(server: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    df = frame(23)
    source, target, ckpt = write(df, tmp_path / "in.csv"), tmp_path / "out.parquet", tmp_path / "run.ckpt"
    args = gen_args(server, source, target, "--column", "prompt", "--checkpoint", ckpt, "--batch-rows", "10",
                    "--chunk-size", "4")
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["batch-000001", "batch-000002", "batch-000003"]
    first = pd.read_parquet(target)
    assert server.stats()["requests"] == 23

    target.unlink()
    server.reset()
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert server.stats()["requests"] == 0
    assert "(23 from the checkpoint, 0 requests sent)" in err
    pd.testing.assert_frame_equal(pd.read_parquet(target), first)


def test_resume_continues_batch_by_batch(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, target = tmp_path / "run.ckpt", tmp_path / "out.csv"
    short = write(frame(10), tmp_path / "short.csv")  # as if a run over `long` died after 2 batches
    long_ = write(frame(20), tmp_path / "long.csv")
    options = ["--column", "prompt", "--checkpoint", ckpt, "--batch-rows", "5"]
    assert run(capsys, *gen_args(server, short, target, *options))[0] == 0
    server.reset()
    code, _, err = run(capsys, *gen_args(server, long_, target, *options))
    assert code == 0, err
    assert server.stats()["requests"] == 10  # batches 1-2 restored, 3-4 sent
    assert_echoed(read(target), frame(20)["prompt"].tolist())

    # Other batch boundaries would not match the stored batches: refused, before sending anything.
    server.reset()
    code, _, err = run(capsys, *gen_args(server, long_, target, "--column", "prompt", "--checkpoint", ckpt,
                                         "--batch-rows", "7"))
    assert code == 2 and "--batch-rows 5" in err and "--no-resume" in err
    # Another model would not give the stored answers: refused, in one line.
    code, _, err = run(capsys, *gen_args(server, long_, target, *options, "--model", "other"))
    assert code == 2 and err.count("\n") == 1
    assert "was written with other settings" in err and '"m" -> "other"' in err and "--no-resume" in err
    assert server.stats()["requests"] == 0
    # --no-resume starts over: every row is sent again.
    code, _, err = run(capsys, *gen_args(server, long_, target, "--column", "prompt", "--checkpoint", ckpt,
                                         "--batch-rows", "7", "--no-resume"))
    assert code == 0, err
    assert server.stats()["requests"] == 20


def test_retry_errors_resends_only_failed_rows(server: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": ["a", "b [[status=400]]", "c"]})
    source, target, ckpt = write(df, tmp_path / "in.csv"), tmp_path / "out.csv", tmp_path / "c"
    options = ["--column", "prompt", "--checkpoint", ckpt]
    assert run(capsys, *gen_args(server, source, target, *options))[0] == 1
    server.reset()
    assert run(capsys, *gen_args(server, source, target, *options, "--retry-errors"))[0] == 1
    assert server.stats()["per_prompt"] == {"b [[status=400]]": 1}


def test_status_sums_the_batches(server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = [f"q{i}" for i in range(9)] + ["bad [[status=400]]", ""]
    source, ckpt = write(pd.DataFrame({"prompt": prompts}), tmp_path / "in.parquet"), tmp_path / "run.ckpt"
    code, _, _ = run(capsys, *gen_args(server, source, tmp_path / "o.parquet", "--column", "prompt",
                                       "--checkpoint", ckpt, "--batch-rows", "4"))
    assert code == 1

    code, out, err = run(capsys, "status", ckpt)
    assert code == 0, err
    assert "batches:    3 of 3 (complete)" in out
    assert "input rows: 11" in out
    assert "answered:   9" in out
    assert "failed:     2" in out
    assert "remaining:  0" in out
    assert "  BadRequestError: 1" in out and "  InvalidPromptError: 1" in out
    assert "model:      m (openai, http://127.0.0.1:" in out

    code, out, _ = run(capsys, "status", ckpt, "--json")
    info = json.loads(out)
    assert (info["answered"], info["failed"], info["remaining"], info["input_rows"]) == (9, 2, 0, 11)
    assert info["errors_by_type"] == {"BadRequestError": 1, "InvalidPromptError": 1}

    # A run that stopped after batch 1 of 3: the rows of batches 2 and 3 remain.
    record = json.loads((ckpt / "run.json").read_text())
    (ckpt / "run.json").write_text(json.dumps({**record, "complete": False}))
    for name in ("batch-000002", "batch-000003"):
        for part in (ckpt / name).iterdir():
            part.unlink()
        (ckpt / name).rmdir()
    code, out, _ = run(capsys, "status", ckpt, "--json")
    info = json.loads(out)
    assert (info["answered"], info["failed"], info["remaining"], info["complete"]) == (4, 0, 7, False)


def test_status_after_a_resume_with_inserted_rows_counts_the_input(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "run.ckpt"
    options = ["--column", "prompt", "--checkpoint", ckpt, "--batch-rows", "10"]
    df = frame(30)
    assert run(capsys, *gen_args(server, write(df, tmp_path / "a.csv"), tmp_path / "o.csv", *options))[0] == 0
    # One row inserted at the top: every batch now starts one row earlier.
    longer = pd.concat([pd.DataFrame({"id": [-1], "prompt": ["new row"]}), df], ignore_index=True)
    source = write(longer, tmp_path / "b.csv")
    assert run(capsys, *gen_args(server, source, tmp_path / "o.csv", *options))[0] == 0

    code, out, _ = run(capsys, "status", ckpt, "--json")
    info = json.loads(out)
    # Each of batches 1-3 stores 11 answers (its 10 rows, and one that has moved to the next batch).
    assert info["stored"] == 11 + 11 + 11 + 1
    assert (info["answered"], info["failed"], info["remaining"], info["input_rows"]) == (31, 0, 0, 31)
    out = run(capsys, "status", ckpt)[1]
    assert "answered:   31" in out and "stored:     34" in out and "remaining:  0" in out

    # The same run killed before it finished any batch: the stored answers are counted, but never
    # more per batch than the batch has rows.
    for batch in ckpt.glob("batch-*"):
        (batch / "shard.json").unlink()
    info = json.loads(run(capsys, "status", ckpt, "--json")[1])
    assert info["answered"] == 31 and info["answered"] + info["failed"] + info["remaining"] == 31


def test_repair_command_makes_the_advice_work(server: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    source, target, ckpt = write(frame(12), tmp_path / "in.csv"), tmp_path / "out.csv", tmp_path / "run.ckpt"
    options = ["--column", "prompt", "--checkpoint", ckpt, "--batch-rows", "6", "--chunk-size", "3"]
    assert run(capsys, *gen_args(server, source, target, *options))[0] == 0
    bad = min((ckpt / "batch-000002").glob("part-*.parquet"))
    lost = pq.read_metadata(bad).num_rows
    bad.write_bytes(b"PAR1 not a parquet file")
    (ckpt / "batch-000001" / "manifest.json").unlink()

    code, _, err = run(capsys, "status", ckpt)
    assert code == 2 and "gen-ai-frames repair" in err
    server.reset()
    code, _, err = run(capsys, *gen_args(server, source, target, *options))
    assert code == 2 and "gen-ai-frames repair" in err and server.stats()["requests"] == 0

    code, out, err = run(capsys, "repair", ckpt)
    assert code == 0, err
    assert "rebuilt the manifest of batch-000001" in out and f"batch-000002/{bad.name}" in out
    code, _, err = run(capsys, *gen_args(server, source, target, *options))
    assert code == 0, err
    assert server.stats()["requests"] == lost  # only the rows of the dropped part were sent again
    assert_echoed(read(target), frame(12)["prompt"].tolist())
    code, out, _ = run(capsys, "repair", ckpt)
    assert code == 0 and "needed no repair" in out


def test_status_of_an_accessor_checkpoint_and_of_nothing(server: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": ["a", "b [[status=400]]"]})
    df.genai.generate(column="prompt", endpoint=server.url, model_name="m", checkpoint=tmp_path / "acc",
                      progress=False)
    code, out, _ = run(capsys, "status", tmp_path / "acc")
    assert code == 0
    assert "answered:   1" in out and "failed:     1" in out and "remaining:  unknown" in out

    code, out, err = run(capsys, "status", tmp_path / "nothing")
    assert code == 2 and out == ""
    assert err.strip() == f"gen-ai-frames: error: no checkpoint at '{tmp_path / 'nothing'}': the path does not exist"

    # The CLI keeps its batches apart from an accessor checkpoint rather than mixing the two.
    source = write(df, tmp_path / "in.csv")
    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "o.csv", "--column", "prompt",
                                         "--checkpoint", tmp_path / "acc"))
    assert code == 2 and "written by df.genai.generate" in err
    # ... and from a Dask run's partitions.
    ShardedCheckpoint.create(tmp_path / "dask", "partitions", {})
    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "o.csv", "--column", "prompt",
                                         "--checkpoint", tmp_path / "dask"))
    assert code == 2 and "holds a run split in partitions, not in batches" in err
    assert server.stats()["requests"] == 2


def test_a_bad_key_stops_the_run_without_output_or_printing_the_key(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server.configure(api_key="the-right-key")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    source, target = write(frame(30), tmp_path / "in.csv"), tmp_path / "out.csv"
    target.write_text("previous result\n")
    code, out, err = run(capsys, *gen_args(server, source, target, "--column", "prompt", "--batch-rows", "10"))
    assert code == 1
    assert "the run stopped early: AuthenticationError" in err and "no output written" in err
    assert FAKE_KEY not in out + err and "the-right-key" not in out + err
    assert target.read_text() == "previous result\n"  # untouched, and no partial file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.csv"]
    assert server.stats()["requests"] < 30  # stopped at the first batch

    monkeypatch.setenv("OPENAI_API_KEY", "the-right-key")
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 0, err


def test_demo_runs_against_an_openai_compatible_endpoint(server: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "demo", "--provider", "openai", "--endpoint", server.url, "--model", "m",
                         "--max-tokens", "200", "--no-progress")
    assert code == 0, err
    result = pd.read_parquet(tmp_path / cli.DEMO_OUTPUT)  # the default output, in the cwd
    sample = pd.read_csv(REPO / "gen_ai_frames" / "data" / "sample_reviews.csv")
    assert len(result) == len(sample) >= 15
    # The fake server answers the demo's structured request with a label from the schema's enum.
    assert result["label"].notna().all() and set(result["label"]) <= set(cli.DEMO_LABELS)
    assert result["label"].cat.categories.tolist() == list(cli.DEMO_LABELS)
    assert "Great sound for the price" in out and f"{len(sample)} rows in {cli.DEMO_OUTPUT}" in out


def test_demo_without_the_local_model_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for error in (ImportError("No module named 'llama_cpp'"), ConfigurationError("unknown provider 'local'")):
        def unavailable(**options: Any) -> Any:
            assert options["provider"] == "local"
            raise error

        monkeypatch.setattr(cli, "create_client", unavailable)
        code, out, err = run(capsys, "demo", "-o", tmp_path / "d.parquet")
        assert code == 2 and out == ""
        assert err.count("\n") == 1
        assert 'pip install -e ".[local]"' in err and str(error) in err
        assert not (tmp_path / "d.parquet").exists()


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    for option in ("--column", "--template", "--checkpoint", "--batch-rows", "--no-resume", "--retry-errors",
                   "--details", "OPENAI_API_KEY"):
        assert option in out
    assert "--api-key" not in out.replace("no --api-key option", "")
    assert run(capsys, "--version")[:2] == (0, f"gen-ai-frames {gen_ai_frames.__version__}\n")


# ------------------------------------------------------------------------------------ subprocess


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_python_m_gen_ai_frames_help() -> None:
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: gen-ai-frames ")
    assert "generate" in done.stdout and "status" in done.stdout and "demo" in done.stdout


def test_python_m_gen_ai_frames_generate_in_a_subprocess(server: Any, tmp_path: Path) -> None:
    prompts = ["one", "two [[status=400]]", "three"]
    source, target = write(pd.DataFrame({"prompt": prompts}), tmp_path / "in.jsonl"), tmp_path / "out.parquet"
    done = subprocess.run(
        [sys.executable, "-m", "gen_ai_frames", "generate", str(source), "-o", str(target), "--column", "prompt",
         "--endpoint", server.url, "--model", "m", "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "BadRequestError: 1" in done.stderr and "Traceback" not in done.stderr
    assert pq.read_table(target).column("response").to_pylist() == ["echo: one", None, "echo: three"]


def test_sigterm_saves_what_was_received_and_exits_143(server: Any, tmp_path: Path) -> None:
    """A scheduler stopping the job (SIGTERM) is a Ctrl-C: answers saved, lock released, no partial file."""
    server.configure(latency=0.05)
    rows, in_flight = 400, 8
    source, target, ckpt = write(frame(rows), tmp_path / "in.csv"), tmp_path / "out.csv", tmp_path / "r.ckpt"
    command = [sys.executable, "-m", "gen_ai_frames", "generate", str(source), "-o", str(target), "--column",
               "prompt", "--endpoint", server.url, "--model", "m", "--no-progress", "--checkpoint", str(ckpt),
               "--max-concurrent", str(in_flight), "--chunk-size", "1000"]  # one chunk: nothing saved early
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 60
    while server.stats()["requests"] < 80:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never started sending"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == cli.EXIT_TERMINATED == 143, err
    assert "terminated (SIGTERM)" in err and f"saved in {ckpt}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "r.ckpt"]  # no output, no .partial

    sent = server.stats()["requests"]
    stored = read_checkpoint(ckpt)
    assert stored["error"].isna().all()
    assert sent - in_flight <= len(stored) <= sent  # every answer received was saved
    server.reset()
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr  # the lock was released
    assert server.stats()["requests"] == rows - len(stored)
    assert_echoed(read(target), frame(rows)["prompt"].tolist())


# CSV/TSV: no implicit index column (issue 13) --------------------------------------------------
@pytest.mark.parametrize(("text", "line", "saw"), [
    ("prompt,id\nWhat is 2+2?,1,\nWhat is 3+3?,2,\n", 2, 3),   # every data row ends with a comma
    ("prompt,id\nWhat is 2+2?,1,extra\nWhat is 3+3?,2\n", 2, 3),  # only the first data row is longer
    ("prompt,id\nWhat is 2+2?,1\nWhat is 3+3?,2,,\n", 3, 4),   # a later row is longer
])
def test_a_csv_row_longer_than_the_header_is_refused_naming_the_line(
    server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, saw: int
) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_text(text)
    # One row per batch: the line named is the file's, not the batch's.
    code, out, err = run(capsys, *gen_args(server, source, target, "--column", "prompt", "--batch-rows", "1"))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gen-ai-frames: error: "), err
    assert f"line {line} has {saw} fields but the header has 2" in err
    assert server.stats()["requests"] == 0 and not target.exists()


def test_a_tsv_row_longer_than_the_header_is_refused(server: Any, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.tsv"
    source.write_text("prompt\tid\nhello\t1\t\n")
    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "out.tsv", "--column", "prompt"))
    assert code == 2 and "line 2 has 3 fields but the header has 2" in err
    assert server.stats()["requests"] == 0


def test_a_header_ending_with_a_comma_drops_its_empty_column(server: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_text("prompt,id,\nWhat is 2+2?,1,\nWhat is 3+3?,2,\n")
    code, _, err = run(capsys, *gen_args(server, source, target, "--column", "prompt"))
    assert code == 0, err
    assert target.read_text().splitlines() == [
        "prompt,id,response,error",
        "What is 2+2?,1,echo: What is 2+2?,",
        "What is 3+3?,2,echo: What is 3+3?,",
    ]


def test_a_value_under_an_unnamed_last_column_is_refused(server: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.csv"
    source.write_text("prompt,id,\nWhat is 2+2?,1,\nWhat is 3+3?,2,oops\n")
    code, _, err = run(capsys, *gen_args(server, source, tmp_path / "out.csv", "--column", "prompt",
                                         "--batch-rows", "1"))
    assert code == 2 and "data row 2 has a value in the last column, whose name in the header is empty" in err
    assert server.stats()["requests"] == 0


def test_a_trailing_comma_csv_in_a_real_subprocess(server: Any, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("prompt,id\nWhat is 2+2?,1,\n")
    args = gen_args(server, source, tmp_path / "out.csv", "--column", "prompt")
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "line 2 has 3 fields but the header has 2: remove the extra field(s) (often a separator at the end "
        "of the line) or name the extra column(s) in the header; nothing was sent")
    assert server.stats()["requests"] == 0
