"""Generation parameters and their validation: bad values fail before any request is sent."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError
from .schema import Schema

__all__ = ["GenerationParams", "Message", "check_number", "validate_positive_int"]

#: One chat message: ``{"role": "user", "content": "Hi"}``.
Message = dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationParams:
    """What to ask the model for, shared by every prompt of a call.

    >>> GenerationParams(max_tokens=100, temperature=0.7).max_tokens
    100
    >>> GenerationParams(temperature=5)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: temperature must be a number in [0, 2], got 5
    """

    max_tokens: int = 256
    temperature: float = 0
    top_p: float = 1.0
    timeout: float = 60
    system_prompt: str | None = None
    stop: tuple[str, ...] | None = None
    #: Structured output: providers ask for JSON that matches it (see gen_ai_frames.schema).
    schema: Schema | None = None
    #: With a schema: how many times to ask again, showing the model what was wrong, before a row
    #: fails with SchemaValidationError.
    schema_retries: int = 1
    #: Ask for token log-probabilities where the provider offers them (classify's confidence).
    logprobs: bool = False

    def __post_init__(self) -> None:
        validate_positive_int("max_tokens", self.max_tokens)
        check_number("temperature", self.temperature, "in [0, 2]", lambda v: 0 <= v <= 2)
        check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        check_number("timeout", self.timeout, "> 0 (seconds)", lambda v: v > 0)
        validate_positive_int("schema_retries", self.schema_retries, minimum=0)
        if self.schema is not None and not isinstance(self.schema, Schema):
            raise ConfigurationError(
                f"schema must be a gen_ai_frames.schema.Schema, got {type(self.schema).__name__}"
            )
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigurationError(
                f"system_prompt must be a string or None, got {type(self.system_prompt).__name__}"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What makes answers differ: stored in checkpoints to refuse resuming with other settings."""
        values = {
            name: getattr(self, name) for name in ("max_tokens", "temperature", "top_p", "system_prompt")
        }
        values["stop"] = None if self.stop is None else list(self.stop)
        # timeout is left out: a longer timeout does not change an answer. The newer settings are
        # included only when used, so checkpoints written before they existed still resume.
        if self.schema is not None:
            values["schema"] = self.schema.canonical()
        if self.logprobs:
            values["logprobs"] = True
        return values


def validate_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a ConfigurationError naming it.

    >>> validate_positive_int("max_concurrent", 0)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: max_concurrent must be an integer >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value: object, allowed: str, ok: Any) -> None:
    """Raise a ConfigurationError naming ``name`` unless ``value`` is a real number (not bool or
    NaN) that ``ok`` accepts.

    >>> check_number("top_p", 0, "in (0, 1]", lambda v: 0 < v <= 1)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: top_p must be a number in (0, 1], got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or not ok(value):
        raise ConfigurationError(f"{name} must be a number {allowed}, got {value!r}")
