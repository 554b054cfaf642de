"""The provider contract: pure functions from (messages, params) to a request, and from a response
to a :class:`Completion` or a typed :class:`~gen_ai_frames.errors.RequestError`.

A provider never sends anything, so it is tested with plain JSON fixtures and any transport serves it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from ..errors import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ContextLengthError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RedirectError,
    RequestError,
    ServerError,
    register_secret,
)
from ..params import GenerationParams, Message
from ..schema import Schema
from ..transport import (
    HttpRequest,
    HttpResponse,
    Transport,
    endpoint_secrets,
    public_url,
    redact_url,
    same_origin,
)

try:  # orjson parses answers ~3x faster; the standard library is the fallback
    import orjson

    loads = orjson.loads

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - orjson is a dependency
    loads = json.loads  # type: ignore[assignment]

    def dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False).encode()


__all__ = [
    "Completion",
    "Provider",
    "endpoint_secrets",
    "error_for_status",
    "finish_reason_field",
    "compact_json",
    "join_url",
    "logprob_sum",
    "normalize_endpoint",
    "redact_url",
    "same_origin",
    "schema_instruction",
    "strict_compatible",
    "text_field",
    "token_field",
]

#: Suggestion of an answer that is JSON of the right shape with one field of the wrong type.
BAD_FIELD_SUGGESTION = (
    "The server broke the API's format in this answer (the field is named in the "
    "message); only this row failed: run again with retry_errors to re-ask it, and "
    "report the server's answer to its maintainers if it keeps happening."
)


@dataclass(slots=True)
class Completion:
    """A successful answer."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Sum of the answer's token log-probabilities, when asked for (``logprobs=True``) and the
    #: provider returned them; None otherwise.
    logprob: float | None = None


class Provider:
    """Base class: subclasses set ``name`` and implement :meth:`build_request` and :meth:`parse_response`.

    The API key lives in a private attribute and never appears in repr, errors or logs.
    """

    name: ClassVar[str] = "base"
    #: Environment variable the key is read from when ``api_key`` is not given.
    api_key_env: ClassVar[str | None] = None
    default_endpoint: ClassVar[str | None] = None
    default_model: ClassVar[str | None] = None
    #: False for servers that need no key (local servers, Ollama).
    requires_api_key: ClassVar[bool] = True
    #: False for providers that answer in-process (the embedded local model): no endpoint URL.
    uses_http: ClassVar[bool] = True
    #: The request header that carries the API key (lower case); never sent to another origin.
    credential_header: ClassVar[str | None] = "authorization"

    def __init__(self, *, api_key: str | None, endpoint: str, model_name: str, **options: Any) -> None:
        if options:
            raise ConfigurationError(
                f"unknown option(s) for provider {self.name!r}: {', '.join(sorted(options))}"
            )
        self._api_key = api_key
        self.endpoint = endpoint
        self.model_name = model_name
        self._register_secrets()

    def _register_secrets(self) -> None:
        # Every error built from now on hides them, whatever a server echoes back.
        register_secret(self._api_key)
        for secret in endpoint_secrets(self.endpoint) if self.uses_http else ():
            register_secret(secret)

    def __setstate__(self, state: Any) -> None:
        # An unpickled provider (a Dask worker's) registers its secrets in the new process too.
        if isinstance(state, tuple):  # (__dict__ or None, slots) for a subclass with __slots__
            state, slots = state
            for name, value in (slots or {}).items():
                object.__setattr__(self, name, value)
        self.__dict__.update(state or {})
        self._register_secrets()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(endpoint={redact_url(self.endpoint)!r}, model_name={self.model_name!r})"
        )

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model answering: stored in checkpoints (never the key, nor a key or
        password inside the endpoint)."""
        return {"provider": self.name, "endpoint": public_url(self.endpoint), "model": self.model_name}

    @property
    def max_parallel(self) -> int | None:
        """The most requests this provider can work on at once, if it has a limit of its own.

        An in-process model answers only so many prompts at a time; a larger ``max_concurrent``
        would only queue requests, and the queue time would count against ``timeout``.
        """
        return None

    def create_transport(self) -> Transport | None:
        """A transport of the provider's own (e.g. an in-process model), or None for HTTP."""
        return None

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        raise NotImplementedError

    def parse_response(self, response: HttpResponse) -> Completion:
        """Return the completion, or raise a :class:`RequestError` describing the failure."""
        raise NotImplementedError

    # Helpers shared by providers -------------------------------------------------------------

    def key_suggestion(self) -> str:
        if self.api_key_env:
            return f"Check the API key: pass `api_key=` or set the {self.api_key_env} environment variable."
        return "Check the API key passed as `api_key=`."

    def parse_json(self, response: HttpResponse) -> Any:
        """Decode a JSON body, or raise MalformedResponseError saying what came back instead."""
        try:
            return loads(response.body)
        except ValueError:
            kind = response.headers.get("content-type", "unknown content type")
            preview = response.body[:80].decode("utf-8", "replace").replace("\n", " ")
            raise MalformedResponseError(
                f"the endpoint answered HTTP {response.status} with a body that is not JSON "
                f"({kind}, starts with {preview!r})",
                status_code=response.status,
            ) from None

    def raise_for_redirect(self, response: HttpResponse) -> None:
        """Raise :class:`RedirectError` for a 3xx answer, naming where it points (credentials hidden).

        The transports follow only 307/308 within the endpoint's origin; any other redirect reaches
        here: a POST cannot follow 301/302/303 (it would become a GET and fail with an unrelated
        405), and the key must not travel to another host.
        """
        status = response.status
        if not 300 <= status < 400:
            return
        location = response.headers.get("location")
        if not location:
            raise RedirectError(
                f"the endpoint answered HTTP {status} (a redirect) without saying where to",
                status_code=status,
            )
        shown = redact_url(location)
        if status in (307, 308) and not same_origin(location, self.endpoint):
            message = (
                f"the endpoint answered HTTP {status}, redirecting to another host: {shown}; "
                "the request was not re-sent there, so that the API key does not travel to "
                "another host"
            )
        elif status in (307, 308):
            message = f"the endpoint kept redirecting (HTTP {status}, last to {shown})"
        else:
            message = (
                f"the endpoint answered HTTP {status}: it moved to {shown}; a POST cannot follow a "
                f"{status} redirect (it would turn into a GET)"
            )
        suggestion = None
        url = getattr(self, "_url", None)
        if isinstance(url, str):
            # The request URL is the endpoint plus a path: the same path cut from the new address
            # gives the endpoint to use instead.
            suffix = urlsplit(url).path[len(urlsplit(self.endpoint).path) :]
            target = urlsplit(location)
            if suffix and target.path.endswith(suffix):
                new = urlunsplit((target.scheme, target.netloc, target.path[: -len(suffix)], "", ""))
                suggestion = (
                    "The endpoint moved: if you trust the new address, pass "
                    f"endpoint={redact_url(new)!r} (the API key is never sent to another host)."
                )
        raise RedirectError(message, status_code=status, suggestion=suggestion)

    def json_or_none(self, response: HttpResponse) -> Any:
        """The decoded body of an error answer, or None when it is not JSON (e.g. a proxy's page)."""
        try:
            return self.parse_json(response)
        except MalformedResponseError:
            return None


def text_field(value: Any, where: str, status: int) -> str | None:
    """Answer text from a string, or from a list of parts (``[{"type": "text", "text": ...}]``,
    which several OpenAI-compatible servers send), joined; None when there is none.

    >>> parts = [{"type": "text", "text": "Hello, "}, {"type": "image_url"}, {"text": "world"}]
    >>> text_field(parts, "content", 200)
    'Hello, world'
    >>> text_field(42, "choices[0].message.content", 200)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.MalformedResponseError: choices[0].message.content is 42 (int), not text ...
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts: list[Any] = [
            part if isinstance(part, str) else part.get("text")
            for part in value
            if isinstance(part, str) or (isinstance(part, dict) and part.get("type", "text") in _TEXT_PARTS)
        ]
        if not all(isinstance(text, str) for text in texts):
            raise MalformedResponseError(
                f"{where} has a text part whose text is not a string",
                status_code=status,
                suggestion=BAD_FIELD_SUGGESTION,
            )
        return "".join(texts) if texts else None
    raise MalformedResponseError(
        f"{where} is {_shown(value)}, not text nor a list of text parts",
        status_code=status,
        suggestion=BAD_FIELD_SUGGESTION,
    )


_TEXT_PARTS = frozenset({"text", "output_text"})


def token_field(usage: dict[str, Any], name: str, where: str, status: int) -> int | None:
    """A token count from a usage object: None when absent; a MalformedResponseError naming the
    field for anything but a whole number >= 0 (a string, 3.5, true), which would otherwise crash
    cost accounting and the checkpoint's integer column.

    >>> token_field({"prompt_tokens": 7}, "prompt_tokens", "usage", 200)
    7
    >>> token_field({"prompt_tokens": "7"}, "prompt_tokens", "usage", 200)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.MalformedResponseError: usage.prompt_tokens is '7' (str), not a whole number ...
    """
    value = usage.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedResponseError(
            f"{where}.{name} is {_shown(value)}, not a whole number of tokens",
            status_code=status,
            suggestion=BAD_FIELD_SUGGESTION,
        )
    return value


def finish_reason_field(value: Any, where: str, status: int) -> str | None:
    """A finish reason: a string or None; a MalformedResponseError naming the field otherwise.

    >>> finish_reason_field(1, "choices[0].finish_reason", 200)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.MalformedResponseError: choices[0].finish_reason is 1 (int), not a string ...
    """
    if value is None or isinstance(value, str):
        return value
    raise MalformedResponseError(
        f"{where} is {_shown(value)}, not a string", status_code=status, suggestion=BAD_FIELD_SUGGESTION
    )


# Structured output helpers shared by providers ----------------------------------------------------

#: Keywords OpenAI's strict mode accepts (https://platform.openai.com/docs/guides/structured-outputs,
#: "Supported schemas"); any other keyword (minLength, default, allOf, not, if/then...) makes a schema
#: fail strict mode with HTTP 400, so such a schema is sent with strict=False instead.
_STRICT_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "description",
        "title",
        "$defs",
        "$ref",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
    }
)
#: OpenAI's documented limits for strict schemas: nesting depth and total object properties.
_STRICT_MAX_DEPTH = 10
_STRICT_MAX_PROPERTIES = 5000


def strict_compatible(schema: dict[str, Any]) -> bool:
    """Whether a JSON Schema meets OpenAI's strict-mode rules: the root is an object; every object
    sets ``additionalProperties: false`` and lists all its properties as ``required``; only
    supported keywords; at most 10 levels of nesting and 5000 properties.

    >>> strict_compatible(Schema.parse("name, age int").json_schema)
    True
    >>> strict_compatible({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    False
    """
    counted = [0]

    def ok(node: Any, depth: int) -> bool:
        if not isinstance(node, dict) or depth > _STRICT_MAX_DEPTH or not set(node) <= _STRICT_KEYWORDS:
            return False
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "object" in kinds:
            properties = node.get("properties")
            required = node.get("required")
            if (
                not isinstance(properties, dict)
                or node.get("additionalProperties") is not False
                or not isinstance(required, list)
                or set(required) != set(properties)
            ):
                return False
            counted[0] += len(properties)
            if not all(ok(child, depth + 1) for child in properties.values()):
                return False
        if "items" in node and not ok(node["items"], depth + 1):
            return False
        alternatives = node.get("anyOf", [])
        return isinstance(alternatives, list) and all(ok(child, depth + 1) for child in alternatives)

    root_kind = schema.get("type") if isinstance(schema, dict) else None
    return root_kind == "object" and ok(schema, 1) and counted[0] <= _STRICT_MAX_PROPERTIES


def compact_json(value: Any) -> str:
    """JSON text without spaces, non-ASCII kept as is: how a tool call's input becomes answer text.

    >>> compact_json({"name": "Zoë", "tags": ["a", "b"]})
    '{"name":"Zoë","tags":["a","b"]}'
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def schema_instruction(schema: Schema) -> str:
    """The instruction that carries the schema in the prompt, for providers without a schema field
    (JSON mode, the legacy Completions API) and for those whose docs ask for it in the prompt too.

    >>> print(schema_instruction(Schema.parse("n int")))  # doctest: +ELLIPSIS
    Answer with one JSON object ... JSON Schema:
    {"type":"object","properties":{"n":{"type":"integer"}},"required":["n"],"additionalProperties":false}
    """
    return (
        "Answer with one JSON object and nothing else (no code fence, no comments) that matches this "
        f"JSON Schema:\n{compact_json(schema.json_schema)}"
    )


def logprob_sum(values: Any) -> float | None:
    """The sum of token log-probabilities, or None when there are none or any is not a finite
    number: an odd logprob never fails a row, it only leaves the confidence unknown.

    >>> logprob_sum([-0.5, -0.25])
    -0.75
    >>> logprob_sum([-0.5, "x"]) is None, logprob_sum([]) is None, logprob_sum(None) is None
    (True, True, True)
    >>> logprob_sum([-0.5, float("-inf")]) is None, logprob_sum([-0.5, True]) is None
    (True, True)
    """
    if not isinstance(values, list) or not values:
        return None
    total = 0.0
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        total += value
    return total


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(value).__name__})"


def error_for_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    key_suggestion: str | None = None,
    retry_after: float | None = None,
) -> RequestError:
    """Map an HTTP error status (and the provider's error code) to our typed error.

    >>> type(error_for_status(429, "slow down")).__name__
    'RateLimitError'
    >>> type(error_for_status(400, "too long", code="context_length_exceeded")).__name__
    'ContextLengthError'
    """
    lowered = f"{code or ''} {message}".lower()
    kwargs: dict[str, Any] = {"status_code": status, "retry_after": retry_after}
    if status in (400, 413, 422) and (
        "context_length" in lowered
        or "context length" in lowered
        or "maximum context" in lowered
        or "too many tokens" in lowered
        or "prompt is too long" in lowered
    ):
        return ContextLengthError(message, **kwargs)
    if status == 401:
        return AuthenticationError(message, suggestion=key_suggestion, **kwargs)
    if status == 403:
        return PermissionDeniedError(message, **kwargs)
    if status == 404:
        return NotFoundError(message, **kwargs)
    if status == 408:
        return APIStatusError(
            message,
            retryable=True,
            suggestion="The server timed out the request: it is retried; raise `timeout` "
            "or lower `max_tokens` if it keeps happening.",
            **kwargs,
        )
    if status == 409:
        return ConflictError(message, **kwargs)
    if status == 429:
        return RateLimitError(message, **kwargs)
    if status >= 500:
        return ServerError(message, **kwargs)
    if status in (400, 413, 422):
        return BadRequestError(message, **kwargs)
    return APIStatusError(message, **kwargs)


def normalize_endpoint(endpoint: str) -> str:
    """Check an endpoint URL and drop a trailing slash from its path; one clear ConfigurationError
    (credentials hidden) for anything that is not a usable http(s) URL.

    A query string is kept (some gateways take a key as ``?key=...``) and carried to every request.

    >>> normalize_endpoint("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000/v1'
    >>> normalize_endpoint("https://gw.example.com/v1/?key=abc")
    'https://gw.example.com/v1?key=abc'
    >>> normalize_endpoint("api.example.com/v1")
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: endpoint 'api.example.com/v1' has no scheme: write it as 'https://api.example.com/v1'
    >>> normalize_endpoint("http://user:pw@host:99999/v1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: endpoint 'http://***@host:99999/v1' has an invalid port: ...
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError(
            f"endpoint must be a URL string such as 'https://api.example.com/v1', got {endpoint!r}"
        )
    endpoint = endpoint.strip()
    shown = redact_url(endpoint)
    try:
        parts = urlsplit(endpoint)
    except ValueError as err:  # e.g. "http://[::1/v1": an unclosed IPv6 bracket
        raise ConfigurationError(
            f"endpoint {shown!r} is not a valid URL ({err}): write it like "
            "'https://api.example.com/v1' or 'http://[::1]:8000/v1'"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        if "://" not in endpoint:
            raise ConfigurationError(f"endpoint {shown!r} has no scheme: write it as 'https://{shown}'")
        raise ConfigurationError(f"endpoint {shown!r} must be an http:// or https:// URL with a host")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or any(c.isspace() for c in endpoint):
        problem = (
            "has an invalid port: a port is a number from 1 to 65535" if port == 0 else "contains spaces"
        )
        raise ConfigurationError(f"endpoint {shown!r} {problem}")
    if not parts.hostname:
        raise ConfigurationError(f"endpoint {shown!r} has no host name")
    if parts.fragment or endpoint.endswith("#"):
        raise ConfigurationError(
            f"endpoint {shown!r} has a #fragment, which is never sent to a server: drop it"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def join_url(endpoint: str, path: str, query: str = "") -> str:
    """The URL of ``path`` under ``endpoint``, keeping the endpoint's query string.

    >>> join_url("https://gw.example.com/v1?key=abc", "chat/completions")
    'https://gw.example.com/v1/chat/completions?key=abc'
    >>> join_url("https://res.openai.azure.com", "openai/deployments/d/chat/completions", "api-version=1")
    'https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=1'
    """
    parts = urlsplit(endpoint)
    joined = "&".join(q for q in (query, parts.query) if q)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{path}", joined, ""))
