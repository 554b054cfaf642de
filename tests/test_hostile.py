"""The hostile-server table: each misbehaviour of a server, proxy or gateway, and the exact outcome the
user sees (docs/errors.md lists the same table). Loopback servers from gen_ai_frames.testing.hostile.

Every case runs ``before``, the bad prompt, then ``after`` through one client, one at a time: the bad
answer fails its own row only (or, for a redirect, stops the run: every request would go the same
way) and never crashes the run.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from gen_ai_frames import create_client
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.testing.hostile import CREDENTIAL_HEADERS, HostileServer, Reply, chat

from .conftest import FAKE_KEY, FAST_RETRY

MB = 1024 * 1024


def _wait_for(condition: Callable[[], bool]) -> None:
    """Wait for the server thread to finish recording (it runs beside the client, not under it)."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the server never finished"
        time.sleep(0.01)


# (id, reply to the bad prompt, outcome: response text or (error type, message part), fatal)
TABLE: list[tuple[str, Reply, Any, bool]] = [
    ("usage is a list", Reply(json=chat("fine", usage=[1, 2])), "fine", False),
    ("usage is a string", Reply(json=chat("fine", usage="12 tokens")), "fine", False),
    ("prompt_tokens is a string",
     Reply(json=chat("fine", usage={"prompt_tokens": "12", "completion_tokens": 2})),
     ("MalformedResponseError", "usage.prompt_tokens is '12' (str), not a whole number of tokens"), False),
    ("completion_tokens is 3.5",
     Reply(json=chat("fine", usage={"prompt_tokens": 3, "completion_tokens": 3.5})),
     ("MalformedResponseError", "usage.completion_tokens is 3.5 (float), not a whole number of tokens"),
     False),
    ("finish_reason is an integer", Reply(json=chat("fine", finish_reason=1)),
     ("MalformedResponseError", "choices[0].finish_reason is 1 (int), not a string"), False),
    ("content is a list of text parts",
     Reply(json=chat([{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}])),
     "Hello, world", False),
    ("content is a number", Reply(json=chat(42)),
     ("MalformedResponseError", "choices[0].message.content is 42 (int), not text"), False),
    ("a refusal", Reply(json=chat(None, refusal="I can't help with that.")),
     ("RefusalError", "the model refused to answer: I can't help with that."), False),
    ("null content at max_tokens", Reply(json=chat(None, finish_reason="length")),
     ("EmptyAnswerError", "the model reached max_tokens (finish_reason 'length') before writing any"), False),
    ("null content, no reason", Reply(json=chat(None)),
     ("MalformedResponseError", "the answer has no text (choices[0].message.content is missing or null"),
     False),
    ("an HTML page", Reply(body=b"<html>Sign in</html>", headers={"content-type": "text/html"}),
     ("MalformedResponseError", "not JSON (text/html, starts with '<html>Sign in</html>')"), False),
    ("an answer larger than max_response_bytes", Reply(size=4 * MB),
     ("ResponseTooLargeError",
      "larger than max_response_bytes=1,048,576 (Content-Length 4,194,304; not read)"),
     False),
    ("a chunked answer larger than max_response_bytes", Reply(size=4 * MB, chunked=True),
     ("ResponseTooLargeError", "larger than max_response_bytes=1,048,576 (stopped reading after"), False),
    ("the key echoed in an error", Reply(status=500, echo_key=True),
     ("ServerError", "HTTP 500: Incorrect API key provided: ***"), False),
    ("302 on a POST", Reply(status=302, location="/v2/chat/completions"),
     ("RedirectError", ("answered HTTP 302: it moved to http://127.0.0.1:{port}/v2/chat/completions; a POST "
                        "cannot follow a 302 redirect")), True),
    ("301 on a POST", Reply(status=301, location="https://new.example/v1/chat/completions"),
     ("RedirectError", "it moved to https://new.example/v1/chat/completions"), True),
    ("303 with credentials in the Location",
     Reply(status=303, location="https://bob:hunter2-pw@new.example/v1/chat/completions?key=abcdef123"),
     ("RedirectError", "it moved to https://***@new.example/v1/chat/completions?key=***"), True),
    ("307 to another host", Reply(status=307, location="http://localhost:9/v1/chat/completions"),
     ("RedirectError", ("redirecting to another host: http://localhost:9/v1/chat/completions; the request "
                        "was not re-sent there")), True),
    ("307 to itself, forever", Reply(status=307, location="/v1/chat/completions"),
     ("RedirectError", "the endpoint kept redirecting (HTTP 307, last to http://127.0.0.1:{port}/v1/chat/"),
     True),
    ("redirect without a Location", Reply(status=308),
     ("RedirectError", "answered HTTP 308 (a redirect) without saying where to"), True),
]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize(("reply", "outcome", "fatal"), [c[1:] for c in TABLE], ids=[c[0] for c in TABLE])
def test_hostile_server_table(transport: str, reply: Reply, outcome: Any, fatal: bool) -> None:
    with HostileServer({"bad": reply}) as server:
        client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY, retry=FAST_RETRY,
                               max_response_bytes=MB,
                               transport=httpx.AsyncHTTPTransport() if transport == "httpx" else None)
        responses, errors = client.generate_batch_response(["before", "bad", "after"], max_concurrent=1,
                                                           return_error=True)
        port = server.port
    assert responses[0] == "echo: before" and errors[0] is None
    if isinstance(outcome, str):
        assert (responses[1], errors[1]) == (outcome, None)
    else:
        error_type, message = outcome
        assert responses[1] is None
        assert errors[1]["type"] == error_type, errors[1]
        assert message.format(port=port) in errors[1]["message"], errors[1]["message"]
        assert errors[1]["suggestion"]
    if fatal:  # every request would be redirected alike: the run stops, the last row is not sent
        assert errors[2]["type"] == "RedirectError" and errors[2]["sent"] is False
    else:
        assert responses[2] == "echo: after" and errors[2] is None
    shown = repr(errors)
    assert FAKE_KEY not in shown and "hunter2-pw" not in shown and "abcdef123" not in shown


def test_a_same_origin_307_is_followed_with_the_same_body(fake_key_client: Any) -> None:
    moved = Reply(status=307, location="/v1/elsewhere/chat/completions", times=1)
    with HostileServer({"moved": moved}) as server:
        client = fake_key_client(server)
        assert client.generate_batch_response(["moved"]) == ["echo: moved"]
        first, second = server.requests
    assert (first.path, second.path) == ("/v1/chat/completions", "/v1/elsewhere/chat/completions")
    assert first.body == second.body and second.headers["authorization"] == f"Bearer {FAKE_KEY}"


@pytest.fixture
def fake_key_client() -> Callable[[HostileServer], Any]:
    def build(server: HostileServer, **options: Any) -> Any:
        return create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY, retry=FAST_RETRY,
                             **options)

    return build


# ------------------------------------------------------------------ keys never travel on a redirect
PROVIDERS = ["openai", "azure", "anthropic", "gemini", "groq"]


@pytest.fixture
def two_origins() -> Iterator[tuple[HostileServer, HostileServer]]:
    """``origin`` redirects every request to the same path on ``target``, another port."""
    with HostileServer() as target, HostileServer() as origin:
        yield origin, target


@pytest.mark.parametrize("transport", ["aiohttp", "httpx", "httpx-following"])
@pytest.mark.parametrize("status", [307, 308])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_credential_header_crosses_origins_on_a_redirect(
    two_origins: tuple[HostileServer, HostileServer], provider: str, status: int, transport: str
) -> None:
    origin, target = two_origins
    origin.default = Reply(status=status, location=target.base_url, append_path=True)
    options: dict[str, Any] = {}
    if transport == "httpx":
        options["transport"] = httpx.AsyncHTTPTransport()
    elif transport == "httpx-following":  # a user's own client, set to follow redirects
        # No keep-alive: the test never closes this client, and its connections must not outlive it.
        options["http_client"] = httpx.AsyncClient(follow_redirects=True,
                                                   limits=httpx.Limits(max_keepalive_connections=0))
    client = create_client(provider=provider, endpoint=origin.endpoint_for(provider), model_name="m",
                           api_key=FAKE_KEY, retry=FAST_RETRY, **options)
    _, errors = client.generate_batch_response(["hi"], return_error=True)
    # The origin got the key in the provider's own header; the other host got nothing at all.
    (sent,) = origin.requests
    assert FAKE_KEY in " ".join(sent.credentials().values())
    assert target.requests == []
    assert errors[0]["type"] == "RedirectError"
    assert f"redirecting to another host: {target.base_url}/" in errors[0]["message"]
    assert f"pass endpoint={target.endpoint_for(provider)!r}" in errors[0]["suggestion"]


def test_credential_headers_cover_every_provider() -> None:
    from gen_ai_frames.providers import get_provider

    for name in PROVIDERS:
        assert get_provider(name).credential_header in CREDENTIAL_HEADERS


# ------------------------------------------------------------------------------ bounded answers
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_huge_answer_is_not_read_whole(fake_key_client: Any, transport: str, chunked: bool) -> None:
    size = 64 * MB
    with HostileServer({"huge": Reply(size=size, chunked=chunked)}) as server:
        options = {"transport": httpx.AsyncHTTPTransport()} if transport == "httpx" else {}
        client = fake_key_client(server, **options)  # the default limit: 10 MiB
        responses, errors = client.generate_batch_response(["huge", "small"], max_concurrent=1,
                                                           return_error=True)
        _wait_for(lambda: len(server.bytes_sent) == 1)
    assert errors[0]["type"] == "ResponseTooLargeError"
    assert "max_response_bytes=10,485,760" in errors[0]["message"]
    assert errors[0]["attempts"] == 1  # not retried: the same answer would come back
    assert responses[1] == "echo: small"
    # The client hung up instead of draining 64 MB (what reached the socket buffers is all).
    assert server.bytes_sent[0] < size // 2


def test_max_response_bytes_is_checked(fake_key_client: Any) -> None:
    from gen_ai_frames import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_response_bytes must be an integer >= 1, got 0"):
        create_client(endpoint="http://127.0.0.1:9/v1", model_name="m", max_response_bytes=0)


# ------------------------------------------------------------------------- one bad row, any dialect
BAD_FIELDS = {
    "anthropic": [
        ({"type": "message", "content": [{"type": "text", "text": "x"}], "stop_reason": 3,
          "usage": {"input_tokens": 1, "output_tokens": 1}}, "stop_reason is 3 (int)"),
        ({"type": "message", "content": [{"type": "text", "text": "x"}], "stop_reason": "end_turn",
          "usage": {"input_tokens": "1", "output_tokens": 1}}, "usage.input_tokens is '1' (str)"),
        ({"type": "message", "content": [], "stop_reason": "max_tokens", "usage": {"output_tokens": 9}},
         "EmptyAnswerError"),
    ],
    "gemini": [
        ({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": 1}]},
         "candidates[0].finishReason is 1 (int)"),
        ({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 2.5}}, "usageMetadata.promptTokenCount is 2.5 (float)"),
        ({"candidates": [{"content": {}, "finishReason": "MAX_TOKENS"}]}, "EmptyAnswerError"),
    ],
    "azure": [({"choices": [{"message": {"content": "x"}, "finish_reason": ["stop"]}]},
               "choices[0].finish_reason is ['stop'] (list)")],
    "groq": [({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": True}}, "usage.prompt_tokens is True (bool)")],
}
USAGE_NOT_AN_OBJECT = {
    "anthropic": {"type": "message", "content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn",
                  "usage": "lots"},
    "gemini": {"candidates": [{"content": {"parts": [{"text": "fine"}]}, "finishReason": "STOP"}],
               "usageMetadata": [1, 2]},
    "azure": chat("fine", usage="lots"),
    "groq": chat("fine", usage=[3, 2]),
}


@pytest.mark.parametrize("provider", sorted(BAD_FIELDS))
def test_a_bad_field_fails_its_row_in_every_dialect(provider: str, tmp_path: Path) -> None:
    script = {f"bad{i}": Reply(json=body) for i, (body, _) in enumerate(BAD_FIELDS[provider])}
    script["usage"] = Reply(json=USAGE_NOT_AN_OBJECT[provider])
    prompts = ["before", *script, "after"]
    with HostileServer(script) as server:
        client = create_client(provider=provider, endpoint=server.endpoint_for(provider), model_name="m",
                               api_key=FAKE_KEY, retry=FAST_RETRY)
        df = pd.DataFrame({"prompt": prompts})
        # Through a checkpoint: a bad field once crashed the run, and every resume of it.
        out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", details=True,
                                progress=False, max_concurrent=1)
        again = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", details=True,
                                  progress=False)
    assert out["response"].iloc[0] == "echo: before" and out["response"].iloc[-1] == "echo: after"
    for i, (_, expected) in enumerate(BAD_FIELDS[provider], start=1):
        assert pd.isna(out["response"].iloc[i])
        assert expected in f"{out['error_type'].iloc[i]}: {out['error'].iloc[i]}"
    usage_row = len(prompts) - 2
    assert out["response"].iloc[usage_row] == "fine" and pd.isna(out["prompt_tokens"].iloc[usage_row])
    pd.testing.assert_frame_equal(out[["response", "error"]], again[["response", "error"]])
    assert len(read_checkpoint(tmp_path / "c")) == len(prompts)


# --------------------------------------------------------------------- a key echoed back is scrubbed
def test_a_key_echoed_by_a_proxy_is_stored_nowhere(tmp_path: Path) -> None:
    with HostileServer({"echo": Reply(status=502, echo_key=True)}) as server:
        client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY, retry=FAST_RETRY)
        df = pd.DataFrame({"prompt": ["ok", "echo"]})
        out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", details=True,
                                progress=False)
        assert FAKE_KEY in server.requests[-1].headers["authorization"]  # the server did get it
    assert out["error"].iloc[1] == "HTTP 502: Incorrect API key provided: ***"
    stored = b"".join(p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert FAKE_KEY.encode() not in stored and FAKE_KEY not in out.to_csv()


def test_a_pickled_client_scrubs_its_key_in_another_process() -> None:
    """A Dask worker unpickles the client: its key is scrubbed there too, without create_client."""
    key = "sk-pickled-key-5521"
    client = create_client(endpoint="http://127.0.0.1:9/v1", model_name="m", api_key=key)
    code = ("import pickle, sys\n"
            "from gen_ai_frames.errors import ServerError\n"
            "before = ServerError('echo: ' + sys.argv[1]).message\n"
            "pickle.loads(sys.stdin.buffer.read())\n"
            "print(before == 'echo: ' + sys.argv[1], ServerError('echo: ' + sys.argv[1]).message)\n")
    done = subprocess.run([sys.executable, "-c", code, key], input=pickle.dumps(client), capture_output=True,
                          timeout=60, check=True)
    assert done.stdout.decode().split() == ["True", "echo:", "***"]
