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

import pandas as pd
import pyarrow as pa

__all__ = [
    "ADDED_COLUMNS",
    "COLUMNS",
    "DETAIL_COLUMNS",
    "KEY_FIELDS",
    "PANDAS_DTYPES",
    "RECORD_SCHEMA",
    "RESULT_COLUMNS",
    "RESULT_TYPES",
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


def pandas_array(name: str, values: Sequence[Any]) -> pd.api.extensions.ExtensionArray:
    """``values`` of result column ``name`` as a pandas array of its dtype (None becomes ``<NA>``)."""
    return pd.array(values, dtype=PANDAS_DTYPES[name])


def arrow_array(name: str, values: Sequence[Any]) -> pa.Array:
    """``values`` of result column ``name`` as an Arrow array of its output type."""
    return pa.array(values, type=RESULT_TYPES[name])
