"""The Gemini ``generateContent`` dialect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..common import (
    _answer_text,
    _BadRequest,
    _camel,
    _content_text,
    _int_option,
    _json_response,
    _word_count,
)
from .openai import _OpenAIDialect

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


_GEMINI = _GeminiDialect()
