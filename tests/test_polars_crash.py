"""polars' df.genai.generate killed with SIGKILL at random moments resumes to the same frame, with
the bound on resent prompts of the pandas crash test (tests/test_crash_resume.py)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pl = pytest.importorskip("polars")

from gen_ai_frames.checkpoint import read_checkpoint  # noqa: E402

from .test_crash_resume import CHUNK_SIZE, KILLS, MAX_CONCURRENT, ROWS, kill_mid_run  # noqa: E402

SCRIPT = Path(__file__).with_name("_generate_polars_in_subprocess.py")


def start(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_from_polars(fake_server: Any, tmp_path: Path) -> None:
    fake_server.configure(latency=0.005)
    rng = random.Random(20261129)
    prompts = [f"row {i}" for i in range(ROWS)]
    source, target, ckpt = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "run.ckpt"
    pl.DataFrame({"prompt": prompts, "n": range(ROWS)}).write_parquet(source)
    args = [str(source), str(target), str(ckpt), fake_server.url, "--max-concurrent", str(MAX_CONCURRENT),
            "--chunk-size", str(CHUNK_SIZE)]

    for _ in range(KILLS):
        kill_mid_run(start(args), fake_server, rng)
        assert not target.exists()
    assert fake_server.stats()["requests"] < ROWS, "the kills came too late to interrupt the run"
    final = start(args)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()

    out = pl.read_parquet(target)
    assert out["prompt"].to_list() == prompts and out["n"].to_list() == list(range(ROWS))
    assert out["response"].to_list() == ["echo: " + p for p in prompts]
    assert out["error"].null_count() == ROWS and out.schema["response"] == pl.String
    per_prompt = fake_server.stats()["per_prompt"]
    assert set(per_prompt) == set(prompts)
    resent = sum(count - 1 for count in per_prompt.values())
    assert resent <= KILLS * (MAX_CONCURRENT + 2 * CHUNK_SIZE), resent
    assert read_checkpoint(ckpt)["response"].tolist() == ["echo: " + p for p in prompts]
