"""Row keys in checkpoints (issue 19): key schemes, match_keys, stored_keys and load_results.

New checkpoints key records with the vectorised hash (KEY_SCHEME); checkpoints written before
(BLAKE2b, LEGACY_KEY_SCHEME) keep resuming in theirs. Real Parquet files throughout; the end-to-end
tests talk to the fake server on loopback.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
import gen_ai_frames.checkpoint as checkpoint_module
from gen_ai_frames import create_client
from gen_ai_frames.checkpoint import (
    RECORD_SCHEMA,
    RESULT_COLUMNS,
    Checkpoint,
    CheckpointCorruptError,
    _to_table,
    make_records,
    prompt_hash,
    read_checkpoint,
    repair_checkpoint,
    row_keys,
)
from gen_ai_frames.keys import (
    _OCCURRENCE_MIX,
    KEY_SCHEME,
    LEGACY_KEY_SCHEME,
    PromptKeys,
    StoredKeys,
    keys_for,
    match_keys,
)
from gen_ai_frames.results import ADDED_COLUMNS

from .conftest import FAST_RETRY

FP: dict[str, Any] = {"provider": "openai", "model": "m", "max_tokens": 16}
KEY_COLUMNS = ["prompt_hash", "occurrence", "position", "error"]


def manifest_of(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def rebuild_manifest(path: Path) -> None:
    """Lose the manifest, then let repair rebuild it from the parts (its warning is expected)."""
    (path / "manifest.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repair_checkpoint(path)


def write_legacy_part(path: Path, seq: int, records: pd.DataFrame, fingerprint: dict[str, Any]) -> dict:
    """A part as versions before key schemes wrote it: BLAKE2b keys, only the fingerprint in its
    metadata, and none of the columns added to the format since."""
    table = _to_table(records)
    table = table.drop_columns([c for c in table.column_names if c in ADDED_COLUMNS])
    table = table.replace_schema_metadata({b"gen_ai_frames.fingerprint": json.dumps(fingerprint)})
    name = f"part-{seq:08d}.parquet"
    pq.write_table(table, path / name)
    return {"file": name, "level": 0, "rows": table.num_rows}


def write_legacy_checkpoint(path: Path, fingerprint: dict[str, Any], parts: list[pd.DataFrame]) -> None:
    """A whole checkpoint of an older version: a version-1 manifest without "keys"."""
    path.mkdir(parents=True)
    entries = [write_legacy_part(path, seq, records, fingerprint) for seq, records in enumerate(parts, 1)]
    manifest = {
        "format": "gen_ai_frames.checkpoint",
        "version": 1,
        "fingerprint": fingerprint,
        "next_seq": len(parts) + 1,
        "parts": entries,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))


def legacy_records(prompts: list[str], responses: list[str | None], **columns: Any) -> pd.DataFrame:
    records = make_records(prompts, responses=responses, scheme=LEGACY_KEY_SCHEME, **columns)
    assert records["prompt_hash"].tolist() == [h for h, _ in row_keys(prompts)]  # what old versions wrote
    return records


# ------------------------------------------------------------------------------------ match_keys


def test_match_keys_tells_duplicates_apart_by_occurrence() -> None:
    stored = StoredKeys.of(keys_for(["a", "b", "a", "a"]))
    rows = keys_for(["a", "a", "a", "a", "b", "b"])
    assert match_keys(rows, stored).tolist() == [0, 2, 3, -1, 1, -1]


def test_match_keys_finds_reordered_rows_and_misses_new_ones() -> None:
    prompts = [f"prompt {i}" for i in range(1000)]
    stored = StoredKeys.of(keys_for(prompts))
    order = np.random.default_rng(1).permutation(1000)
    shuffled = [prompts[i] for i in order] + ["new 1", "new 2"]
    found = match_keys(keys_for(shuffled), stored)
    assert found.dtype == np.int64
    assert found.tolist() == [*order.tolist(), -1, -1]
    assert match_keys(keys_for([]), stored).tolist() == []
    assert match_keys(keys_for(["a"]), StoredKeys.of(keys_for([]))).tolist() == [-1]


def keys(*triples: tuple[int, int, int]) -> PromptKeys:
    return PromptKeys(
        np.array([[a, b] for a, b, _ in triples], dtype=np.uint64).reshape(-1, 2),
        np.array([o for _, _, o in triples], dtype=np.int32),
    )


def test_match_keys_is_exact_when_the_64_bit_combination_collides() -> None:
    mix = int(_OCCURRENCE_MIX)
    a = 0x1234_5678_9ABC_DEF0
    # (a, 1, occurrence 0) and (a ^ mix, 2, occurrence 1) share lane A xor occurrence * mix.
    colliding = [(a, 1, 0), (a ^ mix, 2, 1), (7, 7, 0)]
    stored = StoredKeys.of(keys(*colliding))
    combined = stored.hashes[:, 0] ^ (stored.occurrence.astype(np.uint64) * _OCCURRENCE_MIX)
    assert combined[0] == combined[1]  # the slow path is really taken
    rows = keys((a ^ mix, 2, 1), (a, 1, 0), (a, 2, 0), (a ^ mix, 1, 1), (7, 7, 0), (7, 8, 0), (a, 1, 1))
    assert match_keys(rows, stored).tolist() == [1, 0, -1, -1, 2, -1, -1]


def test_match_keys_checks_lane_b_of_a_hit() -> None:
    stored = StoredKeys.of(keys((5, 1, 0), (6, 1, 0)))
    assert match_keys(keys((5, 2, 0), (6, 1, 0), (5, 1, 1)), stored).tolist() == [-1, 1, -1]


def test_match_keys_agrees_with_a_dictionary_on_random_keys() -> None:
    rng = np.random.default_rng(5)
    mix = int(_OCCURRENCE_MIX)
    lane_a = rng.integers(0, 40, 3000, dtype=np.uint64)  # few values: many shared lanes
    occurrence = rng.integers(0, 4, 3000).astype(np.int32)
    lane_a[::50] ^= np.uint64(mix)  # with occurrence + 1 some of these collide in 64 bits
    occurrence[::50] += 1
    lane_b = rng.integers(0, 3, 3000, dtype=np.uint64)
    hashes = np.stack([lane_a, lane_b], axis=1)
    stored = StoredKeys.of(PromptKeys(hashes[:2000], occurrence[:2000]))
    rows = PromptKeys(hashes[1000:], occurrence[1000:])
    latest: dict[tuple[int, int, int], int] = {}
    for i in range(2000):
        latest[(int(lane_a[i]), int(lane_b[i]), int(occurrence[i]))] = i  # the later wins
    expected = [latest.get((int(a), int(b), int(o)), -1) for (a, b), o in zip(rows.hashes, rows.occurrence)]
    assert match_keys(rows, stored).tolist() == expected


def reference_match(rows: PromptKeys, stored: StoredKeys) -> list[int]:
    latest: dict[tuple[int, int, int], int] = {}
    for i, ((a, b), o) in enumerate(zip(stored.hashes.tolist(), stored.occurrence.tolist())):
        latest[(a, b, o)] = i  # the later wins
    return [latest.get((a, b, o), -1) for (a, b), o in zip(rows.hashes.tolist(), rows.occurrence.tolist())]


@pytest.mark.parametrize("case", ["same", "inserted", "edited", "shuffled", "repeated-rows", "gaps"])
def test_match_keys_at_stored_positions_and_elsewhere(case: str) -> None:
    rng = np.random.default_rng(11)
    prompts = [f"p{i % 700}" for i in range(1000)]  # duplicates: occurrences 0 and 1
    stored = StoredKeys.of(keys_for(prompts))
    caller, positions = list(prompts), None
    if case == "inserted":
        caller = caller[:300] + ["new", "p5"] + caller[300:]  # shifts everything after row 300
    elif case == "edited":
        for i in rng.choice(1000, 50, replace=False):
            caller[i] = f"edited {i}"
    elif case == "shuffled":
        caller = [caller[i] for i in rng.permutation(1000)]
    elif case == "gaps":  # rows without a prompt are not keyed: the others keep their positions
        positions = np.flatnonzero(rng.random(1000) < 0.8)
        caller = [prompts[i] for i in positions]
    rows = keys_for(caller)
    if case == "repeated-rows":  # hand-made keys repeating one key: both rows find its record
        rows = PromptKeys(np.concatenate([rows.hashes, rows.hashes[:3]]), np.concatenate([rows.occurrence] * 2)[:1003])
    found = match_keys(rows, stored, positions)
    assert found.tolist() == reference_match(rows, stored)
    if case in ("same", "gaps"):
        assert (found >= 0).all()


def test_match_keys_checks_positions() -> None:
    stored = StoredKeys.of(keys_for(["a", "b"]))
    with pytest.raises(ValueError, match="positions has"):
        match_keys(keys_for(["a", "b"]), stored, np.array([0]))
    with pytest.raises(ValueError, match=">= 0"):
        match_keys(keys_for(["a", "b"]), stored, np.array([-1, 0]))
    assert match_keys(keys_for(["b", "a"]), stored, np.array([5, 9])).tolist() == [1, 0]


def test_stored_keys_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match="position has 1 rows, occurrence has 2"):
        StoredKeys(np.zeros((2, 2)), np.zeros(2), np.zeros(1), np.zeros(2), np.zeros(2), np.zeros(2))


# ------------------------------------------------------------------------------- the key scheme


def test_a_new_checkpoint_records_its_scheme_in_the_manifest_and_each_part(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        assert ckpt.key_scheme == KEY_SCHEME
        ckpt.append(make_records(["a", "b", "a"], responses=["A", "B", "A2"]))
        stored = ckpt.stored_keys()
    manifest = manifest_of(path)
    assert manifest["keys"] == KEY_SCHEME and manifest["version"] == 2
    part = manifest["parts"][0]["file"]
    assert pq.read_schema(path / part).metadata[b"gen_ai_frames.keys"] == KEY_SCHEME.encode()
    assert read_checkpoint(path)["prompt"].tolist() == ["a", "b", "a"]
    assert pq.read_table(path / part)["prompt_hash"].to_pylist() == keys_for(["a", "b", "a"]).hex_array().to_pylist()
    assert match_keys(keys_for(["a", "a", "b"]), stored).tolist() == [0, 2, 1]


def test_a_legacy_checkpoint_resumes_in_its_own_scheme(tmp_path: Path) -> None:
    path = tmp_path / "old"
    prompts = ["x", "y", "x", "\ud800 lone", "z"]
    write_legacy_checkpoint(
        path,
        FP,
        [legacy_records(prompts[:3], ["X", "Y", "X2"]), legacy_records(prompts, ["X", "Y", "X2", "L", "Z"])],
    )
    with Checkpoint.open(path, FP) as ckpt:
        assert ckpt.key_scheme == LEGACY_KEY_SCHEME
        stored = ckpt.stored_keys()
        caller = ["z", "x", "new", "x", "\ud800 lone", "y"]
        found = match_keys(keys_for(caller, ckpt.key_scheme), stored)
        assert (found[[0, 1, 3, 4, 5]] >= 0).all() and found[2] == -1
        assert (match_keys(keys_for(caller), stored) == -1).all()  # the new scheme finds nothing
        table = ckpt.load_results(stored, found, ["response", "logprob"])
        assert table.column("response").to_pylist() == ["Z", "X", None, "X2", "L", "Y"]
        assert table.column("logprob").null_count == 6  # not in old parts: null, with its stored type
        assert table.schema.field("logprob").type == RECORD_SCHEMA.field("logprob").type
        # Appending keeps the scheme: the new part is stamped with it, the manifest stays version 1.
        ckpt.append(make_records(["new"], positions=[2], responses=["N"], scheme=ckpt.key_scheme))
    manifest = manifest_of(path)
    assert "keys" not in manifest and manifest["version"] == 1
    newest = manifest["parts"][-1]["file"]
    assert pq.read_schema(path / newest).metadata[b"gen_ai_frames.keys"] == LEGACY_KEY_SCHEME.encode()
    with Checkpoint.open(path, FP) as ckpt:
        found = match_keys(keys_for(["new"], ckpt.key_scheme), ckpt.stored_keys())
        assert found.tolist() != [-1] and ckpt.key_scheme == LEGACY_KEY_SCHEME


def test_repair_recovers_the_scheme_from_the_parts(tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    with Checkpoint.open(new, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
    write_legacy_checkpoint(old, FP, [legacy_records(["a"], ["A"])])
    with Checkpoint.open(old, FP) as ckpt:  # a part written by this version, stamped blake2b
        ckpt.append(make_records(["b"], positions=[1], responses=["B"], scheme=ckpt.key_scheme))
    for path, scheme in ((new, KEY_SCHEME), (old, LEGACY_KEY_SCHEME)):
        rebuild_manifest(path)
        with Checkpoint.open(path, FP) as ckpt:
            assert ckpt.key_scheme == scheme
            assert (match_keys(keys_for(["a"], scheme), ckpt.stored_keys()) == 0).all()
    assert manifest_of(old)["version"] == 1 and manifest_of(new)["keys"] == KEY_SCHEME


def test_repair_refuses_parts_of_two_schemes(tmp_path: Path) -> None:
    path = tmp_path / "mixed"
    write_legacy_checkpoint(path, FP, [legacy_records(["a"], ["A"])])
    with Checkpoint.open(tmp_path / "other", FP) as ckpt:
        ckpt.append(make_records(["b"], responses=["B"]))
    (tmp_path / "other" / "part-00000001.parquet").rename(path / "part-00000002.parquet")
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match=r"\['blake2b', 'xx128'\].*one key scheme"):
        repair_checkpoint(path)


def test_starting_over_a_legacy_checkpoint_uses_the_new_scheme(tmp_path: Path) -> None:
    path = tmp_path / "old"
    write_legacy_checkpoint(path, FP, [legacy_records(["a"], ["A"])])
    with Checkpoint.open(path, FP, resume=False) as ckpt:
        assert ckpt.key_scheme == KEY_SCHEME and len(ckpt.stored_keys()) == 0
    assert manifest_of(path)["keys"] == KEY_SCHEME


def test_an_unknown_scheme_in_the_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    Checkpoint.open(path, FP).close()
    manifest = manifest_of(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "keys": "sha9"}))
    with pytest.raises(CheckpointCorruptError, match="'sha9'.*upgrade gen-ai-frames"):
        Checkpoint.open(path, FP)


def test_make_records_keys_with_the_new_scheme_unless_told() -> None:
    assert make_records(["Hi"])["prompt_hash"][0] == keys_for(["Hi"]).hex(0)
    assert make_records(["Hi"], scheme=LEGACY_KEY_SCHEME)["prompt_hash"][0] == prompt_hash("Hi")


# ----------------------------------------------------------------------------------- stored_keys


def test_stored_keys_reads_only_the_key_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c"
    n = 400
    huge = ["".join(random.Random(i).choices("abcdefghij", k=20_000)) for i in range(n)]  # ~8 MB
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records([f"p{i}" for i in range(n)], responses=huge))
        asked: list[Any] = []
        read_bytes = [0]
        real_read, real_open = checkpoint_module._read_parquet, ckpt.storage.open_read

        def spy_read(source: Any, columns: Any = None) -> pa.Table:
            asked.append(columns)
            return real_read(source, columns)

        class Counting:
            def __init__(self, f: Any) -> None:
                self.f = f

            def read(self, size: int = -1) -> bytes:
                data = self.f.read(size)
                read_bytes[0] += len(data)
                return data

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

            def __enter__(self) -> Counting:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()

        monkeypatch.setattr(checkpoint_module, "_read_parquet", spy_read)
        monkeypatch.setattr(ckpt.storage, "open_read", lambda name: Counting(real_open(name)))
        stored = ckpt.stored_keys()
    size = (path / manifest_of(path)["parts"][0]["file"]).stat().st_size
    assert asked == [KEY_COLUMNS]
    assert 0 < read_bytes[0] < size / 10, (read_bytes[0], size)
    assert len(stored) == n and stored.position.tolist() == list(range(n))


def test_the_latest_record_wins_across_parts_and_within_a_part(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path / "c", FP) as ckpt:
        ckpt.append(make_records(["a", "b", "c"], responses=["A1", "B1", "C1"]))
        ckpt.append(make_records(["b"], positions=[1], responses=[None], error=["boom"]))
        twice = pd.concat(
            [make_records(["c"], positions=[7], responses=["C2"]), make_records(["c"], positions=[8], responses=["C3"])]
        )
        ckpt.append(twice)
        stored = ckpt.stored_keys()
        assert len(stored) == 3
        found = match_keys(keys_for(["a", "b", "c"]), stored)
        assert stored.part[found].tolist() == [0, 1, 2] and stored.row[found].tolist() == [0, 0, 1]
        assert stored.position[found].tolist() == [0, 1, 8]
        assert stored.failed[found].tolist() == [False, True, False]
        responses = ckpt.load_results(stored, found, ["response", "error"]).to_pydict()
        assert responses == {"response": ["A1", None, "C3"], "error": [None, "boom", None]}
        # The same answers as records(), which reads everything.
        assert ckpt.records().set_index("prompt")["response"].to_dict() == {"a": "A1", "b": None, "c": "C3"}


def test_stored_keys_after_compaction_and_repair(tmp_path: Path) -> None:
    path = tmp_path / "c"
    prompts = [f"q{i}" for i in range(9)]
    with Checkpoint.open(path, FP, compact_every=2) as ckpt:
        for i, prompt in enumerate(prompts):
            ckpt.append(make_records([prompt, "same"], positions=[i, 100], responses=[f"A{i}", f"S{i}"]))
        ckpt.append(make_records(["q0"], responses=["again"]))
        assert len(manifest_of(path)["parts"]) < 10  # compacted
        stored = ckpt.stored_keys()
    wanted = keys_for([*prompts, "same"])

    def answers(stored: StoredKeys, ckpt: Checkpoint) -> list[str]:
        return ckpt.load_results(stored, match_keys(wanted, stored), ["response"]).column(0).to_pylist()

    expected = ["again", *[f"A{i}" for i in range(1, 9)], "S8"]
    assert len(stored) == 10
    rebuild_manifest(path)
    with Checkpoint.open(path, FP) as ckpt:
        assert ckpt.key_scheme == KEY_SCHEME
        assert answers(ckpt.stored_keys(), ckpt) == expected
    with Checkpoint.open(path, FP) as ckpt:
        assert answers(ckpt.stored_keys(), ckpt) == expected


# ---------------------------------------------------------------------------------- load_results


def test_load_results_returns_the_rows_asked_in_order_and_only_their_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Checkpoint.open(tmp_path / "c", FP) as ckpt:
        ckpt.append(make_records(["a", "b"], responses=["A", "B"], attempts=[1, 2]))
        ckpt.append(make_records(["c", "d"], positions=[2, 3], responses=["C", "D"], attempts=[3, 4]))
        stored = ckpt.stored_keys()
        read: list[Any] = []
        real = pq.ParquetFile.read

        def spy(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> pa.Table:
            read.append(kwargs.get("columns"))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(pq.ParquetFile, "read", spy)
        index = match_keys(keys_for(["d", "a", "zz", "c", "a", "b"]), stored)
        table = ckpt.load_results(stored, index, ["attempts", "response"])
        assert read == [["attempts", "response"], ["attempts", "response"]]  # each part once
        assert table.column_names == ["attempts", "response"]
        assert table.schema == pa.schema([RECORD_SCHEMA.field("attempts"), RECORD_SCHEMA.field("response")])
        assert table.to_pydict() == {
            "attempts": [4, 1, None, 3, None, 2],
            "response": ["D", "A", None, "C", None, "B"],
        }
        read.clear()
        only_first = ckpt.load_results(stored, np.array([1, 0]), ["response"])
        assert only_first.column(0).to_pylist() == ["B", "A"] and len(read) == 1  # the other part unread
        assert ckpt.load_results(stored, np.array([], dtype=np.int64), RESULT_COLUMNS).num_rows == 0
        everything = ckpt.load_results(stored, np.arange(4), RESULT_COLUMNS)
        assert everything.column_names == RESULT_COLUMNS


def test_load_results_works_after_more_appends_and_compactions(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP, compact_every=2) as ckpt:
        ckpt.append(make_records(["a", "b"], responses=["A", "B"]))
        stored = ckpt.stored_keys()
        first = set(f.name for f in path.glob("part-*.parquet"))
        for i in range(6):  # compacts the part the snapshot points into away from the manifest
            ckpt.append(make_records([f"x{i}", "a"], responses=[f"X{i}", f"a{i}"]))
        listed = {p["file"] for p in manifest_of(path)["parts"]}
        assert first.isdisjoint(listed) and first <= {f.name for f in path.glob("part-*.parquet")}
        index = match_keys(keys_for(["b", "a"]), stored)
        assert ckpt.load_results(stored, index, ["response"]).column(0).to_pylist() == ["B", "A"]
        # A fresh snapshot sees the newer answer.
        fresh = ckpt.stored_keys()
        assert ckpt.load_results(fresh, match_keys(keys_for(["a"]), fresh), ["response"]).column(0).to_pylist() == ["a5"]
    on_disk = {f.name for f in path.glob("part-*.parquet")}
    assert on_disk == {p["file"] for p in manifest_of(path)["parts"]}  # close() deleted the kept ones
    assert read_checkpoint(path).set_index("prompt")["response"]["a"] == "a5"


def test_parts_kept_for_a_snapshot_are_cleaned_up_if_the_run_dies(tmp_path: Path) -> None:
    path = tmp_path / "c"
    ckpt = Checkpoint.open(path, FP, compact_every=2)
    ckpt.append(make_records(["a"], responses=["A"]))
    ckpt.stored_keys()
    ckpt.append(make_records(["b"], responses=["B"]))  # compacts part 1 away; the snapshot keeps it
    assert (path / "part-00000001.parquet").exists()
    ckpt._lock.abandon()  # type: ignore[union-attr]  # what a killed process leaves: no close()
    ckpt._lock = None
    with Checkpoint.open(path, FP) as again:
        assert not (path / "part-00000001.parquet").exists()
        assert again.records()["response"].tolist() == ["A", "B"]


def test_load_results_refuses_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
        stored = ckpt.stored_keys()
        with pytest.raises(ValueError, match="unknown columns \\['nope'\\]"):
            ckpt.load_results(stored, np.array([0]), ["nope"])
        with pytest.raises(ValueError, match="positions into the 1 stored keys"):
            ckpt.load_results(stored, np.array([1]), ["response"])
        with pytest.raises(ValueError, match="this open Checkpoint's stored_keys"):
            ckpt.load_results(StoredKeys.of(keys_for(["a"])), np.array([0]), ["response"])
    with Checkpoint.open(path, FP) as again:
        with pytest.raises(ValueError, match="this open Checkpoint's stored_keys"):
            again.load_results(stored, np.array([0]), ["response"])  # a snapshot of the closed one


# ------------------------------------------------------------------------ through the accessor


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


def make_legacy(path: Path) -> None:
    """Turn a checkpoint written by this version into one written before key schemes."""
    manifest = manifest_of(path)
    for part in manifest["parts"]:
        table = pq.read_table(path / part["file"])
        hashes = pa.array([prompt_hash(p) for p in table.column("prompt").to_pylist()], pa.string())
        table = table.set_column(table.column_names.index("prompt_hash"), "prompt_hash", hashes)
        metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"gen_ai_frames.keys"}
        pq.write_table(table.replace_schema_metadata(metadata), path / part["file"])
    manifest.pop("keys", None)
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))


def test_plan_counts_the_hits_of_a_legacy_checkpoint(fake_server: Any, client: Any, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    df = pd.DataFrame({"q": ["a", "b", "a", "[[status=400]] c"]})
    df.genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    make_legacy(checkpoint)
    bigger = pd.DataFrame({"q": ["a", "b", "a", "[[status=400]] c", "a", "d"]})
    plan = bigger.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0)
    assert plan.checkpoint_hits == 4
    retry = bigger.genai.plan(column="q", client=client, checkpoint=checkpoint, sample=0, retry_errors=True)
    assert retry.checkpoint_hits == 3


def test_generate_resumes_a_legacy_checkpoint_without_sending(
    fake_server: Any, client: Any, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "run.ckpt"
    df = pd.DataFrame({"q": [f"question {i % 7}" for i in range(20)]})
    first = df.genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    make_legacy(checkpoint)
    before = fake_server.stats()["requests"]
    again = df.genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    assert fake_server.stats()["requests"] == before  # everything restored: nothing sent
    pd.testing.assert_series_equal(again["response"], first["response"])
    assert manifest_of(checkpoint)["version"] == 1 and "keys" not in manifest_of(checkpoint)


def test_generate_stores_keys_in_the_checkpoints_scheme(fake_server: Any, client: Any, tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.ckpt"
    prompts = ["a", "b", "a"]
    pd.DataFrame({"q": prompts}).genai.generate(column="q", client=client, checkpoint=checkpoint, progress=False)
    parts = [pq.read_table(checkpoint / part["file"]) for part in manifest_of(checkpoint)["parts"]]
    stored = pa.concat_tables(parts).sort_by("position")
    assert stored["prompt_hash"].to_pylist() == keys_for(prompts).hex_array().to_pylist()
    assert stored["occurrence"].to_pylist() == [0, 0, 1]


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_keys_are_held_while_sending_only_for_a_checkpoint(
    with_checkpoint: bool, fake_server: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a checkpoint the keys only find the duplicates: a million-row run lets their 20 bytes
    a row go before it sends, and still sends each distinct prompt once."""
    import gen_ai_frames.runner as runner

    held: list[Any] = []
    send = runner._send_groups

    async def watching(run: Any, *args: Any) -> None:
        held.append(run.keys)
        await send(run, *args)

    monkeypatch.setattr(runner, "_send_groups", watching)
    df = pd.DataFrame({"q": [f"question {i % 7}" for i in range(20)]})
    out = df.genai.generate(
        column="q", client=client, progress=False, checkpoint=tmp_path / "run.ckpt" if with_checkpoint else None
    )
    assert fake_server.stats()["requests"] == 7
    assert out["response"].tolist() == [f"echo: question {i % 7}" for i in range(20)]
    assert len(held) == 1 and (held[0] is not None) == with_checkpoint


@pytest.mark.parametrize("repeat", [None, 7])
def test_a_checkpointed_run_holds_no_hashes_while_sending(
    repeat: int | None, fake_server: Any, client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While sending, a checkpointed run holds only the occurrences that are not 0 (at most 12 bytes each),
    not every row's 16-byte hash: each part's hashes are computed again from its prompts, and they
    are the keys a resume matches."""
    import gen_ai_frames.runner as runner

    held: list[int] = []
    send = runner._send_groups

    async def watching(run: Any, *args: Any) -> None:
        held.append(sum(value.nbytes for value in vars(run.keys).values() if isinstance(value, np.ndarray)))
        await send(run, *args)

    monkeypatch.setattr(runner, "_send_groups", watching)
    n = 3000
    prompts = [f"question {i if repeat is None else i % repeat}" for i in range(n)]
    checkpoint = tmp_path / "run.ckpt"
    df = pd.DataFrame({"q": prompts})
    df.genai.generate(column="q", client=client, progress=False, checkpoint=checkpoint, chunk_size=500)
    repeated = 0 if repeat is None else n - repeat
    assert len(held) == 1
    assert (0 < held[0] <= 12 * repeated) if repeated else held[0] == 0
    parts = [pq.read_table(checkpoint / part["file"]) for part in manifest_of(checkpoint)["parts"]]
    assert len(parts) > 1
    stored = pa.concat_tables(parts).sort_by("position")
    keys = keys_for(prompts)
    assert stored["prompt_hash"].to_pylist() == keys.hex_array().to_pylist()
    assert stored["occurrence"].to_pylist() == keys.occurrence.tolist()
    before = fake_server.stats()["requests"]
    again = df.genai.generate(column="q", client=client, progress=False, checkpoint=checkpoint)
    assert fake_server.stats()["requests"] == before  # every row matched its stored key
    assert again["response"].tolist() == [f"echo: {p}" for p in prompts]
