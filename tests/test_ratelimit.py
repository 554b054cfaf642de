"""Back-pressure: rate limiter, adaptive concurrency, run-wide pauses (fake clock, no real sleeps)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import httpx
import pytest

from gen_ai_frames import ConfigurationError
from gen_ai_frames.engine import Engine
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers.openai import OpenAIProvider
from gen_ai_frames.ratelimit import AdaptiveConcurrency, RateLimiter, parse_duration, ratelimit_wait
from gen_ai_frames.retry import RetryPolicy
from gen_ai_frames.transport import HttpxTransport

from .conftest import FAKE_KEY, chat_answer, last_user_message


def test_requests_are_spaced_evenly() -> None:
    limiter = RateLimiter(requests_per_minute=120)
    waits = [limiter.reserve(0, now=10.0) for _ in range(4)]
    assert waits == [0.0, 0.5, 1.0, 1.5]
    assert limiter.reserve(0, now=20.0) == 0.0  # idle time is not banked into a burst


def test_token_budget_refills_and_is_corrected_by_usage() -> None:
    limiter = RateLimiter(tokens_per_minute=600, clock=lambda: 0.0)  # 10 tokens per second
    assert limiter.reserve(500, now=0.0) == 0.0
    assert limiter.reserve(200, now=0.0) == pytest.approx(10.0)  # 100 tokens short
    limiter.correct(estimated=500, actual=100)  # the first request used far less than estimated
    assert limiter.reserve(100, now=0.0) == 0.0


def test_a_request_larger_than_the_budget_waits_for_a_full_bucket() -> None:
    limiter = RateLimiter(tokens_per_minute=60, clock=lambda: 0.0)
    assert limiter.reserve(1000, now=0.0) == 0.0
    assert limiter.reserve(1000, now=0.0) == pytest.approx(60.0)


@pytest.mark.parametrize("value", [0, -5, "10", True])
def test_bad_rate_limits_are_rejected(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="requests_per_minute"):
        RateLimiter(requests_per_minute=value)


def test_concurrency_halves_per_burst_and_grows_back_slowly() -> None:
    now = [0.0]
    limit = AdaptiveConcurrency(16, clock=lambda: now[0])
    for _ in range(10):  # ten 429s in one burst: one cut
        limit.on_rate_limited()
    assert limit.limit == 8
    now[0] = 5.0
    limit.on_rate_limited()
    assert limit.limit == 4
    for _ in range(4):
        limit.on_success()
    assert limit.limit == 5  # +1 after a window of `limit` successes
    for _ in range(1000):
        limit.on_success()
    assert limit.limit == 16  # never above the maximum


def test_concurrency_never_drops_below_one() -> None:
    now = [0.0]
    limit = AdaptiveConcurrency(2, clock=lambda: now[0])
    for step in range(5):
        now[0] = step * 10.0
        limit.on_rate_limited()
    assert limit.limit == 1


@pytest.mark.parametrize(
    ("text", "seconds"), [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m", 3720.0), ("2.5", 2.5),
                          ("1.5s", 1.5), ("", None), ("abc", None), ("5x", None)])
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_ratelimit_headers() -> None:
    assert ratelimit_wait({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}) == 360.0
    assert ratelimit_wait({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20ms",
                           "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2s"}) == 2.0
    assert ratelimit_wait({"x-ratelimit-remaining-requests": "3"}) is None
    assert ratelimit_wait({}) is None


class FakeTime:
    """A clock that only moves when the engine sleeps: tests see exact waits instantly."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def run(handler: Callable[[httpx.Request], Any], prompts: list[str], time: FakeTime, **options: Any) -> list[Any]:
    async def main() -> list[Any]:
        provider = OpenAIProvider(api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1", model_name="m")
        transport = HttpxTransport(transport=httpx.MockTransport(handler))
        options.setdefault("retry", RetryPolicy(jitter=0.0))
        engine = Engine(provider, transport, sleep=time.sleep, clock=time.clock, **options)
        try:
            return await engine.run([[{"role": "user", "content": p}] for p in prompts], GenerationParams())
        finally:
            await transport.aclose()

    return asyncio.run(main())


def test_a_429_pauses_every_request_of_the_run() -> None:
    time = FakeTime()
    sent_at: list[tuple[float, str]] = []
    limited_once = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal limited_once
        sent_at.append((time.now, last_user_message(request)))
        await asyncio.sleep(0)  # let other workers run between requests
        if not limited_once:
            limited_once = True
            return httpx.Response(429, headers={"retry-after": "30"}, json={"error": {"message": "wait"}})
        return httpx.Response(200, json=chat_answer("ok"))

    statuses: list[str | None] = []
    results = run(handler, [f"p{i}" for i in range(20)], time, max_concurrent=4, on_status=statuses.append)
    assert all(r.text == "ok" for r in results)
    first_429_at = sent_at[0][0]
    # Workers that had already sent may finish, but nothing new starts inside the 30 s window.
    later = [t for t, _ in sent_at[4:]]
    assert later and all(t >= first_429_at + 30 for t in later)
    assert statuses[0] == "rate limited, waiting 30 s" and statuses[-1] is None


def test_exhausted_ratelimit_headers_pause_the_run() -> None:
    time = FakeTime()
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.now)
        headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"} if len(sent_at) == 1 else {}
        return httpx.Response(200, headers=headers, json=chat_answer("ok"))

    run(handler, ["a", "b", "c"], time, max_concurrent=1)
    assert sent_at[1] - sent_at[0] >= 2.0


def test_requests_per_minute_spaces_the_run() -> None:
    time = FakeTime()
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.now)
        return httpx.Response(200, json=chat_answer("ok"))

    run(handler, [f"p{i}" for i in range(6)], time, max_concurrent=3, requests_per_minute=60)
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert sent_at[-1] - sent_at[0] >= 5.0 and all(g >= 0 for g in gaps)


def test_bursts_of_429_cut_the_concurrency() -> None:
    time = FakeTime()
    in_flight = peak_after_cut = 0
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak_after_cut, calls
        calls += 1
        in_flight += 1
        if 8 < calls <= 16:  # right after the burst, before successes grow the limit back
            peak_after_cut = max(peak_after_cut, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        if calls <= 8:  # plain 429s without Retry-After: only the concurrency limit reacts
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=chat_answer("ok"))

    results = run(handler, [f"p{i}" for i in range(40)], time, max_concurrent=8)
    assert all(r.text == "ok" for r in results)
    assert 1 <= peak_after_cut <= 4


def test_client_and_call_rate_limits(mock_client: Any) -> None:
    client = mock_client(lambda r: httpx.Response(200, json=chat_answer("ok")), requests_per_minute=6000)
    assert client.requests_per_minute == 6000
    assert client.generate_batch_response(["a", "b"], tokens_per_minute=10**6) == ["ok", "ok"]
    with pytest.raises(ConfigurationError, match="tokens_per_minute"):
        client.generate_batch_response(["a"], tokens_per_minute=-1)
