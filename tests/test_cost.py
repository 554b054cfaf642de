"""Usage and cost: estimates before a run, a spend budget during it, tokens kept for every row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from gen_ai_frames import ConfigurationError, create_client
from gen_ai_frames.checkpoint import read_checkpoint
from gen_ai_frames.pricing import DEFAULT_PRICES, price_for

from .conftest import FAST_RETRY

#: One dollar per token makes spend easy to reason about in tests.
DOLLAR_A_TOKEN = {"m": (1_000_000.0, 1_000_000.0)}


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def test_estimate_counts_requests_tokens_and_cost() -> None:
    df = pd.DataFrame({"q": ["a" * 40, "b" * 80, "a" * 40, None]})
    estimate = df.genai.estimate(column="q", model_name="gpt-4o-mini", max_tokens=100)
    assert (estimate.rows, estimate.requests) == (4, 2)  # dedupe at temperature 0, the None row is not sent
    assert estimate.prompt_tokens == 10 + 20
    assert estimate.max_completion_tokens == 200
    input_price, output_price = DEFAULT_PRICES["gpt-4o-mini"]
    assert estimate.max_cost_usd == pytest.approx((30 * input_price + 200 * output_price) / 1e6)
    assert "2 requests" in str(estimate) and "at most $" in str(estimate)
    sampled = df.genai.estimate(column="q", model_name="gpt-4o-mini", temperature=0.9)
    assert sampled.requests == 3


def test_estimate_with_a_template_system_prompt_and_own_prices() -> None:
    df = pd.DataFrame({"name": ["Ann", "Bo"]})
    estimate = df.genai.estimate(template="Hello {name}!", model_name="house-model", system_prompt="x" * 8,
                                 max_tokens=1, prices={"house-model": (2.0, 4.0)})
    assert estimate.prompt_tokens == (3 + 2) + (3 + 2)  # "Hello Ann!" is 10 chars -> 3 tokens, system 2
    assert estimate.max_cost_usd == pytest.approx((10 * 2.0 + 2 * 4.0) / 1e6)


def test_unknown_price_is_said_not_guessed() -> None:
    estimate = pd.DataFrame({"q": ["hi"]}).genai.estimate(column="q", model_name="mystery-1")
    assert estimate.max_cost_usd is None and "unknown price" in str(estimate)
    with pytest.raises(ConfigurationError, match="model_name"):
        pd.DataFrame({"q": ["hi"]}).genai.estimate(column="q")
    with pytest.raises(ConfigurationError, match=r"prices\['x'\]"):
        price_for("x", {"x": (1.0,)})  # type: ignore[dict-item]


def test_local_models_cost_nothing() -> None:
    assert price_for("SmolLM2-135M-Instruct.Q4_1.gguf", provider="local") == (0.0, 0.0)


def test_usage_is_kept_for_every_row_in_details_and_checkpoint(client: Any, tmp_path: Path) -> None:
    df = pd.DataFrame({"prompt": ["one two three", "four five"]})
    out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", details=True,
                            progress=False)
    assert out["prompt_tokens"].tolist() == [3, 2]  # the fake server counts words
    assert out["completion_tokens"].tolist() == [4, 3]
    assert out["finish_reason"].tolist() == ["stop", "stop"]
    stored = read_checkpoint(tmp_path / "c")
    assert stored["prompt_tokens"].tolist() == [3, 2] and stored["completion_tokens"].tolist() == [4, 3]


def test_max_cost_stops_the_run_cleanly_and_a_resume_continues(client: Any, fake_server: Any,
                                                                tmp_path: Path) -> None:
    df = pd.DataFrame({"prompt": [f"question {i}" for i in range(40)]})
    # Each row costs 2 prompt + 3 completion tokens = $5 here: a $20 budget buys 4 rows.
    out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", max_cost=20,
                            prices=DOLLAR_A_TOKEN, max_concurrent=1, details=True, progress=False)
    answered = out["response"].notna()
    done = int(answered.sum())
    # The budget is hit on the 4th answer; a request already in flight may still finish (and is kept).
    assert 4 <= done <= 4 + 1 and answered.tolist()[:done] == [True] * done
    unsent = out[~answered]
    assert set(unsent["error_type"]) == {"NotSentError"}
    assert "max_cost=$20" in unsent["error"].iloc[0] and "higher max_cost" in unsent["error_suggestion"].iloc[0]
    assert fake_server.stats()["requests"] == done
    fake_server.reset()
    again = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", prices=DOLLAR_A_TOKEN,
                              progress=False)
    assert fake_server.stats()["requests"] == 40 - done  # only the rows the budget left unsent
    assert again["response"].tolist() == ["echo: " + p for p in df["prompt"]]


def test_max_cost_needs_a_price(client: Any, fake_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_cost needs the price of model 'm'"):
        pd.DataFrame({"prompt": ["a"]}).genai.generate(column="prompt", client=client, max_cost=1, progress=False)
    with pytest.raises(ConfigurationError, match="max_cost must be"):
        pd.DataFrame({"prompt": ["a"]}).genai.generate(column="prompt", client=client, max_cost=-1,
                                                       prices=DOLLAR_A_TOKEN, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_progress_bar_shows_tokens_and_spend(client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pd.DataFrame({"prompt": ["one two", "three four"]}).genai.generate(
        column="prompt", client=client, prices={"m": (1.0, 1.0)}, progress=True)
    err = capsys.readouterr().err
    assert "tokens=10" in err and "spend=$0.0000" in err


def test_estimate_counts_the_schema_with_every_request() -> None:
    import pandas as pd

    from gen_ai_frames.pricing import estimate_tokens
    from gen_ai_frames.schema import Schema

    df = pd.DataFrame({"prompt": ["What is 2 + 2?", "Name a colour."]})
    plain = df.genai.estimate(column="prompt", model_name="gpt-4o-mini")
    schema = "name, age int, mood happy|sad"
    typed = df.genai.estimate(column="prompt", model_name="gpt-4o-mini", schema=schema)
    assert typed.prompt_tokens - plain.prompt_tokens == 2 * estimate_tokens(Schema.parse(schema).canonical())
