"""``create_client``: the entry point of the batch processing API."""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .client import Client
from .errors import ConfigurationError
from .params import validate_positive_int
from .providers import get_provider
from .providers.base import Provider, normalize_endpoint, redact_url
from .retry import RetryPolicy
from .transport import DEFAULT_MAX_RESPONSE_BYTES, AiohttpTransport, HttpxTransport, Transport

if TYPE_CHECKING:
    import httpx

    from .providers.local import LocalModel

__all__ = ["create_client"]


def create_client(
    provider: str = "openai",
    api_key: str | None = None,
    endpoint: str | None = None,
    model_name: str | None = None,
    *,
    max_retries: int = 3,
    retry: RetryPolicy | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    rate_limit_timeout: float = 600.0,
    verify: bool | str | ssl.SSLContext = True,
    http_client: httpx.AsyncClient | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    **provider_options: Any,
) -> Client:
    """Build a client for one model of one provider.

    ``requests_per_minute`` / ``tokens_per_minute`` are the default rate limits of every run; without
    them a run paces itself to the limits the provider states or its 429s allow.
    ``rate_limit_timeout`` (600 s) is how long a run may be rate limited without a single answer
    before the rows still waiting fail with ``RateLimitError``.
    ``api_key`` falls back to the provider's environment variable (``OPENAI_API_KEY`` for
    ``"openai"``). ``verify`` controls TLS verification (``False``, or a CA bundle path).
    ``http_client`` (an ``httpx.AsyncClient``) or ``transport`` (e.g. ``httpx.MockTransport``) send
    through httpx instead of the default aiohttp transport. ``max_response_bytes`` (10 MiB) caps
    the size of one answer: a larger one fails its row with ``ResponseTooLargeError`` unread.

    An endpoint may carry credentials (``http://user:pw@host/v1``: HTTP basic auth to a proxy) or a
    key in its query (``?key=...``); both are hidden wherever the endpoint is shown. Basic auth and
    a bearer API key would both need the Authorization header, so that pair is refused.

    >>> client = create_client(provider="openai", api_key="sk-...", model_name="gpt-4o-mini")
    >>> client
    Client(provider='openai', model_name='gpt-4o-mini', endpoint='https://api.openai.com/v1')
    """
    provider_class = get_provider(provider)
    # A provider may read its endpoint from the environment (Azure: AZURE_OPENAI_ENDPOINT).
    endpoint = getattr(provider_class, "endpoint_from_env", lambda given: given)(endpoint)
    if endpoint is None:
        endpoint = provider_class.default_endpoint
        if endpoint is None:
            endpoint_env = getattr(provider_class, "endpoint_env", None)
            raise ConfigurationError(
                f"provider {provider!r} needs `endpoint=` (its API base URL)"
                + (f" or the {endpoint_env} environment variable" if endpoint_env else "")
            )
    if provider_class.uses_http:
        endpoint = normalize_endpoint(endpoint)
    if model_name is None:
        model_name = provider_class.default_model
        if model_name is None:
            raise ConfigurationError(f"provider {provider!r} needs `model_name=`")
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigurationError(f"model_name must be a non-empty string, got {model_name!r}")
    if api_key is None and provider_class.api_key_env:
        api_key = os.environ.get(provider_class.api_key_env) or None
    if (
        api_key is None
        and provider_class.requires_api_key
        and not (provider_class.uses_http and is_local(endpoint))
    ):
        raise ConfigurationError(
            f"no API key for provider {provider!r}: set the {provider_class.api_key_env} environment "
            "variable "
            "or pass api_key=..."
            if provider_class.api_key_env
            else f"no API key for provider {provider!r}: pass api_key=..."
        )
    validate_positive_int("max_response_bytes", max_response_bytes)
    if (
        api_key
        and provider_class.uses_http
        and provider_class.credential_header == "authorization"
        and urlsplit(endpoint).username is not None
    ):
        # aiohttp would crash on the pair ("Cannot combine AUTHORIZATION header ..."); picking one
        # silently would send the wrong credential.
        raise ConfigurationError(
            f"endpoint {redact_url(endpoint)!r} has credentials in it (user:password@, sent as HTTP basic "
            f"auth) and an API key is set (api_key= or {provider_class.api_key_env or 'the key variable'}): "
            "both would go in the Authorization header; drop the credentials from the endpoint, or the key"
        )
    instance = provider_class(api_key=api_key, endpoint=endpoint, model_name=model_name, **provider_options)
    local_model = _local_model(instance)
    if local_model is not None:
        from .providers.local import load_model

        # Probe llama.cpp and load the model now (once per process): a library build this CPU cannot
        # run, or a file llama.cpp cannot load, fails here rather than at the first prompt.
        load_model(local_model)

    make_transport = _TransportFactory(instance, http_client, transport, verify, max_response_bytes)
    return Client(
        instance,
        make_transport,
        max_retries=max_retries,
        retry=retry,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        rate_limit_timeout=rate_limit_timeout,
    )


@dataclass(frozen=True)
class _TransportFactory:
    """Makes a fresh transport for each run. A module-level class, not a closure, so that a Client
    pickles (Dask ships clients to its workers)."""

    provider: Provider
    http_client: httpx.AsyncClient | None
    transport: httpx.AsyncBaseTransport | None
    verify: bool | str | ssl.SSLContext
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES

    def __call__(self) -> Transport:
        local_model = _local_model(self.provider)
        if local_model is not None:
            from .providers.local import LocalTransport

            return LocalTransport(local_model)  # the in-process model pool
        own = self.provider.create_transport()
        if own is not None:
            return own
        if self.http_client is not None or self.transport is not None:
            return HttpxTransport(
                self.http_client,
                transport=self.transport,
                verify=self.verify,
                max_response_bytes=self.max_response_bytes,
            )
        return AiohttpTransport(verify=self.verify, max_response_bytes=self.max_response_bytes)


def _local_model(provider: Provider) -> LocalModel | None:
    """The model of an in-process ``provider="local"``, None for every other provider."""
    if provider.uses_http:
        return None
    # Imported only here: clients of HTTP providers never load the local provider's module.
    from .providers.local import LocalProvider

    return provider.model if isinstance(provider, LocalProvider) else None


def is_local(endpoint: str) -> bool:
    """True for loopback endpoints, which usually need no key (a local vLLM, Ollama, llama.cpp).

    >>> is_local("http://127.0.0.1:8000/v1"), is_local("https://api.openai.com/v1")
    (True, False)
    """
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified
