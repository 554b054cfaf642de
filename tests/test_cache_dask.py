"""The response cache on a real multi-process Dask cluster: several worker processes on one file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

import gen_ai_frames.dask  # noqa: E402,F401  (registers ddf.genai)
from gen_ai_frames.cache import CACHE_ENV, ResponseCache  # noqa: E402
from gen_ai_frames.testing import FakeServer  # noqa: E402

from .conftest import KEY_VARIABLES  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.Client]:
    with pytest.MonkeyPatch.context() as env:
        for name in (*KEY_VARIABLES, CACHE_ENV):
            env.delenv(name, raising=False)
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as local, distributed.Client(local) as client:
            yield client


def test_workers_share_one_cache(cluster: distributed.Client, tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    options = {"provider": "openai", "model_name": "m", "cache": str(db), "details": True}
    with FakeServer() as server:
        first = pd.DataFrame({"prompt": [f"row {i}" for i in range(60)]})
        out = dd.from_pandas(first, npartitions=4, sort=False).genai.generate(
            column="prompt", endpoint=server.url, **options
        ).compute()
        assert out["error"].isna().all() and server.stats()["requests"] == 60
        assert len(cluster.scheduler_info()["workers"]) == 2  # two worker processes wrote it
        with ResponseCache(db) as cache:
            assert cache.info()["entries"] == 60

        # A new frame sharing 40 rows, split otherwise: only the 20 new ones are sent.
        second = pd.DataFrame({"prompt": [f"row {i}" for i in range(20, 80)]})
        server.reset()
        again = dd.from_pandas(second, npartitions=3, sort=False).genai.generate(
            column="prompt", endpoint=server.url, **options
        ).compute()
        assert server.stats()["requests"] == 20
        assert again["response"].tolist() == [f"echo: row {i}" for i in range(20, 80)]
        assert again["cached"].tolist() == [True] * 40 + [False] * 20
