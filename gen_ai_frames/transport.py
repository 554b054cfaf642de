"""Transports: send a plain HTTP request, return status, headers and body bytes.

A transport knows nothing of LLMs: providers build the request and parse the answer. The engine
applies the timeout and the retries. Two transports ship:

- :class:`AiohttpTransport`, the default: aiohttp keeps CPU per request low with hundreds of
  requests in flight, where httpx's connection pool spends ~20x more (encode/httpx#3215).
- :class:`HttpxTransport`: wraps an ``httpx.AsyncClient`` so users can bring their own client
  (proxies, auth hooks, ``httpx.MockTransport`` in tests).

Both raise :class:`TransportError` for anything below HTTP (refused, reset, DNS, TLS, truncated body),
and :class:`~gen_ai_frames.errors.ResponseTooLargeError` for an answer larger than
``max_response_bytes``, found without reading the rest of it.

Redirects: both follow a 307/308 only within the request's origin (same scheme, host and port), where
the credential headers may go; any other redirect comes back as the 3xx answer it is, and the
provider turns it into a :class:`~gen_ai_frames.errors.RedirectError` that says where it pointed. So
no credential header (``authorization``, ``api-key``, ``x-api-key``, ``x-goog-api-key``...) ever
travels to another host, whichever client library sends it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

from .errors import ResponseTooLargeError, scrub_secrets

if TYPE_CHECKING:
    import aiohttp
    import httpx

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_REDIRECTS",
    "AiohttpTransport",
    "HttpRequest",
    "HttpResponse",
    "HttpxTransport",
    "Transport",
    "TransportError",
    "endpoint_secrets",
    "public_url",
    "redact_url",
    "same_origin",
]

#: The largest answer body read (10 MiB); a larger one fails its row with ResponseTooLargeError.
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024
#: Same-origin 307/308 redirects followed for one request before giving up.
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024


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
        super().__init__(scrub_secrets(message))
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

    def __init__(
        self,
        *,
        verify: bool | str | ssl.SSLContext = True,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._verify = verify
        self._max_bytes = max_response_bytes
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
        return await _following_redirects(self._send_once, request)

    async def _send_once(self, request: HttpRequest) -> HttpResponse:
        import aiohttp

        if self._session is None:
            self._session = self._open()
        try:
            # Redirects are never followed by aiohttp itself: it would carry api-key, x-api-key and
            # x-goog-api-key to another host (it strips only Authorization).
            async with self._session.request(
                request.method,
                request.url,
                data=request.body or None,
                headers=request.headers,
                allow_redirects=False,
            ) as response:
                headers = {name.lower(): value for name, value in response.headers.items()}
                body = await _read_bounded(
                    response.content.iter_chunked(_CHUNK),
                    headers,
                    response.status,
                    self._max_bytes,
                    response.close,
                    response.read,
                )
                return HttpResponse(response.status, headers, body)
        except aiohttp.ClientConnectorCertificateError as err:
            raise TransportError(
                f"TLS certificate check failed: {err.certificate_error}", kind="tls"
            ) from None
        except aiohttp.ClientConnectorDNSError:
            raise TransportError("the host name could not be resolved", kind="dns") from None
        except aiohttp.ClientConnectorError as err:
            raise TransportError(
                f"connection refused or unreachable ({err.os_error})", kind="refused"
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as err:
            raise TransportError(
                f"the connection broke before the answer was complete ({type(err).__name__})", kind="reset"
            ) from None
        except aiohttp.InvalidURL:
            raise TransportError(f"invalid URL {redact_url(request.url)!r}", kind="other") from None
        except aiohttp.ClientError as err:
            raise TransportError(f"HTTP client error: {type(err).__name__}: {redact_url(str(err))}") from None

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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._client = client
        self._owns_client = client is None
        self._transport = transport
        self._verify = verify
        self._max_bytes = max_response_bytes

    async def send(self, request: HttpRequest) -> HttpResponse:
        return await _following_redirects(self._send_once, request)

    async def _send_once(self, request: HttpRequest) -> HttpResponse:
        import httpx

        if self._client is None:
            verify = ssl_context(self._verify)
            self._client = httpx.AsyncClient(
                transport=self._transport,
                verify=verify,
                timeout=None,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )
        try:
            built = self._client.build_request(
                request.method, request.url, content=request.body or None, headers=request.headers
            )
            # follow_redirects=False even for a user's client that follows: httpx would re-send
            # api-key or x-goog-api-key to another host (it strips only Authorization).
            response = await self._client.send(built, stream=True, follow_redirects=False)
            try:
                headers = {name.lower(): value for name, value in response.headers.items()}
                body = await _read_bounded(
                    response.aiter_bytes(_CHUNK), headers, response.status_code, self._max_bytes, None, None
                )
            finally:
                await response.aclose()
        except httpx.ConnectError as err:
            kind = "tls" if "CERTIFICATE" in str(err).upper() else "refused"
            raise TransportError(f"connection failed ({redact_url(str(err))})", kind=kind) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as err:
            raise TransportError(
                f"the connection broke before the answer was complete ({type(err).__name__})", kind="reset"
            ) from None
        except httpx.TimeoutException as err:
            raise TransportError(f"transport timeout ({type(err).__name__})", kind="reset") from None
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise TransportError(f"HTTP client error: {type(err).__name__}: {redact_url(str(err))}") from None
        return HttpResponse(response.status_code, headers, body)

    async def aclose(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None


async def _following_redirects(
    send_once: Callable[[HttpRequest], Awaitable[HttpResponse]], request: HttpRequest
) -> HttpResponse:
    """Send, following a 307/308 (which keep the method and body) only within the same origin.

    Any other 3xx answer is returned with its ``location`` made absolute, for the provider to
    report where the endpoint pointed.
    """
    url = request.url
    for _ in range(MAX_REDIRECTS + 1):
        response = await send_once(request if url == request.url else dataclasses.replace(request, url=url))
        location = response.headers.get("location") if 300 <= response.status < 400 else None
        if not location:
            return response
        try:
            target = urljoin(url, location)
        except ValueError:
            return response
        response.headers = {**response.headers, "location": target}
        if response.status not in (307, 308) or not same_origin(target, url):
            return response
        url = target
    return response


async def _read_bounded(
    chunks: AsyncIterator[bytes],
    headers: Mapping[str, str],
    status: int,
    limit: int,
    close: Callable[[], None] | None,
    read_all: Callable[[], Awaitable[bytes]] | None,
) -> bytes:
    """The body, or ResponseTooLargeError as soon as it is known to exceed ``limit``: a declared
    Content-Length is refused before reading, a chunked body once ``limit`` bytes have arrived."""
    declared = headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else None
    if length is not None and length > limit:
        if close is not None:
            close()  # drop the connection instead of draining the body
        raise _too_large(limit, status, f"Content-Length {length:,}; not read")
    if read_all is not None and length is not None and "content-encoding" not in headers:
        return await read_all()  # the common case: a known, small, uncompressed size, in one call
    received: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            if close is not None:
                close()
            raise _too_large(limit, status, f"stopped reading after {total:,} bytes")
        received.append(chunk)
    return b"".join(received)


def _too_large(limit: int, status: int, detail: str) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"the answer (HTTP {status}) is larger than max_response_bytes={limit:,} ({detail})",
        status_code=status,
    )


def same_origin(url: str, other: str) -> bool:
    """True when both URLs have the same scheme, host and port (where credentials may go).

    >>> same_origin("http://h:8000/v1/x", "http://h:8000/v2"), same_origin("http://h/v1", "https://h/v1")
    (True, False)
    """
    try:
        a, b = urlsplit(url), urlsplit(other)
        return (a.scheme.lower(), a.hostname, a.port or _PORTS.get(a.scheme.lower())) == (
            b.scheme.lower(),
            b.hostname,
            b.port or _PORTS.get(b.scheme.lower()),
        )
    except ValueError:
        return False


_PORTS: dict[str, int] = {"http": 80, "https": 443}


def endpoint_secrets(endpoint: str) -> list[str]:
    """Credentials inside an endpoint URL: the userinfo password and secret-looking query values.

    >>> endpoint_secrets("https://bob:hunter22@gw.example.com/v1?key=abc123&api-version=1")
    ['hunter22', 'abc123']
    """
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [value for name, value in parse_qsl(parts.query) if value and _SECRET_NAME.search(name)]
    return found


def redact_url(url: str) -> str:
    """Hide credentials embedded in a URL, with or without a scheme: the userinfo, and the value of
    every query parameter whose name looks secret (``key``, ``api_key``, ``token``, ``sig``...).

    >>> redact_url("https://user:secret@example.com/v1")
    'https://***@example.com/v1'
    >>> redact_url("https://gw.example.com/v1?key=abc&api-version=2024-10-21")
    'https://gw.example.com/v1?key=***&api-version=2024-10-21'
    """
    url = _CREDENTIALS.sub(r"\1***@", url)
    return _QUERY_SECRET.sub(
        lambda m: m.group(1) + "***" if _SECRET_NAME.search(m.group(2)) else m.group(0), url
    )


def public_url(url: str) -> str:
    """:func:`redact_url`, with secret query parameters left out altogether: what a checkpoint stores
    (the endpoint identifies a run; a key, even hidden, does not).

    >>> public_url("https://gw.example.com/v1?key=abc&api-version=1")
    'https://gw.example.com/v1?api-version=1'
    """
    base, mark, query = redact_url(url).partition("?")
    kept = [pair for pair in query.split("&") if pair and not _SECRET_NAME.search(pair.partition("=")[0])]
    return base + (mark + "&".join(kept) if kept else "")


_CREDENTIALS = re.compile(r"^([a-z][a-z0-9+.-]*://)?[^?#\s]*@", re.IGNORECASE)  # up to the last @
_QUERY_SECRET = re.compile(r"([?&;](\w[\w.\-]*)=)[^&;#\s]*")
_SECRET_NAME = re.compile(r"key|token|secret|passw|sig|auth|credential|session", re.IGNORECASE)
