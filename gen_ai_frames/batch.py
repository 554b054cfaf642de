"""Batch mode: a run's rows sent through the provider's asynchronous Batch API, never submitted twice.

:func:`run_batch` takes over from :func:`gen_ai_frames.runner.run_rows` after the checkpoint's rows
are restored and identical prompts grouped. It splits the rows still to answer into batches by the
provider's limits (requests and bytes per batch, see :mod:`gen_ai_frames.providers.batches`),
submits them, polls them with backoff, and writes each answer to the checkpoint as it is
downloaded, mapped back to its rows by ``custom_id``.

Never pay twice: every batch is recorded in ``batches.json`` in the checkpoint directory (written
atomically, like the manifest) *before* each step that spends money can happen:

1. an *intent* (a random tag, the rows' ``custom_id``\\ s) before the requests file is uploaded;
2. the uploaded file's id before the batch is created;
3. the provider's batch id once the create call answers.

So whenever the process dies, the next call with the same checkpoint knows every batch that may
exist: a recorded batch is polled, not submitted again; an intent without a batch id is looked up
at the provider (by its tag in the batch's metadata or display name, or by the uploaded file's id;
Anthropic's batches carry neither, so by creation time and size) and only submitted again when no
such batch exists. Answers are written to the checkpoint before the batch is marked collected, so a
crash in between downloads the answers again (free) instead of losing them.

Rows of an expired, cancelled or failed batch that got no answer are submitted again, only those and
once per call; the second time they fail with :class:`BatchExpiredError`, which a later call (with
the same checkpoint) submits again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointCorruptError, Storage, storage_for
from .engine import Result
from .errors import BatchExpiredError, BatchPendingError, NotSentError
from .params import Message
from .pricing import estimate_tokens
from .providers.batches import BatchDialect, BatchStatus, RowAnswer, batch_dialect
from .transport import HttpRequest, HttpResponse, TransportError

if TYPE_CHECKING:
    from .client import Client
    from .options import RunOptions
    from .pricing import Budget

__all__ = ["BATCH_RECORDS", "read_batch_records", "run_batch"]

#: The file in the checkpoint directory that records every batch submitted.
BATCH_RECORDS = "batches.json"
_FORMAT = "gen_ai_frames.batches"

#: Injectable for tests: how the poll loop waits and tells time.
sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
clock: Callable[[], float] = time.monotonic

#: The first wait between polls (seconds); it doubles up to ``poll_interval``.
FIRST_POLL_S = 1.0
#: Attempts of one control call (upload, create, poll, download) that meets a passing failure.
CONTROL_ATTEMPTS = 5


# --------------------------------------------------------------------------------------------------
# The records


def read_batch_records(
    directory: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The batches recorded in a checkpoint directory (empty when none); ``s3://`` too.

    >>> import tempfile
    >>> read_batch_records(tempfile.mkdtemp())
    []
    """
    store = storage_for(directory, storage_options)
    try:
        data = json.loads(store.read_bytes(BATCH_RECORDS))
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise CheckpointCorruptError(
            f"{store.show(BATCH_RECORDS)} is not valid JSON ({exc}): it records the batches submitted to "
            "the provider. Look their ids up in the provider's console before deleting it."
        ) from None
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("batches"), list)
    ):
        raise CheckpointCorruptError(f"{store.show(BATCH_RECORDS)} is not a gen-ai-frames batch record")
    return list(data["batches"])


class _Records:
    """``batches.json``: rewritten atomically on every change (fsynced before the next step)."""

    def __init__(self, store: Storage, fresh: bool) -> None:
        # The checkpoint's own storage: a local directory, or object storage (one PUT is atomic).
        self.store = store
        if fresh:
            self.batches: list[dict[str, Any]] = []
            if store.has(BATCH_RECORDS):
                self.save()
        else:
            self.batches = read_batch_records(store)

    def save(self) -> None:
        data = json.dumps({"format": _FORMAT, "version": 1, "batches": self.batches}, separators=(",", ":"))
        self.store.write(BATCH_RECORDS, data.encode())

    def pending(self) -> list[dict[str, Any]]:
        return [b for b in self.batches if b["state"] in ("intent", "submitted")]


def default_checkpoint(client: Client, options: RunOptions, texts: list[str | None]) -> Path:
    """Where a batch run without ``checkpoint=`` keeps its records: ``genai-batch-<hash>.ckpt`` in
    the current directory, named after the model, the generation parameters and the prompts, so the
    same call made again (after a crash, or with ``wait=False``) finds its batches.

    >>> class C:
    ...     def fingerprint(self): return {"model": "m"}
    >>> from gen_ai_frames.options import RunOptions
    >>> default_checkpoint(C(), RunOptions(mode="batch"), ["Hi"]).name
    'genai-batch-98f7556c46e27bfd.ckpt'
    """
    from .checkpoint import run_fingerprint

    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(run_fingerprint(client, options.params), sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(b"\0" + (text or "").encode("utf-8", "surrogatepass"))
    return Path.cwd() / f"genai-batch-{digest.hexdigest()}.ckpt"


# --------------------------------------------------------------------------------------------------
# The run


def custom_id(key: tuple[str, int], dedupe: bool) -> str:
    """A row's ``custom_id``: its prompt hash, plus its occurrence when duplicates are sent apart.

    >>> custom_id(("72b2ca007b26e13625a7d479daf3691f", 2), dedupe=False)
    '72b2ca007b26e13625a7d479daf3691f-2'
    """
    return key[0] if dedupe else f"{key[0]}-{key[1]}"


class _Sender:
    """Sends the dialect's control calls, retrying passing failures with backoff."""

    def __init__(self, client: Client, dialect: BatchDialect) -> None:
        self._transport = client._transport_factory()
        self.dialect = dialect

    async def send(self, request: HttpRequest) -> HttpResponse:
        delay = 0.5
        for attempt in range(CONTROL_ATTEMPTS):
            try:
                response = await self._transport.send(request)
            except TransportError:
                if attempt == CONTROL_ATTEMPTS - 1:
                    raise
            else:
                if (
                    response.status not in (408, 429, 500, 502, 503, 504, 529)
                    or attempt == CONTROL_ATTEMPTS - 1
                ):
                    return response
            await sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._transport.aclose()


async def run_batch(
    run: Any,
    groups: dict[Any, list[int]],
    client: Client,
    options: RunOptions,
    budget: Budget,
    bar: Any,
    outcome: Any,
) -> None:
    """Answer ``groups`` (rows sharing one request) through the provider's Batch API; see the module
    docs. ``run`` is the runner's ``_Run`` (its checkpoint is open and required)."""
    dialect = batch_dialect(client.provider)  # a provider without a batch API fails before sending
    if not groups:  # every row restored or unsendable: nothing to submit, nothing to collect
        return
    assert run.store is not None, "batch mode needs a checkpoint"
    records = _Records(run.store.storage, fresh=not options.resume)
    dedupe = options.sends_duplicates_once
    texts = run.prompts.texts
    by_id: dict[str, list[int]] = {}
    rows = [i for group in groups.values() for i in group]
    for i, key in zip(rows, run.keys_of(rows)):
        by_id.setdefault(custom_id(key, dedupe), []).append(i)
    sender = _Sender(client, dialect)
    state = _BatchRun(run, by_id, dialect, sender, records, options, budget, bar, outcome, texts)
    try:
        await state.resolve_intents()
        covered = {
            i for record in records.pending() for cid in record["custom_ids"] for i in state._rows_of(cid)
        }
        await state.submit([cid for cid, rows in by_id.items() if not covered.intersection(rows)])
        await state.follow()
    finally:
        await sender.aclose()


class _BatchRun:
    def __init__(
        self,
        run: Any,
        by_id: dict[str, list[int]],
        dialect: BatchDialect,
        sender: _Sender,
        records: _Records,
        options: RunOptions,
        budget: Budget,
        bar: Any,
        outcome: Any,
        texts: list[str | None],
    ) -> None:
        self.run, self.by_id, self.dialect, self.sender = run, by_id, dialect, sender
        self.records, self.options, self.budget, self.bar, self.outcome = (
            records,
            options,
            budget,
            bar,
            outcome,
        )
        self.texts = texts
        self.resubmitted: set[str] = set()
        self.finished: set[int] = set()

    def _rows_of(self, cid: str) -> list[int]:
        """This run's rows answered by ``cid`` (a recorded id without occurrence answers every
        duplicate; one with an occurrence answers that row, or all duplicates when deduped now)."""
        rows = self.by_id.get(cid)
        if rows is not None:
            return rows
        head = cid.split("-")[0]
        if "-" in cid:
            return self.by_id.get(head, [])
        return [i for other, rows in self.by_id.items() if other.split("-")[0] == head for i in rows]

    # ------------------------------------------------------------------------------ submitting

    async def resolve_intents(self) -> None:
        """Find the batch of every intent recorded without a batch id (its create call's answer was
        lost); forget the intents whose batch was never created."""
        intents = [r for r in self.records.batches if r["state"] == "intent"]
        if not intents:
            return
        claimed = {r["batch_id"] for r in self.records.batches if r.get("batch_id")}
        listed: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(100):  # 10,000 batches: far more than one run makes
            items, cursor = self.dialect.parse_list(await self.sender.send(self.dialect.list_request(cursor)))
            listed.extend(items)
            if cursor is None:
                break
        for record in intents:
            found = next(
                (
                    item
                    for item in listed
                    if self.dialect.batch_id(item) not in claimed and self.dialect.matches(item, record)
                ),
                None,
            )
            if found is None:
                record["state"] = "abandoned"  # never created: its rows are submitted again now
            else:
                record["batch_id"] = self.dialect.batch_id(found)
                record["state"] = "submitted"
                claimed.add(record["batch_id"])
        self.records.save()

    async def submit(self, ids: list[str]) -> None:
        """Submit ``ids`` in as many batches as the provider's limits need, within ``max_cost``."""
        if not ids:
            return
        params = self.options.params
        lines: list[tuple[str, bytes]] = []
        cost_so_far = 0.0
        price = self.budget.spend.price
        for n, cid in enumerate(ids):
            text = self.texts[self.by_id[cid][0]]
            assert text is not None
            if self.options.max_cost is not None and price is not None:
                # max_cost applies to what is submitted: the prompt and all of max_tokens, at batch prices.
                cost = (estimate_tokens(text) * price[0] + params.max_tokens * price[1]) / 1e6
                if (
                    self.budget.spend.usd is not None
                    and self.budget.spend.usd + cost_so_far + cost > self.options.max_cost
                ):
                    self._not_sent(ids[n:])
                    break
                cost_so_far += cost
            messages: list[Message] = [{"role": "user", "content": text}]
            lines.append((cid, self.dialect.line(cid, messages, params)))
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for cid, line in lines:
            if chunk and (
                len(chunk) >= self.dialect.max_requests or size + len(line) + 1 > self.dialect.max_bytes
            ):
                await self._submit_one(chunk)
                chunk, size = [], 0
            chunk.append((cid, line))
            size += len(line) + 1
        if chunk:
            await self._submit_one(chunk)

    def _not_sent(self, ids: list[str]) -> None:
        error = NotSentError(
            f"not submitted: the batch would pass max_cost=${self.options.max_cost:g} (estimated at batch "
            f"prices with every answer using all of max_tokens={self.options.max_tokens})",
            suggestion="Run again with a higher max_cost (or none): answered rows are kept, only these "
            "are submitted.",
            sent=False,
        )
        for cid in ids:
            self._finish(cid, Result(error=error), store=False)

    async def _submit_one(self, chunk: list[tuple[str, bytes]]) -> None:
        tag = "gaf-" + uuid.uuid4().hex
        record: dict[str, Any] = {
            "tag": tag,
            "state": "intent",
            "requests": len(chunk),
            "intent_at": time.time(),
            "file_id": None,
            "batch_id": None,
            "custom_ids": [cid for cid, _ in chunk],
        }
        self.records.batches.append(record)
        self.records.save()  # 1. the intent, before anything is uploaded
        lines = [line for _, line in chunk]
        upload = self.dialect.upload_request(lines, tag)
        if upload is not None:
            record["file_id"] = self.dialect.parse_upload(await self.sender.send(upload))
            self.records.save()  # 2. the file, before the batch is created
        response = await self.sender.send(self.dialect.create_request(record["file_id"], lines, tag))
        record["batch_id"] = self.dialect.parse_created(response)
        record["state"] = "submitted"
        self.records.save()  # 3. the batch id
        self.outcome.sent += len(chunk)

    # ------------------------------------------------------------------------------ following

    async def follow(self) -> None:
        """Poll the pending batches until every one has finished (or once, with ``wait=False``)."""
        delay = min(FIRST_POLL_S, self.options.poll_interval)
        while True:
            pending = self.records.pending()
            if not pending:
                return
            statuses = []
            for record in pending:
                status = self.dialect.parse_status(
                    await self.sender.send(self.dialect.retrieve_request(record["batch_id"]))
                )
                statuses.append(status)
                if status.final:
                    await self._collect(record, status)
            self._show(statuses)
            if not self.records.pending():
                return
            if not self.options.wait:
                self._leave_pending()
                return
            await sleep(delay)
            delay = min(delay * 2, self.options.poll_interval)

    def _show(self, statuses: list[BatchStatus]) -> None:
        active = [s for s in statuses if not s.final]
        if not active:
            self.bar.show_status(None)
            return
        states = sorted({s.state for s in active})
        done = sum(s.done + s.failed for s in active)
        total = sum(s.total for s in active)
        self.bar.show_status(f"{len(active)} batch(es) {'/'.join(states)} {done}/{total}")

    def _leave_pending(self) -> None:
        error = BatchPendingError(
            "batch submitted, not finished yet: call again with the same checkpoint to collect the answers",
            sent=False,
        )
        for record in self.records.pending():
            for cid in record["custom_ids"]:
                self._finish(cid, Result(error=error), store=False)

    async def _collect(self, record: dict[str, Any], status: BatchStatus) -> None:
        """Download a finished batch's answers, write them to the checkpoint, and resubmit (once per
        call) the rows that got none."""
        bodies = []
        for request in self.dialect.download_requests(status):
            response = await self.sender.send(request)
            if response.status >= 400:
                self.dialect._json(response)  # raises the provider's typed error
            bodies.append(response.body)
        answers = self.dialect.parse_results(status, bodies)
        stored: list[int] = []
        unanswered: list[str] = []
        for cid in record["custom_ids"]:
            answer = answers.get(cid)
            if answer is None or answer.unanswered is not None:
                unanswered.append(cid)
                continue
            stored.extend(self._finish(cid, _result(answer, self.options), store=True))
        if stored:
            await self.run.flush()  # the answers first: a crash now downloads them again
        again = [cid for cid in unanswered if cid not in self.resubmitted and self._rows_of(cid)]
        late = [cid for cid in unanswered if cid in self.resubmitted]
        record["state"] = "collected"
        record["outcome"] = status.state
        self.records.save()
        if late:
            reason = status.message or f"the batch {status.state}"
            error = BatchExpiredError(
                f"no answer: the row's batch ended '{status.state}' before it ran, twice in this call "
                f"({reason})",
                sent=False,
            )
            for cid in late:
                self._finish(cid, Result(error=error), store=False)
        if again:
            self.resubmitted.update(again)
            await self.submit([cid for cid in again if cid in self.by_id])

    def _finish(self, cid: str, result: Result, *, store: bool) -> list[int]:
        """Put ``result`` in the rows of ``cid`` (once), charge its tokens, advance the bar."""
        rows = [i for i in self._rows_of(cid) if i not in self.finished]
        if not rows:
            return []
        from .runner import result_values

        error = result.error
        if error is None:
            prompt_tokens = result.prompt_tokens
            if prompt_tokens is None:
                prompt_tokens = estimate_tokens(self.texts[rows[0]] or "")
            self.budget.charge(prompt_tokens, result.completion_tokens or 0)
            cache = self.run.cache
            if cache is not None and cache.working:  # a batch answer is as good as a realtime one
                cache.put(cache.keys.key(self.texts[rows[0]] or ""), result)
        self.run.buffer.add(rows, result_values(result), store=store)
        self.finished.update(rows)
        self.bar.advance(len(rows), error is not None)
        return rows if store else []


def _result(answer: RowAnswer, options: RunOptions) -> Result:
    """A row's :class:`~gen_ai_frames.engine.Result` from its batch answer; with a schema, an answer
    that breaks it is a ``SchemaValidationError`` (a batch cannot ask again)."""
    if answer.error is not None:
        answer.error.attempts = 1
        return Result(error=answer.error, attempts=1)
    completion = answer.completion
    assert completion is not None
    schema = options.schema
    if schema is not None:
        from .errors import SchemaValidationError
        from .schema import SchemaMismatch

        try:
            schema.validate(completion.text)
        except SchemaMismatch as mismatch:
            error = SchemaValidationError(
                f"the answer does not match the schema: {mismatch}",
                suggestion="Run again with retry_errors=True to ask these rows again.",
                attempts=1,
            )
            return Result(
                error=error,
                finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                attempts=1,
            )
    return Result(
        text=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        attempts=1,
        logprob=completion.logprob,
    )
