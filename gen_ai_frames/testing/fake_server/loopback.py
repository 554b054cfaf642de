"""An aiohttp application served on 127.0.0.1 from a background thread, for tests and benchmarks.

Both test servers (:class:`~gen_ai_frames.testing.fake_server.FakeServer` and
:class:`~gen_ai_frames.testing.hostile.HostileServer`) run this way: a private event loop in its
own thread, so the server works beside the client's loop, or Jupyter's, in the same process. It
lives in the fake server's package because that package also runs as a plain script, without
``gen_ai_frames`` installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopbackServer:
    """Serve the runner :meth:`make_runner` builds on ``host``:``port`` (0: a free port) in a thread.

    Subclasses provide :meth:`make_runner`. Use as a context manager, or ``start()``/``stop()``.
    """

    #: The name of the serving thread (shows in stack dumps).
    thread_name = "LoopbackServer"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def make_runner(self) -> web.AppRunner:
        """The aiohttp runner to serve (called on the server's thread)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() or use `with`")
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI-style base URL ``http://127.0.0.1:PORT/v1``."""
        return self.base_url + "/v1"

    def endpoint_for(self, provider: str) -> str:
        """The ``endpoint=`` that makes ``create_client(provider=...)`` talk to this server:
        the resource URL for ``"azure"``, ``.../v1beta`` for ``"gemini"``, else :attr:`url`
        (OpenAI, its compatible presets, and Anthropic, whose base URL also ends in ``/v1``)."""
        if provider == "azure":
            return self.base_url
        if provider == "gemini":
            return self.base_url + "/v1beta"
        return self.url

    # --------------------------------------------------------------- lifecycle
    def start(self: _S) -> _S:
        """Bind and start serving; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name=self.thread_name, daemon=True)
        self._thread.start()
        try:
            self.port = started.result(timeout=30)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and the event loop; idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None
        self._loop = None
        self.port = None

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        runner: web.AppRunner | None = None
        try:
            try:
                runner = self.make_runner()
                port = loop.run_until_complete(_start_site(runner, self.host, self._requested_port))
            except BaseException as exc:
                started.set_exception(exc)
                return
            self._loop = loop
            started.set_result(port)
            loop.run_forever()
        finally:
            try:
                if runner is not None:
                    loop.run_until_complete(runner.cleanup())  # closes every connection
                # Whatever aiohttp left behind (e.g. a handler still sleeping).
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop thread (where its counters live); directly when stopped."""
        loop = self._loop
        if loop is None or not self.running:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)


_S = TypeVar("_S", bound=LoopbackServer)


async def _start_site(runner: web.AppRunner, host: str, port: int) -> int:
    await runner.setup()
    # Benchmarks open hundreds of connections at once: the default backlog
    # (128) would drop SYNs and add 1 s retransmit stalls.
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    return int(runner.addresses[0][1])
