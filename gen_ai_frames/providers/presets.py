"""OpenAI-compatible services and servers, preset: each is the OpenAI provider with its own name,
default endpoint and key variable, so ``create_client(provider="groq", model_name=...)`` is enough.

>>> GroqProvider.default_endpoint, GroqProvider.api_key_env
('https://api.groq.com/openai/v1', 'GROQ_API_KEY')
>>> sorted(PRESETS)
['deepseek', 'groq', 'lmstudio', 'mistral', 'ollama', 'openrouter', 'together', 'vllm']
"""

from __future__ import annotations

from typing import ClassVar

from .openai import OpenAIProvider

__all__ = [
    "PRESETS",
    "DeepSeekProvider",
    "GroqProvider",
    "LMStudioProvider",
    "MistralProvider",
    "OllamaProvider",
    "OpenRouterProvider",
    "TogetherProvider",
    "VLLMProvider",
]


class OllamaProvider(OpenAIProvider):
    """A local Ollama server (``ollama serve``): no key; ``model_name`` is a pulled model, e.g. ``"llama3.2"``."""

    name: ClassVar[str] = "ollama"
    api_key_env: ClassVar[str | None] = None
    default_endpoint: ClassVar[str | None] = "http://localhost:11434/v1"
    default_model: ClassVar[str | None] = None
    requires_api_key: ClassVar[bool] = False


class VLLMProvider(OpenAIProvider):
    """A vLLM server (``vllm serve MODEL``): the key is optional, read from ``VLLM_API_KEY``
    (the variable the vLLM server itself reads for ``--api-key``)."""

    name: ClassVar[str] = "vllm"
    api_key_env: ClassVar[str | None] = "VLLM_API_KEY"
    default_endpoint: ClassVar[str | None] = "http://localhost:8000/v1"
    default_model: ClassVar[str | None] = None
    # A remote vLLM without --api-key needs no key either: never demand one.
    requires_api_key: ClassVar[bool] = False


class LMStudioProvider(OpenAIProvider):
    """LM Studio's local server (Developer tab > Start server): no key."""

    name: ClassVar[str] = "lmstudio"
    api_key_env: ClassVar[str | None] = None
    default_endpoint: ClassVar[str | None] = "http://localhost:1234/v1"
    default_model: ClassVar[str | None] = None
    requires_api_key: ClassVar[bool] = False


class TogetherProvider(OpenAIProvider):
    """Together AI; the key comes from ``TOGETHER_API_KEY``."""

    name: ClassVar[str] = "together"
    api_key_env: ClassVar[str | None] = "TOGETHER_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.together.xyz/v1"
    default_model: ClassVar[str | None] = None


class GroqProvider(OpenAIProvider):
    """Groq; the key comes from ``GROQ_API_KEY``."""

    name: ClassVar[str] = "groq"
    api_key_env: ClassVar[str | None] = "GROQ_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.groq.com/openai/v1"
    default_model: ClassVar[str | None] = None


class OpenRouterProvider(OpenAIProvider):
    """OpenRouter; the key comes from ``OPENROUTER_API_KEY``; models are ``vendor/model``."""

    name: ClassVar[str] = "openrouter"
    api_key_env: ClassVar[str | None] = "OPENROUTER_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://openrouter.ai/api/v1"
    default_model: ClassVar[str | None] = None


class MistralProvider(OpenAIProvider):
    """Mistral AI (La Plateforme); the key comes from ``MISTRAL_API_KEY``."""

    name: ClassVar[str] = "mistral"
    api_key_env: ClassVar[str | None] = "MISTRAL_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.mistral.ai/v1"
    default_model: ClassVar[str | None] = "mistral-small-latest"


class DeepSeekProvider(OpenAIProvider):
    """DeepSeek; the key comes from ``DEEPSEEK_API_KEY``."""

    name: ClassVar[str] = "deepseek"
    api_key_env: ClassVar[str | None] = "DEEPSEEK_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.deepseek.com/v1"
    default_model: ClassVar[str | None] = "deepseek-chat"


#: Preset name -> class.
PRESETS: dict[str, type[OpenAIProvider]] = {
    cls.name: cls
    for cls in (OllamaProvider, VLLMProvider, LMStudioProvider, TogetherProvider, GroqProvider,
                OpenRouterProvider, MistralProvider, DeepSeekProvider)
}
