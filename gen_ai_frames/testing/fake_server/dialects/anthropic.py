"""The Anthropic Messages dialect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..common import _answer_text, _BadRequest, _content_text, _int_option, _json_response, _word_count
from .openai import _OpenAIDialect

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


_ANTHROPIC = _AnthropicDialect()
