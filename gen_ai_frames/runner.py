"""Row runs: prompts in, one result per row out, with dedupe, checkpoints and a progress bar.

The accessor, the CLI and the Dask engine all run rows through :func:`run_rows`. Rows are fed to
the engine lazily, so concurrency never drains at a chunk boundary. Answers go to the checkpoint
from a background writer (:class:`_Writer`): receiving never waits for a write, and each write
takes whatever is pending as one part (group commit), so a slow disk means fewer, larger parts
rather than answers piling up unsaved. A crash loses only the rows in flight plus those received
since the last write began; an interrupt, an error or a stop writes everything received first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .batch import run_batch
from .cache import RunCache
from .checkpoint import Checkpoint, row_keys, run_fingerprint
from .client import Client
from .engine import Result
from .errors import ConfigurationError, RequestError
from .options import RunOptions
from .params import Message
from .pricing import Budget, Spend, batch_price_for, estimate_tokens, price_for
from .prompts import Prompts
from .ratelimit import SharedLimits, current_shared_limits
from .results import DETAIL_COLUMNS, RECORD_SCHEMA, RESULT_COLUMNS, arrow_array, pandas_array

__all__ = ["DETAIL_COLUMNS", "RowResults", "one_progress_bar", "output_names", "run_rows"]

logger = logging.getLogger("gen_ai_frames")

# How often a slow run writes what it has even if a chunk is not full: bounds the loss of a crash
# in time as well as in rows.
FLUSH_INTERVAL_S = 10.0


def output_names(options: RunOptions) -> dict[str, str]:
    """The output column of each result: ``response``/``error`` renamed as asked, the details, and
    with a schema one column per field (``prefix`` + field name).

    >>> output_names(RunOptions(response_column="answer"))
    {'response': 'answer', 'error': 'error'}
    >>> output_names(RunOptions(schema="name, age int", prefix="p_"))
    {'response': 'response', 'error': 'error', 'name': 'p_name', 'age': 'p_age'}
    """
    names = {"response": options.response_column, "error": options.error_column}
    if options.details:
        names.update({name: name for name in DETAIL_COLUMNS})
    if options.schema is not None:
        for name in options.schema.fields:
            if name in names:
                raise ConfigurationError(
                    f"schema field {name!r} has the name of a result column: pass "
                    f"prefix= (e.g. prefix='{name}_') to name the field columns apart"
                )
            names[name] = options.prefix + name
    if options.logprobs:
        names["confidence"] = options.prefix + "confidence"
    if len(set(names.values())) != len(names):
        raise ConfigurationError(f"output column names must differ, got {sorted(names.values())}")
    return names


@dataclass
class RowResults:
    """One value per row for each of ``RESULT_COLUMNS``; ``sent`` counts requests made this run,
    ``cached`` the rows answered from the response cache."""

    columns: dict[str, list[Any]]
    restored: int = 0
    sent: int = 0
    cached: int = 0
    fatal: RequestError | None = None

    def frame_columns(self, options: RunOptions) -> dict[str, pd.api.extensions.ExtensionArray]:
        """Every output column of the run as a pandas array, keyed like :func:`output_names`."""
        names = RESULT_COLUMNS if options.details else ["response", "error"]
        columns = {name: pandas_array(name, self.columns[name]) for name in names}
        if options.schema is not None:  # failed rows have no response, so every answer here is valid JSON
            columns.update(options.schema.columns_from_answers(self.columns["response"]))
        if options.logprobs:
            columns["confidence"] = self.confidence()
        return columns

    def arrow_columns(self, options: RunOptions) -> dict[str, pa.Array]:
        """Every output column of the run as an Arrow array, keyed like :func:`output_names`:
        the result columns in their output types, a schema's fields typed as
        :meth:`~gen_ai_frames.schema.Schema.arrow_types` says (enums as dictionaries), ``confidence``
        as float64. No pandas on the way: the polars front end builds its columns from these.
        """
        names = RESULT_COLUMNS if options.details else ["response", "error"]
        columns = {name: arrow_array(name, self.columns[name]) for name in names}
        if options.schema is not None:
            columns.update(options.schema.arrow_columns_from_answers(self.columns["response"]))
        if options.logprobs:
            import pyarrow.compute as pc

            columns["confidence"] = pc.exp(arrow_array("logprob", self.columns["logprob"]))
        return columns

    def confidence(self) -> pd.api.extensions.ExtensionArray:
        """The probability of each answer, from its log-probability; NA where none was returned."""
        return np.exp(pandas_array("logprob", self.columns["logprob"]))


class _Progress:
    """A tqdm.auto bar: rows done of total, rate, errors, tokens and spend so far, and pauses.

    A no-op when disabled. ``feed`` (a Dask partition's shared run) hears the same counts, for the
    run's one bar on the caller's side.
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        initial: int,
        errors: int,
        spend: Spend,
        feed: SharedLimits | None = None,
    ) -> None:
        self.feed = feed
        if feed is not None:
            feed.start(total, initial, errors)
        self._earlier = (0, 0.0)  # tokens and dollars of the earlier runs on this bar
        self.errors = errors
        self.spend = spend
        self.cached = 0
        self.status: str | None = None
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="row", desc="gen-ai-frames", dynamic_ncols=True
            )
            self._postfix(refresh=False)

    def adopt(self, done: int, errors: int, spend: Spend) -> None:
        """A further run on this bar (:func:`one_progress_bar`): its restored rows count as done,
        its spend adds to the earlier runs'."""
        self._earlier = (self._earlier[0] + self.spend.tokens, self._earlier[1] + (self.spend.usd or 0.0))
        self.spend = spend
        if self.bar is not None:
            self.errors += errors
            self.bar.update(done)
            self._postfix(refresh=False)

    def advance(self, rows: int, failed: bool) -> None:
        if self.feed is not None:
            self.feed.advance(rows, failed)
        if self.bar is None:
            return
        self.errors += rows if failed else 0
        self._postfix(refresh=False)
        self.bar.update(rows)

    def show_status(self, status: str | None) -> None:
        """Shown beside the counts, e.g. "rate limited, waiting 12 s"; None clears it."""
        self.status = status
        if self.bar is not None:
            self._postfix(refresh=True)

    def _postfix(self, refresh: bool) -> None:
        tokens = self._earlier[0] + self.spend.tokens
        fields: dict[str, Any] = {"errors": self.errors, "tokens": _short(tokens)}
        if self.cached:
            fields["cached"] = self.cached
        if self.spend.usd is not None:
            fields["spend"] = f"${self._earlier[1] + self.spend.usd:.4f}"
        if self.status:
            fields["status"] = self.status
        self.bar.set_postfix(fields, refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


_one_bar: contextvars.ContextVar[_Progress | None] = contextvars.ContextVar("gen_ai_frames_bar", default=None)


@contextlib.contextmanager
def one_progress_bar(total: int, enabled: bool) -> Iterator[None]:
    """Every :func:`run_rows` inside shows its rows on one bar of ``total`` rows instead of its own
    (the command line: one bar per file, not one per batch). Runs with ``progress=False`` stay off it.

    >>> with one_progress_bar(0, enabled=False):
    ...     pass
    """
    bar = _Progress(total, enabled and total > 0, initial=0, errors=0, spend=Spend(None))
    token = _one_bar.set(bar)
    try:
        yield
    finally:
        _one_bar.reset(token)
        bar.close()


def _short(count: int) -> str:
    """1234567 -> '1.2M': compact enough for a progress bar."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(count)


async def run_rows(prompts: Prompts | Sequence[object], *, client: Client, options: RunOptions) -> RowResults:
    """Answer every row's prompt; see :meth:`GenAIAccessor.generate` for the options.

    ``options.repair`` opens a damaged checkpoint as :func:`~gen_ai_frames.checkpoint.repair_checkpoint`
    would (dropping unreadable parts, rebuilding a lost manifest), with a warning, instead of
    raising ``CheckpointCorruptError``.

    >>> results = await run_rows(["Hi", None], client=client, options=RunOptions())  # doctest: +SKIP
    >>> results.columns["error"][1]  # doctest: +SKIP
    'the prompt is missing (None or NaN)'
    """
    if not isinstance(prompts, Prompts):
        prompts = Prompts.check(prompts)
    if options.mode == "batch":
        _check_batch(client, options, bool(prompts.sendable))
    price = (batch_price_for if options.mode == "batch" else price_for)(
        client.model_name, options.prices, client.provider.name
    )
    budget = Budget(price, options.max_cost, client.model_name)
    n = len(prompts)
    columns: dict[str, list[Any]] = {name: [None] * n for name in RESULT_COLUMNS}
    outcome = RowResults(columns)
    for i, problem in prompts.failed.items():  # rows that cannot be sent fail at once
        _store(columns, i, Result(error=problem))
    valid = prompts.sendable
    # Row keys match rows to checkpoint records; without a checkpoint they are not needed.
    keys = (
        row_keys([prompts.texts[i] for i in valid])  # type: ignore[misc]  # sendable rows have text
        if options.checkpoint is not None
        else []
    )

    store = None
    if options.checkpoint is not None:
        store = await asyncio.to_thread(
            Checkpoint.open,
            options.checkpoint,
            run_fingerprint(client, options.params),
            resume=options.resume,
            repair=options.repair,
            storage_options=options.storage_options,
        )
    run = _Run(prompts, columns, dict(zip(valid, keys)), store)
    try:
        todo = valid
        if store is not None:
            todo, moved = _restore(store, valid, keys, columns, options.retry_errors)
            outcome.restored = len(valid) - len(todo)
            if moved:  # rows inserted above earlier answers: record where those answers sit now
                await run.flush(moved)
        groups: dict[Any, list[int]] = {}
        dedupe = options.sends_duplicates_once
        for i in todo:
            groups.setdefault(prompts.texts[i] if dedupe else i, []).append(i)
        if groups:  # rows all restored from the checkpoint need no cache
            run.cache = await RunCache.for_run(client, options)
        if run.cache is not None:
            outcome.cached = await _answer_from_cache(run, groups)

        errors = sum(1 for e in columns["error"] if e is not None)
        outer = _one_bar.get() if options.progress else None
        if outer is not None:  # one bar for several runs (the batches of a file)
            bar = outer
            bar.cached += outcome.cached
            bar.adopt(n - len(todo) + outcome.cached, errors, budget.spend)
        else:
            bar = _Progress(
                n,
                options.progress and n > 0,
                initial=n - len(todo) + outcome.cached,
                spend=budget.spend,
                errors=errors,
                feed=current_shared_limits(),
            )
            bar.cached = outcome.cached
        try:
            if options.mode == "batch":
                await run_batch(run, groups, client, options, budget, bar, outcome)
            else:
                await _send_groups(run, groups, client, options, budget, bar, outcome)
        finally:
            if bar is not outer:
                bar.close()
    finally:
        try:
            if run.cache is not None:
                await run.cache.close()
        finally:
            if store is not None:
                await asyncio.to_thread(store.close)
    return outcome


def _check_batch(client: Client, options: RunOptions, sending: bool) -> None:
    """Batch mode needs a provider with a batch API and, when there is anything to send, a
    checkpoint: both checked before anything is sent (the accessor and the client choose a default
    checkpoint, see docs/batch.md)."""
    from .providers.batches import batch_dialect

    batch_dialect(client.provider)
    if options.checkpoint is None and sending:
        raise ConfigurationError(
            "mode='batch' needs a checkpoint: it records every batch submitted, so that no row is ever "
            "submitted twice; pass checkpoint='run.ckpt' (the same path collects the answers later)"
        )


async def _answer_from_cache(run: _Run, groups: dict[Any, list[int]]) -> int:
    """Answer the groups the cache holds: they leave ``groups``, so they are not sent, not rate
    limited and not charged. Returns the rows answered. Those rows still go to the checkpoint,
    which records every row of a run."""
    cache = run.cache
    assert cache is not None
    texts = run.prompts.texts
    columns = run.columns
    # The other result columns of these rows are None already (no error, no status, no latency).
    response, finish, tokens_in, tokens_out = (
        columns[name] for name in ("response", "finish_reason", "prompt_tokens", "completion_tokens")
    )
    logprob, attempts, cached = columns["logprob"], columns["attempts"], columns["cached"]
    answered: list[int] = []
    names = list(groups)
    # In slices, so a million rows never hold a million keys at once.
    for start in range(0, len(names), _LOOKUP_ROWS):
        chunk = names[start : start + _LOOKUP_ROWS]
        keys = cache.keys.keys(texts[groups[group][0]] for group in chunk)  # type: ignore[misc]
        hits = await cache.lookup(list(dict.fromkeys(keys)))
        for group, key in zip(chunk, keys) if hits else ():
            answer = hits.get(key)
            if answer is not None:
                for i in groups.pop(group):
                    response[i], finish[i], tokens_in[i], tokens_out[i], logprob[i] = answer
                    attempts[i], cached[i] = 0, True
                    answered.append(i)
    if run.store is not None:
        for start in range(0, len(answered), _CACHED_PART_ROWS):
            await run.flush(answered[start : start + _CACHED_PART_ROWS])
    return len(answered)


# Rows answered from the cache go to the checkpoint in parts of at most this many rows.
_CACHED_PART_ROWS = 50_000
# Groups looked up in the cache at a time.
_LOOKUP_ROWS = 20_000


@dataclass
class _Run:
    """What one run's rows share while they are sent: their prompts, result columns and checkpoint."""

    prompts: Prompts
    columns: dict[str, list[Any]]
    position_key: dict[int, tuple[str, int]]
    store: Checkpoint | None
    #: The response cache, which stores the answers received (None: no cache).
    cache: RunCache | None = None

    async def flush(self, rows: list[int]) -> None:
        """Append ``rows``' results to the checkpoint."""
        assert self.store is not None
        await _flush(self.store, rows, self.prompts.texts, self.columns, self.position_key)


def _restore(
    store: Checkpoint,
    valid: list[int],
    keys: list[tuple[str, int]],
    columns: dict[str, list[Any]],
    retry_errors: bool,
) -> tuple[list[int], list[int]]:
    """Fill rows answered by an earlier run from the checkpoint.

    Returns the rows still to send, and the restored rows whose position changed since they were stored.
    """
    records = store.records()
    if records.empty:
        return valid, []
    stored = {
        (h, int(o)): (int(p), row)
        for h, o, p, row in zip(
            records["prompt_hash"],
            records["occurrence"],
            records["position"],
            records[RESULT_COLUMNS].itertuples(index=False, name=None),
        )
    }
    error_index = RESULT_COLUMNS.index("error")
    todo, moved = [], []
    for i, key in zip(valid, keys):
        position, row = stored.get(key, (None, None))
        if row is None or (retry_errors and not pd.isna(row[error_index])):
            todo.append(i)
            continue
        for name, value in zip(RESULT_COLUMNS, row):
            columns[name][i] = None if pd.isna(value) else value
        if position != i:
            moved.append(i)
    return todo, moved


async def _send_groups(
    run: _Run,
    groups: dict[Any, list[int]],
    client: Client,
    options: RunOptions,
    budget: Budget,
    bar: _Progress,
    outcome: RowResults,
) -> None:
    if not groups:
        return
    texts = run.prompts.texts

    def items() -> Iterator[tuple[list[int], list[Message]]]:
        for rows in groups.values():
            yield rows, [{"role": "user", "content": texts[rows[0]]}]  # type: ignore[dict-item]

    writer = None if run.store is None else _Writer(run, options.chunk_size)
    async with client.engine(**options.engine_limits, on_status=bar.show_status) as engine:

        def receive(rows: list[int], result: Result) -> None:
            error = result.error
            sent = error is None or error.sent
            outcome.sent += sent
            if error is None:
                prompt_tokens = result.prompt_tokens
                if prompt_tokens is None:
                    prompt_tokens = estimate_tokens(texts[rows[0]])  # type: ignore[arg-type]
                stop = budget.charge(prompt_tokens, result.completion_tokens or 0)
                if stop is not None:
                    engine.stop(stop)
            for i in rows:
                _store(run.columns, i, result)
            if error is None and run.cache is not None and run.cache.working:
                run.cache.put(run.cache.keys.key(texts[rows[0]]), result)  # type: ignore[arg-type]
            bar.advance(len(rows), error is not None)
            # Unsent rows, and rows that met an error of the run rather than of the row (a bad
            # key, a server that is down), stay out of the checkpoint: a resume sends them.
            if writer is not None and sent and not (error is not None and error.fatal):
                writer.add(rows)

        try:
            async for rows, result in engine.stream(items(), options.params):
                receive(rows, result)
        except BaseException:
            if writer is not None:
                # Save what was received before the error propagates (answers the engine had
                # queued for us included); the error itself matters more.
                with contextlib.suppress(Exception):
                    for rows, result in engine.unconsumed:
                        receive(rows, result)
                    await writer.close()
            raise
        if writer is not None:
            await writer.close()
        outcome.fatal = engine.fatal


class _Writer:
    """Writes answered rows to the checkpoint from a background task (group commit).

    :meth:`add` only queues rows, so receiving never waits for the disk. The task writes as soon
    as ``chunk_size`` rows are pending (or ``interval`` seconds after the last write, when answers
    are slow), taking *everything* pending as one part: while a write is in progress the next
    rows pile up and go in the next part together. A failed write is raised by the next
    :meth:`add` or by :meth:`close`, which writes whatever is still pending.
    """

    def __init__(self, run: _Run, chunk_size: int, interval: float | None = None) -> None:
        self._run_state = run
        self._chunk_size = chunk_size
        self._interval = FLUSH_INTERVAL_S if interval is None else interval
        self._pending: list[int] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.ensure_future(self._run())

    def add(self, rows: list[int]) -> None:
        if self._task.done():
            self._task.result()  # the write failed: stop the run with its error (CheckpointError)
        self._pending.extend(rows)
        if len(self._pending) >= self._chunk_size:
            self._wake.set()

    async def close(self) -> None:
        """Write everything pending, then stop. Shielded: an interrupt during the last write must
        not lose the rows it holds."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            self._wake.clear()
            if self._pending:
                rows, self._pending = self._pending, []
                await self._run_state.flush(rows)
            if self._closing and not self._pending:
                return


async def _flush(
    store: Checkpoint,
    rows: list[int],
    prompts: Sequence[str | None],
    columns: dict[str, list[Any]],
    position_key: dict[int, tuple[str, int]],
) -> None:
    table = pa.table(
        {
            "position": pa.array(rows, pa.int64()),
            "prompt_hash": [position_key[i][0] for i in rows],
            "occurrence": pa.array([position_key[i][1] for i in rows], pa.int32()),
            "prompt": [prompts[i] for i in rows],
            **{name: [columns[name][i] for i in rows] for name in RESULT_COLUMNS},
        }
    ).cast(RECORD_SCHEMA)
    # Parquet encoding and fsync happen off the loop, so requests keep flowing meanwhile.
    await asyncio.to_thread(store.append, table)


def _store(columns: dict[str, list[Any]], i: int, result: Result) -> None:
    error = result.error
    columns["response"][i] = result.text
    columns["error"][i] = None if error is None else error.message
    columns["error_type"][i] = None if error is None else error.type
    columns["error_suggestion"][i] = None if error is None else error.suggestion
    columns["status_code"][i] = None if error is None else error.status_code
    columns["attempts"][i] = result.attempts if error is None else error.attempts
    columns["finish_reason"][i] = result.finish_reason
    columns["prompt_tokens"][i] = result.prompt_tokens
    columns["completion_tokens"][i] = result.completion_tokens
    columns["latency_s"][i] = result.latency_s
    columns["logprob"][i] = result.logprob
    columns["cached"][i] = False
