"""A loopback HTTP server that misbehaves on purpose, for tests of what a user sees when a server, a
proxy or a gateway answers wrongly (the "hostile server" table of docs/errors.md).

Each request is answered by the :class:`Reply` scripted for its prompt (the last user message, in
the OpenAI, Anthropic or Gemini dialect), else by ``default``: a normal answer that echoes the
prompt in the dialect of the request's path. Every request is recorded in :attr:`HostileServer.requests`.

Example::

    from gen_ai_frames.testing.hostile import HostileServer, Reply, chat

    script = {"odd": Reply(json=chat("hi", usage=[1, 2])), "moved": Reply(status=302, location="/v2")}
    with HostileServer(script) as server:
        client = create_client(endpoint=server.url, model_name="m", api_key="sk-...")
        ...
        assert server.requests[0].headers["authorization"] == "Bearer sk-..."
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .fake_server.loopback import LoopbackServer

__all__ = ["CREDENTIAL_HEADERS", "HostileServer", "Reply", "Seen", "chat"]

#: Request headers that carry a key in one provider's dialect or another.
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key")

_UNSET: Any = object()


def chat(
    text: Any = "ok", *, finish_reason: Any = "stop", usage: Any = _UNSET, **message: Any
) -> dict[str, Any]:
    """An OpenAI Chat Completions answer; every field may be given a wrong type on purpose.

    >>> chat("hi", usage=[1])["usage"], chat(None, refusal="No.")["choices"][0]["message"]["refusal"]
    ([1], 'No.')
    """
    return {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, **message},
                "finish_reason": finish_reason,
            }
        ],
        "usage": (
            {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5} if usage is _UNSET else usage
        ),
    }


@dataclass
class Reply:
    """One scripted answer.

    ``json`` (any value) or ``body`` (bytes) is the body; ``location`` makes a redirect (with
    ``append_path`` the request's path and query are appended, to point at the same API on another
    server); ``size`` streams that many filler bytes (``chunked=True``: without Content-Length);
    ``echo_key`` answers 401 with the request's credential inside the error message, as some
    proxies do. ``times`` limits the reply to the first so many requests of its prompt; later ones
    get the normal answer.
    """

    status: int = 200
    json: Any = _UNSET
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    location: str | None = None
    append_path: bool = False
    size: int = 0
    chunked: bool = False
    echo_key: bool = False
    times: int | None = None


@dataclass
class Seen:
    """A request as the server received it: header names in lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def credentials(self) -> dict[str, str]:
        """The credential headers this request carried (see :data:`CREDENTIAL_HEADERS`)."""
        return {name: value for name, value in self.headers.items() if name in CREDENTIAL_HEADERS}


class HostileServer(LoopbackServer):
    """Serve ``script`` (prompt -> :class:`Reply`) on 127.0.0.1 in a background thread.

    ``default`` answers prompts that are not in the script (None: a normal echo answer).
    :attr:`requests` lists every request received; :attr:`bytes_sent` the bytes of each streamed
    ``size`` reply that reached the socket before the client stopped reading.
    """

    thread_name = "HostileServer"

    def __init__(self, script: Mapping[str, Reply] | None = None, *, default: Reply | None = None) -> None:
        super().__init__()
        self.script = dict(script or {})
        self.default = default
        self.requests: list[Seen] = []
        self.bytes_sent: list[int] = []
        self._used: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<HostileServer port={self.port}>"

    def make_runner(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return web.AppRunner(app, access_log=None, shutdown_timeout=0.1)

    # ----------------------------------------------------------------------------- answers
    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        seen = Seen(request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}, body)
        self.requests.append(seen)
        prompt = _prompt(request.path, body)
        reply = self.script.get(prompt or "", self.default)
        used = self._used[prompt or ""] = self._used.get(prompt or "", 0) + 1
        if reply is not None and reply.times is not None and used > reply.times:
            reply = None
        if reply is None:
            return web.json_response(_echo(request.path, prompt or ""))
        headers = dict(reply.headers)
        if reply.location is not None:
            headers["location"] = reply.location + (request.path_qs if reply.append_path else "")
        if reply.echo_key:
            key = next(iter(seen.credentials().values()), "").removeprefix("Bearer ")
            error = {
                "error": {
                    "message": f"Incorrect API key provided: {key}",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
            status = 401 if reply.status == 200 else reply.status
            return web.json_response(error, status=status, headers=headers)
        if reply.size:
            return await self._stream(request, reply, headers)
        if reply.json is not _UNSET:
            return web.Response(
                status=reply.status,
                body=json.dumps(reply.json).encode(),
                headers={"content-type": "application/json", **headers},
            )
        return web.Response(status=reply.status, body=reply.body or b"", headers=headers)

    async def _stream(self, request: Any, reply: Reply, headers: dict[str, str]) -> Any:
        from aiohttp import web

        response = web.StreamResponse(
            status=reply.status, headers={"content-type": "application/json", **headers}
        )
        if not reply.chunked:
            response.content_length = reply.size
        sent = 0
        try:
            await response.prepare(request)
            chunk = b'"' + b"x" * (64 * 1024 - 2) + b'"'
            while sent < reply.size:
                piece = chunk[: reply.size - sent]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client stopped reading: what it was sent so far is the point of the test
        finally:
            self.bytes_sent.append(sent)
        return response


def _prompt(path: str, body: bytes) -> str | None:
    """The last user message of an OpenAI, Anthropic or Gemini request body."""
    try:
        data = json.loads(body)
        if path.endswith(":generateContent"):
            return str(data["contents"][-1]["parts"][0]["text"])
        if "messages" in data:
            return str(data["messages"][-1]["content"])
        return str(data["prompt"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _echo(path: str, prompt: str) -> dict[str, Any]:
    """A normal answer, ``echo: PROMPT``, in the dialect of ``path``."""
    text = f"echo: {prompt}"
    if path.endswith(":generateContent"):
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2},
        }
    if path.endswith("/messages"):
        return {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 2},
        }
    if path.endswith("/chat/completions"):
        return chat(text)
    return {"choices": [{"text": text, "finish_reason": "stop"}]}
