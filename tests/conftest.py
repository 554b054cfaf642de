"""Shared fixtures: no test sees the developer's real API keys, and no test sleeps for backoff."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gen_ai_frames import create_client
from gen_ai_frames.client import Client
from gen_ai_frames.retry import RetryPolicy

KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
                 "GEMINI_API_KEY", "TOGETHER_API_KEY", "GROQ_API_KEY", "OPENROUTER_API_KEY",
                 "MISTRAL_API_KEY", "DEEPSEEK_API_KEY", "VLLM_API_KEY", "LMSTUDIO_API_KEY")

#: Backoff short enough that retry tests take milliseconds.
FAST_RETRY = RetryPolicy(initial_delay=0.001, max_delay=0.01, jitter=0.0)

FAKE_KEY = "sk-test-DO-NOT-LEAK-8f3a2b"


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def chat_answer(text: str, *, finish_reason: str = "stop", prompt_tokens: int = 3,
                completion_tokens: int = 2) -> dict[str, Any]:
    """An OpenAI Chat Completions answer body."""
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def last_user_message(request: httpx.Request) -> str:
    return json.loads(request.content)["messages"][-1]["content"]


@pytest.fixture
def mock_client() -> Callable[..., Client]:
    """Build a client whose requests go to ``handler`` (an httpx.MockTransport handler)."""

    def build(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> Client:
        options.setdefault("retry", FAST_RETRY)
        return create_client(provider="openai", api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1",
                             model_name="m", transport=httpx.MockTransport(handler), **options)

    return build


@pytest.fixture
def fake_server() -> Iterator[Any]:
    """A real OpenAI-compatible server on a loopback port."""
    from gen_ai_frames.testing import FakeServer

    with FakeServer() as server:
        yield server


@pytest.fixture(scope="module")
def module_server() -> Iterator[Any]:
    """One fake server for a whole test module: starting one per test costs more than the tests."""
    from gen_ai_frames.testing import FakeServer

    with FakeServer() as server:
        yield server


@pytest.fixture
def server(module_server: Any) -> Iterator[Any]:
    """The module's fake server with fresh counters, and its key and latency put back afterwards."""
    module_server.reset()
    yield module_server
    module_server.configure(api_key=None, latency=0.0)


# --------------------------------------------------------------------------- local model probe


@pytest.fixture(scope="session")
def llama_cpp_probe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The bundled GGUF's path, once llama.cpp has run it in a subprocess; skips where it cannot run.

    The probe (``gen_ai_frames.providers.local.probe_library``) runs llama.cpp in a child process, so
    a library build this CPU cannot run (SIGILL) skips the tests that need it, with the probe's
    reason, instead of killing pytest. Its verdict then serves every local load of the session.
    """
    import importlib.util

    from gen_ai_frames.errors import ConfigurationError
    from gen_ai_frames.providers.local import CACHE_DIR_ENV, bundled_model_path, probe_library

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llama-cpp-python: pip install -e '.[local]'")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("probe-cache")))  # not the user's cache
        try:
            model = bundled_model_path()
            probe_library(model)
        except ConfigurationError as err:  # LocalModelError, or the bundled model is not installed
            pytest.skip(f"the local model cannot run here: {err}")
    yield model
    # llama-cpp-python opens two /dev/null files at import and keeps them for the process's life;
    # close them once the session's local tests are done, or interpreter shutdown may report them
    # as a ResourceWarning (an error under filterwarnings=error), depending on teardown order.
    import sys

    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None:
            handle.close()


@pytest.fixture(autouse=True)
def _local_model_marker(request: pytest.FixtureRequest) -> None:
    """Tests marked ``local_model`` run llama.cpp in this process: only behind the probe."""
    if request.node.get_closest_marker("local_model") is not None:
        request.getfixturevalue("llama_cpp_probe")
