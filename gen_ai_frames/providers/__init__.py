"""Provider registry. Built-in providers register through the same entry-point group as third
parties' (``gen_ai_frames.providers`` in ``pyproject.toml``), so a plugin is a first-class citizen.

A plugin package declares::

    [project.entry-points."gen_ai_frames.providers"]
    myllm = "myllm_plugin:MyLLMProvider"     # a subclass of gen_ai_frames.providers.base.Provider
"""

from __future__ import annotations

from importlib.metadata import entry_points

from ..errors import ConfigurationError
from .base import Completion, Provider
from .openai import OpenAIProvider

__all__ = ["ENTRY_POINT_GROUP", "Completion", "OpenAIProvider", "Provider", "get_provider", "providers"]

ENTRY_POINT_GROUP = "gen_ai_frames.providers"

# Used when the package runs from a source tree that was never installed (no entry points).
_BUILTIN: dict[str, str] = {
    "openai": "gen_ai_frames.providers.openai:OpenAIProvider",
}


def _registered() -> dict[str, str]:
    found = dict(_BUILTIN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found[entry_point.name] = entry_point.value
    return found


def providers() -> list[str]:
    """Names of the providers available to ``create_client``, built-in and plugins.

    >>> "openai" in providers()
    True
    """
    return sorted(_registered())


def get_provider(name: str) -> type[Provider]:
    """The provider class registered as ``name``; a ConfigurationError listing the known ones."""
    registered = _registered()
    if name not in registered:
        raise ConfigurationError(
            f"unknown provider {name!r}; known providers: {', '.join(sorted(registered))}"
        )
    module_name, _, attribute = registered[name].partition(":")
    module = __import__(module_name, fromlist=[attribute])
    return getattr(module, attribute)  # type: ignore[no-any-return]
