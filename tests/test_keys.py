"""Vectorised prompt keys (gen_ai_frames.keys): stable, independent of the batch, no collisions."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from gen_ai_frames.keys import LONG_PROMPT_BYTES, hash_prompts, prompt_keys


def test_the_hash_of_a_prompt_never_changes() -> None:
    # Checkpoints store these hashes: a change of the function would orphan every stored answer.
    keys = prompt_keys(["Hi", "", "é" * 10, "x" * (LONG_PROMPT_BYTES + 1)])
    assert [keys.hex(i) for i in range(4)] == [
        "4e47487162c8372b4a5cd780bcdee094",
        "ef46db3751d8e999bb6d45906ac9f013",
        "51373e09f7e106d351033edccf2669ed",
        "8482a58314bce0bca2191fca7cc31508",  # a long prompt: BLAKE2b, 16 bytes
    ]
    assert keys.hex(3) == hashlib.blake2b(b"x" * (LONG_PROMPT_BYTES + 1), digest_size=16).hexdigest()


def test_a_prompt_hashes_the_same_whatever_else_is_in_the_batch() -> None:
    rng = random.Random(7)
    prompts = ["".join(rng.choice("abcdé\n {}") for _ in range(rng.randint(0, 300))) for _ in range(3000)]
    prompts += ["y" * (LONG_PROMPT_BYTES + k) for k in range(3)]
    whole = hash_prompts(prompts)
    for lo, hi in [(0, 1), (10, 17), (2990, 3003), (1500, 1501)]:
        assert (hash_prompts(prompts[lo:hi]) == whole[lo:hi]).all()
    assert (hash_prompts(list(reversed(prompts))) == whole[::-1]).all()


def test_equal_prompts_hash_equal_and_distinct_ones_apart() -> None:
    prompts = [f"Summarize customer review number {i:09d} in one line." for i in range(200_000)]
    prompts += ["", " ", "a", "a ", "\x00", "\x00\x00", "abcdefgh", "abcdefgh\x00"]  # padding must not collide
    hashes = hash_prompts(prompts)
    assert len({(int(a), int(b)) for a, b in hashes}) == len(prompts)
    assert (hash_prompts(list(prompts[:5])) == hashes[:5]).all()


def test_arrow_input_gives_the_same_keys_as_python_strings() -> None:
    prompts = ["a", "bb", "a", "ccc" * 50]
    chunked = pa.chunked_array([pa.array(prompts[:2]), pa.array(prompts[2:])])
    expected = prompt_keys(prompts)
    for value in (pa.array(prompts), pa.array(prompts, pa.large_string()), chunked, pa.array(prompts)[0:4]):
        got = prompt_keys(value)
        assert (got.hashes == expected.hashes).all() and got.occurrence.tolist() == [0, 0, 1, 0]
    sliced = prompt_keys(pa.array(["zz", *prompts])[1:])
    assert (sliced.hashes == expected.hashes).all()


def test_occurrence_counts_earlier_identical_prompts() -> None:
    assert prompt_keys(["a", "b", "a", "a", "b", "c"]).occurrence.tolist() == [0, 0, 1, 2, 1, 0]
    assert prompt_keys([]).occurrence.tolist() == []


def test_lone_surrogates_hash_like_their_surrogatepass_bytes() -> None:
    keys = prompt_keys(["\ud800", "ok", "\ud800"])
    assert keys.occurrence.tolist() == [0, 0, 1]
    assert (keys.hashes[1] == prompt_keys(["ok"]).hashes[0]).all()


def test_binary_form_matches_hex() -> None:
    keys = prompt_keys(["a", "b"])
    binary = keys.binary()
    assert binary.type == pa.binary(16)
    assert [value.hex() for value in binary.to_pylist()] == [keys.hex(0), keys.hex(1)]


def test_a_missing_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="missing prompt"):
        prompt_keys(pa.array(["a", None]))


def test_hashes_spread_over_both_lanes() -> None:
    hashes = hash_prompts([str(i) for i in range(10_000)])
    for lane in (0, 1):
        bits = np.unpackbits(np.ascontiguousarray(hashes[:, lane]).view(np.uint8)).reshape(-1, 64).mean(axis=0)
        assert 0.45 < bits.min() and bits.max() < 0.55  # every bit set about half the time
