"""The fake model's state and its aiohttp app: settings, stats, directives, chaos and answers."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import random
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .batches import FakeBatches
from .chaos import (
    _chaos_fault,
    _chaos_outcome,
    _chaos_table,
    _parse_directives,
    _send_reset,
    _send_truncated,
    _status_outcome,
)
from .common import (
    _HTML_PAGE,
    _BadRequest,
    _dumps,
    _error_response,
    _format_seconds,
    _json_response,
    _loads,
)
from .dialects.anthropic import _ANTHROPIC
from .dialects.azure import _AZURE_CHAT, _AZURE_COMPLETIONS
from .dialects.gemini import _GEMINI, _GeminiDialect
from .dialects.openai import _OPENAI_CHAT, _OPENAI_COMPLETIONS, _OpenAIDialect
from .limits import _Bucket, _duration, _rfc3339_in
from .settings import _DEFAULTS, _MAX_VIOLATION_DETAILS, _validate
from .structured import (
    _put_logprobs,
    _put_structured,
    _structured_request,
    conforming_answer,
    violating_answer,
)


@dataclass
class _Call:
    """What one LLM request asked for, filled in as the handler reads and checks it."""

    data: Any = None
    parse_error: str | None = None
    bad: _BadRequest | None = None
    prompts: list[str] = field(default_factory=list)
    prompt_key: str | None = None
    prompt_tokens: int = 0
    model: str = ""
    n: int = 1
    max_tokens: int | None = None
    directives: dict[str, Any] = field(default_factory=dict)


class FakeLLM:
    """The fake server's state and aiohttp handlers, independent of how it is run.

    :class:`FakeServer` runs it in a background thread; :func:`main` runs it in
    the foreground.  You can also mount :meth:`make_app` in your own aiohttp
    test setup.  All methods must be called from the event loop that serves
    the app (plain attribute/dict updates, no locks: one loop, one thread).

    Example::

        fake = FakeLLM(chaos={"500": 0.1}, seed=1)
        runner = fake.make_runner()   # then web.TCPSite(runner, ...)
    """

    def __init__(self, **settings: Any) -> None:
        self.settings: dict[str, Any] = dict(_DEFAULTS)
        self.settings["chaos"] = {}
        self._latency_rng = random.Random(0)
        self._auth_header: bytes | None = None
        self._key: bytes | None = None
        self.batch_api = FakeBatches(self)
        self.configure(**settings)
        self.reset()

    # ----------------------------------------------------------------- settings
    def configure(self, **settings: Any) -> dict[str, Any]:
        """Update run-time settings (validated as a whole first); return them."""
        clean = _validate(settings)
        self.settings.update(clean)
        if "seed" in clean:
            self._latency_rng = random.Random(self.settings["seed"])
        key = self.settings["api_key"]
        # Pre-encode once so the per-request check is a single compare_digest.
        self._auth_header = None if key is None else b"Bearer " + key.encode()
        self._key = None if key is None else key.encode()  # other dialects send the bare key
        if any(key.startswith("rate_limit_") for key in clean) or not hasattr(self, "_buckets"):
            self._fill_buckets()
        self._chaos_table = _chaos_table(self.settings["chaos"])
        return self.public_config()

    def public_config(self) -> dict[str, Any]:
        """Current settings, with the API key replaced by whether one is set."""
        cfg = {k: v for k, v in self.settings.items() if k != "api_key"}
        cfg["chaos"] = dict(cfg["chaos"])
        cfg["api_key_set"] = self.settings["api_key"] is not None
        return cfg

    # -------------------------------------------------------------------- stats
    def reset(self) -> None:
        """Clear all counters (settings are kept)."""
        self.started = time.monotonic()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.per_prompt: dict[str, int] = {}
        self.outcomes: dict[str, list[str]] = {}
        self.outcome_counts: dict[str, int] = {}
        self.status_counts: dict[str, int] = {}
        self.retry_after_violations = 0
        self.retry_after_violation_details: list[dict[str, Any]] = []
        self.retry_after_windows_opened = 0
        self._windows: list[tuple[float, float]] = []
        self._next_id = 0
        self._schema_asks: dict[str, int] = {}
        self.batch_api.reset()
        self._fill_buckets()

    def _fill_buckets(self) -> None:
        """Full buckets for the configured limits (at start, on reset and when they change)."""
        now = time.monotonic()
        burst = self.settings["rate_limit_burst"]
        self._buckets: dict[str, _Bucket] = {
            kind: _Bucket(per_minute, burst, now)
            for kind, per_minute in (
                ("requests", self.settings["rate_limit_rpm"]),
                ("tokens", self.settings["rate_limit_tpm"]),
            )
            if per_minute is not None
        }

    def _admit(self, dialect: _OpenAIDialect, tokens: int, now: float) -> tuple[float, dict[str, str]]:
        """Charge one request to the rate limits: ``(seconds to wait, headers)``; 0 s means admitted.
        A refused request is charged nothing, as providers do."""
        costs = {"requests": 1.0, "tokens": float(tokens)}
        wait = max(bucket.wait_for(costs[kind], now) for kind, bucket in self._buckets.items())
        if wait == 0:  # all or nothing: a refused request is charged nothing, as providers do
            for kind, bucket in self._buckets.items():
                bucket.level = max(0.0, bucket.level - costs[kind])
        headers: dict[str, str] = {}
        if self.settings["rate_limit_style"] == "headers":
            for kind, bucket in self._buckets.items():
                remaining, reset = str(int(bucket.level)), bucket.reset_in()
                if dialect.name == "anthropic":
                    prefix = f"anthropic-ratelimit-{kind}-"
                    headers.update(
                        {
                            prefix + "limit": f"{bucket.per_minute:g}",
                            prefix + "remaining": remaining,
                            prefix + "reset": _rfc3339_in(reset),
                        }
                    )
                elif dialect.name in ("openai", "azure"):
                    headers.update(
                        {
                            f"x-ratelimit-limit-{kind}": f"{bucket.per_minute:g}",
                            f"x-ratelimit-remaining-{kind}": remaining,
                            f"x-ratelimit-reset-{kind}": _duration(reset),
                        }
                    )
        return wait, headers

    def stats(self) -> dict[str, Any]:
        """A snapshot (copies) of the counters; see the module docs for the keys."""
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "per_prompt": dict(self.per_prompt),
            "outcomes": {k: list(v) for k, v in self.outcomes.items()},
            "outcome_counts": dict(self.outcome_counts),
            "status_counts": dict(self.status_counts),
            "retry_after_violations": self.retry_after_violations,
            "retry_after_violation_details": [dict(d) for d in self.retry_after_violation_details],
            "retry_after_windows_opened": self.retry_after_windows_opened,
            "uptime": time.monotonic() - self.started,
            "batches": self.batch_api.stats(),
        }

    def _record(self, prompt_key: str | None, outcome: str) -> None:
        self.outcome_counts[outcome] = self.outcome_counts.get(outcome, 0) + 1
        if prompt_key is not None:
            lst = self.outcomes.get(prompt_key)
            if lst is None:
                self.outcomes[prompt_key] = [outcome]
            else:
                lst.append(outcome)

    def _open_window(self, seconds: float) -> None:
        # Called when the 429 is actually sent, so the window starts at "t".
        now = time.monotonic()
        self._windows.append((now + self.settings["retry_after_grace"], now + seconds))
        self.retry_after_windows_opened += 1

    def _window_at(self, now: float) -> tuple[float, float] | None:
        windows = self._windows
        if not windows:
            return None
        live = [w for w in windows if w[1] > now]
        if len(live) != len(windows):
            self._windows = live
        for w in live:
            if w[0] <= now:
                return w
        return None

    # ------------------------------------------------------------------- aiohttp
    def make_app(self) -> web.Application:
        """The aiohttp application: OpenAI routes with and without ``/v1``, and the other dialects'."""
        # Large prompts are legitimate; aiohttp's default limit is 1 MiB.
        app = web.Application(client_max_size=64 * 1024**2)
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/chat/completions", self._handle_chat)
            app.router.add_post(prefix + "/completions", self._handle_completions)
            app.router.add_get(prefix + "/models", self._handle_models)
            app.router.add_post(prefix + "/messages", self._handle_anthropic)
        deployment = "/openai/deployments/{deployment}"
        app.router.add_post(deployment + "/chat/completions", self._handle_azure_chat)
        app.router.add_post(deployment + "/completions", self._handle_azure_completions)
        for version in ("/v1beta", "/v1"):
            app.router.add_post(version + "/models/{model_action}", self._handle_gemini)
        self.batch_api.register(app)
        app.router.add_get("/stats", self._handle_stats)
        app.router.add_post("/reset", self._handle_reset)
        app.router.add_get("/config", self._handle_get_config)
        app.router.add_post("/config", self._handle_config)
        app.router.add_get("/health", self._handle_health)
        return app

    def make_runner(self, *, access_log: bool = False, shutdown_timeout: float = 0.25) -> web.AppRunner:
        """An AppRunner tuned for tests: no access log, handlers cancelled on
        client disconnect (so ``in_flight`` reflects open requests, and a
        ``slow`` answer does not outlive the client's timeout), quick shutdown."""
        kwargs: dict[str, Any] = {}
        if not access_log:
            kwargs["access_log"] = None  # per-request logging costs ~10% throughput
        return web.AppRunner(
            self.make_app(),
            handler_cancellation=True,
            shutdown_timeout=shutdown_timeout,
            **kwargs,
        )

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response({"ok": True})

    async def _handle_get_config(self, request: web.Request) -> web.Response:
        return _json_response(self.public_config())

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            data = _loads(await request.read())
            if not isinstance(data, dict):
                raise TypeError("POST /config expects a JSON object")
            cfg = self.configure(**data)
        except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
            return _error_response(400, f"invalid config: {exc}")
        return _json_response(cfg)

    async def _handle_health(self, request: web.Request) -> web.Response:
        return _json_response({"status": "ok"})

    async def _handle_models(self, request: web.Request) -> web.Response:
        names = self.settings["models"] or [self.settings["default_model"]]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]
        return _json_response({"object": "list", "data": data})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _OPENAI_CHAT)

    async def _handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _OPENAI_COMPLETIONS)

    async def _handle_anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _ANTHROPIC)

    async def _handle_azure_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _AZURE_CHAT)

    async def _handle_azure_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_llm(request, _AZURE_COMPLETIONS)

    async def _handle_gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["model_action"].rpartition(":")
        if method == "batchGenerateContent" and model:
            return await self.batch_api.gemini_create(request, model)
        if method != "generateContent" or not model:
            # Only the non-streaming method is faked; anything else is an unknown route.
            return _GeminiDialect._error_response(
                404,
                f"Method {method or request.match_info['model_action']!r} is not supported "
                "by FakeServer (only :generateContent).",
            )
        return await self._handle_llm(request, _GEMINI)

    async def _handle_llm(self, request: web.Request, dialect: _OpenAIDialect) -> web.StreamResponse:
        arrival = time.monotonic()
        self.requests += 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            resp = await self._answer(request, dialect, arrival)
        finally:
            # Also runs when aiohttp cancels the handler (client went away).
            self.in_flight -= 1
        key = str(resp.status)
        self.status_counts[key] = self.status_counts.get(key, 0) + 1
        return resp

    # --------------------------------------------------------------- the answer
    async def _answer(
        self, request: web.Request, dialect: _OpenAIDialect, arrival: float
    ) -> web.StreamResponse:
        window = self._window_at(arrival)
        body = await request.read()

        # Parse first (even when auth fails) so every attempt is recorded per prompt.
        call = self._parse(body, dialect, request)
        attempt = 0
        if call.prompt_key is not None:
            attempt = self.per_prompt.get(call.prompt_key, 0)
            self.per_prompt[call.prompt_key] = attempt + 1
        if window is not None:
            self._note_violation(window, arrival, request.path, call.prompt_key)

        refusal = self._refuse(call, dialect, request)
        if refusal is not None:
            return refusal

        rate_headers: dict[str, str] | None = None
        if self._buckets:
            wait, rate_headers = self._admit(
                dialect, call.prompt_tokens + (call.max_tokens or 0), time.monotonic()
            )
            if wait > 0:
                self._record(call.prompt_key, "rate_limited")
                return self._rate_limited(dialect, wait, rate_headers, request)

        outcome, status, retry_after = self._decide(call.directives, call.prompt_key or "", attempt)
        self._record(call.prompt_key, outcome)
        await self._delay(call.directives, outcome)
        if status >= 400:
            return self._error_answer(dialect, request, outcome, status, retry_after, call.directives)
        return await self._success_answer(dialect, request, call, outcome, rate_headers)

    @staticmethod
    def _parse(body: bytes, dialect: _OpenAIDialect, request: web.Request) -> _Call:
        """Read the body and the prompts; errors are kept to answer after the auth check."""
        call = _Call()
        try:
            call.data = _loads(body)
        except ValueError:
            call.parse_error = dialect.parse_error_message
        if call.parse_error is None:
            try:
                call.prompts, call.prompt_tokens = dialect.extract(call.data, request)
                prompts = call.prompts
                call.prompt_key = prompts[0] if len(prompts) == 1 else "\n".join(prompts)
            except _BadRequest as exc:
                call.bad = exc
        return call

    def _note_violation(
        self, window: tuple[float, float], arrival: float, path: str, prompt_key: str | None
    ) -> None:
        """Count a request that came while a Retry-After window was open."""
        self.retry_after_violations += 1
        if len(self.retry_after_violation_details) < _MAX_VIOLATION_DETAILS:
            self.retry_after_violation_details.append(
                {
                    "at": arrival - self.started,
                    "window_start": window[0] - self.started,
                    "window_end": window[1] - self.started,
                    "path": path,
                    "prompt": prompt_key,
                }
            )

    def _refuse(self, call: _Call, dialect: _OpenAIDialect, request: web.Request) -> web.Response | None:
        """The error answer for a wrong key, a bad request or an unknown model, else None.

        On None, ``call`` holds the model, ``n``, ``max_tokens`` and the directives."""
        settings = self.settings
        prompt_key = call.prompt_key
        expected = self._auth_header if dialect.bearer else self._key
        if expected is not None:
            if not hmac.compare_digest(dialect.credential(request), expected):
                self._record(prompt_key, "auth_error")
                return dialect.auth_error(request)

        if call.parse_error is not None:
            self._record(None, "bad_request")
            return dialect.bad_request(_BadRequest(call.parse_error))
        if call.bad is not None:
            self._record(prompt_key, "bad_request")
            return dialect.bad_request(call.bad)

        data = call.data
        model = dialect.model(data, request)
        models = settings["models"]
        if models is not None:
            if model is None:
                self._record(prompt_key, "bad_request")
                return dialect.bad_request(_BadRequest("you must provide a model parameter", param="model"))
            if model not in models:
                self._record(prompt_key, "model_not_found")
                return dialect.model_not_found(model)
        if not isinstance(model, str):
            model = settings["default_model"]
        call.model = model
        try:
            call.n, call.max_tokens = dialect.options(data, request)
        except _BadRequest as exc:
            self._record(prompt_key, "bad_request")
            return dialect.bad_request(exc)

        # Directives ("[[...]]") only exist in targeted tests: cheap substring test first.
        directive_text = call.prompts[-1] if dialect.chat else prompt_key or ""
        if "[[" in directive_text:
            try:
                call.directives = _parse_directives(directive_text)
            except _BadRequest as exc:
                self._record(prompt_key, "bad_request")
                return dialect.bad_request(exc)
        return None

    async def _delay(self, directives: Mapping[str, Any], outcome: str) -> None:
        """Wait the latency, plus ``[[sleep=S]]`` and the chaos ``slow`` fault."""
        settings = self.settings
        delay = settings["latency"]
        if settings["latency_median"] is not None:
            delay = self._latency_rng.lognormvariate(
                math.log(settings["latency_median"]), settings["latency_sigma"]
            )
        delay += directives.get("sleep", 0.0)
        if outcome == "slow":
            delay += settings["chaos_slow_seconds"]
        if delay > 0:
            await asyncio.sleep(delay)

    def _error_answer(
        self,
        dialect: _OpenAIDialect,
        request: web.Request,
        outcome: str,
        status: int,
        retry_after: float | None,
        directives: Mapping[str, Any],
    ) -> web.Response:
        """The error answer a directive or chaos asked for (opens a window on a 429 with a wait)."""
        headers: dict[str, str] = {}
        if status == 429 and retry_after is not None:
            headers["retry-after"] = _format_seconds(retry_after)
            if outcome == "429_retry_after" and "retry_after" not in directives:
                # Chaos mode: also the OpenAI-style millisecond header.
                headers["retry-after-ms"] = str(int(retry_after * 1000))
        if "retry_after_ms" in directives:
            headers["retry-after-ms"] = str(int(directives["retry_after_ms"]))
        pause: float | None = None
        if status == 429 and headers:
            pause = retry_after
            if pause is None:
                pause = directives["retry_after_ms"] / 1000.0
            self._open_window(pause)
        if dialect.retry_in_body:
            headers = {}  # the wait travels in the error body instead
        if outcome == "context_length":
            return dialect.context_length()
        return dialect.error(status, headers or None, pause, request)

    async def _success_answer(
        self,
        dialect: _OpenAIDialect,
        request: web.Request,
        call: _Call,
        outcome: str,
        rate_headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        """A 200: the answer, or one of the faults that look like one (HTML, reset, truncated...)."""
        if outcome == "html":
            return web.Response(body=_HTML_PAGE, content_type="text/html", charset="utf-8")
        if outcome == "error_body":
            return dialect.error_body()

        self._next_id += 1
        payload = dialect.success(
            call.model, call.prompts, call.n, call.max_tokens, call.prompt_tokens, outcome, self._next_id
        )
        if isinstance(payload, web.StreamResponse):
            return payload
        if outcome == "ok" and isinstance(call.data, dict):
            self._answer_structured(dialect.name, call.data, payload)
        if outcome == "reset":
            return await _send_reset(request, _dumps(payload))
        if outcome == "truncated":
            return await _send_truncated(request, _dumps(payload))
        return _json_response(payload, headers=rate_headers)

    def _answer_structured(self, dialect: str, data: dict[str, Any], payload: dict[str, Any]) -> None:
        """With a schema in the request (each dialect's own field), answer JSON that matches it,
        derived from the first user prompt; with logprobs asked for, return them (-0.05 a word)."""
        schema, prompt = _structured_request(dialect, data)
        if schema is not None and prompt is not None:
            asks = self._schema_asks[prompt] = self._schema_asks.get(prompt, 0) + 1
            draw = zlib.crc32(f"{self.settings['seed']}|{prompt}".encode()) / 2**32
            broken_rate, violation_rate = (
                self.settings["schema_broken_rate"],
                self.settings["schema_violation_rate"],
            )
            answer: Any = conforming_answer(schema, prompt)
            text = json.dumps(answer)
            if asks == 1 and draw < broken_rate:
                text = text[: len(text) // 2]  # cut off mid-object: not valid JSON
            elif asks == 1 and draw < broken_rate + violation_rate:
                answer = violating_answer(schema, prompt)
                text = json.dumps(answer)
            _put_structured(dialect, payload, text, answer)
        wants_logprobs = data.get("logprobs") is True or (
            dialect == "gemini" and (data.get("generationConfig") or {}).get("responseLogprobs") is True
        )
        if wants_logprobs:
            _put_logprobs(dialect, payload)

    def _rate_limited(
        self, dialect: _OpenAIDialect, wait: float, headers: dict[str, str], request: web.Request
    ) -> web.Response:
        """The 429 of a request over a rate limit, telling the wait as the style and dialect do."""
        seconds = max(1, math.ceil(wait))  # Retry-After is whole seconds
        if self.settings["rate_limit_style"] == "headers" and dialect.name in ("openai", "azure"):
            headers = {**headers, "retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(seconds)}
            advertised = math.ceil(wait * 1000) / 1000
        else:
            headers = {**headers, "retry-after": str(seconds)}
            advertised = float(seconds)
        self._open_window(advertised)
        if dialect.retry_in_body:
            headers = {}  # Gemini: the wait travels in the error body instead
        return dialect.error(429, headers, advertised, request)

    def _decide(
        self, directives: Mapping[str, Any], prompt: str, attempt: int
    ) -> tuple[str, int, float | None]:
        """Return (outcome name, status, retry-after seconds or None)."""
        if directives:
            status = directives.get("status")
            fail_times = directives.get("fail_times")
            if fail_times is not None:
                if attempt < fail_times:
                    return _status_outcome(status or 500, directives)
                status = None  # recovered: answer normally from now on
            if status is not None and status >= 400:
                return _status_outcome(status, directives)
            if directives.get("context_length"):
                return "context_length", 400, None
            for flag in ("html", "content_filter", "error_body"):
                if directives.get(flag):
                    return flag, 200, None
            if fail_times is not None:
                return "ok", 200, None
        if self._chaos_table:
            fault = _chaos_fault(self._chaos_table, self.settings["seed"], prompt, attempt)
            if fault is not None:
                return _chaos_outcome(fault, self.settings["chaos_retry_after"])
        return "ok", 200, None
