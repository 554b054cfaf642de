"""Row keys for millions of prompts at once: a 128-bit hash of each prompt and its occurrence.

A checkpoint matches stored answers to the caller's rows by ``(prompt hash, occurrence)``, where the
occurrence counts earlier rows with the same prompt (see :func:`gen_ai_frames.checkpoint.row_keys`).
Hashing prompts one by one in Python costs about a microsecond a row, which is ten seconds before
the first request when resuming ten million rows. Here the hash runs over the Arrow buffers of the
column with NumPy, chunk by chunk (:func:`keys_for_chunks`; a row's hash depends on its own text
only, so the chunking never changes a key): the prompts' UTF-8 bytes are read eight at a time as
64-bit words, and two independent lanes mix them (the round and the final avalanche of xxHash64,
with different seeds and multipliers per lane), so the cost is a few vector operations per word of
text.

Prompts longer than :data:`LONG_PROMPT_BYTES` are rare and would make the word matrices wide, so they
are hashed one by one with BLAKE2b instead: each prompt's key depends only on its own text.

>>> keys = prompt_keys(["a", "b", "a"])
>>> keys.occurrence.tolist()
[0, 0, 1]
>>> bool((keys.hashes[0] == keys.hashes[2]).all()), bool((keys.hashes[0] == keys.hashes[1]).all())
(True, False)
>>> keys.hex(0) == prompt_keys(["a"]).hex(0)
True

A checkpoint stores each key as 32 hex digits in its ``prompt_hash`` column and records which
hash wrote them (its key scheme): :data:`KEY_SCHEME` for new checkpoints, :data:`LEGACY_KEY_SCHEME`
(BLAKE2b, :func:`gen_ai_frames.checkpoint.prompt_hash`) for those written before. :func:`keys_for`
hashes in either scheme, and :func:`match_keys` finds each row's stored record (a
:class:`StoredKeys`, from :meth:`gen_ai_frames.checkpoint.Checkpoint.stored_keys`) with NumPy and a
pandas hash index, never a Python loop per row.

>>> stored = StoredKeys.of(keys_for(["a", "b"]))
>>> match_keys(keys_for(["b", "c", "a", "a"]), stored).tolist()
[1, -1, 0, -1]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "KEY_SCHEME",
    "KEY_SCHEMES",
    "LEGACY_KEY_SCHEME",
    "LONG_PROMPT_BYTES",
    "PromptKeys",
    "StoredKeys",
    "hash_prompts",
    "hashes_for",
    "hashes_from_hex",
    "hashes_to_hex",
    "keys_for",
    "keys_for_chunks",
    "match_keys",
    "prompt_keys",
]

#: The key scheme of new checkpoints: this module's 128-bit hash of the prompt's UTF-8 bytes.
KEY_SCHEME = "xx128"
#: The key scheme of checkpoints written before :data:`KEY_SCHEME`: BLAKE2b (16 bytes) of each
#: prompt, :func:`gen_ai_frames.checkpoint.prompt_hash`. They keep resuming in it.
LEGACY_KEY_SCHEME = "blake2b"
#: Every scheme a checkpoint may record.
KEY_SCHEMES = (KEY_SCHEME, LEGACY_KEY_SCHEME)

#: Prompts longer than this (in UTF-8 bytes) are hashed one by one with BLAKE2b.
LONG_PROMPT_BYTES = 2048
# Rows hashed per block: bounds the temporary arrays (a few uint64 per row) and keeps them in cache.
_BLOCK_ROWS = 1 << 16

_U64 = np.uint64
# xxHash64's primes; lane B uses other odd constants so that its collisions are independent of A's.
_P1, _P2, _P3 = _U64(0x9E3779B185EBCA87), _U64(0xC2B2AE3D27D4EB4F), _U64(0x165667B19E3779F9)
_Q1, _Q2, _Q3 = _U64(0xFF51AFD7ED558CCD), _U64(0xC4CEB9FE1A85EC53), _U64(0x94D049BB133111EB)
_SEED_A, _SEED_B = _U64(0x27D4EB2F165667C5), _U64(0x85EBCA77C2B2AE63)


@dataclass(frozen=True)
class PromptKeys:
    """``hashes``: an ``(n, 2)`` uint64 array, one 128-bit hash per prompt; ``occurrence``: int32,
    how many earlier prompts have the same hash."""

    hashes: np.ndarray
    occurrence: np.ndarray

    def __len__(self) -> int:
        return len(self.occurrence)

    def hex(self, i: int) -> str:
        """Row ``i``'s hash as 32 hex digits."""
        return self.hashes[i].astype(">u8").tobytes().hex()

    def hex_array(self, rows: np.ndarray | None = None) -> pa.Array:
        """The hashes of ``rows`` (all rows when None) as an Arrow string array of 32 hex digits,
        big-endian like :meth:`hex`; built with NumPy, no Python loop per row.

        >>> keys = prompt_keys(["a", "b"])
        >>> keys.hex_array().to_pylist() == [keys.hex(0), keys.hex(1)]
        True
        >>> keys.hex_array(np.array([1])).to_pylist() == [keys.hex(1)]
        True
        """
        if rows is None:
            return hashes_to_hex(self.hashes)
        rows = np.asarray(rows)
        # A mask picks its True rows (as an int64 array it would pick rows 0 and 1).
        picked = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        return hashes_to_hex(self.hashes[picked])

    def binary(self) -> pa.FixedSizeBinaryArray:
        """The hashes as an Arrow ``binary(16)`` array (big-endian, like :meth:`hex`), without a copy
        per row."""
        data = np.ascontiguousarray(self.hashes.astype(">u8"))
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(self), [None, pa.py_buffer(data)])


def prompt_keys(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> PromptKeys:
    """The hash and occurrence of every prompt (no nulls: rows without a prompt are never keyed),
    in :data:`KEY_SCHEME`: :func:`keys_for` with its default scheme."""
    return keys_for(prompts)


def keys_for(prompts: Sequence[str] | pa.Array | pa.ChunkedArray, scheme: str = KEY_SCHEME) -> PromptKeys:
    """The hash and occurrence of every prompt (no nulls) in key scheme ``scheme``.

    :data:`KEY_SCHEME` hashes the whole column at once (:func:`prompt_keys`); :data:`LEGACY_KEY_SCHEME`
    hashes prompt by prompt with BLAKE2b, exactly as :func:`gen_ai_frames.checkpoint.prompt_hash`
    (old checkpoints resume in it; it is slower but shares everything after the hashing).

    >>> from gen_ai_frames.checkpoint import prompt_hash
    >>> keys_for(["Hi"], LEGACY_KEY_SCHEME).hex(0) == prompt_hash("Hi")
    True
    >>> keys_for(["a", "a"]).occurrence.tolist()
    [0, 1]
    """
    hashes = hashes_for(prompts, scheme)
    return PromptKeys(hashes, _occurrences(hashes))


def hashes_for(prompts: Sequence[str] | pa.Array | pa.ChunkedArray, scheme: str = KEY_SCHEME) -> np.ndarray:
    """The ``(n, 2)`` uint64 hashes of ``prompts`` (no nulls) in key scheme ``scheme``, without
    their occurrences: a row's hash depends on its own text alone, so any subset of a column can
    be hashed again later and gets the keys' hashes (a run rehashes each part it writes rather than
    holding 16 bytes a row while it sends).

    >>> bool((hashes_for(["b"]) == keys_for(["a", "b"]).hashes[1]).all())
    True
    """
    return _hasher(scheme)(prompts)


def _hasher(scheme: str) -> Callable[[Any], np.ndarray]:
    """The hash function of key scheme ``scheme``."""
    if scheme == KEY_SCHEME:
        return hash_prompts
    if scheme == LEGACY_KEY_SCHEME:
        return _blake2b_hashes
    raise ValueError(
        f"Unknown key scheme {scheme!r}; this version of gen-ai-frames knows {list(KEY_SCHEMES)}"
    )


def keys_for_chunks(
    chunks: Iterable[pa.Array | Sequence[str]], scheme: str = KEY_SCHEME, *, rows: int | None = None
) -> PromptKeys:
    """:func:`keys_for` of the prompts of ``chunks`` in order, hashed one chunk at a time, so the
    column is never combined into one array: each prompt's hash depends on its own text alone, and
    the occurrences are counted over all the hashes at the end. The keys are those of
    :func:`keys_for` over the concatenated prompts, however they are chunked. ``rows``: how many
    prompts the chunks hold, when known: each chunk's hashes go straight into one array of them.

    >>> keys = keys_for_chunks([pa.array(["a"]), pa.array([]), pa.array(["b", "a"])])
    >>> bool((keys.hashes == keys_for(["a", "b", "a"]).hashes).all()), keys.occurrence.tolist()
    (True, [0, 0, 1])
    """
    hash_chunk = _hasher(scheme)
    if rows is None:
        hashes = _per_chunk(hash_chunk, chunks)
    else:
        hashes = np.empty((rows, 2), dtype=np.uint64)
        at = 0
        for chunk in chunks:
            part = hash_chunk(chunk)
            del chunk  # let this chunk go before the next one is made
            if at + len(part) > rows:
                raise ValueError(f"keys_for_chunks(): the chunks hold more than rows={rows} prompts")
            hashes[at : at + len(part)] = part
            at += len(part)
        if at != rows:
            raise ValueError(f"keys_for_chunks(): the chunks hold {at} prompts, not rows={rows}")
    return PromptKeys(hashes, _occurrences(hashes))


def _blake2b_hashes(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``(n, 2)`` uint64: BLAKE2b (16 bytes) of each prompt's UTF-8 (surrogatepass) bytes, one by one."""
    if isinstance(prompts, pa.ChunkedArray):  # chunk by chunk: never combined into one copy
        return _per_chunk(_blake2b_hashes, prompts.chunks)
    array = _as_binary(prompts)
    n = len(array)
    if n == 0:
        return np.empty((0, 2), dtype=np.uint64)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=n + 1, offset=array.offset * 8)
    data_buffer = array.buffers()[2]
    view = memoryview(data_buffer if data_buffer is not None else b"")
    bounds = offsets.tolist()
    digests = b"".join(
        hashlib.blake2b(view[bounds[i] : bounds[i + 1]], digest_size=16).digest() for i in range(n)
    )
    return np.frombuffer(digests, dtype=">u8").reshape(n, 2).astype(np.uint64)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# ASCII code -> value of the hex digit, 255 for anything else.
_NIBBLES = np.full(256, 255, dtype=np.uint8)
_NIBBLES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_NIBBLES[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


def hashes_to_hex(hashes: np.ndarray) -> pa.Array:
    """``(n, 2)`` uint64 hashes as 32 lower-case hex digits each (big-endian), an Arrow string array:
    a checkpoint's ``prompt_hash`` column, the inverse of :func:`hashes_from_hex`.

    >>> hashes_to_hex(np.array([[1, 255]], dtype=np.uint64)).to_pylist()
    ['000000000000000100000000000000ff']
    """
    n = len(hashes)
    raw = np.ascontiguousarray(hashes.astype(">u8")).view(np.uint8).reshape(n, 16)
    digits = np.empty((n, 32), dtype=np.uint8)
    digits[:, 0::2] = _HEX_DIGITS[raw >> 4]
    digits[:, 1::2] = _HEX_DIGITS[raw & 15]
    # pa.string has 32-bit offsets: beyond 2**26 rows the text needs large_string.
    small = 32 * n < 2**31
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32 if small else np.int64)
    return pa.Array.from_buffers(
        pa.string() if small else pa.large_string(),
        n,
        [None, pa.py_buffer(offsets), pa.py_buffer(digits)],
    )


def hashes_from_hex(hex: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Parse an Arrow string array of 32-hex-digit hashes (a checkpoint's ``prompt_hash`` column)
    into an ``(n, 2)`` uint64 array, the inverse of :meth:`PromptKeys.hex_array`; vectorised.

    >>> keys = prompt_keys(["a", "b"])
    >>> bool((hashes_from_hex(keys.hex_array()) == keys.hashes).all())
    True
    >>> hashes_from_hex(pa.array(["xyz"]))
    Traceback (most recent call last):
    ...
    ValueError: prompt hashes must be 32 hex digits each; got 'xyz'
    """
    if isinstance(hex, pa.ChunkedArray):
        hex = hex.combine_chunks() if hex.num_chunks else pa.array([], type=hex.type)
    kind = getattr(hex, "type", None)
    if not isinstance(hex, pa.Array) or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TypeError(f"hashes_from_hex() needs an Arrow string array, got {kind or type(hex).__name__}")
    if hex.null_count:
        raise ValueError("prompt hashes must not be missing (the prompt_hash column has nulls)")
    n = len(hex)
    out = np.empty((n, 2), dtype=np.uint64)
    if n == 0:
        return out
    width = np.int32 if pa.types.is_string(hex.type) else np.int64
    size = np.dtype(width).itemsize
    offsets = np.frombuffer(hex.buffers()[1], dtype=width, count=n + 1, offset=hex.offset * size)
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != 32)
    if len(bad):
        raise ValueError(f"prompt hashes must be 32 hex digits each; got {hex[int(bad[0])].as_py()!r}")
    start = int(offsets[0])
    text = memoryview(hex.buffers()[2])[start : start + 32 * n]
    try:
        raw = bytes.fromhex(text.tobytes().decode("ascii"))  # C speed; also refuses non-hex digits
    except (ValueError, UnicodeDecodeError):
        raw = b""
    if len(raw) != 16 * n:  # a non-hex digit, or whitespace (which fromhex skips)
        digits = np.frombuffer(text, dtype=np.uint8).reshape(n, 32)
        row = int(np.flatnonzero((_NIBBLES[digits] == 255).any(axis=1))[0])
        raise ValueError(f"prompt hashes must be 32 hex digits each; got {hex[row].as_py()!r}")
    out[:] = np.frombuffer(raw, dtype=">u8").reshape(n, 2)
    return out


@dataclass(frozen=True)
class StoredKeys:
    """The keys of a checkpoint's stored records, the latest record per key only (see
    :meth:`gen_ai_frames.checkpoint.Checkpoint.stored_keys`).

    ``hashes`` ``(m, 2)`` uint64 and ``occurrence`` int32: the key; ``position`` int64: where the row
    was when stored; ``failed`` bool: the record holds an error; ``part`` int32: index into ``files``
    (the part files the keys were read from, in the manifest's order); ``row`` int32: the record's
    row within that part.

    >>> stored = StoredKeys.of(prompt_keys(["a", "b"]))
    >>> len(stored), stored.position.tolist(), stored.row.tolist()
    (2, [0, 1], [0, 1])
    """

    hashes: np.ndarray
    occurrence: np.ndarray
    position: np.ndarray
    failed: np.ndarray
    part: np.ndarray
    row: np.ndarray
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        m = len(self.occurrence)
        fixed: dict[str, np.ndarray] = {
            "hashes": np.asarray(self.hashes, dtype=np.uint64).reshape(-1, 2),
            "occurrence": np.asarray(self.occurrence, dtype=np.int32),
            "position": np.asarray(self.position, dtype=np.int64),
            "failed": np.asarray(self.failed, dtype=bool),
            "part": np.asarray(self.part, dtype=np.int32),
            "row": np.asarray(self.row, dtype=np.int32),
        }
        for name, value in fixed.items():
            if len(value) != m:
                raise ValueError(f"StoredKeys.{name} has {len(value)} rows, occurrence has {m}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "files", tuple(self.files))

    def __len__(self) -> int:
        return len(self.occurrence)

    @classmethod
    def of(cls, keys: PromptKeys, *, failed: np.ndarray | None = None) -> StoredKeys:
        """Stored keys for ``keys`` as if written in one part in their order (for tests and examples)."""
        m = len(keys)
        return cls(
            hashes=keys.hashes,
            occurrence=keys.occurrence,
            position=np.arange(m, dtype=np.int64),
            failed=np.zeros(m, dtype=bool) if failed is None else failed,
            part=np.zeros(m, dtype=np.int32),
            row=np.arange(m, dtype=np.int32),
        )


def _at_stored_positions(rows: PromptKeys, stored: StoredKeys, positions: np.ndarray | None) -> np.ndarray:
    """For each row, the stored record (of unique keys) stored at the row's position with the row's
    key, else -1: linear, and on an unchanged frame it finds every row."""
    n = len(rows)
    found = np.full(n, -1, dtype=np.int64)
    if positions is None:
        row_at = None
    else:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.shape != (n,):
            raise ValueError(f"match_keys(): positions has {positions.shape} entries, rows {n}")
        if n == 0 or positions.min() < 0:
            raise ValueError("match_keys(): positions must be the rows' positions in the frame (>= 0)")
        row_at = np.full(int(positions.max()) + 1, -1, dtype=np.int64)
        row_at[positions] = np.arange(n)
    limit = n if row_at is None else len(row_at)
    record = np.flatnonzero((stored.position >= 0) & (stored.position < limit))
    row = stored.position[record] if row_at is None else row_at[stored.position[record]]
    if row_at is not None:
        record, row = record[row >= 0], row[row >= 0]
    same = (
        (rows.hashes[row, 0] == stored.hashes[record, 0])
        & (rows.hashes[row, 1] == stored.hashes[record, 1])
        & (rows.occurrence[row] == stored.occurrence[record])
    )
    found[row[same]] = record[same]
    return found


# Occurrences fold into lane A through an odd multiplier: a bijection of 64 bits, so two records of
# one prompt (same lane A, different occurrences) never share the combination.
_OCCURRENCE_MIX = _U64(0x9FB21C651E98DF25)


def _combined(hashes: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """One uint64 per key: lane A mixed with the occurrence (equal keys give equal values)."""
    return hashes[:, 0] ^ (occurrence.astype(np.uint64) * _OCCURRENCE_MIX)


def match_keys(rows: PromptKeys, stored: StoredKeys, positions: np.ndarray | None = None) -> np.ndarray:
    """For each of the caller's ``rows``, the index into ``stored`` of the record with the same
    ``(hash, occurrence)``, or -1 where there is none (int64).

    Vectorised. First each record is checked against the row now at the position it was stored at
    (``positions``: each row's position in the caller's frame, default ``0..n-1``), which finds every
    row of an unchanged frame with a few linear passes; the rows left go through a pandas hash index
    on a 64-bit combination of lane A and the occurrence, whose hits are then checked on the full
    key. Where that combination is not unique among ``stored`` (two keys colliding in 64 bits), the
    keys are matched on all 128 bits and the occurrence instead. Should ``stored`` hold one key twice,
    the later wins.

    >>> stored = StoredKeys.of(prompt_keys(["x", "y", "x"]))
    >>> match_keys(prompt_keys(["y", "x", "x", "x", "z"]), stored).tolist()
    [1, 0, 2, -1, -1]
    """
    n = len(rows)
    found = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(stored) == 0:
        return found
    stored_combined = _combined(stored.hashes, stored.occurrence)
    row_combined = _combined(rows.hashes, rows.occurrence)
    if len(_repeated(stored_combined)) == 0:  # then the stored keys are unique too
        found = _at_stored_positions(rows, stored, positions)
        left = np.flatnonzero(found < 0)
        if len(left):
            # A record found at its position is no other row's, unless the rows repeat a key (hand-
            # made keys: keys_for never does), so the index needs only the records not found yet.
            free = np.ones(len(stored), dtype=bool)
            if len(left) < n and len(_repeated(row_combined)) == 0:
                free[found[found >= 0]] = False
            candidates = np.flatnonzero(free)
            if len(candidates):
                hits = pd.Index(stored_combined[candidates]).get_indexer(row_combined[left])
                found[left] = np.where(hits >= 0, candidates[np.maximum(hits, 0)], -1)
    else:
        index = pd.Index(stored_combined)
        # Rare: combinations shared by several stored keys go through a full-key index.
        shared = index.duplicated(keep=False)
        alone = np.flatnonzero(~shared)
        hits = pd.Index(stored_combined[alone]).get_indexer(row_combined)
        found = np.where(hits >= 0, alone[np.maximum(hits, 0)], -1).astype(np.int64)
        crowded = np.flatnonzero(shared)
        ask = np.flatnonzero(np.isin(row_combined, stored_combined[crowded]))
        if len(ask):
            full = pd.MultiIndex.from_arrays(
                [stored.hashes[crowded, 0], stored.hashes[crowded, 1], stored.occurrence[crowded]]
            )
            last = ~full.duplicated(keep="last")
            crowded, full = crowded[last], full[last]
            wanted = pd.MultiIndex.from_arrays(
                [rows.hashes[ask, 0], rows.hashes[ask, 1], rows.occurrence[ask]]
            )
            hits = full.get_indexer(wanted)
            found[ask] = np.where(hits >= 0, crowded[np.maximum(hits, 0)], -1)
    # The combination only narrows the search: keep a hit only if the whole key is equal.
    hit = np.flatnonzero(found >= 0)
    at = found[hit]
    same = (
        (stored.hashes[at, 0] == rows.hashes[hit, 0])
        & (stored.hashes[at, 1] == rows.hashes[hit, 1])
        & (stored.occurrence[at] == rows.occurrence[hit])
    )
    found[hit[~same]] = -1
    return found


def hash_prompts(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An ``(n, 2)`` uint64 array: the 128-bit hash of each prompt's UTF-8 bytes.

    >>> hash_prompts(["Hi"]).shape
    (1, 2)
    """
    if isinstance(prompts, pa.ChunkedArray):  # chunk by chunk: never combined into one copy
        return _per_chunk(hash_prompts, prompts.chunks)
    array = _as_binary(prompts)
    n = len(array)
    out = np.empty((n, 2), dtype=np.uint64)
    if n == 0:
        return out
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=n + 1, offset=array.offset * 8)
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    if len(data) < 8:
        data = np.concatenate([data, np.zeros(8, dtype=np.uint8)])  # room for one whole word
    # The 64-bit little-endian word starting at every byte: each row's words are gathered from it
    # directly (unaligned loads), one gather per word instead of eight per word of bytes.
    at_byte = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    lengths = np.diff(offsets)
    long_rows = np.flatnonzero(lengths > LONG_PROMPT_BYTES)
    for i in long_rows.tolist():
        digest = hashlib.blake2b(data[offsets[i] : offsets[i + 1]].tobytes(), digest_size=16).digest()
        out[i] = np.frombuffer(digest, dtype=">u8")
    short = np.ones(n, dtype=bool)
    short[long_rows] = False
    words = (lengths + 7) // 8
    # Rows with the same number of words are hashed together, so no row carries another's padding.
    rows = np.flatnonzero(short)
    order = rows[np.argsort(words[rows], kind="stable")]
    bounds = np.flatnonzero(np.diff(words[order])) + 1
    for group in np.split(order, bounds):
        for lo in range(0, len(group), _BLOCK_ROWS):
            block = group[lo : lo + _BLOCK_ROWS]
            out[block] = _hash_block(at_byte, offsets[block], lengths[block], int(words[block[0]]))
    return out


def _per_chunk(hash_chunk: Callable[[Any], np.ndarray], chunks: Iterable[Any]) -> np.ndarray:
    """``hash_chunk`` of each of ``chunks``, concatenated: each row's hash depends on its text alone."""
    parts = [hash_chunk(chunk) for chunk in chunks]
    return np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.uint64)


def _as_binary(prompts: Sequence[str] | pa.Array) -> pa.Array:
    """The prompts (one array, never a chunked one: hash those chunk by chunk) as a ``large_binary``
    array of their UTF-8 bytes."""
    if not isinstance(prompts, pa.Array):
        try:
            prompts = pa.array(prompts, type=pa.large_string())
        except (pa.ArrowInvalid, UnicodeEncodeError):
            # Lone surrogates (pandas stores them happily) cannot be UTF-8: encode them as the
            # checkpoint always has, with surrogatepass, so each still has a stable hash.
            prompts = pa.array([p.encode("utf-8", "surrogatepass") for p in prompts], type=pa.large_binary())
    if prompts.null_count:
        raise ValueError("prompt_keys() got a missing prompt; rows without a prompt have no key")
    return prompts.cast(pa.large_binary())


# _MASKS[k] keeps the low k bytes of a word (k = 1..8).
_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def _hash_block(at_byte: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_words: int) -> np.ndarray:
    """Hash rows of ``n_words`` 64-bit words each (their bytes start at ``starts``; ``at_byte[p]``
    is the little-endian word at byte ``p``). Bytes past a row's end count as zero."""
    m = len(starts)
    last = len(at_byte) - 1  # the last byte a whole word can start at
    a = np.full(m, _SEED_A, dtype=np.uint64) + lengths.astype(np.uint64) * _P3
    b = np.full(m, _SEED_B, dtype=np.uint64) + lengths.astype(np.uint64) * _Q3
    for j in range(n_words):
        where = starts + 8 * j
        # Rows come in ascending order, so only the block's last row can reach the buffer's end.
        if where[-1] > last:  # that row's tail has no whole word: shift the last word in place
            clipped = np.minimum(where, last)
            w = at_byte[clipped] >> ((where - clipped) * 8).astype(np.uint64)
        else:
            w = at_byte[where]
        if j == n_words - 1:
            w &= _MASKS[lengths - 8 * j]  # the next row's bytes are not this row's
        a = _rotl(a + w * _P2, 31) * _P1
        b = _rotl(b ^ (w * _Q1), 29) * _Q2
    return np.stack([_avalanche(a, _P2, _P3), _avalanche(b, _Q1, _Q2)], axis=1)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def _avalanche(x: np.ndarray, m1: np.uint64, m2: np.uint64) -> np.ndarray:
    x = x ^ (x >> _U64(33))
    x = x * m1
    x = x ^ (x >> _U64(29))
    x = x * m2
    return x ^ (x >> _U64(32))


def _repeated(values: np.ndarray) -> np.ndarray:
    """Indices of the rows whose value occurs more than once (sorted; usually none).

    A sort, not a hash table: for ten million uint64 values it is about five times faster.

    >>> _repeated(np.array([5, 1, 5, 2, 1, 7], dtype=np.uint64)).tolist()
    [0, 1, 2, 4]
    """
    ordered = np.sort(values)
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.isin(values, ordered[1:][same]))


def _occurrences(hashes: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows have the same hash (0 for the first of each)."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    occurrence = np.zeros(n, dtype=np.int32)
    # Only rows whose lane A repeats can repeat; count among those.
    maybe = _repeated(hashes[:, 0])
    if len(maybe):
        frame = pd.DataFrame({"a": hashes[maybe, 0], "b": hashes[maybe, 1]})
        occurrence[maybe] = frame.groupby(["a", "b"], sort=False).cumcount().to_numpy()
    return occurrence
