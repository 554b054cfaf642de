"""The batch API against the fake server on real loopback sockets: ordering, the in-flight cap,
retries after 429 with Retry-After, timeouts, early stop on 401, and the progress bar's reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames import AuthenticationError, RetryPolicy, create_client

from ._retry_after_watch import violations, watch_retry_after
from .conftest import FAKE_KEY, FAST_RETRY


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def test_order_is_kept_under_random_latency(client: Any, fake_server: Any) -> None:
    fake_server.configure(latency_median=0.01, latency_sigma=1.0, seed=3)
    prompts = [f"p{i}" for i in range(300)]
    assert client.generate_batch_response(prompts, max_concurrent=32) == [f"echo: {p}" for p in prompts]


@pytest.mark.parametrize("max_concurrent", [1, 5, 40])
def test_requests_in_flight_never_exceed_max_concurrent(client: Any, fake_server: Any, max_concurrent: int) -> None:
    fake_server.configure(latency=0.1)  # long enough that even a loaded machine fills every slot
    client.generate_batch_response([f"p{i}" for i in range(3 * max_concurrent)], max_concurrent=max_concurrent)
    assert fake_server.stats()["max_in_flight"] == max_concurrent


def test_429_with_retry_after_is_waited_out_by_the_whole_run(fake_server: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    events = watch_retry_after(monkeypatch)
    client = create_client(endpoint=fake_server.url, model_name="m", retry=RetryPolicy(jitter=0.0))
    prompts = ["[[fail_times=1]] [[status=429]] [[retry_after=0.5]] first"] + [f"p{i}" for i in range(40)]
    responses, errors = client.generate_batch_response(prompts, max_concurrent=4, return_error=True)
    assert errors == [None] * len(prompts) and responses[0].startswith("echo: ")
    stats = fake_server.stats()
    assert stats["per_prompt"][prompts[0]] == 2
    assert stats["retry_after_windows_opened"] == 1
    # No request left the client between the 429 reaching it and the end of the wait it asked for.
    # (Checked at the client: the server's own count needs a grace for requests already on their way.)
    assert sum(1 for event in events if event[1] == "429") == 1
    assert violations(events) == []


def test_timeout_against_a_slow_server(client: Any) -> None:
    responses, errors = client.generate_batch_response(["quick", "[[sleep=2]] slow"], timeout=0.3, max_retries=1,
                                                       return_error=True)
    assert responses[0] == "echo: quick"
    assert errors[1]["type"] == "APITimeoutError" and errors[1]["attempts"] == 2


def test_401_stops_sending(fake_server: Any) -> None:
    fake_server.configure(api_key=FAKE_KEY)
    wrong = create_client(endpoint=fake_server.url, model_name="m", api_key="sk-wrong")
    _, errors = wrong.generate_batch_response([f"p{i}" for i in range(200)], max_concurrent=3, return_error=True)
    assert fake_server.stats()["requests"] <= 3
    assert all(e["type"] == "AuthenticationError" for e in errors)
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        wrong.generate_batch_response(["a"])
    right = create_client(endpoint=fake_server.url, model_name="m", api_key=FAKE_KEY)
    assert right.generate_response("a") == "echo: a"


def test_progress_bar_counts_restored_rows_and_reports_pauses(client: Any, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    df = pd.DataFrame({"prompt": [f"p{i}" for i in range(6)]})
    df.head(4).genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", progress=False)
    df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", progress=True)
    assert "4/6" in capsys.readouterr().err  # restored rows are done from the start
    limited = pd.DataFrame({"prompt": ["[[fail_times=1]] [[status=429]] [[retry_after=0.3]] x"]})
    limited.genai.generate(column="prompt", client=create_client(
        endpoint=client.provider.endpoint, model_name="m", retry=RetryPolicy(jitter=0.0)), progress=True)
    assert "status=rate limited, waiting 0.3 s" in capsys.readouterr().err


def test_completions_api_against_the_server(fake_server: Any) -> None:
    client = create_client(endpoint=fake_server.url, model_name="m", api="completions")
    assert client.generate_batch_response(["a", "b"], system_prompt="S") == ["echo: S\n\na", "echo: S\n\nb"]

