"""The result columns: their names, their Arrow types and their pandas dtypes, declared once.

Every row a run answers gets these values, whoever runs it: the pandas accessor turns them into
pandas columns (:func:`pandas_array`), the CLI into Arrow columns of its output file
(:func:`arrow_array`), and the checkpoint stores them in Parquet parts (:data:`RECORD_SCHEMA`).

>>> RESULT_COLUMNS[:2], DETAIL_COLUMNS[0]
(['response', 'error'], 'error_type')
>>> pandas_array("status_code", [429, None]).tolist()
[429, <NA>]
>>> arrow_array("latency_s", [0.5, None]).type
DataType(double)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from .memory import release_unused

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "DETAIL_COLUMNS",
    "KEY_FIELDS",
    "PANDAS_DTYPES",
    "RECORD_SCHEMA",
    "RESULT_COLUMNS",
    "RESULT_TYPES",
    "ResultBuffer",
    "ResultColumn",
    "arrow_array",
    "pandas_array",
]


@dataclass(frozen=True)
class ResultColumn:
    """One result column.

    ``arrow`` is its type in output files, ``pandas`` its dtype in frames; ``stored`` its type in
    checkpoint parts (narrower where the values are small: a status code fits in 32 bits).
    """

    name: str
    arrow: pa.DataType
    pandas: str
    stored: pa.DataType


_TEXT = (pa.string(), "string", pa.string())
_COUNT = (pa.int64(), "Int64", pa.int64())
_SMALL_COUNT = (pa.int64(), "Int64", pa.int32())

#: Every result column, in output order: ``response`` and ``error``, then the details.
COLUMNS: tuple[ResultColumn, ...] = (
    ResultColumn("response", *_TEXT),
    ResultColumn("error", *_TEXT),
    ResultColumn("error_type", *_TEXT),
    ResultColumn("error_suggestion", *_TEXT),
    ResultColumn("status_code", *_SMALL_COUNT),
    ResultColumn("attempts", *_SMALL_COUNT),
    ResultColumn("finish_reason", *_TEXT),
    ResultColumn("prompt_tokens", *_COUNT),
    ResultColumn("completion_tokens", *_COUNT),
    ResultColumn("latency_s", pa.float64(), "Float64", pa.float64()),
    # Sum of the answer's token log-probabilities, where asked for and offered (classify's confidence).
    ResultColumn("logprob", pa.float64(), "Float64", pa.float64()),
    # True where the answer came from the response cache (gen_ai_frames.cache) instead of a request.
    ResultColumn("cached", pa.bool_(), "boolean", pa.bool_()),
)

#: Result columns added after the checkpoint format's first version: parts written before them
#: read as null there.
ADDED_COLUMNS = frozenset({"logprob", "cached"})

#: Names of the result columns, after ``prompt``.
RESULT_COLUMNS: list[str] = [c.name for c in COLUMNS]

#: Extra columns of ``details=True``, after ``response`` and ``error``.
DETAIL_COLUMNS: list[str] = [c for c in RESULT_COLUMNS if c not in ("response", "error")]

#: Arrow type of each result column in output files.
RESULT_TYPES: dict[str, pa.DataType] = {c.name: c.arrow for c in COLUMNS}

#: pandas dtype of each result column in frames.
PANDAS_DTYPES: dict[str, str] = {c.name: c.pandas for c in COLUMNS}

#: The columns that key a stored record to an input row. ``position`` is the row's position in the
#: input when it was written; ``(prompt_hash, occurrence)`` matches records to rows on resume.
KEY_FIELDS: tuple[pa.Field, ...] = (
    pa.field("position", pa.int64(), nullable=False),
    pa.field("prompt_hash", pa.string(), nullable=False),
    pa.field("occurrence", pa.int32(), nullable=False),
)

#: Schema of one stored checkpoint record: the key, the prompt, then every result column.
RECORD_SCHEMA = pa.schema(
    [*KEY_FIELDS, pa.field("prompt", pa.string()), *(pa.field(c.name, c.stored) for c in COLUMNS)]
)


def pandas_array(
    name: str, values: Sequence[Any] | pa.Array | pa.ChunkedArray
) -> pd.api.extensions.ExtensionArray:
    """``values`` of result column ``name`` (Python values or Arrow) as a pandas array of its dtype
    (None becomes ``<NA>``); Arrow text is used as it is, not copied."""
    return pd.array(values, dtype=PANDAS_DTYPES[name])


def arrow_array(
    name: str, values: Sequence[Any] | pa.Array | pa.ChunkedArray, *, text: pa.DataType | None = None
) -> pa.Array | pa.ChunkedArray:
    """``values`` of result column ``name`` (Python values or Arrow) as Arrow of its output type;
    ``text``: another string type for Arrow values of a text column.

    Arrow text becomes ``string_view`` without a copy of its characters (the views point into the
    same buffer); where this pyarrow cannot cast to it, the column stays ``string``.

    >>> arrow_array("response", pa.array(["a"], pa.large_string()), text=pa.string_view()).type
    DataType(string_view)
    """
    kind = RESULT_TYPES[name]
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        return pa.array(values, type=kind)
    if text is not None and kind == pa.string():
        try:
            return values.cast(text)
        except pa.ArrowNotImplementedError:
            pass
    return values.cast(kind)


# One row's values, in RESULT_COLUMNS order.
RowValues = tuple[Any, ...]

#: Rows a buffer collects as Python values before it turns them into Arrow columns.
SEAL_ROWS = 4096
# Output rows put in order at a time by ResultBuffer.columns(): bounds the copies made on the way.
_WINDOW_ROWS = 1 << 16


class ResultBuffer:
    """The results of ``n`` rows, held as Arrow columns while a run receives them.

    A run answers rows out of order. :meth:`add` keeps each row's values (one tuple, shared by
    rows that share a request) until :data:`SEAL_ROWS` are pending, then :meth:`seal` turns them
    into Arrow arrays in the order they came: the checkpoint's next part (:meth:`unwritten`) and
    the run's output. The output keeps only the ``keep`` columns. As soon as every row of a window
    of rows has arrived, the window is put in row order (one Arrow take) and each batch is let go
    of once all its rows are placed: rows arrive nearly in order, so only the last few batches
    wait. So a run holds about one Arrow copy of its output, not a Python object per value, and
    :meth:`columns` at the end has little left to do.

    >>> buffer = ResultBuffer(3, keep=["response", "error"])
    >>> buffer.add([2], ("c",) + (None,) * 11)
    >>> buffer.add([0, 1], ("a",) + (None,) * 11)
    >>> buffer.columns()["response"].to_pylist()
    ['a', 'a', 'c']
    """

    def __init__(self, n: int, keep: Sequence[str], *, record: bool = False) -> None:
        self.n = n
        self.keep = list(keep)
        #: Also keep every result column of the stored rows until the checkpoint takes them.
        self.record = record
        self._rows: list[int] = []
        self._values: list[RowValues] = []
        self._stored: list[bool] = []
        self._batches: list[dict[str, pa.Array]] = []  # kept columns, in arrival order
        self._left: list[int] = []  # rows of each batch not placed in the output yet
        self._chunks: dict[str, list[pa.Array]] = {name: [] for name in self.keep}  # in row order
        self._placed = 0  # rows before this are in _chunks
        self._frontier = 0  # every row before this has arrived
        #: Rows sealed for the checkpoint and not handed over yet.
        self.unwritten_rows = 0
        self._unwritten: list[tuple[np.ndarray, pa.Table]] = []
        # Per window of rows not placed yet: which batch holds each row's result (row 0, -1: none
        # yet) and where in it (row 1). A window's index goes once it is placed, so a run nearly
        # done holds the index of its last windows only, not 8 bytes for each of its rows.
        self._index: dict[int, np.ndarray] = {}

    @property
    def pending(self) -> int:
        """Rows added and not sealed yet."""
        return len(self._rows)

    def add(self, rows: Sequence[int], values: RowValues, *, store: bool = True) -> None:
        """``values`` (one per result column) for every row of ``rows``; ``store``: the rows go to
        the checkpoint."""
        for i in rows:
            self._rows.append(i)
            self._values.append(values)
            self._stored.append(store)
        if len(self._rows) >= SEAL_ROWS:
            self.seal()

    def add_table(self, positions: np.ndarray, table: pa.Table) -> None:
        """Rows whose results are Arrow columns already (restored from a checkpoint): at least
        the ``keep`` columns; they are not stored again."""
        arrays = {name: _one_chunk(table.column(name)).cast(_BUFFER_TYPES[name]) for name in self.keep}
        self._place(np.asarray(positions, dtype=np.int64), arrays)

    def seal(self) -> None:
        """Turn the pending rows into Arrow columns."""
        if not self._rows:
            return
        positions = np.array(self._rows, dtype=np.int64)
        stored = np.array(self._stored, dtype=bool)
        by_column = list(zip(*self._values))
        self._rows, self._values, self._stored = [], [], []
        wanted = RESULT_COLUMNS if self.record and stored.any() else self.keep
        arrays = {
            name: pa.array(by_column[RESULT_COLUMNS.index(name)], type=_BUFFER_TYPES[name])
            for name in dict.fromkeys([*self.keep, *wanted])
        }
        del by_column
        if self.record and stored.any():
            table = pa.table({name: arrays[name] for name in RESULT_COLUMNS})
            if not stored.all():
                table, positions_stored = table.filter(pa.array(stored)), positions[stored]
            else:
                positions_stored = positions
            self._unwritten.append((positions_stored, table))
            self.unwritten_rows += table.num_rows
        self._place(positions, {name: arrays[name] for name in self.keep})

    def unwritten(self) -> tuple[np.ndarray, pa.Table] | None:
        """Seal, then hand over every sealed row to store: its positions and all result columns
        (the checkpoint's stored types are cast by the checkpoint). None when there is nothing."""
        self.seal()
        if not self._unwritten:
            return None
        taken, self._unwritten = self._unwritten, []
        self.unwritten_rows = 0
        if len(taken) == 1:
            return taken[0]
        return np.concatenate([p for p, _ in taken]), pa.concat_tables([t for _, t in taken])

    def _place(self, positions: np.ndarray, arrays: dict[str, pa.Array]) -> None:
        number = len(self._batches)
        self._batches.append(arrays)
        self._left.append(len(positions))
        window = positions // _WINDOW_ROWS
        # Rows arrive nearly in order, so a batch usually lies in one window; restored rows may
        # lie in all of them: grouped by window with one sort.
        order = np.argsort(window, kind="stable")
        bounds = np.flatnonzero(np.diff(window[order])) + 1
        for in_window in np.split(order, bounds) if len(order) else ():
            w = int(window[in_window[0]])
            index = self._window_index(w)
            at = positions[in_window] - w * _WINDOW_ROWS
            index[0, at] = number
            index[1, at] = in_window
        self._advance(final=False)

    def _window_index(self, w: int) -> np.ndarray:
        """Window ``w``'s index (see ``_index``), made when it is first needed."""
        index = self._index.get(w)
        if index is None:
            size = min(_WINDOW_ROWS, self.n - w * _WINDOW_ROWS)
            index = self._index[w] = np.stack([np.full(size, -1, np.int32), np.zeros(size, np.int32)])
        return index

    def _advance(self, final: bool) -> None:
        """Move the frontier over the rows that have arrived, then put every window below it in
        row order (every window, ``final``ly: rows that never got a result are null)."""
        n = self.n
        while self._frontier < n:
            w, offset = divmod(self._frontier, _WINDOW_ROWS)
            index = self._index.get(w)
            if index is None:  # no row of this window has arrived
                break
            missing = np.flatnonzero(index[0, offset:] < 0)
            if len(missing):
                self._frontier += int(missing[0])
                break
            self._frontier += index.shape[1] - offset
        placed = self._placed
        while self._placed < n:
            stop = min(self._placed + _WINDOW_ROWS, n)
            if stop > self._frontier and not final:
                break
            self._place_window(self._placed, stop)
            self._placed = stop
        if self._placed > placed:
            # Placing a window copies its rows and lets their batches go: a few MB a window that
            # the allocators would otherwise keep for this thread (see gen_ai_frames.memory).
            release_unused()

    def _place_window(self, start: int, stop: int) -> None:
        batches, chunks = self._batches, self._chunks
        which, where = self._window_index(start // _WINDOW_ROWS)
        del self._index[start // _WINDOW_ROWS]
        used, counts = np.unique(which[which >= 0], return_counts=True)
        if len(used) == 1 and counts[0] == len(which) and _is_run(where):
            source = batches[int(used[0])]  # one batch, in order: a slice, no copy
            for name in self.keep:
                chunks[name].append(source[name].slice(int(where[0]), len(where)))
        else:  # rows from several batches, or out of order: gather them
            self._gather(batches, used.tolist(), which, where, chunks)
        for b, count in zip(used.tolist(), counts.tolist()):
            self._left[b] -= count
            if self._left[b] == 0:
                batches[b] = {}  # every row of this batch is placed: let it go

    def columns(self) -> dict[str, pa.ChunkedArray]:
        """The ``keep`` columns in row order (null for rows that got no result). Ends the buffer."""
        self.seal()
        self._advance(final=True)
        chunks, self._chunks = self._chunks, {name: [] for name in self.keep}
        self._batches, self._left = [], []
        return {name: pa.chunked_array(chunks[name], type=_BUFFER_TYPES[name]) for name in self.keep}

    def _gather(
        self,
        batches: list[dict[str, pa.Array]],
        used: list[int],
        which: np.ndarray,
        where: np.ndarray,
        chunks: dict[str, list[pa.Array]],
    ) -> None:
        """One window's rows (row ``k`` is row ``where[k]`` of batch ``which[k]``, -1: no result),
        taken from each batch they sit in, then put in order."""
        picked = [np.flatnonzero(which == b) for b in used]
        order = np.full(len(which), -1, dtype=np.int64)
        if picked:
            arrived = np.concatenate(picked)
            order[arrived] = np.arange(len(arrived))
        index = pa.array(order, pa.int64(), mask=order < 0)
        for name in self.keep:
            if not picked:
                chunks[name].append(pa.nulls(len(which), _BUFFER_TYPES[name]))
                continue
            parts = [batches[b][name].take(pa.array(where[rows])) for b, rows in zip(used, picked)]
            chunks[name].append(pa.concat_arrays(parts).take(index))


def _is_run(where: np.ndarray) -> bool:
    """True when ``where`` counts up by one: rows that sit in order in their batch."""
    return bool(len(where) == 0 or (where[-1] - where[0] == len(where) - 1 and (np.diff(where) == 1).all()))


def _one_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


#: Types of the result columns while a run holds them: text as ``large_string``, which pandas'
#: Arrow-backed ``string`` dtype uses as it is (no copy into the frame).
_BUFFER_TYPES: dict[str, pa.DataType] = {
    c.name: pa.large_string() if c.arrow == pa.string() else c.arrow for c in COLUMNS
}
