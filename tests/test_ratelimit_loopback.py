"""Runs that are not told the rate limit, against the fake server's limiter on 127.0.0.1: the small CI
variant of benchmarks/bench_ratelimit.py. Every row must get its own answer; the 429 bounds are loose
(the benchmark holds the tight targets) so that a loaded machine does not fail them. Retry-After waits
are checked at the client (tests/_retry_after_watch.py), where the check does not depend on timing."""

from __future__ import annotations

import random
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames import create_client
from gen_ai_frames.testing import FakeServer

from ._retry_after_watch import violations, watch_retry_after
from .conftest import FAKE_KEY

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far")


def send(server: FakeServer, provider: str, prompts: list[str], **options: Any) -> tuple[list[Any], list[Any]]:
    client = create_client(provider=provider, endpoint=server.endpoint_for(provider), model_name="m",
                           api_key=FAKE_KEY)
    return client.generate_batch_response(prompts, max_concurrent=32, return_error=True, **options)


@pytest.mark.parametrize(("provider", "style"), [("openai", "headers"), ("openai", "retry_after"),
                                                 ("anthropic", "headers")])
def test_an_untold_run_fits_the_request_limit_without_failed_rows(
    provider: str, style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [f"prompt {i}" for i in range(120)]
    events = watch_retry_after(monkeypatch)
    # 3000 a minute = 50 a second, one second of burst: a burst of 32 at an unknown limit would pass,
    # so the run must pace itself to get through 120 prompts without failing any.
    with FakeServer(rate_limit_rpm=3000, rate_limit_style=style, latency=0.02) as server:
        responses, errors = send(server, provider, prompts, max_tokens=8, max_retries=0)
        stats = server.stats()
    assert errors == [None] * len(prompts)
    assert responses == ["echo: " + p for p in prompts]
    limited = stats["status_counts"].get("429", 0)
    assert limited <= len(prompts) // 2
    # The watch saw every request the server got, and every 429 (each asks for a wait here).
    assert sum(kind == "send" for _, kind, _, _ in events) == stats["requests"] == len(prompts) + limited
    assert sum(kind == "429" for _, kind, _, _ in events) == limited
    # No request was sent after a 429 came back and before its Retry-After was over. (The server's
    # own count, retry_after_violations, also counts requests sent before the 429 came back that
    # reached it late, as they do on a loaded machine.)
    assert violations(events) == []


def test_an_untold_run_fits_a_token_limit_stated_in_headers() -> None:
    rng = random.Random(3)
    prompts = [f"p{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for i in range(60)]
    # 60,000 tokens a minute = 1000 a second: each request costs its words + max_tokens=10 (~45).
    with FakeServer(rate_limit_tpm=60_000, latency=0.02) as server:
        responses, errors = send(server, "openai", prompts, max_tokens=10, max_retries=0)
        stats = server.stats()
    assert errors == [None] * len(prompts)
    assert all(r is not None and r.startswith("echo: p") for r in responses)
    assert stats["status_counts"].get("429", 0) <= len(prompts) // 4


def test_the_progress_bar_shows_the_learned_pace(capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": [f"row {i}" for i in range(30)]})
    with FakeServer(rate_limit_rpm=1200, latency=0.01) as server:  # 20 a second
        client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY)
        out = df.genai.generate(column="prompt", client=client, progress=True, max_concurrent=8)
    assert out["response"].tolist() == ["echo: " + p for p in df["prompt"]]
    assert "status=rate limited: 20.0 req/s" in capsys.readouterr().err
