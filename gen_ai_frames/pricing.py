"""Token prices, token estimates and spend: what a run will cost before it starts, and what it
has cost so far.

Prices are US dollars per million tokens, ``(input, output)``. The built-in table is a snapshot of
public list prices and goes stale: pass ``prices={"my-model": (0.15, 0.60)}`` to override or extend
it. A model matches its own entry or the longest entry its name starts with
(``gpt-4o-mini-2024-07-18`` uses ``gpt-4o-mini``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigurationError, NotSentError

__all__ = [
    "BATCH_PRICES",
    "DEFAULT_PRICES",
    "Budget",
    "Estimate",
    "Spend",
    "batch_price_for",
    "budget_spent",
    "check_prices",
    "estimate_tokens",
    "price_for",
]

#: USD per million tokens (input, output), list prices as published by the vendors in 2025.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    "gemini-2.0-flash": (0.10, 0.40),
    "gemini-1.5-flash": (0.075, 0.30),
    "gemini-1.5-pro": (1.25, 5.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-pro": (1.25, 10.00),
    "mistral-small": (0.20, 0.60),
    "mistral-large": (2.00, 6.00),
    "deepseek-chat": (0.27, 1.10),
}

#: The share of the realtime price that the vendors' Batch APIs charge: "50% cost discount"
#: (OpenAI, https://platform.openai.com/docs/guides/batch; Azure global batch,
#: https://learn.microsoft.com/azure/ai-services/openai/how-to/batch), "50% of standard API prices"
#: (Anthropic, https://docs.anthropic.com/en/docs/build-with-claude/batch-processing#pricing),
#: "50% of the standard cost" (Gemini, https://ai.google.dev/gemini-api/docs/batch-mode).
BATCH_DISCOUNT = 0.5

#: USD per million tokens (input, output) in batch mode, a column beside :data:`DEFAULT_PRICES`.
BATCH_PRICES: dict[str, tuple[float, float]] = {
    model: (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
    for model, price in DEFAULT_PRICES.items()
    if not model.startswith(("mistral", "deepseek"))  # no batch API that gen-ai-frames supports
}


def batch_price_for(
    model: str, prices: Mapping[str, tuple[float, float]] | None = None, provider: str | None = None
) -> tuple[float, float] | None:
    """The batch-mode price of ``model``: half the realtime one, whether from the built-in table or
    from ``prices`` (which give realtime prices, as everywhere else).

    >>> batch_price_for("gpt-4o-mini")
    (0.075, 0.3)
    >>> batch_price_for("my-model", {"my-model": (1.0, 2.0)})
    (0.5, 1.0)
    """
    check_prices(prices)
    if prices and any(model.startswith(name) for name in prices):  # the user's realtime price
        price = price_for(model, prices, provider)
        return None if price is None else (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
    matches = [name for name in BATCH_PRICES if model.startswith(name)]
    return BATCH_PRICES[max(matches, key=len)] if matches else None


#: Characters per token of English text for BPE tokenizers: the estimate used without a tokenizer.
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text`` (about 4 characters a token, at least 1).

    >>> estimate_tokens("What is the capital of France?")
    8
    """
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def check_prices(prices: object, name: str = "prices") -> None:
    """``prices`` must be None or ``{model: (input, output)}``, two numbers >= 0 in USD per million tokens.

    >>> check_prices({"m": (0.15,)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: prices['m'] must be (input, output) USD per million tokens, ...
    """
    if prices is None:
        return
    if not isinstance(prices, Mapping):
        raise ConfigurationError(
            f"{name} must be a dict {{model: (input, output)}} in USD per million tokens, "
            f"got {type(prices).__name__}"
        )
    for model, price in prices.items():
        ok = (
            isinstance(price, (tuple, list))
            and len(price) == 2
            and all(not isinstance(p, bool) and isinstance(p, (int, float)) and p >= 0 for p in price)
        )
        if not isinstance(model, str) or not ok:
            raise ConfigurationError(
                f"{name}[{model!r}] must be (input, output) USD per million tokens, two numbers >= 0 "
                f"(e.g. (0.15, 0.60)), got {price!r}"
            )


def price_for(
    model: str, prices: Mapping[str, tuple[float, float]] | None = None, provider: str | None = None
) -> tuple[float, float] | None:
    """The ``(input, output)`` USD price per million tokens of ``model``, or None when unknown.

    >>> price_for("gpt-4o-mini-2024-07-18")
    (0.15, 0.6)
    >>> price_for("my-model", {"my-model": (1.0, 2.0)})
    (1.0, 2.0)
    >>> price_for("anything", provider="local")
    (0.0, 0.0)
    """
    table = {**DEFAULT_PRICES, **(prices or {})}
    check_prices(prices)
    if model in table:
        return tuple(table[model])  # type: ignore[return-value]
    if provider in ("local", "ollama", "lmstudio"):
        return (0.0, 0.0)  # runs on your own machine
    matches = [name for name in table if model.startswith(name)]
    if matches:
        return tuple(table[max(matches, key=len)])  # type: ignore[return-value]
    return None


@dataclass
class Spend:
    """Tokens and dollars spent so far by a run."""

    price: tuple[float, float] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def usd(self) -> float | None:
        if self.price is None:
            return None
        return (self.prompt_tokens * self.price[0] + self.completion_tokens * self.price[1]) / 1e6


class Budget:
    """A run's spend and its ``max_cost``: checked before the run (is the model's price known?) and
    after every answer (is the budget spent?).

    >>> budget = Budget(price=(1.0, 2.0), max_cost=0.001, model="m")
    >>> budget.charge(500, 100), budget.exhausted
    (None, False)
    >>> budget.charge(300, 100).message
    'not sent: the run reached max_cost=$0.001 ($0.0012 spent on 1,000 tokens)'
    """

    def __init__(self, price: tuple[float, float] | None, max_cost: float | None, model: str) -> None:
        if max_cost is not None and price is None:
            raise ConfigurationError(
                f"max_cost needs the price of model {model!r}, which is not in the price table: "
                "pass prices={model_name: (input, output)} in USD per million tokens"
            )
        self.spend = Spend(price)
        self.max_cost = max_cost
        self.exhausted = False

    def charge(self, prompt_tokens: int, completion_tokens: int) -> NotSentError | None:
        """Add one answer's tokens; the first time the budget is spent, the error for unsent rows."""
        self.spend.add(prompt_tokens, completion_tokens)
        if (
            self.exhausted
            or self.max_cost is None
            or self.spend.usd is None
            or self.spend.usd < self.max_cost
        ):
            return None
        self.exhausted = True
        return budget_spent(self.max_cost, self.spend)


def budget_spent(max_cost: float, spend: Spend) -> NotSentError:
    """The error of the rows not sent once ``spend`` reached ``max_cost``: one message whether one
    process keeps the budget (:class:`Budget`) or a whole Dask run shares it
    (:class:`gen_ai_frames.coordinator.RunCoordinator`).

    >>> budget_spent(0.5, Spend((1.0, 1.0), 400_000, 100_000)).message
    'not sent: the run reached max_cost=$0.5 ($0.5000 spent on 500,000 tokens)'
    """
    return NotSentError(
        f"not sent: the run reached max_cost=${max_cost:g} (${spend.usd or 0.0:.4f} spent on "
        f"{spend.tokens:,} tokens)",
        suggestion="Run again with a higher max_cost (or none) to continue: with a checkpoint, "
        "answered rows are kept and only these rows are sent.",
        sent=False,
    )


@dataclass(frozen=True)
class Estimate:
    """What a run will send, and its cost at most (every answer using all of ``max_tokens``).

    >>> Estimate(rows=10, requests=8, prompt_tokens=400, max_completion_tokens=800,
    ...          price=(1.0, 2.0), tokenizer="estimated").max_cost_usd
    0.002
    """

    rows: int
    requests: int
    prompt_tokens: int
    max_completion_tokens: int
    price: tuple[float, float] | None
    tokenizer: str

    @property
    def prompt_cost_usd(self) -> float | None:
        return None if self.price is None else self.prompt_tokens * self.price[0] / 1e6

    @property
    def max_cost_usd(self) -> float | None:
        if self.price is None:
            return None
        return (self.prompt_tokens * self.price[0] + self.max_completion_tokens * self.price[1]) / 1e6

    def __str__(self) -> str:
        cost = (
            "unknown price: pass prices={model: (input, output)} in USD per million tokens"
            if self.max_cost_usd is None
            else f"at most ${self.max_cost_usd:,.4f} (${self.prompt_cost_usd:,.4f} for the prompts)"
        )
        return (
            f"{self.rows:,} rows, {self.requests:,} requests, {self.prompt_tokens:,} prompt tokens "
            f"({self.tokenizer}), up to {self.max_completion_tokens:,} completion tokens; cost {cost}"
        )
