"""Prompts: building them from a frame (a column or a template over columns) and checking them.

A row whose prompt cannot be sent (missing, empty, not text, a template field missing) is not an
exception for the whole call: it becomes an :class:`~gen_ai_frames.errors.InvalidPromptError` for
that row alone, kept apart from the sendable texts in :class:`Prompts`.

>>> import pandas as pd
>>> prompts = build_prompts(pd.DataFrame({"city": ["Paris", None]}), None, "Where is {city}?")
>>> prompts.texts, prompts.failed[1].message
(['Where is Paris?', None], "template field(s) ['city'] are missing in this row")
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .errors import ConfigurationError, InvalidPromptError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Prompts",
    "build_prompts",
    "build_prompts_from_columns",
    "check_prompt",
    "prompt_list",
    "template_fields",
]


class Prompts:
    """One entry per row: ``texts[i]`` is the text to send, or None when ``failed[i]`` says why not.

    A column of a million prompts is held as Arrow string arrays, not a million Python strings:
    the column's own chunks (a Parquet file's row groups, polars' ``string_view`` buffers), cut into
    zero-copy pieces of at most :data:`PIECE_ROWS` rows and never combined into one array. The
    runner reads the rows it sends a bounded piece at a time (:meth:`texts_of`, :meth:`take`,
    :meth:`pieces`); a ``string_view`` piece is cast to ``large_string`` only while it is read.
    ``texts`` builds the Python list on first use, for callers that want one.

    >>> prompts = Prompts.check(["Hi", "", 3])
    >>> prompts.texts, sorted(prompts.failed), prompts.sendable
    (['Hi', None, None], [1, 2], [0])
    >>> prompts.texts_of([0]), prompts.arrow().null_count
    (['Hi'], 2)
    """

    __slots__ = ("_chunks", "_starts", "_texts", "failed")

    def __init__(
        self,
        texts: list[str | None] | None,
        failed: dict[int, InvalidPromptError],
        *,
        array: pa.Array | pa.ChunkedArray | None = None,
    ) -> None:
        if (texts is None) == (array is None):
            raise TypeError("Prompts needs exactly one of texts and array")
        self._texts = texts
        self._chunks: list[pa.Array] = [] if array is None else _pieces_of(array)
        # Where each chunk starts, and (last) where the column ends.
        self._starts = np.cumsum([0, *map(len, self._chunks)], dtype=np.int64)
        self.failed = failed

    @classmethod
    def check(cls, values: Iterable[object]) -> Prompts:
        """Check each value with :func:`check_prompt`."""
        texts: list[str | None] = []
        failed: dict[int, InvalidPromptError] = {}
        for i, value in enumerate(values):
            problem = check_prompt(value)
            if problem is None:
                texts.append(value)  # type: ignore[arg-type]  # check_prompt accepts only str
            else:
                texts.append(None)
                failed[i] = problem
        return cls(texts, failed)

    @classmethod
    def check_arrow(cls, values: pa.Array | pa.ChunkedArray) -> Prompts:
        """:meth:`check` for an Arrow string column (``string``, ``large_string`` or ``string_view``),
        without a Python object per row and without copying the column: missing and blank prompts
        are found with Arrow compute piece by piece (blank as :meth:`str.isspace` defines it), and
        blank rows read as missing (null) afterwards.

        >>> prompts = Prompts.check_arrow(pa.chunked_array([["Hi", None], [" \\u3000"]]))
        >>> prompts.texts
        ['Hi', None, None]
        >>> [prompts.failed[i].message for i in sorted(prompts.failed)]
        ['the prompt is missing (None or NaN)', 'the prompt is empty or only whitespace']
        """
        import pyarrow.compute as pc

        kind = values.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise TypeError(f"check_arrow needs a string array, got {kind}")
        failed: dict[int, InvalidPromptError] = {}
        pieces = []
        start = 0
        for piece in _pieces_of(values):
            blank = pc.match_substring_regex(_large(piece), _BLANK_PATTERN).fill_null(False)
            if piece.null_count or pc.any(blank).as_py():
                missing = np.flatnonzero(piece.is_null().to_numpy(zero_copy_only=False))
                blanks = np.flatnonzero(blank.to_numpy(zero_copy_only=False))
                for i in missing.tolist():
                    failed[start + i] = check_prompt(None)  # type: ignore[assignment]
                for i in blanks.tolist():
                    failed[start + i] = check_prompt("")  # type: ignore[assignment]
                if len(blanks):
                    piece = _without(piece, blanks)
            pieces.append(piece)
            start += len(piece)
        return cls(None, failed, array=pa.chunked_array(pieces, type=kind))

    @property
    def chunks(self) -> list[pa.Array]:
        """The column's pieces as held (its own buffers, blanks made null): empty for prompts
        checked from Python values.

        >>> [len(chunk) for chunk in Prompts.check_arrow(pa.chunked_array([["a"], [], ["b", "c"]])).chunks]
        [1, 2]
        """
        return list(self._chunks)

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._texts is None else len(self._texts)

    @property
    def texts(self) -> list[str | None]:
        """Every row's text (None where it failed), as a Python list: built on first use."""
        if self._texts is None:
            self._texts = [text for chunk in self._chunks for text in chunk.to_pylist()]
        return self._texts

    def texts_of(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The texts of sendable ``rows``, in that order."""
        if self._texts is not None:
            texts = self._texts
            return [texts[i] for i in rows]  # type: ignore[misc]  # sendable rows have text
        return self.take(rows).to_pylist()

    def take(self, rows: Sequence[int] | np.ndarray) -> pa.Array:
        """The texts of ``rows`` (any order, any chunks) as a ``large_string`` array, null where a
        row failed; only the pieces that hold them are read.

        Prompts that Arrow cannot hold (lone surrogates) raise ``UnicodeEncodeError``, as :meth:`arrow`.

        >>> Prompts.check_arrow(pa.chunked_array([["a", "b"], ["c"]])).take([2, 0]).to_pylist()
        ['c', 'a']
        """
        positions = np.asarray(rows, dtype=np.int64)
        if self._texts is not None:
            texts = self._texts
            return _large_array([texts[i] for i in positions.tolist()])
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"Prompts.take(): rows must be in [0, {len(self)})")
        chunk = np.searchsorted(self._starts, positions, side="right") - 1
        in_order = bool((np.diff(chunk) >= 0).all())
        order = np.arange(len(positions)) if in_order else np.argsort(chunk, kind="stable")
        ordered = chunk[order]
        parts = []
        for group in np.split(order, np.flatnonzero(np.diff(ordered)) + 1):
            if len(group) == 0:
                continue
            c = int(chunk[group[0]])
            parts.append(_take_from(self._chunks[c], positions[group] - self._starts[c]))
        if not parts:
            return pa.array([], type=pa.large_string())
        joined = parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
        if in_order:
            return joined
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return joined.take(pa.array(back))

    def pieces(self, rows: np.ndarray) -> Iterator[pa.Array]:
        """The texts of ``rows`` (ascending) as ``large_string`` arrays of at most
        :data:`PIECE_ROWS` rows each, in order: a chunk's rows are a zero-copy slice where they are
        all of it, else a copy of those rows alone. For hashing a column without holding it twice.

        >>> prompts = Prompts.check_arrow(pa.chunked_array([["a", "b"], ["c"]]))
        >>> [piece.to_pylist() for piece in prompts.pieces(np.array([0, 2]))]
        [['a'], ['c']]
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self._texts is not None:
            for lo in range(0, len(rows), PIECE_ROWS):
                yield self.take(rows[lo : lo + PIECE_ROWS])
            return
        bounds = np.searchsorted(rows, self._starts)
        for c in range(len(self._chunks)):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            for at in range(lo, hi, PIECE_ROWS):
                yield _take_from(self._chunks[c], rows[at : min(hi, at + PIECE_ROWS)] - self._starts[c])

    def arrow(self) -> pa.Array:
        """Every row's text as one ``large_string`` Arrow array, null where the row failed: a copy
        of the whole column (the runner reads :meth:`take` and :meth:`pieces` instead).

        Prompts that Arrow cannot hold (lone surrogates, which pandas stores happily but UTF-8
        cannot) raise ``UnicodeEncodeError``: callers keep to :attr:`texts` then."""
        if self._texts is not None:
            return _large_array(self._texts)
        if not self._chunks:
            return pa.array([], type=pa.large_string())
        return pa.concat_arrays([_large(chunk) for chunk in self._chunks])

    def sendable_mask(self) -> np.ndarray:
        """A boolean array: True where the row can be sent."""
        mask = np.ones(len(self), dtype=bool)
        if self.failed:
            mask[np.fromiter(self.failed, dtype=np.int64, count=len(self.failed))] = False
        return mask

    @property
    def sendable(self) -> list[int]:
        """Positions of the rows that can be sent."""
        return np.flatnonzero(self.sendable_mask()).tolist()


#: Rows of the pieces a column is held and read in: bounds the copy a ``string_view`` piece's cast
#: makes (about 4 MB of ~55-character prompts).
PIECE_ROWS = 1 << 16


def _pieces_of(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    """The column's chunks cut into zero-copy slices of at most :data:`PIECE_ROWS` rows."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    return [chunk.slice(lo, PIECE_ROWS) for chunk in chunks for lo in range(0, len(chunk), PIECE_ROWS)]


def _large(piece: pa.Array) -> pa.Array:
    """A piece as ``large_string`` (the kernels' type): the piece itself if it is one already."""
    return piece if pa.types.is_large_string(piece.type) else piece.cast(pa.large_string())


def _take_from(piece: pa.Array, rows: np.ndarray) -> pa.Array:
    """Rows ``rows`` of one piece as ``large_string``: only the span they cover is cast, and a run
    of consecutive rows is a slice of it."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    span = _large(piece.slice(lo, hi - lo))
    if hi - lo == len(rows) and bool((np.diff(rows) == 1).all()):
        return span
    return span.take(pa.array(rows - lo))


def _without(piece: pa.Array, rows: np.ndarray) -> pa.Array:
    """The piece with ``rows`` made null: a new validity bitmap over the same buffers (no kernel
    for ``string_view`` could, and no text is copied)."""
    valid = piece.is_valid().to_numpy(zero_copy_only=False).copy()
    valid[rows] = False
    bits = np.packbits(np.concatenate([np.zeros(piece.offset, dtype=bool), valid]), bitorder="little")
    buffers = [pa.py_buffer(bits), *piece.buffers()[1:]]
    return pa.Array.from_buffers(piece.type, len(piece), buffers, offset=piece.offset)


def _large_array(texts: list[str | None]) -> pa.Array:
    try:
        return pa.array(texts, type=pa.large_string())
    except pa.ArrowInvalid as exc:
        raise UnicodeEncodeError("utf-8", "", 0, 1, f"a prompt cannot be UTF-8: {exc}") from None


# Whitespace as str.isspace() defines it, exactly: a prompt of only these characters is blank.
_BLANK_PATTERN = (
    "^[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}"
    "\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]*$"
)


def build_prompts(df: pd.DataFrame, column: Hashable | None, template: str | None) -> Prompts:
    """The prompt of every row: a column's values, or a template filled from each row.

    Exactly one of ``column`` and ``template`` is given. Problems with the frame as a whole (an
    unknown column, a bad template) raise a ConfigurationError; a problem with one row fails that row.

    >>> import pandas as pd
    >>> build_prompts(pd.DataFrame({"q": ["Hi", "  "]}), "q", None).failed[1].message
    'the prompt is empty or only whitespace'
    """
    if (column is None) == (template is None):
        raise ConfigurationError(
            "pass exactly one of column= (a column of prompts) or template= (e.g. 'Summarize: {text}')"
        )
    if template is not None:
        return _fill_template(df, template)
    _check_columns(df, [column])
    values = df[column]
    arrow = _arrow_strings(values.array)
    if arrow is not None:  # a string column backed by Arrow: checked without a Python str per row
        return Prompts.check_arrow(arrow)
    return Prompts.check(values.tolist())


def _arrow_strings(array: object) -> pa.ChunkedArray | None:
    """The Arrow data of a pandas string array backed by Arrow (pandas' default ``str`` and
    ``string`` dtypes with pyarrow), else None."""
    data = getattr(array, "_pa_array", None)
    if isinstance(data, pa.ChunkedArray) and (
        pa.types.is_string(data.type) or pa.types.is_large_string(data.type)
    ):
        return data
    return None


def template_fields(template: str) -> list[str]:
    """The columns a template reads, in order of first use; a ConfigurationError if it is unusable.

    >>> template_fields("{a} and {b[0]} and {a}")
    ['a', 'b']
    """
    if not isinstance(template, str):
        raise ConfigurationError(f"template must be a string, got {type(template).__name__}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigurationError(
            f"template {template!r} is not a valid format string ({err}); write fields as {{column}} "
            "and literal braces as {{ and }}"
        ) from None
    if not fields:
        raise ConfigurationError(
            f"template {template!r} has no {{column}} field: every row would get the same prompt"
        )
    names = []
    for name in fields:
        if name == "" or name.isdigit():
            raise ConfigurationError(f"template fields must name columns, like {{text}}; got {{{name}}}")
        names.append(name.split(".", 1)[0].split("[", 1)[0])
    return list(dict.fromkeys(names))


def _fill_template(df: pd.DataFrame, template: str) -> Prompts:
    import pandas as pd

    names = template_fields(template)
    if df.columns.nlevels > 1:
        # df["t"] on MultiIndex columns is a frame of sub-columns: a template would silently use
        # the first. There is no unambiguous way to name a sub-column in a format field.
        raise ConfigurationError(
            f"the frame has MultiIndex columns ({df.columns.nlevels} levels): template fields cannot name "
            f"a sub-column. Flatten the columns first, e.g. df.columns = ['_'.join(map(str, c)) for c in "
            "df.columns], or build the prompt column yourself and pass column=('level0', 'level1')"
        )
    _check_columns(df, names)

    def missing(v: object) -> bool:
        return v is None or (pd.api.types.is_scalar(v) and bool(pd.isna(v)))

    return _fill_rows(template, names, df[names].itertuples(index=False, name=None), missing)


def build_prompts_from_columns(
    names: Sequence[str],
    values: Callable[[str], Sequence[object]],
    column: str | None,
    template: str | None,
) -> Prompts:
    """:func:`build_prompts` for a frame that is not pandas: ``names`` are its columns and
    ``values(name)`` a column's Python values (``pl.Series.to_list``, ``pa.Array.to_pylist``).

    Missing values (None, NaN) and templates behave exactly as with pandas.

    >>> data = {"city": ["Paris", None], "n": [1, float("nan")]}
    >>> prompts = build_prompts_from_columns(list(data), data.__getitem__, None, "{city} {n}")
    >>> prompts.texts, prompts.failed[1].message
    (['Paris 1', None], "template field(s) ['city', 'n'] are missing in this row")
    """
    if (column is None) == (template is None):
        raise ConfigurationError(
            "pass exactly one of column= (a column of prompts) or template= (e.g. 'Summarize: {text}')"
        )
    fields: list[Any] = template_fields(template) if template is not None else [column]
    for name in fields:
        if name not in names:
            raise ConfigurationError(
                f"column {name!r} not found; the frame has columns {list(map(str, names))[:20]}"
            )
    if template is None:
        return Prompts.check(values(column))  # type: ignore[arg-type]  # checked above: a column name
    return _fill_rows(
        template, fields, zip(*(values(n) for n in fields)), lambda v: v is None or _is_missing(v)
    )


def _fill_rows(
    template: str, names: list[str], rows: Iterable[tuple[Any, ...]], missing: Callable[[object], bool]
) -> Prompts:
    """Fill ``template`` from each row (the values of ``names``); a row with a missing value fails."""
    texts: list[str | None] = []
    failed: dict[int, InvalidPromptError] = {}
    for i, row in enumerate(rows):
        gaps = [n for n, v in zip(names, row) if missing(v)]
        if gaps:
            failed[i] = InvalidPromptError(
                f"template field(s) {gaps} are missing in this row",
                sent=False,
                suggestion="Fill or drop the rows with missing values first.",
            )
            texts.append(None)
            continue
        try:
            text = template.format_map(dict(zip(names, row)))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            failed[i] = InvalidPromptError(f"template could not be filled for this row: {err!r}", sent=False)
            texts.append(None)
            continue
        problem = check_prompt(text)
        if problem is not None:
            failed[i] = problem
            texts.append(None)
        else:
            texts.append(text)
    return Prompts(texts, failed)


def _check_columns(df: pd.DataFrame, names: Sequence[Any]) -> None:
    for name in names:
        if name not in df.columns:
            raise ConfigurationError(
                f"column {name!r} not found; the frame has columns {list(map(str, df.columns))[:20]}"
            )
        if df.columns.nlevels == 1:
            count = int((df.columns == name).sum())
            if count > 1:
                raise ConfigurationError(
                    f"column {name!r} appears {count} times: rename the duplicates first"
                )
            continue
        selected = df[name]
        if selected.ndim > 1:  # a partial key of MultiIndex columns selects several sub-columns
            first = selected.columns[0]
            example = (
                *((name,) if not isinstance(name, tuple) else name),
                *(first if isinstance(first, tuple) else (first,)),
            )
            raise ConfigurationError(
                f"column {name!r} selects {selected.shape[1]} sub-columns of the frame's MultiIndex "
                f"columns; name one with a tuple, e.g. column={example!r}"
            )


def prompt_list(prompts: object) -> list[Any]:
    """Check that ``prompts`` is a sequence of prompt texts (None/NaN allowed: they fail per item).

    >>> prompt_list("Hi")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: prompts must be a list of strings, got one str: wrap it ...
    """
    if isinstance(prompts, (str, bytes)):
        raise ConfigurationError(
            f"prompts must be a list of strings, got one {type(prompts).__name__}: "
            "wrap it in a list, or call generate_response"
        )
    if not isinstance(prompts, Iterable) or isinstance(prompts, dict):
        raise ConfigurationError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    items = list(prompts)
    for i, prompt in enumerate(items):
        if not (prompt is None or isinstance(prompt, str) or _is_missing(prompt)):
            raise ConfigurationError(
                f"prompts must be a list of strings: prompts[{i}] is {type(prompt).__name__} "
                f"{_preview(prompt)}. "
                "Convert the prompts to text first, e.g. [str(p) for p in prompts]."
            )
    return items


def check_prompt(prompt: object) -> InvalidPromptError | None:
    """The per-item error for a prompt that must not be sent, or None if it is fine.

    >>> check_prompt("  ").message
    'the prompt is empty or only whitespace'
    """
    if prompt is None or _is_missing(prompt):
        return InvalidPromptError("the prompt is missing (None or NaN)", sent=False)
    if not isinstance(prompt, str):
        return InvalidPromptError(
            f"the prompt is {type(prompt).__name__} {_preview(prompt)}, not text",
            suggestion="Convert the column to text first, e.g. df[col].astype(str), or use a template.",
            sent=False,
        )
    if not prompt.strip():
        return InvalidPromptError("the prompt is empty or only whitespace", sent=False)
    return None


def _is_missing(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    # pandas.NA and NaT without importing pandas
    return type(value).__name__ in ("NAType", "NaTType")


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
