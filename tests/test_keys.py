"""Vectorised prompt keys (gen_ai_frames.keys): stable, independent of the batch, no collisions."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from gen_ai_frames.checkpoint import prompt_hash, row_keys
from gen_ai_frames.keys import (
    KEY_SCHEME,
    LEGACY_KEY_SCHEME,
    LONG_PROMPT_BYTES,
    hash_prompts,
    hashes_from_hex,
    keys_for,
    prompt_keys,
)


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


# ------------------------------------------------------------------------- hex and key schemes


def varied_prompts() -> list[str]:
    rng = random.Random(3)
    prompts = ["".join(rng.choice("ab é\n{}") for _ in range(rng.randint(0, 40))) for _ in range(500)]
    return prompts + ["a", "a", "", "", "x" * (LONG_PROMPT_BYTES + 5), "\ud800 lone", "\ud800 lone"]


def test_hex_array_equals_hex_of_each_row_and_parses_back() -> None:
    keys = keys_for(varied_prompts())
    texts = keys.hex_array()
    assert texts.type == pa.string() and len(texts) == len(keys)
    assert texts.to_pylist() == [keys.hex(i) for i in range(len(keys))]
    assert all(len(t) == 32 and t == t.lower() for t in texts.to_pylist())
    assert (hashes_from_hex(texts) == keys.hashes).all()
    rows = np.array([5, 0, 5, len(keys) - 1])
    assert keys.hex_array(rows).to_pylist() == [keys.hex(int(i)) for i in rows]
    assert keys.hex_array(np.array([], dtype=np.int64)).to_pylist() == []
    mask = np.zeros(len(keys), dtype=bool)
    mask[[3, 7]] = True
    assert keys.hex_array(mask).to_pylist() == [keys.hex(3), keys.hex(7)]
    assert hashes_from_hex(pa.array([], pa.string())).shape == (0, 2)


def test_hashes_from_hex_takes_any_arrow_layout_and_upper_case() -> None:
    keys = keys_for(["a", "b", "c", "d"])
    texts = keys.hex_array().to_pylist()
    layouts = [
        pa.array(texts, pa.large_string()),
        pa.chunked_array([pa.array(texts[:1]), pa.array(texts[1:])]),
        pa.array(["0" * 32, *texts])[1:],  # a slice: offsets do not start at zero
        pa.array([t.upper() for t in texts]),
    ]
    for layout in layouts:
        assert (hashes_from_hex(layout) == keys.hashes).all()
    assert hashes_from_hex(pa.array(["000000000000000100000000000000ff"])).tolist() == [[1, 255]]


@pytest.mark.parametrize(
    "bad",
    [["abc"], ["0" * 31 + "g"], ["0" * 33], ["0" * 32, None], ["0" * 32, "0" * 30 + "  "]],
    ids=["short", "not-hex", "long", "null", "spaces"],
)
def test_hashes_from_hex_refuses_what_is_not_a_hash(bad: list[str | None]) -> None:
    with pytest.raises(ValueError, match="32 hex digits|missing"):
        hashes_from_hex(pa.array(bad, pa.string()))


def test_hashes_from_hex_needs_strings() -> None:
    with pytest.raises(TypeError, match="Arrow string array"):
        hashes_from_hex(pa.array([1, 2]))


def test_legacy_scheme_equals_prompt_hash_and_row_keys() -> None:
    prompts = varied_prompts()
    legacy = keys_for(prompts, LEGACY_KEY_SCHEME)
    assert [(legacy.hex(i), int(o)) for i, o in enumerate(legacy.occurrence)] == row_keys(prompts)
    assert legacy.hex_array().to_pylist() == [prompt_hash(p) for p in prompts]
    assert legacy.hex(0) == hashlib.blake2b(prompts[0].encode(), digest_size=16).hexdigest()
    clean = [p for p in prompts if "\ud800" not in p]  # Arrow input cannot hold lone surrogates
    arrow = keys_for(pa.chunked_array([pa.array(clean[:7]), pa.array(clean[7:])]), LEGACY_KEY_SCHEME)
    assert arrow.hex_array().to_pylist() == [prompt_hash(p) for p in clean]
    assert keys_for([], LEGACY_KEY_SCHEME).hashes.shape == (0, 2)


def test_the_two_schemes_differ_and_the_default_is_the_new_one() -> None:
    prompts = ["Hi", "there"]
    assert KEY_SCHEME == "xx128" and LEGACY_KEY_SCHEME == "blake2b"
    assert (keys_for(prompts).hashes == prompt_keys(prompts).hashes).all()
    assert (keys_for(prompts, KEY_SCHEME).hashes != keys_for(prompts, LEGACY_KEY_SCHEME).hashes).all()


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown key scheme 'md5'.*xx128"):
        keys_for(["a"], "md5")
    with pytest.raises(ValueError, match="missing prompt"):
        keys_for(["a", None], LEGACY_KEY_SCHEME)  # type: ignore[list-item]
