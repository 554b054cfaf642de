"""gen-ai-frames: enrich tabular data with LLM output.

>>> from gen_ai_frames import create_client
>>> client = create_client(provider="openai", api_key="sk-...", model_name="gpt-4o-mini")
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence

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


def _register_polars() -> None:
    """Register ``df.genai`` / ``lf.genai`` / ``pl.col(...).genai`` for polars, at no cost without it.

    If polars is already imported, register now. If it is installed but not imported, register when
    it is: a pandas user who happens to have polars installed does not pay for importing it (~0.3 s).
    """
    if sys.modules.get("polars") is not None:
        from . import polars  # noqa: F401  (registers the namespaces)

        return
    try:
        installed = importlib.util.find_spec("polars") is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        sys.meta_path.insert(0, _PolarsHook())


class _PolarsHook(importlib.abc.MetaPathFinder):
    """A meta path finder that, once ``polars`` is imported, imports ``gen_ai_frames.polars``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "polars":
            return None
        sys.meta_path.remove(self)  # once; and find the real spec without finding ourselves
        spec = importlib.util.find_spec("polars")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """polars' own loader, then the registration of the namespaces."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            importlib.import_module(f"{__name__}.polars")
        except Exception as err:  # a polars too old: importing polars must still work
            import warnings

            warnings.warn(
                f"gen_ai_frames cannot serve this polars ({err}); pip install -U 'gen-ai-frames[polars]'",
                stacklevel=2,
            )

    def __getattr__(self, name: str) -> object:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


_register_polars()

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
