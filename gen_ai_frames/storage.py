"""Checkpoints on S3-compatible object storage: ``checkpoint="s3://bucket/prefix"``.

Object stores have no locks and no rename, so the checkpoint protocol of
:mod:`gen_ai_frames.checkpoint` keeps its guarantees with what they do have:

* **Atomic files.** A PUT is atomic: a part or manifest object is there whole or not at all, so no
  tmp file and rename are needed, and a reader sees the old manifest or the new one.
* **One writer at a time: a lease.** ``.lease`` (next to ``manifest.json``) names the run using the
  checkpoint and when its claim ends. It is created with ``If-None-Match: *`` (only one run can
  create it) and renewed every ``LEASE_SECONDS / 3`` by a background thread with ``If-Match`` on
  its ETag. A second run finds a live lease and gets :class:`~gen_ai_frames.checkpoint.CheckpointLockedError`;
  the lease of a run that died (even SIGKILLed) expires and the next run takes it over, again with
  ``If-Match``, so two runs racing for an expired lease cannot both win.
* **Fencing: conditional writes.** Under the lease every file of the checkpoint is written
  conditionally: new part files with ``If-None-Match: *``, the manifest with ``If-Match`` on the
  ETag it had when the lease was taken (then on the one this run wrote). A run that lost its lease
  (paused longer than the lease, then woke up) cannot overwrite what the run that took over wrote:
  its write fails and it stops with ``CheckpointLockedError``.

The lease assumes that machines' clocks agree to within a few seconds and that a writer never
stalls longer than ``LEASE_SECONDS`` (60 s) without its renewal thread running.

Files are read and written with s3fs (fsspec). Credentials and endpoint come from
``storage_options`` (s3fs's keywords: ``key``, ``secret``, ``token``, ``endpoint_url``,
``client_kwargs``...) or, when not given there, from the usual ``AWS_*`` environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``
for S3-compatible stores such as MinIO, ``AWS_PROFILE``...). They are never written anywhere:
not in the manifest, the parts, the lease, a repr or an error message.

>>> object_storage("gs://bucket/run", None)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
gen_ai_frames.errors.ConfigurationError: checkpoint 'gs://bucket/run': only s3:// object storage ...
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

from .checkpoint import CheckpointError, CheckpointLockedError, Storage, _Lock
from .errors import ConfigurationError

__all__ = ["LEASE", "LEASE_SECONDS", "S3Storage", "object_storage"]

#: The lease object's name, in the checkpoint's directory.
LEASE = ".lease"
#: How long a lease lasts unless renewed; it is renewed every third of that.
LEASE_SECONDS = 60.0
_LEASE_FORMAT = "gen_ai_frames.lease"

# The lease clock, looked up at each use: tests move it forward to expire a lease without sleeping.
_now: Callable[[], float] = time.time

_SCHEMES = ("s3", "s3a")
_filesystems: dict[str, Any] = {}
_filesystems_lock = threading.Lock()


def object_storage(url: str, storage_options: Mapping[str, Any] | None) -> S3Storage:
    """The :class:`S3Storage` of ``url`` (``s3://bucket/prefix``), checked before any request."""
    parts = urllib.parse.urlsplit(url)
    # Only the scheme and bucket are shown until the URL is known not to carry credentials.
    shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
    if parts.scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"checkpoint {shown!r}: only s3:// object storage (AWS S3 or an S3-compatible store such "
            "as MinIO, with AWS_ENDPOINT_URL) and local directories are supported"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigurationError(
            f"checkpoint {shown!r}: give s3://bucket/prefix only; pass credentials in storage_options "
            "or the AWS_* environment variables, never in the URL"
        )
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise ConfigurationError(f"checkpoint {url!r} names no bucket: give s3://bucket/prefix")
    if storage_options is not None and (
        not isinstance(storage_options, Mapping) or not all(isinstance(k, str) for k in storage_options)
    ):
        raise ConfigurationError(
            "storage_options must be a dict of s3fs options, e.g. {'endpoint_url': 'http://...'}, "
            f"got {type(storage_options).__name__}"
        )
    fs = _filesystem(dict(storage_options or {}))
    return S3Storage(fs, bucket, prefix)


def _filesystem(options: dict[str, Any]) -> Any:
    """One s3fs filesystem per set of options and ``AWS_*`` environment (a client is costly).

    fsspec's own instance cache ignores the environment, so a changed ``AWS_ENDPOINT_URL`` would
    reuse the old endpoint: we key our cache on both instead.
    """
    try:
        import s3fs
    except ImportError:
        raise ConfigurationError("s3:// checkpoints need s3fs: pip install 'gen-ai-frames[s3]'") from None
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = json.dumps([options, env], sort_keys=True, default=repr)
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            # No listing cache: a checkpoint directory changes under us (other runs, other tasks).
            fs = s3fs.S3FileSystem(**{**options, "use_listings_cache": False, "skip_instance_cache": True})
            _filesystems[key] = fs
    return fs


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (an s3fs-translated error) says a conditional write's condition did not hold."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
        seen = seen.__cause__
    return False


@contextlib.contextmanager
def _client_errors(location: str) -> Iterator[None]:
    """botocore's own errors (no credentials, endpoint unreachable...) as a CheckpointError that says
    what to check. (s3fs already turns the store's answers, such as 404 or 403, into OSErrors.)"""
    try:
        yield
    except Exception as exc:
        from botocore.exceptions import BotoCoreError

        if not isinstance(exc, BotoCoreError):
            raise
        raise CheckpointError(
            f"Checkpoint {location}: cannot use object storage ({type(exc).__name__}: {exc}); check "
            "the credentials and endpoint (storage_options, or the AWS_* environment variables such "
            "as AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL)."
        ) from None


class S3Storage(Storage):
    """A checkpoint directory on S3 (see the module docstring for how it keeps the guarantees)."""

    location: str

    def __init__(self, fs: Any, bucket: str, prefix: str) -> None:
        self.fs, self.bucket, self.prefix = fs, bucket, prefix
        self.location = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        # ETags of this checkpoint's files while this object holds the lease: what conditional
        # writes compare against. None: no lease, plain writes (run.json, shard.json).
        self._etags: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"S3Storage({self.location!r})"  # never the options: they may hold credentials

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _path(self, name: str | None = None) -> str:
        return f"{self.bucket}/{self._key(name)}" if name else f"{self.bucket}/{self.prefix}".rstrip("/")

    def show(self, name: str) -> str:
        return f"{self.location}/{name}"

    def _listing(self) -> list[dict[str, Any]]:
        try:
            with _client_errors(self.location):
                return list(self.fs.ls(self._path(), detail=True))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self) -> bool:
        return bool(self._listing())

    def is_file(self) -> bool:
        with _client_errors(self.location):
            return bool(self.prefix) and bool(self.fs.isfile(self._path()))

    def names(self) -> list[str]:
        return [e["name"].rsplit("/", 1)[-1] for e in self._listing() if e.get("type") == "file"]

    def subdirs(self) -> list[str]:
        listing = self._listing()
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in listing if e.get("type") == "directory"]

    def has(self, name: str) -> bool:
        with _client_errors(self.location):
            return bool(self.fs.isfile(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        return self._get(name)[0]  # one GET (s3fs's cat_file sends a HEAD first)

    def open_read(self, name: str) -> BinaryIO:
        # Parts are small (a chunk of rows): one GET of the whole object beats ranged reads.
        return io.BytesIO(self.read_bytes(name))

    def write(
        self,
        name: str,
        data: bytes | Callable[[BinaryIO], object],
        *,
        on_replaced: Callable[[], None] | None = None,
        exclusive: bool = False,
    ) -> None:
        if not isinstance(data, bytes):
            buffer = io.BytesIO()
            data(buffer)
            data = buffer.getvalue()
        condition: dict[str, str] = {}
        if exclusive and self._etags is not None:
            known = self._etags.get(name)
            condition = {"IfMatch": known} if known is not None else {"IfNoneMatch": "*"}
        try:
            etag = self._put(name, data, condition)
        except OSError as exc:
            if condition and _precondition_failed(exc):
                raise CheckpointLockedError(
                    f"Checkpoint {self.location}: {name} was changed by another run, so this run "
                    "stopped writing (its lease was taken over: it paused longer than the lease). "
                    "What it stored before is intact. Make sure one run at a time uses this "
                    "checkpoint, then run again to resume."
                ) from None
            raise
        if self._etags is not None and exclusive:
            self._etags[name] = etag
        if on_replaced is not None:
            on_replaced()

    def _put(self, name: str, data: bytes, condition: Mapping[str, str]) -> str:
        key = self._key(name)
        with _client_errors(self.location):
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=key, Body=data, **condition)
        return str(response["ETag"])

    def _get(self, name: str) -> tuple[bytes, str]:
        """The object's bytes and ETag, in one GET."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(name))
            body = response["Body"]
            try:
                return bytes(await body.read()), str(response["ETag"])
            finally:
                body.close()

        with _client_errors(self.location):
            result: tuple[bytes, str] = sync(self.fs.loop, get)
        return result

    def remove(self, name: str) -> None:
        try:
            with _client_errors(self.location):
                self.fs.rm_file(self._path(name))
        except (OSError, CheckpointError):
            pass  # best effort: whatever is left is cleaned up on the next open
        if self._etags is not None:
            self._etags.pop(name, None)

    def mkdir(self) -> None:
        """Nothing to create: a prefix exists as soon as an object is stored under it."""

    def child(self, name: str) -> S3Storage:
        return S3Storage(self.fs, self.bucket, self._key(name))

    def lock(self, seconds: float | None = None) -> _Lock:
        lease = _Lease(self, LEASE_SECONDS if seconds is None else seconds)
        lease.acquire()
        try:
            # What the checkpoint holds when the lease is taken: conditional writes compare with it.
            listing = self._listing()
        except OSError as exc:
            lease.release()
            raise CheckpointError(f"Cannot list checkpoint {self.location}: {exc}") from None
        self._etags = {
            e["name"].rsplit("/", 1)[-1]: str(e.get("ETag") or e.get("etag"))
            for e in listing
            if e.get("type") == "file" and (e.get("ETag") or e.get("etag"))
        }
        self._etags.pop(LEASE, None)
        lease.on_release = self._drop_etags
        return lease

    def _drop_etags(self) -> None:
        self._etags = None


class _Lease(_Lock):
    """The lease object of one run (see the module docstring)."""

    def __init__(self, storage: S3Storage, seconds: float) -> None:
        self.storage, self.seconds = storage, float(seconds)
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.expires = 0.0
        self.lost: str | None = None
        self.on_release: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self, now: float) -> bytes:
        record = {
            "format": _LEASE_FORMAT,
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed": now,
            "expires": now + self.seconds,
        }
        return json.dumps(record).encode("utf-8")

    def _refused(self, holder: Mapping[str, Any], now: float) -> CheckpointLockedError:
        who = f"process {holder.get('pid')} on {holder.get('host')}"
        left = max(0.0, float(holder.get("expires", now)) - now)
        return CheckpointLockedError(
            f"Checkpoint {self.storage.location} is being used by another run ({who}; its lease "
            f"ends in {left:.0f} s unless that run renews it). Wait for that run to finish or stop "
            "it, or use another checkpoint path. If that run died, its lease expires by itself "
            f"(at most {self.seconds:.0f} s after it stopped) and the next run takes over."
        )

    def acquire(self) -> None:
        location = self.storage.location
        for _ in range(5):
            now = _now()
            try:
                self.etag = self.storage._put(LEASE, self._body(now), {"IfNoneMatch": "*"})
                self.expires = now + self.seconds
                break
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise _storage_error(location, exc) from None
            try:
                raw, etag = self.storage._get(LEASE)
            except FileNotFoundError:
                continue  # released meanwhile: try to create it again
            except OSError as exc:
                raise _storage_error(location, exc) from None
            try:
                holder = json.loads(raw)
                expires = float(holder["expires"])
            except (ValueError, TypeError, KeyError):
                holder, expires = {}, 0.0  # not a lease we can read: treat it as expired
            if holder.get("owner") == self.owner:  # our own create, retried after a lost response
                self.etag, self.expires = etag, expires
                break
            if expires > now:
                raise self._refused(holder, now)
            try:  # expired: take it over; If-Match, so of two runs racing for it only one wins
                self.etag = self.storage._put(LEASE, self._body(now), {"IfMatch": etag})
                self.expires = now + self.seconds
                break
            except OSError as exc:
                if not _precondition_failed(exc):
                    raise _storage_error(location, exc) from None
                # another run took it over first: look again (it now holds a live lease)
        else:
            raise CheckpointLockedError(
                f"Checkpoint {location}: could not take its lease (other runs keep taking it); "
                "make sure one run at a time uses this checkpoint."
            )
        self._thread = threading.Thread(target=self._renew_loop, name="gen_ai_frames-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Extend the lease (If-Match on its ETag); records why if another run took it over."""
        with self._mutex:
            if self.etag is None or self.lost is not None:
                return
            now = _now()
            try:
                self.etag = self.storage._put(LEASE, self._body(now), {"IfMatch": self.etag})
                self.expires = now + self.seconds
            except (OSError, CheckpointError) as exc:
                if isinstance(exc, OSError) and _precondition_failed(exc):
                    self.lost = "another run took its lease over"
                elif _now() > self.expires:
                    self.lost = f"its lease expired before it could be renewed ({type(exc).__name__})"

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception:  # noqa: BLE001  (never kill the thread: the next round tries again)
                pass
            if self.lost is not None:
                return

    def check(self) -> None:
        if self.lost is None and _now() > self.expires - self.seconds / 3:
            self.renew()  # the renewal thread is late (or the clock jumped): renew before writing
        if self.lost is None and _now() > self.expires:
            self.lost = "its lease expired"
        if self.lost is not None:
            raise CheckpointLockedError(
                f"Checkpoint {self.storage.location}: this run stopped writing because {self.lost} "
                "(another run may be using the checkpoint now). What it stored before is intact; "
                "make sure one run at a time uses this checkpoint, then run again to resume."
            )

    def _stop_renewing(self, wait: bool) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def release(self) -> None:
        self._stop_renewing(wait=True)
        with self._mutex:
            etag, self.etag = self.etag, None
        if self.on_release is not None:
            self.on_release()
        if etag is None or self.lost is not None:
            return
        try:
            # If-Match: never delete a lease another run took over meanwhile.
            with _client_errors(self.storage.location):
                self.storage.fs.call_s3(
                    "delete_object", Bucket=self.storage.bucket, Key=self.storage._key(LEASE), IfMatch=etag
                )
        except (OSError, CheckpointError):
            pass  # it expires by itself

    def abandon(self) -> None:
        # From __del__: no network call (the interpreter may be exiting); the lease expires.
        self._stop_renewing(wait=False)
        self.etag = None


def _storage_error(location: str, exc: BaseException) -> CheckpointError:
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(
            f"Checkpoint {location}: the bucket does not exist ({exc}); create it, or fix the URL or "
            "the endpoint (storage_options endpoint_url, or AWS_ENDPOINT_URL)."
        )
    if isinstance(exc, PermissionError):
        return CheckpointError(
            f"Checkpoint {location}: access denied ({exc}); check the credentials (storage_options "
            "key/secret, or the AWS_* environment variables) and the bucket's permissions."
        )
    return CheckpointError(f"Checkpoint {location}: object storage failed ({type(exc).__name__}: {exc}).")
