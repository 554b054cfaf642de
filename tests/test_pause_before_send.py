"""A Retry-After pause holds every request not yet sent, including one that was waiting for a
concurrency slot when the 429 came (fake clock, no real sleeps)."""

from __future__ import annotations

import asyncio

import httpx

from gen_ai_frames.engine import Engine
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.providers.openai import OpenAIProvider
from gen_ai_frames.retry import RetryPolicy
from gen_ai_frames.transport import HttpxTransport

from .conftest import FAKE_KEY, chat_answer, last_user_message
from .test_ratelimit import VirtualTime


def test_a_request_waiting_for_a_slot_when_a_429_comes_waits_out_the_pause() -> None:
    time = VirtualTime()  # each sleep ends at its own time: a pause does not move the clock at once
    sent: list[tuple[float, str]] = []
    limited_once = False

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal limited_once
        prompt = last_user_message(request)
        sent.append((time.now, prompt))
        await asyncio.sleep(0)  # every request of the first round is in flight before any answer
        if prompt == "p0" and not limited_once:
            limited_once = True
            return httpx.Response(429, headers={"retry-after": "30"}, json={"error": {"message": "wait"}})
        return httpx.Response(200, json=chat_answer("ok"))

    async def main() -> list[object]:
        driver = asyncio.ensure_future(time.drive())
        provider = OpenAIProvider(api_key=FAKE_KEY, endpoint="http://127.0.0.1:9/v1", model_name="m")
        transport = HttpxTransport(transport=httpx.MockTransport(handler))
        # 9 workers and a slow-start window of 8: the ninth waits for a slot while the first 8 are sent.
        engine = Engine(provider, transport, max_concurrent=9, retry=RetryPolicy(jitter=0.0),
                        sleep=time.sleep, clock=time.clock)
        try:
            prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(9)]
            return await engine.run(prompts, GenerationParams())
        finally:
            await transport.aclose()
            driver.cancel()

    results = asyncio.run(main())
    assert [getattr(r, "text", None) for r in results] == ["ok"] * 9
    assert sorted(sent[:8]) == [(1000.0, f"p{i}") for i in range(8)]  # the first round, at once
    # p8 got its slot only after the 429 of p0 had paused the run: it is sent after the 30 s, as is
    # p0's retry; nothing is sent inside the window.
    assert sorted(sent[8:]) == [(1030.0, "p0"), (1030.0, "p8")], sent
