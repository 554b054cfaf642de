"""ResultBuffer: results held as Arrow columns while rows arrive out of order (issue 19)."""

from __future__ import annotations

import random
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import gen_ai_frames.results as results_module
from gen_ai_frames.prompts import Prompts, build_prompts
from gen_ai_frames.results import RESULT_COLUMNS, ResultBuffer


def _values(response: str, status: int | None = None) -> tuple:
    values: list = [None] * len(RESULT_COLUMNS)
    values[RESULT_COLUMNS.index("response")] = response
    values[RESULT_COLUMNS.index("status_code")] = status
    return tuple(values)


@pytest.mark.parametrize("seed", range(40))
def test_rows_in_any_order_come_out_in_row_order(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    # Tiny windows and batches, so every path (slices, gathers, empty windows) is taken.
    monkeypatch.setattr(results_module, "_WINDOW_ROWS", rng.randint(1, 9))
    monkeypatch.setattr(results_module, "SEAL_ROWS", rng.randint(1, 9))
    n = rng.randint(0, 80)
    buffer = ResultBuffer(n, ["response", "error", "status_code"], record=True)
    missing = set(rng.sample(range(n), n // 5))
    restored = sorted(rng.sample([i for i in range(n) if i not in missing], min(6, n - len(missing))))
    if restored:
        buffer.add_table(
            np.array(restored),
            pa.table(
                {
                    "response": pa.array([f"old {i}" for i in restored], pa.string()),
                    "error": pa.nulls(len(restored), pa.string()),
                    "status_code": pa.array(restored, pa.int32()),
                }
            ),
        )
    order = [i for i in range(n) if i not in missing and i not in restored]
    rng.shuffle(order)
    stored = []
    for i in order:
        keep = rng.random() < 0.7
        stored += [i] if keep else []
        buffer.add([i], _values(f"new {i}", i), store=keep)
    part = buffer.unwritten()
    columns = buffer.columns()

    expected = [None if i in missing else f"old {i}" if i in restored else f"new {i}" for i in range(n)]
    assert columns["response"].to_pylist() == expected
    assert columns["status_code"].to_pylist() == [None if i in missing else i for i in range(n)]
    assert set(columns) == {"response", "error", "status_code"}
    if stored:
        positions, table = part
        assert sorted(positions.tolist()) == sorted(stored)  # only rows marked to store, once each
        assert table.column_names == RESULT_COLUMNS  # every result column goes to the checkpoint
        assert table.column("response").to_pylist() == [f"new {i}" for i in positions.tolist()]
    else:
        assert part is None


def test_rows_sharing_a_request_share_its_values() -> None:
    buffer = ResultBuffer(4, ["response", "error"])
    buffer.add([3, 0], _values("a"))
    buffer.add([1, 2], _values("b"))
    assert buffer.columns()["response"].to_pylist() == ["a", "b", "b", "a"]


def test_unwritten_hands_each_row_over_once() -> None:
    buffer = ResultBuffer(3, ["response", "error"], record=True)
    buffer.add([0], _values("a"))
    first = buffer.unwritten()
    buffer.add([2], _values("c"))
    second = buffer.unwritten()
    assert first is not None and second is not None
    assert first[0].tolist() == [0] and second[0].tolist() == [2]
    assert buffer.unwritten() is None and buffer.unwritten_rows == 0


def test_text_columns_reach_pandas_without_a_copy() -> None:
    buffer = ResultBuffer(2, ["response", "error"])
    buffer.add([0, 1], _values("shared"))
    column = buffer.columns()["response"]
    series = pd.array(column, dtype="string")
    assert series._pa_array.chunk(0).buffers()[2].address == column.chunk(0).buffers()[2].address


def test_arrow_prompt_check_matches_the_python_check() -> None:
    # Every BMP character alone and padded with spaces: blank means exactly what str.isspace says.
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    values = [*chars, *(f" {c}\t" for c in chars), "", None, "text"]
    arrow = Prompts.check_arrow(pa.array(values))
    python = Prompts.check(values)
    assert arrow.texts == python.texts
    assert {i: e.message for i, e in arrow.failed.items()} == {i: e.message for i, e in python.failed.items()}
    assert sys.maxunicode > 0xFFFF


def test_an_arrow_backed_column_is_not_turned_into_python_strings() -> None:
    df = pd.DataFrame({"q": pd.array(["Hi", None, "  "], dtype="string[pyarrow]")})
    prompts = build_prompts(df, "q", None)
    assert prompts._texts is None  # held as Arrow until someone asks for the list
    assert prompts.texts_of([0]) == ["Hi"]
    assert sorted(prompts.failed) == [1, 2]


def test_placed_windows_let_their_row_index_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run nearly done holds the row index (8 bytes a row) of its unplaced windows only: at a
    million rows that is 8 MB less at the end of sending, where a checkpointed run peaks."""
    monkeypatch.setattr(results_module, "_WINDOW_ROWS", 100)
    monkeypatch.setattr(results_module, "SEAL_ROWS", 50)
    buffer = ResultBuffer(1000, ["response"])
    for i in range(950):
        buffer.add([i], _values(f"r{i}"))
    assert sum(index.nbytes for index in buffer._index.values()) == 8 * 100  # window 9's alone
    for i in range(950, 1000):
        buffer.add([i], _values(f"r{i}"))
    assert buffer._index == {}
    assert buffer.columns()["response"].to_pylist() == [f"r{i}" for i in range(1000)]
