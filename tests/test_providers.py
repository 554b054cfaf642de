"""Providers beyond OpenAI: request building and parsing against documented vendor shapes
(tests/fixtures/providers/*.json), the registry and plugins, and end-to-end runs against the
fake server speaking each vendor's dialect."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames
from gen_ai_frames import ConfigurationError, create_client, errors
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers import _BUILTIN, available_providers, get_provider
from gen_ai_frames.providers.azure import AzureOpenAIProvider
from gen_ai_frames.providers.base import Provider
from gen_ai_frames.providers.gemini import GeminiProvider
from gen_ai_frames.providers.presets import PRESETS
from gen_ai_frames.testing import FakeServer
from gen_ai_frames.transport import HttpResponse

from .conftest import FAKE_KEY, FAST_RETRY

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
REPO_ROOT = Path(__file__).resolve().parents[1]
VENDORS = ("anthropic", "azure", "gemini")


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def make_provider(name: str, **options: Any) -> Provider:
    spec = fixture(name)["request"]
    return get_provider(name)(api_key=FAKE_KEY, endpoint=spec["endpoint"], model_name=spec["model_name"], **options)


def response(status: int, body: Any = None, *, raw: str | None = None,
             headers: dict[str, str] | None = None) -> HttpResponse:
    content = raw.encode() if raw is not None else json.dumps(body).encode()
    return HttpResponse(status, {"content-type": "application/json", **(headers or {})}, content)


def cases(section: str) -> list[Any]:
    return [pytest.param(name, case, id=f"{name}-{case['name']}")
            for name in VENDORS for case in fixture(name)[section]]


# ------------------------------------------------------------------------ documented shapes
@pytest.mark.parametrize("name", VENDORS)
def test_request_matches_the_documented_body(name: str) -> None:
    spec = fixture(name)["request"]
    params = spec["params"]
    if params.get("stop"):
        params = {**params, "stop": tuple(params["stop"])}
    request = make_provider(name).build_request(spec["messages"], GenerationParams(**params))
    assert request.method == spec["method"]
    assert request.url == spec["url"]
    assert json.loads(request.body) == spec["body"]
    for header, value in spec["headers"].items():
        assert request.headers[header] == value
    assert request.headers[spec["key_header"]] == FAKE_KEY
    for header in spec.get("absent_headers", []):
        assert header not in request.headers
    assert FAKE_KEY not in request.url and FAKE_KEY.encode() not in request.body
    assert FAKE_KEY not in repr(request)


@pytest.mark.parametrize(("name", "case"), cases("responses"))
def test_documented_answers_parse(name: str, case: dict[str, Any]) -> None:
    provider = make_provider(name)
    if "expect" in case:
        completion = provider.parse_response(response(case["status"], case["body"]))
        expect = case["expect"]
        assert (completion.text, completion.finish_reason, completion.prompt_tokens,
                completion.completion_tokens) == (expect["text"], expect["finish_reason"],
                                                  expect["prompt_tokens"], expect["completion_tokens"])
    else:
        check_error(provider, case)


@pytest.mark.parametrize(("name", "case"), cases("errors"))
def test_documented_errors_map_to_our_types(name: str, case: dict[str, Any]) -> None:
    check_error(make_provider(name), case)


def check_error(provider: Provider, case: dict[str, Any]) -> None:
    expect = case["error"]
    with pytest.raises(errors.RequestError) as caught:
        provider.parse_response(response(case["status"], case.get("body"), raw=case.get("raw"),
                                         headers=case.get("headers")))
    error = caught.value
    assert error.type == expect["type"]
    assert error.status_code == expect["status_code"]
    assert error.retryable is expect["retryable"]
    if "fatal" in expect:
        assert error.fatal is expect["fatal"]
    if "suggestion" in expect:
        assert expect["suggestion"] in error.suggestion
    if "retry_after" in expect:
        assert error.retry_after == expect["retry_after"]
    assert FAKE_KEY not in str(error)


# ------------------------------------------------------------------------------- anthropic
def anthropic_body(**params: Any) -> dict[str, Any]:
    provider = make_provider("anthropic")
    return json.loads(provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams(**params)).body)


def test_anthropic_refuses_temperature_above_one_instead_of_clamping() -> None:
    assert anthropic_body(temperature=1)["temperature"] == 1
    with pytest.raises(errors.ConfigurationError, match=r"temperature=1.5 .*\[0, 1\]"):
        anthropic_body(temperature=1.5)


def test_anthropic_refused_temperature_fails_the_call_without_sending(fake_server: FakeServer) -> None:
    client = create_client(provider="anthropic", api_key="k", endpoint=fake_server.endpoint_for("anthropic"),
                           model_name="m", retry=FAST_RETRY)
    with pytest.raises(ConfigurationError, match="temperature=1.5"):
        client.generate_batch_response(["a", "b"], temperature=1.5, return_error=True)
    assert fake_server.stats()["requests"] == 0


def test_anthropic_top_p_is_sent_only_when_changed() -> None:
    # Recent Claude models reject temperature and top_p together; 1.0 is "no nucleus cut-off".
    assert "top_p" not in anthropic_body()
    assert anthropic_body(top_p=0.9)["top_p"] == 0.9


def test_anthropic_system_messages_become_the_system_field() -> None:
    provider = make_provider("anthropic")
    messages = [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    body = json.loads(provider.build_request(messages, GenerationParams(system_prompt="ignored")).body)
    assert body["system"] == "Rule one.\n\nRule two."
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]


def test_anthropic_version_option_and_unknown_option() -> None:
    provider = make_provider("anthropic", anthropic_version="2099-01-01")
    request = provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.headers["anthropic-version"] == "2099-01-01"
    with pytest.raises(errors.ConfigurationError, match="unknown option"):
        make_provider("anthropic", organization="x")


# ----------------------------------------------------------------------------------- azure
def test_azure_endpoint_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.ConfigurationError, match="AZURE_OPENAI_ENDPOINT"):
        create_client(provider="azure", api_key="k", model_name="dep")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com/")
    with pytest.raises(errors.ConfigurationError, match="AZURE_OPENAI_API_KEY"):
        create_client(provider="azure", model_name="dep")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", FAKE_KEY)
    client = create_client(provider="azure", model_name="dep", api_version="2025-01-01")
    request = client.provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.url == ("https://res.openai.azure.com/openai/deployments/dep/chat/completions"
                           "?api-version=2025-01-01")
    assert request.headers["api-key"] == FAKE_KEY
    assert FAKE_KEY not in repr(client)
    # An explicit endpoint wins over the variable.
    explicit = create_client(provider="azure", model_name="dep", endpoint="https://other.openai.azure.com")
    assert explicit.provider.endpoint == "https://other.openai.azure.com"


def test_azure_accepts_the_endpoint_with_openai_path_and_completions_api() -> None:
    provider = AzureOpenAIProvider(api_key="k", endpoint="https://res.openai.azure.com/openai", model_name="my dep",
                                   api="completions")
    request = provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.url == ("https://res.openai.azure.com/openai/deployments/my%20dep/completions"
                           "?api-version=2024-10-21")
    with pytest.raises(errors.ConfigurationError, match="organization"):
        AzureOpenAIProvider(api_key="k", endpoint="https://res.openai.azure.com", model_name="d", organization="o")


def test_missing_endpoint_without_an_endpoint_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoEndpoint(Provider):  # no default endpoint, no endpoint_from_env hook
        name = "noendpoint"

    monkeypatch.setattr("gen_ai_frames.factory.get_provider", lambda name: NoEndpoint)
    with pytest.raises(errors.ConfigurationError, match=r"needs `endpoint=` \(its API base URL\)$"):
        create_client(provider="noendpoint", api_key="k", model_name="m")


# ---------------------------------------------------------------------------------- gemini
def test_gemini_model_names_and_key_placement() -> None:
    for model_name, path in [("gemini-2.5-flash", "models/gemini-2.5-flash"),
                             ("models/gemini-2.5-pro", "models/gemini-2.5-pro"),
                             ("tunedModels/my-model", "tunedModels/my-model")]:
        provider = GeminiProvider(api_key=FAKE_KEY, endpoint="https://g.example/v1beta", model_name=model_name)
        request = provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
        assert request.url == f"https://g.example/v1beta/{path}:generateContent"
        assert FAKE_KEY not in request.url  # in the x-goog-api-key header only: URLs end up in logs


def test_gemini_thinking_budget_is_sent_and_fingerprinted() -> None:
    provider = make_provider("gemini", thinking_budget=0)
    body = json.loads(provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams()).body)
    assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert provider.fingerprint()["thinking_budget"] == 0
    assert "thinking_budget" not in make_provider("gemini").fingerprint()
    with pytest.raises(errors.ConfigurationError, match="thinking_budget"):
        make_provider("gemini", thinking_budget=-5)


# --------------------------------------------------------------------------------- presets
PRESET_SPECS = fixture("presets")


@pytest.mark.parametrize("name", sorted(PRESET_SPECS["presets"]))
def test_preset_defaults(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PRESET_SPECS["presets"][name]
    cls = get_provider(name)
    assert cls is PRESETS[name] and cls.name == name
    assert (cls.default_endpoint, cls.api_key_env, cls.requires_api_key) == (
        spec["endpoint"], spec["key_env"], spec["requires_key"])
    if spec["requires_key"]:
        with pytest.raises(errors.ConfigurationError, match=spec["key_env"]):
            create_client(provider=name, model_name="m")
        monkeypatch.setenv(spec["key_env"], FAKE_KEY)
    client = create_client(provider=name, model_name="m")
    assert client.provider.endpoint == spec["endpoint"]
    request = client.provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.url == spec["endpoint"] + "/chat/completions"
    assert ("authorization" in request.headers) is bool(spec["key_env"] and spec["requires_key"])
    assert FAKE_KEY not in repr(client)


def test_vllm_sends_the_optional_key_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", FAKE_KEY)
    client = create_client(provider="vllm", model_name="m", endpoint="http://gpu-box:8000/v1")
    request = client.provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.headers["authorization"] == f"Bearer {FAKE_KEY}"


@pytest.mark.parametrize("name", sorted(PRESET_SPECS["auth_errors"]))
def test_preset_auth_errors_name_the_key_variable(name: str) -> None:
    case = PRESET_SPECS["auth_errors"][name]
    provider = get_provider(name)(api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1", model_name="m")
    with pytest.raises(errors.AuthenticationError) as caught:
        provider.parse_response(response(case["status"], case["body"]))
    assert PRESET_SPECS["presets"][name]["key_env"] in caught.value.suggestion


# -------------------------------------------------------------------------------- registry
def test_every_builtin_is_registered_in_pyproject_and_listed() -> None:
    table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "gen_ai_frames.providers"]
    assert table == _BUILTIN
    assert set(_BUILTIN) <= set(available_providers()) and gen_ai_frames.available_providers() == available_providers()
    for name, target in _BUILTIN.items():
        if name == "local":
            continue  # gen_ai_frames.local has optional heavy dependencies
        cls = get_provider(name)
        assert f"{cls.__module__}:{cls.__qualname__}" == target
        assert cls.name == name


def test_listing_providers_imports_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "gen_ai_frames.providers.local", raising=False)
    monkeypatch.delitem(sys.modules, "gen_ai_frames.providers.presets", raising=False)
    assert "local" in available_providers()
    assert "gen_ai_frames.providers.local" not in sys.modules
    assert "gen_ai_frames.providers.presets" not in sys.modules


def test_unknown_provider_lists_the_known_ones() -> None:
    with pytest.raises(errors.ConfigurationError, match="unknown provider 'nope'.*anthropic.*gemini"):
        get_provider("nope")


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A third-party provider installed the way pip installs one: a module and a dist-info
    directory whose entry_points.txt declares it in our group."""
    (tmp_path / "echo_llm_plugin.py").write_text(textwrap.dedent('''
        from gen_ai_frames.providers.base import Completion, Provider
        from gen_ai_frames.transport import HttpRequest


        class EchoProvider(Provider):
            name = "echo-plugin"
            default_endpoint = "https://echo.example/v1"
            default_model = "echo-1"
            requires_api_key = False

            def build_request(self, messages, params):
                return HttpRequest("POST", self.endpoint + "/echo", {}, messages[-1]["content"].encode())

            def parse_response(self, response):
                return Completion(response.body.decode(), "stop")
    '''))
    dist = tmp_path / "echo_llm_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-llm-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[gen_ai_frames.providers]\necho-plugin = echo_llm_plugin:EchoProvider\n"
        "broken-plugin = echo_llm_plugin_missing:Nothing\nnot-a-provider = echo_llm_plugin:Completion\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "echo-plugin"
    sys.modules.pop("echo_llm_plugin", None)


def test_a_plugin_registered_through_entry_points_works(plugin: str) -> None:
    assert plugin in available_providers()
    client = create_client(provider=plugin)
    assert type(client.provider).__name__ == "EchoProvider"
    assert client.provider.endpoint == "https://echo.example/v1" and client.model_name == "echo-1"
    request = client.provider.build_request([{"role": "user", "content": "Hi"}], GenerationParams())
    assert request.url == "https://echo.example/v1/echo"
    with pytest.raises(errors.ConfigurationError, match="echo_llm_plugin_missing.*not installed"):
        create_client(provider="broken-plugin")
    with pytest.raises(errors.ConfigurationError, match="not a subclass"):
        create_client(provider="not-a-provider")


# ----------------------------------------------------------------------------- end to end
E2E = ["anthropic", "azure", "gemini", "vllm"]


@pytest.mark.parametrize("name", E2E)
def test_generate_end_to_end_through_each_dialect(name: str) -> None:
    prompts = [
        "hello world",
        "flaky [[fail_times=1]] [[status=429]] [[retry_after=0.05]]",
        "bad [[status=400]]",
        "long answer one two three four five six",
        "blocked [[content_filter]]",
    ]
    # No grace period, one request at a time: a retry sooner than the server asked for (and
    # nothing else) counts as a violation.
    with FakeServer(api_key=FAKE_KEY, retry_after_grace=0) as server:
        client = create_client(provider=name, api_key=FAKE_KEY, endpoint=server.endpoint_for(name),
                               model_name="m", retry=FAST_RETRY)
        df = pd.DataFrame({"prompt": prompts})
        out = df.genai.generate(column="prompt", client=client, progress=False, details=True, max_tokens=6,
                                system_prompt="Answer briefly.", max_concurrent=1)
        stats = server.stats()

    assert out["response"].tolist()[:2] == ["echo: hello world", "echo: " + prompts[1]]
    assert out.loc[3, "response"] == "echo: long answer one two three"
    assert out.loc[3, "finish_reason"] == "length"
    assert out.loc[0, "finish_reason"] == "stop"
    assert out.loc[2, "error_type"] == "BadRequestError" and out.loc[2, "status_code"] == 400
    assert out.loc[4, "error_type"] == "ContentFilterError"
    assert pd.isna(out.loc[0, "error"]) and pd.isna(out.loc[1, "error"])
    assert out.loc[1, "attempts"] == 2
    ok = out["error"].isna()
    assert out.loc[ok, "prompt_tokens"].notna().all() and (out.loc[ok, "prompt_tokens"] > 0).all()
    assert out.loc[ok, "completion_tokens"].notna().all() and (out.loc[ok, "completion_tokens"] > 0).all()
    assert stats["outcomes"][prompts[1]] == ["429_retry_after", "ok"]
    assert stats["retry_after_violations"] == 0  # the wait was honoured (Gemini: from the error body)
    assert stats["outcomes"][prompts[2]] == ["400"]  # a 400 is not retried
    assert FAKE_KEY not in repr(client)
    assert not out["error"].dropna().str.contains(FAKE_KEY).any()


@pytest.mark.parametrize("name", E2E)
def test_a_wrong_key_stops_the_run_without_leaking_it(name: str) -> None:
    with FakeServer(api_key="the-right-key") as server:
        client = create_client(provider=name, api_key=FAKE_KEY, endpoint=server.endpoint_for(name),
                               model_name="m", retry=FAST_RETRY)
        df = pd.DataFrame({"prompt": [f"p{i}" for i in range(6)]})
        with pytest.raises(errors.AuthenticationError) as caught:
            df.genai.generate(column="prompt", client=client, progress=False, max_concurrent=1)
        stats = server.stats()
    error = caught.value
    assert FAKE_KEY not in str(error) and FAKE_KEY not in repr(error)
    assert get_provider(name).api_key_env in error.suggestion  # e.g. ANTHROPIC_API_KEY
    assert stats["outcome_counts"] == {"auth_error": 1}  # the run stopped at the first answer
