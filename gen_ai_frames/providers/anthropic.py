"""Anthropic's Messages API (``POST {endpoint}/messages``).

Differences from OpenAI that this module absorbs:

- the system prompt is a top-level ``system`` field, never a message;
- ``max_tokens`` is required (we always send it);
- ``temperature`` ranges over [0, 1], not [0, 2]: a larger value is refused before sending;
- ``top_p`` is sent only when it differs from 1.0, because recent Claude models reject a request
  that sets both ``temperature`` and ``top_p``;
- errors carry a ``type`` (``overloaded_error`` ...) that we map to our error classes;
- structured output (``params.schema``) is a forced tool: ``tools`` holds one tool whose
  ``input_schema`` is the schema and ``tool_choice`` names it, so Claude answers with a
  ``tool_use`` block whose ``input`` becomes the answer text, as compact JSON
  (https://docs.anthropic.com/en/docs/build-with-claude/tool-use, "Forcing tool use" and "JSON
  mode"). Log-probabilities are not offered: ``Completion.logprob`` stays None.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import (
    APIStatusError,
    BadRequestError,
    ConfigurationError,
    ContentFilterError,
    ContextLengthError,
    EmptyAnswerError,
    MalformedResponseError,
    RequestError,
)
from ..params import GenerationParams, Message
from ..transport import HttpRequest, HttpResponse
from .base import (
    BAD_FIELD_SUGGESTION,
    Completion,
    Provider,
    compact_json,
    dumps,
    error_for_status,
    finish_reason_field,
    join_url,
    token_field,
)

__all__ = ["AnthropicProvider"]

#: The HTTP status each documented error ``type`` comes with; used when the status alone is
#: ambiguous (an error object inside a 200 answer, e.g. from a proxy).
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}

#: The forced tool's description when the schema has none of its own.
_TOOL_DESCRIPTION = (
    "Give your answer by calling this tool: its input is the answer, in the required structure."
)

_BILLING_SUGGESTION = (
    "The Anthropic account has no usable credit: add credits or raise the spend limit "
    "in the Anthropic Console (Plans & Billing), then run again: finished rows are kept."
)


class AnthropicProvider(Provider):
    """Claude through the Messages API; the key comes from ``ANTHROPIC_API_KEY``.

    >>> provider = AnthropicProvider(api_key="k", endpoint="https://api.anthropic.com/v1", model_name="m")
    >>> request = provider.build_request([{"role": "user", "content": "Hi"}],
    ...                                  GenerationParams(system_prompt="Be brief."))
    >>> request.url, request.headers["anthropic-version"]
    ('https://api.anthropic.com/v1/messages', '2023-06-01')
    >>> import json
    >>> json.loads(request.body)["system"]
    'Be brief.'
    """

    name: ClassVar[str] = "anthropic"
    api_key_env: ClassVar[str | None] = "ANTHROPIC_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.anthropic.com/v1"
    default_model: ClassVar[str | None] = "claude-haiku-4-5"
    #: Anthropic's temperature scale ends at 1.0 (OpenAI's at 2.0).
    max_temperature: ClassVar[float] = 1.0
    credential_header: ClassVar[str | None] = "x-api-key"

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoint: str,
        model_name: str,
        anthropic_version: str = "2023-06-01",
        **options: Any,
    ) -> None:
        super().__init__(api_key=api_key, endpoint=endpoint, model_name=model_name, **options)
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": anthropic_version,
        }
        if api_key:
            self._headers["x-api-key"] = api_key
        self._url = join_url(endpoint, "messages")

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        """The Messages API body; raises ConfigurationError for a temperature above 1.

        >>> provider = AnthropicProvider(api_key="k", endpoint="http://127.0.0.1:9/v1", model_name="m")
        >>> hot = GenerationParams(temperature=1.5)
        >>> provider.build_request([{"role": "user", "content": "Hi"}], hot)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        gen_ai_frames.errors.ConfigurationError: temperature=1.5 is above Anthropic's maximum of 1 ...
        """
        if params.temperature > self.max_temperature:
            # Refused rather than clamped: silently answering at another temperature than asked
            # would change results without a trace.
            raise ConfigurationError(
                f"temperature={params.temperature:g} is above Anthropic's maximum of "
                f"{self.max_temperature:g} "
                "(its scale is [0, 1], not OpenAI's [0, 2]): pass temperature=1 or lower"
            )
        system = [m["content"] for m in messages if m.get("role") == "system"]
        turns = [
            {"role": m.get("role", "user"), "content": m["content"]}
            for m in messages
            if m.get("role") != "system"
        ]
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": params.max_tokens,
            "messages": turns,
        }
        if system:
            body["system"] = "\n\n".join(system)
        elif params.system_prompt is not None:
            body["system"] = params.system_prompt
        body["temperature"] = params.temperature
        if params.top_p != 1.0:
            body["top_p"] = params.top_p
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        if params.schema is not None:
            schema = params.schema
            description = schema.json_schema.get("description")
            if not isinstance(description, str):
                description = _TOOL_DESCRIPTION
            body["tools"] = [
                {"name": schema.name, "description": description, "input_schema": schema.json_schema}
            ]
            body["tool_choice"] = {"type": "tool", "name": schema.name}
        return HttpRequest("POST", self._url, self._headers, dumps(body))

    def parse_response(self, response: HttpResponse) -> Completion:
        self.raise_for_redirect(response)
        if response.status >= 400:
            raise self._error(response, None)
        status = response.status
        data = self.parse_json(response)
        if not isinstance(data, dict):
            raise MalformedResponseError(
                f"expected a JSON object, got {type(data).__name__}", status_code=status
            )
        if data.get("type") == "error" or ("error" in data and "content" not in data):
            raise self._error(response, data)
        content = data.get("content")
        stop_reason = finish_reason_field(data.get("stop_reason"), "stop_reason", status)
        if not isinstance(content, list):
            raise MalformedResponseError(
                f"the answer is JSON but has no content list (keys: {', '.join(map(str, data)) or 'none'})",
                status_code=status,
            )
        if stop_reason == "refusal":
            # Anthropic's safety classifiers stopped the answer: a content filter, not the model's words.
            raise ContentFilterError("Claude declined to answer (stop_reason 'refusal')", status_code=status)
        finish_reason = _FINISH_REASONS.get(stop_reason or "", stop_reason)
        tool_use = next(
            (block for block in content if isinstance(block, dict) and block.get("type") == "tool_use"), None
        )
        if tool_use is not None:
            # Structured output: the forced tool's input is the answer.
            tool_input = tool_use.get("input")
            if not isinstance(tool_input, dict):
                shown = "missing" if tool_input is None else f"a {type(tool_input).__name__}, not an object"
                raise MalformedResponseError(
                    f"the answer's tool_use block has no input (input is {shown})",
                    status_code=status,
                    suggestion=BAD_FIELD_SUGGESTION,
                )
            text = compact_json(tool_input)
            if finish_reason == "tool_calls":
                finish_reason = "stop"  # the forced tool call is the whole, finished answer
        else:
            # Only text blocks: thinking blocks are not part of the answer text.
            text = "".join(
                block["text"]
                for block in content
                if isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
            )
        if not text and finish_reason == "length":
            raise EmptyAnswerError(
                f"the answer has no text: Claude reached max_tokens (stop_reason "
                f"{stop_reason!r}) before writing any",
                status_code=status,
            )
        # A usage that is not an object is ignored; a count of the wrong type fails the row.
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        return Completion(
            text,
            finish_reason,
            _prompt_tokens(usage, status),
            token_field(usage, "output_tokens", "usage", status),
        )

    def _error(self, response: HttpResponse, data: Any) -> RequestError:
        if data is None:
            data = self.json_or_none(response)
        error = data.get("error") if isinstance(data, dict) else None
        kind: str | None = None
        if isinstance(error, dict):
            kind = str(error.get("type") or "") or None
            message = str(error.get("message") or kind or "no message")
        else:
            preview = response.body[:80].decode("utf-8", "replace").replace("\n", " ")
            message = (
                f"no error details in the answer (starts with {preview!r})" if preview else "empty answer"
            )
        status = response.status if response.status >= 400 else ERROR_STATUS.get(kind or "", 400)
        text = f"HTTP {status}: {kind}: {message}" if kind else f"HTTP {status}: {message}"
        lowered = message.lower()
        if kind == "billing_error" or "credit balance" in lowered:
            # Every other request of the run would fail the same way: stop the run.
            billing = APIStatusError(
                text, suggestion=_BILLING_SUGGESTION, status_code=status, retryable=False
            )
            billing.fatal = True
            return billing
        if status in (400, 413) and ("context limit" in lowered or "context window" in lowered):
            # "input length and `max_tokens` exceed context limit: ..." (error_for_status knows
            # "prompt is too long" but not this wording)
            return ContextLengthError(text, status_code=status)
        if kind == "request_too_large" and status == 413:
            return BadRequestError(
                text,
                status_code=413,
                suggestion="The request is larger than Anthropic's size limit (32 MB): shorten the prompt.",
            )
        return error_for_status(status, text, code=kind, key_suggestion=self.key_suggestion())


def _prompt_tokens(usage: dict[str, Any], status: int) -> int | None:
    """All input tokens: ``input_tokens`` excludes the ones read from or written to the prompt cache."""
    counts = [
        token_field(usage, name, "usage", status)
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    ]
    numbers = [count for count in counts if count is not None]
    return sum(numbers) if numbers else None
