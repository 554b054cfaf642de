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
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from .checkpoint import Checkpoint, row_keys, run_fingerprint
from .client import Client, check_prompt
from .engine import Result
from .errors import ConfigurationError, NotSentError, RequestError
from .params import GenerationParams, validate_positive_int
from .pricing import Spend, estimate_tokens, price_for
from .results import DETAIL_COLUMNS, RECORD_SCHEMA, RESULT_COLUMNS, pandas_array

__all__ = ["DETAIL_COLUMNS", "RowResults", "run_rows"]

logger = logging.getLogger("gen_ai_frames")

# How often a slow run writes what it has even if a chunk is not full: bounds the loss of a crash
# in time as well as in rows.
FLUSH_INTERVAL_S = 10.0


@dataclass
class RowResults:
    """One value per row for each of ``RESULT_COLUMNS``; ``sent`` counts requests made this run."""

    columns: dict[str, list[Any]]
    restored: int = 0
    sent: int = 0
    fatal: RequestError | None = None

    def frame_columns(self, details: bool) -> dict[str, pd.api.extensions.ExtensionArray]:
        names = RESULT_COLUMNS if details else ["response", "error"]
        return {name: pandas_array(name, self.columns[name]) for name in names}


class _Progress:
    """A tqdm.auto bar: rows done of total, rate, errors, tokens and spend so far, and pauses.

    A no-op when disabled.
    """

    def __init__(self, total: int, enabled: bool, initial: int, errors: int, spend: Spend) -> None:
        self.errors = errors
        self.spend = spend
        self.status: str | None = None
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="row", desc="gen-ai-frames", dynamic_ncols=True)
            self._postfix(refresh=False)

    def advance(self, rows: int, failed: bool) -> None:
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
        fields: dict[str, Any] = {"errors": self.errors, "tokens": _short(self.spend.tokens)}
        if self.spend.usd is not None:
            fields["spend"] = f"${self.spend.usd:.4f}"
        if self.status:
            fields["status"] = self.status
        self.bar.set_postfix(fields, refresh=refresh)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(count: int) -> str:
    """1234567 -> '1.2M': compact enough for a progress bar."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            return f"{count / limit:.1f}{suffix}"
    return str(count)


async def run_rows(
    prompts: Sequence[object],
    *,
    client: Client,
    params: GenerationParams,
    max_concurrent: int = 5,
    max_retries: int | None = None,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    chunk_size: int = 500,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    retry_errors: bool = False,
    dedupe: bool | None = None,
    progress: bool = True,
    max_cost: float | None = None,
    prices: Mapping[str, tuple[float, float]] | None = None,
    repair: bool = False,
) -> RowResults:
    """Answer every row's prompt; see :meth:`GenAIAccessor.generate` for the options.

    ``repair=True`` opens a damaged checkpoint as :func:`~gen_ai_frames.checkpoint.repair_checkpoint`
    would (dropping unreadable parts, rebuilding a lost manifest), with a warning, instead of
    raising ``CheckpointCorruptError``.

    >>> results = await run_rows(["Hi", None], client=client, params=GenerationParams())  # doctest: +SKIP
    >>> results.columns["error"][1]  # doctest: +SKIP
    'the prompt is missing (None or NaN)'
    """
    validate_positive_int("chunk_size", chunk_size)
    validate_positive_int("max_concurrent", max_concurrent)
    spend = Spend(price_for(client.model_name, prices, client.provider.name))
    if max_cost is not None:
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0:
            raise ConfigurationError(f"max_cost must be a number of US dollars > 0, got {max_cost!r}")
        if spend.price is None:
            raise ConfigurationError(
                f"max_cost needs the price of model {client.model_name!r}, which is not in the price table: "
                "pass prices={model_name: (input, output)} in USD per million tokens"
            )
    if dedupe is None:
        dedupe = params.temperature == 0  # identical prompts give identical answers only then
    n = len(prompts)
    columns: dict[str, list[Any]] = {name: [None] * n for name in RESULT_COLUMNS}
    outcome = RowResults(columns)

    # Rows that cannot be sent fail at once; the others are grouped by prompt (dedupe).
    valid: list[int] = []
    for i, prompt in enumerate(prompts):
        problem = check_prompt(prompt)
        if problem is None:
            valid.append(i)
        else:
            _store(columns, i, Result(error=problem))
    keys = row_keys([prompts[i] for i in valid])  # type: ignore[misc]

    store = None
    if checkpoint is not None:
        store = await asyncio.to_thread(Checkpoint.open, checkpoint, run_fingerprint(client, params),
                                        resume=resume, repair=repair)
    try:
        todo = valid
        position_key = dict(zip(valid, keys))
        if store is not None:
            todo, moved = _restore(store, valid, keys, columns, retry_errors)
            outcome.restored = len(valid) - len(todo)
            if moved:  # rows inserted above earlier answers: record where those answers sit now
                await _flush(store, moved, prompts, columns, position_key)
        groups: dict[str, list[int]] = {}
        for i in todo:
            groups.setdefault(prompts[i] if dedupe else i, []).append(i)  # type: ignore[arg-type]

        bar = _Progress(n, progress, initial=n - len(todo), spend=spend,
                        errors=sum(1 for e in columns["error"] if e is not None))
        try:
            limits = {"max_concurrent": max_concurrent, "max_retries": max_retries,
                      "requests_per_minute": requests_per_minute, "tokens_per_minute": tokens_per_minute}
            await _send_groups(groups, prompts, client, params, limits, chunk_size,
                               store, columns, position_key, bar, outcome, max_cost)
        finally:
            bar.close()
    finally:
        if store is not None:
            await asyncio.to_thread(store.close)
    return outcome


def _restore(store: Checkpoint, valid: list[int], keys: list[tuple[str, int]], columns: dict[str, list[Any]],
             retry_errors: bool) -> tuple[list[int], list[int]]:
    """Fill rows answered by an earlier run from the checkpoint.

    Returns the rows still to send, and the restored rows whose position changed since they were stored.
    """
    records = store.records()
    if records.empty:
        return valid, []
    stored = {
        (h, int(o)): (int(p), row)
        for h, o, p, row in zip(records["prompt_hash"], records["occurrence"], records["position"],
                                records[RESULT_COLUMNS].itertuples(index=False, name=None))
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


async def _send_groups(groups: dict[Any, list[int]], prompts: Sequence[object], client: Client,
                       params: GenerationParams, limits: dict[str, Any], chunk_size: int, store: Checkpoint | None, columns: dict[str, list[Any]],
                       position_key: dict[int, tuple[str, int]], bar: _Progress, outcome: RowResults,
                       max_cost: float | None) -> None:
    if not groups:
        return

    def items() -> Iterator[tuple[list[int], list[dict[str, str]]]]:
        for rows in groups.values():
            yield rows, [{"role": "user", "content": prompts[rows[0]]}]  # type: ignore[dict-item]

    writer = None if store is None else _Writer(store, prompts, columns, position_key, chunk_size)
    async with client.engine(**limits, on_status=bar.show_status) as engine:

        def receive(rows: list[int], result: Result) -> None:
            error = result.error
            sent = error is None or error.sent
            outcome.sent += sent
            if error is None:
                bar.spend.add(result.prompt_tokens if result.prompt_tokens is not None
                              else estimate_tokens(prompts[rows[0]]),  # type: ignore[arg-type]
                              result.completion_tokens or 0)
                if max_cost is not None and bar.spend.usd >= max_cost:  # type: ignore[operator]
                    engine.stop(_budget_reached(max_cost, bar.spend))
            for i in rows:
                _store(columns, i, result)
            bar.advance(len(rows), error is not None)
            # Unsent rows, and rows that met an error of the run rather than of the row (a bad
            # key, a server that is down), stay out of the checkpoint: a resume sends them.
            if writer is not None and sent and not (error is not None and error.fatal):
                writer.add(rows)

        try:
            async for rows, result in engine.stream(items(), params):
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

    def __init__(self, store: Checkpoint, prompts: Sequence[object], columns: dict[str, list[Any]],
                 position_key: dict[int, tuple[str, int]], chunk_size: int,
                 interval: float | None = None) -> None:
        self._store, self._prompts, self._columns, self._position_key = store, prompts, columns, position_key
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
                await _flush(self._store, rows, self._prompts, self._columns, self._position_key)
            if self._closing and not self._pending:
                return


async def _flush(store: Checkpoint, rows: list[int], prompts: Sequence[object], columns: dict[str, list[Any]],
                 position_key: dict[int, tuple[str, int]]) -> None:
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


def _budget_reached(max_cost: float, spend: Spend) -> NotSentError:
    return NotSentError(
        f"not sent: the run reached max_cost=${max_cost:g} (${spend.usd:.4f} spent on "
        f"{spend.tokens:,} tokens)",
        suggestion="Run again with a higher max_cost (or none) to continue: with a checkpoint, "
                   "answered rows are kept and only these rows are sent.",
        sent=False,
    )


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
