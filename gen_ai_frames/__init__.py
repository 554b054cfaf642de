"""gen-ai-frames: enrich tabular data with LLM output.

>>> from gen_ai_frames import create_client
>>> client = create_client(provider="openai", api_key="sk-...", model_name="gpt-4o-mini")
"""

from __future__ import annotations

from . import accessor as _accessor  # noqa: F401  (importing registers df.genai)
from .client import Client
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BatchExpiredError,
    BatchPendingError,
    ConfigurationError,
    ContentFilterError,
    ContextLengthError,
    EmptyAnswerError,
    FailedPromptsWarning,
    GenAIError,
    InvalidPromptError,
    LocalModelError,
    MalformedResponseError,
    NotFoundError,
    NotSentError,
    PermissionDeniedError,
    RateLimitError,
    RedirectError,
    RefusalError,
    RequestError,
    ResponseTooLargeError,
    SchemaValidationError,
    ServerError,
)
from .factory import create_client
from .providers import available_providers
from .retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BatchExpiredError",
    "BatchPendingError",
    "Client",
    "ConfigurationError",
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
    "RedirectError",
    "RefusalError",
    "RequestError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "SchemaValidationError",
    "ServerError",
    "__version__",
    "available_providers",
    "create_client",
]
