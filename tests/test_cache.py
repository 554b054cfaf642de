"""The response cache shared across runs (gen_ai_frames.cache), against the loopback fake server,
which counts the requests it answers."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
import gen_ai_frames.cache as cache_module
from gen_ai_frames import create_client
from gen_ai_frames.cache import (
    CACHE_ENV,
    CachedAnswer,
    CacheWarning,
    KeyMaker,
    ResponseCache,
    cache_path,
    default_cache_path,
)
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.engine import Result
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.options import RunOptions
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.runner import run_rows
from gen_ai_frames.testing import FakeServer

from .conftest import FAKE_KEY

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeServer) -> Iterator[FakeServer]:
    """The module's server with fresh counters."""
    server.configure(api_key=None)
    server.reset()
    yield server
    server.configure(api_key=None)


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's cache variable or writes to their cache directory."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def requests(server: FakeServer) -> int:
    return int(server.stats()["requests"])


def generate(server: FakeServer, prompts: list[str], **options: Any) -> pd.DataFrame:
    client = create_client(endpoint=server.url, model_name=options.pop("model_name", "m"))
    df = pd.DataFrame({"prompt": prompts})
    return df.genai.generate(column="prompt", client=client, progress=False, **options)


def run_in_new_process(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter on this worktree, warnings as errors; fails the test on error."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------------------------------
# Across runs and processes


def test_a_new_process_sends_only_what_the_cache_lacks(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "answers.sqlite3"
    first = [f"question {i}" for i in range(1000)]
    out = generate(fake, first, cache=str(db), max_concurrent=32)
    assert out["error"].isna().all() and requests(fake) == 1000

    # Another frame: 600 of the same prompts (in another order, another index) and 400 new ones.
    second = first[400:][::-1] + [f"new question {i}" for i in range(400)]
    pd.DataFrame({"prompt": second}, index=range(5000, 6000)).to_parquet(tmp_path / "second.parquet")
    fake.reset()
    run_in_new_process(
        f"""
        import pandas as pd, gen_ai_frames
        client = gen_ai_frames.create_client(endpoint={fake.url!r}, model_name="m")
        df = pd.read_parquet({str(tmp_path / "second.parquet")!r})
        out = df.genai.generate(column="prompt", client=client, cache={str(db)!r}, details=True,
                                progress=False, max_concurrent=32)
        out.to_parquet({str(tmp_path / "out.parquet")!r})
        """
    )
    assert requests(fake) == 400
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["response"].tolist() == ["echo: " + p for p in second]
    assert out["cached"].tolist() == [True] * 600 + [False] * 400
    assert out["attempts"].tolist() == [0] * 600 + [1] * 400


def test_two_processes_write_one_cache_at_once(tmp_path: Path) -> None:
    """Many small write transactions and reads from two processes at the same time: no error (the
    children turn warnings into errors too), and every entry of both is there afterwards."""
    db = tmp_path / "shared.sqlite3"
    code = f"""
        import sys
        from gen_ai_frames.cache import CachedAnswer, KeyMaker, ResponseCache
        from gen_ai_frames.params import GenerationParams
        me = sys.argv[1]
        keys = KeyMaker({{"model": "m"}}, GenerationParams())
        cache = ResponseCache({str(db)!r}, timeout=60)
        for batch in range(150):
            prompts = [f"{{me}}-{{batch}}-{{i}}" for i in range(4)]
            cache.put_many([(keys.key(p), CachedAnswer("answer " + p)) for p in prompts])
            assert len(cache.get_many([keys.key(p) for p in prompts])) == 4
        cache.close()
        """
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", textwrap.dedent(code), name],
            cwd=str(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    keys = KeyMaker({"model": "m"}, GenerationParams())
    prompts = [f"{me}-{batch}-{i}" for me in "ab" for batch in range(150) for i in range(4)]
    with ResponseCache(db) as cache:
        found = cache.get_many([keys.key(p) for p in prompts])
        assert cache.info()["entries"] == 1200
    assert len(found) == 1200
    assert all(found[keys.key(p)].text == "answer " + p for p in prompts)


def test_two_runs_in_two_processes_share_the_cache(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "runs.sqlite3"
    code = f"""
        import sys, pandas as pd, gen_ai_frames
        start = int(sys.argv[1])
        client = gen_ai_frames.create_client(endpoint={fake.url!r}, model_name="m")
        df = pd.DataFrame({{"prompt": [f"p{{i}}" for i in range(start, start + 300)]}})
        out = df.genai.generate(column="prompt", client=client, cache={str(db)!r}, progress=False)
        assert out["error"].isna().all()
        """
    procs = [
        subprocess.Popen([sys.executable, "-W", "error", "-c", textwrap.dedent(code), str(start)],
                         cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for start in (0, 300)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert requests(fake) == 600
    fake.reset()
    out = generate(fake, [f"p{i}" for i in range(600)], cache=str(db), details=True)
    assert requests(fake) == 0 and out["cached"].all()


# --------------------------------------------------------------------------------------------------
# What makes an answer differ


@pytest.mark.parametrize(
    "change",
    [
        {"model_name": "other-model"},
        {"temperature": 0.5},
        {"max_tokens": 17},
        {"top_p": 0.5},
        {"system_prompt": "Answer in French."},
        {"schema": "name, age int"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_changed_parameter_misses(fake: FakeServer, tmp_path: Path, change: dict[str, Any]) -> None:
    db = str(tmp_path / "c.sqlite3")
    prompts = ["one", "two", "three"]
    base = {"schema": "name"} if "schema" in change else {}
    generate(fake, prompts, cache=db, **base)
    assert requests(fake) == 3
    generate(fake, prompts, cache=db, **base)
    assert requests(fake) == 3  # the same call: all hits
    out = generate(fake, prompts, cache=db, details=True, **{**base, **change})
    assert requests(fake) == 6 and not out["cached"].any()
    generate(fake, prompts, cache=db, **{**base, **change})
    assert requests(fake) == 6  # the changed call's answers are cached in turn


def test_the_endpoint_is_part_of_the_key(fake: FakeServer, tmp_path: Path) -> None:
    db = str(tmp_path / "c.sqlite3")
    generate(fake, ["a"], cache=db)
    client = create_client(endpoint=fake.url.replace("127.0.0.1", "localhost"), model_name="m")
    pd.DataFrame({"prompt": ["a"]}).genai.generate(column="prompt", client=client, cache=db, progress=False)
    assert requests(fake) == 2


def test_keys_cover_every_generation_parameter_but_timeout() -> None:
    client = {"provider": "openai", "endpoint": "http://h/v1", "model": "m"}
    base = KeyMaker(client, GenerationParams()).key("p")
    assert KeyMaker(client, GenerationParams(timeout=5)).key("p") == base
    for change in ({"stop": ("x",)}, {"logprobs": True}, {"schema_retries": 3}):
        assert KeyMaker(client, GenerationParams(**change)).key("p") != base, change
    assert KeyMaker({**client, "provider": "anthropic"}, GenerationParams()).key("p") != base


# --------------------------------------------------------------------------------------------------
# A damaged cache never fails a run


def test_a_file_that_is_not_a_database_is_reported_and_bypassed(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "broken.sqlite3"
    db.write_bytes(b"this is not a database, just some bytes " * 200)
    with pytest.warns(CacheWarning, match="cannot be used") as caught:
        out = generate(fake, ["a", "b"], cache=str(db))
    assert len(caught) == 1 and "broken.sqlite3" in str(caught[0].message)
    assert out["response"].tolist() == ["echo: a", "echo: b"] and requests(fake) == 2


def test_a_damaged_page_is_reported_and_bypassed(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "damaged.sqlite3"
    prompts = [f"prompt {i} " + "x" * 300 for i in range(200)]
    generate(fake, prompts, cache=str(db))
    assert requests(fake) == 200
    with ResponseCache(db) as cache:  # everything into the main file, then break its table pages
        cache.clear(older_than=10**9)
    raw = bytearray(db.read_bytes())
    page = 4096
    for start in range(2 * page, len(raw), page):
        raw[start : start + 64] = b"\xff" * 64
    db.write_bytes(bytes(raw))
    with pytest.warns(CacheWarning, match="cannot be used"):
        out = generate(fake, prompts, cache=str(db))
    assert out["error"].isna().all() and requests(fake) == 400


def test_clear_deletes_a_damaged_file(tmp_path: Path) -> None:
    db = tmp_path / "broken.sqlite3"
    db.write_bytes(b"garbage" * 1000)
    proc = _cli("cache", "clear", "--cache", str(db))
    assert "deleted the damaged cache file" in proc.stdout and not db.exists()


# --------------------------------------------------------------------------------------------------
# Size and age limits


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_eviction_by_size_drops_the_least_recently_used(tmp_path: Path) -> None:
    clock = Clock()
    keys = KeyMaker({"model": "m"}, GenerationParams())
    cap = 256 * 1024
    with ResponseCache(tmp_path / "c.sqlite3", max_size=cap, clock=clock) as cache:
        for i in range(100):  # 100 x 1 KiB: fits
            clock.now += 1
            cache.put_many([(keys.key(f"p{i}"), CachedAnswer(f"{i:04d}" + "a" * 1020))])
        assert cache.info()["entries"] == 100
        for i in range(100, 600):  # 500 KiB more: far over the cap
            clock.now += 1
            # The oldest entry is used now and then: it stays while younger, unused ones go.
            used = [keys.key("p0")] if i % 50 == 0 else []
            cache.put_many([(keys.key(f"p{i}"), CachedAnswer(f"{i:04d}" + "a" * 1020))], used=used)
        info = cache.info()
        assert info["used_bytes"] <= cap
        assert 100 < info["entries"] < 256
        found = cache.get_many([keys.key(f"p{i}") for i in range(600)])
        assert keys.key("p0") in found
        assert keys.key("p1") not in found and keys.key("p100") not in found
        assert all(keys.key(f"p{i}") in found for i in range(590, 600))
        # Eviction gives the pages back to the disk (incremental vacuum), not only to the free list.
        assert os.path.getsize(tmp_path / "c.sqlite3") <= cap * 1.5


def test_entries_older_than_max_age_miss_and_are_swept(tmp_path: Path) -> None:
    clock = Clock()
    keys = KeyMaker({"model": "m"}, GenerationParams())
    with ResponseCache(tmp_path / "c.sqlite3", max_age=100, clock=clock) as cache:
        cache.put_many([(keys.key("old"), CachedAnswer("x"))])
        clock.now += 50
        assert keys.key("old") in cache.get_many([keys.key("old")])
        clock.now += 51
        assert cache.get_many([keys.key("old")]) == {}
        clock.now += 4000  # past the sweep interval: the next write deletes expired entries
        cache.put_many([(keys.key("new"), CachedAnswer("y"))])
        assert cache.info()["entries"] == 1


def test_cache_max_age_reaches_the_run(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    client = create_client(endpoint=fake.url, model_name="m")
    keys = KeyMaker(client.fingerprint(), RunOptions().params)
    stored_at = Clock(__import__("time").time() - 1000)
    with ResponseCache(db, clock=stored_at) as cache:
        cache.put_many([(keys.key("a"), CachedAnswer("stored a")), (keys.key("b"), CachedAnswer("stored b"))])
    out = generate(fake, ["a", "b"], cache=str(db), cache_max_age=5000)
    assert out["response"].tolist() == ["stored a", "stored b"] and requests(fake) == 0
    out = generate(fake, ["a", "b"], cache=str(db), cache_max_age=500)
    assert out["response"].tolist() == ["echo: a", "echo: b"] and requests(fake) == 2


# --------------------------------------------------------------------------------------------------
# Secrets, temperature, options


def test_the_key_and_headers_are_never_stored(fake: FakeServer, tmp_path: Path) -> None:
    fake.configure(api_key=FAKE_KEY)
    db = tmp_path / "c.sqlite3"
    client = create_client(endpoint=fake.url, model_name="m", api_key=FAKE_KEY)
    df = pd.DataFrame({"prompt": [f"p{i}" for i in range(20)]})
    df.genai.generate(column="prompt", client=client, cache=str(db), progress=False)
    assert requests(fake) == 20
    with ResponseCache(db) as cache:
        assert cache.info()["entries"] == 20  # the answers are there...
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("c.sqlite3"))
    assert b"echo: p7" in stored
    for secret in (FAKE_KEY.encode(), b"Bearer", b"authorization", b"Authorization", b"x-ratelimit"):
        assert secret not in stored  # ...and no key or header


def test_temperature_above_zero_ignores_the_environment_variable(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "env.sqlite3"
    monkeypatch.setenv(CACHE_ENV, str(db))
    generate(fake, ["a", "b"], temperature=0.7)
    generate(fake, ["a", "b"], temperature=0.7)
    assert requests(fake) == 4 and not db.exists()
    # At temperature 0 the variable turns the cache on...
    generate(fake, ["a", "b"])
    generate(fake, ["a", "b"])
    assert requests(fake) == 6 and db.exists()
    # ...and an explicit cache= is used at any temperature.
    generate(fake, ["a", "b"], temperature=0.7, cache=str(db))
    generate(fake, ["a", "b"], temperature=0.7, cache=str(db))
    assert requests(fake) == 8


def test_cache_true_uses_the_user_cache_directory(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "1")
    assert cache_path(None) == cache_path(True) == default_cache_path()
    assert default_cache_path() == tmp_path / "xdg" / "gen-ai-frames" / "responses.sqlite3"
    generate(fake, ["a"])
    generate(fake, ["a"], cache=True)
    assert requests(fake) == 1 and default_cache_path().exists()
    generate(fake, ["a"], cache=False)
    assert requests(fake) == 2
    monkeypatch.setenv(CACHE_ENV, "0")
    generate(fake, ["a"])
    assert requests(fake) == 3


def test_a_directory_gets_the_file_inside(fake: FakeServer, tmp_path: Path) -> None:
    generate(fake, ["a"], cache=tmp_path)
    assert (tmp_path / "responses.sqlite3").exists()
    generate(fake, ["a"], cache=str(tmp_path))
    assert requests(fake) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cache": ""}, "cache must be True, False, None or a file path"),
        ({"cache": 3}, "cache must be True, False, None or a file path"),
        ({"cache_max_size": 0}, "cache_max_size must be an integer >= 1"),
        ({"cache_max_age": -1}, "cache_max_age must be a number > 0"),
    ],
)
def test_bad_cache_options_fail_before_sending(
    fake: FakeServer, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        generate(fake, ["a"], **options)
    assert requests(fake) == 0


# --------------------------------------------------------------------------------------------------
# With checkpoints, dedupe, the client's batch calls, the progress bar


def test_composes_with_checkpoint_and_dedupe(fake: FakeServer, tmp_path: Path) -> None:
    db = str(tmp_path / "c.sqlite3")
    prompts = ["a", "b", "a", "c", "a"]
    out = generate(fake, prompts, cache=db, details=True)
    assert requests(fake) == 3 and not out["cached"].any()  # dedupe: "a" sent once

    ckpt = tmp_path / "run.ckpt"
    out = generate(fake, [*prompts, "d"], cache=db, checkpoint=ckpt, details=True)
    assert requests(fake) == 4  # only "d"
    assert out["cached"].tolist() == [True] * 5 + [False]
    stored = read_checkpoint(ckpt)  # the checkpoint records every row of the run, hits too
    assert sorted(stored.index) == list(range(6))
    assert stored.sort_index()["response"].tolist() == ["echo: " + p for p in [*prompts, "d"]]
    assert stored.sort_index()["cached"].tolist() == [True] * 5 + [False]

    # Resuming restores every row from the checkpoint: neither the cache nor the server is asked.
    with ResponseCache(db) as cache:
        cache.clear()
    again = generate(fake, [*prompts, "d"], cache=db, checkpoint=ckpt, details=True)
    assert requests(fake) == 4
    pd.testing.assert_frame_equal(again, out)


def test_run_rows_counts_cached_rows(fake: FakeServer, tmp_path: Path) -> None:
    client = create_client(endpoint=fake.url, model_name="m")
    options = RunOptions(cache=str(tmp_path / "c.sqlite3"), progress=False)
    first = __import__("asyncio").run(run_rows(["a", "b", "c"], client=client, options=options))
    assert (first.cached, first.sent) == (0, 3)
    second = __import__("asyncio").run(run_rows(["a", "b", "x", None], client=client, options=options))
    assert (second.cached, second.sent) == (2, 1)
    assert second.columns["cached"] == [True, True, False, False]


def test_the_progress_bar_shows_cached_rows(fake: FakeServer, tmp_path: Path, capsys: Any) -> None:
    db = str(tmp_path / "c.sqlite3")
    generate(fake, [f"p{i}" for i in range(30)], cache=db)
    capsys.readouterr()
    client = create_client(endpoint=fake.url, model_name="m")
    pd.DataFrame({"prompt": [f"p{i}" for i in range(40)]}).genai.generate(
        column="prompt", client=client, cache=db, progress=True
    )
    assert "cached=30" in capsys.readouterr().err


def test_the_client_batch_calls_use_the_cache(fake: FakeServer, tmp_path: Path) -> None:
    db = str(tmp_path / "c.sqlite3")
    client = create_client(endpoint=fake.url, model_name="m")
    assert client.generate_batch_response(["a", "b"], cache=db) == ["echo: a", "echo: b"]
    responses, errors = client.generate_batch_response(["b", "", "a", "z"], cache=db, return_error=True)
    assert responses == ["echo: b", None, "echo: a", "echo: z"] and errors[1]["type"] == "InvalidPromptError"
    assert requests(fake) == 3
    assert client.generate_batch_response(["a", "b", "z"], cache=db) == ["echo: a", "echo: b", "echo: z"]
    assert requests(fake) == 3


def test_failed_answers_are_not_stored(fake: FakeServer, tmp_path: Path) -> None:
    db = str(tmp_path / "c.sqlite3")
    fake.configure(chaos={"500": 1.0})
    client = create_client(endpoint=fake.url, model_name="m", max_retries=0)
    try:
        pd.DataFrame({"prompt": ["a", "b"]}).genai.generate(
            column="prompt", client=client, cache=db, progress=False
        )
    finally:
        fake.configure(chaos={})
    with ResponseCache(db) as cache:
        assert cache.info()["entries"] == 0
    sent = requests(fake)
    out = generate(fake, ["a", "b"], cache=db)
    assert out["response"].tolist() == ["echo: a", "echo: b"] and requests(fake) == sent + 2


# --------------------------------------------------------------------------------------------------
# Command line


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "gen_ai_frames", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_generate_info_and_clear(fake: FakeServer, tmp_path: Path) -> None:
    db = tmp_path / "cli.sqlite3"
    pd.DataFrame({"q": [f"q{i}" for i in range(25)]}).to_csv(tmp_path / "in.csv", index=False)
    args = ["generate", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.parquet"), "--column", "q",
            "--endpoint", fake.url, "--model", "m", "--no-progress"]
    _cli(*args, "--cache", str(db))
    assert requests(fake) == 25
    proc = _cli(*args, "--cache", str(db), "--details")
    assert requests(fake) == 25 and "25 rows from the response cache" in proc.stderr
    assert pd.read_parquet(tmp_path / "out.parquet")["cached"].all()

    info = json.loads(_cli("cache", "info", "--cache", str(db), "--json").stdout)
    assert info["path"] == str(db) and info["entries"] == 25 and info["size_bytes"] > 0
    assert info["oldest"] <= info["newest"]
    text = _cli("cache", "info", "--cache", str(db)).stdout
    assert "entries:    25" in text and "oldest:" in text
    cleared = _cli("cache", "clear", "--cache", str(db), "--older-than", "3600").stdout
    assert "deleted 0 cached answers" in cleared
    assert "deleted 25 cached answers" in _cli("cache", "clear", "--cache", str(db)).stdout
    assert json.loads(_cli("cache", "info", "--cache", str(db), "--json").stdout)["entries"] == 0
    _cli(*args, "--cache", str(db))
    assert requests(fake) == 50


def test_cli_cache_flag_alone_and_environment(fake: FakeServer, tmp_path: Path) -> None:
    pd.DataFrame({"q": ["x", "y"]}).to_csv(tmp_path / "in.csv", index=False)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    args = ["generate", str(tmp_path / "in.csv"), "-o", str(tmp_path / "out.parquet"), "--column", "q",
            "--endpoint", fake.url, "--model", "m", "--no-progress", "--cache"]
    _cli(*args, **env)
    _cli(*args, **env)
    assert requests(fake) == 2
    info = json.loads(_cli("cache", "info", "--json", **env).stdout)
    assert info["path"] == str(tmp_path / "xdg" / "gen-ai-frames" / "responses.sqlite3")
    assert info["entries"] == 2
    other = tmp_path / "env.sqlite3"
    _cli(*args[:-1], **env, **{CACHE_ENV: str(other)})
    assert json.loads(_cli("cache", "info", "--json", **{CACHE_ENV: str(other)}).stdout)["entries"] == 2


def test_cli_info_of_a_missing_cache(tmp_path: Path) -> None:
    proc = _cli("cache", "info", "--cache", str(tmp_path / "none.sqlite3"))
    assert "does not exist yet" in proc.stdout and not (tmp_path / "none.sqlite3").exists()


def test_sqlite_is_in_wal_mode(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.sqlite3"):
        pass
    with sqlite3.connect(tmp_path / "c.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_checkpoint_parts_written_before_the_cached_column_still_resume(
    fake: FakeServer, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    ckpt = tmp_path / "old.ckpt"
    generate(fake, ["a", "b", "c"], checkpoint=ckpt)
    for part in ckpt.glob("part-*.parquet"):  # as earlier versions wrote them: no cached column
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["cached"]), part)
    fake.reset()
    out = generate(fake, ["a", "b", "c"], checkpoint=ckpt, details=True)
    assert requests(fake) == 0
    assert out["response"].tolist() == ["echo: a", "echo: b", "echo: c"] and out["cached"].isna().all()


def test_cached_rows_cost_nothing(fake: FakeServer, tmp_path: Path) -> None:
    db = str(tmp_path / "c.sqlite3")
    prices = {"m": (1000.0, 1000.0)}  # $0.001 a token: one answer (3 tokens) spends the whole budget
    hits = [f"hit {i}" for i in range(20)]
    generate(fake, hits, cache=db)
    fake.reset()
    new = [f"new {i}" for i in range(10)]
    out = generate(
        fake, [*hits, *new], cache=db, prices=prices, max_cost=0.001, max_concurrent=1, details=True
    )
    # Twenty hits would be $0.06 if they were charged: the budget would be gone before any request.
    assert out["cached"].tolist()[:20] == [True] * 20 and out["error"].iloc[:20].isna().all()
    assert out["response"].iloc[20] == "echo: new 0"
    assert out["error_type"].iloc[21:].eq("NotSentError").sum() >= 5 and requests(fake) < 10


def test_reads_and_writes_are_batched_and_off_the_event_loop(
    fake: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    calls: list[tuple[str, bool, int]] = []
    lookup, put_many = ResponseCache.lookup, ResponseCache.put_many

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def spy_lookup(self: ResponseCache, keys: Any) -> Any:
        calls.append(("lookup", on_loop(), len(keys)))
        return lookup(self, keys)

    def spy_put_many(self: ResponseCache, answers: Any, used: Any = ()) -> None:
        answers = list(answers)
        calls.append(("put", on_loop(), len(answers)))
        put_many(self, answers, used)

    monkeypatch.setattr(ResponseCache, "lookup", spy_lookup)
    monkeypatch.setattr(ResponseCache, "put_many", spy_put_many)
    # No write falls due by time (a loaded machine makes the run last many intervals), so the writes
    # depend on the answers alone; the interval is tested with a fake clock below.
    monkeypatch.setattr(cache_module, "_WRITE_INTERVAL_S", math.inf)
    assert cache_module._WRITE_BATCH == 5000
    generate(fake, [f"p{i}" for i in range(5000)], cache=str(tmp_path / "c.sqlite3"), max_concurrent=64)
    assert requests(fake) == 5000
    assert calls and not any(loop for _, loop, _ in calls)  # in worker threads, never on the event loop
    assert [(kind, rows) for kind, _, rows in calls if kind == "lookup"] == [("lookup", 5000)]
    puts = [rows for kind, _, rows in calls if kind == "put"]
    assert puts == [5000]  # one batch of 5,000 written when it filled, not one write per row


def test_answers_below_a_full_batch_are_written_once_the_interval_has_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake monotonic clock in the cache module: the interval passes without sleeping."""
    import asyncio

    now = [1000.0]
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(monotonic=lambda: now[0], time=time.time))
    writes: list[int] = []
    put_many = ResponseCache.put_many

    def spy_put_many(self: ResponseCache, answers: Any, used: Any = ()) -> None:
        answers = list(answers)
        writes.append(len(answers))
        put_many(self, answers, used)

    monkeypatch.setattr(ResponseCache, "put_many", spy_put_many)
    client = create_client(endpoint="http://127.0.0.1:9/v1", model_name="m")  # nothing is sent
    answer = Result(text="A", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    async def run() -> None:
        run = await cache_module.RunCache.open(client, GenerationParams(), str(tmp_path / "c.sqlite3"))
        assert run is not None
        for i in range(3):
            run.put(run.keys.key(f"p{i}"), answer)
        now[0] += cache_module._WRITE_INTERVAL_S - 0.01
        run.put(run.keys.key("p3"), answer)
        await asyncio.sleep(0)
        assert writes == []  # neither a full batch nor the interval: nothing written yet
        now[0] += 0.01
        run.put(run.keys.key("p4"), answer)  # the interval has passed: these five are written
        await asyncio.sleep(0)  # the write starts and takes its batch
        run.put(run.keys.key("p5"), answer)  # the next write is due only at the next interval
        run.put(run.keys.key("p6"), answer)
        await run.close()  # waits for the write in flight, then writes the rest

    asyncio.run(run())
    assert writes == [5, 2]
    with ResponseCache(tmp_path / "c.sqlite3") as cache:
        keys = KeyMaker(client.fingerprint(), GenerationParams())
        assert len(cache.get_many([keys.key(f"p{i}") for i in range(7)])) == 7
