"""Shared helpers for the benchmarks: the fake-server subprocess, worker subprocesses, timing, tables.

Everything runs on 127.0.0.1. The fake server is ``gen_ai_frames.testing.fake_server`` started as a
separate process (so its CPU is not counted as the client's), and every measured variant runs in
its own fresh worker subprocess (so imports, caches and garbage do not bleed between variants).

A worker prints exactly one line starting with :data:`RESULT_MARKER` followed by a JSON object;
:func:`run_worker` returns that object.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCH_RESULT "
_LISTENING = "listening on "


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: the working tree first on the path, no proxies."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Everything is loopback: make sure no proxy setting reroutes it (httpx/openai honour them).
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


# --------------------------------------------------------------------------------- fake server
class FakeServerProcess:
    """``python -m gen_ai_frames.testing.fake_server`` as a subprocess; stopped on exit.

    >>> with FakeServerProcess(["--latency", "0.05"]) as server:  # doctest: +SKIP
    ...     server.url          # 'http://127.0.0.1:PORT/v1'
    ...     server.reset()
    """

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 30.0) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.url: str = ""
        self.base_url: str = ""
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def start(self) -> FakeServerProcess:
        cmd = [sys.executable, "-m", "gen_ai_frames.testing.fake_server", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     env=subprocess_env(), cwd=str(REPO_ROOT))
        atexit.register(self.stop)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"fake server did not print its URL within {self.startup_timeout} s"
                                       f"{self._stderr_tail()}")
                if not selector.select(timeout=remaining):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"fake server exited with {self.proc.wait()}{self._stderr_tail()}")
                if line.startswith(_LISTENING):
                    self.url = line[len(_LISTENING):].strip()
                    break
        except BaseException:
            self.stop()
            raise
        finally:
            selector.close()
        self.base_url = self.url.removesuffix("/v1")
        return self

    def _stderr_tail(self) -> str:
        with contextlib.suppress(Exception):
            self._stderr.seek(0)
            text = self._stderr.read()[-2000:]
            if text.strip():
                return f"\n--- fake server stderr ---\n{text}"
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the server stops its loop and closes connections
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(Exception):
            self._stderr.close()

    def __enter__(self) -> FakeServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # admin endpoints (no API key needed; loopback only)
    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        with opener.open(req, timeout=30) as resp:
            return json.loads(resp.read())

    def reset(self) -> None:
        """Clear the server's counters (POST /reset)."""
        self._request("POST", "/reset", {})

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change run-time settings (POST /config); ``seed=`` also reseeds the latency RNG."""
        return self._request("POST", "/config", settings)

    def stats(self) -> dict[str, Any]:
        return self._request("GET", "/stats")

    def summary_stats(self) -> dict[str, Any]:
        """The small part of /stats worth printing (not the per-prompt maps)."""
        s = self.stats()
        return {k: s[k] for k in ("requests", "max_in_flight", "status_counts", "outcome_counts")}

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        return process_cpu_seconds(self.pid)


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, seconds) of another process, from psutil or /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


# ------------------------------------------------------------------------------------- timing
class Measurement:
    """Wall time and CPU time of this process over a ``with`` block (all threads included)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "user_s": self.user_s, "sys_s": self.sys_s}


@contextlib.contextmanager
def measure() -> Iterator[Measurement]:
    """Measure the block: ``perf_counter`` for wall time, ``process_time``/``getrusage`` for CPU.

    >>> with measure() as m:
    ...     _ = sum(range(1000))
    >>> m.wall_s >= 0 and m.cpu_s >= 0
    True
    """
    m = Measurement()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = time.process_time()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - t0
        m.cpu_s = time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        m.user_s = r1.ru_utime - r0.ru_utime
        m.sys_s = r1.ru_stime - r0.ru_stime


@contextlib.contextmanager
def maybe_cprofile(path: str | None, top: int = 30) -> Iterator[None]:
    """cProfile the block when ``path`` is given: dump raw stats there and a top list to ``path.txt``."""
    if not path:
        yield
        return
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(path)
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        Path(path + ".txt").write_text(out.getvalue())


def with_profiler(cmd: list[str], profile: str | None, profile_dir: Path | None, name: str,
                  rate: int = 250) -> list[str]:
    """``cmd`` run under cProfile (the worker's ``--_cprofile`` flag) or py-spy, or as it is."""
    if profile == "cprofile":
        assert profile_dir is not None
        return [*cmd, "--_cprofile", str(profile_dir / f"{name}.prof")]
    if profile == "py-spy":
        assert profile_dir is not None
        pyspy = shutil.which("py-spy")
        if pyspy is None:
            sys.exit("py-spy not found: pip install py-spy")
        return [pyspy, "record", "--rate", str(rate), "--format", "raw", "--output",
                str(profile_dir / f"{name}.collapsed"), "--", *cmd]
    return cmd


def emit_result(result: dict[str, Any]) -> None:
    """Worker side: print the result line the parent parses."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_worker(cmd: Sequence[str], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run a worker subprocess and return the JSON object it emitted; raise with its output if none."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=str(REPO_ROOT))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            if proc.stderr.strip():
                result.setdefault("stderr", proc.stderr.strip()[-2000:])
            return result
    raise RuntimeError(f"worker {cmd!r} failed (exit {proc.returncode})\n--- stdout ---\n"
                       f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")


def system_busy_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat (0s if unavailable)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_measured_worker(server: FakeServerProcess, cmd: Sequence[str], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run one worker against ``server`` (whose counters are reset first) and add, to its result:

    * ``server_cpu_s``: the fake server's CPU over the worker's lifetime;
    * ``server_requests``, ``max_in_flight``, ``status_counts``: from the server's /stats;
    * ``background_cores``: CPU used by *other* processes on the machine meanwhile (machine busy
      time minus the worker's and the server's), in cores: other engineers' test runs or builds
      on a 2-core box distort timings, so every run reports how busy the machine was;
    * ``steal_cores``: CPU the hypervisor took away meanwhile.
    """
    server.reset()
    busy0, steal0 = system_busy_seconds()
    child0, server0, t0 = children_cpu_seconds(), server.cpu_seconds(), time.monotonic()
    result = run_worker(cmd, timeout=timeout)
    elapsed = time.monotonic() - t0
    server_cpu = server.cpu_seconds() - server0
    child_cpu = children_cpu_seconds() - child0
    busy1, steal1 = system_busy_seconds()
    stats = server.summary_stats()
    result.update(
        server_cpu_s=server_cpu,
        server_requests=stats["requests"],
        max_in_flight=stats["max_in_flight"],
        status_counts=stats["status_counts"],
        background_cores=max(0.0, (busy1 - busy0) - child_cpu - server_cpu) / elapsed,
        steal_cores=(steal1 - steal0) / elapsed,
    )
    return result


# ------------------------------------------------------------------------------------ reporting
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table (also valid Markdown). ``columns``: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None:
                line.append("-")
            elif spec and isinstance(value, (int, float)):
                line.append(format(value, spec))
            else:
                line.append(str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(cells[0]), sep, *(render(r) for r in cells[1:])])


def environment() -> dict[str, Any]:
    """Machine and library versions, for the results file."""
    versions = {}
    for name in ("aiohttp", "httpx", "openai", "pandas", "pyarrow", "orjson", "numpy", "psutil"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "versions": versions,
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def print_environment() -> None:
    env = environment()
    libs = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    print(f"# Python {env['python']} ({env['implementation']}) on {env['platform']}; "
          f"{env['cpu_count']} CPU(s): {env['cpu_model']}")
    print(f"# {libs}")


def summarize_collapsed(path: str | os.PathLike[str], *, must_contain: str | Sequence[str] | None = None,
                        top: int = 25) -> str:
    """Top functions of a py-spy ``--format raw`` (collapsed stacks) profile, by own and total samples.

    Only stacks with a frame containing ``must_contain`` (or any of several strings) count, e.g. the
    worker's measured function, so imports and setup are left out. Line numbers are dropped.
    """
    if isinstance(must_contain, str):
        must_contain = (must_contain,)
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    files: dict[str, int] = {}
    samples = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if must_contain and not any(m in f for f in frames for m in must_contain):
            continue
        count = int(count_text)
        samples += count
        names = [_frame_name(f) for f in frames]
        own[names[-1]] = own.get(names[-1], 0) + count
        leaf_file = _frame_file(frames[-1])
        files[leaf_file] = files.get(leaf_file, 0) + count
        for name in set(names):
            total[name] = total.get(name, 0) + count
    if not samples:
        return "(no samples)"

    def block(title: str, table: dict[str, int], n: int) -> list[str]:
        lines = [f"{title}:"]
        for name, count in sorted(table.items(), key=lambda kv: -kv[1])[:n]:
            lines.append(f"  {100 * count / samples:5.1f}%  {name}")
        return lines

    out = [f"{samples} samples"]
    out += block("own time by function", own, top)
    out += block("own time by file", files, 15)
    out += block("total time by function (incl. callees)", total, top)
    return "\n".join(out)


def _frame_name(frame: str) -> str:
    # "send (gen_ai_frames/transport.py:127)" -> "send (gen_ai_frames/transport.py)"
    head, sep, tail = frame.rpartition(" (")
    if not sep:
        return frame
    location = tail.rstrip(")")
    file = location.rsplit(":", 1)[0] if ":" in location else location
    return f"{head} ({_short_path(file)})"


def _frame_file(frame: str) -> str:
    _, sep, tail = frame.rpartition(" (")
    if not sep:
        return frame
    location = tail.rstrip(")")
    return _short_path(location.rsplit(":", 1)[0] if ":" in location else location)


def _short_path(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1] if marker == "site-packages/" else "stdlib:" + file.rsplit("/", 1)[-1]
    return file.replace(str(REPO_ROOT) + "/", "")
