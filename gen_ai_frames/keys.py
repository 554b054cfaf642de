"""Row keys for millions of prompts at once: a 128-bit hash of each prompt and its occurrence.

A checkpoint matches stored answers to the caller's rows by ``(prompt hash, occurrence)``, where the
occurrence counts earlier rows with the same prompt (see :func:`gen_ai_frames.checkpoint.row_keys`).
Hashing prompts one by one in Python costs about a microsecond a row, which is ten seconds before
the first request when resuming ten million rows. Here the hash runs over the Arrow buffers of the
whole column with NumPy: the prompts' UTF-8 bytes are read eight at a time as 64-bit words, and two
independent lanes mix them (the round and the final avalanche of xxHash64, with different seeds
and multipliers per lane), so the cost is a few vector operations per word of text.

Prompts longer than :data:`LONG_PROMPT_BYTES` are rare and would make the word matrices wide, so they
are hashed one by one with BLAKE2b instead: each prompt's key depends only on its own text.

>>> keys = prompt_keys(["a", "b", "a"])
>>> keys.occurrence.tolist()
[0, 0, 1]
>>> bool((keys.hashes[0] == keys.hashes[2]).all()), bool((keys.hashes[0] == keys.hashes[1]).all())
(True, False)
>>> keys.hex(0) == prompt_keys(["a"]).hex(0)
True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = ["LONG_PROMPT_BYTES", "PromptKeys", "hash_prompts", "prompt_keys"]

#: Prompts longer than this (in UTF-8 bytes) are hashed one by one with BLAKE2b.
LONG_PROMPT_BYTES = 2048
# Bytes of text hashed per block: bounds the temporary matrices (the byte index is 8x this).
_BLOCK_BYTES = 1 << 21

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

    def binary(self) -> pa.FixedSizeBinaryArray:
        """The hashes as an Arrow ``binary(16)`` array (big-endian, like :meth:`hex`), without a copy
        per row."""
        data = np.ascontiguousarray(self.hashes.astype(">u8"))
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(self), [None, pa.py_buffer(data)])


def prompt_keys(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> PromptKeys:
    """The hash and occurrence of every prompt (no nulls: rows without a prompt are never keyed)."""
    hashes = hash_prompts(prompts)
    return PromptKeys(hashes, _occurrences(hashes))


def hash_prompts(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An ``(n, 2)`` uint64 array: the 128-bit hash of each prompt's UTF-8 bytes.

    >>> hash_prompts(["Hi"]).shape
    (1, 2)
    """
    array = _as_binary(prompts)
    n = len(array)
    out = np.empty((n, 2), dtype=np.uint64)
    if n == 0:
        return out
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=n + 1, offset=array.offset * 8)
    data_buffer = array.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
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
        if len(group):
            step = max(1, _BLOCK_BYTES // (8 * max(1, int(words[group[0]]))))
            for lo in range(0, len(group), step):
                block = group[lo : lo + step]
                out[block] = _hash_block(data, offsets[block], lengths[block], int(words[block[0]]))
    return out


def _as_binary(prompts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The prompts as one ``large_binary`` array of their UTF-8 bytes."""
    if isinstance(prompts, pa.ChunkedArray):
        prompts = prompts.combine_chunks()
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


def _hash_block(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_words: int) -> np.ndarray:
    """Hash rows of ``n_words`` 64-bit words each (their bytes at ``data[starts[i]:][:lengths[i]]``)."""
    m = len(starts)
    width = n_words * 8
    matrix = np.zeros((m, max(width, 8)), dtype=np.uint8)
    if width:
        columns = np.arange(width)
        index = starts[:, None] + columns[None, :]
        inside = columns[None, :] < lengths[:, None]
        np.copyto(matrix[:, :width], data[np.minimum(index, len(data) - 1)], where=inside)
    words = matrix.view("<u8")  # (m, max(n_words, 1))
    a = np.full(m, _SEED_A, dtype=np.uint64) + lengths.astype(np.uint64) * _P3
    b = np.full(m, _SEED_B, dtype=np.uint64) + lengths.astype(np.uint64) * _Q3
    for j in range(n_words):
        w = words[:, j]
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


def _occurrences(hashes: np.ndarray) -> np.ndarray:
    """For each row, how many earlier rows have the same hash (0 for the first of each)."""
    n = len(hashes)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    frame = pd.DataFrame({"a": hashes[:, 0], "b": hashes[:, 1]})
    duplicated = frame.duplicated(keep="first").to_numpy()
    occurrence = np.zeros(n, dtype=np.int32)
    if duplicated.any():  # rare in practice: count only among the hashes that repeat
        repeated = frame.duplicated(keep=False).to_numpy()
        occurrence[repeated] = frame[repeated].groupby(["a", "b"], sort=False).cumcount().to_numpy()
    return occurrence
