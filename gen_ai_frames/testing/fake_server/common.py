"""Helpers every part of the fake server shares: JSON coding, error bodies, directive syntax."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

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


# Protect the server from silly `n` values; real APIs cap it too.
_MAX_N = 128


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


def _int_option(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _BadRequest(f"{name} must be an integer", param=name)
    try:
        return int(value)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer", param=name) from None
