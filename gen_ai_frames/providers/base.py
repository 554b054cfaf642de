"""The provider contract: pure functions from (messages, params) to a request, and from a response
to a :class:`Completion` or a typed :class:`~gen_ai_frames.errors.RequestError`.

A provider never sends anything, so it is tested with plain JSON fixtures and any transport serves it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

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
    RequestError,
    ServerError,
)
from ..params import GenerationParams, Message
from ..transport import HttpRequest, HttpResponse, Transport

try:  # orjson parses answers ~3x faster; the standard library is the fallback
    import orjson

    loads = orjson.loads

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover - orjson is a dependency
    loads = json.loads

    def dumps(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False).encode()


__all__ = ["Completion", "Provider", "error_for_status", "redact_url", "normalize_endpoint"]


@dataclass(slots=True)
class Completion:
    """A successful answer."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


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

    def __init__(self, *, api_key: str | None, endpoint: str, model_name: str, **options: Any) -> None:
        if options:
            raise ConfigurationError(
                f"unknown option(s) for provider {self.name!r}: {', '.join(sorted(options))}"
            )
        self._api_key = api_key
        self.endpoint = endpoint
        self.model_name = model_name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={redact_url(self.endpoint)!r}, model_name={self.model_name!r})"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the model answering: stored in checkpoints (never the key)."""
        return {"provider": self.name, "endpoint": redact_url(self.endpoint), "model": self.model_name}

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

    def json_or_none(self, response: HttpResponse) -> Any:
        """The decoded body of an error answer, or None when it is not JSON (e.g. a proxy's page)."""
        try:
            return self.parse_json(response)
        except MalformedResponseError:
            return None


def error_for_status(
    status: int, message: str, *, code: str | None = None, key_suggestion: str | None = None,
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
    if status in (400, 413, 422) and ("context_length" in lowered or "context length" in lowered
                                       or "maximum context" in lowered or "too many tokens" in lowered
                                       or "prompt is too long" in lowered):
        return ContextLengthError(message, **kwargs)
    if status == 401:
        return AuthenticationError(message, suggestion=key_suggestion, **kwargs)
    if status == 403:
        return PermissionDeniedError(message, **kwargs)
    if status == 404:
        return NotFoundError(message, **kwargs)
    if status == 408:
        return APIStatusError(message, retryable=True,
                              suggestion="The server timed out the request: it is retried; raise `timeout` "
                                         "or lower `max_tokens` if it keeps happening.", **kwargs)
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
    """Check an endpoint URL and drop a trailing slash; a clear error for a URL without a scheme.

    >>> normalize_endpoint("http://127.0.0.1:8000/v1/")
    'http://127.0.0.1:8000/v1'
    >>> normalize_endpoint("api.example.com/v1")
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: endpoint 'api.example.com/v1' has no scheme: write it as 'https://api.example.com/v1'
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError(f"endpoint must be a URL string such as 'https://api.example.com/v1', got {endpoint!r}")
    endpoint = endpoint.strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        shown = redact_url(endpoint)
        if "://" not in endpoint:
            raise ConfigurationError(f"endpoint {shown!r} has no scheme: write it as 'https://{shown}'")
        raise ConfigurationError(f"endpoint {shown!r} must be an http:// or https:// URL with a host")
    return endpoint.rstrip("/")


def redact_url(url: str) -> str:
    """Hide credentials embedded in a URL, with or without a scheme.

    >>> redact_url("https://user:secret@example.com/v1")
    'https://***@example.com/v1'
    """
    return _CREDENTIALS.sub(r"\1***@", url)


_CREDENTIALS = re.compile(r"^([a-z][a-z0-9+.-]*://)?[^/?#@\s]+@", re.IGNORECASE)
