"""The one bridge from sync entry points to the async core.

``asyncio.run`` refuses to start inside a running loop (a Jupyter cell, an async web handler), so
there the coroutine runs on a fresh loop in a worker thread while the caller's thread waits. An
interrupt (Ctrl-C, Jupyter's stop button) cancels that coroutine and waits for it to wind down, so
a run never goes on sending in the background, its checkpoint is flushed and its lock released.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["run_sync", "sigterm_as_interrupt"]

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
        with sigterm_as_interrupt():
            # asyncio.run itself cancels the coroutine on Ctrl-C.
            return asyncio.run(_boxed(coroutine)).value
    started = threading.Event()
    running: dict[str, Any] = {}

    async def main() -> T:
        running["loop"], running["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        return await coroutine

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gen-ai-frames") as pool:
        future = pool.submit(asyncio.run, main())
        try:
            return future.result()
        except KeyboardInterrupt:
            started.wait()
            with contextlib.suppress(RuntimeError):  # the loop may have finished meanwhile
                running["loop"].call_soon_threadsafe(running["task"].cancel)
            with contextlib.suppress(BaseException):
                future.result()  # let it save its work and release its checkpoint
            raise


class _Box:
    """A coroutine's result, with a repr that never looks inside.

    On Python 3.11, ``asyncio.run`` in the main thread builds the repr of its task, result
    included, while it restores the SIGINT handler (``signal.getsignal`` formats the handler for an
    error it then discards). For a million-row frame that repr costs about 80 MB and a tenth of a
    second at the very end of a run: the run's peak memory.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<result>"


async def _boxed(coroutine: Coroutine[Any, Any, T]) -> _Box:
    return _Box(await coroutine)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM (a scheduler stopping the job, ``kill``) stops a run as Ctrl-C does:
    what was received is saved, the checkpoint's lock released. Yields a list that records the
    signal if it came.

    Only where the process has no SIGTERM handler of its own (a web server's stays untouched), only
    in the main thread (where signals are handled), and once: nested uses share the outer one.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield received
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        received.append(signum)
        # Ctrl-C's own path: inside asyncio.run its handler cancels the run (which then saves and
        # unlocks), elsewhere Python's raises KeyboardInterrupt. Called directly rather than
        # re-signalled: a job started in the background may have SIGINT ignored.
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
