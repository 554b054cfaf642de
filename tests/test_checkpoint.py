"""Tests of the checkpoint store, on real Parquet files in ``tmp_path``.

Locking is tested from other processes too: ``flock`` locks belong to an open file description, so a
same-process test alone would not show that another run is kept out, nor that a killed run lets go.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gen_ai_frames.checkpoint as checkpoint_module
from gen_ai_frames.checkpoint import (
    RECORD_SCHEMA,
    RESULT_COLUMNS,
    Checkpoint,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLockedError,
    CheckpointMismatchError,
    checkpoint_status,
    make_records,
    prompt_hash,
    read_checkpoint,
    repair_checkpoint,
    row_keys,
)
from gen_ai_frames.errors import GenAIError
from gen_ai_frames.keys import KEY_SCHEME, keys_for
from gen_ai_frames.options import RunOptions

REPO_ROOT = Path(__file__).resolve().parents[1]
FP: dict[str, Any] = {"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 256, "temperature": 0}


def parts_of(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("part-*.parquet"))


def responses(ckpt: Checkpoint) -> dict[str, str | None]:
    """prompt -> response, for compact assertions."""
    frame = ckpt.records()
    return {p: (None if pd.isna(r) else r) for p, r in zip(frame["prompt"], frame["response"])}


# ------------------------------------------------------------------------------------------ keys


def test_prompt_hash_is_stable_hex_and_hashes_lone_surrogates() -> None:
    assert prompt_hash("Hi") == "72b2ca007b26e13625a7d479daf3691f"  # must never change: old checkpoints
    assert prompt_hash("\ud800") != prompt_hash("\udc00")  # "surrogatepass": no UnicodeEncodeError
    with pytest.raises(TypeError):
        prompt_hash(None)  # type: ignore[arg-type]


def test_row_keys_only_invalidate_inserted_rows() -> None:
    before = row_keys(["a", "b", "a"])
    assert [o for _, o in before] == [0, 0, 1]
    after = row_keys(["new", "a", "b", "a", "tail"])
    # Every old key is still there; only the inserted and appended rows are new.
    assert set(after) - set(before) == {row_keys(["new"])[0], row_keys(["tail"])[0]}


# ------------------------------------------------------------------------------------------ basics


def test_round_trip_keeps_values_nulls_and_types(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    records = make_records(
        ["hello", "bad", "\ud800 lone"],
        responses=["world", None, "ok"],
        error=[None, "rate limited", None],
        error_type=[None, "RateLimitError", None],
        error_suggestion=[None, "slow down", None],
        status_code=[200, 429, None],
        attempts=[1, 4, 1],
        finish_reason=["stop", None, "length"],
        prompt_tokens=[3, None, 2**40],
        completion_tokens=[5, None, 1],
        latency_s=[0.25, 1.5, None],
    )
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(records)
        stored = ckpt.records()
    assert list(stored.columns) == RECORD_SCHEMA.names
    pd.testing.assert_frame_equal(stored, records)
    # Parquet text is UTF-8: a lone surrogate is stored as U+FFFD, but the key is the original's.
    assert stored["prompt"][2] == "\ufffd lone"
    # (New checkpoints key with keys_for in KEY_SCHEME; this asserted prompt_hash, the legacy scheme.)
    assert stored["prompt_hash"][2] == keys_for(["\ud800 lone"]).hex(0) != keys_for(["\ufffd lone"]).hex(0)
    assert stored["status_code"].dtype == "Int32"
    assert stored["prompt"].dtype == pd.StringDtype()
    assert len(parts_of(path)) == 1


def test_append_accepts_arrow_tables_and_validates(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path / "c", FP) as ckpt:
        table = pa.Table.from_pandas(make_records(["x"], responses=["y"]), preserve_index=False)
        ckpt.append(table)
        ckpt.append(make_records([]))  # empty: no part written
        assert responses(ckpt) == {"x": "y"}
        assert len(parts_of(tmp_path / "c")) == 1
        with pytest.raises(ValueError, match="Unknown record columns"):
            ckpt.append(make_records(["x"]).assign(oops=1))
        with pytest.raises(ValueError, match="key columns"):
            ckpt.append(pd.DataFrame({"prompt": ["x"]}))
        with pytest.raises(ValueError, match="must not contain nulls"):
            ckpt.append(pd.DataFrame({"position": [0], "prompt_hash": [None], "occurrence": [0]}))


def test_latest_record_wins_within_and_across_parts(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path / "c", FP) as ckpt:
        ckpt.append(make_records(["a", "b"], responses=[None, "b1"], error=["timeout", None]))
        ckpt.append(make_records(["a"], responses=["a2"]))
        # Same key twice in one part: the later row is the later write.
        ckpt.append(pd.concat([make_records(["b"], responses=["b2"]), make_records(["b"], responses=["b3"])]))
        assert responses(ckpt) == {"a": "a2", "b": "b3"}
        assert ckpt.records()["error"].isna().all()


def test_resume_across_close_and_open(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
    # A tuple and a list are the same JSON: resuming must not be refused for that.
    with Checkpoint.open(str(path), {**FP, "stop": ("x",)}, resume=False) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
    with Checkpoint.open(path, {**FP, "stop": ["x"]}) as ckpt:
        ckpt.append(make_records(["b"], positions=[1], responses=["B"]))
    with Checkpoint.open(path, {**FP, "stop": ("x",)}) as ckpt:
        assert responses(ckpt) == {"a": "A", "b": "B"}
        assert ckpt.path == path
        assert ckpt.fingerprint == {**FP, "stop": ["x"]}


def test_mismatch_is_refused_with_a_diff_and_how_to_start_fresh(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, {**FP, "params": {"top_p": 1.0}}) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
    new = {**FP, "model": "gpt-4o", "seed": 7, "params": {"top_p": 0.5}}
    with pytest.raises(CheckpointMismatchError) as info:
        Checkpoint.open(path, new)
    message = str(info.value)
    assert str(path) in message
    assert 'model: "gpt-4o-mini" -> "gpt-4o"' in message
    assert "seed: <missing> -> 7" in message
    assert "params.top_p: 1.0 -> 0.5" in message
    assert "provider" not in message  # unchanged keys are not listed
    assert "resume=False" in message and "another checkpoint path" in message
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, GenAIError)
    # The refusal neither took the lock for good nor touched the data.
    with Checkpoint.open(path, {**FP, "params": {"top_p": 1.0}}) as ckpt:
        assert responses(ckpt) == {"a": "A"}


def test_resume_false_deletes_stored_results(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
    (path / "notes.txt").write_text("mine")
    with Checkpoint.open(path, {**FP, "model": "other"}, resume=False) as ckpt:
        assert len(ckpt.records()) == 0
        assert parts_of(path) == []
    assert (path / "notes.txt").read_text() == "mine"  # only our own files are deleted
    assert json.loads((path / "manifest.json").read_text())["fingerprint"]["model"] == "other"


@pytest.mark.parametrize(
    "manifest",
    [
        "{not json",
        json.dumps({"hello": 1}),
        json.dumps({"format": "gen_ai_frames.checkpoint", "version": 99}),
    ],
    ids=["unparseable", "not-ours", "other-version"],
)
def test_bad_manifest_is_corrupt_with_advice(tmp_path: Path, manifest: str) -> None:
    path = tmp_path / "c"
    path.mkdir()
    (path / "manifest.json").write_text(manifest)
    with pytest.raises(CheckpointCorruptError, match="resume=False.*another checkpoint path"):
        Checkpoint.open(path, FP)
    with Checkpoint.open(path, FP, resume=False) as ckpt:  # the advice works
        assert len(ckpt.records()) == 0


@pytest.mark.parametrize(
    "fingerprint",
    [
        {"api_key": "sk-123"},
        {"apiKey": "sk-123"},
        {"headers": {"Authorization": "Bearer x"}},
        {"extra": [{"access_token": "t"}]},
        {"client_secret": "s"},
        {"endpoint": "https://example.invalid/v1?key=sk-123"},
        {"endpoint": "https://user:sk-123@example.invalid/v1"},
    ],
)
def test_fingerprint_with_secrets_is_refused(tmp_path: Path, fingerprint: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="credential") as info:
        Checkpoint.open(tmp_path / "c", {**FP, **fingerprint})
    assert "sk-123" not in str(info.value)  # never echo the secret itself
    assert not (tmp_path / "c").exists()  # refused before touching the disk


def test_fingerprint_allows_token_counts_and_empty_keys(tmp_path: Path) -> None:
    fingerprint = {
        **FP,
        "max_tokens": 5,
        "token_limit": 100,
        "api_key": None,
        "keywords": ["a"],
        "endpoint": "http://localhost:8000/v1?api-version=2024-06-01",
    }
    with Checkpoint.open(tmp_path / "c", fingerprint):
        pass
    with pytest.raises(ValueError, match="JSON"):
        Checkpoint.open(tmp_path / "d", {"when": object()})


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "results.parquet"
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass a directory path"):
        Checkpoint.open(file, FP)


def test_closed_checkpoint_refuses_use_and_repr_shows_counts(tmp_path: Path) -> None:
    ckpt = Checkpoint.open(tmp_path / "c", {**FP, "model": "very-specific-model"})
    ckpt.append(make_records(["a", "b"]))
    text = repr(ckpt)
    assert str(tmp_path / "c") in text and "parts=1" in text and "records=2" in text
    assert "very-specific-model" not in text
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.append(make_records(["c"]))


# ------------------------------------------------------------------------------------------ locking


def test_second_open_in_same_process_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "c"
    first = Checkpoint.open(path, FP)
    with pytest.raises(CheckpointLockedError, match="another run") as info:
        Checkpoint.open(path, FP)
    assert str(path) in str(info.value) and "this process" in str(info.value)
    first.close()
    with Checkpoint.open(path, FP):
        pass


def _python(code: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment to run ``code`` in a fresh interpreter that imports this checkout."""
    paths = [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return [sys.executable, "-c", textwrap.dedent(code)], env


def test_other_process_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "c"
    argv, env = _python(
        f"""
        from gen_ai_frames.checkpoint import Checkpoint, CheckpointLockedError
        try:
            Checkpoint.open({str(path)!r}, {FP!r})
        except CheckpointLockedError as exc:
            print("LOCKED", exc)
        else:
            print("OPENED")
        """
    )
    with Checkpoint.open(path, FP):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("LOCKED"), done.stderr
    assert f"process {os.getpid()}" in done.stdout  # says who holds it


def test_lock_is_released_when_the_holder_is_sigkilled(tmp_path: Path) -> None:
    path = tmp_path / "c"
    argv, env = _python(
        f"""
        import time
        from gen_ai_frames.checkpoint import Checkpoint, make_records
        ckpt = Checkpoint.open({str(path)!r}, {FP!r})
        ckpt.append(make_records(["a"], responses=["A"]))
        print("HOLDING", flush=True)
        time.sleep(120)
        """
    )
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "HOLDING", child.stderr.read() if child.stderr else ""
            with pytest.raises(CheckpointLockedError):
                Checkpoint.open(path, FP)
        finally:
            # SIGKILL: no close(), no atexit. The kernel must still drop the flock.
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    with Checkpoint.open(path, FP) as ckpt:
        assert responses(ckpt) == {"a": "A"}


# ------------------------------------------------------------------------------------------ crashes


def test_orphan_parts_and_tmp_files_are_ignored_then_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
        first_manifest = (path / "manifest.json").read_bytes()
        ckpt.append(make_records(["a"], responses=["ORPHAN"]))
    # A run killed between renaming a part and rewriting the manifest: the part is complete but
    # unlisted. Simulate it by putting back the manifest from before the second append.
    (path / "manifest.json").write_bytes(first_manifest)
    orphan = path / "part-00000002.parquet"
    assert orphan.exists()
    (path / "part-00000003.parquet.tmp").write_bytes(b"PAR1 half")
    (path / "manifest.json.tmp").write_text("{")
    (path / "user.tmp").write_text("not ours")

    assert read_checkpoint(path)["response"].tolist() == ["A"]  # read-only: ignores, deletes nothing
    assert orphan.exists()
    with Checkpoint.open(path, FP) as ckpt:
        assert responses(ckpt) == {"a": "A"}
        ckpt.append(make_records(["b"], positions=[1], responses=["B"]))  # reuses sequence numbers safely
    assert not (path / "part-00000003.parquet.tmp").exists()
    assert not (path / "manifest.json.tmp").exists()
    assert (path / "user.tmp").exists()
    assert read_checkpoint(path)["response"].tolist() == ["A", "B"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_part_names_the_file_and_repair_drops_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
        ckpt.append(make_records(["b"], positions=[1], responses=["B"]))
    bad = path / parts_of(path)[1]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        bad.unlink()

    with pytest.raises(CheckpointCorruptError) as info:
        Checkpoint.open(path, FP)
    message = str(info.value)
    assert str(bad) in message and "repair=True" in message and "generated again" in message
    with pytest.raises(CheckpointCorruptError, match=bad.name):
        read_checkpoint(path)

    with pytest.warns(UserWarning, match=bad.name):
        ckpt = Checkpoint.open(path, FP, repair=True)
    with ckpt:
        assert responses(ckpt) == {"a": "A"}
    assert not bad.exists()
    with Checkpoint.open(path, FP) as ckpt:  # repaired for good
        assert responses(ckpt) == {"a": "A"}


def _fail_on(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Make os.replace fail with ENOSPC for destination files ending in ``suffix``."""
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("failing", [".parquet", "manifest.json"])
def test_disk_full_keeps_earlier_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    path = tmp_path / "c"
    ckpt = Checkpoint.open(path, FP)
    ckpt.append(make_records(["a"], responses=["A"]))
    before = sorted(os.listdir(path))
    manifest = (path / "manifest.json").read_bytes()

    _fail_on(monkeypatch, failing)
    with pytest.raises(CheckpointError) as info:
        ckpt.append(make_records(["b"], positions=[1], responses=["B"]))
    assert str(path) in str(info.value) and os.strerror(errno.ENOSPC) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert sorted(os.listdir(path)) == before  # no tmp or unlisted part left behind
    assert (path / "manifest.json").read_bytes() == manifest
    assert responses(ckpt) == {"a": "A"}

    monkeypatch.undo()  # space freed: the same object carries on
    ckpt.append(make_records(["c"], positions=[2], responses=["C"]))
    ckpt.close()
    with Checkpoint.open(path, FP) as again:
        assert responses(again) == {"a": "A", "c": "C"}


def test_failure_while_writing_the_parquet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))

        def write_table(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(pq, "write_table", write_table)
        with pytest.raises(CheckpointError, match="No space left"):
            ckpt.append(make_records(["b"], responses=["B"]))
    assert not list(path.glob("*.tmp"))
    assert read_checkpoint(path)["response"].tolist() == ["A"]


def test_unwritable_directory_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod does not stop writes: simulate what access() reports to a user.
    path = tmp_path / "c"
    path.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False)
    with pytest.raises(CheckpointError, match="not writable") as info:
        Checkpoint.open(path, FP)
    assert str(path) in str(info.value) and "another checkpoint path" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory_chmod(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.mkdir()
    path.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="permissions"):
            Checkpoint.open(path, FP)
    finally:
        path.chmod(0o700)


# ------------------------------------------------------------------------------------------ compaction


def test_many_small_appends_leave_few_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fsync is slow on CI disks and irrelevant to counting files.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    path = tmp_path / "c"
    appends, rows, every = 200, 5, 3
    batches = [
        pa.Table.from_pandas(
            make_records([f"p{i}-{j}" for j in range(rows)], positions=range(i * rows, (i + 1) * rows)),
            preserve_index=False,
        )
        for i in range(appends)
    ]
    most = 0
    with Checkpoint.open(path, FP, compact_every=every) as ckpt:
        for batch in batches:
            ckpt.append(batch)
            most = max(most, len(parts_of(path)))
        # Rewrite early rows: after compaction across levels the latest write must still win.
        ckpt.append(make_records(["p0-0"], positions=[0], responses=["again"]))
        stored = ckpt.records()
    levels = math.ceil(math.log(appends + 1, every))
    assert most <= (every - 1) * levels + 1  # +1: the new part before it is merged
    assert len(os.listdir(path)) <= (every - 1) * levels + 2  # + manifest.json and .lock
    assert len(stored) == appends * rows
    assert stored.set_index("prompt")["response"]["p0-0"] == "again"
    assert read_checkpoint(path).index.tolist() == list(range(appends * rows))


def test_compaction_never_writes_a_part_bigger_than_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cap bounds how much one merge rewrites, and how big a part a resume reads.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(checkpoint_module, "COMPACT_MAX_ROWS", 12)
    path = tmp_path / "c"
    with Checkpoint.open(path, FP, compact_every=2) as ckpt:
        for i in range(40):
            ckpt.append(make_records([f"p{i}-{j}" for j in range(3)], positions=range(i * 3, i * 3 + 3)))
        ckpt.append(make_records(["p0-0"], positions=[0], responses=["again"]))
        stored = ckpt.records()
    rows = [pq.read_metadata(path / part).num_rows for part in parts_of(path)]
    assert max(rows) <= 12 and max(rows) > 3  # compacted, up to the cap and no further
    assert len(stored) == 120
    assert stored.set_index("prompt")["response"]["p0-0"] == "again"


def test_a_merge_keeps_the_latest_records_and_copies_its_parts_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP, compact_every=3) as ckpt:
        ckpt.append(make_records(["a", "b", "a"], positions=[0, 1, 2], responses=["a1", "b1", "a2"]))
        ckpt.append(make_records(["c", "b"], positions=[3, 1], responses=["c1", "b2"]))
        ckpt.append(make_records(["a", "d"], positions=[0, 4], responses=["a3", "d1"]))  # merges
        (merged,) = parts_of(path)
        stored = ckpt.records()
    parquet = pq.ParquetFile(path / merged)
    # Streamed: each input part became its own row group (none was dropped whole here).
    assert parquet.metadata.num_row_groups == 3
    table = parquet.read()
    # The latest record per key, in the order the survivors were written.
    assert table.column("response").to_pylist() == ["a2", "c1", "b2", "a3", "d1"]
    assert table.column("position").to_pylist() == [2, 3, 1, 0, 4]
    metadata = parquet.schema_arrow.metadata
    assert json.loads(metadata[b"gen_ai_frames.fingerprint"]) == FP  # a lost manifest can be rebuilt
    assert metadata[b"gen_ai_frames.keys"] == KEY_SCHEME.encode()
    assert dict(zip(stored["prompt"] + stored["position"].astype(str), stored["response"])) == {
        "a0": "a3",
        "b1": "b2",
        "a2": "a2",
        "c3": "c1",
        "d4": "d1",
    }


def test_failed_compaction_warns_and_keeps_the_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP, compact_every=2) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
        real_replace = os.replace
        calls = {"n": 0}

        def replace(src: Any, dst: Any) -> None:
            # Let the append's part and manifest through, then fail the merged part.
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.warns(RuntimeWarning, match="compaction failed"):
            ckpt.append(make_records(["b"], positions=[1], responses=["B"]))
        assert len(parts_of(path)) == 2
        ckpt.append(make_records(["c"], positions=[2], responses=["C"]))  # retried: merged now
        assert len(parts_of(path)) <= 2
        assert responses(ckpt) == {"a": "A", "b": "B", "c": "C"}


# ------------------------------------------------------------------------------------------ reading


def test_read_checkpoint_gives_one_row_per_position(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["b", "a"], positions=[1, 0], responses=["B", None], error=[None, "x"]))
        ckpt.append(make_records(["a"], positions=[0], responses=["A"], status_code=[200]))
        frame = read_checkpoint(path)  # while the run holds the lock: no lock needed to read
    assert list(frame.columns) == ["prompt", *RESULT_COLUMNS]
    assert frame.index.name == "position" and frame.index.tolist() == [0, 1]
    assert frame.index.dtype == "int64"
    assert frame["response"].tolist() == ["A", "B"]
    for column in ("prompt", "response", "error", "error_type", "error_suggestion", "finish_reason"):
        assert frame[column].dtype == pd.StringDtype(), column
    for column in ("status_code", "attempts", "prompt_tokens", "completion_tokens"):
        assert frame[column].dtype == "Int64", column
    assert frame["status_code"].tolist()[0] == 200 and pd.isna(frame["status_code"].iloc[1])


def test_read_checkpoint_of_empty_and_missing(tmp_path: Path) -> None:
    with Checkpoint.open(tmp_path / "c", FP):
        pass
    empty = read_checkpoint(tmp_path / "c")
    assert len(empty) == 0 and list(empty.columns) == ["prompt", *RESULT_COLUMNS]
    with pytest.raises(CheckpointError, match="No checkpoint"):
        read_checkpoint(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # reading never creates anything


def test_checkpoint_status_counts(tmp_path: Path) -> None:
    path = tmp_path / "c"
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(
            make_records(
                ["a", "b", "c", "d"],
                responses=["A", None, None, None],
                error=[None, "429", "429", "?"],
                error_type=[None, "RateLimitError", "RateLimitError", None],
            )
        )
        ckpt.append(make_records(["d"], positions=[3], responses=["D"]))  # retried later: now done
    status = checkpoint_status(path)
    assert status["total"] == 4 and status["done"] == 2 and status["failed"] == 2
    assert status["errors_by_type"] == {"RateLimitError": 2}
    assert status["parts"] == 2 and status["fingerprint"] == FP
    json.dumps(status)  # a CLI may print it as JSON


# ------------------------------------------------------------------------------------------ repair


def _two_parts(path: Path) -> None:
    with Checkpoint.open(path, FP) as ckpt:
        ckpt.append(make_records(["a"], responses=["A"]))
        ckpt.append(make_records(["b"], positions=[1], responses=["B"]))


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_lost_manifest_never_deletes_parts_and_repair_rebuilds_it(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c"
    _two_parts(path)
    parts = parts_of(path)
    if damage == "delete":
        (path / "manifest.json").unlink()
    else:
        (path / "manifest.json").write_text("{not json")

    with pytest.raises(CheckpointCorruptError) as info:
        Checkpoint.open(path, FP)  # resume=True: refused, never emptied
    message = str(info.value)
    assert f"gen-ai-frames repair {path}" in message and "Nothing was deleted" in message
    assert parts_of(path) == parts
    with pytest.raises(CheckpointCorruptError, match="repair"):
        read_checkpoint(path)
    assert parts_of(path) == parts

    with pytest.warns(UserWarning, match="rebuilt manifest.json from 2 part"):
        report = repair_checkpoint(path)  # no fingerprint given: each part records it
    assert report["rebuilt"] and report["dropped"] == [] and report["records"] == 2
    assert read_checkpoint(path)["response"].tolist() == ["A", "B"]
    with Checkpoint.open(path, FP) as ckpt:  # the settings came back with the parts
        assert responses(ckpt) == {"a": "A", "b": "B"}
    with pytest.raises(CheckpointMismatchError):
        Checkpoint.open(path, {**FP, "model": "other"})


def test_open_with_repair_rebuilds_a_lost_manifest_but_not_for_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _two_parts(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="other settings"):
        Checkpoint.open(path, {**FP, "temperature": 1}, repair=True)
    assert len(parts_of(path)) == 2  # refused: nothing mixed in, nothing deleted
    with pytest.warns(UserWarning, match="rebuilt"):
        ckpt = Checkpoint.open(path, FP, repair=True)
    with ckpt:
        assert responses(ckpt) == {"a": "A", "b": "B"}
        ckpt.append(make_records(["c"], positions=[2], responses=["C"]))  # numbering continues
    assert len(parts_of(path)) == 3 and read_checkpoint(path)["response"].tolist() == ["A", "B", "C"]


def test_resume_false_still_starts_over_without_a_manifest(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _two_parts(path)
    (path / "manifest.json").unlink()
    with Checkpoint.open(path, FP, resume=False) as ckpt:  # the user asked for it
        assert len(ckpt.records()) == 0
    assert parts_of(path) == []


def test_parts_without_recorded_settings_need_a_fingerprint_to_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "c"
    _two_parts(path)
    for name in parts_of(path):  # as written by an older version: no settings in the part
        table = pq.read_table(path / name)
        pq.write_table(table.replace_schema_metadata(None), path / name)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match="fingerprint="):
        repair_checkpoint(path)
    assert len(parts_of(path)) == 2
    with pytest.warns(UserWarning, match="rebuilt"):
        report = repair_checkpoint(path, fingerprint=FP)
    assert report["records"] == 2
    with Checkpoint.open(path, FP) as ckpt:
        assert responses(ckpt) == {"a": "A", "b": "B"}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_the_advice_of_a_corrupt_part_works_when_followed(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "c"
    _two_parts(path)
    bad = path / parts_of(path)[0]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:20])
    else:
        bad.unlink()
    with pytest.raises(CheckpointCorruptError) as info:
        read_checkpoint(path)
    assert f"run `gen-ai-frames repair {path}`" in str(info.value)
    assert "repair_checkpoint(path)" in str(info.value)

    with pytest.warns(UserWarning, match=bad.name):
        report = repair_checkpoint(path)  # the advice, followed
    assert report["dropped"] == [bad.name] and not report["rebuilt"] and report["records"] == 1
    assert read_checkpoint(path)["response"].tolist() == ["B"]
    with Checkpoint.open(path, FP) as ckpt:
        assert responses(ckpt) == {"b": "B"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert repair_checkpoint(path)["dropped"] == []  # nothing left to repair: no warning


def test_repair_of_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No checkpoint"):
        repair_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json and no part files"):
        repair_checkpoint(tmp_path / "empty")


# --------------------------------------------------------------------------------------- reads match the store


def test_read_after_a_filtered_resume_hides_no_stored_answer(fake_server: Any, tmp_path: Path) -> None:
    import gen_ai_frames  # noqa: F401  (registers the accessor)

    path = tmp_path / "c"
    df = pd.DataFrame({"prompt": [f"q{i}" for i in range(6)]})
    options: dict[str, Any] = {
        "endpoint": fake_server.url,
        "model_name": "m",
        "checkpoint": path,
        "progress": False,
    }
    df.genai.generate(column="prompt", **options)
    # Resume with the last three rows only: they now sit at positions 0-2, where q0-q2 were.
    out = df.iloc[3:].reset_index(drop=True).genai.generate(column="prompt", **options)
    assert out["response"].tolist() == ["echo: q3", "echo: q4", "echo: q5"]
    assert fake_server.stats()["requests"] == 6  # nothing sent again

    stored = read_checkpoint(path)
    assert sorted(stored["prompt"]) == [f"q{i}" for i in range(6)]  # q0-q2 are not hidden
    assert stored.index.tolist() == [0, 0, 1, 1, 2, 2]
    assert stored.loc[0, "prompt"].tolist() == ["q0", "q3"]  # older first, then the later write
    status = checkpoint_status(path)
    assert (status["total"], status["done"], status["failed"]) == (len(stored), 6, 0)


def test_run_rows_with_repair_true_resends_only_the_lost_rows(fake_server: Any, tmp_path: Path) -> None:
    import asyncio

    from gen_ai_frames import create_client
    from gen_ai_frames.runner import run_rows

    path, client = tmp_path / "c", create_client(endpoint=fake_server.url, model_name="m")
    prompts = [f"q{i}" for i in range(8)]

    def run(**options: Any) -> Any:
        run_options = RunOptions(checkpoint=path, chunk_size=2, max_concurrent=1, progress=False, **options)
        return asyncio.run(run_rows(prompts, client=client, options=run_options))

    run()
    bad = path / parts_of(path)[0]
    lost = pq.read_metadata(bad).num_rows
    bad.write_bytes(b"PAR1 damaged")
    fake_server.reset()
    with pytest.raises(CheckpointCorruptError, match="repair=True"):
        run()
    assert fake_server.stats()["requests"] == 0 and bad.exists()
    with pytest.warns(UserWarning, match=bad.name):
        results = run(repair=True)
    assert results.columns["response"] == [f"echo: {p}" for p in prompts]
    assert fake_server.stats()["requests"] == results.sent == lost


def test_parts_written_before_the_logprob_column_existed_still_resume(
    fake_server: Any, tmp_path: Path
) -> None:
    import gen_ai_frames  # noqa: F401  (registers df.genai)
    from gen_ai_frames import create_client

    ckpt, client = tmp_path / "old.ckpt", create_client(endpoint=fake_server.url, model_name="m")
    df = pd.DataFrame({"prompt": ["a", "b", "c"]})
    df.genai.generate(column="prompt", client=client, checkpoint=ckpt, progress=False)
    for part in ckpt.glob("part-*.parquet"):  # as version 0.1 wrote them: no logprob column
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["logprob"]), part)
    fake_server.reset()
    out = df.genai.generate(column="prompt", client=client, checkpoint=ckpt, progress=False, details=True)
    assert fake_server.stats()["requests"] == 0
    assert out["response"].tolist() == ["echo: a", "echo: b", "echo: c"] and out["logprob"].isna().all()
