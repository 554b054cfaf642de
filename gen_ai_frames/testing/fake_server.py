"""A fake LLM server for tests, notebooks and benchmarks, speaking OpenAI's API
and the dialects of Anthropic, Azure OpenAI and Gemini.

The server answers ``POST /v1/chat/completions`` and ``POST /v1/completions``
(also without the ``/v1`` prefix) with a deterministic answer,
``"echo: " + <last user message or prompt>``, so a test can check that every
row of a result got *its own* answer back.  The same model also answers, each
in its vendor's request, answer and error shapes:

* Anthropic Messages: ``POST /v1/messages`` (key in ``x-api-key``; requires
  ``max_tokens``, refuses a ``system`` message role and temperature > 1;
  ``[[content_filter]]`` answers ``stop_reason: "refusal"``)
* Azure OpenAI: ``POST /openai/deployments/{deployment}/chat/completions``
  (and ``/completions``) with ``?api-version=...`` (key in ``api-key``; the
  deployment plays the model; ``[[content_filter]]`` answers 400 ``content_filter``
  as Azure's prompt filter does)
* Gemini: ``POST /v1beta/models/{model}:generateContent`` (key in
  ``x-goog-api-key`` or ``?key=``; a wrong key answers 400 ``API_KEY_INVALID``
  as Google does; a 429 says how long to wait in a ``RetryInfo`` detail of the
  body, not in headers; ``[[content_filter]]`` blocks the prompt with
  ``promptFeedback.blockReason``)

:meth:`FakeServer.endpoint_for` gives the ``endpoint=`` to pass to
``create_client`` for each provider.  Directives, chaos, latency and stats work
the same in every dialect.  On top of that it can simulate
everything a real provider does to a client: latency, auth errors, unknown
models, rate limits with ``retry-after``, 5xx errors, connection resets,
truncated bodies, HTML error pages, wrong JSON shapes, ... either on demand
(directives written into a prompt) or at random (seeded chaos mode).  It
records what it did, per prompt, so a test can compare the client's view with
the server's.

Example::

    from gen_ai_frames.testing import FakeServer

    with FakeServer(latency=0.01, api_key="k") as server:
        # server.url == "http://127.0.0.1:PORT/v1"; point any OpenAI client at it
        ...
        stats = server.stats()
        assert stats["max_in_flight"] <= 64

Command line (a separate process, e.g. for benchmarks)::

    python -m gen_ai_frames.testing.fake_server --port 0 --latency 0.05
    # prints: listening on http://127.0.0.1:PORT/v1

The "prompt" of a request (the key of the per-prompt stats, and where
directives are read) is the text of the last ``user`` message for chat, or
``prompt`` for completions (a list of prompts is joined with ``"\\n"``).

Rate limits, as providers enforce them: ``rate_limit_rpm`` (requests per minute) and/or
``rate_limit_tpm`` (tokens per minute: the prompt's words plus ``max_tokens``, charged when the
request arrives) are token buckets holding ``rate_limit_burst`` seconds of their rate (1 s). A
request over a limit is answered 429 at once (outcome ``"rate_limited"``). ``rate_limit_style``
says how the server tells the client:

=================  =====================================================================
``"headers"``      every answer states the limits in the dialect's own headers: OpenAI's
                   ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (OpenAI, Azure;
                   resets as durations, ``"120ms"``), Anthropic's
                   ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (resets as
                   RFC 3339 times); a 429 adds ``retry-after-ms`` (OpenAI) and ``Retry-After``.
                   Gemini states no limits: its 429 has the wait in a ``RetryInfo`` detail.
``"retry_after"``  no rate-limit headers; a 429 carries only ``Retry-After`` (whole seconds).
=================  =====================================================================

Directives, written anywhere in the prompt, for targeted tests:

* ``[[status=NNN]]``: answer NNN with the dialect's error body; for 429 add
  ``[[retry_after=S]]`` (``retry-after: S`` header) and/or
  ``[[retry_after_ms=MS]]`` (``retry-after-ms`` header)
* ``[[fail_times=N]]``: the first N attempts of this exact prompt fail with
  ``[[status=...]]`` (default 500), later attempts succeed
* ``[[sleep=S]]``: sleep S more seconds before answering
* ``[[html]]``: 200 with an HTML page; ``[[context_length]]``: 400
  ``context_length_exceeded``; ``[[content_filter]]``: 200, content null,
  finish_reason ``content_filter``; ``[[error_body]]``: 200 with ``{"error": ...}``

Outcomes recorded per attempt (``stats()["outcomes"][prompt]``): ``"ok"``, a
chaos fault name (see :data:`FAULTS`), or for directives ``"<status>"``
(e.g. ``"503"``), ``"429_retry_after"``/``"429_plain"``, ``"rate_limited"``, ``"html"``,
``"context_length"``, ``"content_filter"``, ``"error_body"``; and
``"auth_error"``, ``"model_not_found"``, ``"bad_request"``.

Stats keys (``GET /stats`` or ``FakeServer.stats()``): ``requests``,
``in_flight``, ``max_in_flight``, ``per_prompt``, ``outcomes``,
``outcome_counts``, ``status_counts`` (keys are strings, e.g. ``"429"``),
``retry_after_violations``, ``retry_after_violation_details``,
``retry_after_windows_opened``, ``uptime``.  Other endpoints: ``POST /reset``,
``GET``/``POST /config``, ``GET /health``, ``GET /v1/models``.  The admin
endpoints need no API key (the server only listens on loopback).

Only aiohttp (and orjson when installed) are imported: this module must stay
cheap to start as a subprocess, so never import pandas or the rest of the
package from here.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

try:
    from .schema_answers import conforming_answer, violating_answer
except ImportError:  # run as a plain script: load the sibling module without the package (and pandas)
    import importlib.util as _util

    _spec = _util.spec_from_file_location(
        "_schema_answers", os.path.join(os.path.dirname(__file__), "schema_answers.py")
    )
    assert _spec is not None and _spec.loader is not None
    _schema_answers = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_schema_answers)
    conforming_answer, violating_answer = _schema_answers.conforming_answer, _schema_answers.violating_answer

_orjson: Any
try:  # orjson is ~5x faster than json for our small bodies; optional.
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

if _orjson is not None:
    _dumps: Callable[[Any], bytes] = _orjson.dumps
    _loads: Callable[[bytes], Any] = _orjson.loads
else:  # pragma: no cover - depends on the environment
    import json as _json

    def _dumps(obj: Any) -> bytes:
        return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def _loads(data: bytes) -> Any:
        return _json.loads(data)


__all__ = ["FAULTS", "FakeLLM", "FakeServer", "main"]

T = TypeVar("T")

#: Names of the faults chaos mode can inject (keys of the ``chaos`` setting).
FAULTS: tuple[str, ...] = (
    "429_retry_after",
    "429_plain",
    "500",
    "502",
    "503",
    "529",
    "reset",
    "slow",
    "html",
    "wrong_shape",
    "truncated",
    "length",
    "content_filter",
)

# Settings that can be changed at run time (constructor, configure(), POST /config).
_DEFAULTS: dict[str, Any] = {
    "api_key": None,
    "models": None,
    "default_model": "fake-model",
    "latency": 0.0,
    "latency_median": None,
    "latency_sigma": 0.5,
    "seed": 0,
    "chaos": {},
    "chaos_retry_after": 1.0,
    "chaos_slow_seconds": 30.0,
    "retry_after_grace": 0.05,
    "rate_limit_rpm": None,
    "rate_limit_tpm": None,
    "rate_limit_burst": 1.0,
    "rate_limit_style": "headers",
    # Structured output: the share of prompts whose *first* answer is broken JSON, or JSON that
    # breaks the schema (the answer to a retry is always right).
    "schema_broken_rate": 0.0,
    "schema_violation_rate": 0.0,
}
_RATE_LIMIT_STYLES = ("headers", "retry_after")
# Settings fixed once the socket is bound (constructor / command line only).
_SERVER_ONLY = ("host", "port", "access_log", "shutdown_timeout")

# Keep memory bounded when a broken client hammers the server during a window.
_MAX_VIOLATION_DETAILS = 1000
# Protect the server from silly `n` values; real APIs cap it too.
_MAX_N = 128

_DIRECTIVE_RE = re.compile(r"\[\[\s*([a-z_]+)\s*(?:=\s*([^\]\s]*)\s*)?\]\]")
_INT_DIRECTIVES = {"status", "fail_times"}
_FLOAT_DIRECTIVES = {"retry_after", "retry_after_ms", "sleep"}
_FLAG_DIRECTIVES = {"html", "context_length", "content_filter", "error_body"}

_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr>"
    b"<center>fake-gateway (gen_ai_frames FakeServer)</center></body></html>\n"
)

# The server never says *which* key was wrong: the key must not leak anywhere.
_AUTH_MESSAGE = (
    "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
)

_STATUS_ERRORS: dict[int, tuple[str, str, str | None]] = {
    # status: (message, type, code)
    400: ("Bad request (injected by FakeServer).", "invalid_request_error", None),
    401: (_AUTH_MESSAGE, "invalid_request_error", "invalid_api_key"),
    403: ("Forbidden (injected by FakeServer).", "invalid_request_error", None),
    404: ("Not found (injected by FakeServer).", "invalid_request_error", None),
    408: ("Request timed out (injected by FakeServer).", "timeout", None),
    429: (
        "Rate limit reached for requests (injected by FakeServer).",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway (injected by FakeServer).", "server_error", None),
    503: (
        "The server is overloaded or not ready yet (injected by FakeServer).",
        "server_error",
        None,
    ),
    529: ("Overloaded (injected by FakeServer).", "overloaded_error", "overloaded"),
}


class _BadRequest(Exception):
    """Raised while reading a request to answer 400 (or ``status``) with the dialect's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _error_payload(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, headers=headers, content_type="application/json")


def _error_response(
    status: int,
    message: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    default_message, type_, default_code = _STATUS_ERRORS.get(
        status,
        (
            f"Error {status} (injected by FakeServer).",
            "server_error" if status >= 500 else "invalid_request_error",
            None,
        ),
    )
    payload = _error_payload(
        message or default_message, type_, code if code is not None else default_code, param
    )
    return _json_response(payload, status=status, headers=headers)


def _format_seconds(seconds: float) -> str:
    # "1" rather than "1.0": integral values are what HTTP specifies; fractional
    # values are kept (most clients parse floats) so tests can use short waits.
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _word_count(text: str | None) -> int:
    return len(text.split()) if text else 0


def _content_text(content: Any) -> str | None:
    """Text of a chat message content: a string or a list of content parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return " ".join(parts)
    return str(content)


def _validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise run-time settings; raise ValueError/TypeError if bad."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in _DEFAULTS:
            raise TypeError(f"unknown FakeServer setting {key!r}")
        if key == "api_key":
            if value is not None and not isinstance(value, str):
                raise TypeError("api_key must be a string or None")
            value = value or None  # "" means no auth, like an unset env var
        elif key == "models":
            if value is not None:
                if isinstance(value, str) or not all(isinstance(m, str) for m in value):
                    raise TypeError("models must be a list of strings or None")
                value = list(value)
        elif key == "default_model":
            value = str(value)
        elif key in (
            "latency",
            "latency_sigma",
            "chaos_retry_after",
            "chaos_slow_seconds",
            "retry_after_grace",
        ):
            value = float(value)
            if value < 0 or math.isnan(value):
                raise ValueError(f"{key} must be >= 0")
        elif key in ("rate_limit_rpm", "rate_limit_tpm"):
            if value is not None:
                value = float(value)
                if not value > 0 or math.isinf(value):
                    raise ValueError(f"{key} must be > 0 (or None for no limit)")
        elif key in ("schema_broken_rate", "schema_violation_rate"):
            value = float(value)
            if not 0 <= value <= 1:
                raise ValueError(f"{key} must be in [0, 1]")
        elif key == "rate_limit_burst":
            value = float(value)
            if not value > 0 or math.isinf(value):
                raise ValueError("rate_limit_burst must be > 0 seconds")
        elif key == "rate_limit_style":
            if value not in _RATE_LIMIT_STYLES:
                raise ValueError(
                    f"rate_limit_style must be one of {', '.join(_RATE_LIMIT_STYLES)}; got {value!r}"
                )
        elif key == "latency_median":
            if value is not None:
                value = float(value)
                if not value > 0:
                    raise ValueError("latency_median must be > 0 (or None)")
        elif key == "seed":
            value = None if value is None else int(value)
        elif key == "chaos":
            value = dict(value or {})
            chaos: dict[str, float] = {}
            for name, prob in value.items():
                name = str(name)
                if name not in FAULTS:
                    raise ValueError(f"unknown chaos fault {name!r}; known: {', '.join(FAULTS)}")
                prob = float(prob)
                if not 0.0 <= prob <= 1.0:
                    raise ValueError(f"chaos probability for {name!r} must be in [0, 1]")
                if prob > 0:
                    chaos[name] = prob
            if sum(chaos.values()) > 1.0 + 1e-9:
                raise ValueError("chaos probabilities must sum to at most 1")
            value = chaos
        out[key] = value
    return out


# ------------------------------------------------------------------ rate limits
class _Bucket:
    """A token bucket: ``per_minute`` units a minute, holding ``burst`` seconds of them, full at start."""

    def __init__(self, per_minute: float, burst: float, now: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst)
        self.level = self.capacity
        self.at = now

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` units are there (0: now). A request larger than the whole bucket
        passes when the bucket is full, as it would otherwise wait forever."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        return max(0.0, (min(cost, self.capacity) - self.level) / self.rate)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again (what providers' ``reset`` headers say)."""
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``"120ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


def _rfc3339_in(seconds: float) -> str:
    """An RFC 3339 UTC time ``seconds`` from now (Anthropic's reset format)."""
    when = time.time() + seconds
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


# ------------------------------------------------------------------ dialects
#
# The same fake model speaks several vendors' APIs. A dialect knows one vendor's wire format:
# where the key goes, where the prompt and the options are in the body, and what answers and
# errors look like. FakeLLM._answer does everything else (stats, directives, chaos, latency)
# once for all of them, so every dialect gets the same test tools.

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    # status: (type, message)
    400: ("invalid_request_error", "Bad request (injected by FakeServer)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Billing error (injected by FakeServer)."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "Not found (injected by FakeServer)."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit (injected by FakeServer)."),
    500: ("api_error", "Internal server error (injected by FakeServer)."),
    504: ("timeout_error", "Request timed out (injected by FakeServer)."),
    529: ("overloaded_error", "Overloaded"),
}

# Fields the Messages API accepts; it rejects any other ("Extra inputs are not permitted").
_ANTHROPIC_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
    }
)

_GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# Google's JSON parser rejects unknown fields; it accepts lowerCamel and snake_case names.
_GEMINI_FIELDS = frozenset(
    {
        "contents",
        "systemInstruction",
        "generationConfig",
        "safetySettings",
        "tools",
        "toolConfig",
        "cachedContent",
        "labels",
    }
)
_GEMINI_CONFIG_FIELDS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "mediaResolution",
    }
)

_AZURE_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _answer_text(prompt: str, outcome: str, max_tokens: int | None) -> tuple[str | None, str]:
    """The echo answer and why it ended: ``"stop"``, ``"length"`` or ``"content_filter"``."""
    text = "echo: " + prompt
    if outcome == "content_filter":
        return None, "content_filter"
    if outcome == "length":
        words = text.split()
        return " ".join(words[: max(1, len(words) // 2)]), "length"
    if max_tokens is not None:
        words = text.split()
        if len(words) > max_tokens:
            return " ".join(words[: max(0, max_tokens)]), "length"
    return text, "stop"


def _first_user_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = [
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return "".join(texts) if texts else None
    return None


def _structured_request(dialect: str, data: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON Schema a request asks its answer to match (if any), and its first user prompt."""
    schema = prompt = None
    if dialect == "anthropic":
        tools, choice = data.get("tools"), data.get("tool_choice")
        if isinstance(tools, list) and tools and isinstance(choice, dict) and choice.get("type") == "tool":
            schema = next((t.get("input_schema") for t in tools if t.get("name") == choice.get("name")), None)
        first = next((m for m in data.get("messages") or [] if m.get("role") == "user"), None)
        prompt = None if first is None else _first_user_text(first.get("content"))
    elif dialect == "gemini":
        config = data.get("generationConfig") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        contents = data.get("contents") or []
        prompt = _first_user_text((contents[0].get("parts") if contents else None) or [])
    else:
        response_format = data.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
        first = next((m for m in data.get("messages") or [] if m.get("role") == "user"), None)
        prompt = None if first is None else _first_user_text(first.get("content"))
    return (schema if isinstance(schema, dict) else None), prompt


def _put_structured(dialect: str, payload: dict[str, Any], text: str, answer: Any) -> None:
    if dialect == "anthropic":
        payload["content"] = [{"type": "tool_use", "id": "toolu_fake", "name": "answer", "input": answer}]
        payload["stop_reason"] = "tool_use"
    elif dialect == "gemini":
        payload["candidates"][0]["content"]["parts"] = [{"text": text}]
    elif "message" in payload["choices"][0]:
        for choice in payload["choices"]:
            choice["message"]["content"] = text


def _put_logprobs(dialect: str, payload: dict[str, Any]) -> None:
    if dialect == "gemini":
        for candidate in payload.get("candidates", []):
            words = "".join(p.get("text", "") for p in candidate["content"]["parts"]).split()
            candidate["logprobsResult"] = {
                "chosenCandidates": [{"token": w, "logProbability": -0.05} for w in words]
            }
    elif dialect != "anthropic":
        for choice in payload.get("choices", []):
            text = choice.get("message", {}).get("content") or ""
            choice["logprobs"] = {
                "content": [
                    {"token": w, "logprob": -0.05, "bytes": None, "top_logprobs": []} for w in text.split()
                ]
            }


def _int_option(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _BadRequest(f"{name} must be an integer", param=name)
    try:
        return int(value)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer", param=name) from None


class _OpenAIDialect:
    """OpenAI Chat Completions (``chat=True``) or legacy Completions."""

    name = "openai"
    #: True when the key is sent as ``Authorization: Bearer <key>``.
    bearer = True
    #: Gemini tells clients how long to wait in the error body, not in headers.
    retry_in_body = False
    parse_error_message = (
        "We could not parse the JSON body of your request. (HINT: This likely "
        "means you aren't using your HTTP library correctly.)"
    )

    def __init__(self, chat: bool) -> None:
        self.chat = chat

    def credential(self, request: web.Request) -> bytes:
        return request.headers.get("Authorization", "").encode()

    def auth_error(self, request: web.Request) -> web.Response:
        return _error_response(401)

    def extract(self, data: Any, request: web.Request) -> tuple[list[str], int]:
        """Prompt(s) used for the answer/stats, and the prompt token count."""
        if not isinstance(data, dict):
            raise _BadRequest("The request body must be a JSON object.")
        if self.chat:
            messages = data.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' is a required property", param="messages")
            last_user: str | None = None
            last_any: str | None = None
            tokens = 0
            for msg in messages:
                if not isinstance(msg, dict):
                    raise _BadRequest("each message must be an object", param="messages")
                text = _content_text(msg.get("content"))
                tokens += _word_count(text)
                if text is not None:
                    last_any = text
                    if msg.get("role") == "user":
                        last_user = text
            prompt = last_user if last_user is not None else (last_any or "")
            return [prompt], max(1, tokens)
        raw_prompt = data.get("prompt")
        if isinstance(raw_prompt, str):
            prompts = [raw_prompt]
        elif isinstance(raw_prompt, list) and raw_prompt and all(isinstance(p, str) for p in raw_prompt):
            prompts = list(raw_prompt)  # legacy batch: one choice per prompt
        elif isinstance(raw_prompt, list) and raw_prompt:
            prompts = [str(raw_prompt)]  # token ids: echo them as text
        else:
            raise _BadRequest("'prompt' is a required property", param="prompt")
        return prompts, max(1, sum(_word_count(p) for p in prompts))

    def model(self, data: dict[str, Any], request: web.Request) -> Any:
        return data.get("model")

    def options(self, data: dict[str, Any], request: web.Request) -> tuple[int, int | None]:
        """``(n, max_tokens)``; raises _BadRequest for values the API refuses."""
        if data.get("stream"):
            raise _BadRequest("stream=true is not supported by FakeServer", param="stream")
        try:
            n = int(data.get("n") or 1)
            max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
            max_tokens = None if max_tokens is None else int(max_tokens)
        except (TypeError, ValueError):
            raise _BadRequest("n and max_tokens must be integers") from None
        if not 1 <= n <= _MAX_N:
            raise _BadRequest(f"n must be between 1 and {_MAX_N}", param="n")
        return n, max_tokens

    def bad_request(self, exc: _BadRequest) -> web.Response:
        return _error_response(exc.status, exc.message, param=exc.param)

    def model_not_found(self, model: str) -> web.Response:
        return _error_response(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )

    def error(
        self, status: int, headers: Mapping[str, str] | None, retry_after: float | None, request: web.Request
    ) -> web.Response:
        return _error_response(status, headers=headers)

    def context_length(self) -> web.Response:
        return _error_response(
            400,
            "This model's maximum context length is 4096 tokens. However, your "
            "messages resulted in more tokens. Please reduce the length of the "
            "messages.",
            code="context_length_exceeded",
            param="messages",
        )

    def error_body(self) -> web.Response:
        return _json_response(
            _error_payload(
                "The server had an error while processing your request "
                "(error body with status 200, injected by FakeServer).",
                "server_error",
            )
        )

    def success(
        self,
        model: str,
        prompts: list[str],
        n: int,
        max_tokens: int | None,
        prompt_tokens: int,
        outcome: str,
        seq: int,
    ) -> dict[str, Any] | web.Response:
        """A success body (or the ``wrong_shape``/``length``/``content_filter`` variant)."""
        if self.chat:
            prompts = prompts[-1:]
        answers: list[tuple[str | None, str]] = []
        for prompt in prompts:
            answers.extend([_answer_text(prompt, outcome, max_tokens)] * n)
        completion_tokens = max(1, sum(_word_count(t) for t, _ in answers))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        created = int(time.time())
        if self.chat:
            body: dict[str, Any] = {
                "id": f"chatcmpl-fake{seq:010d}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i, (text, finish) in enumerate(answers)
                ],
                "usage": usage,
            }
        else:
            body = {
                "id": f"cmpl-fake{seq:010d}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": i,
                        "text": text if text is not None else "",
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i, (text, finish) in enumerate(answers)
                ],
                "usage": usage,
            }
        if outcome == "wrong_shape":
            # Looks like a success but has no "choices": the client must not crash.
            del body["choices"]
            body["result"] = answers[0][0]
        return body


class _AzureDialect(_OpenAIDialect):
    """Azure OpenAI: OpenAI bodies, the deployment in the path, ``api-key`` header,
    ``api-version`` query parameter, and a prompt filter that answers 400 ``content_filter``."""

    name = "azure"
    bearer = False

    def credential(self, request: web.Request) -> bytes:
        return request.headers.get("api-key", "").encode()

    def auth_error(self, request: web.Request) -> web.Response:
        return self.error(401, None, None, request)

    def model(self, data: dict[str, Any], request: web.Request) -> Any:
        return request.match_info["deployment"]

    def options(self, data: dict[str, Any], request: web.Request) -> tuple[int, int | None]:
        if not request.query.get("api-version"):
            raise _BadRequest("Resource not found", status=404)
        return super().options(data, request)

    def bad_request(self, exc: _BadRequest) -> web.Response:
        if exc.status == 404:
            return _json_response({"error": {"code": "404", "message": exc.message}}, status=404)
        return super().bad_request(exc)

    def model_not_found(self, model: str) -> web.Response:
        return _json_response(
            {
                "error": {
                    "code": "DeploymentNotFound",
                    "message": "The API deployment for this resource does not exist. If you created the "
                    "deployment within the last 5 minutes, please wait a moment and try again.",
                }
            },
            status=404,
        )

    def error(
        self, status: int, headers: Mapping[str, str] | None, retry_after: float | None, request: web.Request
    ) -> web.Response:
        message = _STATUS_ERRORS.get(status, (f"Error {status} (injected by FakeServer).",))[0]
        if status == 401:
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
        elif status == 429:
            version = request.query.get("api-version", "")
            message = (
                f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
                f"{version} have exceeded call rate limit of your current OpenAI S0 pricing tier "
                "(injected by FakeServer)."
            )
        return _json_response(
            {"error": {"code": str(status), "message": message}}, status=status, headers=headers
        )

    def success(
        self,
        model: str,
        prompts: list[str],
        n: int,
        max_tokens: int | None,
        prompt_tokens: int,
        outcome: str,
        seq: int,
    ) -> dict[str, Any] | web.Response:
        if outcome == "content_filter":
            # Azure filters the prompt before the model sees it, and says so with a 400.
            return _json_response(
                {
                    "error": {
                        "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                        "content management policy. Please modify your prompt and retry.",
                        "type": None,
                        "param": "prompt",
                        "code": "content_filter",
                        "status": 400,
                        "innererror": {
                            "code": "ResponsibleAIPolicyViolation",
                            "content_filter_result": {
                                **_AZURE_FILTER_RESULTS,
                                "violence": {"filtered": True, "severity": "high"},
                            },
                        },
                    }
                },
                status=400,
            )
        body = super().success(model, prompts, n, max_tokens, prompt_tokens, outcome, seq)
        if isinstance(body, dict) and "choices" in body:
            body["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": _AZURE_FILTER_RESULTS}
            ]
            for choice in body["choices"]:
                choice["content_filter_results"] = _AZURE_FILTER_RESULTS
        return body


class _AnthropicDialect(_OpenAIDialect):
    """Anthropic Messages API: ``x-api-key`` header, top-level ``system``, required ``max_tokens``."""

    name = "anthropic"
    bearer = False
    parse_error_message = "There was an error parsing the body of your request: it is not valid JSON."

    def __init__(self) -> None:
        super().__init__(chat=True)

    def credential(self, request: web.Request) -> bytes:
        return request.headers.get("x-api-key", "").encode()

    def auth_error(self, request: web.Request) -> web.Response:
        message = "invalid x-api-key" if "x-api-key" in request.headers else "x-api-key header is required"
        return self._error_response(401, message)

    @staticmethod
    def _error_response(
        status: int,
        message: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
        http_status: int | None = None,
    ) -> web.Response:
        default_type, default_message = _ANTHROPIC_ERRORS.get(
            status,
            (
                "api_error" if status >= 500 else "invalid_request_error",
                f"Error {status} (injected by FakeServer).",
            ),
        )
        body = {
            "type": "error",
            "error": {"type": type_ or default_type, "message": message or default_message},
            "request_id": "req_fake",
        }
        return _json_response(body, status=http_status or status, headers=headers)

    def extract(self, data: Any, request: web.Request) -> tuple[list[str], int]:
        if not isinstance(data, dict):
            raise _BadRequest("The request body must be a JSON object.")
        for name in data:
            if name not in _ANTHROPIC_FIELDS:
                raise _BadRequest(f"{name}: Extra inputs are not permitted")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest(
                "messages: Field required"
                if messages is None
                else "messages: at least one message is required"
            )
        system = data.get("system")
        tokens = _word_count(_content_text(system)) if system is not None else 0
        prompt = ""
        for msg in messages:
            if not isinstance(msg, dict):
                raise _BadRequest("messages: each message must be an object")
            role = msg.get("role")
            if role == "system":
                raise _BadRequest(
                    'messages: Unexpected role "system". The Messages API accepts a top-level '
                    '`system` parameter, not "system" as an input message role.'
                )
            if role not in ("user", "assistant"):
                raise _BadRequest(f"messages: Input should be 'user' or 'assistant', got {role!r}")
            text = _content_text(msg.get("content")) or ""
            tokens += _word_count(text)
            if role == "user":
                prompt = text
        return [prompt], max(1, tokens)

    def options(self, data: dict[str, Any], request: web.Request) -> tuple[int, int | None]:
        if "model" not in data:
            raise _BadRequest("model: Field required")
        if data.get("stream"):
            raise _BadRequest("stream=true is not supported by FakeServer")
        if "max_tokens" not in data:
            raise _BadRequest("max_tokens: Field required")
        max_tokens = _int_option(data["max_tokens"], "max_tokens")
        if max_tokens is None or max_tokens < 1:
            raise _BadRequest("max_tokens: Input should be greater than or equal to 1")
        temperature = data.get("temperature")
        if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
            raise _BadRequest("temperature: Input should be less than or equal to 1")
        return 1, max_tokens

    def bad_request(self, exc: _BadRequest) -> web.Response:
        return self._error_response(exc.status, exc.message)

    def model_not_found(self, model: str) -> web.Response:
        return self._error_response(404, f"model: {model}")

    def error(
        self, status: int, headers: Mapping[str, str] | None, retry_after: float | None, request: web.Request
    ) -> web.Response:
        return self._error_response(status, headers=headers)

    def context_length(self) -> web.Response:
        return self._error_response(400, "prompt is too long: 200001 tokens > 200000 maximum")

    def error_body(self) -> web.Response:
        return self._error_response(
            500,
            "Internal server error (error body with status 200, injected by FakeServer).",
            http_status=200,
        )

    def success(
        self,
        model: str,
        prompts: list[str],
        n: int,
        max_tokens: int | None,
        prompt_tokens: int,
        outcome: str,
        seq: int,
    ) -> dict[str, Any] | web.Response:
        text, finish = _answer_text(prompts[-1], outcome, max_tokens)
        stop_reason = {"stop": "end_turn", "length": "max_tokens", "content_filter": "refusal"}[finish]
        body: dict[str, Any] = {
            "id": f"msg_fake{seq:010d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [] if text is None else [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": max(1, _word_count(text))},
        }
        if outcome == "wrong_shape":
            del body["content"]
            body["completion"] = text
        return body


class _GeminiDialect(_OpenAIDialect):
    """Gemini ``models/{model}:generateContent``: ``x-goog-api-key`` header (or ``?key=``),
    ``contents``/``parts``, ``generationConfig``, google.rpc error bodies."""

    name = "gemini"
    bearer = False
    retry_in_body = True
    parse_error_message = "Invalid JSON payload received. Unexpected token."

    def __init__(self) -> None:
        super().__init__(chat=True)

    def credential(self, request: web.Request) -> bytes:
        return (request.headers.get("x-goog-api-key") or request.query.get("key") or "").encode()

    def auth_error(self, request: web.Request) -> web.Response:
        if not self.credential(request):
            return self._error_response(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        # Google answers a wrong key with 400, not 401.
        return self._error_response(
            400,
            "API key not valid. Please pass a valid API key.",
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }
            ],
        )

    @staticmethod
    def _error_response(
        status: int,
        message: str | None = None,
        details: list[Any] | None = None,
        http_status: int | None = None,
    ) -> web.Response:
        error: dict[str, Any] = {
            "code": status,
            "message": message or f"Error {status} (injected by FakeServer).",
            "status": _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION"),
        }
        if details:
            error["details"] = details
        return _json_response({"error": error}, status=http_status or status)

    def extract(self, data: Any, request: web.Request) -> tuple[list[str], int]:
        if not isinstance(data, dict):
            raise _BadRequest("Invalid JSON payload received. Expected an object.")
        for name in data:
            if _camel(name) not in _GEMINI_FIELDS:
                raise _BadRequest(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        config = data.get("generationConfig", data.get("generation_config")) or {}
        if not isinstance(config, dict):
            raise _BadRequest("Invalid JSON payload received. generationConfig must be an object.")
        for name in config:
            if _camel(name) not in _GEMINI_CONFIG_FIELDS:
                raise _BadRequest(
                    f'Invalid JSON payload received. Unknown name "{name}" at '
                    "'generation_config': Cannot find field."
                )
        contents = data.get("contents")
        if not isinstance(contents, list) or not contents:
            raise _BadRequest("* GenerateContentRequest.contents: contents is not specified")
        system = data.get("systemInstruction", data.get("system_instruction"))
        tokens = 0
        if isinstance(system, dict):
            tokens += _word_count(_content_text(system.get("parts")))
        prompt = ""
        for content in contents:
            if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
                raise _BadRequest("* GenerateContentRequest.contents: contents.parts must not be empty.")
            role = content.get("role")
            if role not in (None, "user", "model"):
                raise _BadRequest("Please use a valid role: user, model.")
            text = _content_text(content["parts"]) or ""
            tokens += _word_count(text)
            if role != "model":
                prompt = text
        return [prompt], max(1, tokens)

    def model(self, data: dict[str, Any], request: web.Request) -> Any:
        return request.match_info["model_action"].rpartition(":")[0]

    def options(self, data: dict[str, Any], request: web.Request) -> tuple[int, int | None]:
        config = data.get("generationConfig", data.get("generation_config")) or {}
        max_tokens = _int_option(
            config.get("maxOutputTokens", config.get("max_output_tokens")), "maxOutputTokens"
        )
        temperature = config.get("temperature")
        if isinstance(temperature, (int, float)) and not 0 <= temperature <= 2:
            raise _BadRequest("* GenerateContentRequest.generation_config.temperature: must be in [0, 2]")
        return 1, max_tokens

    def bad_request(self, exc: _BadRequest) -> web.Response:
        return self._error_response(exc.status, exc.message)

    def model_not_found(self, model: str) -> web.Response:
        return self._error_response(
            404,
            f"models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        )

    def error(
        self, status: int, headers: Mapping[str, str] | None, retry_after: float | None, request: web.Request
    ) -> web.Response:
        details = None
        if status == 429 and retry_after is not None:
            details = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after:g}s"}
            ]
        message = "You exceeded your current quota (injected by FakeServer)." if status == 429 else None
        return self._error_response(status, message, details)

    def context_length(self) -> web.Response:
        return self._error_response(
            400, "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
        )

    def error_body(self) -> web.Response:
        return self._error_response(
            500,
            "An internal error has occurred (error body with status 200, injected by FakeServer).",
            http_status=200,
        )

    def success(
        self,
        model: str,
        prompts: list[str],
        n: int,
        max_tokens: int | None,
        prompt_tokens: int,
        outcome: str,
        seq: int,
    ) -> dict[str, Any] | web.Response:
        text, finish = _answer_text(prompts[-1], outcome, max_tokens)
        if text is None:
            # A blocked prompt: no candidates at all, only the feedback.
            return {
                "promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                "modelVersion": model,
            }
        completion_tokens = max(1, _word_count(text))
        body: dict[str, Any] = {
            "candidates": [
                {
                    "content": {"parts": [{"text": text}], "role": "model"},
                    "finishReason": "MAX_TOKENS" if finish == "length" else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": completion_tokens,
                "totalTokenCount": prompt_tokens + completion_tokens,
            },
            "modelVersion": model,
            "responseId": f"fake{seq:010d}",
        }
        if outcome == "wrong_shape":
            del body["candidates"]
            body["result"] = text
        return body


_OPENAI_CHAT = _OpenAIDialect(chat=True)
_OPENAI_COMPLETIONS = _OpenAIDialect(chat=False)
_AZURE_CHAT = _AzureDialect(chat=True)
_AZURE_COMPLETIONS = _AzureDialect(chat=False)
_ANTHROPIC = _AnthropicDialect()
_GEMINI = _GeminiDialect()


class FakeLLM:
    """The fake server's state and aiohttp handlers, independent of how it is run.

    :class:`FakeServer` runs it in a background thread; :func:`main` runs it in
    the foreground.  You can also mount :meth:`make_app` in your own aiohttp
    test setup.  All methods must be called from the event loop that serves
    the app (plain attribute/dict updates, no locks: one loop, one thread).

    Example::

        fake = FakeLLM(chaos={"500": 0.1}, seed=1)
        runner = fake.make_runner()   # then web.TCPSite(runner, ...)
    """

    def __init__(self, **settings: Any) -> None:
        self.settings: dict[str, Any] = dict(_DEFAULTS)
        self.settings["chaos"] = {}
        self._latency_rng = random.Random(0)
        self._auth_header: bytes | None = None
        self._key: bytes | None = None
        self.configure(**settings)
        self.reset()

    # ----------------------------------------------------------------- settings
    def configure(self, **settings: Any) -> dict[str, Any]:
        """Update run-time settings (validated as a whole first); return them."""
        clean = _validate(settings)
        self.settings.update(clean)
        if "seed" in clean:
            self._latency_rng = random.Random(self.settings["seed"])
        key = self.settings["api_key"]
        # Pre-encode once so the per-request check is a single compare_digest.
        self._auth_header = None if key is None else b"Bearer " + key.encode()
        self._key = None if key is None else key.encode()  # other dialects send the bare key
        if any(key.startswith("rate_limit_") for key in clean) or not hasattr(self, "_buckets"):
            self._fill_buckets()
        # Cumulative table so choosing a fault is one uniform draw.
        self._chaos_table: list[tuple[float, str]] = []
        acc = 0.0
        for name in FAULTS:  # fixed order: same seed -> same faults, whatever the dict order
            prob = self.settings["chaos"].get(name, 0.0)
            if prob > 0:
                acc += prob
                self._chaos_table.append((acc, name))
        return self.public_config()

    def public_config(self) -> dict[str, Any]:
        """Current settings, with the API key replaced by whether one is set."""
        cfg = {k: v for k, v in self.settings.items() if k != "api_key"}
        cfg["chaos"] = dict(cfg["chaos"])
        cfg["api_key_set"] = self.settings["api_key"] is not None
        return cfg

    # -------------------------------------------------------------------- stats
    def reset(self) -> None:
        """Clear all counters (settings are kept)."""
        self.started = time.monotonic()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.per_prompt: dict[str, int] = {}
        self.outcomes: dict[str, list[str]] = {}
        self.outcome_counts: dict[str, int] = {}
        self.status_counts: dict[str, int] = {}
        self.retry_after_violations = 0
        self.retry_after_violation_details: list[dict[str, Any]] = []
        self.retry_after_windows_opened = 0
        self._windows: list[tuple[float, float]] = []
        self._next_id = 0
        self._schema_asks: dict[str, int] = {}
        self._fill_buckets()

    def _fill_buckets(self) -> None:
        """Full buckets for the configured limits (at start, on reset and when they change)."""
        now = time.monotonic()
        burst = self.settings["rate_limit_burst"]
        self._buckets: dict[str, _Bucket] = {
            kind: _Bucket(per_minute, burst, now)
            for kind, per_minute in (
                ("requests", self.settings["rate_limit_rpm"]),
                ("tokens", self.settings["rate_limit_tpm"]),
            )
            if per_minute is not None
        }

    def _admit(self, dialect: _OpenAIDialect, tokens: int, now: float) -> tuple[float, dict[str, str]]:
        """Charge one request to the rate limits: ``(seconds to wait, headers)``; 0 s means admitted.
        A refused request is charged nothing, as providers do."""
        costs = {"requests": 1.0, "tokens": float(tokens)}
        wait = max(bucket.wait_for(costs[kind], now) for kind, bucket in self._buckets.items())
        if wait == 0:  # all or nothing: a refused request is charged nothing, as providers do
            for kind, bucket in self._buckets.items():
                bucket.level = max(0.0, bucket.level - costs[kind])
        headers: dict[str, str] = {}
        if self.settings["rate_limit_style"] == "headers":
            for kind, bucket in self._buckets.items():
                remaining, reset = str(int(bucket.level)), bucket.reset_in()
                if dialect.name == "anthropic":
                    prefix = f"anthropic-ratelimit-{kind}-"
                    headers.update(
                        {
                            prefix + "limit": f"{bucket.per_minute:g}",
                            prefix + "remaining": remaining,
                            prefix + "reset": _rfc3339_in(reset),
                        }
                    )
                elif dialect.name in ("openai", "azure"):
                    headers.update(
                        {
                            f"x-ratelimit-limit-{kind}": f"{bucket.per_minute:g}",
                            f"x-ratelimit-remaining-{kind}": remaining,
                            f"x-ratelimit-reset-{kind}": _duration(reset),
                        }
                    )
        return wait, headers

    def stats(self) -> dict[str, Any]:
        """A snapshot (copies) of the counters; see the module docs for the keys."""
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "per_prompt": dict(self.per_prompt),
            "outcomes": {k: list(v) for k, v in self.outcomes.items()},
            "outcome_counts": dict(self.outcome_counts),
            "status_counts": dict(self.status_counts),
            "retry_after_violations": self.retry_after_violations,
            "retry_after_violation_details": [dict(d) for d in self.retry_after_violation_details],
            "retry_after_windows_opened": self.retry_after_windows_opened,
            "uptime": time.monotonic() - self.started,
        }

    def _record(self, prompt_key: str | None, outcome: str) -> None:
        self.outcome_counts[outcome] = self.outcome_counts.get(outcome, 0) + 1
        if prompt_key is not None:
            lst = self.outcomes.get(prompt_key)
            if lst is None:
                self.outcomes[prompt_key] = [outcome]
            else:
                lst.append(outcome)

    def _open_window(self, seconds: float) -> None:
        # Called when the 429 is actually sent, so the window starts at "t".
        now = time.monotonic()
        self._windows.append((now + self.settings["retry_after_grace"], now + seconds))
        self.retry_after_windows_opened += 1

    def _window_at(self, now: float) -> tuple[float, float] | None:
        windows = self._windows
        if not windows:
            return None
        live = [w for w in windows if w[1] > now]
        if len(live) != len(windows):
            self._windows = live
        for w in live:
            if w[0] <= now:
                return w
        return None

    # ------------------------------------------------------------------- aiohttp
    def make_app(self) -> web.Application:
        """The aiohttp application: OpenAI routes with and without ``/v1``, and the other dialects'."""
        # Large prompts are legitimate; aiohttp's default limit is 1 MiB.
        app = web.Application(client_max_size=64 * 1024**2)
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._handle_chat)
            app.router.add_post(prefix + "/completions", self._handle_completions)
            app.router.add_get(prefix + "/models", self._handle_models)
            app.router.add_post(prefix + "/messages", self._handle_anthropic)
        deployment = "/openai/deployments/{deployment}"
        app.router.add_post(deployment + "/chat/completions", self._handle_azure_chat)
        app.router.add_post(deployment + "/completions", self._handle_azure_completions)
        for version in ("/v1beta", "/v1"):
            app.router.add_post(version + "/models/{model_action}", self._handle_gemini)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/reset", self._handle_reset)
        app.router.add_get("/config", self._handle_get_config)
        app.router.add_post("/config", self._handle_config)
        app.router.add_get("/health", self._handle_health)
        return app

    def make_runner(self, *, access_log: bool = False, shutdown_timeout: float = 0.25) -> web.AppRunner:
        """An AppRunner tuned for tests: no access log, handlers cancelled on
        client disconnect (so ``in_flight`` reflects open requests, and a
        ``slow`` answer does not outlive the client's timeout), quick shutdown."""
        kwargs: dict[str, Any] = {}
        if not access_log:
            kwargs["access_log"] = None  # per-request logging costs ~10% throughput
        return web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            shutdown_timeout=shutdown_timeout,
            **kwargs,
        )

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response({"ok": True})

    async def _handle_get_config(self, request: web.Request) -> web.Response:
        return _json_response(self.public_config())

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            data = _loads(await request.read())
            if not isinstance(data, dict):
                raise TypeError("POST /config expects a JSON object")
            cfg = self.configure(**data)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return _error_response(400, f"invalid config: {exc}")
        return _json_response(cfg)

    async def _handle_health(self, request: web.Request) -> web.Response:
        return _json_response({"status": "ok"})

    async def _handle_models(self, request: web.Request) -> web.Response:
        names = self.settings["models"] or [self.settings["default_model"]]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]
        return _json_response({"object": "list", "data": data})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _OPENAI_CHAT)

    async def _handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _OPENAI_COMPLETIONS)

    async def _handle_anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _ANTHROPIC)

    async def _handle_azure_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _AZURE_CHAT)

    async def _handle_azure_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _AZURE_COMPLETIONS)

    async def _handle_gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["model_action"].rpartition(":")
        if method != "generateContent" or not model:
            # Only the non-streaming method is faked; anything else is an unknown route.
            return _GeminiDialect._error_response(
                404,
                f"Method {method or request.match_info['model_action']!r} is not supported "
                "by FakeServer (only :generateContent).",
            )
        return await self._handle_llm(request, _GEMINI)

    async def _handle_llm(self, request: web.Request, dialect: _OpenAIDialect) -> web.StreamResponse:
        arrival = time.monotonic()
        self.requests += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            resp = await self._answer(request, dialect, arrival)
        finally:
            # Also runs when aiohttp cancels the handler (client went away).
            self.in_flight -= 1
        key = str(resp.status)
        self.status_counts[key] = self.status_counts.get(key, 0) + 1
        return resp

    # --------------------------------------------------------------- the answer
    async def _answer(
        self, request: web.Request, dialect: _OpenAIDialect, arrival: float
    ) -> web.StreamResponse:
        settings = self.settings
        window = self._window_at(arrival)
        body = await request.read()

        # Parse first (even when auth fails) so every attempt is recorded per prompt.
        data: Any = None
        parse_error: str | None = None
        try:
            data = _loads(body)
        except ValueError:
            parse_error = dialect.parse_error_message
        prompts: list[str] = []
        prompt_key: str | None = None
        bad: _BadRequest | None = None
        prompt_tokens = 0
        if parse_error is None:
            try:
                prompts, prompt_tokens = dialect.extract(data, request)
                prompt_key = prompts[0] if len(prompts) == 1 else "\n".join(prompts)
            except _BadRequest as exc:
                bad = exc

        attempt = 0
        if prompt_key is not None:
            attempt = self.per_prompt.get(prompt_key, 0)
            self.per_prompt[prompt_key] = attempt + 1

        if window is not None:
            self.retry_after_violations += 1
            if len(self.retry_after_violation_details) < _MAX_VIOLATION_DETAILS:
                self.retry_after_violation_details.append(
                    {
                        "at": arrival - self.started,
                        "window_start": window[0] - self.started,
                        "window_end": window[1] - self.started,
                        "path": request.path,
                        "prompt": prompt_key,
                    }
                )

        expected = self._auth_header if dialect.bearer else self._key
        if expected is not None:
            if not hmac.compare_digest(dialect.credential(request), expected):
                self._record(prompt_key, "auth_error")
                return dialect.auth_error(request)

        if parse_error is not None:
            self._record(None, "bad_request")
            return dialect.bad_request(_BadRequest(parse_error))
        if bad is not None:
            self._record(prompt_key, "bad_request")
            return dialect.bad_request(bad)

        model = dialect.model(data, request)
        models = settings["models"]
        if models is not None:
            if model is None:
                self._record(prompt_key, "bad_request")
                return dialect.bad_request(_BadRequest("you must provide a model parameter", param="model"))
            if model not in models:
                self._record(prompt_key, "model_not_found")
                return dialect.model_not_found(model)
        if not isinstance(model, str):
            model = settings["default_model"]
        try:
            n, max_tokens = dialect.options(data, request)
        except _BadRequest as exc:
            self._record(prompt_key, "bad_request")
            return dialect.bad_request(exc)

        # Directives ("[[...]]") only exist in targeted tests: cheap substring test first.
        directive_text = prompts[-1] if dialect.chat else prompt_key or ""
        directives: dict[str, Any] = {}
        if "[[" in directive_text:
            try:
                directives = self._parse_directives(directive_text)
            except _BadRequest as exc:
                self._record(prompt_key, "bad_request")
                return dialect.bad_request(exc)

        rate_headers: dict[str, str] | None = None
        if self._buckets:
            wait, rate_headers = self._admit(dialect, prompt_tokens + (max_tokens or 0), time.monotonic())
            if wait > 0:
                self._record(prompt_key, "rate_limited")
                return self._rate_limited(dialect, wait, rate_headers, request)

        outcome, status, retry_after = self._decide(directives, prompt_key or "", attempt)
        self._record(prompt_key, outcome)

        delay = settings["latency"]
        if settings["latency_median"] is not None:
            delay = self._latency_rng.lognormvariate(
                math.log(settings["latency_median"]), settings["latency_sigma"]
            )
        delay += directives.get("sleep", 0.0)
        if outcome == "slow":
            delay += settings["chaos_slow_seconds"]
        if delay > 0:
            await asyncio.sleep(delay)

        if status >= 400:
            headers: dict[str, str] = {}
            if status == 429 and retry_after is not None:
                headers["retry-after"] = _format_seconds(retry_after)
                if outcome == "429_retry_after" and "retry_after" not in directives:
                    # Chaos mode: also the OpenAI-style millisecond header.
                    headers["retry-after-ms"] = str(int(retry_after * 1000))
            if "retry_after_ms" in directives:
                headers["retry-after-ms"] = str(int(directives["retry_after_ms"]))
            pause: float | None = None
            if status == 429 and headers:
                pause = retry_after
                if pause is None:
                    pause = directives["retry_after_ms"] / 1000.0
                self._open_window(pause)
            if dialect.retry_in_body:
                headers = {}  # the wait travels in the error body instead
            if outcome == "context_length":
                return dialect.context_length()
            return dialect.error(status, headers or None, pause, request)

        if outcome == "html":
            return web.Response(body=_HTML_PAGE, content_type="text/html", charset="utf-8")
        if outcome == "error_body":
            return dialect.error_body()

        self._next_id += 1
        payload = dialect.success(model, prompts, n, max_tokens, prompt_tokens, outcome, self._next_id)
        if isinstance(payload, web.StreamResponse):
            return payload
        if outcome == "ok" and isinstance(data, dict):
            self._answer_structured(dialect.name, data, payload)
        if outcome == "reset":
            return await self._send_reset(request, _dumps(payload))
        if outcome == "truncated":
            return await self._send_truncated(request, _dumps(payload))
        return _json_response(payload, headers=rate_headers)

    def _answer_structured(self, dialect: str, data: dict[str, Any], payload: dict[str, Any]) -> None:
        """With a schema in the request (each dialect's own field), answer JSON that matches it,
        derived from the first user prompt; with logprobs asked for, return them (-0.05 a word)."""
        schema, prompt = _structured_request(dialect, data)
        if schema is not None and prompt is not None:
            asks = self._schema_asks[prompt] = self._schema_asks.get(prompt, 0) + 1
            draw = zlib.crc32(f"{self.settings['seed']}|{prompt}".encode()) / 2**32
            broken_rate, violation_rate = (
                self.settings["schema_broken_rate"],
                self.settings["schema_violation_rate"],
            )
            answer: Any = conforming_answer(schema, prompt)
            text = json.dumps(answer)
            if asks == 1 and draw < broken_rate:
                text = text[: len(text) // 2]  # cut off mid-object: not valid JSON
            elif asks == 1 and draw < broken_rate + violation_rate:
                answer = violating_answer(schema, prompt)
                text = json.dumps(answer)
            _put_structured(dialect, payload, text, answer)
        wants_logprobs = data.get("logprobs") is True or (
            dialect == "gemini" and (data.get("generationConfig") or {}).get("responseLogprobs") is True
        )
        if wants_logprobs:
            _put_logprobs(dialect, payload)

    def _rate_limited(
        self, dialect: _OpenAIDialect, wait: float, headers: dict[str, str], request: web.Request
    ) -> web.Response:
        """The 429 of a request over a rate limit, telling the wait as the style and dialect do."""
        seconds = max(1, math.ceil(wait))  # Retry-After is whole seconds
        if self.settings["rate_limit_style"] == "headers" and dialect.name in ("openai", "azure"):
            headers = {**headers, "retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(seconds)}
            advertised = math.ceil(wait * 1000) / 1000
        else:
            headers = {**headers, "retry-after": str(seconds)}
            advertised = float(seconds)
        self._open_window(advertised)
        if dialect.retry_in_body:
            headers = {}  # Gemini: the wait travels in the error body instead
        return dialect.error(429, headers, advertised, request)

    @staticmethod
    def _parse_directives(text: str) -> dict[str, Any]:
        directives: dict[str, Any] = {}
        for name, value in _DIRECTIVE_RE.findall(text):
            try:
                if name in _INT_DIRECTIVES:
                    directives[name] = int(value)
                elif name in _FLOAT_DIRECTIVES:
                    directives[name] = float(value)
                elif name in _FLAG_DIRECTIVES:
                    directives[name] = True
                # Unknown names are left alone: "[[x]]" may just be prompt text.
            except ValueError:
                raise _BadRequest(f"bad directive value [[{name}={value}]]") from None
        status = directives.get("status")
        if status is not None and not 100 <= status <= 599:
            raise _BadRequest(f"bad directive [[status={status}]]")
        return directives

    def _decide(
        self, directives: Mapping[str, Any], prompt: str, attempt: int
    ) -> tuple[str, int, float | None]:
        """Return (outcome name, status, retry-after seconds or None)."""
        if directives:
            status = directives.get("status")
            fail_times = directives.get("fail_times")
            if fail_times is not None:
                if attempt < fail_times:
                    return self._status_outcome(status or 500, directives)
                status = None  # recovered: answer normally from now on
            if status is not None and status >= 400:
                return self._status_outcome(status, directives)
            if directives.get("context_length"):
                return "context_length", 400, None
            for flag in ("html", "content_filter", "error_body"):
                if directives.get(flag):
                    return flag, 200, None
            if fail_times is not None:
                return "ok", 200, None
        if self._chaos_table:
            # Hash of (seed, prompt, attempt) instead of a shared RNG stream: the
            # same prompt gets the same faults on the same attempt whatever order
            # concurrent requests arrive in, so seeded runs are reproducible.
            seed = self.settings["seed"]
            digest = hashlib.blake2b(
                f"{seed}\x00{attempt}\x00{prompt}".encode("utf-8", "surrogatepass"),
                digest_size=8,
            ).digest()
            u = int.from_bytes(digest, "big") / 18446744073709551616.0
            for threshold, name in self._chaos_table:
                if u < threshold:
                    return self._chaos_outcome(name)
        return "ok", 200, None

    @staticmethod
    def _status_outcome(status: int, directives: Mapping[str, Any]) -> tuple[str, int, float | None]:
        if status == 429:
            retry_after = directives.get("retry_after")
            has_header = retry_after is not None or "retry_after_ms" in directives
            return ("429_retry_after" if has_header else "429_plain"), 429, retry_after
        return str(status), status, None

    def _chaos_outcome(self, name: str) -> tuple[str, int, float | None]:
        if name == "429_retry_after":
            return name, 429, self.settings["chaos_retry_after"]
        if name in ("429_plain", "500", "502", "503", "529"):
            return name, int(name[:3]), None
        return name, 200, None

    @staticmethod
    async def _send_reset(request: web.Request, body: bytes) -> web.StreamResponse:
        """Headers and half the body, then a hard close (RST) of the connection."""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:  # linger 0 turns the close into a real TCP reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:  # pragma: no cover - platform dependent
                    pass
            transport.abort()
        # aiohttp's write_eof() then hits the closed transport; it ignores ConnectionError.
        return resp

    @staticmethod
    async def _send_truncated(request: web.Request, body: bytes) -> web.StreamResponse:
        """The whole body, but a Content-Length promising more, then a clean close."""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.content_length = len(body) + 64
        await resp.prepare(request)
        await resp.write(body)
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then FIN
        return resp


class FakeServer:
    """Run a :class:`FakeLLM` on 127.0.0.1 in a background thread.

    Settings (all keyword arguments, all optional):

    * ``host`` (``"127.0.0.1"``), ``port`` (0 = a free port), ``access_log``
      (False), ``shutdown_timeout`` (0.25 s to let in-flight answers finish on stop)
    * ``api_key``: require ``Authorization: Bearer <api_key>`` (or the key in
      the dialect's own header: ``x-api-key``, ``api-key``, ``x-goog-api-key``)
    * ``models``: accepted model names (others: 404 ``model_not_found``);
      ``default_model`` is echoed when the request has none
    * ``latency`` (s), or ``latency_median`` + ``latency_sigma`` (lognormal)
    * ``chaos``: ``{fault: probability}`` (see :data:`FAULTS`), ``seed``,
      ``chaos_retry_after`` (1 s), ``chaos_slow_seconds`` (30 s)
    * ``retry_after_grace``: 0.05 s before a retry-after window opens
    * ``rate_limit_rpm`` / ``rate_limit_tpm`` (None: no limit), ``rate_limit_burst`` (1 s),
      ``rate_limit_style`` (``"headers"`` or ``"retry_after"``): see the module docs

    Example::

        with FakeServer(latency=0.01, api_key="k") as server:
            client = OpenAI(base_url=server.url, api_key="k")
            ...
            assert server.stats()["retry_after_violations"] == 0
    """

    def __init__(self, **settings: Any) -> None:
        self.host: str = settings.pop("host", "127.0.0.1")
        self._requested_port = int(settings.pop("port", 0))
        self._access_log = bool(settings.pop("access_log", False))
        self._shutdown_timeout = float(settings.pop("shutdown_timeout", 0.25))
        # Validated here, in the caller's thread, so a typo raises immediately.
        self.app = FakeLLM(**settings)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the API key
        state = f"url={self.url!r}" if self.running else "stopped"
        return f"<FakeServer {state}>"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``), for /stats etc."""
        if self.port is None:
            raise RuntimeError("FakeServer is not running; call start() or use `with`")
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """OpenAI base URL: ``http://127.0.0.1:PORT/v1``."""
        return self.base_url + "/v1"

    def endpoint_for(self, provider: str) -> str:
        """The ``endpoint=`` that makes ``create_client(provider=...)`` talk to this server:
        the resource URL for ``"azure"``, ``.../v1beta`` for ``"gemini"``, else :attr:`url`
        (OpenAI, its compatible presets, and Anthropic, whose base URL also ends in ``/v1``)."""
        if provider == "azure":
            return self.base_url
        if provider == "gemini":
            return self.base_url + "/v1beta"
        return self.url

    # --------------------------------------------------------------- lifecycle
    def start(self) -> FakeServer:
        """Bind and start serving; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeServer already started")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="FakeServer", daemon=True)
        self._thread.start()
        try:
            self.port = started.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and the event loop; idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None
        self.port = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        # A private loop: works even when the caller (e.g. Jupyter) has one running.
        loop = asyncio.new_event_loop()
        runner = self.app.make_runner(access_log=self._access_log, shutdown_timeout=self._shutdown_timeout)
        try:
            try:
                port = loop.run_until_complete(_start_site(runner, self.host, self._requested_port))
            except BaseException as exc:
                started.set_exception(exc)
                return
            self._loop = loop
            started.set_result(port)
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(runner.cleanup())
                # Whatever aiohttp left behind (e.g. a handler still sleeping).
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop thread (the counters live there)."""
        loop = self._loop
        if loop is None or not self.running:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)

    # ------------------------------------------------------------------ access
    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (same as ``GET /stats``)."""
        return self._call(self.app.stats)

    def reset(self) -> None:
        """Clear the counters (same as ``POST /reset``)."""
        self._call(self.app.reset)

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings at run time (same as ``POST /config``)."""
        for key in _SERVER_ONLY:
            if key in settings:
                raise ValueError(f"{key!r} can only be set when the server is created")
        return self._call(lambda: self.app.configure(**settings))


async def _start_site(runner: web.AppRunner, host: str, port: int) -> int:
    await runner.setup()
    # Benchmarks open hundreds of connections at once: the default backlog
    # (128) would drop SYNs and add 1 s retransmit stalls.
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    return int(runner.addresses[0][1])


# ------------------------------------------------------------------ command line
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gen_ai_frames.testing.fake_server",
        description="OpenAI-compatible fake LLM server (prints 'listening on URL').",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="fixed latency (s)")
    parser.add_argument(
        "--latency-median", type=float, default=None, help="lognormal latency median (s); overrides --latency"
    )
    parser.add_argument("--latency-sigma", type=float, default=0.5)
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="require the API key stored in this environment variable "
        "(never on the command line, where `ps` shows it)",
    )
    parser.add_argument("--models", default=None, help="comma-separated accepted models")
    parser.add_argument("--chaos", default=None, help="JSON, e.g. '{\"500\": 0.1}'")
    parser.add_argument("--chaos-retry-after", type=float, default=1.0)
    parser.add_argument("--chaos-slow-seconds", type=float, default=30.0)
    parser.add_argument("--retry-after-grace", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate-limit-rpm", type=float, default=None, help="requests per minute (token bucket)"
    )
    parser.add_argument("--rate-limit-tpm", type=float, default=None, help="tokens per minute (token bucket)")
    parser.add_argument(
        "--rate-limit-burst", type=float, default=1.0, help="seconds of the rate a bucket holds"
    )
    parser.add_argument(
        "--rate-limit-style",
        choices=_RATE_LIMIT_STYLES,
        default="headers",
        help="state the limits in headers, or only Retry-After on 429s",
    )
    parser.add_argument("--access-log", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if args.api_key_env is not None and not os.environ.get(args.api_key_env):
        parser.error(f"environment variable {args.api_key_env} is not set or empty")
    try:
        _validate(
            {
                "rate_limit_rpm": args.rate_limit_rpm,
                "rate_limit_tpm": args.rate_limit_tpm,
                "rate_limit_burst": args.rate_limit_burst,
            }
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.chaos is not None:
        try:
            args.chaos = _loads(args.chaos.encode())
            _validate({"chaos": args.chaos})
        except (ValueError, TypeError) as exc:
            parser.error(f"--chaos: {exc}")
    return args


async def _serve(args: argparse.Namespace) -> None:
    settings: dict[str, Any] = {
        "latency": args.latency,
        "latency_median": args.latency_median,
        "latency_sigma": args.latency_sigma,
        "chaos": args.chaos or {},
        "chaos_retry_after": args.chaos_retry_after,
        "chaos_slow_seconds": args.chaos_slow_seconds,
        "retry_after_grace": args.retry_after_grace,
        "seed": args.seed,
        "rate_limit_rpm": args.rate_limit_rpm,
        "rate_limit_tpm": args.rate_limit_tpm,
        "rate_limit_burst": args.rate_limit_burst,
        "rate_limit_style": args.rate_limit_style,
    }
    if args.api_key_env:
        settings["api_key"] = os.environ[args.api_key_env]
    if args.models:
        settings["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    fake = FakeLLM(**settings)
    runner = fake.make_runner(access_log=args.access_log)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    try:
        port = await _start_site(runner, args.host, args.port)
        # The one line a parent process waits for; flushed because stdout is a pipe.
        print(f"listening on http://{args.host}:{port}/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
