"""Sharded checkpoints: one run made of shards, each a :class:`~gen_ai_frames.checkpoint.Checkpoint`.

The command line splits a big file into batches and Dask splits a frame into partitions; both keep
one checkpoint per shard under one directory, with one run record::

    run.ckpt/
        run.json            the run record: kind, fingerprint, shard size and input rows (if known)
        batch-000001/       a Checkpoint (.lock, manifest.json, part-*.parquet) plus
            shard.json      the shard's record: its rows, the run that last used it, its counts
        batch-000002/
        ...

Dask's shards are ``partition-00000/``, ``partition-00001/``, ... (numbered from 0, as Dask numbers
partitions); the CLI's are ``batch-000001/``, ... (from 1, as the CLI prints them).

The root may be ``s3://bucket/prefix`` (``storage_options`` as for
:meth:`~gen_ai_frames.checkpoint.Checkpoint.open`): every file goes through the root's
:class:`~gen_ai_frames.checkpoint.Storage`.

Every record is written atomically (:meth:`~gen_ai_frames.checkpoint.Storage.write`). ``shard.json`` is
written only by the process running that shard, so Dask tasks never race on it; ``run.json`` by the
CLI, or by the first Dask task that finds none.

Counting: ``answered``/``failed`` count the rows of the *current* input. A shard that ran to its end
in the current run reports exact counts, taken when it finished; another shard reports what it
stores, but never more rows than it has (a resume after rows were inserted keeps the old answers,
which now belong to other shards, without counting them twice). ``total`` is what is stored.

>>> import tempfile, os
>>> root = os.path.join(tempfile.mkdtemp(), "run.ckpt")
>>> run = ShardedCheckpoint.create(root, "batches", {"model": "m"}, shard_rows=2, input_rows=3)
>>> from gen_ai_frames.checkpoint import Checkpoint, make_records
>>> with Checkpoint.open(run.shard_path(1), {"model": "m"}) as ckpt:
...     ckpt.append(make_records(["a", "b"], responses=["A", "B"]))
>>> checkpoint_status_of(root)["done"], checkpoint_status_of(root)["remaining"]
(2, 1)
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .checkpoint import (
    Checkpoint,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    Storage,
    checkpoint_status,
    read_checkpoint,
    repair_checkpoint,
    result_frame,
    storage_for,
)
from .results import RECORD_SCHEMA

__all__ = [
    "KINDS",
    "RUN_FILE",
    "SHARD_FILE",
    "ShardSizeError",
    "ShardedCheckpoint",
    "checkpoint_status_of",
    "kind_of",
    "read_sharded",
    "repair_sharded",
]

RUN_FILE = "run.json"
SHARD_FILE = "shard.json"
_RUN_FORMAT = "gen_ai_frames.sharded-run"
_SHARD_FORMAT = "gen_ai_frames.shard"
_MANIFEST = "manifest.json"

#: Kind -> (directory prefix, digits, first number, name of one shard).
KINDS: dict[str, tuple[str, int, int, str]] = {
    "batches": ("batch-", 6, 1, "batch"),
    "partitions": ("partition-", 5, 0, "partition"),
}
_SHARD_DIR = re.compile(r"^(batch|partition)-(\d{5,})$")

#: A run's root: a directory path, an ``s3://`` URL, or its Storage.
Root = str | os.PathLike | Storage


class ShardSizeError(CheckpointMismatchError):
    """A run is resumed with another shard size than it was written with (``stored``)."""

    def __init__(self, message: str, *, stored: Any) -> None:
        super().__init__(message)
        self.stored = stored


def kind_of(root: Root, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """``"single"``, ``"batches"``, ``"partitions"``, or None when ``root`` holds no checkpoint.

    >>> kind_of("/no/such/dir") is None
    True
    """
    path = storage_for(root, storage_options)
    if path.has(_MANIFEST):
        return "single"
    record = _read_json(path, RUN_FILE, _RUN_FORMAT)
    if record is not None and record.get("kind") in KINDS:
        return str(record["kind"])
    for kind in KINDS:
        if _shard_dirs(path, kind):
            return kind  # a Dask run whose tasks had no time to write run.json
    return None


def _shard_dirs(root: Storage, kind: str) -> list[tuple[int, Storage]]:
    prefix = KINDS[kind][0]
    found = []
    for name in root.subdirs():
        match = _SHARD_DIR.match(name)
        if match and name.startswith(prefix):
            found.append((int(match.group(2)), root.child(name)))
    return sorted(found, key=lambda item: item[0])


def _read_json(directory: Storage, name: str, format_: str) -> dict[str, Any] | None:
    """A record written by this module, or None if missing; unreadable ones raise."""
    file = directory.show(name)
    try:
        data = json.loads(directory.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"Cannot read {file}: {exc}; delete it (it only holds counts) and run again."
        ) from None
    if not isinstance(data, dict) or data.get("format") != format_:
        raise CheckpointCorruptError(f"{file} is not a gen-ai-frames run record.")
    return data


def _write_json(directory: Storage, name: str, data: Mapping[str, Any]) -> None:
    directory.write(name, json.dumps(dict(data), indent=1).encode("utf-8"))


class ShardedCheckpoint:
    """A run directory of shard checkpoints (see the module docstring). Create with :meth:`create`
    (the CLI, which owns the whole run) or :meth:`attach` (a Dask task, which owns one shard)."""

    def __init__(
        self,
        root: Root,
        kind: str,
        record: dict[str, Any],
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = storage_for(root, storage_options)
        #: The run's directory: a Path, or the ``s3://`` URL of a run on object storage.
        self.root = self.store.location
        self.kind, self.record = kind, record

    # ---------------------------------------------------------------------------------- opening

    @classmethod
    def create(
        cls,
        root: Root,
        kind: str,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool = True,
        shard_rows: int | None = None,
        input_rows: int | None = None,
        source: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ShardedCheckpoint:
        """Start a run over ``root``: check it, empty every shard if not ``resume``, write run.json.

        Resuming with another ``shard_rows`` is refused: shards are matched by number.
        """
        path = storage_for(root, storage_options)
        _check_root(path, kind)
        previous = _read_json(path, RUN_FILE, _RUN_FORMAT)
        if previous is not None and previous.get("kind") != kind:
            raise CheckpointError(
                f"{path} holds a run split in {previous.get('kind')}, not in {kind} (a checkpoint of "
                "another tool, e.g. Dask and the command line): choose another checkpoint path"
            )
        if previous is not None and resume and previous.get("shard_rows") != shard_rows:
            raise ShardSizeError(
                f"Checkpoint {path} was written with {previous.get('shard_rows')} rows per "
                f"{KINDS[kind][3]}; resume with the same value ({KINDS[kind][3]}es are matched by "
                "number), or pass resume=False to start over",
                stored=previous.get("shard_rows"),
            )
        try:
            path.mkdir()
        except OSError as exc:
            raise CheckpointError(f"Cannot create checkpoint directory {path}: {exc}") from None
        run = cls(path, kind, {})
        if not resume:
            # Every shard now, not as the run reaches it: stale shards must not be restored later,
            # and a run still using this checkpoint is found (locked) before anything is deleted.
            for _, shard in _shard_dirs(path, kind):
                Checkpoint.open(shard, fingerprint, resume=False).close()
                shard.remove(SHARD_FILE)
        run.record = {
            "format": _RUN_FORMAT,
            "version": 1,
            "kind": kind,
            "run_id": uuid.uuid4().hex,
            "fingerprint": dict(fingerprint),
            "shard_rows": shard_rows,
            "input_rows": input_rows,
            "source": source,
            "complete": False,
        }
        try:
            _write_json(path, RUN_FILE, run.record)
        except OSError as exc:
            raise CheckpointError(f"Cannot write in checkpoint directory {path}: {exc}") from None
        return run

    @classmethod
    def attach(
        cls,
        root: Root,
        kind: str,
        fingerprint: Mapping[str, Any],
        *,
        run_id: str,
        shards: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ShardedCheckpoint:
        """Join a run from a worker: write run.json if no task has yet (best effort: it only
        serves ``status``), never empty anything."""
        path = storage_for(root, storage_options)
        record = {
            "format": _RUN_FORMAT,
            "version": 1,
            "kind": kind,
            "run_id": run_id,
            "fingerprint": dict(fingerprint),
            "shard_rows": None,
            "input_rows": None,
            "shards": shards,
            "source": None,
            "complete": False,
        }
        try:
            existing = _read_json(path, RUN_FILE, _RUN_FORMAT)
        except CheckpointCorruptError:
            existing = None
        if existing is None or existing.get("run_id") != run_id:
            with contextlib.suppress(OSError):
                path.mkdir()
                _write_json(path, RUN_FILE, record)
        return cls(path, kind, record)

    # ---------------------------------------------------------------------------------- shards

    def shard_path(self, number: int) -> Path | str:
        """The checkpoint directory of shard ``number`` (a Path, or an ``s3://`` URL).

        >>> ShardedCheckpoint(Path("/r"), "partitions", {}).shard_path(7).as_posix()
        '/r/partition-00007'
        """
        return self.shard_storage(number).location

    def shard_storage(self, number: int) -> Storage:
        """The :class:`~gen_ai_frames.checkpoint.Storage` of shard ``number``: pass it (rather than
        :meth:`shard_path`) to ``Checkpoint.open``, with the run's storage options in it."""
        return self.store.child(self.shard_name(number))

    def shard_name(self, number: int) -> str:
        """The name of shard ``number``'s directory, e.g. ``partition-00007``."""
        prefix, digits, _, _ = KINDS[self.kind]
        return f"{prefix}{number:0{digits}d}"

    def shards(self) -> list[tuple[int, Path | str]]:
        """``(number, directory)`` of every shard stored, in order."""
        return [(number, store.location) for number, store in _shard_dirs(self.store, self.kind)]

    def start_shard(self, number: int, rows: int) -> None:
        """Record that this run is answering shard ``number`` (of ``rows`` rows) now."""
        self._write_shard(number, {"rows": rows, "finished": False})

    def start_shard_over_once(self, number: int, fingerprint: Mapping[str, Any]) -> None:
        """Empty shard ``number`` unless this run did already (Dask's ``resume=False``).

        Dask runs a task again when its worker dies; if that attempt started over too,
        ``resume=False`` would throw away what the first attempt paid for. So the first attempt
        empties the shard and *then* records the run's id in shard.json; an attempt that finds
        its run's id resumes. (A crash between the two steps just empties it again.)
        """
        directory = self.shard_storage(number)
        if self.shard_record(number).get("run_id") == self.record["run_id"]:
            return
        Checkpoint.open(directory, fingerprint, resume=False).close()
        self._write_shard(number, {"rows": None, "finished": False})

    def finish_shard(self, number: int, columns: Mapping[str, pa.Array | pa.ChunkedArray]) -> None:
        """Record shard ``number``'s counts for the current input, from its result columns
        (``error`` and ``error_type``, as Arrow: :attr:`RowResults.arrays`).

        Rows that cannot be sent (no prompt) are never stored in a checkpoint, so only this
        record has them; a failed write only costs ``status`` its exact counts.
        """
        error = columns["error"]
        kinds = columns["error_type"].filter(error.is_valid()).to_pylist()
        errors = Counter(kind or "unknown" for kind in kinds)
        rows, failed = len(error), sum(errors.values())
        with contextlib.suppress(OSError):
            self._write_shard(
                number,
                {
                    "rows": rows,
                    "finished": True,
                    "answered": rows - failed,
                    "failed": failed,
                    "errors_by_type": dict(errors),
                },
            )

    def complete(self) -> None:
        """Record that every shard of the run's input was answered."""
        self.record["complete"] = True
        with contextlib.suppress(OSError):
            _write_json(self.store, RUN_FILE, self.record)

    def shard_record(self, number: int) -> dict[str, Any]:
        """shard.json of shard ``number`` ({} if none or unreadable: it only holds counts)."""
        try:
            return _read_json(self.shard_storage(number), SHARD_FILE, _SHARD_FORMAT) or {}
        except CheckpointCorruptError:
            return {}

    def _write_shard(self, number: int, data: dict[str, Any]) -> None:
        directory = self.shard_storage(number)
        directory.mkdir()
        _write_json(
            directory,
            SHARD_FILE,
            {"format": _SHARD_FORMAT, "version": 1, "run_id": self.record.get("run_id"), **data},
        )

    # ---------------------------------------------------------------------------------- reading

    def expected_rows(self, number: int) -> int | None:
        """Rows of shard ``number`` in the current input, when the run record knows the input."""
        size, total = self.record.get("shard_rows"), self.record.get("input_rows")
        if not size or total is None:
            return None
        first = KINDS[self.kind][2]
        return max(0, min(size, total - (number - first) * size))

    def total_shards(self) -> int | None:
        size, total = self.record.get("shard_rows"), self.record.get("input_rows")
        if size and total is not None:
            return math.ceil(total / size)
        shards = self.record.get("shards")
        return shards if isinstance(shards, int) else None

    def status(self) -> dict[str, Any]:
        """Counts over every shard (see the module docstring for what is counted)."""
        run_id = self.record.get("run_id")
        stored = done = failed = parts = 0
        errors: Counter[str] = Counter()
        fingerprint = self.record.get("fingerprint")
        shards = _shard_dirs(self.store, self.kind)
        last = self.total_shards()
        for number, directory in shards:
            record = self.shard_record(number)
            info = None
            if _has_checkpoint(directory):
                info = checkpoint_status(directory)
                stored += info["total"]
                parts += info["parts"]
                fingerprint = fingerprint or info["fingerprint"]
            if last is not None and number >= last + KINDS[self.kind][2]:
                continue  # beyond the current input (it shrank): stored, but not the input's rows
            if record.get("finished") and record.get("run_id") == run_id:
                done += record["answered"]
                failed += record["failed"]
                errors.update(record["errors_by_type"])
            elif info is not None:
                rows = self.expected_rows(number)
                if rows is None and record.get("run_id") == run_id:
                    rows = record.get("rows")
                shard_done, shard_failed = info["done"], info["failed"]
                if rows is not None:  # stale answers of rows that moved to another shard
                    shard_done = min(shard_done, rows)
                    shard_failed = min(shard_failed, rows - shard_done)
                done += shard_done
                failed += shard_failed
                errors.update(_clip_errors(info["errors_by_type"], shard_failed))
        input_rows = self.record.get("input_rows")
        return {
            "path": str(self.store),
            "kind": self.kind,
            "shards": len(shards),
            "total_shards": last,
            "input_rows": input_rows,
            "total": stored,
            "done": done,
            "failed": failed,
            "remaining": None if input_rows is None else max(0, input_rows - done - failed),
            "complete": bool(self.record.get("complete", False)),
            "errors_by_type": dict(errors.most_common()),
            "parts": parts,
            "fingerprint": fingerprint or {},
        }

    def read(self) -> pd.DataFrame:
        """Every shard's stored results, indexed by (shard number, position in the shard)."""
        frames, keys = [], []
        for number, directory in _shard_dirs(self.store, self.kind):
            if _has_checkpoint(directory):
                frames.append(read_checkpoint(directory))
                keys.append(number)
        name = KINDS[self.kind][3]
        if not frames:
            empty = result_frame(RECORD_SCHEMA.empty_table())
            index = pd.MultiIndex.from_arrays(
                [pd.Index([], dtype="int64"), empty.index], names=[name, "position"]
            )
            return empty.set_axis(index, axis=0)
        return pd.concat(frames, keys=keys, names=[name, "position"])


def _has_checkpoint(directory: Storage) -> bool:
    """Whether a shard directory holds results (a manifest, or parts whose manifest was lost: then
    reading it raises, with the advice to repair, rather than skipping it silently)."""
    return directory.has(_MANIFEST) or bool(fnmatch.filter(directory.names(), "part-*.parquet"))


def _clip_errors(errors: Mapping[str, int], limit: int) -> dict[str, int]:
    """At most ``limit`` errors in all, the most common types first."""
    clipped: dict[str, int] = {}
    for kind, count in sorted(errors.items(), key=lambda item: -item[1]):
        take = min(count, limit - sum(clipped.values()))
        if take > 0:
            clipped[kind] = take
    return clipped


def _check_root(path: Storage, kind: str) -> None:
    if path.is_file():
        raise CheckpointError(f"Checkpoint path {path} is a file; give a directory (created if missing).")
    if path.has(_MANIFEST):
        raise CheckpointError(
            f"{path} is a checkpoint written by df.genai.generate; a run split in {kind} keeps one "
            "checkpoint per shard under its own directory: choose another checkpoint path"
        )


def _open(root: Root, storage_options: Mapping[str, Any] | None = None) -> ShardedCheckpoint:
    path = storage_for(root, storage_options)
    kind = kind_of(path)
    if kind is None or kind == "single":
        what = "does not exist" if not path.exists() else "holds no checkpoint"
        raise CheckpointError(f"No checkpoint at {path}: the path {what}.")
    return ShardedCheckpoint(path, kind, _read_json(path, RUN_FILE, _RUN_FORMAT) or {})


def checkpoint_status_of(root: Root, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:meth:`ShardedCheckpoint.status` of the run at ``root``."""
    return _open(root, storage_options).status()


def read_sharded(root: Root, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """:meth:`ShardedCheckpoint.read` of the run at ``root``."""
    return _open(root, storage_options).read()


def repair_sharded(root: Root, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`~gen_ai_frames.checkpoint.repair_checkpoint` on every shard of the run at ``root``."""
    run = _open(root, storage_options)
    reports = {}
    for number, directory in _shard_dirs(run.store, run.kind):
        if _has_checkpoint(directory):
            reports[number] = repair_checkpoint(directory)
    return {
        "path": str(run.store),
        "kind": run.kind,
        "shards": reports,
        "dropped": [f"{run.shard_name(n)}/{name}" for n, r in reports.items() for name in r["dropped"]],
        "rebuilt": [run.shard_name(n) for n, r in reports.items() if r["rebuilt"]],
    }
