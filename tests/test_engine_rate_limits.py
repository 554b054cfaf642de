"""``Engine.rate_limits``: the per-minute limits the provider stated, read without private state.

The engine runs against the fake server on loopback, which states its limits in the usual
``x-ratelimit-*`` headers when asked to.
"""

from __future__ import annotations

import asyncio

from gen_ai_frames import create_client
from gen_ai_frames.params import GenerationParams
from gen_ai_frames.testing import FakeServer

from .conftest import FAST_RETRY

HI = [[{"role": "user", "content": "Hi"}]]


def limits_before_and_after(server: FakeServer) -> tuple[dict[str, float], dict[str, float], list[object]]:
    client = create_client(endpoint=server.url, model_name="m", retry=FAST_RETRY)

    async def go() -> tuple[dict[str, float], dict[str, float], list[object]]:
        async with client.engine(max_concurrent=2) as engine:
            before = engine.rate_limits
            results = await engine.run(HI * 3, GenerationParams(max_tokens=5))
            return before, engine.rate_limits, [r.text for r in results]

    return asyncio.run(go())


def test_rate_limits_are_those_the_headers_stated() -> None:
    with FakeServer(rate_limit_rpm=600, rate_limit_tpm=1_000_000) as server:
        before, after, texts = limits_before_and_after(server)
    assert before == {}  # nothing run yet
    assert texts == ["echo: Hi"] * 3
    assert after == {"requests": 600.0, "tokens": 1_000_000.0}


def test_rate_limits_are_empty_when_the_provider_states_none() -> None:
    with FakeServer() as server:
        before, after, texts = limits_before_and_after(server)
    assert texts == ["echo: Hi"] * 3
    assert before == after == {}


def test_rate_limits_is_a_copy() -> None:
    with FakeServer(rate_limit_rpm=600) as server:
        client = create_client(endpoint=server.url, model_name="m", retry=FAST_RETRY)

        async def go() -> dict[str, float]:
            async with client.engine() as engine:
                await engine.run(HI, GenerationParams(max_tokens=5))
                engine.rate_limits.clear()
                engine.rate_limits["requests"] = 1.0
                return engine.rate_limits

        assert asyncio.run(go())["requests"] == 600.0
