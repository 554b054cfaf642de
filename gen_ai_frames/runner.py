"""Row runs: prompts in, one result per row out, with dedupe, checkpoints and a progress bar.

The accessor, the CLI and the Dask engine all run rows through :func:`run_rows`. Rows are fed to
the engine lazily, so concurrency never drains at a chunk boundary. Answers go to the checkpoint
from a background writer (:class:`_Writer`): receiving never waits for a write, and each write
takes whatever is pending as one part (group commit), so a slow disk means fewer, larger parts
rather than answers piling up unsaved. A crash loses only the rows in flight plus those received
since the last write began; an interrupt, an error or a stop writes everything received first.

Ten million rows fit on one machine because nothing here holds a Python object per row for the
whole run: prompts stay an Arrow column (read a slice at a time while sending), results are
Arrow columns (:class:`~gen_ai_frames.results.ResultBuffer`, whose batches are also the
checkpoint's parts), row keys are NumPy arrays hashed over the whole column at once
(:mod:`gen_ai_frames.keys`) and let go once they have matched and grouped the rows (a checkpoint
part's keys are hashed again from its prompts when it is written), and a resume matches rows
against the stored keys alone, reading the stored answers only once the new rows are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .batch import run_batch
from .cache import RunCache
from .checkpoint import Checkpoint, run_fingerprint
from .checkpoint import _fix_text as fix_text
from .client import Client
from .engine import Result
from .errors import ConfigurationError, RequestError
from .keys import (
    KEY_SCHEME,
    PromptKeys,
    StoredKeys,
    hashes_for,
    hashes_to_hex,
    keys_for,
    keys_for_chunks,
    match_keys,
)
from .memory import in_thread, release_unused
from .options import RunOptions
from .params import Message
from .pricing import Budget, Spend, batch_price_for, estimate_tokens, price_for
from .prompts import Prompts
from .ratelimit import SharedLimits, current_shared_limits
from .results import DETAIL_COLUMNS, RESULT_COLUMNS, ResultBuffer, RowValues, arrow_array, pandas_array

__all__ = [
    "DETAIL_COLUMNS",
    "RowResults",
    "kept_columns",
    "one_progress_bar",
    "output_names",
    "result_values",
    "run_rows",
]

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
    """The run's result columns, one value per row, as Arrow arrays (``arrays``: the columns the
    run was asked to keep, see :func:`run_rows`); ``sent`` counts requests made this run,
    ``cached`` the rows answered from the response cache."""

    arrays: dict[str, pa.ChunkedArray]
    restored: int = 0
    sent: int = 0
    cached: int = 0
    fatal: RequestError | None = None

    @functools.cached_property
    def columns(self) -> dict[str, list[Any]]:
        """The kept columns as Python lists, built on first use (handy in tests and small runs; a
        big run should use :attr:`arrays` or :meth:`frame_columns`)."""
        return {name: array.to_pylist() for name, array in self.arrays.items()}

    def __len__(self) -> int:
        return len(self.arrays["error"])

    def frame_columns(self, options: RunOptions) -> dict[str, pd.api.extensions.ExtensionArray]:
        """Every output column of the run as a pandas array, keyed like :func:`output_names`.
        Text columns share the run's Arrow buffers (pandas' Arrow-backed ``string`` dtype)."""
        names = _result_names(options)
        columns = {name: pandas_array(name, self.arrays[name]) for name in names}
        if options.schema is not None:  # failed rows have no response, so every answer here is valid JSON
            columns.update(options.schema.columns_from_answers(self.arrays["response"].to_pylist()))
        if options.logprobs:
            columns["confidence"] = self.confidence()
        return columns

    def take_arrow_columns(
        self, options: RunOptions, *, text: pa.DataType | None = None
    ) -> dict[str, pa.ChunkedArray | pa.Array]:
        """Every output column of the run as an Arrow array, keyed like :func:`output_names`:
        the result columns in their output types (text as ``text``, when given: see
        :func:`~gen_ai_frames.results.arrow_array`), a schema's fields typed as
        :meth:`~gen_ai_frames.schema.Schema.arrow_types` says (enums as dictionaries),
        ``confidence`` as float64. No pandas on the way: the polars front end builds its columns
        from these, with ``text=pa.string_view()``, the layout polars holds text in.

        The result columns are moved out of :attr:`arrays` (columns kept for other uses stay), one
        chunk at a time: each goes as soon as it is cast, so a million rows' offsets (8 bytes a
        row) and the views made from them (16) are never all held at once.
        """
        derived: dict[str, pa.ChunkedArray | pa.Array] = {}
        if options.schema is not None:
            derived.update(options.schema.arrow_columns_from_answers(self.arrays["response"].to_pylist()))
        if options.logprobs:
            import pyarrow.compute as pc

            derived["confidence"] = pc.exp(arrow_array("logprob", self.arrays["logprob"]))
        names = _result_names(options)
        # Columns without any value first: their buffers go before any views are made.
        order = sorted(names, key=lambda name: self.arrays[name].null_count < len(self.arrays[name]))
        cast = {name: _cast_moving(name, self.arrays.pop(name), text) for name in order}
        return {**{name: cast[name] for name in names}, **derived}

    def confidence(self) -> pd.api.extensions.ExtensionArray:
        """The probability of each answer, from its log-probability; NA where none was returned."""
        return np.exp(pandas_array("logprob", self.arrays["logprob"]))


def _cast_moving(name: str, column: pa.ChunkedArray, text: pa.DataType | None) -> pa.ChunkedArray | pa.Array:
    """Result column ``name`` cast as :func:`~gen_ai_frames.results.arrow_array` says, chunk by
    chunk, letting each source chunk go once it is cast (the caller hands its only reference over).

    With ``text``, a column without any value comes back as Arrow's ``null`` type, which holds no
    buffer: null views would cost 16 bytes a row."""
    if text is not None and len(column) and column.null_count == len(column):
        return pa.nulls(len(column))
    if column.num_chunks < 2:
        return arrow_array(name, column, text=text)
    chunks = column.chunks
    del column
    cast = []
    while chunks:
        cast.append(arrow_array(name, chunks.pop(0), text=text))
    return pa.chunked_array(cast)


def _result_names(options: RunOptions) -> list[str]:
    """The result columns the output shows: ``response`` and ``error``, and the details if asked."""
    return RESULT_COLUMNS if options.details else ["response", "error"]


def kept_columns(options: RunOptions, *also: str) -> list[str]:
    """The result columns a caller of :func:`run_rows` needs to build its output: ``response`` and
    ``error``, the details with ``details=True``, ``logprob`` with ``logprobs=True``, and ``also``.

    >>> kept_columns(RunOptions(), "error_type")
    ['response', 'error', 'error_type']
    """
    names = _result_names(options)
    if options.logprobs:
        names = [*names, "logprob"]
    return list(dict.fromkeys([*names, *also]))


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


async def run_rows(
    prompts: Prompts | Sequence[object],
    *,
    client: Client,
    options: RunOptions,
    keep: Sequence[str] | None = None,
    cache: RunCache | None = None,
) -> RowResults:
    """Answer every row's prompt; see :meth:`GenAIAccessor.generate` for the options.

    ``keep``: the result columns the caller needs (:func:`kept_columns`; default: all of them);
    only those are held for the whole run. ``options.repair`` opens a damaged checkpoint as
    :func:`~gen_ai_frames.checkpoint.repair_checkpoint` would (dropping unreadable parts,
    rebuilding a lost manifest), with a warning, instead of raising ``CheckpointCorruptError``.
    ``cache``: a response cache the caller opened and will close (a plan's, shared by its sample
    runs), used instead of opening one per ``options.cache``.

    >>> results = await run_rows(["Hi", None], client=client, options=RunOptions())  # doctest: +SKIP
    >>> results.columns["error"][1]  # doctest: +SKIP
    'the prompt is missing (None or NaN)'
    """
    try:
        return await _answer_rows(prompts, client=client, options=options, keep=keep, cache=cache)
    finally:
        # The run's row numbers go only now that it returns. glibc keeps the freed pages of arrays
        # this big until trimmed, and the caller's conversion to its frame comes next.
        release_unused()


async def _answer_rows(
    prompts: Prompts | Sequence[object],
    *,
    client: Client,
    options: RunOptions,
    keep: Sequence[str] | None,
    cache: RunCache | None,
) -> RowResults:
    if not isinstance(prompts, Prompts):
        prompts = Prompts.check(prompts)
    valid = _row_numbers(np.flatnonzero(prompts.sendable_mask()))
    if options.mode == "batch":
        _check_batch(client, options, bool(len(valid)))
    price = (batch_price_for if options.mode == "batch" else price_for)(
        client.model_name, options.prices, client.provider.name
    )
    budget = Budget(price, options.max_cost, client.model_name)
    n = len(prompts)
    buffer = ResultBuffer(
        n, list(RESULT_COLUMNS if keep is None else keep), record=options.checkpoint is not None
    )
    outcome = RowResults({})
    for i, problem in prompts.failed.items():  # rows that cannot be sent fail at once
        buffer.add([i], result_values(Result(error=problem)), store=False)

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
    run = _Run(prompts, buffer, store)
    try:
        dedupe = options.sends_duplicates_once
        scheme = KEY_SCHEME if store is None else store.key_scheme
        keys: PromptKeys | None = None
        if len(valid) and (store is not None or dedupe):
            # Keys match rows to checkpoint records and find duplicates: hashed over the whole
            # column at once, in the checkpoint's own scheme.
            keys = await in_thread(_row_keys, prompts, valid, scheme)
        todo, restored = valid, _Restored.none()
        if store is not None and len(valid):
            assert keys is not None
            todo, restored = await in_thread(_match, store, keys, valid, options.retry_errors)
            outcome.restored = len(restored.rows)
        groups = _Groups.of(todo, keys, valid if dedupe else None)
        if store is not None:
            # From here on a part's keys are hashed again from its prompts when it is written:
            # the run holds only the occurrences that are not 0, not 20 bytes a row.
            run.keys = _RecordKeys(scheme, valid, None if keys is None else keys.occurrence)
        del keys
        if groups:  # rows all restored from the checkpoint need no cache
            run.cache = cache if cache is not None else await RunCache.for_run(client, options)
        if run.cache is not None:
            outcome.cached = await _answer_from_cache(run, groups)

        errors = len(prompts.failed) + restored.failed
        outer = _one_bar.get() if options.progress else None
        already = n - len(todo) + outcome.cached
        if outer is not None:  # one bar for several runs (the batches of a file)
            bar = outer
            bar.cached += outcome.cached
            bar.adopt(already, errors, budget.spend)
        else:
            bar = _Progress(
                n,
                options.progress and n > 0,
                initial=already,
                spend=budget.spend,
                errors=errors,
                feed=current_shared_limits(),
            )
            bar.cached = outcome.cached
        try:
            if options.mode == "batch":
                await run_batch(run, groups.as_dict(), client, options, budget, bar, outcome)
            else:
                await _send_groups(run, groups, client, options, budget, bar, outcome)
        finally:
            if bar is not outer:
                bar.close()
        if store is not None and len(restored.rows):
            # The answers of earlier runs, read now that nothing waits for them; rows inserted
            # above them are stored again at their new position.
            await in_thread(restored.load, store, buffer)
            if len(restored.moved):
                await run.write(*await in_thread(restored.moved_records, store))
        outcome.arrays = buffer.columns()  # which hands back what placing the last windows freed
    finally:
        try:
            if run.cache is not None and run.cache is not cache:  # the caller's stays open
                await run.cache.close()
        finally:
            if store is not None:
                await asyncio.to_thread(store.close)
    return outcome


def _row_numbers(rows: np.ndarray) -> np.ndarray:
    """``rows`` as int32 where they fit: a run holds its sendable rows while it sends, and 4 bytes
    a row is 4 MB less per million rows than NumPy's int64.

    >>> _row_numbers(np.array([0, 5])).dtype
    dtype('int32')
    """
    return rows.astype(np.int32) if len(rows) and rows[-1] < 2**31 else rows


def result_values(result: Result, *, cached: bool = False) -> RowValues:
    """A result's value of each of ``RESULT_COLUMNS``, in their order; ``cached``: it came from
    the response cache."""
    error = result.error
    if error is None:
        failure: tuple[Any, ...] = (None, None, None, None, result.attempts)
    else:
        failure = (error.message, error.type, error.suggestion, error.status_code, error.attempts)
    return (
        result.text,
        *failure,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.latency_s,
        result.logprob,
        cached,
    )


def _row_keys(prompts: Prompts, valid: np.ndarray, scheme: str) -> PromptKeys:
    """The keys of the sendable rows ``valid``, hashed over their Arrow buffers where they fit, a
    bounded piece at a time (the column is never copied whole; the keys do not depend on chunks)."""
    try:
        return keys_for_chunks(prompts.pieces(valid), scheme, rows=len(valid))
    except UnicodeEncodeError:  # lone surrogates: keys.py encodes them as the checkpoint always has
        return keys_for(prompts.texts_of(valid), scheme)


@dataclass
class _Restored:
    """Rows answered by an earlier run: ``rows`` (positions), ``index`` (their records in
    ``stored``), ``moved`` (those stored at another position) and ``failed`` (how many hold an
    error)."""

    rows: np.ndarray
    index: np.ndarray
    stored: StoredKeys | None
    moved: np.ndarray
    failed: int

    @classmethod
    def none(cls) -> _Restored:
        empty = np.zeros(0, dtype=np.int64)
        return cls(empty, empty, None, empty, 0)

    def load(self, store: Checkpoint, buffer: ResultBuffer) -> None:
        """Put the stored answers in ``buffer`` (only the columns it keeps)."""
        assert self.stored is not None
        buffer.add_table(self.rows, store.load_results(self.stored, self.index, buffer.keep))

    def moved_records(self, store: Checkpoint) -> tuple[np.ndarray, pa.Table]:
        """The moved rows' positions and every result column of their records."""
        assert self.stored is not None
        picked = np.flatnonzero(np.isin(self.rows, self.moved))
        return self.rows[picked], store.load_results(self.stored, self.index[picked], RESULT_COLUMNS)


def _match(
    store: Checkpoint, keys: PromptKeys, valid: np.ndarray, retry_errors: bool
) -> tuple[np.ndarray, _Restored]:
    """Match the sendable rows ``valid`` to the checkpoint's records by key, reading only the
    stored keys. Returns the rows still to send and the restored ones."""
    stored = store.stored_keys()
    if not len(stored):
        return valid, _Restored.none()
    hit = match_keys(keys, stored, positions=valid)
    found = hit >= 0
    if retry_errors:
        found &= ~stored.failed[np.maximum(hit, 0)]
    rows, index = valid[found], hit[found]
    failed = int(stored.failed[index].sum())
    moved = rows[stored.position[index] != rows]
    return valid[~found], _Restored(rows, index, stored, moved, failed)


class _Groups:
    """The requests of a run: each ``leader`` row is sent, and its answer also fills the rows
    that share its prompt (``followers``, with dedupe). Held as an array, not a list per row.

    >>> groups = _Groups(np.array([0, 1]), {0: [2]})
    >>> groups.rows(0), groups.rows(1), len(groups)
    ([0, 2], [1], 2)
    """

    def __init__(self, leaders: np.ndarray, followers: dict[int, list[int]]) -> None:
        self.leaders = leaders
        self.followers = followers

    @classmethod
    def of(cls, todo: np.ndarray, keys: PromptKeys | None, valid: np.ndarray | None) -> _Groups:
        """One request per row of ``todo``; with ``valid`` (dedupe: the rows ``keys`` belong to),
        one per distinct prompt, whose first row leads."""
        if valid is None or keys is None or len(todo) < 2 or not keys.occurrence.any():
            return cls(todo, {})  # no prompt repeats
        at = np.searchsorted(valid, todo)
        hashes = keys.hashes[at]
        frame = pd.DataFrame({"a": hashes[:, 0], "b": hashes[:, 1]})
        repeated = frame.duplicated(keep=False).to_numpy()
        if not repeated.any():
            return cls(todo, {})
        followers: dict[int, list[int]] = {}
        drop = np.zeros(len(todo), dtype=bool)
        shared = frame[repeated].groupby(["a", "b"], sort=False).indices
        dup_rows = np.flatnonzero(repeated)
        for members in shared.values():
            rows = todo[dup_rows[members]].tolist()
            followers[rows[0]] = rows[1:]
            drop[dup_rows[members[1:]]] = True
        return cls(todo[~drop], followers)

    def __len__(self) -> int:
        return len(self.leaders)

    def rows(self, leader: int) -> list[int]:
        return [leader, *self.followers.get(leader, ())]

    def keep_only(self, mask: np.ndarray) -> None:
        """Keep the leaders where ``mask`` is True (the others were answered another way)."""
        self.leaders = self.leaders[mask]

    def as_dict(self) -> dict[int, list[int]]:
        return {leader: self.rows(leader) for leader in self.leaders.tolist()}


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


async def _answer_from_cache(run: _Run, groups: _Groups) -> int:
    """Answer the groups the cache holds: they leave ``groups``, so they are not sent, not rate
    limited and not charged. Returns the rows answered. Those rows still go to the checkpoint,
    which records every row of a run."""
    cache = run.cache
    assert cache is not None
    answered = 0
    hit = np.zeros(len(groups), dtype=bool)
    leaders = groups.leaders
    # In slices, so a million rows never hold a million keys at once.
    for start in range(0, len(leaders), _LOOKUP_ROWS):
        chunk = leaders[start : start + _LOOKUP_ROWS]
        keys = cache.keys.keys(run.prompts.texts_of(chunk))
        hits = await cache.lookup(list(dict.fromkeys(keys)))
        for offset, (leader, key) in enumerate(zip(chunk.tolist(), keys) if hits else ()):
            answer = hits.get(key)
            if answer is not None:
                response, finish, tokens_in, tokens_out, logprob = answer
                # No error, no status, no latency: attempts 0 and cached True say where it came from.
                answered_by_cache = Result(
                    text=response,
                    finish_reason=finish,
                    prompt_tokens=tokens_in,
                    completion_tokens=tokens_out,
                    attempts=0,
                    logprob=logprob,
                )
                values = result_values(answered_by_cache, cached=True)
                rows = groups.rows(leader)
                run.buffer.add(rows, values)
                answered += len(rows)
                hit[start + offset] = True
    groups.keep_only(~hit)
    if run.store is not None:
        await run.flush()
    return answered


# Groups looked up in the cache at a time.
_LOOKUP_ROWS = 20_000


class _RecordKeys:
    """How a checkpointed run keys the records it writes, holding next to nothing per row: the key
    scheme, and the occurrence of each row whose prompt came earlier (usually none). A record's
    hash is computed again from its prompt (:func:`~gen_ai_frames.keys.hashes_for`), which gives
    the hash the rows were matched with, since a hash depends on its own prompt alone.

    >>> keys = _RecordKeys(KEY_SCHEME, np.array([0, 2, 5]), np.array([0, 1, 0], dtype=np.int32))
    >>> keys.occurrence(np.array([5, 2, 0])).tolist()
    [0, 1, 0]
    """

    def __init__(self, scheme: str, valid: np.ndarray, occurrence: np.ndarray | None) -> None:
        self.scheme = scheme
        if occurrence is None:
            occurrence = np.zeros(len(valid), dtype=np.int32)
        repeated = np.flatnonzero(occurrence)
        self._repeated_rows = valid[repeated]  # ascending, as ``valid`` is
        self._repeated_occurrence = occurrence[repeated]

    def occurrence(self, positions: np.ndarray) -> np.ndarray:
        """The occurrence (int32) of the rows at ``positions``."""
        out = np.zeros(len(positions), dtype=np.int32)
        rows = self._repeated_rows
        if len(rows):
            at = np.minimum(np.searchsorted(rows, positions), len(rows) - 1)
            hit = rows[at] == positions
            out[hit] = self._repeated_occurrence[at[hit]]
        return out

    def of(self, prompts: Prompts, positions: np.ndarray) -> tuple[pa.Array, np.ndarray, pa.Array]:
        """The rows' prompt column (lone surrogates as U+FFFD, which UTF-8 cannot hold), their
        hashes and their occurrences."""
        try:
            column = prompts.take(positions)  # only the pieces holding these rows are read
            hashes = hashes_for(column, self.scheme)
        except UnicodeEncodeError:  # hashed as they were matched: keys.py encodes them itself
            texts = prompts.texts_of(positions)
            hashes = hashes_for(texts, self.scheme)
            column = pa.array([fix_text(t) for t in texts], pa.large_string())
        return column, hashes, pa.array(self.occurrence(positions), pa.int32())


@dataclass
class _Run:
    """What one run's rows share while they are sent: their prompts, the result buffer, the
    checkpoint and how its records are keyed."""

    prompts: Prompts
    buffer: ResultBuffer
    store: Checkpoint | None
    #: How records are keyed (set once the rows are matched; None without a checkpoint).
    keys: _RecordKeys | None = None
    #: The response cache, which stores the answers received (None: no cache).
    cache: RunCache | None = None

    def keys_of(self, rows: Sequence[int]) -> list[tuple[str, int]]:
        """Each row's key: its prompt hash (hex) and occurrence."""
        assert self.keys is not None
        positions = np.asarray(rows, dtype=np.int64)
        _, hashes, occurrence = self.keys.of(self.prompts, positions)
        return list(zip(hashes_to_hex(hashes).to_pylist(), occurrence.to_pylist()))

    async def flush(self) -> None:
        """Write every result received and not stored yet to the checkpoint, as one part."""
        part = self.buffer.unwritten()
        if part is not None:
            await self.write(*part)

    async def write(self, positions: np.ndarray, results: pa.Table) -> None:
        """Store the results of rows ``positions`` as one part. The record is built and encoded
        off the event loop, so requests keep flowing meanwhile."""
        store = self.store
        assert store is not None
        await in_thread(lambda: store.append(self._records(positions, results)))

    def _records(self, positions: np.ndarray, results: pa.Table) -> pa.Table:
        assert self.keys is not None
        prompt, hashes, occurrence = self.keys.of(self.prompts, positions)
        columns = {
            "position": pa.array(positions, pa.int64()),
            "prompt_hash": hashes_to_hex(hashes),
            "occurrence": occurrence,
            "prompt": prompt,
            **{name: results.column(name) for name in RESULT_COLUMNS},
        }
        return pa.table(columns)


async def _send_groups(
    run: _Run,
    groups: _Groups,
    client: Client,
    options: RunOptions,
    budget: Budget,
    bar: _Progress,
    outcome: RowResults,
) -> None:
    if not groups:
        return
    prompts, buffer, cache = run.prompts, run.buffer, run.cache

    def items() -> Iterator[tuple[list[int], list[Message]]]:
        # Texts are read a slice at a time: the engine pulls items lazily, so only the slice
        # being sent lives as Python strings.
        leaders = groups.leaders
        for start in range(0, len(leaders), _TEXT_SLICE):
            chunk = leaders[start : start + _TEXT_SLICE]
            for leader, text in zip(chunk.tolist(), prompts.texts_of(chunk)):
                yield groups.rows(leader), [{"role": "user", "content": text}]

    writer = None if run.store is None else _Writer(run, options.chunk_size)
    async with client.engine(**options.engine_limits, on_status=bar.show_status) as engine:

        def receive(rows: list[int], result: Result, messages: list[Message] | None = None) -> None:
            error = result.error
            sent = error is None or error.sent
            outcome.sent += sent
            text: str | None = None
            if error is None:
                prompt_tokens = result.prompt_tokens
                if prompt_tokens is None:
                    text = prompts.texts_of(rows[:1])[0]
                    prompt_tokens = estimate_tokens(text)
                stop = budget.charge(prompt_tokens, result.completion_tokens or 0)
                if stop is not None:
                    engine.stop(stop)
            # Unsent rows, and rows that met an error of the run rather than of the row (a bad
            # key, a server that is down), stay out of the checkpoint: a resume sends them.
            buffer.add(rows, result_values(result), store=sent and not (error is not None and error.fatal))
            if error is None and cache is not None and cache.working:
                if text is None:
                    text = prompts.texts_of(rows[:1])[0]
                cache.put(cache.keys.key(text), result)
            bar.advance(len(rows), error is not None)
            if writer is not None:
                writer.poke()

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


# Prompts read into Python strings at a time while sending.
_TEXT_SLICE = 1024


class _Writer:
    """Writes answered rows to the checkpoint from a background task (group commit).

    :meth:`poke` only checks a count, so receiving never waits for the disk. The task writes as
    soon as ``chunk_size`` rows are pending (or ``interval`` seconds after the last write, when
    answers are slow), taking *everything* pending as one part: while a write is in progress the
    next rows pile up and go in the next part together. A failed write is raised by the next
    :meth:`poke` or by :meth:`close`, which writes whatever is still pending.
    """

    def __init__(self, run: _Run, chunk_size: int, interval: float | None = None) -> None:
        self._run_state = run
        self._buffer = run.buffer
        self._chunk_size = chunk_size
        self._interval = FLUSH_INTERVAL_S if interval is None else interval
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.ensure_future(self._run())

    def poke(self) -> None:
        if self._task.done():
            self._task.result()  # the write failed: stop the run with its error (CheckpointError)
        buffer = self._buffer
        if buffer.pending + buffer.unwritten_rows >= self._chunk_size:
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
            await self._run_state.flush()
            if self._closing and not (self._buffer.pending or self._buffer.unwritten_rows):
                return
