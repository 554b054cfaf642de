"""A response cache shared across runs: an answer paid for once is never paid for again.

Answers live in one SQLite file (the standard library's ``sqlite3``), keyed by a hash of
everything that shapes an answer: provider, endpoint (without credentials or secret query
parameters), model, every generation parameter (timeout aside: it cannot change an answer),
system prompt, schema and the prompt's messages. Only successful answers are stored, with their
details (text, finish reason, token counts, log-probability); never an API key or a header.

Why SQLite from the standard library rather than ``diskcache`` (also SQLite underneath): diskcache
pickles values (loading a pickle from a shared cache file can run code), its least-recently-used
policy writes on every read, it has no batched read, and it would be a new dependency. Here a run
reads its rows in a few ``SELECT ... IN (...)`` queries, writes its answers in batches (one
transaction per batch, from a worker thread, never on the event loop) and records use of the hits
in one batch at the end.

Several processes can share one file: it is in WAL mode (readers never block the writer) with a
busy timeout, and every write takes the write lock up front (``BEGIN IMMEDIATE``). WAL needs a
local filesystem: do not put the cache on NFS or SMB.

A damaged or unreadable cache never fails a run: it is reported once with a :class:`CacheWarning`
and bypassed (every row is sent, nothing is stored).

>>> import tempfile, os
>>> cache = ResponseCache(os.path.join(tempfile.mkdtemp(), "responses.sqlite3"))
>>> keys = KeyMaker({"provider": "openai", "model": "m"}, GenerationParams())
>>> cache.put_many([(keys.key("Hi"), CachedAnswer("Hello!", "stop", 3, 2))])
>>> cache.get_many([keys.key("Hi"), keys.key("Bye")])[keys.key("Hi")].text
'Hello!'
>>> cache.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from .engine import Result
from .params import GenerationParams

__all__ = [
    "CACHE_ENV",
    "DEFAULT_MAX_SIZE",
    "CacheWarning",
    "CachedAnswer",
    "KeyMaker",
    "ResponseCache",
    "RunCache",
    "cache_path",
    "default_cache_path",
]

logger = logging.getLogger("gen_ai_frames")

#: Turns the cache on for every run that does not pass ``cache=``: 1/true/yes/on (the default
#: location) or a path. Only runs at temperature 0 use it (see :func:`cache_path`).
CACHE_ENV = "GEN_AI_FRAMES_CACHE"
#: Default size cap of the cache file, in bytes (1 GiB).
DEFAULT_MAX_SIZE = 1 << 30
#: The file's name inside a directory given as the cache (and in the default location).
FILE_NAME = "responses.sqlite3"
_FORMAT = "1"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
# Keys per SELECT: under SQLite's bound-parameter limit (999 in old builds).
_LOOKUP_CHUNK = 990
# Answers per write transaction, and the longest a finished answer waits for its write.
_WRITE_BATCH = 5000
_WRITE_INTERVAL_S = 5.0
# Eviction frees down to this share of the cap, so a full cache does not evict on every write.
_EVICT_TO = 0.9
# Expired entries are swept at most this often (lookups skip them meanwhile).
_SWEEP_INTERVAL_S = 3600.0
# A hit's last use is recorded only if the stored one is older than this: least-recently-used to
# the minute is plenty, and a rerun right after a run then writes nothing at all.
_TOUCH_AFTER_S = 60.0
# Bytes a row costs besides its text, for the eviction estimate (ids, numbers, b-tree overhead).
_ROW_OVERHEAD = 96


class CacheWarning(UserWarning):
    """The response cache cannot be used (damaged, unreadable, locked): the run goes on without it."""


class CachedAnswer(NamedTuple):
    """A stored answer: what a :class:`~gen_ai_frames.engine.Result` needs, minus the request."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprob: float | None = None

    def result(self) -> Result:
        """The answer as a Result of zero attempts (nothing was sent)."""
        return Result(
            text=self.text,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            logprob=self.logprob,
        )

    @classmethod
    def of(cls, result: Result) -> CachedAnswer:
        """The answer of a successful ``result``."""
        return cls._make(_answer_fields(result))


def _answer_fields(result: Result) -> tuple[Any, ...]:
    """What is stored of a successful result, as a plain tuple (cheap: one per answer received)."""
    return (result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens, result.logprob)


# --------------------------------------------------------------------------------------------------
# Where the cache lives


def default_cache_path() -> Path:
    """``responses.sqlite3`` in the user's cache directory (platformdirs; ``~/.cache/gen-ai-frames``
    on Linux, honouring ``XDG_CACHE_HOME``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("gen-ai-frames")) / FILE_NAME


def cache_path(
    cache: bool | str | os.PathLike[str] | None,
    *,
    temperature: float = 0,
    environ: Mapping[str, str] | None = None,
) -> Path | None:
    """The cache file a run uses, or None for no cache.

    ``cache=None`` follows :data:`CACHE_ENV`, but only at temperature 0: sampling at a higher
    temperature is meant to give different answers on each run, and a variable set once in a shell
    profile must not silently freeze them. Passing ``cache=`` explicitly uses it at any temperature.
    A directory gets ``responses.sqlite3`` inside it.

    >>> cache_path(None, environ={}) is None
    True
    >>> cache_path(None, temperature=0.7, environ={"GEN_AI_FRAMES_CACHE": "/tmp/c.sqlite3"}) is None
    True
    >>> cache_path("/tmp/c.sqlite3", temperature=0.7)
    PosixPath('/tmp/c.sqlite3')
    """
    if cache is None:
        value = (os.environ if environ is None else environ).get(CACHE_ENV, "").strip()
        if value.lower() in _FALSE or temperature > 0:
            return None
        cache = True if value.lower() in _TRUE else value
    if cache is False:
        return None
    if cache is True:
        return default_cache_path()
    path = Path(os.fspath(cache)).expanduser()
    return path / FILE_NAME if path.is_dir() else path


def parse_cache_flag(text: str) -> bool | str:
    """The CLI's ``--cache`` value: on/off words, else a path.

    >>> parse_cache_flag("on"), parse_cache_flag("off"), parse_cache_flag("run.sqlite3")
    (True, False, 'run.sqlite3')
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    return text


# --------------------------------------------------------------------------------------------------
# Keys


class KeyMaker:
    """Cache keys of one run's prompts: the run's part (client fingerprint and generation
    parameters) is hashed once, and each prompt only extends a copy of that hash.

    >>> a = KeyMaker({"provider": "openai", "model": "m"}, GenerationParams(max_tokens=5))
    >>> b = KeyMaker({"provider": "openai", "model": "m"}, GenerationParams(max_tokens=6))
    >>> a.key("Hi") == a.key("Hi"), a.key("Hi") == b.key("Hi"), a.key("Hi") == a.key("Ho")
    (True, False, False)
    """

    def __init__(self, client_fingerprint: Mapping[str, Any], params: GenerationParams) -> None:
        run = {"format": _FORMAT, "client": dict(client_fingerprint), "params": _params_key(params)}
        self._base = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode())

    def key(self, prompt: str) -> bytes:
        """The key of one user prompt (the messages the runner sends for it)."""
        return self.messages_key([{"role": "user", "content": prompt}])

    def keys(self, prompts: Iterable[str]) -> list[bytes]:
        """:meth:`key` of many prompts, in a tight loop (a rerun's cost is mostly this).

        >>> keys = KeyMaker({}, GenerationParams())
        >>> keys.keys(["Hi", "Zoë"]) == [keys.key("Hi"), keys.key("Zoë")]
        True
        """
        base, dumps = self._base, orjson.dumps
        out = []
        for prompt in prompts:
            digest = base.copy()
            # The bytes orjson.dumps([{"role": "user", "content": prompt}]) gives, without building it.
            digest.update(b'[{"role":"user","content":' + dumps(prompt) + b"}]")
            out.append(digest.digest())
        return out

    def messages_key(self, messages: Sequence[Mapping[str, str]]) -> bytes:
        digest = self._base.copy()
        digest.update(orjson.dumps(messages))  # compact JSON, ~10x cheaper than json.dumps
        return digest.digest()


def _params_key(params: GenerationParams) -> dict[str, Any]:
    """Every generation parameter but ``timeout`` (a longer wait cannot change an answer)."""
    values: dict[str, Any] = {}
    for spec in fields(params):
        value = getattr(params, spec.name)
        if spec.name == "timeout":
            continue
        if spec.name == "schema" and value is not None:
            value = value.canonical()
        elif spec.name == "stop" and value is not None:
            value = list(value)
        values[spec.name] = value
    return values


def _row_id(key: bytes) -> int:
    """The key's first 8 bytes as SQLite's integer row id: one b-tree, no second index. The full key
    is stored too and compared on every hit, so a clash of ids is a miss, never a wrong answer."""
    return int.from_bytes(key[:8], "big", signed=True)


# --------------------------------------------------------------------------------------------------
# The database


_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    text TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    logprob REAL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('format', '1');
"""


class ResponseCache:
    """The cache file: thread-safe (one connection behind a lock) and safe with several processes.

    Blocking: call it from a worker thread in async code (:class:`RunCache` does). ``max_size`` caps
    the bytes the entries use (least recently used go first); ``max_age`` (seconds) makes older
    entries misses and has them deleted. ``clock`` gives the time (tests pass a fake one).
    Raises ``sqlite3.Error`` or ``OSError`` when the file cannot be used.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        max_age: float | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        # Before the first table: a new file gives freed pages back to the disk after eviction.
        db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db.execute("PRAGMA journal_mode=WAL")
        # A cache may lose its last writes on power loss, never its consistency: WAL keeps that.
        db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        (stored,) = db.execute("SELECT value FROM meta WHERE name='format'").fetchone()
        if stored != _FORMAT:
            raise sqlite3.DatabaseError(f"cache format {stored!r}, this version reads {_FORMAT!r}")
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        """One write transaction, holding the write lock from its start (no deadlock between two
        processes that both read first and then want to write)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ----------------------------------------------------------------------------------- reading

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """The stored answers of ``keys`` (younger than ``max_age``); missing keys are left out."""
        return self.lookup(keys)[0]

    def lookup(self, keys: Sequence[bytes]) -> tuple[dict[bytes, CachedAnswer], list[bytes]]:
        """:meth:`get_many`, and the hits whose last use is worth recording (see ``put_many``)."""
        wanted = set(keys)
        found: dict[bytes, CachedAnswer] = {}
        stale: list[bytes] = []
        now = self._clock()
        oldest = -1.0 if self.max_age is None else now - self.max_age
        ids = sorted({_row_id(key) for key in wanted})  # in b-tree order: neighbouring pages
        make = CachedAnswer._make
        with self._lock:
            for start in range(0, len(ids), _LOOKUP_CHUNK):
                chunk = ids[start : start + _LOOKUP_CHUNK]
                rows = self._db.execute(
                    "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, logprob, used "
                    f"FROM answers WHERE id IN ({','.join('?' * len(chunk))}) AND created >= ?",
                    [*chunk, oldest],
                )
                for row in rows:
                    # A clash of row ids comes back under another key: not wanted, so not a hit.
                    if row[0] in wanted:
                        found[row[0]] = make(row[1:6])
                        if row[6] < now - _TOUCH_AFTER_S:
                            stale.append(row[0])
        return found, stale

    # ----------------------------------------------------------------------------------- writing

    def put_many(
        self, answers: Iterable[tuple[bytes, CachedAnswer | tuple[Any, ...]]], used: Iterable[bytes] = ()
    ) -> None:
        """Store ``answers`` and mark ``used`` keys as just used, in one transaction; then evict
        if the file is over ``max_size``."""
        now = self._clock()
        rows = sorted(  # in b-tree order: fewer pages touched per transaction
            (_row_id(key), key, *answer, len(answer[0]) + _ROW_OVERHEAD, now, now) for key, answer in answers
        )
        touched = sorted((now, _row_id(key)) for key in used)
        if not rows and not touched:
            return
        with self._lock:
            with self._transaction() as db:
                db.executemany("INSERT OR REPLACE INTO answers VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                db.executemany("UPDATE answers SET used = ? WHERE id = ?", touched)
            self._tidy(now)

    def _tidy(self, now: float) -> None:
        """Sweep expired entries (now and then) and evict the least recently used over the cap."""
        if self.max_age is not None:
            (last,) = self._db.execute(
                "SELECT COALESCE((SELECT value FROM meta WHERE name='swept'), '0')"
            ).fetchone()
            if now - float(last) >= _SWEEP_INTERVAL_S:
                with self._transaction() as db:
                    db.execute("DELETE FROM answers WHERE created < ?", (now - self.max_age,))
                    db.execute("INSERT OR REPLACE INTO meta VALUES ('swept', ?)", (repr(now),))
                self._vacuum()
        if self._used_bytes() > self.max_size:
            self._evict()

    def _used_bytes(self) -> int:
        """Bytes of the file that hold data: pages in use (a cheap count, no table scan)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self._page_size

    def _evict(self) -> None:
        for _ in range(8):  # estimates converge in one or two rounds; bounded whatever happens
            excess = self._used_bytes() - int(self.max_size * _EVICT_TO)
            if excess <= 0:
                break
            victims, freed = [], 0
            for row_id, size in self._db.execute("SELECT id, size FROM answers ORDER BY used, id"):
                victims.append((row_id,))
                freed += size
                if freed >= excess:
                    break
            if not victims:
                break
            with self._transaction() as db:
                db.executemany("DELETE FROM answers WHERE id = ?", victims)
            self._vacuum()
            logger.info("response cache %s: evicted %d least recently used answers", self.path, len(victims))

    def _vacuum(self) -> None:
        self._db.execute("PRAGMA incremental_vacuum")

    # ------------------------------------------------------------------------------- management

    def info(self) -> dict[str, Any]:
        """Location, entries, bytes on disk and in use, oldest and newest entry (Unix times)."""
        with self._lock:
            count, oldest, newest, last_used = self._db.execute(
                "SELECT COUNT(*), MIN(created), MAX(created), MAX(used) FROM answers"
            ).fetchone()
            used = self._used_bytes()
        on_disk = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return {
            "path": str(self.path),
            "entries": count,
            "size_bytes": on_disk,
            "used_bytes": used,
            "oldest": oldest,
            "newest": newest,
            "last_used": last_used,
        }

    def clear(self, older_than: float | None = None) -> int:
        """Delete every entry, or those stored more than ``older_than`` seconds ago; returns how many."""
        with self._lock:
            with self._transaction() as db:
                if older_than is None:
                    deleted = db.execute("DELETE FROM answers").rowcount
                else:
                    deleted = db.execute(
                        "DELETE FROM answers WHERE created < ?", (self._clock() - older_than,)
                    ).rowcount
            self._vacuum()
            with contextlib.suppress(sqlite3.OperationalError):  # another process is reading: fine
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(deleted)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_cache_file(path: str | os.PathLike[str]) -> None:
    """Delete a cache file and its WAL companions (for a file too damaged to open)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{os.fspath(path)}{suffix}")


# --------------------------------------------------------------------------------------------------
# A run's use of the cache


class RunCache:
    """One run's view of the cache, for async code: lookups in a worker thread, answers written in
    batches by a background task, use of the hits recorded in one batch at :meth:`close`.

    Every failure of the file (damaged, unreadable, locked past the busy timeout) is reported once
    as a :class:`CacheWarning` and turns the cache off for the rest of the run: never fatal.
    """

    def __init__(self, cache: ResponseCache | None, keys: KeyMaker, path: Path) -> None:
        self._cache = cache
        self.keys = keys
        self.path = path
        self._pending: list[tuple[bytes, tuple[Any, ...]]] = []
        self._used: list[bytes] = []
        self._writing: asyncio.Future[None] | None = None
        self._last_write = time.monotonic()

    @classmethod
    async def open(
        cls, client: Any, params: GenerationParams, cache: Any, **settings: Any
    ) -> RunCache | None:
        """The run's cache per ``cache`` (see :func:`cache_path`), or None when it is off or its
        file cannot be used (reported with a :class:`CacheWarning`).

        ``settings``: ``max_size`` and ``max_age`` of :class:`ResponseCache`.
        """
        path = cache_path(cache, temperature=params.temperature)
        if path is None:
            return None
        keys = KeyMaker(client.fingerprint(), params)
        run = cls(None, keys, path)
        try:
            run._cache = await asyncio.to_thread(ResponseCache, path, **settings)
        except (sqlite3.Error, OSError) as exc:
            run._fail(exc)
            return None
        return run

    @classmethod
    async def for_run(cls, client: Any, options: Any) -> RunCache | None:
        """:meth:`open` with a run's :class:`~gen_ai_frames.options.RunOptions`."""
        return await cls.open(
            client,
            options.params,
            options.cache,
            max_size=options.cache_max_size,
            max_age=options.cache_max_age,
        )

    @property
    def working(self) -> bool:
        """False once the file failed (the run goes on without the cache)."""
        return self._cache is not None

    async def lookup(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """The stored answers of ``keys``; their use is recorded at :meth:`close`."""
        if self._cache is None or not keys:
            return {}
        try:
            found, stale = await asyncio.to_thread(self._cache.lookup, keys)
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return {}
        self._used.extend(stale)
        return found

    def put(self, key: bytes, result: Result) -> None:
        """Queue a successful answer for the next batched write."""
        if self._cache is None:
            return
        self._pending.append((key, _answer_fields(result)))
        if self._writing is None and (
            len(self._pending) >= _WRITE_BATCH or time.monotonic() - self._last_write >= _WRITE_INTERVAL_S
        ):
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self, used: list[bytes] | None = None) -> None:
        batch, self._pending = self._pending, []
        self._last_write = time.monotonic()
        cache = self._cache
        if cache is None:
            return
        try:
            await asyncio.to_thread(cache.put_many, batch, used or ())
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
        finally:
            self._writing = None

    async def close(self) -> None:
        """Write what is pending and record the hits' use; shielded, so an interrupt during the
        last write still stores its answers."""
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._writing is not None:
            await self._writing
        if self._pending or self._used:
            used, self._used = self._used, []
            await self._write(used)
        cache, self._cache = self._cache, None
        if cache is not None:
            await asyncio.to_thread(cache.close)

    def _fail(self, exc: BaseException) -> None:
        cache, self._cache = self._cache, None
        self._pending = []
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.close()
        warnings.warn(
            f"the response cache {str(self.path)!r} cannot be used ({type(exc).__name__}: {exc}); this "
            "run goes on without it. If the file is damaged, delete it or run "
            f"'gen-ai-frames cache clear --cache {self.path}'",
            CacheWarning,
            stacklevel=2,
        )
