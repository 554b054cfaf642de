"""Handing memory a run has freed back to the system, so a big run's footprint is what it holds.

Two allocators keep pages that were freed, for their next use. Each does this in a way that shows
up as resident memory a million-row run no longer needs:

* **Arrow's default pool (mimalloc)** keeps a thread's freed pages for that thread. The runner's
  worker threads build big short-lived arrays (row keys, checkpoint parts, merges), then sit idle,
  each keeping its pages.
* **glibc's malloc** serves NumPy's arrays. After the first big array is freed it raises its mmap
  threshold, so later arrays of that size come from its heaps, and freeing them leaves the pages
  mapped until ``malloc_trim`` (Dask's workers call it for the same reason).

:func:`release_unused` asks both to let go; :func:`in_thread` does it after work on a worker
thread. benchmarks/RESULTS.md, sections 12 and 13, measure what each keeps.

>>> release_unused()
>>> import asyncio
>>> asyncio.run(in_thread(divmod, 7, 2))
(3, 1)
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

__all__ = ["in_thread", "release_unused"]

T = TypeVar("T")


def release_unused() -> None:
    """Return the pages Arrow's pool (for the calling thread) and glibc's malloc (for every thread)
    keep after a free. Takes microseconds; elsewhere than glibc only Arrow's pool is asked."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a worker thread (as :func:`asyncio.to_thread`), after which the
    memory it freed goes back to the system (:func:`release_unused`, on that thread).

    A checkpointed run of 100,000 polars rows held 30 MB more at its end without this
    (benchmarks/RESULTS.md, section 12).
    """

    def work() -> T:
        try:
            return function(*args)
        finally:
            release_unused()

    return await asyncio.to_thread(work)
