"""OpenAI-compatible services and servers, preset: each is the OpenAI provider with its own name,
default endpoint and key variable, so ``create_client(provider="groq", model_name=...)`` is enough.

Each also says what its service documents for structured output and log-probabilities (the table
is in docs/providers.md, "Structured output"): every preset takes OpenAI's ``response_format``
``json_schema`` except DeepSeek, which documents only JSON mode (``json_object``, with the schema
written into the prompt).

>>> GroqProvider.default_endpoint, GroqProvider.api_key_env
('https://api.groq.com/openai/v1', 'GROQ_API_KEY')
>>> sorted(PRESETS)
['deepseek', 'groq', 'lmstudio', 'mistral', 'ollama', 'openrouter', 'together', 'vllm']
"""

from __future__ import annotations

from typing import ClassVar, Literal

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
    """A local Ollama server (``ollama serve``): no key; ``model_name`` is a pulled model, e.g.
    ``"llama3.2"``."""

    name: ClassVar[str] = "ollama"
    api_key_env: ClassVar[str | None] = None
    default_endpoint: ClassVar[str | None] = "http://localhost:11434/v1"
    default_model: ClassVar[str | None] = None
    requires_api_key: ClassVar[bool] = False
    # response_format json_schema: Ollama's OpenAI layer passes json_schema.schema on as its
    # `format` (openai/openai.go, FromChatRequest); `strict` is ignored. Logprobs: listed among
    # the supported features of https://docs.ollama.com/api/openai-compatibility.


class VLLMProvider(OpenAIProvider):
    """A vLLM server (``vllm serve MODEL``): the key is optional, read from ``VLLM_API_KEY``
    (the variable the vLLM server itself reads for ``--api-key``)."""

    name: ClassVar[str] = "vllm"
    api_key_env: ClassVar[str | None] = "VLLM_API_KEY"
    default_endpoint: ClassVar[str | None] = "http://localhost:8000/v1"
    default_model: ClassVar[str | None] = None
    # A remote vLLM without --api-key needs no key either: never demand one.
    requires_api_key: ClassVar[bool] = False
    # response_format json_schema: https://docs.vllm.ai/en/latest/features/structured_outputs/
    # (guided_json, the older extra field, was removed in v0.12).


class LMStudioProvider(OpenAIProvider):
    """LM Studio's local server (Developer tab > Start server): no key."""

    name: ClassVar[str] = "lmstudio"
    api_key_env: ClassVar[str | None] = None
    default_endpoint: ClassVar[str | None] = "http://localhost:1234/v1"
    default_model: ClassVar[str | None] = None
    requires_api_key: ClassVar[bool] = False
    # response_format json_schema, "the same format as OpenAI's Structured Output API":
    # https://lmstudio.ai/docs/api/structured-output


class TogetherProvider(OpenAIProvider):
    """Together AI; the key comes from ``TOGETHER_API_KEY``."""

    name: ClassVar[str] = "together"
    api_key_env: ClassVar[str | None] = "TOGETHER_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.together.xyz/v1"
    default_model: ClassVar[str | None] = None
    # https://docs.together.ai/docs/inference/chat/structured-outputs: response_format json_schema,
    # and "always ... include a plain-text copy of the schema in the prompt" as well.
    schema_in_prompt: ClassVar[bool] = True
    # https://docs.together.ai/docs/logprobs: `"logprobs": 1`; the answer carries token_logprobs.
    logprobs_request: ClassVar[bool | int | None] = 1


class GroqProvider(OpenAIProvider):
    """Groq; the key comes from ``GROQ_API_KEY``."""

    name: ClassVar[str] = "groq"
    api_key_env: ClassVar[str | None] = "GROQ_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.groq.com/openai/v1"
    default_model: ClassVar[str | None] = None
    # https://console.groq.com/docs/structured-outputs: json_schema on every model with structured
    # outputs, but strict: true only on a few (gpt-oss): best-effort mode (strict: false) everywhere.
    strict_schemas: ClassVar[bool] = False
    # https://console.groq.com/docs/openai: `logprobs` "will result in a 400 error": never sent.
    logprobs_request: ClassVar[bool | int | None] = None


class OpenRouterProvider(OpenAIProvider):
    """OpenRouter; the key comes from ``OPENROUTER_API_KEY``; models are ``vendor/model``."""

    name: ClassVar[str] = "openrouter"
    api_key_env: ClassVar[str | None] = "OPENROUTER_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://openrouter.ai/api/v1"
    default_model: ClassVar[str | None] = None
    # response_format json_schema with strict: https://openrouter.ai/docs/structured-outputs


class MistralProvider(OpenAIProvider):
    """Mistral AI (La Plateforme); the key comes from ``MISTRAL_API_KEY``."""

    name: ClassVar[str] = "mistral"
    api_key_env: ClassVar[str | None] = "MISTRAL_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.mistral.ai/v1"
    default_model: ClassVar[str | None] = "mistral-small-latest"
    # response_format json_schema (name, schema, strict):
    # https://docs.mistral.ai/capabilities/structured-output/custom_structured_output/
    # Its chat API documents no logprobs: never sent.
    logprobs_request: ClassVar[bool | int | None] = None


class DeepSeekProvider(OpenAIProvider):
    """DeepSeek; the key comes from ``DEEPSEEK_API_KEY``."""

    name: ClassVar[str] = "deepseek"
    api_key_env: ClassVar[str | None] = "DEEPSEEK_API_KEY"
    default_endpoint: ClassVar[str | None] = "https://api.deepseek.com/v1"
    default_model: ClassVar[str | None] = "deepseek-chat"
    # https://api-docs.deepseek.com/guides/json_mode: only {"type": "json_object"}, and the prompt
    # must say "json" and show the format: the schema goes into the system prompt.
    schema_mode: ClassVar[Literal["json_schema", "json_object"]] = "json_object"


#: Preset name -> class.
PRESETS: dict[str, type[OpenAIProvider]] = {
    cls.name: cls
    for cls in (
        OllamaProvider,
        VLLMProvider,
        LMStudioProvider,
        TogetherProvider,
        GroqProvider,
        OpenRouterProvider,
        MistralProvider,
        DeepSeekProvider,
    )
}
