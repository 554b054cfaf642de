"""The batch processing API over httpx.MockTransport: ordering, retries, errors, validation, secrets."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
from collections import Counter
from typing import Any, Callable

import httpx
import pytest

import gen_ai_frames
from gen_ai_frames import create_client, errors
from gen_ai_frames.client import Client
from gen_ai_frames.engine import Engine
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers.openai import OpenAIProvider
from gen_ai_frames.retry import RetryPolicy
from gen_ai_frames.transport import HttpxTransport

from .conftest import FAKE_KEY, chat_answer, last_user_message

Build = Callable[..., Client]


def echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=chat_answer("echo: " + last_user_message(request)))


def test_results_come_back_in_prompt_order(mock_client: Build) -> None:
    async def shuffled(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(random.random() / 200)  # answers finish out of order
        return echo(request)

    prompts = [f"prompt {i}" for i in range(60)]
    responses = mock_client(shuffled).generate_batch_response(prompts, max_concurrent=16)
    assert responses == [f"echo: {p}" for p in prompts]


def test_async_twin_and_single_prompt_methods(mock_client: Build) -> None:
    client = mock_client(echo)
    assert asyncio.run(client.agenerate_batch_response(["a", "b"])) == ["echo: a", "echo: b"]
    assert client.generate_response("one") == "echo: one"
    assert asyncio.run(client.agenerate_response("two")) == "echo: two"
    assert client.generate_chat_response([{"role": "user", "content": "three"}]) == "echo: three"


def test_system_prompt_is_sent_on_every_method(mock_client: Build) -> None:
    seen: list[list[dict[str, str]]] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["messages"])
        return echo(request)

    client = mock_client(record)
    client.generate_batch_response(["a"], system_prompt="S1")
    client.generate_response("b", system_prompt="S2")
    client.generate_chat_response([{"role": "user", "content": "c"}], system_prompt="S3")
    assert [m[0] for m in seen] == [{"role": "system", "content": f"S{i}"} for i in (1, 2, 3)]


def test_sync_methods_work_inside_a_running_event_loop(mock_client: Build) -> None:
    client = mock_client(echo)

    async def notebook_cell() -> tuple[list[str | None], str]:
        # Jupyter runs cells inside a loop; the sync API must still work there.
        return client.generate_batch_response(["x", "y"]), client.generate_response("z")

    assert asyncio.run(notebook_cell()) == (["echo: x", "echo: y"], "echo: z")


def test_sequential_mode_sends_one_at_a_time(mock_client: Build) -> None:
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.002)
        in_flight -= 1
        return echo(request)

    client = mock_client(handler)
    assert client.generate_batch_response([str(i) for i in range(10)], concurrent=False) == [
        f"echo: {i}" for i in range(10)]
    assert peak == 1
    client.generate_batch_response([str(i) for i in range(30)], max_concurrent=7)
    assert peak == 7


def test_transient_errors_are_retried_until_success(mock_client: Build) -> None:
    calls: Counter[str] = Counter()

    def flaky(request: httpx.Request) -> httpx.Response:
        prompt = last_user_message(request)
        calls[prompt] += 1
        if calls[prompt] <= 2:
            status = {"a": 500, "b": 429, "c": 503}[prompt]
            return httpx.Response(status, json={"error": {"message": "try again"}})
        return echo(request)

    responses, errs = mock_client(flaky).generate_batch_response(["a", "b", "c"], return_error=True)
    assert responses == ["echo: a", "echo: b", "echo: c"]
    assert errs == [None, None, None]
    assert calls == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_stop_after_max_retries(mock_client: Build, max_retries: int) -> None:
    calls = 0

    def always_500(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500, json={"error": {"message": "down"}})

    _, errs = mock_client(always_500).generate_batch_response(["a"], return_error=True, max_retries=max_retries)
    assert calls == max_retries + 1
    assert errs[0]["type"] == "ServerError" and errs[0]["attempts"] == max_retries + 1
    assert errs[0]["retryable"] is True and errs[0]["status_code"] == 500


def test_client_level_max_retries(mock_client: Build) -> None:
    calls = 0

    def always_503(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"error": {"message": "down"}})

    client = mock_client(always_503, retry=None, max_retries=1)
    client.retry = RetryPolicy(max_retries=1, initial_delay=0.001, jitter=0)
    client.generate_batch_response(["a"], return_error=True)
    assert calls == 2


def test_non_retryable_errors_are_not_retried(mock_client: Build) -> None:
    calls = 0

    def bad_request(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"error": {"message": "bad"}})

    _, errs = mock_client(bad_request).generate_batch_response(["a"], return_error=True)
    assert calls == 1 and errs[0]["type"] == "BadRequestError" and errs[0]["attempts"] == 1


def run_engine(handler: Callable[[httpx.Request], Any], prompts: list[str], *, max_concurrent: int = 4,
               retry: RetryPolicy = RetryPolicy(max_retries=3, jitter=0.0)) -> tuple[list[Any], list[float]]:
    """Run the engine with a recording, instant sleep: lets tests check backoff without waiting."""
    slept: list[float] = []
    now = [1000.0]

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def main() -> list[Any]:
        provider = OpenAIProvider(api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1", model_name="m")
        transport = HttpxTransport(transport=httpx.MockTransport(handler))
        engine = Engine(provider, transport, max_concurrent=max_concurrent, retry=retry, sleep=fake_sleep,
                        clock=lambda: now[0])
        try:
            return await engine.run([[{"role": "user", "content": p}] for p in prompts], GenerationParams())
        finally:
            await transport.aclose()

    return asyncio.run(main()), slept


@pytest.mark.parametrize(
    ("headers", "expected_sleep"),
    [({"retry-after": "7"}, 7.0), ({"retry-after-ms": "1500"}, 1.5), ({}, 0.5)],
)
def test_429_waits_as_the_server_asks(headers: dict[str, str], expected_sleep: float) -> None:
    calls = 0

    def limited(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, headers=headers, json={"error": {"message": "slow down"}})
        return echo(request)

    results, slept = run_engine(limited, ["a"])
    assert results[0].text == "echo: a" and results[0].attempts == 2
    assert slept == [expected_sleep]


def test_backoff_grows_exponentially_between_attempts() -> None:
    _, slept = run_engine(lambda r: httpx.Response(502, text="bad gateway"), ["a"])
    assert slept == [0.5, 1.0, 2.0]


def test_timeout_is_a_typed_retryable_error(mock_client: Build) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1)
        return echo(request)

    _, errs = mock_client(slow).generate_batch_response(["a"], timeout=0.05, max_retries=1, return_error=True)
    assert errs[0]["type"] == "APITimeoutError" and errs[0]["retryable"] is True and errs[0]["attempts"] == 2
    assert "timeout=0.05" in errs[0]["message"] and "timeout" in errs[0]["suggestion"]


def test_401_stops_the_run_and_marks_the_rest_not_sent(mock_client: Build) -> None:
    calls = 0

    def unauthorized(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(401, json={"error": {"message": "Incorrect API key provided"}})

    client = mock_client(unauthorized)
    prompts = [f"p{i}" for i in range(100)]
    responses, errs = client.generate_batch_response(prompts, max_concurrent=4, return_error=True)
    assert calls <= 4  # only the requests already in flight when the first 401 came back
    assert responses == [None] * 100
    assert {e["type"] for e in errs} == {"AuthenticationError"}
    sent = [e for e in errs if e["sent"]]
    assert 1 <= len(sent) <= 4
    unsent = [e for e in errs if not e["sent"]]
    assert len(unsent) >= 96 and all(e["attempts"] == 0 and "not sent" in e["message"] for e in unsent)
    assert "OPENAI_API_KEY" in errs[0]["suggestion"]
    with pytest.raises(errors.AuthenticationError):
        client.generate_batch_response(prompts)


def test_404_unknown_model_stops_the_run(mock_client: Build) -> None:
    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "The model `m` does not exist", "code": "model_not_found"}})

    _, errs = mock_client(not_found).generate_batch_response(["a"] * 20, max_concurrent=2, return_error=True)
    assert sum(e["sent"] for e in errs) <= 2
    assert all(e["type"] == "NotFoundError" for e in errs)


def test_failures_without_return_error_give_none_and_one_warning(mock_client: Build) -> None:
    def half(request: httpx.Request) -> httpx.Response:
        if last_user_message(request).startswith("bad"):
            return httpx.Response(400, json={"error": {"message": "nope"}})
        return echo(request)

    with pytest.warns(errors.FailedPromptsWarning) as caught:
        responses = mock_client(half).generate_batch_response(["ok1", "bad1", "ok2", "bad2", ""])
    assert responses == ["echo: ok1", None, "echo: ok2", None, None]
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "3 of 5 prompts failed" in text and "return_error=True" in text
    assert "2 BadRequestError" in text and "1 InvalidPromptError" in text


def test_missing_and_empty_prompts_are_per_item_errors_not_requests(mock_client: Build) -> None:
    calls = 0

    def count(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return echo(request)

    prompts: list[Any] = ["ok", None, math.nan, "", "   \n", float("nan")]
    responses, errs = mock_client(count).generate_batch_response(prompts, return_error=True)
    assert calls == 1
    assert responses == ["echo: ok", None, None, None, None, None]
    assert [e and e["type"] for e in errs] == [None] + ["InvalidPromptError"] * 5
    assert all(e["sent"] is False and e["attempts"] == 0 for e in errs[1:])


def test_lone_surrogate_is_a_per_item_error(mock_client: Build) -> None:
    responses, errs = mock_client(echo).generate_batch_response(["fine", "bad \ud800 text"], return_error=True)
    assert responses[0] == "echo: fine"
    assert errs[1]["type"] == "InvalidPromptError"


BAD_ARGUMENTS = [
    ({"prompts": "just one string"}, "prompts"),
    ({"prompts": 42}, "prompts"),
    ({"prompts": ["ok", 3]}, "prompts[1]"),
    ({"prompts": ["ok", b"bytes"]}, "prompts[1]"),
    ({"temperature": 5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_concurrent": 0}, "max_concurrent"),
    ({"timeout": 0}, "timeout"),
    ({"timeout": -3}, "timeout"),
    ({"max_retries": -1}, "max_retries"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_ARGUMENTS)
def test_bad_arguments_raise_before_any_request(mock_client: Build, kwargs: dict[str, Any], named: str) -> None:
    calls = 0

    def count(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return echo(request)

    arguments = {"prompts": ["a", "b"], **kwargs}
    with pytest.raises(errors.ConfigurationError, match=named.replace("[", r"\[")) as caught:
        mock_client(count).generate_batch_response(**arguments)
    assert isinstance(caught.value, ValueError)
    assert calls == 0


def test_missing_key_names_the_variable_and_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.ConfigurationError, match="OPENAI_API_KEY"):
        create_client(provider="openai", endpoint="https://api.example.com/v1", model_name="m")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return echo(request)

    client = create_client(endpoint="https://api.example.com/v1", model_name="m",
                           transport=httpx.MockTransport(record))
    client.generate_response("hi")
    assert seen == [f"Bearer {FAKE_KEY}"]


def test_local_endpoint_needs_no_key() -> None:
    client = create_client(endpoint="http://localhost:8080/v1", model_name="m")
    assert client.model_name == "m"


@pytest.mark.parametrize("endpoint", ["api.example.com/v1", "ftp://example.com", "", "http://"])
def test_bad_endpoint_is_a_configuration_error(endpoint: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="endpoint"):
        create_client(api_key="k", endpoint=endpoint, model_name="m")


def test_connection_refused_says_to_check_the_server() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = create_client(endpoint=f"http://127.0.0.1:{port}/v1", model_name="m",
                           retry=RetryPolicy(max_retries=1, initial_delay=0.001, jitter=0))
    responses, errs = client.generate_batch_response(["a", "b", "c"], max_concurrent=1, return_error=True)
    assert responses == [None, None, None]
    assert errs[0]["type"] == "APIConnectionError" and errs[0]["attempts"] == 2
    assert f"127.0.0.1:{port}" in errs[0]["message"]
    assert "Is the server running" in errs[0]["suggestion"]
    assert [e["sent"] for e in errs[1:]] == [False, False]  # a dead address fails alike: stop early
    with pytest.raises(errors.APIConnectionError):
        client.generate_response("a")


def test_generate_response_raises_the_typed_error(mock_client: Build) -> None:
    client = mock_client(lambda r: httpx.Response(400, json={"error": {"message": "context_length_exceeded"}}))
    with pytest.raises(errors.ContextLengthError) as caught:
        client.generate_response("long")
    assert isinstance(caught.value, errors.RequestError) and isinstance(caught.value, errors.GenAIError)
    with pytest.raises(errors.InvalidPromptError):
        client.generate_response("  ")


def test_public_names_are_exported() -> None:
    from gen_ai_frames.factory import create_client as from_factory

    assert from_factory is gen_ai_frames.create_client
    assert gen_ai_frames.__all__ == sorted(gen_ai_frames.__all__)
    for name in gen_ai_frames.__all__:
        assert hasattr(gen_ai_frames, name), name
    assert "openai" in gen_ai_frames.available_providers()


def test_providers_is_the_subpackage_and_its_old_call_still_works_with_a_warning() -> None:
    import types

    import gen_ai_frames.providers

    assert isinstance(gen_ai_frames.providers, types.ModuleType)
    assert gen_ai_frames.providers.get_provider("openai").__name__ == "OpenAIProvider"
    with pytest.warns(DeprecationWarning, match="available_providers"):
        assert gen_ai_frames.providers() == gen_ai_frames.available_providers()


def test_client_pickles_for_worker_processes(fake_server: Any) -> None:
    import pickle

    client = create_client(endpoint=fake_server.url, model_name="m", api_key=FAKE_KEY, max_retries=1)
    copy = pickle.loads(pickle.dumps(client))
    assert repr(copy) == repr(client) and copy.retry == client.retry
    assert copy.generate_response("hi") == "echo: hi"
