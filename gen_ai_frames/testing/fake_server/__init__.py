"""A fake LLM server for tests, notebooks and benchmarks, speaking OpenAI's API
and the dialects of Anthropic, Azure OpenAI and Gemini.

The server answers ``POST /v1/chat/completions`` and ``POST /v1/completions``
(also without the ``/v1`` prefix) with a deterministic answer,
``"echo: " + <last user message or prompt>``, so a test can check that every
row of a result got *its own* answer back.  The same model also answers, each
in its vendor's request, answer and error shapes:

* Anthropic Messages: ``POST /v1/messages`` (key in ``x-api-key``; requires
  ``max_tokens``, refuses a ``system`` message role and temperature > 1;
  ``[[content_filter]]`` answers ``stop_reason: "refusal"``)
* Azure OpenAI: ``POST /openai/deployments/{deployment}/chat/completions``
  (and ``/completions``) with ``?api-version=...`` (key in ``api-key``; the
  deployment plays the model; ``[[content_filter]]`` answers 400 ``content_filter``
  as Azure's prompt filter does)
* Gemini: ``POST /v1beta/models/{model}:generateContent`` (key in
  ``x-goog-api-key`` or ``?key=``; a wrong key answers 400 ``API_KEY_INVALID``
  as Google does; a 429 says how long to wait in a ``RetryInfo`` detail of the
  body, not in headers; ``[[content_filter]]`` blocks the prompt with
  ``promptFeedback.blockReason``)

:meth:`FakeServer.endpoint_for` gives the ``endpoint=`` to pass to
``create_client`` for each provider.  Directives, chaos, latency and stats work
the same in every dialect.  On top of that it can simulate
everything a real provider does to a client: latency, auth errors, unknown
models, rate limits with ``retry-after``, 5xx errors, connection resets,
truncated bodies, HTML error pages, wrong JSON shapes, ... either on demand
(directives written into a prompt) or at random (seeded chaos mode).  It
records what it did, per prompt, so a test can compare the client's view with
the server's.

Example::

    from gen_ai_frames.testing import FakeServer

    with FakeServer(latency=0.01, api_key="k") as server:
        # server.url == "http://127.0.0.1:PORT/v1"; point any OpenAI client at it
        ...
        stats = server.stats()
        assert stats["max_in_flight"] <= 64

Command line (a separate process, e.g. for benchmarks)::

    python -m gen_ai_frames.testing.fake_server --port 0 --latency 0.05
    # prints: listening on http://127.0.0.1:PORT/v1

The "prompt" of a request (the key of the per-prompt stats, and where
directives are read) is the text of the last ``user`` message for chat, or
``prompt`` for completions (a list of prompts is joined with ``"\\n"``).

Rate limits, as providers enforce them: ``rate_limit_rpm`` (requests per minute) and/or
``rate_limit_tpm`` (tokens per minute: the prompt's words plus ``max_tokens``, charged when the
request arrives) are token buckets holding ``rate_limit_burst`` seconds of their rate (1 s). A
request over a limit is answered 429 at once (outcome ``"rate_limited"``). ``rate_limit_style``
says how the server tells the client:

=================  =====================================================================
``"headers"``      every answer states the limits in the dialect's own headers: OpenAI's
                   ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (OpenAI, Azure;
                   resets as durations, ``"120ms"``), Anthropic's
                   ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`` (resets as
                   RFC 3339 times); a 429 adds ``retry-after-ms`` (OpenAI) and ``Retry-After``.
                   Gemini states no limits: its 429 has the wait in a ``RetryInfo`` detail.
``"retry_after"``  no rate-limit headers; a 429 carries only ``Retry-After`` (whole seconds).
=================  =====================================================================

Directives, written anywhere in the prompt, for targeted tests:

* ``[[status=NNN]]``: answer NNN with the dialect's error body; for 429 add
  ``[[retry_after=S]]`` (``retry-after: S`` header) and/or
  ``[[retry_after_ms=MS]]`` (``retry-after-ms`` header)
* ``[[fail_times=N]]``: the first N attempts of this exact prompt fail with
  ``[[status=...]]`` (default 500), later attempts succeed
* ``[[sleep=S]]``: sleep S more seconds before answering
* ``[[html]]``: 200 with an HTML page; ``[[context_length]]``: 400
  ``context_length_exceeded``; ``[[content_filter]]``: 200, content null,
  finish_reason ``content_filter``; ``[[error_body]]``: 200 with ``{"error": ...}``

Outcomes recorded per attempt (``stats()["outcomes"][prompt]``): ``"ok"``, a
chaos fault name (see :data:`FAULTS`), or for directives ``"<status>"``
(e.g. ``"503"``), ``"429_retry_after"``/``"429_plain"``, ``"rate_limited"``, ``"html"``,
``"context_length"``, ``"content_filter"``, ``"error_body"``; and
``"auth_error"``, ``"model_not_found"``, ``"bad_request"``.

Stats keys (``GET /stats`` or ``FakeServer.stats()``): ``requests``,
``in_flight``, ``max_in_flight``, ``per_prompt``, ``outcomes``,
``outcome_counts``, ``status_counts`` (keys are strings, e.g. ``"429"``),
``retry_after_violations``, ``retry_after_violation_details``,
``retry_after_windows_opened``, ``uptime``.  Other endpoints: ``POST /reset``,
``GET``/``POST /config``, ``GET /health``, ``GET /v1/models``.  The admin
endpoints need no API key (the server only listens on loopback).

Only aiohttp (and orjson when installed) are imported: this package must stay
cheap to start as a subprocess, so never import pandas or the rest of
``gen_ai_frames`` from here (``python path/to/fake_server/__main__.py`` runs it
without the package).

Modules: ``settings`` (defaults, validation), ``common`` (JSON, error bodies,
directive syntax), ``limits`` (token buckets), ``structured`` (schema answers,
logprobs), ``dialects/`` (one module per vendor), ``app`` (:class:`FakeLLM`, the
aiohttp app), ``server`` (:class:`FakeServer`), ``cli`` (:func:`main`).
"""

from __future__ import annotations

from .app import FakeLLM
from .cli import main
from .server import FakeServer
from .settings import FAULTS

__all__ = ["FAULTS", "FakeLLM", "FakeServer", "main"]
