"""Back-pressure: rate limiter, adaptive concurrency, run-wide pauses (fake clock, no real sleeps)."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any, Callable

import httpx
import pytest

from gen_ai_frames import ConfigurationError
from gen_ai_frames.engine import Engine
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers.openai import OpenAIProvider
from gen_ai_frames.ratelimit import Pace, RateLimiter, parse_duration, ratelimit_wait, stated_limits
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


def test_slow_start_opens_the_concurrency_one_slot_per_answer() -> None:
    pace = Pace(64, clock=lambda: 0.0)
    assert pace.window == Pace.INITIAL_WINDOW
    for _ in range(8):
        pace.on_answer()
    assert pace.window == 16  # doubles per round of answers, as TCP's slow start
    for _ in range(1000):
        pace.on_answer()
    assert pace.window == 64  # never above max_concurrent
    assert Pace(64, clock=lambda: 0.0, slow_start=False).window == 64


def test_a_429_before_any_answer_halves_the_concurrency_once_per_round() -> None:
    pace = Pace(8, clock=lambda: 5.0)
    pace.in_flight = 8
    for _ in range(8):  # eight 429s of requests sent in the same round: one cut
        pace.on_rate_limited(sent_at=5.0)
    assert pace.window == 4 and pace.rate is None


def test_a_429_after_answers_sets_a_rate_that_429s_cut_and_answers_raise() -> None:
    now = [0.0]
    pace = Pace(64, clock=lambda: now[0])
    for i in range(20):  # 20 answers over 2 s: 10 answers a second
        now[0] = 0.1 * (i + 1)
        pace.on_answer()
    pace.on_rate_limited(sent_at=1.9)
    assert pace.rate == pytest.approx(9.0)  # the rate answers came back at, a little less
    assert pace.window == 64  # from now on the rate, not the concurrency, paces the run
    assert pace.status == "rate limited: 9.0 req/s"
    pace.on_rate_limited(sent_at=1.95)  # sent before the cut: says nothing new
    assert pace.rate == pytest.approx(9.0)
    now[0] = 3.0
    pace.on_rate_limited(sent_at=2.5)
    assert pace.rate == pytest.approx(9.0 * Pace.DECREASE)
    waits = [pace.reserve({"requests": 1}, now=3.0) for _ in range(3)]
    # Spaced to the rate, from one slot after the refused request's.
    assert waits == pytest.approx([1 / 7.2, 2 / 7.2, 3 / 7.2])
    for _ in range(100):  # answers while the pace binds: it creeps back up
        pace.reserve({"requests": 1}, now=3.0)
        pace.on_answer(now=3.0)
    assert 7.2 < pace.rate < 7.2 * 1.5
    rate, now[0] = pace.rate, 4.0
    pace.on_rate_limited(sent_at=3.5)  # one 429 among many answers: noise, not the limit
    assert pace.rate == rate
    pace.on_rate_limited(sent_at=3.6)  # the second within the last ten outcomes: still noise
    assert pace.rate == rate
    pace.on_rate_limited(sent_at=3.7)  # the third: too fast, but never below what the server served:
    assert pace.rate == pytest.approx(120 / 4 * 0.95)  # 120 answers in the last 4 s, less 5 %


def test_stated_limits_pace_requests_and_tokens() -> None:
    pace = Pace(64, clock=lambda: 0.0)
    assert pace.learn({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
                       "x-ratelimit-reset-requests": "250ms",
                       "x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "5000"}, now=0.0) \
        == (0.25, "x-ratelimit-reset-requests")  # a used-up budget: wait for its reset
    # 10 requests and 100 tokens a second; half the stated token burst (5000 / 2) may go early.
    costs = {"requests": 1, "tokens": 1000}
    waits = [pace.reserve(costs, now=0.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 5.0, 15.0])  # tokens bind from the 4th on
    assert pace.status == "rate limited: 10.0 req/s, 100 tokens/s"


def test_anthropic_headers_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gen_ai_frames.ratelimit.time.time", lambda: 1_700_000_000.0)  # 2023-11-14T22:13:20Z
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
               "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:32Z",
               "anthropic-ratelimit-input-tokens-limit": "40000",
               "anthropic-ratelimit-input-tokens-remaining": "39000",
               "anthropic-ratelimit-input-tokens-reset": "2023-11-14T22:13:21.500+00:00",
               "anthropic-ratelimit-output-tokens-limit": "8000"}
    assert sorted(stated_limits(headers)) == [
        ("input-tokens", 40000.0, 39000.0, 1.5, "anthropic-ratelimit-input-tokens-reset"),
        ("output-tokens", 8000.0, None, None, "anthropic-ratelimit-output-tokens-reset"),
        ("requests", 50.0, 0.0, 12.0, "anthropic-ratelimit-requests-reset"),
    ]
    pace = Pace(8, clock=lambda: 0.0)
    assert pace.learn(headers) == (12.0, "anthropic-ratelimit-requests-reset")
    assert set(pace.budgets) == {"requests", "input-tokens", "output-tokens"}
    assert ratelimit_wait(headers) == 12.0
    assert list(stated_limits({"anthropic-ratelimit-requests-remaining": "3",
                               "anthropic-ratelimit-requests-reset": "not a time"})) == [
        ("requests", None, 3.0, None, "anthropic-ratelimit-requests-reset")]


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


class VirtualTime(FakeTime):
    """A simulated clock for concurrent sleepers: each sleep ends at its own wake-up time; when
    every task is idle the clock jumps to the earliest wake-up (FakeTime adds sleeps up instead)."""

    def __init__(self) -> None:
        super().__init__()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, id(future), future))
        await future

    async def drive(self) -> None:
        while True:
            for _ in range(20):  # let every runnable task run before time moves on
                await asyncio.sleep(0)
            if self._sleepers:
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                future.set_result(None)


def run(handler: Callable[[httpx.Request], Any], prompts: list[str], time: FakeTime, **options: Any) -> list[Any]:
    async def main() -> list[Any]:
        driver = asyncio.ensure_future(time.drive()) if isinstance(time, VirtualTime) else None
        provider = OpenAIProvider(api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1", model_name="m")
        transport = HttpxTransport(transport=httpx.MockTransport(handler))
        options.setdefault("retry", RetryPolicy(jitter=0.0))
        params = options.pop("params", GenerationParams())
        try:
            engine = Engine(provider, transport, sleep=time.sleep, clock=time.clock, **options)
            return await engine.run([[{"role": "user", "content": p}] for p in prompts], params)
        finally:
            await transport.aclose()
            if driver is not None:
                driver.cancel()

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


def test_a_burst_of_429_before_any_answer_halves_the_concurrency() -> None:
    time = FakeTime()
    in_flight = peak_after_cut = 0
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak_after_cut, calls
        calls += 1
        in_flight += 1
        if 8 < calls <= 12:  # the first window after the burst, before answers grow the limit back
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


# The engine against scripted servers, on the fake clock -------------------------------------------


def stated(limit: int, remaining: int, reset: str = "1s") -> dict[str, str]:
    return {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": reset}


def test_stated_limits_space_the_whole_run_without_any_429() -> None:
    time = VirtualTime()
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.now)
        return httpx.Response(200, headers=stated(60, 1), json=chat_answer("ok"))

    statuses: list[str | None] = []
    results = run(handler, [f"p{i}" for i in range(30)], time, max_concurrent=16, on_status=statuses.append)
    assert all(r.text == "ok" for r in results)
    # After the first round (slow start: 8), requests start one a second, as 60 a minute says.
    later = sent_at[8:]
    assert later[-1] - later[0] >= len(later) - 2
    assert "rate limited: 1.0 req/s" in statuses and statuses[-1] is None


def test_without_headers_429s_slow_the_rate_and_rows_only_wait() -> None:
    time = VirtualTime()
    sent_at: list[float] = []
    rate = 2.0  # the server admits 2 requests a second, and says nothing about it
    next_free = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.now)
        if time.now < next_free[0]:
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        next_free[0] = time.now + 1 / rate
        return httpx.Response(200, json=chat_answer("ok"))

    statuses: list[str | None] = []
    results = run(handler, [f"p{i}" for i in range(60)], time, max_concurrent=16, on_status=statuses.append,
                  retry=RetryPolicy(max_retries=0, jitter=0.0))
    # max_retries=0, yet every row got its answer: waiting for a rate limit is not a failure.
    assert all(r.text == "ok" for r in results)
    assert any(r.attempts > 1 for r in results)
    assert any(s and s.startswith("rate limited: ") and s.endswith(" req/s") for s in statuses)
    limited = len(sent_at) - 60
    assert limited <= 15, limited  # the pace learned from the first 429s keeps most requests clear
    assert sent_at[-1] - sent_at[0] <= 1.3 * 59 / rate  # and stays close to what the server admits


def test_rows_wait_rate_limits_out_without_using_max_retries() -> None:
    time = VirtualTime()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 6:
            return httpx.Response(429, headers={"retry-after": "2"}, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=chat_answer("ok"))

    (result,) = run(handler, ["a"], time, retry=RetryPolicy(max_retries=1, jitter=0.0))
    assert result.text == "ok" and result.attempts == 7
    assert time.slept == [2.0] * 6


def test_a_run_rate_limited_without_any_answer_fails_after_rate_limit_timeout() -> None:
    time = VirtualTime()
    start = time.now

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": "30"}, json={"error": {"message": "quota"}})

    results = run(handler, [f"p{i}" for i in range(20)], time, max_concurrent=4, rate_limit_timeout=300)
    errors = [r.error for r in results]
    assert all(e is not None and e.type == "RateLimitError" for e in errors)
    assert all("requests_per_minute" in e.suggestion and "rate_limit_timeout" in e.suggestion for e in errors)
    assert "rate limited for 3" in errors[0].message and "without a single answer" in errors[0].message
    assert any(not e.sent for e in errors)  # rows never sent stay unsent: a resume sends them
    assert 300 < time.now - start < 400


def test_an_answer_restarts_the_rate_limit_budget() -> None:
    time = VirtualTime()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls % 5 == 0:  # an answer every 5th request, 4 x 30 s apart: 150 s between answers
            return httpx.Response(200, json=chat_answer("ok"))
        return httpx.Response(429, headers={"retry-after": "30"}, json={"error": {"message": "quota"}})

    results = run(handler, [f"p{i}" for i in range(4)], time, max_concurrent=1, rate_limit_timeout=200)
    assert all(r.text == "ok" for r in results)


@pytest.mark.parametrize("answer", ["200 with reset header", "429 with Retry-After"])
def test_a_wait_above_the_cap_stops_the_run_with_a_message(answer: str) -> None:
    time = VirtualTime()
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(last_user_message(request))
        if answer.startswith("200"):
            return httpx.Response(200, headers=stated(10000, 0, "86400s"), json=chat_answer("ok"))
        return httpx.Response(429, headers={"retry-after": "86400"},
                              json={"error": {"message": "daily quota"}})

    results = run(handler, [f"p{i}" for i in range(10)], time, max_concurrent=1,
                  retry=RetryPolicy(max_retry_after=120, jitter=0.0))
    assert len(sent) == 1 and max(time.slept, default=0) < 120  # no day-long pause, nothing more sent
    unsent = [r.error for r in results[1:]]
    assert all(e is not None and e.type == "RateLimitError" and not e.sent for e in unsent)
    assert all("86400 s" in e.message and "max_retry_after=120" in e.message for e in unsent)
    assert "max_retry_after" in unsent[0].suggestion
    if answer.startswith("200"):
        assert results[0].text == "ok"
    else:
        assert results[0].error.type == "RateLimitError" and results[0].error.sent
        assert "86400 s" in results[0].error.message


def test_a_row_refused_again_and_again_while_others_pass_fails_alone() -> None:
    time = VirtualTime()

    def handler(request: httpx.Request) -> httpx.Response:
        if last_user_message(request) == "huge":
            return httpx.Response(429, json={"error": {"message": "Request too large for tokens per min"}})
        return httpx.Response(200, json=chat_answer("ok"))

    results = run(handler, ["huge"] + [f"p{i}" for i in range(40)], time, max_concurrent=2)
    assert all(r.text == "ok" for r in results[1:])
    error = results[0].error
    assert error is not None and error.type == "RateLimitError"
    assert "while other requests got answers" in error.message
    assert error.attempts > Engine.MAX_RATE_LIMITED_WHILE_OTHERS_PASS


def test_a_retry_after_date_in_the_past_means_normal_backoff() -> None:
    time = VirtualTime()
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(429, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"},
                                  json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=chat_answer("ok"))

    (result,) = run(handler, ["a"], time)
    assert result.text == "ok" and time.slept == [0.5]  # the first backoff step, not a retry at once


def test_learned_token_limit_paces_by_prompt_length() -> None:
    time = VirtualTime()
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.now)
        return httpx.Response(200, headers={"x-ratelimit-limit-tokens": "6000",
                                            "x-ratelimit-remaining-tokens": "0",
                                            "x-ratelimit-reset-tokens": "10ms"}, json=chat_answer("ok"))

    prompt = "x" * 396  # 99 tokens + max_tokens 1 = 100 tokens a request; 6000 a minute = 1 a second
    results = run(handler, [prompt] * 12, time, max_concurrent=4, params=GenerationParams(max_tokens=1))
    assert all(r.text == "ok" for r in results)
    assert sent_at[-1] - sent_at[0] >= 12 - 4 - 1


def test_rate_limit_timeout_is_validated() -> None:
    for bad in (0, -1, "600", True):
        with pytest.raises(ConfigurationError, match="rate_limit_timeout"):
            run(lambda r: httpx.Response(200, json=chat_answer("ok")), ["a"], FakeTime(),
                rate_limit_timeout=bad)
