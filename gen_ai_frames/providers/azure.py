"""Azure OpenAI: the OpenAI API behind a per-resource endpoint and a per-deployment URL.

``POST {endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version}``
with the key in an ``api-key`` header. Bodies and errors are OpenAI's, so parsing is inherited;
only Azure's prompt filter (HTTP 400 with code ``content_filter``) needs its own mapping.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from ..errors import ConfigurationError, ContentFilterError, NotFoundError, RequestError
from ..transport import HttpResponse
from .base import join_url
from .openai import OpenAIProvider

__all__ = ["AzureOpenAIProvider"]

#: A generally available (non-preview) data-plane API version.
DEFAULT_API_VERSION = "2024-10-21"


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI. ``model_name`` is the *deployment* name; ``endpoint`` the resource URL
    (``https://<resource>.openai.azure.com``), else ``AZURE_OPENAI_ENDPOINT``.

    >>> from gen_ai_frames.params import GenerationParams
    >>> provider = AzureOpenAIProvider(api_key="k", endpoint="https://res.openai.azure.com",
    ...                                model_name="my-gpt4o")
    >>> provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams()).url
    'https://res.openai.azure.com/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21'
    """

    name: ClassVar[str] = "azure"
    api_key_env: ClassVar[str | None] = "AZURE_OPENAI_API_KEY"
    #: Read by ``create_client`` (through :meth:`endpoint_from_env`) when ``endpoint`` is not given.
    endpoint_env: ClassVar[str | None] = "AZURE_OPENAI_ENDPOINT"
    # Every Azure resource has its own host, so there is no default endpoint, and deployments are
    # named by their owner, so there is no default model either.
    default_endpoint: ClassVar[str | None] = None
    default_model: ClassVar[str | None] = None
    credential_header: ClassVar[str | None] = "api-key"

    def __init__(
        self,
        *,
        api_key: str | None,
        endpoint: str,
        model_name: str,
        api_version: str = DEFAULT_API_VERSION,
        api: str = "chat",
        **options: Any,
    ) -> None:
        if "organization" in options:
            raise ConfigurationError("option 'organization' is OpenAI's, not Azure's: drop it")
        if not isinstance(api_version, str) or not api_version.strip():
            raise ConfigurationError(
                f"api_version must be a string such as {DEFAULT_API_VERSION!r}, got {api_version!r}"
            )
        # The portal sometimes shows the endpoint with the "/openai" path: accept both.
        parts = urlsplit(endpoint)
        endpoint = urlunsplit(parts._replace(path=parts.path.rstrip("/").removesuffix("/openai")))
        super().__init__(api_key=api_key, endpoint=endpoint, model_name=model_name, api=api, **options)
        self.api_version = api_version
        self._headers.pop("authorization", None)  # Azure keys go in "api-key", not a bearer token
        if api_key:
            self._headers["api-key"] = api_key
        path = "chat/completions" if api == "chat" else "completions"
        self._url = join_url(
            endpoint,
            f"openai/deployments/{quote(model_name, safe='')}/{path}",
            f"api-version={quote(api_version, safe='')}",
        )

    @classmethod
    def endpoint_from_env(cls, endpoint: str | None) -> str | None:
        """``endpoint`` if given, else the ``AZURE_OPENAI_ENDPOINT`` environment variable (or None).

        >>> AzureOpenAIProvider.endpoint_from_env("https://res.openai.azure.com")
        'https://res.openai.azure.com'
        """
        if endpoint is None and cls.endpoint_env:
            return os.environ.get(cls.endpoint_env) or None
        return endpoint

    def _error(self, response: HttpResponse, data: Any = None, status: int | None = None) -> RequestError:
        if data is None:
            data = self.json_or_none(response)
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            inner: dict[str, Any] = error["innererror"] if isinstance(error.get("innererror"), dict) else {}
            if error.get("code") == "content_filter" or inner.get("code") == "ResponsibleAIPolicyViolation":
                # Azure's prompt filter answers 400; it is no bad request: rephrasing is the fix.
                return ContentFilterError(
                    f"HTTP {status or response.status}: {error.get('message') or 'filtered'}",
                    status_code=status or response.status,
                )
        result = super()._error(response, data, status)
        if isinstance(result, NotFoundError):
            result.suggestion = (
                "Check `model_name`: for Azure it is the deployment name (Azure portal > "
                "Deployments), not the model name; and check `endpoint` "
                "(https://<resource>.openai.azure.com) and `api_version`."
            )
        return result
