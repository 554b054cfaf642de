"""The OpenAI dialect (chat and completions): the base class of every other dialect."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..common import (
    _MAX_N,
    _answer_text,
    _BadRequest,
    _content_text,
    _error_payload,
    _error_response,
    _json_response,
    _word_count,
)


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


_OPENAI_CHAT = _OpenAIDialect(chat=True)
_OPENAI_COMPLETIONS = _OpenAIDialect(chat=False)
