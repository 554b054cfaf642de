"""Test helpers for gen_ai_frames: an OpenAI-compatible fake LLM server.

Example::

    from gen_ai_frames.testing import FakeServer

    with FakeServer(latency=0.01) as server:
        ...  # send requests to server.url

``FakeServer`` is imported lazily (PEP 562) so that importing this package
stays cheap and so that ``python -m gen_ai_frames.testing.fake_server`` does
not find the module already imported (runpy would warn about that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .fake_server import FakeServer

__all__ = ["FakeServer"]


def __getattr__(name: str) -> Any:
    if name == "FakeServer":
        from .fake_server import FakeServer

        return FakeServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
