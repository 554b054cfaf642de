"""Structured output and log-probabilities in the providers: the request each vendor documents for a
schema (tests/fixtures/providers/structured.json, written by hand from the vendors' docs), parsing
of tool_use answers and logprobs, and requests without a schema byte-for-byte as before
(tests/fixtures/providers/unchanged_requests.json, captured before structured output existed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gen_ai_frames import errors
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers import get_provider
from gen_ai_frames.providers.base import Provider, strict_compatible
from gen_ai_frames.schema import Schema
from gen_ai_frames.transport import HttpResponse

from .conftest import FAKE_KEY

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
STRUCTURED = json.loads((FIXTURES / "structured.json").read_text())
UNCHANGED = json.loads((FIXTURES / "unchanged_requests.json").read_text())
PERSON = Schema.parse(STRUCTURED["schemas"]["person"])
PERSON_JSON = json.dumps(STRUCTURED["json_schemas"]["person"], separators=(",", ":"))


def provider(name: str, endpoint: str = "https://api.example.test/v1", model_name: str = "m",
             **options: Any) -> Provider:
    return get_provider(name)(api_key=FAKE_KEY, endpoint=endpoint, model_name=model_name, **options)


def params(spec: dict[str, Any], schema: Any = None) -> GenerationParams:
    values = dict(spec)
    if values.get("stop"):
        values["stop"] = tuple(values["stop"])
    if schema is not None:
        values["schema"] = Schema.parse(STRUCTURED["schemas"].get(schema, schema) if isinstance(schema, str)
                                        else schema)
    return GenerationParams(**values)


def body(name: str, messages: list[dict[str, str]], generation: GenerationParams, **options: Any) -> Any:
    return json.loads(provider(name, **options).build_request(messages, generation).body)


def expand(value: Any) -> Any:
    """The fixture's bodies name a schema as "$person": its JSON Schema."""
    if isinstance(value, str) and value.startswith("$"):
        return STRUCTURED["json_schemas"][value[1:]]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def answer(data: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(status, {"content-type": "application/json"}, json.dumps(data).encode())


# -------------------------------------------------------------------- no schema: nothing changes
def unchanged_id(case: dict[str, Any]) -> str:
    kind = "full" if case["params"] else "default"
    return f"{case['provider']}{case['options'] or ''}-{kind}-{case['messages']}"


@pytest.mark.parametrize("case", UNCHANGED["cases"], ids=[unchanged_id(c) for c in UNCHANGED["cases"]])
def test_requests_without_schema_or_logprobs_are_byte_for_byte_unchanged(case: dict[str, Any]) -> None:
    messages = UNCHANGED["messages"][case["messages"]]
    request = provider(case["provider"], **case["options"]).build_request(messages, params(case["params"]))
    assert request.body.decode() == case["body"]
    # schema=None and logprobs=False are the defaults: saying so explicitly changes nothing either.
    explicit = provider(case["provider"], **case["options"]).build_request(messages,
                                                                         _explicit(case["params"]))
    assert explicit.body == request.body


def _explicit(spec: dict[str, Any]) -> GenerationParams:
    values = {**spec, "schema": None, "logprobs": False}
    if values.get("stop"):
        values["stop"] = tuple(values["stop"])
    return GenerationParams(**values)


# ------------------------------------------------------------------------- documented requests
@pytest.mark.parametrize("case", STRUCTURED["requests"], ids=[c["name"] for c in STRUCTURED["requests"]])
def test_structured_request_matches_the_documented_shape(case: dict[str, Any]) -> None:
    vendor = provider(case["provider"], endpoint=case["endpoint"], model_name=case["model_name"])
    request = vendor.build_request(case["messages"], params(case["params"], case["schema"]))
    assert json.loads(request.body) == expand(case["body"])
    assert FAKE_KEY.encode() not in request.body


def test_strict_is_sent_only_for_a_schema_that_meets_strict_mode() -> None:
    assert strict_compatible(PERSON.json_schema)
    nested = Schema.parse({"type": "object", "additionalProperties": False, "required": ["who", "tags"],
                           "properties": {"who": {"type": "object", "additionalProperties": False,
                                                  "required": ["name"],
                                                  "properties": {"name": {"type": "string"}}},
                                          "tags": {"type": "array", "items": {"type": "string"}}}})
    assert strict_compatible(nested.json_schema)
    broken = [
        # a nested object that allows other keys
        {**nested.json_schema, "properties": {**nested.json_schema["properties"],
                                              "who": {"type": "object", "required": ["name"],
                                                      "properties": {"name": {"type": "string"}}}}},
        # a property left out of required
        {**PERSON.json_schema, "required": ["name", "age"]},
        # a keyword strict mode does not take
        {**PERSON.json_schema, "properties": {**PERSON.json_schema["properties"],
                                              "name": {"type": "string", "minLength": 2}}},
        # an object inside an array item without additionalProperties
        {"type": "object", "additionalProperties": False, "required": ["rows"],
         "properties": {"rows": {"type": "array",
                                 "items": {"type": "object", "properties": {"a": {"type": "string"}},
                                           "required": ["a"]}}}},
    ]
    for schema in broken:
        assert not strict_compatible(schema), schema
        sent = body("openai", [{"role": "user", "content": "x"}],
                    GenerationParams(schema=Schema.parse(schema)))
        assert sent["response_format"]["json_schema"]["strict"] is False


def test_pydantic_schemas_are_sent_inlined_with_strict_by_their_own_rules() -> None:
    pydantic = pytest.importorskip("pydantic")

    class City(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str

    class Trip(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        city: City
        days: int

    class Loose(pydantic.BaseModel):  # extra keys allowed: no additionalProperties false
        city: str

    trip = body("openai", [{"role": "user", "content": "x"}], GenerationParams(schema=Schema.parse(Trip)))
    fmt = trip["response_format"]["json_schema"]
    assert fmt["name"] == "Trip" and fmt["strict"] is True
    assert "$ref" not in json.dumps(fmt["schema"])  # the nested model is inlined
    assert fmt["schema"]["properties"]["city"]["properties"]["name"]["type"] == "string"
    loose = body("openai", [{"role": "user", "content": "x"}], GenerationParams(schema=Schema.parse(Loose)))
    assert loose["response_format"]["json_schema"]["strict"] is False


def test_every_openai_compatible_preset_sends_a_response_format() -> None:
    # What each preset is documented to take (docs/providers.md has the same table).
    expected = {"openai": ("json_schema", True), "azure": ("json_schema", True),
                "vllm": ("json_schema", True), "ollama": ("json_schema", True),
                "lmstudio": ("json_schema", True),
                "together": ("json_schema", True), "groq": ("json_schema", False),
                "openrouter": ("json_schema", True), "mistral": ("json_schema", True),
                "deepseek": ("json_object", None)}
    for name, (kind, strict) in expected.items():
        sent = body(name, [{"role": "user", "content": "x"}], GenerationParams(schema=PERSON))
        assert sent["response_format"]["type"] == kind, name
        if kind == "json_schema":
            assert sent["response_format"]["json_schema"]["strict"] is strict, name


# --------------------------------------------------------------- the schema in the prompt
def system_messages(sent: dict[str, Any]) -> list[str]:
    return [m["content"] for m in sent["messages"] if m["role"] == "system"]


def test_deepseek_json_mode_writes_the_schema_into_the_one_system_message() -> None:
    user = [{"role": "user", "content": "Ada, 36"}]
    plain = body("deepseek", user, GenerationParams(schema=PERSON))
    assert plain["response_format"] == {"type": "json_object"}
    [system] = system_messages(plain)
    # DeepSeek's JSON mode needs the word "json" and the format in the prompt.
    assert "JSON" in system and PERSON_JSON in system
    assert plain["messages"][1:] == user

    with_prompt = body("deepseek", user, GenerationParams(schema=PERSON, system_prompt="Extract the person."))
    [system] = system_messages(with_prompt)
    assert system.startswith("Extract the person.\n\n") and PERSON_JSON in system

    chat = [{"role": "system", "content": "Rule one."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Ada"}]
    merged = body("deepseek", chat, GenerationParams(schema=PERSON, system_prompt="ignored"))
    assert len(system_messages(merged)) == 1 and merged["messages"][0]["content"].startswith("Rule one.\n\n")
    assert merged["messages"][1:] == chat[1:]
    assert chat[0] == {"role": "system", "content": "Rule one."}  # the caller's messages are not modified


def test_together_gets_the_schema_in_the_prompt_as_its_docs_ask() -> None:
    sent = body("together", [{"role": "user", "content": "Ada"}], GenerationParams(schema=PERSON))
    assert sent["response_format"]["type"] == "json_schema"
    assert PERSON_JSON in system_messages(sent)[0]
    # The others rely on response_format alone: the prompt is the user's.
    openai = body("openai", [{"role": "user", "content": "Ada"}], GenerationParams(schema=PERSON))
    assert system_messages(openai) == []


def test_legacy_completions_put_the_schema_in_the_prompt_and_count_logprobs() -> None:
    sent = body("openai", [{"role": "user", "content": "Ada"}],
                GenerationParams(schema=PERSON, system_prompt="Extract.", logprobs=True), api="completions")
    assert "response_format" not in sent  # the legacy API has no JSON mode
    assert sent["prompt"].startswith("Extract.\n\nAnswer with one JSON object")
    assert sent["prompt"].endswith("\n\nAda")
    assert PERSON_JSON in sent["prompt"]
    assert sent["logprobs"] == 1  # a count of alternatives there: the chosen tokens' come with it


def test_a_new_schema_is_never_answered_with_the_previous_ones_request() -> None:
    # The provider keeps the last schema's request parts: a different schema must not reuse them.
    openai, deepseek = provider("openai"), provider("deepseek")
    other = Schema.parse("city, population int")
    for schema in (PERSON, other, PERSON):
        for vendor in (openai, deepseek):
            request = vendor.build_request([{"role": "user", "content": "x"}],
                                           GenerationParams(schema=schema))
            sent = json.loads(request.body)
            if vendor is deepseek:
                assert json.dumps(schema.json_schema, separators=(",", ":")) in system_messages(sent)[0]
            else:
                assert sent["response_format"]["json_schema"]["schema"] == schema.json_schema
            assert ("population" in json.dumps(sent)) is (schema is other)


# --------------------------------------------------------------------------------- logprobs
def test_logprobs_are_asked_for_only_where_offered() -> None:
    user = [{"role": "user", "content": "x"}]
    sent = {name: body(name, user, GenerationParams(logprobs=True))
            for name in ("openai", "azure", "vllm", "ollama", "lmstudio", "openrouter", "deepseek",
                         "together", "groq", "mistral", "anthropic", "gemini")}
    for name in ("openai", "azure", "vllm", "ollama", "lmstudio", "openrouter", "deepseek"):
        assert sent[name]["logprobs"] is True, name
    assert sent["together"]["logprobs"] == 1  # Together documents a count
    for name in ("groq", "mistral", "anthropic"):
        assert "logprobs" not in sent[name], name  # Groq answers 400; Mistral and Anthropic offer none
    assert sent["gemini"]["generationConfig"]["responseLogprobs"] is True


@pytest.mark.parametrize("case", STRUCTURED["responses"], ids=[c["name"] for c in STRUCTURED["responses"]])
def test_documented_structured_answers_parse(case: dict[str, Any]) -> None:
    completion = provider(case["provider"], **case.get("options", {})).parse_response(answer(case["body"]))
    expect = case["expect"]
    assert completion.text == expect["text"]
    assert completion.finish_reason == expect["finish_reason"]
    if expect["logprob"] is None:
        assert completion.logprob is None
    else:
        assert completion.logprob == pytest.approx(expect["logprob"])
    for field in ("prompt_tokens", "completion_tokens"):
        if field in expect:
            assert getattr(completion, field) == expect[field]


def openai_answer(logprobs: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"n\":1}"},
                         "logprobs": logprobs, "finish_reason": "stop"}]}


@pytest.mark.parametrize("logprobs", [
    {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": "-0.1"}]},
    {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": True}]},
    {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": None}]},
    {"content": [{"token": "a", "logprob": -0.5}, {"token": "b"}]},
    {"content": [{"token": "a", "logprob": -0.5}, "b"]},
    {"content": [{"token": "a", "logprob": [-0.5]}]},
    {"content": []},
    {"content": None},
    {"token_logprobs": [-0.5, None]},
    {"token_logprobs": "-0.5"},
    "not an object",
    [-0.5],
], ids=lambda v: json.dumps(v)[:40])
def test_odd_logprobs_leave_the_confidence_unknown_and_never_fail_the_row(logprobs: Any) -> None:
    completion = provider("openai").parse_response(answer(openai_answer(logprobs)))
    assert completion.text == "{\"n\":1}" and completion.finish_reason == "stop"
    assert completion.logprob is None


@pytest.mark.parametrize("result", [
    {"chosenCandidates": [{"token": "a", "logProbability": -0.5}, {"token": "b", "logProbability": "x"}]},
    {"chosenCandidates": [{"token": "a"}]},
    {"chosenCandidates": []},
    {"logProbabilitySum": "-1"},
    {"topCandidates": []},
    "odd",
])
def test_odd_gemini_logprobs_are_ignored(result: Any) -> None:
    data = {"candidates": [{"content": {"parts": [{"text": "{}"}], "role": "model"}, "finishReason": "STOP",
                            "logprobsResult": result}]}
    completion = provider("gemini").parse_response(answer(data))
    assert completion.text == "{}" and completion.logprob is None


def test_a_summed_gemini_logprob_is_used_when_tokens_are_not_listed() -> None:
    data = {"candidates": [{"content": {"parts": [{"text": "{}"}], "role": "model"}, "finishReason": "STOP",
                            "logprobsResult": {"logProbabilitySum": -2.5}}]}
    assert provider("gemini").parse_response(answer(data)).logprob == -2.5


# ----------------------------------------------------------------------- anthropic tool_use
@pytest.mark.parametrize("block", [
    {"type": "tool_use", "id": "toolu_1", "name": "answer"},
    {"type": "tool_use", "id": "toolu_1", "name": "answer", "input": None},
    {"type": "tool_use", "id": "toolu_1", "name": "answer", "input": "{\"name\": \"Ada\"}"},
    {"type": "tool_use", "id": "toolu_1", "name": "answer", "input": ["Ada"]},
])
def test_anthropic_tool_use_without_an_input_object_is_malformed(block: dict[str, Any]) -> None:
    data = {"type": "message", "role": "assistant", "content": [block], "stop_reason": "tool_use",
            "usage": {"input_tokens": 5, "output_tokens": 5}}
    with pytest.raises(errors.MalformedResponseError, match="tool_use block has no input") as caught:
        provider("anthropic").parse_response(answer(data))
    assert caught.value.status_code == 200 and "retry_errors" in caught.value.suggestion
    assert FAKE_KEY not in str(caught.value)


def test_anthropic_text_answers_are_unchanged_by_tool_use_support() -> None:
    data = {"type": "message", "role": "assistant", "stop_reason": "end_turn",
            "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hi"}],
            "usage": {"input_tokens": 5, "output_tokens": 1}}
    completion = provider("anthropic").parse_response(answer(data))
    assert (completion.text, completion.finish_reason, completion.logprob) == ("Hi", "stop", None)


# ------------------------------------------------------------------------------ the docs' table
def docs_table() -> list[list[str]]:
    text = (Path(__file__).resolve().parents[1] / "docs" / "providers.md").read_text()
    section = text.split("## Structured output", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


@pytest.mark.parametrize("row", docs_table(), ids=lambda row: row[0])
def test_the_structured_output_table_in_the_docs_says_what_is_sent(row: list[str]) -> None:
    name, sent_as, strict, in_prompt, logprobs = row[:5]
    options = {"api": "completions"} if 'api="completions"' in name else {}
    name = name.split("`")[1]
    user = [{"role": "user", "content": "Ada"}]
    sent = body(name, user, GenerationParams(schema=PERSON, logprobs=True), **options)
    loose = body(name, user, GenerationParams(schema=Schema.parse(STRUCTURED["schemas"]["loose"])), **options)
    if sent_as.startswith("`response_format: "):
        kind = sent_as.split(": ")[1].rstrip("`")
        assert sent["response_format"]["type"] == kind
        if kind == "json_schema":
            expected = {"if the schema allows": (True, False), "never": (False, False)}[strict]
            assert (sent["response_format"]["json_schema"]["strict"],
                    loose["response_format"]["json_schema"]["strict"]) == expected
    elif sent_as == "in the prompt only":
        assert "response_format" not in sent and PERSON_JSON in sent["prompt"]
    elif sent_as.startswith("a forced tool"):
        assert sent["tools"][0]["input_schema"] == PERSON.json_schema
        assert sent["tool_choice"] == {"type": "tool", "name": PERSON.name}
    else:
        assert sent_as == "`generationConfig.responseJsonSchema`"
        assert sent["generationConfig"]["responseJsonSchema"] == PERSON.json_schema
        assert sent["generationConfig"]["responseMimeType"] == "application/json"
    if "prompt" in sent:
        prompt = sent["prompt"]
    else:
        prompt = "\n".join(m["content"] for m in sent.get("messages", []) if m["role"] == "system")
        prompt += sent.get("system", "")
    assert (PERSON_JSON in prompt) is (in_prompt == "yes")
    if logprobs == "not sent":
        assert "logprobs" not in sent and "responseLogprobs" not in json.dumps(sent)
    elif logprobs.startswith("`generationConfig.responseLogprobs"):
        assert sent["generationConfig"]["responseLogprobs"] is True
    else:
        assert sent["logprobs"] == json.loads(logprobs.split(": ")[1].rstrip("`"))


# --------------------------------------------------------- end to end over a loopback server
class StructuredVendor:
    """A loopback server answering as OpenAI, Anthropic and Gemini do when asked for structured
    output (the JSON follows from the request's schema), recording what each request carried."""

    ANSWER = {"name": "Zoë", "age": 36, "mood": "happy"}

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> Any:
        from aiohttp import web

        async def openai(request: web.Request) -> web.Response:
            data = await request.json()
            self.bodies.append(data)
            text = json.dumps(self.ANSWER) if data.get("response_format") else "plain"  # json_object too
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}
            if data.get("logprobs"):
                choice["logprobs"] = {"content": [{"token": "{", "logprob": -0.5}]}
            usage = {"prompt_tokens": 9, "completion_tokens": 7}
            return web.json_response({"choices": [choice], "usage": usage})

        async def anthropic(request: web.Request) -> web.Response:
            data = await request.json()
            self.bodies.append(data)
            tool = data["tools"][0]["name"] if data.get("tools") else None
            content = ([{"type": "tool_use", "id": "toolu_1", "name": tool, "input": self.ANSWER}] if tool
                       else [{"type": "text", "text": "plain"}])
            return web.json_response({"type": "message", "role": "assistant", "content": content,
                                      "stop_reason": "tool_use" if tool else "end_turn",
                                      "usage": {"input_tokens": 9, "output_tokens": 7}})

        async def gemini(request: web.Request) -> web.Response:
            data = await request.json()
            self.bodies.append(data)
            config = data["generationConfig"]
            text = json.dumps(self.ANSWER) if "responseJsonSchema" in config else "plain"
            candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"},
                                         "finishReason": "STOP"}
            if config.get("responseLogprobs"):
                candidate["logprobsResult"] = {"chosenCandidates": [{"token": "{", "logProbability": -0.5}]}
            return web.json_response({"candidates": [candidate],
                                      "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 7}})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", openai)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", openai)  # Azure
        app.router.add_post("/v1/messages", anthropic)
        app.router.add_post("/v1beta/{model:.*}", gemini)
        return app


@pytest.mark.parametrize(("name", "path"), [("openai", "/v1"), ("anthropic", "/v1"), ("gemini", "/v1beta"),
                                            ("deepseek", "/v1"), ("azure", "")])
def test_structured_requests_round_trip_through_the_engine_over_http(name: str, path: str) -> None:
    import asyncio

    from aiohttp import web

    from gen_ai_frames import create_client

    vendor = StructuredVendor()

    async def run() -> list[Any]:
        runner = web.AppRunner(vendor.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            client = create_client(provider=name, api_key=FAKE_KEY, model_name="m", max_retries=0,
                                   endpoint=f"http://127.0.0.1:{port}{path}")
            async with client.engine(max_concurrent=2) as engine:
                plain = await engine.run([[{"role": "user", "content": "Ada"}]], GenerationParams())
                structured = await engine.run([[{"role": "user", "content": "Ada"}]],
                                              GenerationParams(schema=PERSON, logprobs=True))
            return [plain[0], structured[0]]
        finally:
            await runner.cleanup()

    plain, structured = asyncio.run(run())
    assert plain.error is None and plain.text == "plain"
    assert structured.error is None, structured.error
    assert json.loads(structured.text) == StructuredVendor.ANSWER
    if name == "anthropic":
        assert structured.text == '{"name":"Zoë","age":36,"mood":"happy"}'
        assert structured.finish_reason == "stop"
    first, second = vendor.bodies
    assert "response_format" not in json.dumps(first) and "tools" not in first
    assert PERSON_JSON in json.dumps(second, separators=(",", ":"), ensure_ascii=False).replace('\\"', '"')
