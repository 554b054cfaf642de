"""Tabular files in and out, in batches: CSV, TSV, Parquet and JSON Lines.

Inputs give their schema and row count up front, then batches of exactly ``batch_rows`` rows
(Parquet record batches, CSV and JSON Lines chunks), so memory follows the batch size, not the file
size. Outputs go to a hidden temporary file next to the target, renamed into place once complete,
so a killed run never leaves a cut-off file under the output's name.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigurationError

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "Output",
    "UsageError",
    "file_format",
    "is_nested",
    "nullable_ints",
    "open_input",
]


class UsageError(Exception):
    """A mistake of the user (bad option, missing file): reported as one line, exit status 2."""


INPUT_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
OUTPUT_FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# Text inputs may be compressed; only codecs of the standard library, so no extra dependency.
_OPENERS: dict[str, Callable[[Path], Any]] = {  # each returns a binary file object
    ".gz": lambda p: gzip.open(p, "rb"),
    ".bz2": lambda p: bz2.open(p, "rb"),
    ".xz": lambda p: lzma.open(p, "rb"),
}


def file_format(path: Path, formats: dict[str, str], what: str) -> tuple[str, str | None]:
    """``(format, compression suffix or None)`` of ``path``, from its extension.

    >>> file_format(Path("data.csv.gz"), INPUT_FORMATS, "input")
    ('csv', '.gz')
    >>> file_format(Path("data.xlsx"), INPUT_FORMATS, "input")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.files.UsageError: input 'data.xlsx': unknown file type '.xlsx'; use .csv, .tsv, ...
    """
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in _OPENERS else None
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in formats:
        shown = f"unknown file type {suffix!r}" if suffix else "no file extension"
        raise UsageError(f"{what} {str(path)!r}: {shown}; use {', '.join(formats)}")
    return formats[suffix], compression


# --------------------------------------------------------------------------------------------------
# Inputs: a schema known up front, a row count, and batches of exactly ``batch_rows`` rows


def nullable_ints(dtype: pa.DataType) -> Any:
    return pd.ArrowDtype(dtype) if pa.types.is_integer(dtype) else None


def is_nested(dtype: pa.DataType) -> bool:
    return pa.types.is_nested(dtype)


class _Input(contextlib.AbstractContextManager["_Input"]):
    schema: pa.Schema
    rows: int

    def batches(self) -> Iterator[pa.Table]:
        raise NotImplementedError

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        pass


def open_input(path: Path, fmt: str, compression: str | None, batch_rows: int) -> _Input:
    readers: dict[str, Callable[[], _Input]] = {
        "parquet": lambda: _ParquetInput(path, batch_rows),
        "csv": lambda: _CsvInput(path, ",", batch_rows),
        "tsv": lambda: _CsvInput(path, "\t", batch_rows),
        "jsonl": lambda: _JsonLinesInput(path, compression, batch_rows),
    }
    with _reading(path, fmt):
        return readers[fmt]()


@contextlib.contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Turn a reader's failure into one clear line (exit status 2) instead of a traceback."""
    try:
        yield
    except (UsageError, ConfigurationError):
        raise
    except (
        OSError,
        ValueError,
        UnicodeDecodeError,
        pa.ArrowException,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
    ) as exc:
        raise UsageError(f"cannot read {str(path)!r} as {_FORMAT_NAMES[fmt]}: {exc}") from None


_FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines"}


def _guarded(path: Path, fmt: str, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    while True:
        with _reading(path, fmt):
            table = next(batches, None)
        if table is None:
            return
        yield table


class _ParquetInput(_Input):
    """Record batches of a Parquet file: only one batch (plus a row group's pages) in memory."""

    def __init__(self, path: Path, batch_rows: int) -> None:
        self._path, self._batch_rows = path, batch_rows
        self._handle = open(path, "rb")
        try:
            self._file = pq.ParquetFile(self._handle)
        except BaseException:
            self._handle.close()
            raise
        # Pandas metadata describes the input's columns only: stale once results are appended.
        self.schema = self._file.schema_arrow.remove_metadata()
        self.rows = self._file.metadata.num_rows

    def batches(self) -> Iterator[pa.Table]:
        raw = self._file.iter_batches(batch_size=self._batch_rows, use_threads=False)
        return _guarded(self._path, "parquet", _rebatch(raw, self._batch_rows, self.schema))

    def close(self) -> None:
        self._handle.close()


def _rebatch(batches: Iterator[pa.RecordBatch], size: int, schema: pa.Schema) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last one shorter), whatever sizes the reader yields.

    Batch boundaries must not depend on the file's row groups: a resumed run matches batch k to the
    checkpoint's ``batch-k`` directory.

    >>> parts = [pa.record_batch({"x": list(range(n))}) for n in (3, 4, 1)]
    >>> [t.num_rows for t in _rebatch(iter(parts), 5, parts[0].schema)]
    [5, 3]
    """
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield pa.Table.from_batches(pending, schema=schema)
                pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending, schema=schema)


class _CsvInput(_Input):
    """CSV/TSV in chunks. Every column is read as text.

    A CSV file has no types: reading text keeps values exactly as written (ids like 00123, numbers
    that would turn into floats) and gives every batch the same schema, which the Parquet output
    needs. Only an empty field is missing ("NA" is text).

    No column is ever taken as an index: a row with more fields than the header (a trailing comma, as
    spreadsheet exports write) is refused, naming its line, instead of shifting every value one column
    to the right. A header that itself ends with the separator has an unnamed last column: dropped
    when it is empty in every row, refused when a row has a value there.
    """

    def __init__(self, path: Path, sep: str, batch_rows: int) -> None:
        self._path, self._sep, self._batch_rows = path, sep, batch_rows
        header = pd.read_csv(path, sep=sep, nrows=0, dtype=str, index_col=False)
        names = [str(name) for name in header.columns]
        # One pass to count rows and reject a malformed line before any request is paid for.
        self.rows, unnamed_last = self._check()
        self._drop = names[-1] if unnamed_last else None
        self.schema = pa.schema([pa.field(name, pa.string()) for name in names if name != self._drop])

    def _check(self) -> tuple[int, bool]:
        """``(data rows, whether the header's last name is empty)``; a UsageError for a row longer
        than the header, or for a value under an unnamed last column."""
        rows, unnamed_last = 0, False
        # header=None: the header line is row 0, so the parser expects its number of fields on every
        # line and reports the first longer one (with header=0 it would take an extra first field as
        # the index).
        with pd.read_csv(
            self._path,
            sep=self._sep,
            header=None,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            index_col=False,
            chunksize=self._batch_rows,
        ) as reader:
            try:
                for index, chunk in enumerate(reader):
                    if index == 0:
                        unnamed_last = chunk.shape[1] > 1 and pd.isna(chunk.iloc[0, -1])
                        chunk = chunk.iloc[1:]
                    if unnamed_last:
                        filled = chunk.iloc[:, -1].notna().to_numpy().nonzero()[0]
                        if len(filled):
                            row = rows + int(filled[0]) + 1
                            raise UsageError(
                                f"{str(self._path)!r} data row {row:,} has a value in the last column, whose "
                                "name in the header is empty (the header ends with a separator): name the "
                                "column in the header, or remove the value"
                            )
                    rows += len(chunk)
            except pd.errors.ParserError as exc:
                raise self._too_many_fields(exc) from None
        return rows, unnamed_last

    def _too_many_fields(self, exc: Exception) -> Exception:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if match is None:
            return exc  # another parse error: _reading reports it as one line
        expected, line, saw = match.groups()
        return UsageError(
            f"{str(self._path)!r} line {line} has {saw} fields but the header has {expected}: "
            "remove the extra field(s) (often a separator at the end of the line) or name the extra "
            "column(s) in the header; nothing was sent"
        )

    def _chunks(self) -> Iterator[pd.DataFrame]:
        with pd.read_csv(
            self._path,
            sep=self._sep,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            index_col=False,
            chunksize=self._batch_rows,
        ) as reader:
            for chunk in reader:
                yield chunk if self._drop is None else chunk.drop(columns=[self._drop])

    def batches(self) -> Iterator[pa.Table]:
        fmt = "tsv" if self._sep == "\t" else "csv"
        tables = (
            pa.Table.from_pandas(chunk, schema=self.schema, preserve_index=False).replace_schema_metadata(
                None
            )
            for chunk in self._chunks()
        )
        return _guarded(self._path, fmt, tables)


_MIXED = pa.string()  # a JSON field with values of incompatible types is written as JSON text


class _JsonLinesInput(_Input):
    """JSON Lines, one object per line, read ``batch_rows`` lines at a time.

    A first pass infers one schema for the whole file (fields in order of first appearance, types
    promoted across lines, e.g. int and float -> float) so that every batch has the same columns,
    and counts the rows; a field whose values have incompatible types (a number here, text there)
    becomes text, non-strings as JSON.
    """

    def __init__(self, path: Path, compression: str | None, batch_rows: int) -> None:
        self._path, self._compression, self._batch_rows = path, compression, batch_rows
        types: dict[str, pa.DataType] = {}
        self._mixed: set[str] = set()
        self.rows = 0
        for rows in self._chunks():
            self.rows += len(rows)
            for name in dict.fromkeys(k for row in rows for k in row):
                values = [row.get(name) for row in rows]
                try:
                    dtype = pa.array(values).type
                except (pa.ArrowException, OverflowError, TypeError, ValueError):
                    self._mixed.add(name)
                    dtype = _MIXED
                types[name] = _promote(types[name], dtype) if name in types else dtype
                if types[name] is None:
                    self._mixed.add(name)
        self.schema = pa.schema([pa.field(n, _MIXED if n in self._mixed else t) for n, t in types.items()])

    def _open(self) -> IO[bytes]:
        opener = _OPENERS.get(self._compression or "")
        return opener(self._path) if opener else open(self._path, "rb")

    def _chunks(self) -> Iterator[list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        with self._open() as lines:
            for number, line in enumerate(lines, start=1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                if not line.strip():
                    continue
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise UsageError(
                        f"{str(self._path)!r} line {number:,} is not valid JSON: {exc}"
                    ) from None
                if not isinstance(row, dict):
                    raise UsageError(
                        f"{str(self._path)!r} line {number:,} is not a JSON object "
                        f"({type(row).__name__}); JSON Lines input needs one object per line"
                    )
                rows.append(row)
                if len(rows) == self._batch_rows:
                    yield rows
                    rows = []
        if rows:
            yield rows

    def batches(self) -> Iterator[pa.Table]:
        def tables() -> Iterator[pa.Table]:
            for rows in self._chunks():
                arrays = []
                for f in self.schema:
                    values = [row.get(f.name) for row in rows]
                    if f.name in self._mixed:
                        values = [
                            v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in values
                        ]
                    arrays.append(pa.array(values, type=f.type))
                yield pa.Table.from_arrays(arrays, schema=self.schema)

        return _guarded(self._path, "jsonl", tables())


def _promote(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type holding values of both, or None if there is none.

    >>> _promote(pa.int64(), pa.float64()), _promote(pa.null(), pa.string())
    (DataType(double), DataType(string))
    >>> _promote(pa.int64(), pa.string()) is None
    True
    """
    if a == b:
        return a
    try:
        unified = pa.unify_schemas(
            [pa.schema([("x", a)]), pa.schema([("x", b)])], promote_options="permissive"
        )
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return unified.field("x").type


# --------------------------------------------------------------------------------------------------
# Output: written to a hidden temporary file next to OUTPUT, renamed into place once complete


class Output:
    """Appends batches to a temporary file; :meth:`commit` renames it to the output path.

    A killed or failed run never leaves a truncated file under the output's name (a cut CSV would
    look complete).
    """

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self.path, self.format, self.schema = path, fmt, schema
        _remove_stale_partials(path)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        self._parquet: pq.ParquetWriter | None = None
        self._file: IO[Any] | None = None
        with self._writing():
            if fmt == "parquet":
                self._parquet = pq.ParquetWriter(self.tmp, schema)
            elif fmt in ("csv", "tsv"):
                self._file = open(self.tmp, "w", encoding="utf-8", newline="")
                pd.DataFrame(columns=schema.names).to_csv(self._file, index=False, sep=self._sep)
            else:
                self._file = open(self.tmp, "wb")

    @property
    def _sep(self) -> str:
        return "\t" if self.format == "tsv" else ","

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except (OSError, pa.ArrowException) as exc:
            self.discard()
            raise UsageError(f"cannot write {str(self.path)!r}: {exc}") from None

    def write(self, table: pa.Table) -> None:
        with self._writing():
            if self._parquet is not None:
                self._parquet.write_table(table)  # one row group per batch
            elif self.format in ("csv", "tsv"):
                assert self._file is not None
                _csv_frame(table).to_csv(self._file, header=False, index=False, sep=self._sep)
            else:
                assert self._file is not None
                dumps = orjson.dumps
                self._file.write(b"".join(dumps(row, default=str) + b"\n" for row in table.to_pylist()))

    def _close(self) -> None:
        parquet, self._parquet = self._parquet, None
        handle, self._file = self._file, None
        if parquet is not None:
            parquet.close()
        if handle is not None:
            handle.close()

    def commit(self) -> None:
        with self._writing():
            self._close()
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):
            self._close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._parquet is not None or self._file is not None:  # not committed: an error left early
            self.discard()


def _remove_stale_partials(path: Path) -> None:
    """Delete temporary files of earlier runs that were killed (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.partial$")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            match = pattern.match(entry.name)
            if match and not _process_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _csv_frame(table: pa.Table) -> pd.DataFrame:
    data: dict[str, Any] = {}
    for name, column in zip(table.column_names, table.columns):
        if is_nested(column.type):
            # JSON text, not numpy's repr, for lists and structs.
            data[name] = [
                None if v is None else orjson.dumps(v, default=str).decode() for v in column.to_pylist()
            ]
        else:
            data[name] = column.to_pandas(types_mapper=nullable_ints)
    return pd.DataFrame(data)
