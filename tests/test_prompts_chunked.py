"""Prompts held as chunks (a Parquet file's row groups, polars' string_view buffers): the same
checks, texts and keys as one contiguous column, whatever the chunking."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
import gen_ai_frames.prompts as prompts_module
from gen_ai_frames import create_client
from gen_ai_frames.keys import KEY_SCHEMES, LEGACY_KEY_SCHEME, LONG_PROMPT_BYTES, keys_for, keys_for_chunks
from gen_ai_frames.prompts import Prompts, build_prompts
from gen_ai_frames.runner import _row_keys

from .conftest import FAST_RETRY

# Duplicate runs, blanks (ASCII and Unicode), nulls, non-ASCII text and prompts long enough for the
# one-by-one hash: every case the checks and the keys treat apart.
VALUES: list[str | None] = [
    "a", "a", "a", " ", None, "b", "\u3000", "a", "héllo wörld", "", "b", "b", "x" * (LONG_PROMPT_BYTES + 5),
    "c", None, "a", "x" * (LONG_PROMPT_BYTES + 5), "\t\n", "日本語のプロンプト", "c", "c", "c", "d", "a",
]

# Chunkings of VALUES (lengths of consecutive chunks): one chunk, boundaries inside the runs of
# "a", "b" and "c", empty chunks at the start, middle and end, one row per chunk.
CHUNKINGS = [
    [len(VALUES)],
    [1, 1, 22],
    [2, 9, 1, 12],
    [0, 11, 0, 0, 13, 0],
    [20, 4],
    [1] * len(VALUES),
]
TYPES = [pa.string(), pa.large_string(), pa.string_view()]


def chunked(values: list[str | None], lengths: list[int], kind: pa.DataType) -> pa.ChunkedArray:
    assert sum(lengths) == len(values)
    bounds = np.cumsum([0, *lengths]).tolist()
    return pa.chunked_array(
        [pa.array(values[lo:hi], pa.string()).cast(kind) for lo, hi in zip(bounds, bounds[1:])], type=kind
    )


def reference(values: list[Any]) -> Prompts:
    """The same prompts checked one Python value at a time: the meaning chunked prompts must keep."""
    return Prompts.check(values)


@pytest.mark.parametrize("piece_rows", [3, 1 << 16])
@pytest.mark.parametrize("kind", TYPES, ids=str)
@pytest.mark.parametrize("lengths", CHUNKINGS, ids=str)
def test_checks_texts_and_keys_do_not_depend_on_the_chunking(
    lengths: list[int], kind: pa.DataType, piece_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", piece_rows)  # pieces inside chunks, too
    prompts = Prompts.check_arrow(chunked(VALUES, lengths, kind))
    expected = reference(VALUES)
    assert len(prompts) == len(VALUES)
    assert prompts.texts == expected.texts  # blanks read as missing
    assert {i: e.message for i, e in prompts.failed.items()} == {i: e.message for i, e in expected.failed.items()}
    assert prompts.sendable == expected.sendable
    valid = np.flatnonzero(prompts.sendable_mask())
    whole = [VALUES[i] for i in valid.tolist()]
    for scheme in KEY_SCHEMES:
        keys = _row_keys(prompts, valid, scheme)
        contiguous = keys_for(pa.array(whole, pa.large_string()), scheme)
        assert np.array_equal(keys.hashes, contiguous.hashes), scheme
        assert np.array_equal(keys.occurrence, contiguous.occurrence), scheme
        # and the keys of the Python-list path (pandas object columns)
        from_list = _row_keys(expected, valid, scheme)
        assert np.array_equal(keys.hashes, from_list.hashes)
        assert np.array_equal(keys.occurrence, from_list.occurrence)
    assert keys.occurrence[[i for i, t in enumerate(whole) if t == "a"]].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("kind", TYPES, ids=str)
def test_take_and_texts_of_read_rows_in_any_order_across_chunks(kind: pa.DataType,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", 4)
    prompts = Prompts.check_arrow(chunked(VALUES, [2, 9, 1, 0, 12], kind))
    expected = reference(VALUES).texts
    rng = random.Random(7)
    orders = [
        list(range(len(VALUES))),
        list(reversed(range(len(VALUES)))),
        rng.sample(range(len(VALUES)), len(VALUES)),
        [rng.randrange(len(VALUES)) for _ in range(60)],  # repeats
        [23, 0, 11, 12, 1],
        [],
    ]
    for rows in orders:
        taken = prompts.take(rows)
        assert taken.type == pa.large_string()
        assert taken.to_pylist() == [expected[i] for i in rows]
        assert prompts.take(np.array(rows, dtype=np.int64)).to_pylist() == [expected[i] for i in rows]
        sendable = [i for i in rows if expected[i] is not None]
        assert prompts.texts_of(sendable) == [expected[i] for i in sendable]
    assert prompts.arrow().to_pylist() == expected
    assert prompts.arrow().type == pa.large_string()
    with pytest.raises(IndexError, match="rows must be in"):
        prompts.take([len(VALUES)])


def test_pieces_are_bounded_and_slices_where_a_chunk_is_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", 5)
    column = chunked([f"p{i}" for i in range(23)], [12, 11], pa.large_string())
    prompts = Prompts.check_arrow(column)
    pieces = list(prompts.pieces(np.arange(23)))
    assert [len(p) for p in pieces] == [5, 5, 2, 5, 5, 1]
    # A run of whole rows is a slice over the column's own text buffer, not a copy.
    assert all(p.buffers()[2].address == column.chunk(i // 3).buffers()[2].address for i, p in enumerate(pieces))
    rows = np.array([0, 3, 4, 12, 22])
    assert [p.to_pylist() for p in prompts.pieces(rows)] == [["p0", "p3", "p4"], ["p12"], ["p22"]]


def test_keys_for_chunks_checks_its_row_count_and_scheme() -> None:
    parts = [pa.array(["a", "b"]), pa.array(["a"])]
    assert keys_for_chunks(parts, rows=3).occurrence.tolist() == [0, 0, 1]
    assert keys_for_chunks(parts, LEGACY_KEY_SCHEME).hex(0) == keys_for(["a"], LEGACY_KEY_SCHEME).hex(0)
    with pytest.raises(ValueError, match="not rows=4"):
        keys_for_chunks(parts, rows=4)
    with pytest.raises(ValueError, match="more than rows=2"):
        keys_for_chunks(parts, rows=2)
    with pytest.raises(ValueError, match="Unknown key scheme"):
        keys_for_chunks(parts, "md5")


def test_a_chunked_column_hashes_chunk_by_chunk_like_a_combined_one() -> None:
    column = chunked(VALUES, [2, 9, 1, 12], pa.large_string()).filter(pa.array([v is not None for v in VALUES]))
    for scheme in KEY_SCHEMES:
        assert np.array_equal(keys_for(column, scheme).hashes, keys_for(column.combine_chunks(), scheme).hashes)


def test_lone_surrogates_keep_their_own_path() -> None:
    # pandas object columns may hold them; UTF-8 cannot: the keys come from the Python strings.
    prompts = Prompts.check(["ok", "bad \ud800", "ok"])
    valid = np.flatnonzero(prompts.sendable_mask())
    keys = _row_keys(prompts, valid, LEGACY_KEY_SCHEME)
    assert keys.occurrence.tolist() == [0, 0, 1]
    assert keys.hex(1) == keys_for(["bad \ud800"], LEGACY_KEY_SCHEME).hex(0)
    with pytest.raises(UnicodeEncodeError):
        prompts.take([1])


# ------------------------------------------------------------------------------------------ no copy


# Proxy pools outlive the arrays they allocated (freeing one first would crash): kept for good.
_POOLS: list[Any] = []


@contextlib.contextmanager
def arrow_pool() -> Iterator[Any]:
    """pyarrow's allocations inside the block, counted apart (``max_memory``: their peak)."""
    original = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(original)
    _POOLS.append(pool)
    pa.set_memory_pool(pool)
    try:
        yield pool
    finally:
        pa.set_memory_pool(original)

ROWS = 300_000  # ~17 MB of text
PIECE = 8192  # rows of a piece here: ~0.5 MB of text, so a few pieces at once are far below the column


def many_prompts(n: int = ROWS) -> list[str]:
    return [f"Summarize customer review number {i:09d} in one line." for i in range(n)]


def check_and_hash(prompts: Prompts) -> None:
    valid = np.flatnonzero(prompts.sendable_mask())
    assert len(_row_keys(prompts, valid, "xx128")) == len(valid)


def test_a_multi_row_group_pandas_column_is_checked_and_hashed_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", PIECE)
    path = tmp_path / "prompts.parquet"
    texts = many_prompts()
    texts[5] = "   "  # a blank row: its chunk's validity changes, its text stays where it is
    pq.write_table(pa.table({"prompt": texts}), path, row_group_size=50_000)
    df = pd.read_parquet(path)
    column = df["prompt"].array._pa_array
    assert column.num_chunks == 6
    size = sum(b.size for chunk in column.chunks for b in chunk.buffers() if b is not None)
    with arrow_pool() as pool:
        prompts = build_prompts(df, "prompt", None)
        check_and_hash(prompts)
    assert prompts.failed.keys() == {5}
    # Combining the chunks (or casting the column) would allocate the whole column at once; the
    # piece holding the blank row is copied without it, one piece.
    assert pool.max_memory() < size / 8, (pool.max_memory(), size)


def test_a_polars_column_is_checked_and_hashed_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", PIECE)
    pl = pytest.importorskip("polars")
    from gen_ai_frames.polars import frame_prompts

    texts = many_prompts()
    texts[7] = None  # type: ignore[call-overload]
    df = pl.DataFrame({"prompt": texts})
    own = df.get_column("prompt").to_arrow(compat_level=pl.CompatLevel.newest())  # polars' buffers, shared
    size = sum(b.size for b in own.buffers() if b is not None)
    with arrow_pool() as pool:
        prompts = frame_prompts(df, "prompt", None)
        check_and_hash(prompts)
    assert prompts.failed.keys() == {7}
    # Each piece reads polars' own buffers (to_arrow() would copy every string into a large_string).
    held = {b.address for chunk in prompts.chunks for b in chunk.buffers()[1:] if b is not None}
    assert held <= {b.address for b in own.buffers()[1:]}
    assert all(pa.types.is_string_view(chunk.type) for chunk in prompts.chunks)
    # The pieces are cast one at a time: never the whole column at once in pyarrow's pool.
    assert pool.max_memory() < size / 8, (pool.max_memory(), size)


# ------------------------------------------------------------------------------------------ resume


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def test_a_multi_row_group_frame_resumes_a_checkpoint_of_a_one_chunk_frame(
    client: Any, fake_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prompts_module, "PIECE_ROWS", 4)
    texts = [f"q{i % 9}" for i in range(40)] + [None, " ", "q0"]  # duplicates across row groups
    ckpt = tmp_path / "run.ckpt"
    one_chunk = pd.DataFrame({"prompt": pd.array(texts, dtype="str")})
    first = one_chunk.genai.generate("prompt", client=client, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] > 0
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": pa.array(texts, pa.large_string())}), path, row_group_size=7)
    df = pd.read_parquet(path)
    assert df["prompt"].array._pa_array.num_chunks == 7
    fake_server.reset()
    out = df.genai.generate("prompt", client=client, checkpoint=ckpt, progress=False)
    assert fake_server.stats()["requests"] == 0  # every row found under the same key
    pd.testing.assert_series_equal(out["response"], first["response"])
    assert out["response"].iloc[0] == "echo: q0"
    assert out["error"].isna().tolist() == [True] * 40 + [False, False, True]
