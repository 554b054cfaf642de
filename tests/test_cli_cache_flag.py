"""``--cache`` on the command line: alone it means the default place, before INPUT as after it.

``--cache`` takes an optional value, so argparse hands it the next word: these tests run the real
CLI (``main([...])``, and once a subprocess) against the fake server on loopback and check which
file was read as INPUT, which cache file got the answers, and that nothing is sent when the line
is ambiguous.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames.cache import CACHE_ENV, ResponseCache
from gen_ai_frames.cli import build_parser, main
from gen_ai_frames.testing import FakeServer

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["alpha", "beta", "gamma"]


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default cache lands under tmp_path, and no cache variable of the developer's applies."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "in.csv"
    pd.DataFrame({"q": PROMPTS}).to_csv(path, index=False)
    return path


def default_cache(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "gen-ai-frames" / "responses.sqlite3"


def entries(path: Path) -> int:
    with ResponseCache(path) as cache:
        return int(cache.info()["entries"])


def sent(server: FakeServer) -> int:
    return int(server.stats()["requests"])


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def model(server: FakeServer) -> list[str]:
    return ["--column", "q", "--endpoint", server.url, "--model", "m", "--no-progress"]


def answers(path: Path) -> list[str]:
    return pd.read_parquet(path)["response"].tolist()


# ------------------------------------------------------------------------------------ bare --cache


def test_bare_cache_before_input_reads_input_and_uses_the_default_cache(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.parquet"
    code, err = cli(capsys, "generate", "--cache", source, "-o", out, *model(server))
    assert code == 0, err
    assert answers(out) == [f"echo: {p}" for p in PROMPTS]
    assert sent(server) == 3
    assert entries(default_cache(tmp_path)) == 3
    assert pd.read_csv(source)["q"].tolist() == PROMPTS  # INPUT was read, never opened as a cache

    # The other order uses the same default cache: every answer comes from it, nothing is sent.
    again = tmp_path / "again.parquet"
    code, err = cli(capsys, "generate", source, "--cache", "-o", again, *model(server))
    assert code == 0, err
    assert sent(server) == 3 and "3 rows from the response cache" in err
    assert answers(again) == answers(out)


def test_bare_cache_before_input_as_the_last_word_before_it_and_in_a_subprocess(
    server: FakeServer, source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.parquet"
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "gen_ai_frames", "generate", "-o", str(out), *model(server),
         "--cache", str(source)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert answers(out) == [f"echo: {p}" for p in PROMPTS]
    assert entries(default_cache(tmp_path)) == 3


def test_plan_takes_a_bare_cache_before_input(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plan", "--cache", str(source), *model(server), "--sample", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 rows" in captured.out
    assert sent(server) == 1 and entries(default_cache(tmp_path)) == 1  # the sample's answer is kept


def test_plan_with_a_cache_and_no_checkpoint_keeps_the_sample_in_the_cache(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sample's answers go to the cache alone: there is no checkpoint to prepare (this crashed)."""
    db = tmp_path / "plan.sqlite3"
    code = main(["plan", str(source), f"--cache={db}", *model(server), "--sample", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert sent(server) == 2 and entries(db) == 2
    code, err = cli(capsys, "generate", source, "-o", tmp_path / "o.parquet", f"--cache={db}", *model(server))
    assert code == 0, err
    assert sent(server) == 3 and "2 rows from the response cache" in err  # the sample was not paid twice


def test_classify_parses_a_bare_cache_before_input() -> None:
    args = build_parser().parse_args(
        ["classify", "--cache", "reviews.jsonl.gz", "-o", "o.csv", "--column", "q", "--labels", "a,b"]
    )
    assert (args.input, args.cache) == ("reviews.jsonl.gz", True)


# ------------------------------------------------------------------------------------ explicit paths


@pytest.mark.parametrize(
    "placement",
    [
        pytest.param(lambda db, src: [f"--cache={db}", src], id="--cache=PATH before INPUT"),
        pytest.param(lambda db, src: ["--cache", db, src], id="--cache PATH before INPUT"),
        pytest.param(lambda db, src: [src, "--cache", db], id="--cache PATH after INPUT"),
        pytest.param(lambda db, src: [src, f"--cache={db}"], id="--cache=PATH after INPUT"),
    ],
)
def test_an_explicit_cache_path_still_works(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], placement: Any
) -> None:
    db = tmp_path / "mine.sqlite3"
    out = tmp_path / "out.parquet"
    code, err = cli(capsys, "generate", *placement(db, source), "-o", out, *model(server))
    assert code == 0, err
    assert answers(out) == [f"echo: {p}" for p in PROMPTS]
    assert entries(db) == 3
    assert not default_cache(tmp_path).exists()


def test_cache_off_before_input_turns_the_variable_off(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CACHE_ENV, "1")
    code, err = cli(capsys, "generate", "--cache", "off", source, "-o", tmp_path / "o.pq", *model(server))
    assert code == 0, err
    assert sent(server) == 3 and not default_cache(tmp_path).exists()


# ------------------------------------------------------------------------------------ unclear lines


def test_a_cache_word_that_looks_like_an_input_next_to_input_is_refused(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.csv"
    other.write_text("q\nx\n")
    code, err = cli(capsys, "generate", "--cache", other, source, "-o", tmp_path / "o.pq", *model(server))
    assert code == 2
    assert f"'--cache {other}' is ambiguous" in err and f"--cache={other}" in err
    assert err.count("\n") == 1 and err.startswith("gen-ai-frames: error: ")
    assert sent(server) == 0 and other.read_text() == "q\nx\n"
    assert not (tmp_path / "o.pq").exists() and not default_cache(tmp_path).exists()

    # Written with "=", the same path is taken as the cache's, as asked.
    db = tmp_path / "cache.csv"
    code, err = cli(capsys, "generate", f"--cache={db}", source, "-o", tmp_path / "o.pq", *model(server))
    assert code == 0, err
    assert entries(db) == 3


@pytest.mark.parametrize("word", ["answers.sqlite3", "on"])
def test_missing_input_says_what_cache_took(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], word: str
) -> None:
    code, err = cli(capsys, "generate", "--cache", word, "-o", tmp_path / "out.parquet", *model(server))
    assert code == 2
    assert "the following arguments are required: INPUT" in err
    assert f"--cache took {word!r} as its value" in err and "give INPUT as well" in err
    assert sent(server) == 0 and not (tmp_path / word).exists()


def test_explicit_cache_equals_input_path_is_not_guessed(
    server: FakeServer, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--cache=in.csv`` says which it is: INPUT is then missing, and nothing is guessed."""
    code, err = cli(capsys, "generate", f"--cache={source}", "-o", tmp_path / "out.parquet", *model(server))
    assert code == 2 and "required: INPUT" in err and "--cache took" not in err


def test_help_says_how_cache_is_read(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--cache alone uses the default place, before or after INPUT" in text
    assert "--cache=PATH names a file" in text


def test_the_cache_command_keeps_its_spaced_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``cache info --cache PATH`` has no INPUT: its word is always the cache's path."""
    assert main(["cache", "info", "--cache", "x.csv", "--json"]) == 0
    assert '"path": "x.csv"' in capsys.readouterr().out
