"""A plan before the run: what a run would send, cost and take, measured on a small real sample.

:func:`make_plan` (behind ``df.genai.plan`` and ``gen-ai-frames plan``) counts the rows, the
requests that would really be sent (after dedupe, checkpoint and cache hits), sends ``sample``
of them for real to measure tokens, latency, the provider's rate limits and the share of answers
cut by ``max_tokens``, and extrapolates the cost and the duration of the run. A bad key or an
unknown model shows in the sample, which then stops: nothing else is sent.

The sample goes through :func:`gen_ai_frames.runner.run_rows` with the run's own options, so its
answers land in the checkpoint (and the response cache) like any others: the run that follows
does not pay for them again. A plan never starts a checkpoint over, even with ``resume=False``.

>>> plan = df.genai.plan(column="prompt", client=client, checkpoint="run.ckpt")  # doctest: +SKIP
>>> print(plan)  # doctest: +SKIP
plan for gpt-4o-mini (openai): will pay for 812 requests of 10,000 rows
...
"""

from __future__ import annotations

import contextlib
import copy
import html
import math
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import pricing
from .cache import RunCache
from .checkpoint import Checkpoint, run_fingerprint
from .client import Client
from .errors import ConfigurationError, InvalidPromptError
from .keys import keys_for, match_keys
from .memory import in_thread
from .options import RunOptions
from .params import validate_positive_int
from .pricing import Budget, estimate_tokens, price_for
from .prompts import Prompts, template_fields
from .runner import RowResults, run_rows

if TYPE_CHECKING:
    import pandas as pd

    from .engine import Engine

__all__ = [
    "CONTEXT_WINDOWS",
    "DEFAULT_SAMPLE",
    "Plan",
    "Segment",
    "batch_price_for",
    "cached_prompts",
    "check_plan_arguments",
    "context_window_for",
    "empty_template_fields",
    "make_plan",
]

#: Requests a plan sends by default to measure the run.
DEFAULT_SAMPLE = 3
#: Example prompts a plan shows.
EXAMPLES = 3
#: Warn when at least this share of the sampled answers was cut by max_tokens.
LENGTH_SHARE_WARNING = 0.1
#: Warn when a template field is empty (missing or blank) in at least this share of the rows.
EMPTY_FIELD_SHARE_WARNING = 0.1
#: Characters of an example prompt shown before it is cut short.
EXAMPLE_CHARS = 300

#: Context windows in tokens (prompt + answer) of well-known models, matched like prices: the
#: model's own entry or the longest entry its name starts with. A snapshot of the vendors' pages in
#: 2025; pass ``context_window=`` to the plan for any other model.
CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-4o-mini": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-3.5-turbo": 16_385,
    "o3-mini": 200_000,
    "claude-": 200_000,
    "gemini-1.5-pro": 2_097_152,
    "gemini-1.5-flash": 1_048_576,
    "gemini-2.0-flash": 1_048_576,
    "gemini-2.5": 1_048_576,
    "mistral-small": 32_000,
    "mistral-large": 128_000,
    "deepseek-chat": 64_000,
}


def context_window_for(model: str) -> int | None:
    """The context window of ``model`` in tokens from :data:`CONTEXT_WINDOWS`, or None when unknown.

    >>> context_window_for("gpt-4o-mini-2024-07-18"), context_window_for("claude-3-5-haiku-latest")
    (128000, 200000)
    >>> context_window_for("my-model") is None
    True
    """
    if model in CONTEXT_WINDOWS:
        return CONTEXT_WINDOWS[model]
    matches = [name for name in CONTEXT_WINDOWS if model.startswith(name)]
    return CONTEXT_WINDOWS[max(matches, key=len)] if matches else None


def batch_price_for(client: Client, options: RunOptions) -> tuple[float, float] | None:
    """The ``(input, output)`` USD per million tokens of the provider's batch mode, or None when
    the provider has no batch API or the model no price."""
    from .providers.batches import batch_dialect

    try:
        batch_dialect(client.provider)
    except ConfigurationError:
        return None
    return pricing.batch_price_for(client.model_name, options.prices, client.provider.name)


async def cached_prompts(texts: Sequence[str], client: Client, options: RunOptions) -> set[str]:
    """The prompts among ``texts`` whose answers the run's response cache already holds (none
    without a cache): a plan counts their rows as cache hits and never samples them."""
    cache = await RunCache.for_run(client, options)
    if cache is None:
        return set()
    try:
        return await _cached_in(cache, texts)
    finally:
        await cache.close()


async def _cached_in(cache: RunCache | None, texts: Sequence[str]) -> set[str]:
    """The prompts among ``texts`` that the open ``cache`` holds answers for (none without one)."""
    if cache is None or not texts:
        return set()
    distinct = list(dict.fromkeys(texts))
    keys = cache.keys.keys(distinct)
    hits = await cache.lookup(list(dict.fromkeys(keys)))
    return {text for text, key in zip(distinct, keys) if key in hits}


def empty_template_fields(df: pd.DataFrame, template: str | None) -> dict[str, int]:
    """For each field of ``template``, the rows where its column is missing or blank text.

    >>> import pandas as pd
    >>> empty_template_fields(pd.DataFrame({"a": ["x", "", None], "b": [1, 2, 3]}), "{a} {b}")
    {'a': 2, 'b': 0}
    """
    if template is None:
        return {}
    counts = {}
    for name in template_fields(template):
        if name not in df.columns or df.columns.nlevels > 1:
            continue  # build_prompts has said what is wrong with the frame already
        column = df[name]
        blank = sum(1 for value in column if isinstance(value, str) and not value.strip())
        counts[name] = int(column.isna().sum()) + blank
    return counts


@dataclass
class Plan:
    """What a run would send, cost and take. ``str(plan)`` is the report; notebooks show it as HTML.

    Counts are of the run that would follow the plan: ``requests`` it would send before the plan,
    of which ``sample_sent`` the plan's sample has now sent (their answers are kept when the run
    keeps answers: a checkpoint, the cache), so ``remaining_requests`` are left to pay for.
    """

    model: str
    provider: str
    rows: int
    invalid_rows: int
    checkpoint_hits: int
    cache_hits: int
    duplicate_rows: int
    requests: int
    examples: list[str]
    system_prompt: str | None
    max_tokens: int
    #: Requests the plan was asked to sample, and sent.
    sample: int
    sample_sent: int = 0
    #: Whether the sample's answers are kept for the run (a checkpoint it resumes, or the cache).
    sample_kept: bool = False
    #: Sampled requests whose outcome is kept, so the run will not send them (an error that stops
    #: the run, such as a bad key, is not kept: the run sends that request again).
    sample_saved: int = 0
    sample_answers: int = 0
    sample_errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None
    #: The error that stopped the sample early (a bad key, an unknown model): nothing else was sent.
    fatal: str | None = None
    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    latency_s: float | None = None
    #: Share of the sampled answers cut by max_tokens (finish_reason "length").
    cut_share: float | None = None
    #: Per-minute limits the provider stated in its rate-limit headers, by kind ("requests", ...).
    rate_limits: dict[str, float] = field(default_factory=dict)
    #: Per-minute limits given by the caller (requests_per_minute / tokens_per_minute).
    given_limits: dict[str, float] = field(default_factory=dict)
    max_concurrent: int = 5
    price: tuple[float, float] | None = None
    batch_price: tuple[float, float] | None = None
    sample_cost_usd: float | None = None
    #: Estimated cost of the remaining requests; an upper bound when ``cost_is_upper_bound``.
    cost_usd: float | None = None
    batch_cost_usd: float | None = None
    cost_is_upper_bound: bool = True
    duration_s: float | None = None
    duration_basis: str = ""
    context_window: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def remaining_requests(self) -> int:
        """Requests the run will still send (those of the sample are kept when answers are kept)."""
        return max(0, self.requests - (self.sample_saved if self.sample_kept else 0))

    @property
    def ok(self) -> bool:
        """False when the sample met an error that would stop the run (a bad key, an unknown model)."""
        return self.fatal is None

    def headline(self) -> str:
        return (
            f"plan for {self.model} ({self.provider}): will pay for {self.remaining_requests:,} "
            f"requests of {self.rows:,} rows"
        )

    def sections(self) -> list[tuple[str, list[str]]]:
        """The report as (title, lines): the text and HTML forms both show these."""
        rows = [
            f"rows: {self.rows:,}",
            f"answered in the checkpoint: {self.checkpoint_hits:,}",
            f"answered in the cache: {self.cache_hits:,}",
            f"duplicates sent once (dedupe): {self.duplicate_rows:,}",
            f"cannot be sent (missing or empty prompt): {self.invalid_rows:,}",
            f"requests to send: {self.requests:,}",
        ]
        if self.sample_sent:
            rows.append(
                f"sent by this plan's sample: {self.sample_sent:,} "
                + (
                    f"({self.sample_saved:,} kept: the run will not send them again)"
                    if self.sample_kept
                    else "(not kept: add a checkpoint to keep them)"
                )
            )
        rows.append(f"left to pay for: {self.remaining_requests:,}")
        examples = [_shorten(text) for text in self.examples] or ["(no prompt can be sent)"]
        if self.system_prompt:
            examples.insert(0, f"system: {_shorten(self.system_prompt)}")
        sections = [("requests", rows), ("example prompts", examples)]
        sections.append(("sample", self._sample_lines()))
        sections.append(("cost", self._cost_lines()))
        sections.append(("duration", [self._duration_line()]))
        if self.warnings:
            sections.append(("warnings", list(self.warnings)))
        return sections

    def _sample_lines(self) -> list[str]:
        if self.sample == 0:
            return ["none (sample=0): nothing was sent; token, latency and rate-limit figures are unknown"]
        if self.sample_sent == 0 and self.fatal is None:
            return ["nothing to sample: every row is answered or cannot be sent"]
        lines = [f"sent: {self.sample_sent:,} of {self.sample:,} asked, {self.sample_answers:,} answered"]
        if self.fatal is not None:
            lines.append(f"STOPPED: {self.fatal}; nothing else was sent")
        if self.sample_errors:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.sample_errors.items()))
            lines.append(f"errors: {kinds}")
            if self.first_error:
                lines.append(f"first error: {self.first_error}")
        if self.prompt_tokens is not None:
            lines.append(
                f"tokens per request: {self.prompt_tokens:,.0f} prompt, {self.completion_tokens or 0:,.0f} "
                "completion"
            )
        if self.latency_s is not None:
            lines.append(f"latency: {self.latency_s:.2f} s per request")
        if self.cut_share is not None:
            lines.append(f"answers cut by max_tokens={self.max_tokens}: {self.cut_share:.0%}")
        if self.rate_limits:
            limits = ", ".join(f"{limit:,.0f} {kind}/min" for kind, limit in self.rate_limits.items())
            lines.append(f"rate limits stated by the provider: {limits}")
        elif self.sample_sent:
            lines.append("rate limits stated by the provider: none")
        return lines

    def _cost_lines(self) -> list[str]:
        if self.price is None:
            return [
                f"unknown: no price for {self.model!r}; pass prices={{model: (input, output)}} in USD per "
                "million tokens"
            ]
        if self.remaining_requests == 0:
            lines = ["realtime: $0.00, nothing left to send"]
        else:
            basis = (
                "at most: every answer using all of max_tokens (no sample)"
                if self.cost_is_upper_bound
                else "extrapolated from the sample"
            )
            cost = _usd(self.cost_usd or 0.0)
            lines = [f"realtime: {cost} for {self.remaining_requests:,} requests ({basis})"]
            if self.batch_cost_usd is not None:
                lines.append(f"batch: {_usd(self.batch_cost_usd)}")
            else:
                lines.append("batch: no batch price known for this model")
        if self.sample_cost_usd is not None and self.sample_sent:
            lines.append(f"spent by the sample: {_usd(self.sample_cost_usd)}")
        return lines

    def _duration_line(self) -> str:
        if self.remaining_requests == 0:
            return "nothing left to send"
        if self.duration_s is None:
            return f"unknown: {self.duration_basis}"
        return f"about {_duration(self.duration_s)} ({self.duration_basis})"

    def __str__(self) -> str:
        lines = [self.headline()]
        for title, body in self.sections():
            lines.append(f"{title}:")
            lines.extend(f"  {line}" for line in body)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        parts = [f"<div class='gen-ai-frames-plan'><b>{html.escape(self.headline())}</b>"]
        for title, body in self.sections():
            style = " style='color:#b00'" if title == "warnings" or (title == "sample" and self.fatal) else ""
            parts.append(f"<p{style}><b>{html.escape(title)}</b></p><ul>")
            parts.extend(
                f"<li><code>{html.escape(line)}</code></li>"
                if title == "example prompts"
                else f"<li>{html.escape(line)}</li>"
                for line in body
            )
            parts.append("</ul>")
        parts.append("</div>")
        return "".join(parts)


def _shorten(text: str) -> str:
    one_line = " ".join(text.split())
    if len(one_line) <= EXAMPLE_CHARS:
        return one_line
    return one_line[: EXAMPLE_CHARS - 1] + f"… ({len(text):,} characters)"


def _usd(amount: float) -> str:
    """Dollars with cents, or with the digits a small amount needs.

    >>> _usd(1234.5), _usd(0.000123), _usd(0.00000555), _usd(0.0)
    ('$1,234.50', '$0.000123', '$0.00000555', '$0.00')
    """
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.2f}"
    digits = 2 - math.floor(math.log10(amount))  # three significant digits
    return f"${amount:.{digits}f}"


def _duration(seconds: float) -> str:
    """``3.2 s``, ``4 min``, ``2.5 h``.

    >>> _duration(3.24), _duration(250), _duration(9000)
    ('3.2 s', '4 min', '2.5 h')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --------------------------------------------------------------------------------------------------
# Building a plan


def check_plan_arguments(sample: object, context_window: object) -> None:
    """``sample`` must be an integer >= 0 and ``context_window`` None or an integer >= 1.

    >>> check_plan_arguments(-1, None)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: sample must be an integer >= 0, got -1
    """
    validate_positive_int("sample", sample, minimum=0)
    if context_window is not None:
        validate_positive_int("context_window", context_window)


@dataclass(frozen=True)
class Segment:
    """Rows ``start`` to ``stop`` of the input, answered by one runner call with its own checkpoint.

    ``df.genai.plan`` has one segment; ``gen-ai-frames plan`` one per batch of ``--batch-rows``
    rows, as ``generate`` answers them (each batch with its own checkpoint, dedupe within it).
    ``prepare`` runs once before the sample writes to ``checkpoint`` (the CLI records its batch).
    """

    start: int
    stop: int
    checkpoint: str | os.PathLike[str] | None
    prepare: Callable[[], None] | None = None


async def make_plan(
    prompts: Prompts,
    *,
    client: Client,
    options: RunOptions,
    sample: int = DEFAULT_SAMPLE,
    context_window: int | None = None,
    empty_fields: Mapping[str, int] | None = None,
    notes: Sequence[str] = (),
    segments: Sequence[Segment] | None = None,
) -> Plan:
    """The plan of a run of ``prompts`` with ``options``; sends at most ``sample`` requests.

    ``context_window`` (tokens) overrides :data:`CONTEXT_WINDOWS`; ``empty_fields`` counts the rows
    where each template field is empty (:func:`empty_template_fields`); ``notes`` are warnings the
    caller found (e.g. a column the run would refuse to overwrite); ``segments`` split the rows as
    the run will (default: one, with ``options.checkpoint``).

    >>> plan = await make_plan(Prompts.check(["Hi", "Hi"]), client=client, options=RunOptions(),
    ...                        sample=0)  # doctest: +SKIP
    >>> plan.requests  # doctest: +SKIP
    1
    """
    check_plan_arguments(sample, context_window)
    price = price_for(client.model_name, options.prices, client.provider.name)
    Budget(price, options.max_cost, client.model_name)  # max_cost needs a price: the run's own check
    # One open of the response cache for the whole plan: every segment's lookups and every sample
    # run share it (an open reads the file's settings, and warns once about a file it cannot use).
    cache = await RunCache.for_run(client, options)
    if cache is None:  # off, or unusable: the sample runs must not open it again
        options = options.replace(cache=False)
    try:
        return await _make_plan(
            prompts, client, options, price, cache, sample, context_window, empty_fields, notes, segments
        )
    finally:
        if cache is not None:
            await cache.close()


async def _make_plan(
    prompts: Prompts,
    client: Client,
    options: RunOptions,
    price: tuple[float, float] | None,
    cache: RunCache | None,
    sample: int,
    context_window: int | None,
    empty_fields: Mapping[str, int] | None,
    notes: Sequence[str],
    segments: Sequence[Segment] | None,
) -> Plan:
    """:func:`make_plan` with the model's ``price`` and the plan's one response cache (None: no
    cache)."""
    texts = prompts.texts
    if segments is None:
        segments = [Segment(0, len(texts), options.checkpoint)]

    dedupe = options.sends_duplicates_once
    # One request per group: a distinct prompt of a segment with dedupe, else a row.
    groups: dict[Any, list[int]] = {}
    segment_of: dict[int, int] = {}
    checkpoint_hits = cache_hits = 0
    for number, segment in enumerate(segments):
        valid = [i for i in range(segment.start, segment.stop) if texts[i] is not None]
        # Keys hashed and stored keys read on a worker thread, whose Arrow memory is then given back.
        answered = await in_thread(
            _answered_rows,
            client,
            options,
            segment.checkpoint,
            [texts[i] for i in valid],
        )
        todo = [i for i, done in zip(valid, answered.tolist()) if not done]
        checkpoint_hits += len(valid) - len(todo)
        cached = await _cached_in(cache, [texts[i] for i in todo])  # type: ignore[misc]
        if cached:
            cache_hits += sum(1 for i in todo if texts[i] in cached)
            todo = [i for i in todo if texts[i] not in cached]
        for i in todo:
            groups.setdefault((number, texts[i]) if dedupe else i, []).append(i)
            segment_of[i] = number

    valid_rows = prompts.sendable
    plan = Plan(
        model=client.model_name,
        provider=client.provider.name,
        rows=len(texts),
        invalid_rows=len(prompts.failed),
        checkpoint_hits=checkpoint_hits,
        cache_hits=cache_hits,
        duplicate_rows=sum(len(rows) - 1 for rows in groups.values()),
        requests=len(groups),
        examples=[t for t in dict.fromkeys(texts[i] for i in valid_rows) if t is not None][:EXAMPLES],
        system_prompt=options.system_prompt,
        max_tokens=options.max_tokens,
        sample=sample,
        max_concurrent=_concurrency(client, options),
        price=price,
        batch_price=batch_price_for(client, options),
        context_window=context_window or context_window_for(client.model_name),
        given_limits=_given_limits(client, options),
    )
    requests = [rows[0] for rows in groups.values()]
    chosen = requests[:sample]
    reported: dict[int, int] | None = None
    if chosen:
        sampled = _Sample(prompts, segments, segment_of, groups if dedupe else None)
        reported = await _send_sample(plan, sampled, chosen, client, options, cache)
    fixed_tokens = _fixed_tokens(options)
    estimated = {i: estimate_tokens(texts[i]) + fixed_tokens for i in requests}  # type: ignore[arg-type]
    kept = set(chosen[: plan.sample_saved]) if plan.sample_kept else set()
    ratio = 1.0  # real prompt tokens over estimated ones, as the sample's answers reported them
    if reported:
        ratio = sum(reported.values()) / sum(estimated[i] for i in reported)
    _extrapolate(plan, [estimated[i] * ratio for i in requests if i not in kept], options)
    plan.warnings.extend(notes)
    plan.warnings.extend(_warnings(plan, prompts, estimated, empty_fields or {}, options))
    return plan


def _concurrency(client: Client, options: RunOptions) -> int:
    limit = client.provider.max_parallel
    return options.max_concurrent if limit is None else min(options.max_concurrent, limit)


def _given_limits(client: Client, options: RunOptions) -> dict[str, float]:
    given = {
        "requests": options.requests_per_minute or client.requests_per_minute,
        "tokens": options.tokens_per_minute or client.tokens_per_minute,
    }
    return {kind: float(limit) for kind, limit in given.items() if limit}


def _fixed_tokens(options: RunOptions) -> int:
    """Tokens every request carries besides its prompt: the system prompt and the schema."""
    tokens = estimate_tokens(options.system_prompt) if options.system_prompt else 0
    if options.schema is not None:
        tokens += estimate_tokens(options.schema.canonical())
    return tokens


def _answered_rows(
    client: Client, options: RunOptions, path: str | os.PathLike[str] | None, prompts: Sequence[str]
) -> np.ndarray:
    """Which of ``prompts`` (a segment's sendable rows, in order) the checkpoint at ``path`` holds
    answers for (errors too, unless ``retry_errors``), as a bool array.

    Opens an existing checkpoint as the run would (the same settings check, the same lock) and
    never creates or starts one over: with ``resume=False`` the run starts over, so nothing counts.
    Reads only the stored keys (not the answers) and keys ``prompts`` in the checkpoint's scheme.
    """
    answered = np.zeros(len(prompts), dtype=bool)
    if path is None or not options.resume or not Path(os.fspath(path)).is_dir():
        return answered
    store = Checkpoint.open(path, run_fingerprint(client, options.params), repair=options.repair)
    with store:
        stored = store.stored_keys()
        scheme = store.key_scheme
    if len(stored) == 0 or not prompts:
        return answered
    found = match_keys(keys_for(prompts, scheme), stored)
    answered = found >= 0
    if options.retry_errors:
        answered &= ~stored.failed[np.maximum(found, 0)]
    return answered


_NOT_SAMPLED = InvalidPromptError("not in the plan's sample", sent=False)


@dataclass(frozen=True)
class _Sample:
    """Where the sampled requests' rows live: the prompts, their segments and (with dedupe) the
    rows that share each request."""

    prompts: Prompts
    segments: Sequence[Segment]
    segment_of: Mapping[int, int]
    groups: Mapping[Any, list[int]] | None

    def rows(self, batch: list[int], *, with_earlier: bool) -> set[int]:
        """The rows a sample run includes for the requests ``batch`` (all of one segment).

        With dedupe, every row of each sampled prompt: they share the answer, so none is paid for
        again. With a checkpoint, also the earlier rows of the same prompt: a row's checkpoint key
        counts the identical prompts before it, so the sampled row must keep its rank (the earlier
        rows are answered already and are restored, not sent).
        """
        texts = self.prompts.texts
        number = self.segment_of[batch[0]]
        rows = set(batch)
        if self.groups is not None:
            for i in batch:
                rows.update(self.groups[(number, texts[i])])
        if with_earlier:
            wanted = {texts[i] for i in rows}
            start = self.segments[number].start
            rows.update(i for i in range(start, max(rows) + 1) if texts[i] in wanted)
        return rows

    def subset(self, number: int, rows: set[int]) -> Prompts:
        """Segment ``number``'s prompts with only ``rows`` sendable, positioned as in the segment."""
        segment = self.segments[number]
        texts = self.prompts.texts[segment.start : segment.stop]
        local = {i - segment.start for i in rows}
        return Prompts(
            [text if i in local else None for i, text in enumerate(texts)],
            {i: _NOT_SAMPLED for i in range(len(texts)) if i not in local},
        )


async def _send_sample(
    plan: Plan,
    sample: _Sample,
    chosen: list[int],
    client: Client,
    options: RunOptions,
    cache: RunCache | None,
) -> dict[int, int] | None:
    """Send the sample's requests through the runner, the first alone: a bad key or model stops
    the plan after one request. Returns the prompt tokens each answer reported, by row (None when
    some answer reported none)."""
    # The checkpoint, and the plan's response cache when it has one, keep the sample's answers.
    keep = (options.checkpoint is not None and options.resume) or cache is not None
    plan.sample_kept = keep
    engines: list[Engine] = []
    watched = _watching(client, engines)
    measured: list[tuple[int, int, RowResults]] = []
    batches = [chosen[:1]]
    for i in chosen[1:]:  # the rest, one runner call per segment
        if len(batches) == 1 or sample.segment_of[batches[-1][0]] != sample.segment_of[i]:
            batches.append([])
        batches[-1].append(i)
    prepared: set[int] = set()
    for batch in batches:
        number = sample.segment_of[batch[0]]
        segment = sample.segments[number]
        if keep and segment.prepare is not None and number not in prepared:
            segment.prepare()
            prepared.add(number)
        # A plan never starts a checkpoint over: with resume=False the run would, so the sample
        # goes without one (and the plan says its answers are not kept).
        sample_options = options.replace(progress=False, checkpoint=segment.checkpoint if keep else None)
        rows = sample.rows(batch, with_earlier=keep)
        results = await run_rows(
            sample.subset(number, rows), client=watched, options=sample_options, cache=cache
        )
        plan.sample_sent += results.sent
        measured.extend((i, i - segment.start, results) for i in batch)
        if results.fatal is None:
            plan.sample_saved += results.sent
        else:  # only the answers got before the stop are saved
            errors = results.columns["error"]
            plan.sample_saved += sum(1 for i in batch if errors[i - segment.start] is None)
            fatal = results.fatal
            plan.fatal = _error_text(fatal.type, fatal.message, fatal.suggestion)
            break
    for engine in engines:
        plan.rate_limits.update(engine.rate_limits)  # what each sample run's pace learned
    return _measure(plan, measured)


def _error_text(kind: str | None, message: str, suggestion: str | None) -> str:
    return f"{kind or 'error'}: {message}" + (f" {suggestion}" if suggestion else "")


def _watching(client: Client, engines: list[Engine]) -> Client:
    """A copy of ``client`` whose engines are also put in ``engines``, to read what they learned."""
    watched = copy.copy(client)
    engine = client.engine

    @contextlib.asynccontextmanager
    async def watching_engine(**kwargs: Any) -> AsyncIterator[Any]:
        async with engine(**kwargs) as opened:
            engines.append(opened)
            yield opened

    watched.engine = watching_engine  # type: ignore[method-assign]
    return watched


def _measure(plan: Plan, measured: list[tuple[int, int, RowResults]]) -> dict[int, int] | None:
    """Tokens, latency, cut answers and errors of the sampled requests (``(row, row in its
    segment, results)``); returns the prompt tokens each answer reported, by row (None when some
    answer reported none)."""
    reported: dict[int, int] = {}
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    latencies: list[float] = []
    cut = answers = 0
    errors: Counter[str] = Counter()
    for row, i, results in measured:
        columns = results.columns
        error = columns["error"][i]
        if error is not None:
            if columns["error_type"][i] == "NotSentError" and plan.fatal is None:
                continue  # a max_cost stop: not an error of the request
            errors[columns["error_type"][i] or "unknown"] += 1
            if plan.first_error is None:
                kind, suggestion = columns["error_type"][i], columns["error_suggestion"][i]
                plan.first_error = _error_text(kind, error, suggestion)
            continue
        answers += 1
        if columns["prompt_tokens"][i] is not None:
            prompt_tokens.append(columns["prompt_tokens"][i])
            reported[row] = columns["prompt_tokens"][i]
        completion = columns["completion_tokens"][i]
        if completion is None and columns["response"][i] is not None:
            completion = estimate_tokens(columns["response"][i])
        completion_tokens.append(completion or 0)
        if columns["latency_s"][i] is not None:
            latencies.append(columns["latency_s"][i])
        cut += columns["finish_reason"][i] == "length"
    plan.sample_answers = answers
    plan.sample_errors = dict(errors)
    if prompt_tokens:
        plan.prompt_tokens = sum(prompt_tokens) / len(prompt_tokens)
    if completion_tokens:
        plan.completion_tokens = sum(completion_tokens) / len(completion_tokens)
    if latencies:
        plan.latency_s = sum(latencies) / len(latencies)
    if answers:
        plan.cut_share = cut / answers
    # What the sample cost, from the usage the provider reported.
    if plan.price is not None and prompt_tokens:
        plan.sample_cost_usd = (
            sum(prompt_tokens) * plan.price[0] + sum(completion_tokens) * plan.price[1]
        ) / 1e6
    return reported if answers and len(reported) == answers else None


def _extrapolate(plan: Plan, remaining: list[float], options: RunOptions) -> None:
    """Cost and duration of the requests left, from the sample where it measured something.

    ``remaining`` holds the estimated prompt tokens of each request left (about 4 characters a
    token, corrected by what the sample's answers reported).
    """
    prompt_tokens = sum(remaining)
    measured = plan.completion_tokens is not None
    per_answer = plan.completion_tokens if measured else float(options.max_tokens)
    completion_tokens = len(remaining) * per_answer  # type: ignore[operator]
    plan.cost_is_upper_bound = not measured
    if plan.price is not None:
        plan.cost_usd = (prompt_tokens * plan.price[0] + completion_tokens * plan.price[1]) / 1e6
    if plan.batch_price is not None:
        plan.batch_cost_usd = (
            prompt_tokens * plan.batch_price[0] + completion_tokens * plan.batch_price[1]
        ) / 1e6
    prompt = prompt_tokens / len(remaining) if remaining else 0.0
    _estimate_duration(plan, len(remaining), prompt, float(per_answer or 0.0))


def _estimate_duration(plan: Plan, requests: int, prompt: float, completion: float) -> None:
    """Requests left over the slowest of: concurrency over latency, and every per-minute limit
    (``prompt`` and ``completion`` tokens a request)."""
    bounds: list[tuple[float, str]] = []  # (requests per second, why)
    if plan.latency_s:
        bounds.append(
            (
                plan.max_concurrent / plan.latency_s,
                f"max_concurrent={plan.max_concurrent} at {plan.latency_s:.2f} s a request",
            )
        )
    per_request = {
        "requests": 1.0,
        "tokens": prompt + completion,
        "input-tokens": prompt,
        "output-tokens": completion,
    }
    for source, limits in (("given", plan.given_limits), ("the provider's", plan.rate_limits)):
        for kind, limit in limits.items():
            units = per_request.get(kind, 0.0)
            if units > 0:
                bounds.append((limit / 60.0 / units, f"{source} limit of {limit:,.0f} {kind}/min"))
    if not bounds:
        plan.duration_basis = "no latency measured (sample=0) and no rate limit known"
        return
    rate, why = min(bounds)
    plan.duration_s = requests / rate
    plan.duration_basis = why + ("" if plan.latency_s else "; latency not measured")


def _warnings(
    plan: Plan,
    prompts: Prompts,
    estimated: Mapping[int, int],
    empty_fields: Mapping[str, int],
    options: RunOptions,
) -> list[str]:
    found = []
    texts = prompts.texts
    valid = prompts.sendable
    window = plan.context_window
    if window is not None:
        fixed = _fixed_tokens(options)
        too_long = []
        for i in valid:
            # rows answered already, or sent once for a duplicate, have no estimate yet
            tokens = estimated.get(i) or estimate_tokens(texts[i]) + fixed  # type: ignore[arg-type]
            if tokens + options.max_tokens > window:
                too_long.append(i)
        if too_long:
            shown = ", ".join(str(i) for i in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
            found.append(
                f"{len(too_long):,} prompt(s) (rows {shown}) are longer than the model's context window "
                f"of {window:,} tokens with max_tokens={options.max_tokens} (estimated at ~4 characters "
                "a token): they would fail with ContextLengthError; shorten them or lower max_tokens"
            )
    if plan.cut_share is not None and plan.cut_share >= LENGTH_SHARE_WARNING:
        found.append(
            f"{plan.cut_share:.0%} of the sampled answers were cut by max_tokens={options.max_tokens} "
            "(finish_reason 'length'): raise max_tokens, or ask for shorter answers"
        )
    distinct = len(set(texts[i] for i in valid))
    if len(valid) > 1 and distinct == 1:
        found.append(f"all {len(valid):,} prompts are identical: check the column or the template's fields")
    rows = len(texts)
    for name, empty in empty_fields.items():
        if rows and empty and empty / rows >= EMPTY_FIELD_SHARE_WARNING:
            found.append(
                f"template field {{{name}}} is empty in {empty:,} of {rows:,} rows ({empty / rows:.0%}): "
                "rows with a missing value fail unsent, blank ones are sent without it"
            )
    if options.max_cost is not None and plan.cost_usd is not None:
        total = plan.cost_usd + (plan.sample_cost_usd or 0.0)
        if total > options.max_cost:
            found.append(
                f"max_cost=${options.max_cost:g} is below the estimated cost ({_usd(total)}): the run "
                "will stop sending when it is spent, and the rows left get NotSentError"
            )
    if plan.price is None and plan.remaining_requests:
        found.append(
            f"no price known for model {plan.model!r}: pass prices={{{plan.model!r}: (input, output)}} "
            "in USD per million tokens to see the cost"
        )
    return found
