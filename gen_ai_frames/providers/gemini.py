"""Google's Gemini API (``POST {endpoint}/models/{model}:generateContent``).

The key travels in the ``x-goog-api-key`` header, never in the ``?key=`` query parameter that
Google also accepts: URLs end up in logs, proxies and error messages, headers do not.

Structured output (``params.schema``) sets ``generationConfig.responseMimeType`` to
``application/json`` and ``generationConfig.responseJsonSchema`` to the schema as it is:
``responseJsonSchema`` is "an alternative to responseSchema that accepts JSON Schema" (Gemini's
``GenerationConfig``: https://firebase.google.com/docs/reference/js/ai.generationconfig and the
google-genai SDK's ``GenerationConfig.responseJsonSchema``), so no translation to the OpenAPI subset
of ``responseSchema`` is needed; "if set, responseSchema must be omitted, but responseMimeType is
required and must be set to application/json". ``logprobs=True`` sets
``generationConfig.responseLogprobs``; the answer's ``candidates[0].logprobsResult.chosenCandidates``
carry each token's ``logProbability``.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import quote

from ..errors import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthError,
    EmptyAnswerError,
    MalformedResponseError,
    PermissionDeniedError,
    RequestError,
)
from ..params import GenerationParams, Message, validate_positive_int
from ..transport import HttpRequest, HttpResponse
from .base import (
    Completion,
    Provider,
    dumps,
    error_for_status,
    finish_reason_field,
    join_url,
    logprob_sum,
    token_field,
)

__all__ = ["GeminiProvider"]

#: google.rpc status names and the HTTP status each comes with.
STATUS_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "NOT_IMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
#: Finish reasons meaning the answer was withheld by a filter, not finished.
FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


class GeminiProvider(Provider):
    """Gemini through the Generative Language API; the key comes from ``GEMINI_API_KEY``.

    ``thinking_budget`` sets ``generationConfig.thinkingConfig.thinkingBudget`` (``0`` turns
    thinking off on models that allow it: thinking tokens count against ``max_tokens``).

    >>> provider = GeminiProvider(api_key="secret-key", endpoint="https://generativelanguage.googleapis.com/v1beta",
    ...                           model_name="gemini-2.5-flash")
    >>> request = provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=50))
    >>> request.url
    'https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent'
    >>> "secret-key" in request.url, request.headers["x-goog-api-key"]
    (False, 'secret-key')
    """

    name: ClassVar[str] = "gemini"
    api_key_env: ClassVar[str | None] = "GEMINI_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://generativelanguage.googleapis.com/v1beta"
    default_model: ClassVar[str | None] = "gemini-2.5-flash"
    credential_header: ClassVar[str | None] = "x-goog-api-key"

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoint: str,
        model_name: str,
        thinking_budget: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(api_key=api_key, endpoint=endpoint, model_name=model_name, **options)
        if thinking_budget is not None and thinking_budget != -1:  # -1: the model decides ("dynamic")
            validate_positive_int("thinking_budget", thinking_budget, minimum=0)
        self.thinking_budget = thinking_budget
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            self._headers["x-goog-api-key"] = api_key
        # "gemini-2.5-flash", "models/gemini-2.5-flash" and "tunedModels/x" all name a model.
        resource = model_name if "/" in model_name else f"models/{model_name}"
        self._url = join_url(endpoint, f"{quote(resource, safe='/')}:generateContent")

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        system = [m["content"] for m in messages if m.get("role") == "system"]
        contents = [
            {"role": "model" if m.get("role") == "assistant" else "user", "parts": [{"text": m["content"]}]}
            for m in messages
            if m.get("role") != "system"
        ]
        config: dict[str, Any] = {
            "maxOutputTokens": params.max_tokens,
            "temperature": params.temperature,
            "topP": params.top_p,
        }
        if params.stop:
            config["stopSequences"] = list(params.stop)
        if self.thinking_budget is not None:
            config["thinkingConfig"] = {"thinkingBudget": self.thinking_budget}
        if params.schema is not None:
            config["responseMimeType"] = "application/json"
            config["responseJsonSchema"] = params.schema.json_schema
        if params.logprobs:
            config["responseLogprobs"] = True
        body: dict[str, Any] = {"contents": contents}
        instruction = "\n\n".join(system) if system else params.system_prompt
        if instruction is not None:
            body["systemInstruction"] = {"parts": [{"text": instruction}]}
        body["generationConfig"] = config
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
        if "error" in data and "candidates" not in data:
            raise self._error(response, data)
        feedback: dict[str, Any] = (
            data["promptFeedback"] if isinstance(data.get("promptFeedback"), dict) else {}
        )
        if feedback.get("blockReason"):
            raise ContentFilterError(
                f"Gemini blocked the prompt (blockReason {feedback['blockReason']!r})", status_code=status
            )
        try:
            candidate = data["candidates"][0]
            finish = candidate.get("finishReason")
            content = candidate.get("content") or {}
            parts = content.get("parts") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            raise MalformedResponseError(
                f"the answer is JSON but has no candidates[0] (keys: {', '.join(map(str, data)) or 'none'})",
                status_code=status,
            ) from None
        finish = finish_reason_field(finish, "candidates[0].finishReason", status)
        if finish in FILTERED:
            raise ContentFilterError(
                f"Gemini withheld the answer (finishReason {finish!r})", status_code=status
            )
        if not isinstance(parts, list):
            raise MalformedResponseError(
                f"candidates[0].content.parts is {type(parts).__name__}, not a list", status_code=status
            )
        # Thought summaries ("thought": true) are the model's reasoning, not its answer.
        texts = [
            part["text"]
            for part in parts
            if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought")
        ]
        finish_reason = _FINISH_REASONS.get(finish or "", finish.lower() if finish else None)
        if not texts and finish_reason == "length":
            # Thinking spent the whole budget: say so, so the row is re-asked with more tokens.
            raise EmptyAnswerError(
                f"the answer has no text: Gemini reached maxOutputTokens (finishReason "
                f"{finish!r}) before writing any (thinking counts against max_tokens)",
                status_code=status,
            )
        if not texts:
            raise MalformedResponseError(
                f"the answer has no text (finishReason {finish!r})", status_code=status
            )
        # A usageMetadata that is not an object is ignored; a count of the wrong type fails the row.
        usage: dict[str, Any] = data["usageMetadata"] if isinstance(data.get("usageMetadata"), dict) else {}
        prompt_tokens = token_field(usage, "promptTokenCount", "usageMetadata", status)
        return Completion(
            "".join(texts),
            finish_reason,
            prompt_tokens,
            _completion_tokens(usage, status),
            _logprob(candidate.get("logprobsResult")),
        )

    def _error(self, response: HttpResponse, data: Any) -> RequestError:
        if data is None:
            data = self.json_or_none(response)
        if isinstance(data, list) and data and isinstance(data[0], dict):
            data = data[0]  # some Google front ends wrap the error in a list
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict):
            preview = response.body[:80].decode("utf-8", "replace").replace("\n", " ")
            message = (
                f"no error details in the answer (starts with {preview!r})" if preview else "empty answer"
            )
            return error_for_status(
                response.status, f"HTTP {response.status}: {message}", key_suggestion=self.key_suggestion()
            )
        rpc_status = str(error.get("status") or "")
        message = str(error.get("message") or rpc_status or "no message")
        status = response.status
        if status < 400:  # an error object inside a 200 answer
            code = error.get("code")
            status = (
                code if isinstance(code, int) and 400 <= code < 600 else STATUS_CODES.get(rpc_status, 400)
            )
        text = f"HTTP {status} {rpc_status}: {message}" if rpc_status else f"HTTP {status}: {message}"
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
        reasons = {str(d.get("reason")) for d in details if d.get("reason")}
        retry_after = _retry_delay(details)
        if "API_KEY_INVALID" in reasons or rpc_status == "UNAUTHENTICATED":
            # Google answers a wrong key with 400 INVALID_ARGUMENT: it is an authentication failure.
            return AuthenticationError(text, status_code=status, suggestion=self.key_suggestion())
        if rpc_status == "FAILED_PRECONDITION":
            # e.g. "User location is not supported for the API use": no request of the run can succeed.
            return PermissionDeniedError(
                text,
                status_code=status,
                suggestion="The Gemini API refuses this project or location (free tier not available "
                "here, or billing not enabled): enable billing on the Google Cloud project.",
            )
        lowered = message.lower()
        if status == 400 and "token count" in lowered and "exceeds" in lowered:
            # "The input token count (1048577) exceeds the maximum number of tokens allowed (1048576)."
            return ContextLengthError(text, status_code=status)
        return error_for_status(
            status,
            text,
            code=rpc_status or None,
            key_suggestion=self.key_suggestion(),
            retry_after=retry_after,
        )

    def fingerprint(self) -> dict[str, Any]:
        # Thinking changes the answers, so a checkpoint made with another budget must not resume.
        fingerprint = super().fingerprint()
        if self.thinking_budget is not None:
            fingerprint["thinking_budget"] = self.thinking_budget
        return fingerprint


def _logprob(result: Any) -> float | None:
    """The sum of ``chosenCandidates[*].logProbability``, else ``logProbabilitySum``; None when absent
    or odd (an odd value never fails the row).

    >>> _logprob({"chosenCandidates": [{"token": "a", "logProbability": -0.5}, {"logProbability": -1}]})
    -1.5
    >>> _logprob({"logProbabilitySum": -2.0}), _logprob({"chosenCandidates": [{"token": "a"}]})
    (-2.0, None)
    """
    if not isinstance(result, dict):
        return None
    chosen = result.get("chosenCandidates")
    if isinstance(chosen, list):
        return logprob_sum(
            [token.get("logProbability") if isinstance(token, dict) else None for token in chosen]
        )
    return logprob_sum([result["logProbabilitySum"]]) if "logProbabilitySum" in result else None


def _completion_tokens(usage: dict[str, Any], status: int) -> int | None:
    """Output tokens as billed: answer tokens plus thinking tokens (as OpenAI counts reasoning)."""
    counts = [
        token_field(usage, name, "usageMetadata", status)
        for name in ("candidatesTokenCount", "thoughtsTokenCount")
    ]
    numbers = [count for count in counts if count is not None]
    return sum(numbers) if numbers else None


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` detail: Gemini says how long to wait in the body,
    not in a Retry-After header.

    >>> _retry_delay([{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}])
    37.0
    """
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None
