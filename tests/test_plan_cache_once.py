"""A plan opens the response cache once: its segments' lookups and its sample runs share it.

A spy counts the opens (and closes) of the cache file while real plans run against the fake server
on loopback: through ``df.genai.plan`` and through the CLI's ``plan`` with several batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import create_client
from gen_ai_frames.cache import CACHE_ENV, CacheWarning, ResponseCache
from gen_ai_frames.cli import main
from gen_ai_frames.testing import FakeServer

from .conftest import FAST_RETRY


@pytest.fixture(autouse=True)
def _no_cache_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Path]]:
    """Every ResponseCache opened and closed from now on, by path."""
    seen: dict[str, list[Path]] = {"open": [], "close": []}
    real_init, real_close = ResponseCache.__init__, ResponseCache.close

    def init(self: ResponseCache, path: Any, **kwargs: Any) -> None:
        seen["open"].append(Path(path))
        real_init(self, path, **kwargs)

    def close(self: ResponseCache) -> None:
        seen["close"].append(self.path)
        real_close(self)

    monkeypatch.setattr(ResponseCache, "__init__", init)
    monkeypatch.setattr(ResponseCache, "close", close)
    return seen


def sent(server: FakeServer) -> int:
    return int(server.stats()["requests"])


def prompts(n: int) -> list[str]:
    return [f"question {i}" for i in range(n)]


def entries(path: Path) -> int:
    with ResponseCache(path) as cache:
        return int(cache.info()["entries"])


def test_a_plan_opens_the_cache_once(
    server: FakeServer, tmp_path: Path, opens: dict[str, list[Path]]
) -> None:
    db = tmp_path / "answers.sqlite3"
    client = create_client(endpoint=server.url, model_name="m", retry=FAST_RETRY)
    pd.DataFrame({"q": prompts(4)}).genai.generate(column="q", client=client, cache=db, progress=False)
    opens["open"].clear(), opens["close"].clear()

    # Three sampled requests: the probe alone, then the rest, so two runner calls share the cache.
    plan = pd.DataFrame({"q": prompts(10)}).genai.plan(column="q", client=client, cache=db, sample=3)
    assert opens["open"] == [db] and opens["close"] == [db]
    assert plan.cache_hits == 4 and plan.sample_sent == 3 and plan.sample_kept
    assert plan.remaining_requests == 3
    assert entries(db) == 7  # the sample's answers were written through the shared cache


def test_the_cli_plan_opens_the_cache_once_over_several_batches(
    server: FakeServer, tmp_path: Path, opens: dict[str, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    source, db = tmp_path / "in.csv", tmp_path / "answers.sqlite3"
    pd.DataFrame({"q": prompts(10)}).to_csv(source, index=False)
    ckpt = tmp_path / "run.ckpt"
    args = [str(source), "--column", "q", "--endpoint", server.url, "--model", "m", f"--cache={db}",
            "--batch-rows", "2", "--checkpoint", str(ckpt)]
    # Five batches, each looked up in the cache, and a sample spread over three of them.
    code = main(["plan", *args, "--sample", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert opens["open"] == [db] and opens["close"] == [db]
    assert sent(server) == 5 and entries(db) == 5

    # The run that follows pays only for the rest: the sample is in the checkpoint and the cache.
    code = main(["generate", *args, "-o", str(tmp_path / "out.parquet"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert sent(server) == 10


def test_an_unusable_cache_file_warns_once_and_the_sample_is_not_said_kept(
    server: FakeServer, tmp_path: Path, opens: dict[str, list[Path]]
) -> None:
    db = tmp_path / "damaged.sqlite3"
    db.write_bytes(b"not a database at all " * 100)
    client = create_client(endpoint=server.url, model_name="m", retry=FAST_RETRY)
    with pytest.warns(CacheWarning) as record:
        plan = pd.DataFrame({"q": prompts(6)}).genai.plan(column="q", client=client, cache=db, sample=3)
    assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
    assert opens["open"] == [db]
    assert plan.sample_sent == 3 and not plan.sample_kept  # nothing keeps the sample's answers
    assert plan.remaining_requests == 6
    assert db.read_bytes() == b"not a database at all " * 100
