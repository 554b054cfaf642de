"""The fake server's run-time settings: defaults and validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: Names of the faults chaos mode can inject (keys of the ``chaos`` setting).
FAULTS: tuple[str, ...] = (
    "429_retry_after",
    "429_plain",
    "500",
    "502",
    "503",
    "529",
    "reset",
    "slow",
    "html",
    "wrong_shape",
    "truncated",
    "length",
    "content_filter",
)

# Settings that can be changed at run time (constructor, configure(), POST /config).
_DEFAULTS: dict[str, Any] = {
    "api_key": None,
    "models": None,
    "default_model": "fake-model",
    "latency": 0.0,
    "latency_median": None,
    "latency_sigma": 0.5,
    "seed": 0,
    "chaos": {},
    "chaos_retry_after": 1.0,
    "chaos_slow_seconds": 30.0,
    "retry_after_grace": 0.05,
    "rate_limit_rpm": None,
    "rate_limit_tpm": None,
    "rate_limit_burst": 1.0,
    "rate_limit_style": "headers",
    # Structured output: the share of prompts whose *first* answer is broken JSON, or JSON that
    # breaks the schema (the answer to a retry is always right).
    "schema_broken_rate": 0.0,
    "schema_violation_rate": 0.0,
    # Batch APIs (batches.py): polls each state lasts, how the next batches end, and the share of
    # rows an expired or cancelled batch answers first.
    "batch_polls_per_state": 1,
    "batch_outcomes": [],
    "batch_fraction": 0.5,
}
_RATE_LIMIT_STYLES = ("headers", "retry_after")
# Settings fixed once the socket is bound (constructor / command line only).
_SERVER_ONLY = ("host", "port", "access_log", "shutdown_timeout")

# Keep memory bounded when a broken client hammers the server during a window.
_MAX_VIOLATION_DETAILS = 1000


def _validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise run-time settings; raise ValueError/TypeError if bad."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in _DEFAULTS:
            raise TypeError(f"unknown FakeServer setting {key!r}")
        if key == "api_key":
            if value is not None and not isinstance(value, str):
                raise TypeError("api_key must be a string or None")
            value = value or None  # "" means no auth, like an unset env var
        elif key == "models":
            if value is not None:
                if isinstance(value, str) or not all(isinstance(m, str) for m in value):
                    raise TypeError("models must be a list of strings or None")
                value = list(value)
        elif key == "default_model":
            value = str(value)
        elif key in (
            "latency",
            "latency_sigma",
            "chaos_retry_after",
            "chaos_slow_seconds",
            "retry_after_grace",
        ):
            value = float(value)
            if value < 0 or math.isnan(value):
                raise ValueError(f"{key} must be >= 0")
        elif key in ("rate_limit_rpm", "rate_limit_tpm"):
            if value is not None:
                value = float(value)
                if not value > 0 or math.isinf(value):
                    raise ValueError(f"{key} must be > 0 (or None for no limit)")
        elif key in ("schema_broken_rate", "schema_violation_rate"):
            value = float(value)
            if not 0 <= value <= 1:
                raise ValueError(f"{key} must be in [0, 1]")
        elif key == "batch_polls_per_state":
            value = int(value)
            if value < 1:
                raise ValueError("batch_polls_per_state must be >= 1")
        elif key == "batch_outcomes":
            value = [str(v) for v in value or []]
            for outcome in value:
                if outcome not in ("completed", "expired", "cancelled", "failed"):
                    raise ValueError(f"unknown batch outcome {outcome!r}")
        elif key == "batch_fraction":
            value = float(value)
            if not 0 <= value <= 1:
                raise ValueError("batch_fraction must be in [0, 1]")
        elif key == "rate_limit_burst":
            value = float(value)
            if not value > 0 or math.isinf(value):
                raise ValueError("rate_limit_burst must be > 0 seconds")
        elif key == "rate_limit_style":
            if value not in _RATE_LIMIT_STYLES:
                raise ValueError(
                    f"rate_limit_style must be one of {', '.join(_RATE_LIMIT_STYLES)}; got {value!r}"
                )
        elif key == "latency_median":
            if value is not None:
                value = float(value)
                if not value > 0:
                    raise ValueError("latency_median must be > 0 (or None)")
        elif key == "seed":
            value = None if value is None else int(value)
        elif key == "chaos":
            value = dict(value or {})
            chaos: dict[str, float] = {}
            for name, prob in value.items():
                name = str(name)
                if name not in FAULTS:
                    raise ValueError(f"unknown chaos fault {name!r}; known: {', '.join(FAULTS)}")
                prob = float(prob)
                if not 0.0 <= prob <= 1.0:
                    raise ValueError(f"chaos probability for {name!r} must be in [0, 1]")
                if prob > 0:
                    chaos[name] = prob
            if sum(chaos.values()) > 1.0 + 1e-9:
                raise ValueError("chaos probabilities must sum to at most 1")
            value = chaos
        out[key] = value
    return out
