"""Run the fake model on 127.0.0.1 in a background thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from .app import FakeLLM
from .settings import _SERVER_ONLY

T = TypeVar("T")


class FakeServer:
    """Run a :class:`FakeLLM` on 127.0.0.1 in a background thread.

    Settings (all keyword arguments, all optional):

    * ``host`` (``"127.0.0.1"``), ``port`` (0 = a free port), ``access_log``
      (False), ``shutdown_timeout`` (0.25 s to let in-flight answers finish on stop)
    * ``api_key``: require ``Authorization: Bearer <api_key>`` (or the key in
      the dialect's own header: ``x-api-key``, ``api-key``, ``x-goog-api-key``)
    * ``models``: accepted model names (others: 404 ``model_not_found``);
      ``default_model`` is echoed when the request has none
    * ``latency`` (s), or ``latency_median`` + ``latency_sigma`` (lognormal)
    * ``chaos``: ``{fault: probability}`` (see :data:`FAULTS`), ``seed``,
      ``chaos_retry_after`` (1 s), ``chaos_slow_seconds`` (30 s)
    * ``retry_after_grace``: 0.05 s before a retry-after window opens
    * ``rate_limit_rpm`` / ``rate_limit_tpm`` (None: no limit), ``rate_limit_burst`` (1 s),
      ``rate_limit_style`` (``"headers"`` or ``"retry_after"``): see the module docs

    Example::

        with FakeServer(latency=0.01, api_key="k") as server:
            client = OpenAI(base_url=server.url, api_key="k")
            ...
            assert server.stats()["retry_after_violations"] == 0
    """

    def __init__(self, **settings: Any) -> None:
        self.host: str = settings.pop("host", "127.0.0.1")
        self._requested_port = int(settings.pop("port", 0))
        self._access_log = bool(settings.pop("access_log", False))
        self._shutdown_timeout = float(settings.pop("shutdown_timeout", 0.25))
        # Validated here, in the caller's thread, so a typo raises immediately.
        self.app = FakeLLM(**settings)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the API key
        state = f"url={self.url!r}" if self.running else "stopped"
        return f"<FakeServer {state}>"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``), for /stats etc."""
        if self.port is None:
            raise RuntimeError("FakeServer is not running; call start() or use `with`")
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """OpenAI base URL: ``http://127.0.0.1:PORT/v1``."""
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
    def start(self) -> FakeServer:
        """Bind and start serving; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeServer already started")
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="FakeServer", daemon=True)
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

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, started: concurrent.futures.Future[int]) -> None:
        # A private loop: works even when the caller (e.g. Jupyter) has one running.
        loop = asyncio.new_event_loop()
        runner = self.app.make_runner(access_log=self._access_log, shutdown_timeout=self._shutdown_timeout)
        try:
            try:
                port = loop.run_until_complete(_start_site(runner, self.host, self._requested_port))
            except BaseException as exc:
                started.set_exception(exc)
                return
            self._loop = loop
            started.set_result(port)
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(runner.cleanup())
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

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop thread (the counters live there)."""
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

    # ------------------------------------------------------------------ access
    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (same as ``GET /stats``)."""
        return self._call(self.app.stats)

    def reset(self) -> None:
        """Clear the counters (same as ``POST /reset``)."""
        self._call(self.app.reset)

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings at run time (same as ``POST /config``)."""
        for key in _SERVER_ONLY:
            if key in settings:
                raise ValueError(f"{key!r} can only be set when the server is created")
        return self._call(lambda: self.app.configure(**settings))


async def _start_site(runner: web.AppRunner, host: str, port: int) -> int:
    await runner.setup()
    # Benchmarks open hundreds of connections at once: the default backlog
    # (128) would drop SYNs and add 1 s retransmit stalls.
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    return int(runner.addresses[0][1])
