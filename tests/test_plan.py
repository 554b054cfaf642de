"""df.genai.plan: counts before a run, a small real sample, cost, duration and warnings.

Every test talks to the fake server on loopback, which counts the requests it gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import ConfigurationError, create_client
from gen_ai_frames.plan import Plan, context_window_for
from gen_ai_frames.pricing import DEFAULT_PRICES

from .conftest import FAKE_KEY, FAST_RETRY

#: One dollar per token makes costs easy to reason about.
DOLLAR_A_TOKEN = {"m": (1_000_000.0, 1_000_000.0)}


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def sent(server: Any) -> int:
    return int(server.stats()["requests"])


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"q": [f"question number {i} here" for i in range(n)]})


# ------------------------------------------------------------------------------------ sending


def test_a_wrong_key_shows_in_the_sample_and_nothing_else_is_sent(tmp_path: Path) -> None:
    from gen_ai_frames.testing import FakeServer

    with FakeServer(api_key="the-right-key") as server:
        client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY, retry=FAST_RETRY)
        plan = frame(20).genai.plan(column="q", client=client, sample=5, max_concurrent=8,
                                    checkpoint=tmp_path / "run.ckpt")
        assert sent(server) == 1  # the probe alone: the other four sampled requests were never sent
        assert server.stats()["status_counts"] == {"401": 1}
    assert not plan.ok
    assert plan.fatal is not None and plan.fatal.startswith("AuthenticationError")
    assert plan.sample_sent == 1 and plan.sample_answers == 0
    assert plan.remaining_requests == 20
    text = str(plan)
    assert "STOPPED: AuthenticationError" in text and "nothing else was sent" in text
    assert FAKE_KEY not in text and FAKE_KEY not in plan._repr_html_()


def test_an_unknown_model_shows_in_the_sample() -> None:
    from gen_ai_frames.testing import FakeServer

    with FakeServer(models=["real-model"]) as server:
        client = create_client(endpoint=server.url, model_name="no-such-model", retry=FAST_RETRY)
        plan = frame(5).genai.plan(column="q", client=client)
        assert sent(server) == 1
    assert plan.fatal is not None and plan.fatal.startswith("NotFoundError")


def test_sample_zero_sends_nothing_at_all(fake_server: Any, client: Any, tmp_path: Path) -> None:
    df = pd.DataFrame({"q": ["a" * 40, "b" * 80, "a" * 40, None]})
    plan = df.genai.plan(column="q", client=client, sample=0, max_tokens=100, checkpoint=tmp_path / "c",
                         prices=DOLLAR_A_TOKEN)
    assert sent(fake_server) == 0
    assert not (tmp_path / "c").exists()  # a plan that sends nothing writes nothing either
    assert (plan.rows, plan.requests, plan.duplicate_rows, plan.invalid_rows) == (4, 2, 1, 1)
    # Without a sample the cost is the estimate's upper bound: every answer uses all of max_tokens.
    estimate = df.genai.estimate(column="q", model_name="m", max_tokens=100, prices=DOLLAR_A_TOKEN)
    assert plan.cost_is_upper_bound and plan.cost_usd == pytest.approx(estimate.max_cost_usd)
    assert plan.latency_s is None and plan.duration_s is None
    assert "sample=0" in str(plan) and "at most" in str(plan)


def test_bad_arguments_fail_before_any_request(fake_server: Any, client: Any) -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigurationError, match="sample"):
            frame(3).genai.plan(column="q", client=client, sample=bad)
    with pytest.raises(ConfigurationError, match="context_window"):
        frame(3).genai.plan(column="q", client=client, context_window=0)
    with pytest.raises(ConfigurationError, match="did you mean 'max_tokens'"):
        frame(3).genai.plan(column="q", client=client, max_token=5)
    with pytest.raises(ConfigurationError, match="max_cost needs the price"):
        frame(3).genai.plan(column="q", client=client, max_cost=1.0)
    with pytest.raises(ConfigurationError, match="exactly one of column"):
        frame(3).genai.plan(client=client)
    assert sent(fake_server) == 0


# ------------------------------------------------------------------------ counts and keeping


def test_dedupe_and_checkpoint_hits_are_counted(fake_server: Any, client: Any, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    pd.DataFrame({"q": ["a", "b", "[[status=400]] c"]}).genai.generate(
        column="q", client=client, checkpoint=checkpoint, progress=False
    )
    assert sent(fake_server) == 3
    df = pd.DataFrame({"q": ["a", "b", "[[status=400]] c", "d", "d", "e", None, "a", ""]})
    plan = df.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0)
    # a, b and the failed c are in the checkpoint; the second "a" is a new row (its own key), and
    # "d" twice is sent once.
    assert (plan.rows, plan.checkpoint_hits, plan.cache_hits) == (9, 3, 0)
    assert (plan.invalid_rows, plan.duplicate_rows, plan.requests) == (2, 1, 3)
    retry = df.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0, retry_errors=True)
    assert (retry.checkpoint_hits, retry.requests) == (2, 4)
    no_dedupe = df.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0, dedupe=False)
    assert (no_dedupe.duplicate_rows, no_dedupe.requests) == (0, 4)
    over = df.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0, resume=False)
    assert (over.checkpoint_hits, over.requests) == (0, 5)  # resume=False: the run starts over
    assert sent(fake_server) == 3
    assert "will pay for 3 requests of 9 rows" in str(plan)


def test_the_samples_answers_are_kept_and_not_sent_again(fake_server: Any, client: Any,
                                                         tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    df = pd.DataFrame({"q": ["p0", "p1", "p0", "p2", "p3", "p1", "p4"]})
    plan = df.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=2)
    assert plan.requests == 5 and plan.sample_sent == 2 and plan.sample_kept
    assert plan.remaining_requests == 3
    assert sent(fake_server) == 2
    out = df.genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    assert sent(fake_server) == 5  # the run sent only the three the plan had not
    assert fake_server.stats()["per_prompt"] == {f"p{i}": 1 for i in range(5)}
    assert out["response"].tolist() == [f"echo: {p}" for p in df["q"]]


def test_without_dedupe_the_sample_keeps_each_rows_rank(fake_server: Any, client: Any,
                                                       tmp_path: Path) -> None:
    # At temperature > 0 identical prompts are separate requests, told apart in the checkpoint by
    # their rank among identical prompts: the sampled second "a" must be stored as the second.
    checkpoint = tmp_path / "run.ckpt"
    pd.DataFrame({"q": ["a"]}).genai.generate(
        column="q", client=client, checkpoint=checkpoint, temperature=0.5, progress=False
    )
    df = pd.DataFrame({"q": ["a", "b", "a", "c", "a"]})
    plan = df.genai.plan(column="q", client=client, checkpoint=checkpoint, temperature=0.5, sample=2)
    assert (plan.checkpoint_hits, plan.requests, plan.sample_sent) == (1, 4, 2)
    assert sent(fake_server) == 1 + 2
    df.genai.generate(column="q", client=client, checkpoint=checkpoint, temperature=0.5, progress=False)
    assert sent(fake_server) == 5  # one request per row over the three calls, none twice
    assert fake_server.stats()["per_prompt"] == {"a": 3, "b": 1, "c": 1}


def test_a_plan_with_resume_false_leaves_the_checkpoint_alone(fake_server: Any, client: Any,
                                                             tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    frame(2).genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    plan = frame(4).genai.plan(column="q", client=client, checkpoint=checkpoint, resume=False, sample=1)
    assert plan.sample_sent == 1 and not plan.sample_kept and plan.remaining_requests == 4
    assert "not kept" in str(plan)
    resumed = frame(4).genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0)
    assert resumed.checkpoint_hits == 2  # the earlier answers are still there


# ---------------------------------------------------------------------- measures and figures


def test_the_sample_measures_tokens_latency_and_cost(fake_server: Any, client: Any) -> None:
    # Prompts of equal length: the cost of the rest is the sample's tokens per request times the rest.
    df = pd.DataFrame({"q": [f"word word word {i:03d}" for i in range(10)]})
    plan = df.genai.plan(column="q", client=client, sample=3, prices=DOLLAR_A_TOKEN)
    assert plan.sample_sent == 3 and plan.sample_answers == 3 and plan.sample_errors == {}
    assert plan.prompt_tokens == 4 and plan.completion_tokens == 5  # "echo: word word word 000"
    assert plan.latency_s is not None and plan.latency_s > 0
    assert plan.cut_share == 0
    assert not plan.cost_is_upper_bound
    # no checkpoint: the sample's answers are not kept, so the run pays for all 10 requests
    assert plan.remaining_requests == 10
    assert plan.cost_usd == pytest.approx(10 * (4 + 5))
    assert plan.sample_cost_usd == pytest.approx(3 * (4 + 5))
    # OpenAI has a Batch API at half the price
    assert plan.batch_cost_usd == pytest.approx(10 * (4 + 5) / 2) and "batch: $45" in str(plan)


def test_no_batch_price_for_a_provider_without_a_batch_api(fake_server: Any) -> None:
    client = create_client(provider="vllm", endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)
    plan = frame(4).genai.plan(column="q", client=client, sample=1, prices=DOLLAR_A_TOKEN)
    assert plan.cost_usd is not None
    assert plan.batch_cost_usd is None and "no batch price" in str(plan)


def test_the_cost_scales_each_prompts_estimate_by_what_the_sample_reported(fake_server: Any,
                                                                           client: Any) -> None:
    # The fake server counts a prompt's words as its tokens: "a b c d" is 4 tokens, estimated at 2
    # (7 characters), so every estimate is doubled; a prompt of 400 characters then counts 200.
    df = pd.DataFrame({"q": ["a b c d", "x" * 400]})
    plan = df.genai.plan(column="q", client=client, sample=1, prices=DOLLAR_A_TOKEN)
    assert plan.prompt_tokens == 4 and plan.completion_tokens == 5  # "echo: a b c d"
    # Both requests are left (no checkpoint keeps the sample): (2 * 2 + 5) + (100 * 2 + 5) tokens.
    assert plan.cost_usd == pytest.approx(9 + 205)


def test_rate_limits_learned_from_headers_and_the_duration(client: Any) -> None:
    from gen_ai_frames.testing import FakeServer

    with FakeServer(rate_limit_rpm=600, rate_limit_tpm=1_000_000) as server:
        client = create_client(endpoint=server.url, model_name="m", retry=FAST_RETRY)
        plan = frame(103).genai.plan(column="q", client=client, sample=3, max_concurrent=500)
    assert plan.rate_limits == {"requests": 600.0, "tokens": 1_000_000.0}
    # 100 requests left (no checkpoint: 103) at 10 a second is the binding limit here
    assert plan.duration_s == pytest.approx(103 / 10)
    assert "the provider's limit of 600 requests/min" in plan.duration_basis
    assert "600 requests/min" in str(plan)


def test_duration_under_given_limits_and_concurrency(fake_server: Any, client: Any) -> None:
    given = frame(10).genai.plan(column="q", client=client, sample=0, requests_per_minute=60)
    assert given.duration_s == pytest.approx(10.0) and "given limit of 60 requests/min" in str(given)
    unknown = frame(10).genai.plan(column="q", client=client, sample=0)
    assert unknown.duration_s is None and "unknown" in str(unknown)
    measured = frame(10).genai.plan(column="q", client=client, sample=2, max_concurrent=4)
    assert measured.latency_s is not None
    assert measured.duration_s == pytest.approx(10 / (4 / measured.latency_s))
    assert "max_concurrent=4" in measured.duration_basis


def test_text_and_html_forms_show_the_figures(fake_server: Any, client: Any) -> None:
    df = pd.DataFrame({"q": ["<b>bold</b> question", "second question", "second question", "third one"]})
    plan = df.genai.plan(column="q", client=client, sample=1, system_prompt="Be brief.",
                         prices=DOLLAR_A_TOKEN)
    assert isinstance(plan, Plan)
    text = str(plan)
    for figure in ("will pay for 3 requests of 4 rows", "rows: 4", "duplicates sent once (dedupe): 1",
                   "requests to send: 3", "<b>bold</b> question", "system: Be brief.",
                   f"latency: {plan.latency_s:.2f} s", "tokens per request:", "realtime: $"):
        assert figure in text
    page = plan._repr_html_()
    assert "will pay for 3 requests of 4 rows" in page and "&lt;b&gt;bold&lt;/b&gt; question" in page
    assert "<b>bold</b> question" not in page  # prompts are escaped, never rendered as HTML
    assert f"{plan.cost_usd:.3g}".rstrip("0") in text.replace(",", "")


def test_examples_are_three_distinct_prompts_cut_short(fake_server: Any, client: Any) -> None:
    df = pd.DataFrame({"q": ["a", "a", "b", "x" * 1000, "c"]})
    plan = df.genai.plan(column="q", client=client, sample=0)
    assert plan.examples == ["a", "b", "x" * 1000]
    assert "(1,000 characters)" in str(plan) and "x" * 1000 not in str(plan)


def test_async_twin(fake_server: Any, client: Any) -> None:
    import asyncio

    plan = asyncio.run(frame(4).genai.aplan(column="q", client=client, sample=1))
    assert plan.sample_sent == 1 and sent(fake_server) == 1


# ---------------------------------------------------------------------------------- warnings


def warned(plan: Plan, words: str) -> bool:
    return any(words in warning for warning in plan.warnings)


def test_a_clean_plan_has_no_warnings(fake_server: Any, client: Any) -> None:
    plan = frame(5).genai.plan(column="q", client=client, prices=DOLLAR_A_TOKEN)
    assert plan.warnings == [] and "warnings" not in str(plan)


def test_prompts_longer_than_the_context_window(fake_server: Any, client: Any) -> None:
    df = pd.DataFrame({"q": ["short one", "y" * 400]})  # 100 tokens, estimated
    plan = df.genai.plan(column="q", client=client, sample=0, context_window=150, max_tokens=64)
    assert warned(plan, "1 prompt(s) (rows 1) are longer than the model's context window of 150")
    fits = df.genai.plan(column="q", client=client, sample=0, context_window=200, max_tokens=64)
    assert not warned(fits, "context window")
    # Known models have their window built in.
    known = create_client(endpoint=fake_server.url, model_name="gpt-3.5-turbo", retry=FAST_RETRY)
    assert context_window_for("gpt-3.5-turbo") == 16_385
    long = pd.DataFrame({"q": ["z" * 70_000]}).genai.plan(column="q", client=known, sample=0)
    assert warned(long, "context window of 16,385")
    assert not warned(frame(3).genai.plan(column="q", client=known, sample=0), "context window")
    assert sent(fake_server) == 0


def test_many_answers_cut_by_max_tokens(fake_server: Any, client: Any) -> None:
    cut = frame(5).genai.plan(column="q", client=client, max_tokens=2)  # the echo has 5 words
    assert cut.cut_share == 1.0 and warned(cut, "cut by max_tokens=2")
    whole = frame(5).genai.plan(column="q", client=client, max_tokens=50)
    assert whole.cut_share == 0 and not warned(whole, "cut by max_tokens")


def test_all_prompts_identical(fake_server: Any, client: Any) -> None:
    same = pd.DataFrame({"t": ["x", "x", "x"]}).genai.plan(template="Summarize {t}", client=client, sample=0)
    assert warned(same, "all 3 prompts are identical")
    assert not warned(frame(3).genai.plan(column="q", client=client, sample=0), "identical")
    assert not warned(pd.DataFrame({"q": ["x"]}).genai.plan(column="q", client=client, sample=0), "identical")


def test_a_template_field_empty_in_many_rows(fake_server: Any, client: Any) -> None:
    df = pd.DataFrame({"title": [f"t{i}" for i in range(10)],
                       "body": ["text", "", None, "  ", "text", "text", "text", "text", "text", "text"]})
    plan = df.genai.plan(template="{title}: {body}", client=client, sample=0)
    assert warned(plan, "template field {body} is empty in 3 of 10 rows (30%)")
    assert not warned(plan, "{title}")
    full = df.assign(body="text").genai.plan(template="{title}: {body}", client=client, sample=0)
    assert not warned(full, "template field")


def test_unknown_price_and_a_budget_below_the_cost(fake_server: Any, client: Any) -> None:
    plan = frame(3).genai.plan(column="q", client=client, sample=0)
    assert plan.cost_usd is None and warned(plan, "no price known for model 'm'")
    assert "unknown: no price" in str(plan)
    nothing_left = pd.DataFrame({"q": [None]}).genai.plan(column="q", client=client, sample=0)
    assert nothing_left.warnings == []  # nothing to pay for: an unknown price does not matter
    low = frame(3).genai.plan(column="q", client=client, sample=0, prices=DOLLAR_A_TOKEN, max_cost=10)
    assert warned(low, "max_cost=$10 is below the estimated cost")
    high = frame(3).genai.plan(column="q", client=client, sample=0, prices=DOLLAR_A_TOKEN, max_cost=1e6)
    assert not warned(high, "max_cost")
    assert "gpt-4o-mini" in DEFAULT_PRICES


def test_a_column_generate_would_refuse(fake_server: Any, client: Any) -> None:
    df = frame(2).assign(response="old")
    assert warned(df.genai.plan(column="q", client=client, sample=0), "already has column(s) ['response']")
    assert not warned(df.genai.plan(column="q", client=client, sample=0, overwrite=True), "already has")


# ------------------------------------------------------------------------------------ the cache


def test_cache_hits_are_counted_and_the_samples_answers_are_kept_in_the_cache(
    client: Any, fake_server: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "answers.sqlite"
    frame(10).genai.generate(column="q", client=client, cache=cache, progress=False)
    assert sent(fake_server) == 10
    df = frame(16)  # the first 10 were answered by the run above

    plan = df.genai.plan(column="q", client=client, cache=cache, sample=0)
    assert sent(fake_server) == 10  # counting hits sends nothing
    assert plan.cache_hits == 10 and plan.remaining_requests == 6

    plan = df.genai.plan(column="q", client=client, cache=cache, sample=2)
    assert sent(fake_server) == 12 and plan.sample_kept  # no checkpoint: the cache keeps the sample
    assert plan.remaining_requests == 4
    out = df.genai.generate(column="q", client=client, cache=cache, progress=False)
    assert sent(fake_server) == 16  # only the 4 rows neither the first run nor the sample answered
    assert out["response"].tolist() == ["echo: " + q for q in df["q"]]
