"""Transports: send a plain HTTP request, return status, headers and body bytes.

A transport knows nothing of LLMs: providers build the request and parse the answer. The engine
applies the timeout and the retries. Two transports ship:

- :class:`AiohttpTransport`, the default: aiohttp keeps CPU per request low with hundreds of
  requests in flight, where httpx's connection pool spends ~20x more (encode/httpx#3215).
- :class:`HttpxTransport`: wraps an ``httpx.AsyncClient`` so users can bring their own client
  (proxies, auth hooks, ``httpx.MockTransport`` in tests).

Both raise :class:`TransportError` for anything below HTTP (refused, reset, DNS, TLS, truncated body).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import aiohttp
    import httpx

__all__ = [
    "AiohttpTransport",
    "HttpRequest",
    "HttpResponse",
    "HttpxTransport",
    "Transport",
    "TransportError",
]


@dataclass(slots=True)
class HttpRequest:
    """A request as a provider builds it. ``headers`` may hold the API key, so repr hides them.

    >>> HttpRequest("POST", "http://127.0.0.1:8000/v1/chat/completions", {"authorization": "x"}, b"{}")
    HttpRequest(POST http://127.0.0.1:8000/v1/chat/completions, 2 bytes)
    """

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __repr__(self) -> str:
        return f"HttpRequest({self.method} {self.url}, {len(self.body)} bytes)"


@dataclass(slots=True)
class HttpResponse:
    """A response: header names are lower-case."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def __repr__(self) -> str:
        return f"HttpResponse({self.status}, {len(self.body)} bytes)"


class TransportError(Exception):
    """The request got no complete HTTP answer. ``kind`` is one of: refused, reset, dns, tls, other."""

    def __init__(self, message: str, *, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class Transport(Protocol):
    """Sends plain requests. One instance serves one event loop."""

    async def send(self, request: HttpRequest) -> HttpResponse: ...

    async def aclose(self) -> None: ...


def ssl_context(verify: bool | str | ssl.SSLContext) -> ssl.SSLContext | bool:
    """``verify=True`` (system CAs), ``False`` (no verification), a CA bundle path, or a context."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is True:
        return _default_ssl_context()
    if verify is False:
        return False
    return ssl.create_default_context(cafile=str(verify))


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Loading the system CA store takes tens of milliseconds: do it once per process.
    return ssl.create_default_context()


class AiohttpTransport:
    """The default transport. The session is created lazily inside the running loop.

    >>> transport = AiohttpTransport()  # doctest: +SKIP
    >>> response = await transport.send(HttpRequest("GET", "http://127.0.0.1:8000/stats"))  # doctest: +SKIP
    """

    def __init__(self, *, verify: bool | str | ssl.SSLContext = True) -> None:
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        # The engine caps concurrency itself, so the pool must not queue requests behind a limit.
        # verify=True uses aiohttp's own verified default context: no per-client CA loading.
        tls = True if self._verify is True else ssl_context(self._verify)
        connector = aiohttp.TCPConnector(limit=0, ssl=tls, ttl_dns_cache=300)
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),  # the engine applies per-request timeouts
            skip_auto_headers=("User-Agent",),
            headers={"user-agent": "gen-ai-frames"},
        )

    async def send(self, request: HttpRequest) -> HttpResponse:
        import aiohttp

        if self._session is None:
            self._session = self._open()
        try:
            async with self._session.request(
                request.method, request.url, data=request.body or None, headers=request.headers
            ) as response:
                body = await response.read()
                headers = {name.lower(): value for name, value in response.headers.items()}
                return HttpResponse(response.status, headers, body)
        except aiohttp.ClientConnectorCertificateError as err:
            raise TransportError(f"TLS certificate check failed: {err.certificate_error}", kind="tls") from None
        except aiohttp.ClientConnectorDNSError:
            raise TransportError("the host name could not be resolved", kind="dns") from None
        except aiohttp.ClientConnectorError as err:
            raise TransportError(f"connection refused or unreachable ({err.os_error})", kind="refused") from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as err:
            raise TransportError(f"the connection broke before the answer was complete ({type(err).__name__})",
                                 kind="reset") from None
        except aiohttp.InvalidURL:
            raise TransportError(f"invalid URL {request.url!r}", kind="other") from None
        except aiohttp.ClientError as err:
            raise TransportError(f"HTTP client error: {type(err).__name__}: {err}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxTransport:
    """Sends through an ``httpx.AsyncClient``: the user's own, or one made around ``transport``.

    >>> import httpx
    >>> transport = HttpxTransport(transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: bool | str | ssl.SSLContext = True,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self._transport = transport
        self._verify = verify

    async def send(self, request: HttpRequest) -> HttpResponse:
        import httpx

        if self._client is None:
            verify = ssl_context(self._verify)
            self._client = httpx.AsyncClient(
                transport=self._transport, verify=verify, timeout=None,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )
        try:
            response = await self._client.request(
                request.method, request.url, content=request.body or None, headers=request.headers
            )
        except httpx.ConnectError as err:
            kind = "tls" if "CERTIFICATE" in str(err).upper() else "refused"
            raise TransportError(f"connection failed ({err})", kind=kind) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            raise TransportError(f"the connection broke before the answer was complete ({type(err).__name__})",
                                 kind="reset") from None
        except httpx.TimeoutException as err:
            raise TransportError(f"transport timeout ({type(err).__name__})", kind="reset") from None
        except httpx.HTTPError as err:
            raise TransportError(f"HTTP client error: {type(err).__name__}: {err}") from None
        headers = {name.lower(): value for name, value in response.headers.items()}
        return HttpResponse(response.status_code, headers, response.content)

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None
