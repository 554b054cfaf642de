"""Fault decisions: directives written into a prompt, seeded chaos, and the broken wire answers."""

from __future__ import annotations

import hashlib
import re
import socket
import struct
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from .common import _BadRequest
from .settings import FAULTS

_DIRECTIVE_RE = re.compile(r"\[\[\s*([a-z_]+)\s*(?:=\s*([^\]\s]*)\s*)?\]\]")
_INT_DIRECTIVES = {"status", "fail_times"}
_FLOAT_DIRECTIVES = {"retry_after", "retry_after_ms", "sleep"}
_FLAG_DIRECTIVES = {"html", "context_length", "content_filter", "error_body"}


def _parse_directives(text: str) -> dict[str, Any]:
    directives: dict[str, Any] = {}
    for name, value in _DIRECTIVE_RE.findall(text):
        try:
            if name in _INT_DIRECTIVES:
                directives[name] = int(value)
            elif name in _FLOAT_DIRECTIVES:
                directives[name] = float(value)
            elif name in _FLAG_DIRECTIVES:
                directives[name] = True
            # Unknown names are left alone: "[[x]]" may just be prompt text.
        except ValueError:
            raise _BadRequest(f"bad directive value [[{name}={value}]]") from None
    status = directives.get("status")
    if status is not None and not 100 <= status <= 599:
        raise _BadRequest(f"bad directive [[status={status}]]")
    return directives


def _status_outcome(status: int, directives: Mapping[str, Any]) -> tuple[str, int, float | None]:
    if status == 429:
        retry_after = directives.get("retry_after")
        has_header = retry_after is not None or "retry_after_ms" in directives
        return ("429_retry_after" if has_header else "429_plain"), 429, retry_after
    return str(status), status, None


def _chaos_table(chaos: Mapping[str, float]) -> list[tuple[float, str]]:
    """Cumulative table so choosing a fault is one uniform draw."""
    table: list[tuple[float, str]] = []
    acc = 0.0
    for name in FAULTS:  # fixed order: same seed -> same faults, whatever the dict order
        prob = chaos.get(name, 0.0)
        if prob > 0:
            acc += prob
            table.append((acc, name))
    return table


def _chaos_fault(table: list[tuple[float, str]], seed: Any, prompt: str, attempt: int) -> str | None:
    """The fault chaos injects into this attempt of this prompt, or None."""
    # Hash of (seed, prompt, attempt) instead of a shared RNG stream: the
    # same prompt gets the same faults on the same attempt whatever order
    # concurrent requests arrive in, so seeded runs are reproducible.
    digest = hashlib.blake2b(
        f"{seed}\x00{attempt}\x00{prompt}".encode("utf-8", "surrogatepass"),
        digest_size=8,
    ).digest()
    u = int.from_bytes(digest, "big") / 18446744073709551616.0
    for threshold, name in table:
        if u < threshold:
            return name
    return None


def _chaos_outcome(name: str, retry_after: float) -> tuple[str, int, float | None]:
    if name == "429_retry_after":
        return name, 429, retry_after
    if name in ("429_plain", "500", "502", "503", "529"):
        return name, int(name[:3]), None
    return name, 200, None


async def _send_reset(request: web.Request, body: bytes) -> web.StreamResponse:
    """Headers and half the body, then a hard close (RST) of the connection."""
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # linger 0 turns the close into a real TCP reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # pragma: no cover - platform dependent
                pass
        transport.abort()
    # aiohttp's write_eof() then hits the closed transport; it ignores ConnectionError.
    return resp


async def _send_truncated(request: web.Request, body: bytes) -> web.StreamResponse:
    """The whole body, but a Content-Length promising more, then a clean close."""
    resp = web.StreamResponse(status=200)
    resp.content_type = "application/json"
    resp.content_length = len(body) + 64
    await resp.prepare(request)
    await resp.write(body)
    transport = request.transport
    if transport is not None:
        transport.close()  # flushes what was written, then FIN
    return resp
