"""Structured-output answers (JSON that fits, or breaks, the request's schema) and logprobs."""

from __future__ import annotations

import os
from typing import Any

from .common import _first_user_text

try:
    from ..schema_answers import conforming_answer, violating_answer
except ImportError:  # run as a plain script: load testing/schema_answers.py without the package (and pandas)
    import importlib.util as _util

    _testing = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = _util.spec_from_file_location("_schema_answers", os.path.join(_testing, "schema_answers.py"))
    assert _spec is not None and _spec.loader is not None
    _schema_answers = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_schema_answers)
    conforming_answer, violating_answer = _schema_answers.conforming_answer, _schema_answers.violating_answer


def _structured_request(dialect: str, data: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON Schema a request asks its answer to match (if any), and its first user prompt."""
    schema = prompt = None
    if dialect == "anthropic":
        tools, choice = data.get("tools"), data.get("tool_choice")
        if isinstance(tools, list) and tools and isinstance(choice, dict) and choice.get("type") == "tool":
            schema = next((t.get("input_schema") for t in tools if t.get("name") == choice.get("name")), None)
        first = next((m for m in data.get("messages") or [] if m.get("role") == "user"), None)
        prompt = None if first is None else _first_user_text(first.get("content"))
    elif dialect == "gemini":
        config = data.get("generationConfig") or {}
        schema = config.get("responseJsonSchema") or config.get("responseSchema")
        contents = data.get("contents") or []
        prompt = _first_user_text((contents[0].get("parts") if contents else None) or [])
    else:
        response_format = data.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
        first = next((m for m in data.get("messages") or [] if m.get("role") == "user"), None)
        prompt = None if first is None else _first_user_text(first.get("content"))
    return (schema if isinstance(schema, dict) else None), prompt


def _put_structured(dialect: str, payload: dict[str, Any], text: str, answer: Any) -> None:
    if dialect == "anthropic":
        payload["content"] = [{"type": "tool_use", "id": "toolu_fake", "name": "answer", "input": answer}]
        payload["stop_reason"] = "tool_use"
    elif dialect == "gemini":
        payload["candidates"][0]["content"]["parts"] = [{"text": text}]
    elif "message" in payload["choices"][0]:
        for choice in payload["choices"]:
            choice["message"]["content"] = text


def _put_logprobs(dialect: str, payload: dict[str, Any]) -> None:
    if dialect == "gemini":
        for candidate in payload.get("candidates", []):
            words = "".join(p.get("text", "") for p in candidate["content"]["parts"]).split()
            candidate["logprobsResult"] = {
                "chosenCandidates": [{"token": w, "logProbability": -0.05} for w in words]
            }
    elif dialect != "anthropic":
        for choice in payload.get("choices", []):
            text = choice.get("message", {}).get("content") or ""
            choice["logprobs"] = {
                "content": [
                    {"token": w, "logprob": -0.05, "bytes": None, "top_logprobs": []} for w in text.split()
                ]
            }
