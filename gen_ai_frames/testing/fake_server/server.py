"""Run the fake model on 127.0.0.1 in a background thread."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .app import FakeLLM
from .loopback import LoopbackServer
from .settings import _SERVER_ONLY


class FakeServer(LoopbackServer):
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

    thread_name = "FakeServer"

    def __init__(self, **settings: Any) -> None:
        super().__init__(settings.pop("host", "127.0.0.1"), int(settings.pop("port", 0)))
        self._access_log = bool(settings.pop("access_log", False))
        self._shutdown_timeout = float(settings.pop("shutdown_timeout", 0.25))
        # Validated here, in the caller's thread, so a typo raises immediately.
        self.app = FakeLLM(**settings)

    def __repr__(self) -> str:  # never shows the API key
        state = f"url={self.url!r}" if self.running else "stopped"
        return f"<FakeServer {state}>"

    def make_runner(self) -> web.AppRunner:
        return self.app.make_runner(access_log=self._access_log, shutdown_timeout=self._shutdown_timeout)

    # ------------------------------------------------------------------ access
    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (same as ``GET /stats``)."""
        return self.call(self.app.stats)

    def reset(self) -> None:
        """Clear the counters (same as ``POST /reset``)."""
        self.call(self.app.reset)

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings at run time (same as ``POST /config``)."""
        for key in _SERVER_ONLY:
            if key in settings:
                raise ValueError(f"{key!r} can only be set when the server is created")
        return self.call(lambda: self.app.configure(**settings))
