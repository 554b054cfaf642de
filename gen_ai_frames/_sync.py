"""The one bridge from sync entry points to the async core.

``asyncio.run`` refuses to start inside a running loop (a Jupyter cell, an async web handler), so
there the coroutine runs on a fresh loop in a worker thread while the caller's thread waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["run_sync"]

T = TypeVar("T")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion from sync code, whether or not a loop is running here.

    >>> async def answer() -> int:
    ...     return 42
    >>> run_sync(answer())
    42
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen-ai-frames") as pool:
        return pool.submit(asyncio.run, coroutine).result()
