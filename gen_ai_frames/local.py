"""Deprecated: the local provider lives in :mod:`gen_ai_frames.providers.local`.

This module re-exports its public names so code written for earlier versions keeps working;
using them from here warns (``DeprecationWarning``). ``LocalProvider`` alone does not warn: installs
made before the move register the provider's entry point as ``gen_ai_frames.local:LocalProvider``,
and ``create_client(provider="local")`` must stay silent for them until they reinstall.

>>> from gen_ai_frames.providers.local import unload_models  # the new home
"""

from __future__ import annotations

import warnings
from typing import Any

from .providers import local as _local

__all__ = ["LocalProvider"]

LocalProvider = _local.LocalProvider

#: What this module exported before the move; each is looked up in the new module, with a warning.
_MOVED = frozenset(
    {
        "BUNDLED_MODEL",
        "LocalTransport",
        "bundled_model_path",
        "default_threads",
        "resolve_model",
        "unload_models",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"gen_ai_frames.local.{name} moved to gen_ai_frames.providers.local.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
