"""Provider registry. Built-in providers register through the same entry-point group as third
parties' (``gen_ai_frames.providers`` in ``pyproject.toml``), so a plugin is a first-class citizen.

A plugin package declares::

    [project.entry-points."gen_ai_frames.providers"]
    myllm = "myllm_plugin:MyLLMProvider"     # a subclass of gen_ai_frames.providers.base.Provider

Listing providers reads names only: no provider module is imported until one is asked for, so a
plugin with heavy dependencies (or a broken one) costs nothing until it is used.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from importlib.metadata import entry_points
from typing import Any

from ..errors import ConfigurationError
from .base import Completion, Provider
from .openai import OpenAIProvider

__all__ = [
    "ENTRY_POINT_GROUP",
    "Completion",
    "OpenAIProvider",
    "Provider",
    "available_providers",
    "get_provider",
]

ENTRY_POINT_GROUP = "gen_ai_frames.providers"

# Used when the package runs from a source tree that was never installed (no entry points), or
# from an install made before a provider was added. Keep in step with pyproject.toml.
_BUILTIN: dict[str, str] = {
    "openai": "gen_ai_frames.providers.openai:OpenAIProvider",
    "anthropic": "gen_ai_frames.providers.anthropic:AnthropicProvider",
    "azure": "gen_ai_frames.providers.azure:AzureOpenAIProvider",
    "gemini": "gen_ai_frames.providers.gemini:GeminiProvider",
    "ollama": "gen_ai_frames.providers.presets:OllamaProvider",
    "vllm": "gen_ai_frames.providers.presets:VLLMProvider",
    "lmstudio": "gen_ai_frames.providers.presets:LMStudioProvider",
    "together": "gen_ai_frames.providers.presets:TogetherProvider",
    "groq": "gen_ai_frames.providers.presets:GroqProvider",
    "openrouter": "gen_ai_frames.providers.presets:OpenRouterProvider",
    "mistral": "gen_ai_frames.providers.presets:MistralProvider",
    "deepseek": "gen_ai_frames.providers.presets:DeepSeekProvider",
    "local": "gen_ai_frames.providers.local:LocalProvider",
}


def _registered() -> dict[str, str]:
    found = dict(_BUILTIN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        found[entry_point.name] = entry_point.value
    return found


def available_providers() -> list[str]:
    """Names of the providers available to ``create_client``, built-in and plugins.

    >>> {"openai", "anthropic", "azure", "gemini", "ollama", "local"} <= set(available_providers())
    True
    """
    return sorted(_registered())


class _CallableModule(types.ModuleType):
    """Version 0.1 exported a function ``gen_ai_frames.providers()`` that hid this package; the
    package is itself callable now, as a deprecated alias of :func:`available_providers`."""

    def __call__(self) -> list[str]:
        warnings.warn(
            "gen_ai_frames.providers() is deprecated: call gen_ai_frames.available_providers()",
            DeprecationWarning,
            stacklevel=2,
        )
        return available_providers()


sys.modules[__name__].__class__ = _CallableModule


def get_provider(name: str) -> type[Provider]:
    """The provider class registered as ``name``; a ConfigurationError listing the known ones.

    >>> get_provider("anthropic").__name__
    'AnthropicProvider'
    """
    registered = _registered()
    if name not in registered:
        raise ConfigurationError(
            f"unknown provider {name!r}; known providers: {', '.join(sorted(registered))}"
        )
    target = registered[name]
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise  # a dependency of the provider is missing: its own message says which
        raise ConfigurationError(
            f"provider {name!r} is registered as {target!r}, but module {module_name!r} is not installed"
        ) from err
    provider_class: Any = module
    for part in attribute.split(".") if attribute else ():
        provider_class = getattr(provider_class, part, None)
    if not (isinstance(provider_class, type) and issubclass(provider_class, Provider)):
        raise ConfigurationError(
            f"provider {name!r} is registered as {target!r}, which is not a subclass of "
            "gen_ai_frames.providers.base.Provider"
        )
    return provider_class
