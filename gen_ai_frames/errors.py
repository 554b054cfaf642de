"""Every error gen-ai-frames raises or reports, each with a message and a suggestion.

The tree::

    GenAIError
    ├── ConfigurationError (also ValueError)      bad arguments or setup, raised before any request
    │   └── LocalModelError                        llama.cpp cannot run on this machine (provider="local")
    ├── CheckpointError                            see gen_ai_frames.checkpoint
    └── RequestError                               one prompt failed; carried per row in batch results
        ├── InvalidPromptError                     None, NaN, empty or non-text prompt: never sent
        ├── NotSentError                           not sent: the run stopped early (fatal error, budget)
        ├── APIConnectionError                     connection refused, reset, DNS, TLS
        │   └── APITimeoutError                    no answer within ``timeout``
        ├── MalformedResponseError                 not JSON, or JSON of the wrong shape (e.g. a proxy page)
        ├── SchemaValidationError                  structured output: the answer does not match ``schema``
        ├── ResponseTooLargeError                  the answer is larger than ``max_response_bytes``
        ├── EmptyAnswerError                       no text: ``max_tokens`` spent before any answer
        ├── ContentFilterError                     the provider withheld the answer
        │   └── RefusalError                       the model declined (its refusal is the message)
        └── APIStatusError                         the provider answered an HTTP error status
            ├── RedirectError                      3xx not followed: the endpoint moved (fatal)
            ├── BadRequestError                    400, 422
            │   └── ContextLengthError             the prompt plus max_tokens exceed the context window
            ├── AuthenticationError                401 (fatal: stops the run)
            ├── PermissionDeniedError              403 (fatal)
            ├── NotFoundError                      404: unknown model or wrong endpoint path (fatal)
            ├── ConflictError                      409
            ├── RateLimitError                     429
            └── ServerError                        5xx, 529 (provider overloaded)

Batch calls never raise ``RequestError`` for one row: they return it as a dict (see
:meth:`RequestError.to_dict`) so one bad row never loses the others.

Every client registers its secrets (the API key, a password or key inside the endpoint URL) with
:func:`register_secret`; a :class:`RequestError` scrubs them from its message and suggestion when it
is built, so a server that echoes the key in its error text cannot get it into an error column,
a checkpoint, a warning or a log.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchExpiredError",
    "BatchPendingError",
    "ConfigurationError",
    "ConflictError",
    "ContentFilterError",
    "ContextLengthError",
    "EmptyAnswerError",
    "FailedPromptsWarning",
    "GenAIError",
    "InvalidPromptError",
    "LocalModelError",
    "MalformedResponseError",
    "NotFoundError",
    "NotSentError",
    "PermissionDeniedError",
    "RateLimitError",
    "SchemaValidationError",
    "RedirectError",
    "RefusalError",
    "RequestError",
    "ResponseTooLargeError",
    "ServerError",
    "register_secret",
    "scrub_secrets",
]

#: Secrets shorter than this are not scrubbed: a key like "k" or "ollama" would blank out words.
MIN_SECRET_LENGTH = 8
_SECRETS: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember ``secret`` so that every error message built from now on has it replaced by ``***``.

    Providers call this for their API key and for credentials found in the endpoint URL.

    >>> register_secret("sk-doc-example-123")
    >>> scrub_secrets("HTTP 401: Incorrect API key provided: sk-doc-example-123")
    'HTTP 401: Incorrect API key provided: ***'
    """
    if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH:
        _SECRETS.add(secret)


def scrub_secrets(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (longest first, so a key that
    contains another is hidden whole)."""
    if not _SECRETS or not text:
        return text
    for secret in sorted((s for s in _SECRETS if s in text), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class GenAIError(Exception):
    """Base class of every exception raised by gen-ai-frames."""


class ConfigurationError(GenAIError, ValueError):
    """A bad argument or setting, found before any request is sent.

    >>> raise ConfigurationError("temperature must be in [0, 2], got 5")
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: temperature must be in [0, 2], got 5
    """


class FailedPromptsWarning(UserWarning):
    """Some prompts of a batch failed; the batch call returned ``None`` for them."""


class RequestError(GenAIError):
    """One prompt's request failed. ``suggestion`` says what to do about it.

    ``retryable`` tells whether sending the same request again may succeed; ``fatal`` whether every
    other request of the run would fail the same way (a bad key, an unknown model), which stops a run.
    """

    default_suggestion = "See the message for details."
    retryable_by_default = False
    fatal = False

    def __init__(
        self,
        message: str,
        *,
        suggestion: str | None = None,
        status_code: int | None = None,
        retryable: bool | None = None,
        attempts: int = 0,
        retry_after: float | None = None,
        sent: bool = True,
    ) -> None:
        # Scrubbed here, where every error is built, so no later layer (error column, checkpoint,
        # warning, CLI) ever holds a key that a server echoed back.
        message = scrub_secrets(message)
        super().__init__(message)
        self.message = message
        self.suggestion = scrub_secrets(suggestion or self.default_suggestion)
        self.status_code = status_code
        self.retryable = self.retryable_by_default if retryable is None else retryable
        self.attempts = attempts
        self.retry_after = retry_after
        self.sent = sent

    @property
    def type(self) -> str:
        """The error's class name, e.g. ``"RateLimitError"``: stable, good for grouping."""
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        """The error as the plain dict that batch calls return.

        >>> AuthenticationError("bad key", status_code=401).to_dict()["type"]
        'AuthenticationError'
        """
        return {
            "message": self.message,
            "suggestion": self.suggestion,
            "type": self.type,
            "status_code": self.status_code,
            "retryable": self.retryable,
            "attempts": self.attempts,
            "sent": self.sent,
        }

    def __str__(self) -> str:
        return f"{self.message} Suggestion: {self.suggestion}"

    def __repr__(self) -> str:
        return f"{self.type}(message={self.message!r}, status_code={self.status_code!r})"


class InvalidPromptError(RequestError):
    default_suggestion = "Give every row a non-empty text prompt, or drop the rows without one."


class NotSentError(RequestError):
    default_suggestion = "Fix the cause named in the message, then run again: finished rows are kept."


class BatchPendingError(NotSentError):
    """The row is in a submitted batch that has not finished yet (``wait=False``)."""

    default_suggestion = (
        "Call again with the same checkpoint to collect the answers (or wait for them): the batch is "
        "never submitted twice."
    )


class BatchExpiredError(RequestError):
    """The row's batch expired, was cancelled or failed before the row ran, and so did its resubmission."""

    default_suggestion = (
        "Call again with the same checkpoint: only the rows without an answer are submitted again."
    )


class APIConnectionError(RequestError):
    default_suggestion = (
        "Check that the server is running at that URL and reachable from this machine "
        "(scheme, host, port, proxy, TLS settings)."
    )
    retryable_by_default = True


class APITimeoutError(APIConnectionError):
    default_suggestion = (
        "Raise `timeout`, lower `max_tokens`, or lower `max_concurrent` if the server is overloaded."
    )


class MalformedResponseError(RequestError):
    default_suggestion = (
        "The endpoint did not answer like an LLM API: check that `endpoint` points at the API base "
        "URL (e.g. ending in /v1) and not at a web page or a proxy's login page."
    )


class SchemaValidationError(RequestError):
    default_suggestion = (
        "The answer is not JSON that matches the schema: raise schema_retries (each retry shows the model "
        "what was wrong), raise max_tokens if the JSON was cut off, or simplify the schema."
    )


class ResponseTooLargeError(RequestError):
    default_suggestion = (
        "The answer is larger than `max_response_bytes` (10 MB by default): lower `max_tokens`, or pass "
        "a larger `max_response_bytes` to create_client if answers this large are expected."
    )


class EmptyAnswerError(RequestError):
    default_suggestion = (
        "The model used all of `max_tokens` before writing any answer text (reasoning models think "
        "first): raise `max_tokens`."
    )


class ContentFilterError(RequestError):
    default_suggestion = "The provider's content filter withheld the answer: rephrase the prompt."


class RefusalError(ContentFilterError):
    default_suggestion = "The model declined to answer (its refusal is in the message): rephrase the prompt."


class APIStatusError(RequestError):
    default_suggestion = "Check the provider's status page and the request parameters."


class RedirectError(APIStatusError):
    default_suggestion = (
        "The endpoint redirected elsewhere: set `endpoint` to the address named in the message "
        "(the API key is never sent to another host, and a POST cannot follow a 301/302/303)."
    )
    fatal = True


class BadRequestError(APIStatusError):
    default_suggestion = "The provider rejected the request: check the parameters named in the message."


class ContextLengthError(BadRequestError):
    default_suggestion = (
        "The prompt plus `max_tokens` is longer than the model's context window: shorten the prompt, "
        "lower `max_tokens`, or use a model with a larger context."
    )


class AuthenticationError(APIStatusError):
    default_suggestion = "Check the API key: pass `api_key=` or set the provider's key variable."
    fatal = True


class PermissionDeniedError(APIStatusError):
    default_suggestion = "The key is valid but may not use this model or endpoint: check its permissions."
    fatal = True


class NotFoundError(APIStatusError):
    default_suggestion = (
        "Check `model_name` (is the model available to this key?) and `endpoint` "
        "(the API base URL, e.g. https://api.openai.com/v1)."
    )
    fatal = True


class ConflictError(APIStatusError):
    retryable_by_default = True


class RateLimitError(APIStatusError):
    default_suggestion = (
        "The provider is rate limiting: lower `max_concurrent`, set `requests_per_minute` or "
        "`tokens_per_minute`, or raise `max_retries`."
    )
    retryable_by_default = True


class ServerError(APIStatusError):
    default_suggestion = (
        "The provider had a server error or is overloaded: retry later, raise `max_retries`, "
        "or lower `max_concurrent`."
    )
    retryable_by_default = True


class LocalModelError(ConfigurationError):
    """llama.cpp cannot run on this machine: its probe in a subprocess died of a signal or failed.

    Raised before the first model load of a process, so that the process itself never dies of the
    native library (``provider="local"``). ``signal`` names the signal that killed the probe, if one
    did; ``suggestion`` gives the command that fixes it (usually a portable rebuild of llama-cpp-python).

    >>> raise LocalModelError("llama.cpp died of SIGILL.", suggestion="Rebuild it.")
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.LocalModelError: llama.cpp died of SIGILL. Suggestion: Rebuild it.
    """

    def __init__(self, message: str, *, suggestion: str, signal: str | None = None) -> None:
        super().__init__(f"{message} Suggestion: {suggestion}")
        self.message = message
        self.suggestion = suggestion
        self.signal = signal

    def __reduce__(self) -> tuple[Any, ...]:
        # Dask ships a worker's exception to the client pickled: rebuild it with its keywords.
        return (_local_model_error, (self.message, self.suggestion, self.signal))


def _local_model_error(message: str, suggestion: str, signal: str | None) -> LocalModelError:
    return LocalModelError(message, suggestion=suggestion, signal=signal)
