"""The fake server's Batch APIs: OpenAI, Azure OpenAI, Anthropic Message Batches and Gemini batch mode.

Each dialect's upload, create, retrieve, list, cancel and results calls, in its vendor's shapes.
Every row of a batch is answered by the server's normal answer logic (it posts the row's request
to its own realtime route, on the loopback), so directives, chaos, structured answers and the
per-prompt stats work as they do for realtime requests.

A batch's state advances when it is polled: each state (validating, in_progress, finalizing)
lasts ``batch_polls_per_state`` retrieve calls, and in_progress lasts until its rows are answered.
``batch_outcomes`` lists how the next batches end (``"expired"``, ``"cancelled"``, ``"failed"``;
then ``"completed"``): an expired or cancelled batch answers only its first ``batch_fraction`` of
rows, a failed one none. ``stats()["batches"]`` counts the uploads, the batches created, the polls
and how often each ``custom_id`` was submitted.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import ClientSession, web

from .common import _dumps, _error_response, _json_response, _loads

if TYPE_CHECKING:
    from .app import FakeLLM

_CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key", "x-goog-api-key", "anthropic-version")
_ROW_CONCURRENCY = 16


@dataclass
class _Batch:
    id: str
    dialect: str
    lines: list[dict[str, Any]]
    headers: dict[str, str]
    base: str
    created: float
    ending: str = "completed"
    input_file_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    state: str = "validating"
    polls: int = 0
    #: Row answers by custom_id: (HTTP status, body).
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None


class FakeBatches:
    """The batch state of one :class:`~gen_ai_frames.testing.fake_server.app.FakeLLM`."""

    def __init__(self, app: FakeLLM) -> None:
        self.app = app
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self._next = 0
        self.reset()

    def reset(self) -> None:
        """Clear the counters (the batches and files stay)."""
        self.uploads = 0
        self.created = 0
        self.polls = 0
        self.submitted: dict[str, int] = {}
        #: ``(event, batch id)`` in the order they happened: "created", then how each batch ended.
        self.events: list[tuple[str, str]] = []

    def stats(self) -> dict[str, Any]:
        return {
            "uploads": self.uploads,
            "created": self.created,
            "polls": self.polls,
            "rows": sum(self.submitted.values()),
            "submitted": dict(self.submitted),
            "states": {b.id: b.state for b in self.batches.values()},
            "events": list(self.events),
        }

    def register(self, app: web.Application) -> None:
        for prefix in ("/v1", ""):
            app.router.add_post(prefix + "/files", self._openai_upload)
            app.router.add_get(prefix + "/files/{file}/content", self._openai_content)
            app.router.add_post(prefix + "/batches", self._openai_create)
            app.router.add_get(prefix + "/batches", self._openai_list)
            app.router.add_get(prefix + "/batches/{batch}", self._openai_retrieve)
            app.router.add_post(prefix + "/batches/{batch}/cancel", self._openai_cancel)
        app.router.add_post("/openai/files", self._openai_upload)
        app.router.add_get("/openai/files/{file}/content", self._openai_content)
        app.router.add_post("/openai/batches", self._openai_create)
        app.router.add_get("/openai/batches", self._openai_list)
        app.router.add_get("/openai/batches/{batch}", self._openai_retrieve)
        app.router.add_post("/openai/batches/{batch}/cancel", self._openai_cancel)
        app.router.add_post("/v1/messages/batches", self._anthropic_create)
        app.router.add_get("/v1/messages/batches", self._anthropic_list)
        app.router.add_get("/v1/messages/batches/{batch}", self._anthropic_retrieve)
        app.router.add_post("/v1/messages/batches/{batch}/cancel", self._anthropic_cancel)
        app.router.add_get("/v1/messages/batches/{batch}/results", self._anthropic_results)
        for version in ("/v1beta", "/v1"):
            app.router.add_get(version + "/batches", self._gemini_list)
            app.router.add_get(version + "/batches/{batch}", self._gemini_retrieve)
            app.router.add_post(version + "/batches/{batch}", self._gemini_cancel)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, app: web.Application) -> None:
        for batch in self.batches.values():
            if batch.task is not None:
                batch.task.cancel()
        tasks = [b.task for b in self.batches.values() if b.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----------------------------------------------------------------------------- shared

    def _refused(self, request: web.Request) -> web.Response | None:
        key = self.app.settings["api_key"]
        if key is None:
            return None
        given = [request.headers.get(name, "") for name in ("api-key", "x-api-key", "x-goog-api-key")]
        given.append(request.headers.get("authorization", "").removeprefix("Bearer "))
        if any(hmac.compare_digest(value.encode(), key.encode()) for value in given):
            return None
        return _error_response(401)

    def _new_batch(
        self, request: web.Request, dialect: str, lines: list[dict[str, Any]], model: str
    ) -> _Batch:
        self._next += 1
        self.created += 1
        prefix = {"anthropic": "msgbatch_", "gemini": "batches/"}.get(dialect, "batch_")
        outcomes = self.app.settings["batch_outcomes"]
        ending = outcomes.pop(0) if outcomes else "completed"
        batch = _Batch(
            id=f"{prefix}{self._next:06d}",
            dialect=dialect,
            lines=lines,
            headers={k: v for k, v in request.headers.items() if k.lower() in _CREDENTIAL_HEADERS},
            base=f"{request.scheme}://{request.host}",
            created=time.time(),
            ending=ending,
            model=model,
        )
        for line in lines:
            cid = str(line.get("custom_id"))
            self.submitted[cid] = self.submitted.get(cid, 0) + 1
        self.batches[batch.id] = batch
        self.events.append(("created", batch.id))
        return batch

    def _advance(self, batch: _Batch) -> None:
        """One poll: the state moves on once it has been seen ``batch_polls_per_state`` times."""
        self.polls += 1
        batch.polls += 1
        if batch.state in ("completed", "failed", "expired", "cancelled"):
            return
        if batch.polls < self.app.settings["batch_polls_per_state"]:
            return
        if batch.state == "validating":
            if batch.ending == "failed":
                self._end(batch, "failed")
                return
            batch.state, batch.polls = "in_progress", 0
            batch.task = asyncio.ensure_future(self._answer_rows(batch))
        elif batch.state == "in_progress" and batch.task is not None and batch.task.done():
            if batch.ending in ("expired", "cancelled"):
                self._end(batch, batch.ending)
            else:
                batch.state, batch.polls = "finalizing", 0
        elif batch.state == "finalizing":
            self._end(batch, "completed")
        elif batch.state == "cancelling" and (batch.task is None or batch.task.done()):
            self._end(batch, "cancelled")

    def _rows_to_answer(self, batch: _Batch) -> list[dict[str, Any]]:
        if batch.ending in ("expired", "cancelled"):
            return batch.lines[: int(len(batch.lines) * self.app.settings["batch_fraction"])]
        return batch.lines

    async def _answer_rows(self, batch: _Batch) -> None:
        """Answer each row through the server's own realtime route, as the vendor's workers would."""
        limit = asyncio.Semaphore(_ROW_CONCURRENCY)
        async with ClientSession() as session:

            async def one(line: dict[str, Any]) -> None:
                url, body = self._row_request(batch, line)
                async with limit:
                    async with session.post(url, data=_dumps(body), headers=self._row_headers(batch)) as resp:
                        data = await resp.read()
                        try:
                            parsed = _loads(data)
                        except ValueError:
                            parsed = {"error": {"message": data[:200].decode("utf-8", "replace")}}
                        batch.answers[str(line.get("custom_id"))] = (resp.status, parsed)

            await asyncio.gather(*(one(line) for line in self._rows_to_answer(batch)))

    def _row_headers(self, batch: _Batch) -> dict[str, str]:
        return {**batch.headers, "content-type": "application/json"}

    def _row_request(self, batch: _Batch, line: dict[str, Any]) -> tuple[str, Any]:
        if batch.dialect == "openai":
            return batch.base + "/v1" + str(line["url"]).removeprefix("/v1"), line["body"]
        if batch.dialect == "azure":
            deployment = line["body"].get("model", batch.model)
            path = str(line["url"]).removeprefix("/v1")
            return f"{batch.base}/openai/deployments/{deployment}{path}?api-version=fake", line["body"]
        if batch.dialect == "anthropic":
            return batch.base + "/v1/messages", line["params"]
        return f"{batch.base}/v1beta/{batch.model}:generateContent", line["request"]

    def _end(self, batch: _Batch, state: str) -> None:
        batch.state = state
        self.events.append((state, batch.id))
        if batch.dialect in ("openai", "azure"):
            self._write_openai_files(batch)

    def _cancel(self, batch: _Batch) -> None:
        if batch.state in ("completed", "failed", "expired", "cancelled"):
            return
        batch.ending = "cancelled"
        if batch.task is not None:
            batch.task.cancel()
        batch.state = "cancelling"

    def _counts(self, batch: _Batch) -> tuple[int, int, int]:
        """(answered, errored, total)."""
        ok = sum(1 for status, _ in batch.answers.values() if status == 200)
        return ok, len(batch.answers) - ok, len(batch.lines)

    # ----------------------------------------------------------------------------- OpenAI, Azure

    async def _openai_upload(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if form.get("purpose") != "batch" or not isinstance(upload, web.FileField):
            return _error_response(400, "expected purpose=batch and a file")
        content = upload.file.read()
        self.uploads += 1
        self._next += 1
        file_id = f"file-{self._next:06d}"
        self.files[file_id] = content
        payload = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "purpose": "batch",
            "filename": upload.filename,
            "created_at": int(time.time()),
        }
        return _json_response(payload)

    async def _openai_create(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = _loads(await request.read())
        file_id = data.get("input_file_id")
        if file_id not in self.files:
            return _error_response(404, f"No such File object: {file_id}")
        lines = [_loads(raw) for raw in self.files[file_id].splitlines() if raw.strip()]
        dialect = "azure" if request.path.startswith("/openai/") else "openai"
        batch = self._new_batch(request, dialect, lines, "")
        batch.input_file_id = file_id
        batch.metadata = dict(data.get("metadata") or {})
        return _json_response(self._openai_object(batch))

    def _openai_object(self, batch: _Batch) -> dict[str, Any]:
        ok, errored, total = self._counts(batch)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.state,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created),
            "errors": {"object": "list", "data": [{"code": "fake_failure", "message": "the batch failed"}]}
            if batch.state == "failed"
            else None,
            "request_counts": {"total": total, "completed": ok, "failed": errored},
            "metadata": batch.metadata,
        }

    def _write_openai_files(self, batch: _Batch) -> None:
        output, errors = [], []
        for line in batch.lines:
            cid = line.get("custom_id")
            if cid in batch.answers:
                status, body = batch.answers[cid]
                output.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "error": None,
                        "response": {"status_code": status, "request_id": f"r_{cid}", "body": body},
                    }
                )
            elif batch.state in ("expired", "cancelled"):
                code = f"batch_{batch.state}"
                errors.append(
                    {
                        "id": f"req_{cid}",
                        "custom_id": cid,
                        "response": None,
                        "error": {"code": code, "message": f"This request was not executed: {code}."},
                    }
                )
        for kind, lines in (("output", output), ("error", errors)):
            if lines:
                self._next += 1
                file_id = f"file-{self._next:06d}"
                self.files[file_id] = b"\n".join(_dumps(line) for line in lines) + b"\n"
                setattr(batch, f"{kind}_file_id", file_id)

    async def _openai_list(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        items = [
            self._openai_object(b)
            for b in reversed(self.batches.values())
            if b.dialect in ("openai", "azure")
        ]
        after = request.query.get("after")
        if after:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = items[:limit]
        return _json_response(
            {
                "object": "list",
                "data": page,
                "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    def _find(self, request: web.Request, name: str) -> _Batch | web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        batch = self.batches.get(name)
        if batch is None:
            return _error_response(404, f"No batch found with id '{name}'.")
        return batch

    async def _openai_retrieve(self, request: web.Request) -> web.Response:
        batch = self._find(request, request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        self._advance(batch)
        return _json_response(self._openai_object(batch))

    async def _openai_cancel(self, request: web.Request) -> web.Response:
        batch = self._find(request, request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        self._cancel(batch)
        return _json_response(self._openai_object(batch))

    async def _openai_content(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        content = self.files.get(request.match_info["file"])
        if content is None:
            return _error_response(404, "No such File object")
        return web.Response(body=content, content_type="application/octet-stream")

    # ----------------------------------------------------------------------------- Anthropic

    async def _anthropic_create(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = _loads(await request.read())
        lines = data.get("requests")
        if not isinstance(lines, list) or not lines:
            return _error_response(400, "requests: a non-empty list is required")
        batch = self._new_batch(request, "anthropic", lines, "")
        return _json_response(self._anthropic_object(batch))

    def _anthropic_object(self, batch: _Batch) -> dict[str, Any]:
        ok, errored, total = self._counts(batch)
        ended = batch.state in ("completed", "failed", "expired", "cancelled")
        rest = total - ok - errored
        counts = {
            "processing": 0 if ended else rest,
            "succeeded": ok,
            "errored": errored,
            "canceled": rest if ended and batch.state == "cancelled" else 0,
            "expired": rest if ended and batch.state in ("expired", "failed") else 0,
        }
        status = "ended" if ended else "canceling" if batch.state == "cancelling" else "in_progress"
        created = datetime.fromtimestamp(batch.created, UTC).isoformat().replace("+00:00", "Z")
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": created,
            "results_url": f"{batch.base}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    async def _anthropic_list(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        items = [
            self._anthropic_object(b) for b in reversed(self.batches.values()) if b.dialect == "anthropic"
        ]
        return _json_response({"data": items, "has_more": False, "first_id": None, "last_id": None})

    async def _anthropic_retrieve(self, request: web.Request) -> web.Response:
        batch = self._find(request, request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        self._advance(batch)
        return _json_response(self._anthropic_object(batch))

    async def _anthropic_cancel(self, request: web.Request) -> web.Response:
        batch = self._find(request, request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        self._cancel(batch)
        return _json_response(self._anthropic_object(batch))

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        batch = self._find(request, request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        lines = []
        for line in batch.lines:
            cid = line.get("custom_id")
            if cid in batch.answers:
                status, body = batch.answers[cid]
                result = (
                    {"type": "succeeded", "message": body}
                    if status == 200
                    else {"type": "errored", "error": body}
                )
            else:
                result = {"type": "canceled" if batch.state == "cancelled" else "expired"}
            lines.append(_dumps({"custom_id": cid, "result": result}))
        return web.Response(body=b"\n".join(lines) + b"\n", content_type="application/binary")

    # ----------------------------------------------------------------------------- Gemini

    async def gemini_create(self, request: web.Request, model: str) -> web.Response:
        """``POST models/{model}:batchGenerateContent`` with inline requests."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = _loads(await request.read())
        config = data.get("batch") if isinstance(data, dict) else None
        if not isinstance(config, dict):
            return _error_response(400, "batch is required")
        try:
            lines = config["input_config"]["requests"]["requests"]
        except (KeyError, TypeError):
            return _error_response(400, "batch.input_config.requests.requests is required")
        for line in lines:
            line["custom_id"] = (line.get("metadata") or {}).get("key")
        batch = self._new_batch(request, "gemini", lines, "models/" + model)
        batch.metadata = {"displayName": config.get("display_name") or config.get("displayName")}
        return _json_response(self._gemini_object(batch))

    _GEMINI_STATES = {
        "validating": "BATCH_STATE_PENDING",
        "in_progress": "BATCH_STATE_RUNNING",
        "finalizing": "BATCH_STATE_RUNNING",
        "cancelling": "BATCH_STATE_RUNNING",
        "completed": "BATCH_STATE_SUCCEEDED",
        "failed": "BATCH_STATE_FAILED",
        "expired": "BATCH_STATE_EXPIRED",
        "cancelled": "BATCH_STATE_CANCELLED",
    }

    def _gemini_object(self, batch: _Batch) -> dict[str, Any]:
        ok, errored, total = self._counts(batch)
        done = batch.state in ("completed", "failed", "expired", "cancelled")
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": batch.model,
            "displayName": batch.metadata.get("displayName"),
            "state": self._GEMINI_STATES[batch.state],
            "batchStats": {
                "requestCount": str(total),
                "successfulRequestCount": str(ok),
                "failedRequestCount": str(errored),
                "pendingRequestCount": str(total - ok - errored),
            },
        }
        item: dict[str, Any] = {"name": batch.id, "metadata": metadata, "done": done}
        if done:
            responses = []
            for line in batch.lines:
                cid = line.get("custom_id")
                if cid in batch.answers:
                    status, body = batch.answers[cid]
                    entry = (
                        {"response": body} if status == 200 else {"error": (body or {}).get("error", body)}
                    )
                    responses.append({**entry, "metadata": {"key": cid}})
            item["response"] = {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
                "inlinedResponses": {"inlinedResponses": responses},
            }
        return item

    async def _gemini_list(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        items = [self._gemini_object(b) for b in reversed(self.batches.values()) if b.dialect == "gemini"]
        return _json_response({"operations": items, "nextPageToken": ""})

    async def _gemini_retrieve(self, request: web.Request) -> web.Response:
        batch = self._find(request, "batches/" + request.match_info["batch"])
        if isinstance(batch, web.Response):
            return batch
        self._advance(batch)
        return _json_response(self._gemini_object(batch))

    async def _gemini_cancel(self, request: web.Request) -> web.Response:
        name, _, method = request.match_info["batch"].partition(":")
        if method != "cancel":
            return _error_response(404, f"unknown method {method!r}")
        batch = self._find(request, "batches/" + name)
        if isinstance(batch, web.Response):
            return batch
        self._cancel(batch)
        return _json_response({})
