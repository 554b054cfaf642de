"""The OpenAI HTTP API, spoken by OpenAI and by compatible servers (vLLM, Ollama, llama.cpp, ...).

Chat Completions by default (``api="chat"``); the legacy Completions API with ``api="completions"``.

Structured output (``params.schema``) is OpenAI's ``response_format`` ``json_schema``, with
``strict: true`` only for a schema that meets strict mode's rules (see
:func:`~gen_ai_frames.providers.base.strict_compatible`); vLLM, llama.cpp's server, Ollama and
LM Studio read the same field. A preset whose service documents only JSON mode sets
``schema_mode = "json_object"`` and gets the schema written into the system prompt. The legacy
Completions API has no JSON mode: the schema goes into the prompt.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ..errors import (
    ConfigurationError,
    ContentFilterError,
    EmptyAnswerError,
    MalformedResponseError,
    RefusalError,
    RequestError,
)
from ..params import GenerationParams, Message
from ..schema import Schema
from ..transport import HttpRequest, HttpResponse
from .base import (
    Completion,
    Provider,
    dumps,
    error_for_status,
    finish_reason_field,
    join_url,
    logprob_sum,
    schema_instruction,
    strict_compatible,
    text_field,
    token_field,
)

__all__ = ["OpenAIProvider"]


class OpenAIProvider(Provider):
    """OpenAI-compatible provider.

    >>> provider = OpenAIProvider(api_key="sk-test", endpoint="http://127.0.0.1:8000/v1", model_name="m")
    >>> request = provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    >>> request.url
    'http://127.0.0.1:8000/v1/chat/completions'
    """

    name: ClassVar[str] = "openai"
    api_key_env: ClassVar[str | None] = "OPENAI_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.openai.com/v1"
    default_model: ClassVar[str | None] = "gpt-4o-mini"
    #: How a schema is asked for (chat API): "json_schema", the native structured output, or
    #: "json_object", JSON mode with the schema written into the system prompt.
    schema_mode: ClassVar[Literal["json_schema", "json_object"]] = "json_schema"
    #: Whether ``strict: true`` is sent for a schema that meets strict mode's rules.
    strict_schemas: ClassVar[bool] = True
    #: Whether the schema is also written into the system prompt (where a service's docs ask for it).
    schema_in_prompt: ClassVar[bool] = False
    #: The chat API's ``logprobs`` value when log-probabilities are asked for; None where the
    #: service does not offer them (nothing is sent, and ``Completion.logprob`` stays None).
    logprobs_request: ClassVar[bool | int | None] = True

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoint: str,
        model_name: str,
        api: str = "chat",
        organization: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(api_key=api_key, endpoint=endpoint, model_name=model_name, **options)
        if api not in ("chat", "completions"):
            raise ConfigurationError(f"api must be 'chat' or 'completions', got {api!r}")
        self.api = api
        self._headers = {"content-type": "application/json", "accept": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        if organization:
            self._headers["openai-organization"] = organization
        self._url = join_url(endpoint, "chat/completions" if api == "chat" else "completions")
        # The last schema's request parts: a run asks every row with the same Schema object.
        self._schema_parts: tuple[Schema, dict[str, Any] | None, str | None] | None = None

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "api": self.api}

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        body: dict[str, Any] = {
            "model": self.model_name,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        response_format, instruction = self._schema_request(params.schema)
        if self.api == "chat":
            if params.system_prompt is not None and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": params.system_prompt}, *messages]
            body["messages"] = _with_instruction(messages, instruction) if instruction else messages
            if response_format is not None:
                body["response_format"] = response_format
            if params.logprobs and self.logprobs_request is not None:
                body["logprobs"] = self.logprobs_request
        else:
            system = "\n\n".join(part for part in (params.system_prompt, instruction) if part)
            body["prompt"] = _flatten(messages, system or None)
            if params.logprobs and self.logprobs_request is not None:
                # The legacy API takes a count of alternatives; the chosen tokens' come with any.
                body["logprobs"] = 1
        return HttpRequest("POST", self._url, self._headers, dumps(body))

    def _schema_request(self, schema: Schema | None) -> tuple[dict[str, Any] | None, str | None]:
        """The ``response_format`` and the prompt instruction (either may be None) for a schema."""
        if schema is None:
            return None, None
        cached = getattr(self, "_schema_parts", None)  # a subclass may skip our __init__
        if cached is not None and cached[0] is schema:
            return cached[1], cached[2]
        response_format: dict[str, Any] | None = None
        if self.api == "completions":
            pass  # no response_format in the legacy API: the prompt carries the schema
        elif self.schema_mode == "json_object":
            response_format = {"type": "json_object"}
        else:
            strict = self.strict_schemas and strict_compatible(schema.json_schema)
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": schema.name, "schema": schema.json_schema, "strict": strict},
            }
        in_prompt = self.api == "completions" or self.schema_mode == "json_object" or self.schema_in_prompt
        instruction = schema_instruction(schema) if in_prompt else None
        self._schema_parts = (schema, response_format, instruction)
        return response_format, instruction

    def parse_response(self, response: HttpResponse) -> Completion:
        self.raise_for_redirect(response)
        if response.status >= 400:
            raise self._error(response)
        status = response.status
        data = self.parse_json(response)
        if not isinstance(data, dict):
            raise MalformedResponseError(
                f"expected a JSON object, got {type(data).__name__}", status_code=status
            )
        if "error" in data and "choices" not in data:
            # Some proxies answer 200 with an error object inside.
            raise self._error(response, data, status=_status_from_error(data["error"]))
        where = "choices[0].message.content" if self.api == "chat" else "choices[0].text"
        try:
            choice = data["choices"][0]
            message = choice["message"] if self.api == "chat" else choice
            raw_text = message.get("content" if self.api == "chat" else "text")
            refusal = message.get("refusal")
            raw_finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise MalformedResponseError(
                f"the answer is JSON but has no {where} (keys: {', '.join(map(str, data)) or 'none'})",
                status_code=status,
            ) from None
        # Each field is checked here: one odd answer fails its row, never the run (nor every resume).
        finish_reason = finish_reason_field(raw_finish, "choices[0].finish_reason", status)
        text = text_field(raw_text, where, status)
        if finish_reason == "content_filter":
            raise ContentFilterError(
                "the provider's content filter withheld the answer (finish_reason 'content_filter')",
                status_code=status,
            )
        if not text:
            if isinstance(refusal, str) and refusal.strip():
                raise RefusalError(f"the model refused to answer: {refusal.strip()}", status_code=status)
            if finish_reason == "length":
                raise EmptyAnswerError(
                    "the answer has no text: the model reached max_tokens (finish_reason "
                    "'length') before writing any",
                    status_code=status,
                )
            if text is None:
                raise MalformedResponseError(
                    f"the answer has no text ({where} is missing or null, finish_reason {finish_reason!r})",
                    status_code=status,
                )
        # A usage that is not an object (a list, a string) is ignored: the answer itself is fine.
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        return Completion(
            text or "",
            finish_reason,
            token_field(usage, "prompt_tokens", "usage", status),
            token_field(usage, "completion_tokens", "usage", status),
            _logprob(choice.get("logprobs")),
        )

    def _error(self, response: HttpResponse, data: Any = None, status: int | None = None) -> RequestError:
        status = status or response.status
        if data is None:
            data = self.json_or_none(response)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or "no message")
            code = error.get("code") or error.get("type")
        elif isinstance(error, str):
            message, code = error, None
        else:
            preview = response.body[:80].decode("utf-8", "replace").replace("\n", " ")
            message, code = (
                (f"no error details in the answer (starts with {preview!r})" if preview else "empty answer"),
                None,
            )
        return error_for_status(
            status,
            f"HTTP {status}: {message}",
            code=str(code) if code else None,
            key_suggestion=self.key_suggestion(),
        )


def _status_from_error(error: Any) -> int:
    if isinstance(error, dict):
        for name in ("status", "code", "status_code"):
            value = error.get(name)
            if isinstance(value, int) and 400 <= value < 600:
                return value
    return 400


def _logprob(logprobs: Any) -> float | None:
    """The sum of the answer's token log-probabilities: ``logprobs.content[*].logprob`` (chat), or
    ``logprobs.token_logprobs`` (the legacy API, and Together's chat answers); None otherwise."""
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    if isinstance(content, list):
        return logprob_sum([token.get("logprob") if isinstance(token, dict) else None for token in content])
    return logprob_sum(logprobs.get("token_logprobs"))


def _with_instruction(messages: list[Message], instruction: str) -> list[Message]:
    """The messages with ``instruction`` appended to the first system message, or in a new one first
    (one system message: some chat templates accept no other)."""
    for i, message in enumerate(messages):
        if message.get("role") == "system":
            merged = {**message, "content": f"{message.get('content', '')}\n\n{instruction}"}
            return [*messages[:i], merged, *messages[i + 1 :]]
    return [{"role": "system", "content": instruction}, *messages]


def _flatten(messages: list[Message], system_prompt: str | None) -> str:
    """Render chat messages as one prompt for the Completions API."""
    parts = [system_prompt] if system_prompt else []
    if len(messages) == 1 and messages[0].get("role") == "user":
        parts.append(messages[0]["content"])
    else:
        parts.extend(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
    return "\n\n".join(parts)
