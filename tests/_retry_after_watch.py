"""Check, at the client, that no request is sent inside a Retry-After wait the client was told.

The fake server counts requests that arrive inside a window it opened, after a grace period for
requests already on their way; on a loaded machine a request sent before the 429 reached the client
can arrive later than any fixed grace, so that count is a timing assumption. Here both events are
seen in the client's own event loop, in the order it ran them: a request sent after a 429 asking
for a wait came back, and before that wait was over, is a violation whatever the machine's load.

In a test: ``events = watch_retry_after(monkeypatch)``, run, then ``assert not violations(events)``.
As a script, it runs another script under watch, one line per event appended to LOG::

    python _retry_after_watch.py LOG SCRIPT [ARGS...]
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gen_ai_frames import transport as transport_module

#: (process id, "send" or "429", time.monotonic() when seen, seconds the 429 asked to wait or 0).
Event = tuple[int, str, float, float]


def asked_wait(headers: Mapping[str, str]) -> float | None:
    """The wait a 429 asks for, as the fake server states it (``retry-after-ms`` first)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) / scale
            except ValueError:
                return None
    return None


def install(record: Callable[[Event], None]) -> Callable[[], None]:
    """Record every request the default transport sends and every 429 with a wait it receives;
    returns the undo. The send is recorded in the same step of the event loop as the engine's
    decision to send, and the 429 in the same step as the engine reads it."""
    original = transport_module.AiohttpTransport.send

    async def send(self: Any, request: Any) -> Any:
        record((os.getpid(), "send", time.monotonic(), 0.0))
        response = await original(self, request)
        if response.status == 429:
            wait = asked_wait(response.headers)
            if wait:
                record((os.getpid(), "429", time.monotonic(), wait))
        return response

    transport_module.AiohttpTransport.send = send  # type: ignore[method-assign]
    return lambda: setattr(transport_module.AiohttpTransport, "send", original)


def watch_retry_after(monkeypatch: Any) -> list[Event]:
    """Events of this process's runs until the test ends."""
    events: list[Event] = []
    monkeypatch.setattr(transport_module.AiohttpTransport, "send", transport_module.AiohttpTransport.send)
    install(events.append)  # monkeypatch restores the original at the end of the test
    return events


def violations(events: Iterable[Event]) -> list[str]:
    """Requests a process sent after it received a 429 asking it to wait, before that wait ended."""
    until: dict[int, float] = {}
    found = []
    for pid, kind, at, wait in events:
        if kind == "429":
            until[pid] = max(until.get(pid, 0.0), at + wait)
        elif at < until.get(pid, 0.0):
            early = until[pid] - at
            found.append(f"process {pid} sent a request {early:.3f} s before a Retry-After wait ended")
    return found


def read_log(path: Path) -> list[Event]:
    """The events a watched script appended (a process killed mid-line leaves a partial last line)."""
    events = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[1] in ("send", "429"):
            try:
                events.append((int(parts[0]), parts[1], float(parts[2]), float(parts[3])))
            except ValueError:
                continue
    return events


def main() -> None:
    log, script, *args = sys.argv[1:]
    sink = open(log, "a", buffering=1)  # noqa: SIM115  (kept open until the process ends or is killed)
    install(lambda event: sink.write("%d %s %.6f %.6f\n" % event))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
