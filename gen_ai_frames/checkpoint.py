"""The checkpoint store: results written as they arrive, so a long run survives a kernel death.

A checkpoint is a directory::

    my_run.ckpt/
        .lock                   flock()ed by the run using it; the OS drops the lock when the process dies
        manifest.json           format version, fingerprint of the run's settings, list of parts
        part-00000001.parquet   records, one row per prompt answered (or failed)
        part-00000002.parquet
        ...

Crash safety comes from ordering, not from a database:

* a part is written to ``part-N.parquet.tmp``, fsynced, renamed into place, and the directory fsynced
  (each part also records the run's fingerprint, so a lost manifest can be rebuilt, see
  :func:`repair_checkpoint`);
* only then is ``manifest.json`` rewritten the same way (tmp, fsync, rename, directory fsync).

``os.replace`` is atomic, so a reader sees either the old or the new manifest, and the manifest only
lists parts that are complete on disk. A crash between the two renames leaves a part the manifest does
not list: it is ignored, and deleted on the next :meth:`Checkpoint.open`. Part files with no manifest at
all are never deleted on resume: opening refuses, and :func:`repair_checkpoint` rebuilds the manifest.

Records are matched to input rows by ``(prompt_hash, occurrence)`` (hashed in the checkpoint's
:attr:`Checkpoint.key_scheme`, see :func:`gen_ai_frames.keys.keys_for`) rather than by row position,
so inserting, appending or editing rows of the input frame only invalidates those rows. When a key is
stored more than once, the record written last wins. The manifest lists parts from oldest to newest,
and that order (not the part number) decides which record is the latest.

Appending 500 rows at a time would leave thousands of small files, so parts are compacted like an LSM
tree: each part has a level; when ``compact_every`` adjacent parts share a level they are merged into one
part of the next level, as long as the merged part stays within :data:`COMPACT_MAX_ROWS` rows. A
merge reads the key columns of its parts to find the latest records, then copies one part at a time,
so it holds one input part, never all of them; the cap bounds how much one merge rewrites and how big
a part a resume reads. Files stay at most about ``(compact_every - 1) * levels + rows /
COMPACT_MAX_ROWS``: a million rows written 2,000 at a time leave about 45 parts, each read only as far
as its key columns on resume.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
>>> with Checkpoint.open(path, {"model": "m"}) as ckpt:
...     ckpt.append(make_records(["Hi", "Hi"], responses=["Hello", "Hey"]))
>>> read_checkpoint(path)["response"].tolist()
['Hello', 'Hey']
>>> checkpoint_status(path)["done"]
2

A local checkpoint needs a POSIX disk (locking uses ``fcntl.flock``). Every file goes through a
:class:`Storage`: :class:`LocalStorage` here, and for ``s3://bucket/prefix``
:class:`gen_ai_frames.storage.S3Storage`, which keeps the same guarantees with a lease object and
conditional writes.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import threading
import urllib.parse
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigurationError, GenAIError
from .keys import (
    KEY_SCHEME,
    KEY_SCHEMES,
    LEGACY_KEY_SCHEME,
    StoredKeys,
    _combined,
    _repeated,
    hashes_from_hex,
    keys_for,
)
from .results import ADDED_COLUMNS, PANDAS_DTYPES, RECORD_SCHEMA, RESULT_COLUMNS

__all__ = [
    "RECORD_SCHEMA",
    "RESULT_COLUMNS",
    "Checkpoint",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "checkpoint_status",
    "make_records",
    "prompt_hash",
    "read_checkpoint",
    "repair_checkpoint",
    "row_keys",
    "run_fingerprint",
]

_KEY_COLUMNS = ["prompt_hash", "occurrence"]
_REQUIRED_COLUMNS = ("position", "prompt_hash", "occurrence")

_FORMAT = "gen_ai_frames.checkpoint"
#: Compaction never writes a part of more rows than this (see the module docstring).
COMPACT_MAX_ROWS = 131_072
# Version 2 manifests record their key scheme ("keys"); version 1 ones are keyed with
# LEGACY_KEY_SCHEME. New checkpoints are version 2, so a release that predates key schemes refuses
# them (it would match nothing and pay for every row again) instead of resuming them wrongly.
_FORMAT_VERSION = 2
_LEGACY_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
# Only files we create are ever deleted: the directory may be one the user also keeps other files in.
_TMP_RE = re.compile(r"^(part-\d+\.parquet|manifest\.json)\.tmp$")

_PART_FINGERPRINT = b"gen_ai_frames.fingerprint"
# The key scheme of the part's prompt_hash column (absent in parts of older versions: legacy).
_PART_KEYS = b"gen_ai_frames.keys"
# What Checkpoint.stored_keys() reads of each part.
_STORED_KEY_COLUMNS = ["prompt_hash", "occurrence", "position", "error"]
_KEY_SCHEMA = pa.schema([RECORD_SCHEMA.field(name) for name in _KEY_COLUMNS])

_START_FRESH = (
    "To start fresh, pass resume=False (this deletes the results stored there), "
    "or use another checkpoint path."
)


class CheckpointError(GenAIError):
    """A checkpoint cannot be opened, read or written. The message says what to do."""


class CheckpointLockedError(CheckpointError):
    """Another run (or another open :class:`Checkpoint` in this process) holds the checkpoint's lock."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written with other settings (provider, model, parameters...)."""


class CheckpointCorruptError(CheckpointError):
    """The manifest or a part file is not a readable gen-ai-frames checkpoint."""


# --------------------------------------------------------------------------------------------------
# Row keys


def prompt_hash(prompt: str) -> str:
    """Stable hex digest (blake2b, 16 bytes) of the UTF-8 prompt: the legacy key scheme
    (:data:`~gen_ai_frames.keys.LEGACY_KEY_SCHEME`) of checkpoints written before key schemes. New
    checkpoints key with :func:`gen_ai_frames.keys.keys_for`; this stays for the old ones.

    ``surrogatepass`` lets lone surrogates (which pandas happily stores) hash instead of raising.

    >>> prompt_hash("Hi")
    '72b2ca007b26e13625a7d479daf3691f'
    >>> prompt_hash("\\ud800") == prompt_hash("\\ud800")
    True
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def row_keys(prompts: Sequence[str]) -> list[tuple[str, int]]:
    """``(prompt_hash, occurrence)`` per row; ``occurrence`` counts earlier rows with the same prompt.

    Legacy: keys in :data:`~gen_ai_frames.keys.LEGACY_KEY_SCHEME`, one Python object per row. Use
    :func:`gen_ai_frames.keys.keys_for` with the checkpoint's :attr:`Checkpoint.key_scheme` instead.

    Matching rows by key instead of position means inserting, appending or editing rows only
    invalidates those rows; duplicates are told apart by their rank among identical prompts.

    >>> [occ for _, occ in row_keys(["a", "b", "a", "a"])]
    [0, 0, 1, 2]
    """
    seen: Counter[str] = Counter()
    keys = []
    for prompt in prompts:
        digest = prompt_hash(prompt)
        keys.append((digest, seen[digest]))
        seen[digest] += 1
    return keys


def make_records(
    prompts: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    responses: Sequence[str | None] | None = None,
    scheme: str = KEY_SCHEME,
    **columns: Sequence[Any],
) -> pd.DataFrame:
    """A records frame for :meth:`Checkpoint.append`, keyed in key scheme ``scheme`` (that of new
    checkpoints by default; pass the checkpoint's :attr:`Checkpoint.key_scheme` for an old one).

    ``positions`` defaults to ``0..n-1``; other keyword arguments fill result columns by name.
    Occurrences are counted within ``prompts`` only, so pass the whole input's keys yourself when
    writing a slice of a larger frame.

    >>> make_records(["a", "a"], responses=["x", None])[["position", "occurrence", "response"]]
       position  occurrence response
    0         0           0        x
    1         1           1     <NA>
    """
    keys = keys_for(list(prompts), scheme)
    n = len(keys)
    data: dict[str, Any] = {
        "position": list(range(n)) if positions is None else list(positions),
        "prompt_hash": keys.hex_array().to_pylist(),
        "occurrence": keys.occurrence.tolist(),
        "prompt": list(prompts),
    }
    if responses is not None:
        data["response"] = list(responses)
    data.update({name: list(values) for name, values in columns.items()})
    # object dtype: pandas' own str dtype cannot even hold a lone surrogate; _to_table fixes them.
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in data.items()})
    return _table_to_frame(_to_table(frame))


# --------------------------------------------------------------------------------------------------
# Fingerprint


def _normalize_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON, so tuples and lists (and int keys and str keys) compare equal."""
    if not isinstance(fingerprint, Mapping):
        raise ConfigurationError(
            f"fingerprint must be a dict of the run's settings, got {type(fingerprint).__name__}"
        )
    try:
        text = json.dumps(dict(fingerprint), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"fingerprint must hold only JSON values (str, number, bool, None, list, dict): {exc}"
        ) from exc
    normalized: dict[str, Any] = json.loads(text)
    _refuse_secrets(normalized, "")
    return normalized


_SECRET_WORDS = frozenset({"key", "token", "secret", "password", "passwd", "authorization"})
_SECRET_SUBSTRINGS = ("apikey", "secret", "password", "accesstoken", "authtoken")


def _looks_secret(name: str) -> bool:
    """Whether a setting's name says it holds a credential.

    Matches whole words (snake, kebab or camel case) rather than substrings, because ``max_tokens``
    is in every fingerprint and must not be taken for a token.

    >>> [_looks_secret(n) for n in ("api_key", "apiKey", "X-Api-Key", "client_secret", "max_tokens")]
    [True, True, True, True, False]
    """
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    if any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words)):
        return True
    compact = re.sub(r"[^a-z0-9]", "", name.lower())
    return any(part in compact for part in _SECRET_SUBSTRINGS)


def _refuse_secrets(value: Any, where: str) -> None:
    """Raise if a credential-looking key holds a value: manifests are plain text and get shared.

    ``None``, numbers and bools are allowed (a credential is text), e.g. ``{"token_limit": 100}``.
    """
    if isinstance(value, dict):
        for name, item in value.items():
            path = f"{where}.{name}" if where else str(name)
            if _looks_secret(str(name)) and item is not None and not isinstance(item, (int, float)):
                raise ConfigurationError(
                    f"Refusing to store fingerprint key {path!r} in a checkpoint: its name says it "
                    "holds a credential, and checkpoints are plain files. Leave secrets out of the "
                    "fingerprint (set the value to None if the key must be there)."
                )
            _refuse_secrets(item, path)
    elif isinstance(value, str) and "://" in value:
        _refuse_url_secrets(value, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_secrets(item, f"{where}[{i}]")


def _refuse_url_secrets(url: str, where: str) -> None:
    """Endpoints may carry credentials too: ``https://user:pw@host`` or ``...?key=...``."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return  # not a URL after all
    names = [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=False)]
    if password or any(_looks_secret(name) for name in names):
        raise ConfigurationError(
            f"Refusing to store fingerprint key {where!r} in a checkpoint: the URL carries a "
            "credential (a password or a key/token query parameter). Store the URL without it."
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and (value or not prefix):
        flat: dict[str, Any] = {}
        for name, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{name}" if prefix else str(name)))
        return flat
    return {prefix: value}


_MISSING = object()


def _fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines ``key: old -> new`` for every differing (dotted, for nested dicts) key."""
    flat_old, flat_new = _flatten(old), _flatten(new)

    def show(v: Any) -> str:
        return "<missing>" if v is _MISSING else json.dumps(v)

    lines = []
    for name in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(name, _MISSING), flat_new.get(name, _MISSING)
        if a != b:
            lines.append(f"  {name}: {show(a)} -> {show(b)}")
    return lines


# --------------------------------------------------------------------------------------------------
# Tables and frames


def _to_table(records: pd.DataFrame | pa.Table) -> pa.Table:
    """Validate and cast ``records`` to :data:`RECORD_SCHEMA`; absent result columns become null."""
    if isinstance(records, pd.DataFrame):
        if len(set(map(str, records.columns))) != records.shape[1]:
            raise ValueError(f"Duplicate record columns in {list(records.columns)}")
        try:
            try:
                records = pa.Table.from_pandas(records, preserve_index=False)
            except UnicodeEncodeError:
                # Parquet strings are UTF-8; only then pay for scanning every string.
                records = pa.Table.from_pandas(_without_surrogates(records), preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"Records cannot be converted to Arrow: {exc}") from exc
    if not isinstance(records, pa.Table):
        raise TypeError(
            f"records must be a pandas DataFrame or a pyarrow Table, got {type(records).__name__}"
        )
    names = records.column_names
    n = records.num_rows
    unknown = sorted(set(names) - set(RECORD_SCHEMA.names))
    if unknown:
        raise ValueError(f"Unknown record columns {unknown}; allowed: {RECORD_SCHEMA.names}")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate record columns in {names}")
    missing = [name for name in _REQUIRED_COLUMNS if name not in names]
    if missing:
        raise ValueError(f"Records need the key columns {missing} (see row_keys())")

    arrays = []
    for field in RECORD_SCHEMA:
        if field.name not in names:
            arrays.append(pa.nulls(n, field.type))
            continue
        try:
            array = records.column(field.name).cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"Record column {field.name!r} is not {field.type}: {exc}") from exc
        if not field.nullable and array.null_count:
            raise ValueError(f"Record column {field.name!r} must not contain nulls")
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _fix_text(value: Any) -> Any:
    """Lone surrogates -> U+FFFD (a split pair is joined). Non-strings pass through."""
    if isinstance(value, str) and _SURROGATE.search(value):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _without_surrogates(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text can be written as UTF-8.

    Lone surrogates get into object columns (e.g. from JSON ``"\\ud800"`` escapes) but cannot be
    stored. Keys are unaffected: :func:`prompt_hash` hashes the original prompt.
    """
    fixed = {
        name: frame[name].map(_fix_text) if frame[name].dtype == object else frame[name]
        for name in frame.columns
    }
    return pd.DataFrame(fixed, index=frame.index)


def _dedup_latest(table: pa.Table) -> pa.Table:
    """Keep the last row per ``(prompt_hash, occurrence)``, in the order the survivors were written."""
    last = _latest_rows(table.select(_KEY_COLUMNS))
    return table if last is None else table.take(last)


def _latest_rows(keys: pa.Table) -> np.ndarray | None:
    """Indices of the last row of each ``(prompt_hash, occurrence)`` in ``keys``, in order; None
    when no key repeats (the common case, which then costs no copy). See :func:`_latest`."""
    return _latest(
        hashes_from_hex(keys.column("prompt_hash")),
        keys.column("occurrence").to_numpy().astype(np.int32, copy=False),
    )


_NULLABLE_TYPES = {
    pa.string(): pd.StringDtype(),
    pa.large_string(): pd.StringDtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.int32(): pd.Int32Dtype(),
}


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    # pandas nullable dtypes: a missing status_code stays <NA> instead of turning the column into floats.
    return table.to_pandas(types_mapper=_NULLABLE_TYPES.get)


# --------------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable. Some filesystems cannot fsync a directory: that is fine."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # best effort: whatever is left is cleaned up on the next open


def write_atomic(
    final: Path,
    write: bytes | Callable[[BinaryIO], object],
    on_replaced: Callable[[], None] | None = None,
) -> None:
    """``write(file)`` (or the bytes ``write``) into ``final.tmp``, fsync, rename over ``final``,
    fsync the directory: a reader sees the old file or the new one, never half of one.

    The package's only temp-file-then-rename writer: checkpoint parts and manifests, and the run
    records of sharded checkpoints (:mod:`gen_ai_frames.shards`), all go through it.
    On error before the rename the tmp file is removed and the old ``final`` (if any) is untouched.
    ``on_replaced`` runs right after the rename, before the directory fsync (which may still fail).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "run.json"
    >>> write_atomic(target, b"{}")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{}', ['run.json'])
    """
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, bytes):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise
    if on_replaced is not None:
        on_replaced()
    _fsync_dir(final.parent)


def _part_name(seq: int) -> str:
    return f"part-{seq:08d}.parquet"


class Storage:
    """Where a checkpoint's files live: the seam between the checkpoint protocol and a file system.

    Names are relative to the checkpoint's directory. :class:`LocalStorage` is a POSIX directory
    (``fcntl`` lock, fsync and rename); :class:`gen_ai_frames.storage.S3Storage` is an ``s3://``
    prefix (a lease object, conditional writes). ``str()`` is the location for messages: it never
    holds credentials.
    """

    #: The directory as the user gave it: a Path for a local disk, a URL string for object storage.
    location: Path | str

    def __str__(self) -> str:
        return str(self.location)

    def show(self, name: str) -> str:
        """The location of file ``name``, for messages."""
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether the directory exists (object storage: whether anything is stored under it)."""
        raise NotImplementedError

    def is_file(self) -> bool:
        """Whether the path is a file rather than a directory."""
        raise NotImplementedError

    def names(self) -> list[str]:
        """Names of the files directly in the directory ([] when it does not exist)."""
        raise NotImplementedError

    def subdirs(self) -> list[str]:
        """Names of the sub-directories ([] when the directory does not exist)."""
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes; FileNotFoundError when missing."""
        raise NotImplementedError

    def open_read(self, name: str) -> BinaryIO:
        """A seekable binary file to read ``name`` (a context manager)."""
        raise NotImplementedError

    def write(
        self,
        name: str,
        data: bytes | Callable[[BinaryIO], object],
        *,
        on_replaced: Callable[[], None] | None = None,
        exclusive: bool = False,
    ) -> None:
        """Replace ``name`` atomically: readers see the old file or the new one, never half.

        ``exclusive``: a file of the checkpoint written under its lock (parts, the manifest). An
        object store makes those writes conditional, so a writer that lost its lease cannot
        overwrite what another wrote: it gets :class:`CheckpointLockedError`.
        """
        raise NotImplementedError

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists; best effort (leftovers are cleaned up on the next open)."""
        raise NotImplementedError

    def mkdir(self) -> None:
        """Create the directory (and its parents) if needed; nothing to do on object storage."""
        raise NotImplementedError

    def child(self, name: str) -> Storage:
        """The storage of sub-directory ``name``."""
        raise NotImplementedError

    def lock(self) -> _Lock:
        """Create the directory if needed and take its exclusive lock (CheckpointLockedError if held)."""
        raise NotImplementedError


class _Lock:
    """A held checkpoint lock. ``release()`` is idempotent; ``check()`` raises if it was lost."""

    def release(self) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        """Let go without cleaning up (from ``__del__``, when the interpreter may be exiting)."""
        self.release()

    def check(self) -> None:
        """Raise CheckpointLockedError if another run took the lock over (only a lease can be lost)."""


class _FlockLock(_Lock):
    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            # Explicit unlock: a forked child may share this descriptor and would keep the lock.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def abandon(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


class LocalStorage(Storage):
    """A checkpoint directory on a local or shared POSIX disk: ``fcntl.flock`` excludes other runs,
    and :func:`write_atomic` writes every file (tmp file, fsync, rename, directory fsync)."""

    location: Path

    def __init__(self, directory: Path) -> None:
        self.location = directory

    def show(self, name: str) -> str:
        return str(self.location / name)

    def exists(self) -> bool:
        return self.location.exists()

    def is_file(self) -> bool:
        return self.location.exists() and not self.location.is_dir()

    def names(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.location)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def subdirs(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.location) if entry.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def has(self, name: str) -> bool:
        return (self.location / name).exists()

    def read_bytes(self, name: str) -> bytes:
        return (self.location / name).read_bytes()

    def open_read(self, name: str) -> BinaryIO:
        return open(self.location / name, "rb")

    def write(
        self,
        name: str,
        data: bytes | Callable[[BinaryIO], object],
        *,
        on_replaced: Callable[[], None] | None = None,
        exclusive: bool = False,
    ) -> None:
        # The module's write_atomic, looked up at call time (tests patch it to simulate a full disk).
        write_atomic(self.location / name, data, on_replaced=on_replaced)

    def remove(self, name: str) -> None:
        _remove_quietly(self.location / name)

    def mkdir(self) -> None:
        self.location.mkdir(parents=True, exist_ok=True)

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self.location / name)

    def lock(self) -> _Lock:
        return _FlockLock(_lock_directory(self.location))


def storage_for(
    path: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None
) -> Storage:
    """The :class:`Storage` of checkpoint ``path``: ``s3://bucket/prefix`` is object storage
    (``storage_options`` as for fsspec/s3fs, else the ``AWS_*`` environment), anything else a
    local directory.

    >>> storage_for("/data/run.ckpt").location
    PosixPath('/data/run.ckpt')
    >>> storage_for("/data/run.ckpt", {"anon": True})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: storage_options only apply to ... is a local path: ...
    """
    if isinstance(path, Storage):
        return path
    text = os.fspath(path)
    if isinstance(text, str) and "://" in text:
        from .storage import object_storage  # s3fs is an optional dependency (the `s3` extra)

        return object_storage(text, storage_options)
    if storage_options:
        raise ConfigurationError(
            "storage_options only apply to object-store checkpoints (s3://bucket/prefix); "
            f"{str(text)!r} is a local path: leave storage_options out"
        )
    return LocalStorage(Path(text))


def _corrupt_part_message(store: Storage, name: str, problem: str) -> str:
    # Deleting the file is no cure (the manifest still lists it): name the repair instead.
    return (
        f"Checkpoint part {store.show(name)} is {problem}. To recover, {_repair_advice(store)}: it "
        "drops missing or unreadable parts from the manifest (with Checkpoint.open, repair=True "
        "does the same), and their rows will be generated again on resume."
    )


def _read_parquet(file: BinaryIO, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a part file (or its ``columns``).

    Not ``pq.read_table``: that goes through the dataset scanner, whose thread pools keep about
    60 MB more memory for the life of the process than this direct read (measured reading the parts
    of a 300,000-row checkpoint), which a long run cannot spare.
    """
    return pq.ParquetFile(file).read(columns=columns, use_threads=False)


def _read_part(store: Storage, name: str) -> pa.Table:
    try:
        # An explicit file object so the handle is closed even when the read fails.
        with store.open_read(name) as f:
            table = _read_parquet(f)
        for spec in RECORD_SCHEMA:
            if spec.name in ADDED_COLUMNS and spec.name not in table.column_names:
                table = table.append_column(spec, pa.nulls(table.num_rows, spec.type))
        return table.select(RECORD_SCHEMA.names).cast(RECORD_SCHEMA)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, "missing")) from exc
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, f"unreadable ({exc})")) from exc


def _check_part(store: Storage, name: str, rows: int) -> None:
    """Cheap check at open: the file exists and its footer is intact (a truncated file fails here)."""
    try:
        with store.open_read(name) as f:
            metadata = pq.read_metadata(f)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, "missing")) from exc
    except (OSError, pa.ArrowException) as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, f"unreadable ({exc})")) from exc
    if metadata.num_rows != rows:
        raise CheckpointCorruptError(
            _corrupt_part_message(
                store, name, f"inconsistent (manifest says {rows} rows, file has {metadata.num_rows})"
            )
        )


def _read_part_keys(store: Storage, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(hashes, occurrence, position, failed)`` of a part's rows, reading only those columns."""
    try:
        with store.open_read(name) as f:
            table = _read_parquet(f, columns=_STORED_KEY_COLUMNS)
        return (
            hashes_from_hex(table.column("prompt_hash")),
            table.column("occurrence").to_numpy().astype(np.int32, copy=False),
            table.column("position").to_numpy().astype(np.int64, copy=False),
            table.column("error").is_valid().to_numpy(zero_copy_only=False),
        )
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, "missing")) from exc
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, f"unreadable ({exc})")) from exc


def _read_part_columns(store: Storage, name: str, schema: pa.Schema) -> pa.Table:
    """Only the columns of ``schema`` of a part, with their stored types (columns added to the
    format after the part was written are null)."""
    try:
        with store.open_read(name) as f:
            parquet = pq.ParquetFile(f)
            present = [n for n in schema.names if n in parquet.schema_arrow.names]
            table = parquet.read(columns=present)
        arrays = [
            table.column(field.name).cast(field.type)
            if field.name in present
            else pa.nulls(table.num_rows, field.type)
            for field in schema
        ]
        return pa.Table.from_arrays(arrays, schema=schema)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, "missing")) from exc
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise CheckpointCorruptError(_corrupt_part_message(store, name, f"unreadable ({exc})")) from exc


def _latest(hashes: np.ndarray, occurrence: np.ndarray) -> np.ndarray | None:
    """Indices of the last row of each key (in order), or None when no key repeats.

    Vectorised in two steps: a pandas hash of one 64-bit combination of each key finds the rows
    that may repeat (usually none); only those are compared on the whole key.
    """
    if len(occurrence) == 0:
        return None
    rows = _repeated(_combined(hashes, occurrence))
    if len(rows) == 0:
        return None
    frame = pd.DataFrame({"a": hashes[rows, 0], "b": hashes[rows, 1], "o": occurrence[rows]})
    drop = rows[frame.duplicated(keep="last").to_numpy()]
    if len(drop) == 0:
        return None
    keep = np.ones(len(occurrence), dtype=bool)
    keep[drop] = False
    return np.flatnonzero(keep)


class _NewerFormatError(CheckpointCorruptError):
    """A manifest of another format version: not damage, so repair must not rewrite it."""


def _read_manifest(directory: Storage) -> dict[str, Any] | None:
    """The parsed, validated manifest, or None if there is none."""
    file = directory.show(_MANIFEST)

    def damaged(problem: str) -> CheckpointCorruptError:
        message = f"{problem}. {_START_FRESH}"
        if _part_files(directory):  # the answers are in the parts: say how to keep them
            message += (
                f" Nothing was deleted: to keep the stored answers, {_repair_advice(directory)}, "
                "which rebuilds the manifest from the part files."
            )
        return CheckpointCorruptError(message)

    try:
        text = directory.read_bytes(_MANIFEST).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise damaged(f"Cannot read checkpoint manifest {file}: {exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise damaged(f"Checkpoint manifest {file} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise damaged(f"{file} is not a gen-ai-frames checkpoint manifest")
    if manifest.get("version") not in (_LEGACY_FORMAT_VERSION, _FORMAT_VERSION):
        raise _NewerFormatError(
            f"Checkpoint {directory} has format version {manifest.get('version')!r}; this version of "
            f"gen-ai-frames reads versions {_LEGACY_FORMAT_VERSION} and {_FORMAT_VERSION}. {_START_FRESH}"
        )
    if manifest.get("keys", LEGACY_KEY_SCHEME) not in KEY_SCHEMES:
        raise _NewerFormatError(
            f"Checkpoint {directory} keys its records with {manifest.get('keys')!r}, which this version "
            f"of gen-ai-frames does not know (it knows {list(KEY_SCHEMES)}): upgrade gen-ai-frames to "
            f"resume it. {_START_FRESH}"
        )
    parts = manifest.get("parts")
    valid = (
        isinstance(manifest.get("fingerprint"), dict)
        and isinstance(manifest.get("next_seq"), int)
        and isinstance(parts, list)
        and all(
            isinstance(p, dict)
            and isinstance(p.get("file"), str)
            and _PART_RE.match(p["file"])  # also keeps part names from pointing outside the directory
            and isinstance(p.get("level"), int)
            and isinstance(p.get("rows"), int)
            for p in parts
        )
    )
    if not valid:
        raise damaged(f"Checkpoint manifest {file} is malformed")
    return manifest


def _load_parts(directory: Storage, parts: Sequence[Mapping[str, Any]]) -> pa.Table:
    tables = [_read_part(directory, p["file"]) for p in parts]
    if not tables:
        return RECORD_SCHEMA.empty_table()
    return pa.concat_tables(tables)


def _read_snapshot(path: str | os.PathLike[str] | Storage) -> tuple[dict[str, Any], pa.Table]:
    """Manifest and latest-wins records, without a lock.

    A run may compact (and delete parts) between our reading the manifest and its parts: if a part
    turns out missing and the manifest has changed meanwhile, read again.
    """
    directory = storage_for(path)
    for _ in range(10):
        manifest = _read_manifest(directory)
        if manifest is None:
            if _part_files(directory):
                raise CheckpointCorruptError(_no_manifest_message(directory))
            what = "does not exist" if not directory.exists() else "has no manifest.json"
            raise CheckpointError(f"No checkpoint at {directory}: the path {what}.")
        try:
            return manifest, _dedup_latest(_load_parts(directory, manifest["parts"]))
        except CheckpointCorruptError:
            if _read_manifest(directory) == manifest:
                raise
    raise CheckpointError(f"Checkpoint {directory} kept changing while being read; try again.")


# --------------------------------------------------------------------------------------------------
# The store


class Checkpoint:
    """An open, locked checkpoint directory. Create with :meth:`open`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> with Checkpoint.open(path, {"model": "m"}) as ckpt:
    ...     ckpt.append(make_records(["a", "b"], responses=["A", "B"]))
    ...     len(ckpt.records())
    2
    """

    def __init__(
        self,
        *,
        _store: Storage,
        _fingerprint: dict[str, Any],
        _lock: _Lock,
        _manifest: dict[str, Any],
        _compact_every: int,
    ) -> None:
        # Private: use Checkpoint.open(), which takes the lock and loads or creates the manifest.
        self._store = _store
        self._path = _store.location
        self._fingerprint = _fingerprint
        self._lock: _Lock | None = _lock
        self._manifest = _manifest
        self._compact_every = _compact_every
        # The accessor may call append() from worker threads; parts and the manifest are not thread-safe.
        self._mutex = threading.RLock()
        # Part files a stored_keys() snapshot points into: compaction leaves them on disk (unlisted)
        # until close(), so load_results() can still read them; _retired are those compacted away.
        self._pinned: set[str] = set()
        self._retired: list[str] = []

    # ---------------------------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | Storage,
        fingerprint: Mapping[str, Any],
        *,
        resume: bool = True,
        compact_every: int = 16,
        repair: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Open (or create) the checkpoint at directory ``path`` and lock it for this run.

        ``path`` may be ``s3://bucket/prefix`` (object storage, see :mod:`gen_ai_frames.storage`);
        ``storage_options`` are then passed to s3fs (credentials, ``endpoint_url``...), which
        otherwise reads the ``AWS_*`` environment. They are never stored.

        ``fingerprint`` (JSON values: provider, model, endpoint, generation parameters) must equal the
        stored one when resuming. ``resume=False`` deletes stored results and starts empty.
        ``repair=True`` drops missing or unreadable parts from the manifest and rebuilds a lost or
        damaged manifest from the part files, with a warning (see :func:`repair_checkpoint`);
        without it such a checkpoint raises :class:`CheckpointCorruptError` and nothing is deleted.

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
        >>> ckpt = Checkpoint.open(path, {"model": "a"})
        >>> ckpt.close()
        >>> try:
        ...     Checkpoint.open(path, {"model": "b"})
        ... except CheckpointMismatchError as exc:
        ...     print(str(exc).splitlines()[1])
          model: "a" -> "b"
        """
        normalized = _normalize_fingerprint(fingerprint)
        if isinstance(compact_every, bool) or not isinstance(compact_every, int) or compact_every < 2:
            raise ConfigurationError(f"compact_every must be an integer >= 2, got {compact_every!r}")
        directory = storage_for(path, storage_options)
        lock = directory.lock()
        try:
            manifest = _prepare(directory, normalized, resume=resume, repair=repair)
        except BaseException:
            lock.release()
            raise
        return cls(
            _store=directory,
            _fingerprint=normalized,
            _lock=lock,
            _manifest=manifest,
            _compact_every=compact_every,
        )

    # ---------------------------------------------------------------------------------- reading

    @property
    def path(self) -> Path | str:
        """The checkpoint directory (a Path; for object storage its ``s3://`` URL)."""
        return self._path

    @property
    def storage(self) -> Storage:
        """Where the checkpoint's files live; other records of the run (a batch run's
        ``batches.json``) are written through it too."""
        return self._store

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The run's settings stored in the manifest (a copy)."""
        return copy.deepcopy(self._fingerprint)

    @property
    def closed(self) -> bool:
        return self._lock is None

    @property
    def key_scheme(self) -> str:
        """How the stored records' ``prompt_hash`` was computed: :data:`~gen_ai_frames.keys.KEY_SCHEME`
        for checkpoints created by this version, :data:`~gen_ai_frames.keys.LEGACY_KEY_SCHEME` for
        older ones (they keep it: key the caller's rows with ``keys_for(prompts, ckpt.key_scheme)``).

        >>> import tempfile, os
        >>> with Checkpoint.open(os.path.join(tempfile.mkdtemp(), "c"), {}) as ckpt:
        ...     ckpt.key_scheme
        'xx128'
        """
        return str(self._manifest.get("keys", LEGACY_KEY_SCHEME))

    def stored_keys(self) -> StoredKeys:
        """The key of every stored record, the latest per ``(prompt_hash, occurrence)``, read without
        the answers: only the ``prompt_hash``, ``occurrence``, ``position`` and ``error`` columns of
        each part (Parquet column projection). Match the caller's rows to it with
        :func:`gen_ai_frames.keys.match_keys`, then fetch the answers needed with :meth:`load_results`.

        Parts take precedence in the manifest's order, and later rows of a part over earlier ones.
        The snapshot stays valid while this Checkpoint is open, whatever is appended or compacted
        after it: the part files it points into are kept on disk (no longer listed in the manifest)
        until :meth:`close`, which deletes them; the next open deletes them if the run died first.

        >>> import tempfile, os
        >>> from gen_ai_frames.keys import keys_for, match_keys
        >>> with Checkpoint.open(os.path.join(tempfile.mkdtemp(), "c"), {}) as ckpt:
        ...     ckpt.append(make_records(["a", "b"], responses=["A", None], error=[None, "boom"]))
        ...     stored = ckpt.stored_keys()
        ...     stored.failed.tolist(), match_keys(keys_for(["b", "c"], ckpt.key_scheme), stored).tolist()
        ([False, True], [1, -1])
        """
        with self._mutex:
            self._check_open()
            files = tuple(p["file"] for p in self._manifest["parts"])
            self._pinned.update(files)  # before reading: a compaction from another thread keeps them
            sizes = [int(p["rows"]) for p in self._manifest["parts"]]
        # Filled part by part: the peak is the keys plus one part's, not twice the keys.
        total = sum(sizes)
        hashes = np.empty((total, 2), dtype=np.uint64)
        occurrence = np.empty(total, dtype=np.int32)
        position = np.empty(total, dtype=np.int64)
        failed = np.empty(total, dtype=bool)
        part = np.repeat(np.arange(len(files), dtype=np.int32), sizes)
        row = np.empty(total, dtype=np.int32)
        start = 0
        for name, size in zip(files, sizes):
            keys = _read_part_keys(self._store, name)
            if len(keys[1]) != size:
                problem = f"inconsistent (manifest says {size} rows, file has {len(keys[1])})"
                raise CheckpointCorruptError(_corrupt_part_message(self._store, name, problem))
            stop = start + size
            hashes[start:stop], occurrence[start:stop], position[start:stop], failed[start:stop] = keys
            row[start:stop] = np.arange(size, dtype=np.int32)
            start = stop
        keep = _latest(hashes, occurrence)
        if keep is not None:
            hashes, occurrence, position = hashes[keep], occurrence[keep], position[keep]
            failed, part, row = failed[keep], part[keep], row[keep]
        return StoredKeys(hashes, occurrence, position, failed, part, row, files)

    def load_results(self, stored: StoredKeys, index: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """Columns ``columns`` (names of :data:`RECORD_SCHEMA`, normally :data:`RESULT_COLUMNS`, with
        their stored types) of the records ``stored[index]``, one row per entry of ``index`` in its
        order; an entry of -1 (no match, as :func:`gen_ai_frames.keys.match_keys` gives) is a row of
        nulls. Each part holding some of them is read once, only those columns, and the rows taken
        with Arrow (no Python loop per row).

        ``stored`` must come from :meth:`stored_keys` of this open Checkpoint; appends and compactions
        since are fine (see :meth:`stored_keys`).

        >>> import tempfile, os
        >>> with Checkpoint.open(os.path.join(tempfile.mkdtemp(), "c"), {}) as ckpt:
        ...     ckpt.append(make_records(["a", "b"], responses=["A", "B"]))
        ...     stored = ckpt.stored_keys()
        ...     ckpt.load_results(stored, np.array([1, -1, 0]), ["response"]).column(0).to_pylist()
        ['B', None, 'A']
        """
        names = list(columns)
        unknown = [name for name in names if name not in RECORD_SCHEMA.names]
        if unknown:
            raise ValueError(f"load_results(): unknown columns {unknown}; choose from {RECORD_SCHEMA.names}")
        schema = pa.schema([RECORD_SCHEMA.field(name) for name in names])
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < -1 or index.max() >= len(stored)):
            raise ValueError(
                f"load_results(): index must hold positions into the {len(stored)} stored keys (or -1)"
            )
        with self._mutex:
            self._check_open()
            foreign = sorted(set(stored.files) - self._pinned)
        if len(stored) and int(stored.part.max()) >= len(stored.files):
            foreign.append("parts it does not name")
        if foreign:
            raise ValueError(
                "load_results() needs keys from this open Checkpoint's stored_keys() (these point into "
                f"{foreign[:3]}, which it did not read); call stored_keys() again"
            )
        wanted = np.flatnonzero(index >= 0)
        part = stored.part[index[wanted]]
        row = stored.row[index[wanted]]
        order = np.argsort(part, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(part[order])) + 1) if len(order) else []
        pieces = [
            _read_part_columns(self._store, stored.files[int(part[group[0]])], schema).take(row[group])
            for group in groups
        ]
        # Rows of ``pieces`` are in ``order``; one row of nulls at the end stands for every -1.
        pieces.append(pa.Table.from_arrays([pa.nulls(1, f.type) for f in schema], schema=schema))
        taken = pa.concat_tables(pieces)
        where = np.full(len(index), taken.num_rows - 1, dtype=np.int64)
        where[wanted[order]] = np.arange(len(order), dtype=np.int64)
        return taken.take(pa.array(where))

    def records(self) -> pd.DataFrame:
        """All stored records, the latest per ``(prompt_hash, occurrence)``, with RECORD_SCHEMA columns.

        String columns have the pandas ``string`` dtype and integer columns nullable ``Int64``/``Int32``.
        """
        with self._mutex:
            self._check_open()
            table = _load_parts(self._store, self._manifest["parts"])
        return _table_to_frame(_dedup_latest(table))

    # ---------------------------------------------------------------------------------- writing

    def append(self, records: pd.DataFrame | pa.Table) -> None:
        """Store ``records`` durably as one new part (see the module docstring for the protocol).

        Raises CheckpointError if the disk refuses the write; earlier parts stay intact and readable.

        >>> import tempfile, os
        >>> with Checkpoint.open(os.path.join(tempfile.mkdtemp(), "c"), {}) as ckpt:
        ...     ckpt.append(make_records(["a"], responses=["first"]))
        ...     ckpt.append(make_records(["a"], responses=["second"]))
        ...     ckpt.records()["response"].tolist()
        ['second']
        """
        table = _to_table(records)
        if table.num_rows == 0:
            return
        with self._mutex:
            self._check_open()
            self._add_part(table, level=0, replaces=())
            self._maybe_compact()

    def _add_part(self, table: pa.Table, *, level: int, replaces: Sequence[str]) -> None:
        """Write ``table`` as a part and commit a manifest listing it (see :meth:`_write_part`)."""
        stamped = table.replace_schema_metadata(self._part_metadata())
        self._write_part(lambda f: pq.write_table(stamped, f), table.num_rows, level=level, replaces=replaces)

    def _part_metadata(self) -> dict[bytes, str]:
        # Each part carries the run's fingerprint too, so a lost manifest can be rebuilt.
        return {_PART_FINGERPRINT: json.dumps(self._fingerprint), _PART_KEYS: self.key_scheme}

    def _write_part(
        self, write: Callable[[BinaryIO], None], rows: int, *, level: int, replaces: Sequence[str]
    ) -> None:
        """Write a part of ``rows`` rows with ``write(file)`` and commit a manifest listing it.

        ``replaces``: adjacent parts the new one supersedes (compaction); it takes their place in
        the precedence order, else it goes last (newest).
        """
        manifest = self._manifest
        seq = manifest["next_seq"]
        name = _part_name(seq)
        file = self._store.show(name)
        entry = {"file": name, "level": level, "rows": rows}
        parts = list(manifest["parts"])
        if replaces:
            index = [p["file"] for p in parts].index(replaces[0])
            parts[index : index + len(replaces)] = [entry]
        else:
            parts.append(entry)
        new_manifest = {**manifest, "next_seq": seq + 1, "parts": parts}
        try:
            self._store.write(name, write, exclusive=True)
        except OSError as exc:
            raise CheckpointError(
                f"Could not write checkpoint part {file}: {exc}. Results stored before are intact; "
                "free disk space or fix permissions, then run again to resume."
            ) from exc
        try:
            self._commit(new_manifest)
        except OSError as exc:
            if self._manifest is not new_manifest:
                self._store.remove(name)  # unlisted, so ignored anyway; don't leave it around
            raise CheckpointError(
                f"Could not write checkpoint manifest {self._store.show(_MANIFEST)}: {exc}. Results stored "
                "before are intact; free disk space or fix permissions, then run again to resume."
            ) from exc

    def _commit(self, manifest: dict[str, Any]) -> None:
        def adopt() -> None:
            # The rename is done: the new manifest is what a reader (or the next open) sees, so adopt
            # it even if the directory fsync that follows fails.
            self._manifest = manifest

        _write_manifest(self._store, manifest, on_replaced=adopt)

    def _maybe_compact(self) -> None:
        """Merge runs of ``compact_every`` adjacent same-level parts into one part of the next level.

        Only adjacent parts are merged, so the merged part can take their place in the precedence
        order. A failure only warns: the appended records are already safe, and the next append
        tries again.
        """
        while True:
            run = self._find_run()
            if run is None:
                return
            level, names = run
            try:
                self._merge(names, level=level + 1)
            except CheckpointError as exc:
                warnings.warn(
                    f"Checkpoint compaction failed, will retry on the next append: {exc}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return
            for name in names:
                if name in self._pinned:
                    self._retired.append(name)  # a stored_keys() snapshot still reads it: at close()
                else:
                    self._store.remove(name)

    def _merge(self, names: Sequence[str], *, level: int) -> None:
        """Replace the adjacent parts ``names`` by one part of ``level`` holding their latest records.

        Streamed: the key columns of all the parts decide which rows survive, then the parts are
        read and written one at a time, so a merge holds one input part, not all of them.
        """
        keys = [_read_part_columns(self._store, name, _KEY_SCHEMA) for name in names]
        sizes = [table.num_rows for table in keys]
        rows = _latest_rows(pa.concat_tables(keys))
        del keys
        if rows is None:
            survivors: list[np.ndarray | None] = [None] * len(names)
        else:
            # Split the surviving (sorted) row numbers back into each part's own row numbers.
            starts = np.cumsum([0, *sizes])
            bounds = np.searchsorted(rows, starts)
            survivors = [rows[bounds[i] : bounds[i + 1]] - starts[i] for i in range(len(names))]
        total = sum(sizes) if rows is None else len(rows)
        schema = RECORD_SCHEMA.with_metadata(self._part_metadata())

        def write(f: BinaryIO) -> None:
            with pq.ParquetWriter(f, schema) as writer:
                for name, keep in zip(names, survivors):
                    table = _read_part(self._store, name)
                    if keep is not None:
                        table = table.take(keep)
                    if table.num_rows:
                        writer.write_table(table)

        self._write_part(write, total, level=level, replaces=names)

    def _find_run(self) -> tuple[int, list[str]] | None:
        parts = self._manifest["parts"]
        start = 0
        for i in range(1, len(parts) + 1):
            if i == len(parts) or parts[i]["level"] != parts[start]["level"]:
                if i - start >= self._compact_every:
                    chosen = parts[start : start + self._compact_every]
                    if sum(p["rows"] for p in chosen) <= COMPACT_MAX_ROWS:
                        return parts[start]["level"], [p["file"] for p in chosen]
                start = i
        return None

    # ---------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Release the lock. Idempotent."""
        with self._mutex:
            if self._lock is not None:
                retired, self._retired = self._retired, []
                for name in retired:  # unlisted already: if this fails, the next open deletes them
                    try:
                        self._store.remove(name)
                    except OSError:
                        pass
                self._pinned.clear()
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A notebook user may drop the object without closing it; don't keep the lock until exit.
        lock = getattr(self, "_lock", None)
        if lock is not None:
            self._lock = None
            lock.abandon()

    def _check_open(self) -> None:
        if self._lock is None:
            raise CheckpointError(f"Checkpoint {self._path} is closed; open it again to use it.")
        self._lock.check()  # a lease another run took over: stop before writing anything

    def __repr__(self) -> str:
        parts = self._manifest["parts"]
        state = ", closed" if self.closed else ""
        return (
            f"Checkpoint(path={str(self._path)!r}, parts={len(parts)}, "
            f"records={sum(p['rows'] for p in parts)}{state})"
        )


def _lock_directory(directory: Path) -> int:
    """Create ``directory`` if needed and return a descriptor holding its exclusive flock."""
    fix = "fix its permissions or choose another checkpoint path"
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"Checkpoint path {directory} is a file; pass a directory path (it is created if missing)."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"Cannot create checkpoint directory {directory}: {exc}; {fix}.") from exc
    # access() rather than waiting for the first append to fail, hours into a run.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"Checkpoint directory {directory} is not writable; {fix}.")
    lock_file = directory / _LOCK
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CheckpointError(f"Cannot create lock file {lock_file}: {exc}; {fix}.") from exc
    try:
        # flock, not a pid file: the kernel releases it when the holder dies, even on SIGKILL.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise CheckpointLockedError(
            f"Checkpoint {directory} is being used by another run{holder}. Wait for that run to "
            "finish or stop it (in a notebook, close() the other Checkpoint or restart its kernel), "
            "or use another checkpoint path. A run that died releases the lock automatically."
        ) from None
    except OSError as exc:
        os.close(fd)
        raise CheckpointError(
            f"Cannot lock {lock_file}: {exc}; choose a checkpoint path on a local disk."
        ) from exc
    try:
        # Informational only, for the message above; the flock is what excludes.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


def _read_holder(fd: int) -> str:
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return ""
    return " (this process)" if pid == os.getpid() else f" (process {pid})"


def _prepare(
    directory: Storage, fingerprint: dict[str, Any], *, resume: bool, repair: bool
) -> dict[str, Any]:
    """Under the lock: clean up after crashes, check the manifest, and return it (new if needed)."""
    for name in directory.names():
        if _TMP_RE.match(name):
            directory.remove(name)  # half-written by a run that died
    manifest = None
    if resume:
        try:
            manifest = _read_manifest(directory)
        except _NewerFormatError:
            raise
        except CheckpointCorruptError:
            if not repair or not _part_files(directory):
                raise
            # repair=True: the parts are the data, the manifest only lists them: rebuild it.
        if manifest is None and _part_files(directory):
            if not repair:
                raise CheckpointCorruptError(_no_manifest_message(directory))
            manifest = _rebuild_manifest(directory, fingerprint)
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        diff = _fingerprint_diff(manifest["fingerprint"], fingerprint)
        raise CheckpointMismatchError(
            f"Checkpoint {directory} was written with other settings:\n"
            + "\n".join(diff)
            + f"\n{_START_FRESH}"
        )
    if manifest is not None:
        manifest = _check_parts(directory, manifest, repair=repair)
    listed = set() if manifest is None else {p["file"] for p in manifest["parts"]}
    highest = 0
    for name in directory.names():
        match = _PART_RE.match(name)
        if match and name not in listed:
            # resume=False, or written by a run that died before listing it in the manifest.
            directory.remove(name)
        elif match:
            highest = max(highest, int(match.group(1)))
    if manifest is None:  # new (or started over with resume=False): the current key scheme
        manifest = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "keys": KEY_SCHEME,
            "fingerprint": fingerprint,
            "next_seq": 1,
            "parts": [],
        }
    else:
        manifest["next_seq"] = max(manifest["next_seq"], highest + 1)
    try:
        _write_manifest(directory, manifest)
    except OSError as exc:
        raise CheckpointError(
            f"Cannot write checkpoint manifest in {directory}: {exc}; fix its permissions, free "
            "disk space or choose another checkpoint path."
        ) from exc
    return manifest


def _part_files(directory: Storage) -> list[str]:
    """Names of the part files in ``directory``, oldest (lowest number) first."""
    names = [name for name in directory.names() if _PART_RE.match(name)]
    return sorted(names, key=_part_number)


def _part_number(name: str) -> int:
    """The sequence number of a part file's name (already matched by ``_PART_RE``)."""
    match = _PART_RE.match(name)
    assert match is not None
    return int(match.group(1))


def _repair_advice(directory: Storage) -> str:
    return (
        f"run `gen-ai-frames repair {directory}` (or call "
        "gen_ai_frames.checkpoint.repair_checkpoint(path), or pass repair=True)"
    )


def _no_manifest_message(directory: Storage) -> str:
    return (
        f"Checkpoint {directory} has part files but no readable manifest.json (it was deleted or "
        "damaged). Nothing was deleted. To keep the stored answers, "
        + _repair_advice(directory)
        + ", which rebuilds the manifest from the parts; or pass resume=False to delete them."
    )


def _part_key_scheme(directory: Storage, name: str) -> str:
    """The key scheme stamped in a part's metadata (parts of older versions: the legacy one)."""
    with directory.open_read(name) as f:
        metadata = pq.read_schema(f).metadata or {}
    raw = metadata.get(_PART_KEYS)
    return LEGACY_KEY_SCHEME if raw is None else raw.decode("utf-8")


def _part_fingerprint(directory: Storage, name: str) -> dict[str, Any] | None:
    """The fingerprint stamped in a part's metadata (None for parts of older versions)."""
    with directory.open_read(name) as f:
        metadata = pq.read_schema(f).metadata or {}
    raw = metadata.get(_PART_FINGERPRINT)
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None


def _rebuild_manifest(directory: Storage, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """A manifest listing every readable part file in ``directory``, oldest first.

    Parts written with other settings than ``fingerprint`` (told by the fingerprint each part
    carries) are refused, not mixed in. With ``fingerprint=None`` the parts' own is used.
    """
    parts, stamps, dropped, schemes = [], set(), [], set()
    for name in _part_files(directory):
        try:
            table = _read_part(directory, name)
            stamp = _part_fingerprint(directory, name)
            scheme = _part_key_scheme(directory, name)
        except (CheckpointCorruptError, OSError, pa.ArrowException, ValueError):
            dropped.append(name)
            continue
        if stamp is not None:
            stamps.add(json.dumps(stamp, sort_keys=True))
        schemes.add(scheme)
        # Level 0 for all: compaction merges them again as the run goes on.
        parts.append({"file": name, "level": 0, "rows": table.num_rows})
    if len(stamps) > 1:
        raise CheckpointCorruptError(
            f"Checkpoint {directory}: its part files were written with different settings, so its "
            f"manifest cannot be rebuilt. {_START_FRESH}"
        )
    if len(schemes) > 1 or not schemes <= set(KEY_SCHEMES):
        raise CheckpointCorruptError(
            f"Checkpoint {directory}: its part files key their records with {sorted(schemes)}, so its "
            f"manifest cannot be rebuilt (one checkpoint holds one key scheme). {_START_FRESH}"
        )
    scheme = schemes.pop() if schemes else KEY_SCHEME
    stored = json.loads(stamps.pop()) if stamps else None
    if fingerprint is None:
        if stored is None:
            raise CheckpointCorruptError(
                f"Checkpoint {directory}: its parts do not record the settings they were written "
                "with; pass the run's fingerprint to repair_checkpoint(path, fingerprint=...), or "
                f"{_START_FRESH[0].lower()}{_START_FRESH[1:]}"
            )
        fingerprint = stored
    elif stored is not None and stored != fingerprint:
        diff = _fingerprint_diff(stored, fingerprint)
        raise CheckpointMismatchError(
            f"Checkpoint {directory} was written with other settings:\n"
            + "\n".join(diff)
            + f"\n{_START_FRESH}"
        )
    warnings.warn(
        f"Checkpoint {directory}: rebuilt manifest.json from {len(parts)} part file(s)"
        + (f"; dropped unreadable parts {dropped}, their rows will be generated again" if dropped else ""),
        UserWarning,
        stacklevel=4,
    )
    for name in dropped:
        directory.remove(name)
    highest = max((_part_number(p["file"]) for p in parts), default=0)
    # The parts' own scheme: a legacy checkpoint stays a version-1 one, so it resumes as before.
    keyed = (
        {"version": _FORMAT_VERSION, "keys": scheme}
        if scheme != LEGACY_KEY_SCHEME
        else {"version": _LEGACY_FORMAT_VERSION}
    )
    return {
        "format": _FORMAT,
        **keyed,
        "fingerprint": fingerprint,
        "next_seq": highest + 1,
        "parts": parts,
    }


def _write_manifest(
    directory: Storage, manifest: dict[str, Any], on_replaced: Callable[[], None] | None = None
) -> None:
    data = json.dumps(manifest, indent=1).encode("utf-8")
    directory.write(_MANIFEST, lambda f: f.write(data), on_replaced=on_replaced, exclusive=True)


def _check_parts(directory: Storage, manifest: dict[str, Any], *, repair: bool) -> dict[str, Any]:
    if not repair:
        for part in manifest["parts"]:
            _check_part(directory, part["file"], part["rows"])
        return manifest
    kept, dropped = [], []
    for part in manifest["parts"]:
        try:
            # Repair reads whole parts: a corrupt page in the middle passes the footer check.
            table = _read_part(directory, part["file"])
            if table.num_rows != part["rows"]:
                raise CheckpointCorruptError("row count differs from the manifest")
        except CheckpointCorruptError:
            dropped.append(part["file"])
        else:
            kept.append(part)
    if dropped:
        warnings.warn(
            f"Checkpoint {directory}: dropped missing or unreadable parts {dropped}; "
            "their rows will be generated again.",
            UserWarning,
            stacklevel=4,
        )
    return {**manifest, "parts": kept}


# --------------------------------------------------------------------------------------------------
# Read-only access


def run_fingerprint(client: Any, params: Any) -> dict[str, Any]:
    """What a run's checkpoint must match to resume: the client's settings (provider, endpoint,
    model: ``client.fingerprint()``) and the generation parameters (``params.fingerprint()``).

    Assembled here only, for the runner, the CLI and Dask alike.

    >>> class C:
    ...     def fingerprint(self): return {"provider": "openai", "model": "m"}
    >>> class P:
    ...     def fingerprint(self): return {"max_tokens": 16}
    >>> run_fingerprint(C(), P())
    {'provider': 'openai', 'model': 'm', 'max_tokens': 16}
    """
    return {**client.fingerprint(), **params.fingerprint()}


def _sharded(directory: Storage) -> Any:
    """The sharded-checkpoint module when ``directory`` is a run of shards (CLI batches, Dask
    partitions), else None. Imported late: it is built on this module."""
    if directory.has(_MANIFEST) or fnmatch.filter(directory.names(), "part-*.parquet"):
        return None
    from . import shards

    return shards if shards.kind_of(directory) not in (None, "single") else None


def result_frame(table: pa.Table) -> pd.DataFrame:
    """Stored records as a result frame: sorted by position (then write order), indexed by it."""
    frame = _table_to_frame(table)
    frame = frame.sort_values("position", kind="stable")
    index = pd.Index(frame["position"].to_numpy(dtype=np.int64), name="position")
    result = frame[["prompt", *RESULT_COLUMNS]].set_axis(index, axis=0)
    return result.astype({c: "Int64" for c in RESULT_COLUMNS if PANDAS_DTYPES[c] == "Int64"})


def read_checkpoint(
    path: str | os.PathLike[str] | Storage, *, storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """The results stored in the checkpoint at ``path``, read without taking the lock.

    Every stored record, the latest per prompt key, sorted and indexed by ``position`` (the row's
    position in the input of the run that wrote it); columns ``prompt`` and :data:`RESULT_COLUMNS`,
    strings as pandas ``string`` dtype and integers as nullable ``Int64``. Safe to call while a
    run is writing (you see the state of the last completed append). ``len()`` of the result is
    ``checkpoint_status(path)["total"]``: nothing stored is hidden. So if a later run was given a
    filtered or reordered frame, a position may appear twice (an answer of the earlier input and
    one of the later); rows a run found moved are stored again at their new position.

    A sharded checkpoint (``gen-ai-frames generate --checkpoint``, Dask's ``checkpoint=``) gives
    every shard's records, indexed by ``(batch, position)`` or ``(partition, position)``.
    ``path`` may be ``s3://bucket/prefix``, with ``storage_options`` as for :meth:`Checkpoint.open`.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> with Checkpoint.open(path, {}) as ckpt:
    ...     ckpt.append(make_records(["a", "b"], responses=["A", None], error=[None, "boom"]))
    >>> frame = read_checkpoint(path)
    >>> frame.index.tolist(), frame["response"].tolist(), frame["error"].tolist()
    ([0, 1], ['A', <NA>], [<NA>, 'boom'])
    """
    directory = storage_for(path, storage_options)
    sharded = _sharded(directory)
    if sharded is not None:
        return sharded.read_sharded(directory)
    _, table = _read_snapshot(directory)
    return result_frame(table)


def checkpoint_status(
    path: str | os.PathLike[str] | Storage, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Counts of the checkpoint at ``path`` (single or sharded), read without taking the lock.

    ``path`` may be ``s3://bucket/prefix``, with ``storage_options`` as for :meth:`Checkpoint.open`.

    ``total`` records are stored; ``done`` of them hold an answer and ``failed`` an error. For a
    sharded checkpoint ``done``/``failed`` count the rows of the current input (see
    :mod:`gen_ai_frames.shards`), and ``remaining`` the input's rows without a result yet.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> with Checkpoint.open(path, {"model": "m"}) as ckpt:
    ...     ckpt.append(make_records(["a", "b"], responses=["A", None],
    ...                              error=[None, "slow"], error_type=[None, "APITimeoutError"]))
    >>> status = checkpoint_status(path)
    >>> status["kind"], status["total"], status["done"], status["failed"], status["errors_by_type"]
    ('single', 2, 1, 1, {'APITimeoutError': 1})
    """
    directory = storage_for(path, storage_options)
    sharded = _sharded(directory)
    if sharded is not None:
        return sharded.checkpoint_status_of(directory)
    manifest, table = _read_snapshot(directory)
    errors = table.filter(table.column("error").is_valid()).column("error_type").to_pylist()
    by_type = Counter("unknown" if t is None else t for t in errors)
    return {
        "path": str(directory),
        "kind": "single",
        "total": table.num_rows,
        "done": table.num_rows - table.column("response").null_count,
        "failed": len(errors),
        "errors_by_type": dict(by_type.most_common()),
        "parts": len(manifest["parts"]),
        "fingerprint": manifest["fingerprint"],
    }


def repair_checkpoint(
    path: str | os.PathLike[str] | Storage,
    fingerprint: Mapping[str, Any] | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Make the checkpoint at ``path`` readable again, keeping every answer that can be read.

    Drops missing or unreadable parts from the manifest (their rows are generated again on
    resume), and rebuilds a missing or damaged ``manifest.json`` from the part files, with the
    settings each part records (or ``fingerprint``, for parts written by older versions). Works
    on sharded checkpoints too, shard by shard. Takes the lock: not while a run uses it.
    ``gen-ai-frames repair PATH`` does the same.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> with Checkpoint.open(path, {"model": "m"}) as ckpt:
    ...     ckpt.append(make_records(["a"], responses=["A"]))
    >>> os.remove(os.path.join(path, "manifest.json"))
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     report = repair_checkpoint(path)
    >>> report["rebuilt"], report["records"], read_checkpoint(path)["response"].tolist()
    (True, 1, ['A'])
    """
    directory = storage_for(path, storage_options)
    sharded = _sharded(directory)
    if sharded is not None:
        return sharded.repair_sharded(directory)
    if not directory.exists() or directory.is_file():
        raise CheckpointError(f"No checkpoint at {directory}: the path does not exist.")
    try:
        manifest = _read_manifest(directory)
    except _NewerFormatError:
        raise
    except CheckpointCorruptError:
        manifest = None
    if manifest is None and not _part_files(directory):
        raise CheckpointError(f"No checkpoint at {directory}: it holds no manifest.json and no part files.")
    rebuilt = manifest is None
    if manifest is not None:
        chosen = manifest["fingerprint"]
    elif fingerprint is not None:
        chosen = _normalize_fingerprint(fingerprint)
    else:
        chosen = _stored_fingerprint(directory)
    before = [p["file"] for p in manifest["parts"]] if manifest is not None else _part_files(directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpoint.open(directory, chosen, repair=True) as ckpt:
            kept = [p["file"] for p in ckpt._manifest["parts"]]
            records = len(ckpt.records())
    for warning in caught:  # say what was done, once, from here
        warnings.warn(str(warning.message), UserWarning, stacklevel=2)
    return {
        "path": str(directory),
        "kind": "single",
        "rebuilt": rebuilt,
        "dropped": [name for name in before if name not in kept],
        "parts": len(kept),
        "records": records,
    }


def _stored_fingerprint(directory: Storage) -> dict[str, Any]:
    """The one fingerprint the part files record (raises when none or several)."""
    stamps = set()
    for name in _part_files(directory):
        try:
            stamp = _part_fingerprint(directory, name)
        except (OSError, pa.ArrowException, ValueError):
            continue  # unreadable: repair drops it
        if stamp is not None:
            stamps.add(json.dumps(stamp, sort_keys=True))
    if len(stamps) != 1:
        why = "do not record the settings they were written with" if not stamps else "disagree"
        raise CheckpointCorruptError(
            f"Cannot rebuild the manifest of {directory}: its part files {why}. Pass the run's "
            "settings to repair_checkpoint(path, fingerprint=...), or start fresh with "
            "resume=False (this deletes the results stored there)."
        )
    return json.loads(stamps.pop())
