"""Deterministic answers that match a JSON Schema: what the fake servers send for structured output.

The same prompt and schema always give the same answer, so tests can predict every typed column.

>>> schema = {"type": "object", "properties": {"n": {"type": "integer"}, "mood": {"enum": ["a", "b"]}}}
>>> conforming_answer(schema, "hello")
{'n': 5, 'mood': 'a'}
"""

from __future__ import annotations

import zlib
from typing import Any

__all__ = ["conforming_answer", "violating_answer"]


def conforming_answer(schema: dict[str, Any], prompt: str, path: str = "") -> Any:
    """A value matching ``schema``, derived from ``prompt`` (and the field's path within the answer)."""
    seed = zlib.crc32(f"{path}|{prompt}".encode())
    if "enum" in schema:
        return schema["enum"][seed % len(schema["enum"])]
    kind = schema.get("type")
    if isinstance(kind, list):  # ["integer", "null"]: answer the non-null type
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {
            name: conforming_answer(prop, prompt, f"{path}/{name}")
            for name, prop in schema.get("properties", {}).items()
        }
    if kind == "array":
        return [
            conforming_answer(schema.get("items", {}), prompt, f"{path}/{i}") for i in range(1 + seed % 2)
        ]
    if kind == "integer":
        return len(prompt)
    if kind == "number":
        return len(prompt) / 2
    if kind == "boolean":
        return len(prompt) % 2 == 0
    if kind == "null":
        return None
    return f"{path.rsplit('/', 1)[-1] or 'text'} of {prompt}"


def violating_answer(schema: dict[str, Any], prompt: str) -> Any:
    """A value of the right shape whose first field has the wrong type: a schema violation.

    >>> violating_answer({"type": "object", "properties": {"n": {"type": "integer"}}}, "hi")
    {'n': [['not', 'this']]}
    """
    answer = conforming_answer(schema, prompt)
    if isinstance(answer, dict) and answer:
        first = next(iter(answer))
        answer[first] = [["not", "this"]]
    return answer
