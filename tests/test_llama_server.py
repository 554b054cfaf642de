"""A real peer: llama-cpp-python's own OpenAI-compatible server, serving the bundled SmolLM2 GGUF on
a loopback port, answered through provider="openai" (aiohttp transport) and the df.genai accessor.

Unlike the FakeServer tests, nothing here is ours on the server side: this checks that requests we
build are accepted by an independent implementation and that its answers parse.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import create_client
from gen_ai_frames.client import Client

# The server runs llama.cpp in a child process, but it is only started behind the library probe
# (conftest.py's llama_cpp_probe): where llama.cpp cannot run, these tests are skipped with its reason.
# If the [server] extra's web stack is missing, the fixture fails and shows the server's own
# ImportError rather than skipping quietly.

PROMPTS = ["What is the capital of France?", "Name a color.", "What is 2+2?"]
STARTUP_DEADLINE_S = 90.0


@dataclass
class LlamaServer:
    base_url: str
    model_id: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path, limit: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:] or "(empty)"


@pytest.fixture(scope="module")
def llama_server(llama_cpp_probe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    model = llama_cpp_probe  # the bundled GGUF, which llama.cpp has just run in a probe subprocess
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "1024"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        model_id = _wait_until_serving(process, base_url, log_path)
        yield LlamaServer(base_url, model_id)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_until_serving(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> str:
    """Poll GET /v1/models until the server lists a model; return its id."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    last_problem = "no answer yet"
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with code {process.returncode} before serving; "
                            f"its output:\n{_log_tail(log_path)}")
            try:
                response = http.get(f"{base_url}/models")
                if response.status_code == 200 and response.json().get("data"):
                    return str(response.json()["data"][0]["id"])
                last_problem = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as err:
                last_problem = f"{type(err).__name__}: {err}"
            time.sleep(0.2)
    pytest.fail(f"llama_cpp.server did not serve {base_url}/models within {STARTUP_DEADLINE_S:g} s "
                f"(last: {last_problem}); its output:\n{_log_tail(log_path)}")


def _client(server: LlamaServer) -> Client:
    # A loopback endpoint needs no API key.
    return create_client(provider="openai", endpoint=server.base_url, model_name=server.model_id)


@pytest.mark.slow
def test_batch_against_llama_cpp_server(llama_server: LlamaServer) -> None:
    client = _client(llama_server)
    responses, errors = client.generate_batch_response(PROMPTS, max_tokens=16, return_error=True)
    assert errors == [None, None, None]
    assert all(isinstance(text, str) and text.strip() for text in responses)


@pytest.mark.slow
def test_dataframe_against_llama_cpp_server(llama_server: LlamaServer) -> None:
    client = _client(llama_server)
    df = pd.DataFrame({"prompt": PROMPTS})
    out = df.genai.generate(column="prompt", client=client, progress=False, max_tokens=16, details=True)
    assert out["error"].isna().all(), out["error"].tolist()
    assert all(isinstance(text, str) and text.strip() for text in out["response"])
    assert set(out["finish_reason"]) <= {"stop", "length"}
    assert (out["completion_tokens"] > 0).all()


@pytest.mark.slow
def test_context_overflow_from_the_server_is_a_context_length_error(llama_server: LlamaServer) -> None:
    # The server's own 400 body (code context_length_exceeded) maps to our ContextLengthError.
    client = _client(llama_server)
    long_prompt = "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 150  # > 1024 tokens
    prompts = [long_prompt, PROMPTS[2]]
    responses, errors = client.generate_batch_response(prompts, max_tokens=16, return_error=True)
    assert responses[0] is None and errors[0] is not None
    assert errors[0]["type"] == "ContextLengthError" and errors[0]["status_code"] == 400
    assert errors[1] is None and responses[1]
