"""Provider Batch APIs: build the requests of an asynchronous batch and parse its answers.

Like the providers, a dialect never sends anything: :mod:`gen_ai_frames.batch` sends what it builds.
Each row's request body comes from the provider's own ``build_request`` and each row's answer goes
through its own ``parse_response``, so ``schema=`` and every generation parameter work unchanged.

The vendors' documentation used here:

* OpenAI: https://platform.openai.com/docs/guides/batch and
  https://platform.openai.com/docs/api-reference/batch (a JSONL file uploaded to ``/v1/files``
  with ``purpose=batch``, at most 50,000 requests and 200 MB; ``POST /v1/batches``; states
  validating, in_progress, finalizing, completed, failed, expired, cancelling, cancelled; the
  answers in ``output_file_id``, the requests that did not run in ``error_file_id``).
* Azure OpenAI global batch: https://learn.microsoft.com/azure/ai-services/openai/how-to/batch
  (the same API under ``{endpoint}/openai/files`` and ``{endpoint}/openai/batches`` with
  ``?api-version=``, 2024-10-21 or later; at most 100,000 requests and 200 MB per file; each
  line's ``model`` is the global-batch deployment; Azure aims at 24 h but does not expire a late
  batch, and a cancelled one returns the work already done).
* Anthropic Message Batches: https://docs.anthropic.com/en/docs/build-with-claude/batch-processing
  (``POST /v1/messages/batches`` with the requests inline, at most 100,000 requests or 256 MB;
  ``processing_status`` in_progress, canceling, ended; ``request_counts`` processing, succeeded,
  errored, canceled, expired; a ``results_url`` of JSONL lines whose ``result.type`` is one of
  the last four).
* Gemini batch mode: https://ai.google.dev/gemini-api/docs/batch-mode
  and https://ai.google.dev/api/batch-api (``POST models/{model}:batchGenerateContent`` with a
  required ``displayName``; inline requests up to 20 MB in all, else a JSONL file; states
  BATCH_STATE_PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, EXPIRED; inline answers in
  ``output.inlinedResponses``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from ..errors import ConfigurationError, MalformedResponseError, RequestError
from ..params import GenerationParams, Message
from ..transport import HttpRequest, HttpResponse
from .base import Completion, Provider, dumps, join_url, loads

__all__ = ["BatchDialect", "BatchStatus", "RowAnswer", "batch_dialect", "UNANSWERED"]

#: The normalized states of a batch (OpenAI's names; the other vendors' map onto them).
ACTIVE_STATES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
FINAL_STATES = frozenset({"completed", "failed", "expired", "cancelled"})

#: The reasons a row of a finished batch has no answer and may be submitted again.
UNANSWERED = frozenset({"expired", "cancelled"})


@dataclass
class BatchStatus:
    """What the provider says about one batch, in OpenAI's terms."""

    state: str
    total: int = 0
    done: int = 0
    failed: int = 0
    #: Where the answers are: a file id, a results URL, or None (inline answers: ``raw`` holds them).
    output: str | None = None
    errors: str | None = None
    message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class RowAnswer:
    """One row's outcome in a batch's results: an answer, an error, or no answer (``unanswered``:
    the batch expired or was cancelled before the row ran)."""

    completion: Completion | None = None
    error: RequestError | None = None
    unanswered: str | None = None


class BatchDialect:
    """The batch API of one vendor. Subclasses build the requests and parse the answers."""

    name: ClassVar[str] = "base"
    max_requests: ClassVar[int] = 50_000
    max_bytes: ClassVar[int] = 200 * 1024 * 1024
    #: Whether the requests travel in an uploaded file (OpenAI, Azure) or inline (Anthropic, Gemini).
    uses_file: ClassVar[bool] = False

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self._headers: dict[str, str] = dict(getattr(provider, "_headers", {}))

    # the requests of one batch
    def line(self, custom_id: str, messages: list[Message], params: GenerationParams) -> bytes:
        """One row's entry of the batch, encoded (its size counts against ``max_bytes``)."""
        raise NotImplementedError

    def upload_request(self, lines: list[bytes], tag: str) -> HttpRequest | None:
        """The upload of the requests file, or None when the requests travel inline."""
        return None

    def parse_upload(self, response: HttpResponse) -> str:
        return str(self._json(response)["id"])

    def create_request(self, file_id: str | None, lines: list[bytes], tag: str) -> HttpRequest:
        raise NotImplementedError

    def parse_created(self, response: HttpResponse) -> str:
        return str(self._json(response)["id"])

    # finding a batch whose create call's answer was lost
    def list_request(self, cursor: str | None) -> HttpRequest:
        raise NotImplementedError

    def parse_list(self, response: HttpResponse) -> tuple[list[dict[str, Any]], str | None]:
        """The listed batches and the cursor of the next page (None: the last page)."""
        raise NotImplementedError

    def matches(self, item: dict[str, Any], record: dict[str, Any]) -> bool:
        """Whether a listed batch is the one ``record`` (an intent) was about to create."""
        raise NotImplementedError

    def batch_id(self, item: dict[str, Any]) -> str:
        return str(item["id"])

    # following a batch
    def retrieve_request(self, batch_id: str) -> HttpRequest:
        raise NotImplementedError

    def parse_status(self, response: HttpResponse) -> BatchStatus:
        raise NotImplementedError

    def cancel_request(self, batch_id: str) -> HttpRequest:
        raise NotImplementedError

    def download_requests(self, status: BatchStatus) -> list[HttpRequest]:
        """The downloads of a finished batch's answers (none when they came inline)."""
        return []

    def parse_results(self, status: BatchStatus, bodies: list[bytes]) -> dict[str, RowAnswer]:
        """Every row's outcome by ``custom_id``, from the downloaded bodies (or the status)."""
        raise NotImplementedError

    # helpers
    def _json(self, response: HttpResponse) -> Any:
        """The decoded body of a control call, or the provider's typed error for an error status."""
        self.provider.raise_for_redirect(response)
        if response.status >= 400:
            data = self.provider.json_or_none(response)
            raise self.provider._error(response, data)  # type: ignore[attr-defined]
        data = self.provider.parse_json(response)
        if not isinstance(data, dict):
            raise MalformedResponseError(
                f"the batch API answered {type(data).__name__}, not a JSON object",
                status_code=response.status,
            )
        return data

    def _row(self, status: int, body: Any) -> RowAnswer:
        """One row's answer, parsed exactly as a realtime answer would be."""
        response = HttpResponse(status, {"content-type": "application/json"}, dumps(body))
        try:
            return RowAnswer(completion=self.provider.parse_response(response))
        except RequestError as error:
            return RowAnswer(error=error)

    def _body(self, messages: list[Message], params: GenerationParams) -> dict[str, Any]:
        body = loads(self.provider.build_request(messages, params).body)
        assert isinstance(body, dict)
        return body


def _object(data: Any, name: str) -> dict[str, Any]:
    """``data[name]`` when it is a JSON object, else an empty one: odd answers must not crash a poll.

    >>> _object({"counts": {"total": 3}}, "counts"), _object({"counts": 3}, "counts")
    ({'total': 3}, {})
    """
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def _jsonl(body: bytes) -> list[dict[str, Any]]:
    lines = []
    for raw in body.splitlines():
        if raw.strip():
            item = loads(raw)
            if isinstance(item, dict):
                lines.append(item)
    return lines


def _multipart(lines: list[bytes], filename: str) -> tuple[bytes, str]:
    """A multipart/form-data body with ``purpose=batch`` and the JSONL file."""
    boundary = "gen-ai-frames-batch-boundary-7f3e9a"
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="{filename}"\r\n'
        "content-type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + b"\n".join(lines) + b"\n" + tail, f"multipart/form-data; boundary={boundary}"


class OpenAIBatches(BatchDialect):
    """OpenAI's ``/v1/files`` + ``/v1/batches``; the batch carries ``metadata.gen_ai_frames_tag``."""

    name = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024
    uses_file = True

    def _url(self, path: str) -> str:
        return join_url(self.provider.endpoint, path)

    def _control_headers(self, content_type: str | None = "application/json") -> dict[str, str]:
        headers = {k: v for k, v in self._headers.items() if k != "content-type"}
        if content_type:
            headers["content-type"] = content_type
        return headers

    @property
    def _request_path(self) -> str:
        return (
            "/v1/chat/completions" if getattr(self.provider, "api", "chat") == "chat" else "/v1/completions"
        )

    def line(self, custom_id: str, messages: list[Message], params: GenerationParams) -> bytes:
        body = self._body(messages, params)
        return dumps({"custom_id": custom_id, "method": "POST", "url": self._request_path, "body": body})

    def upload_request(self, lines: list[bytes], tag: str) -> HttpRequest | None:
        body, content_type = _multipart(lines, f"{tag}.jsonl")
        return HttpRequest("POST", self._url("files"), self._control_headers(content_type), body)

    def create_request(self, file_id: str | None, lines: list[bytes], tag: str) -> HttpRequest:
        body = {
            "input_file_id": file_id,
            "endpoint": self._request_path,
            "completion_window": "24h",
            "metadata": {"gen_ai_frames_tag": tag},
        }
        return HttpRequest("POST", self._url("batches"), self._control_headers(), dumps(body))

    def list_request(self, cursor: str | None) -> HttpRequest:
        query = "limit=100" + (f"&after={quote(cursor, safe='')}" if cursor else "")
        return HttpRequest("GET", self._url("batches") + "?" + query, self._control_headers(None))

    def parse_list(self, response: HttpResponse) -> tuple[list[dict[str, Any]], str | None]:
        data = self._json(response)
        items = [item for item in data.get("data") or [] if isinstance(item, dict)]
        cursor = data.get("last_id") if data.get("has_more") and items else None
        return items, cursor if isinstance(cursor, str) else None

    def matches(self, item: dict[str, Any], record: dict[str, Any]) -> bool:
        metadata = _object(item, "metadata")
        return bool(
            (record.get("file_id") and item.get("input_file_id") == record["file_id"])
            or metadata.get("gen_ai_frames_tag") == record["tag"]
        )

    def retrieve_request(self, batch_id: str) -> HttpRequest:
        return HttpRequest(
            "GET", self._url(f"batches/{quote(batch_id, safe='')}"), self._control_headers(None)
        )

    def cancel_request(self, batch_id: str) -> HttpRequest:
        url = self._url(f"batches/{quote(batch_id, safe='')}/cancel")
        return HttpRequest("POST", url, self._control_headers(), b"{}")

    def parse_status(self, response: HttpResponse) -> BatchStatus:
        data = self._json(response)
        counts = _object(data, "request_counts")
        errors = _object(data, "errors")
        messages = [e.get("message") for e in errors.get("data") or [] if isinstance(e, dict)]
        return BatchStatus(
            state=str(data.get("status")),
            total=int(counts.get("total") or 0),
            done=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            output=data.get("output_file_id"),
            errors=data.get("error_file_id"),
            message="; ".join(str(m) for m in messages if m) or None,
            raw=data,
        )

    def download_requests(self, status: BatchStatus) -> list[HttpRequest]:
        return [
            HttpRequest(
                "GET", self._url(f"files/{quote(file, safe='')}/content"), self._control_headers(None)
            )
            for file in (status.output, status.errors)
            if file
        ]

    def parse_results(self, status: BatchStatus, bodies: list[bytes]) -> dict[str, RowAnswer]:
        answers: dict[str, RowAnswer] = {}
        for body in bodies:
            for item in _jsonl(body):
                custom_id = item.get("custom_id")
                if not isinstance(custom_id, str):
                    continue
                response, error = item.get("response"), item.get("error")
                if isinstance(response, dict) and response.get("body") is not None:
                    answers[custom_id] = self._row(int(response.get("status_code") or 200), response["body"])
                elif isinstance(error, dict):
                    code = str(error.get("code") or "")
                    if code in ("batch_expired", "batch_cancelled"):
                        answers[custom_id] = RowAnswer(unanswered=code.removeprefix("batch_"))
                    else:
                        answers[custom_id] = self._row(400, {"error": error})
        return answers


class AzureBatches(OpenAIBatches):
    """Azure OpenAI global batch: OpenAI's API under ``/openai`` with ``api-version``."""

    name = "azure"
    max_requests = 100_000
    max_bytes = 200 * 1024 * 1024

    def _url(self, path: str) -> str:
        version = quote(getattr(self.provider, "api_version", "2024-10-21"), safe="")
        return join_url(self.provider.endpoint, f"openai/{path}", f"api-version={version}")

    @property
    def _request_path(self) -> str:
        return "/chat/completions" if getattr(self.provider, "api", "chat") == "chat" else "/completions"

    def list_request(self, cursor: str | None) -> HttpRequest:
        url = self._url("batches") + "&limit=100" + (f"&after={quote(cursor, safe='')}" if cursor else "")
        return HttpRequest("GET", url, self._control_headers(None))


class AnthropicBatches(BatchDialect):
    """Anthropic Message Batches: the requests inline, the answers at ``results_url``.

    A batch has no metadata, so a batch whose create call's answer was lost is found by what the
    intent recorded: created at or after the intent (less a minute of clock skew), with the
    intent's number of requests, and claimed by no other record.
    """

    name = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024

    def _url(self, path: str) -> str:
        return join_url(self.provider.endpoint, path)

    def line(self, custom_id: str, messages: list[Message], params: GenerationParams) -> bytes:
        return dumps({"custom_id": custom_id, "params": self._body(messages, params)})

    def create_request(self, file_id: str | None, lines: list[bytes], tag: str) -> HttpRequest:
        body = b'{"requests":[' + b",".join(lines) + b"]}"
        return HttpRequest("POST", self._url("messages/batches"), self._headers, body)

    def list_request(self, cursor: str | None) -> HttpRequest:
        query = "limit=100" + (f"&after_id={quote(cursor, safe='')}" if cursor else "")
        return HttpRequest("GET", self._url("messages/batches") + "?" + query, self._headers)

    def parse_list(self, response: HttpResponse) -> tuple[list[dict[str, Any]], str | None]:
        data = self._json(response)
        items = [item for item in data.get("data") or [] if isinstance(item, dict)]
        cursor = data.get("last_id") if data.get("has_more") and items else None
        return items, cursor if isinstance(cursor, str) else None

    def matches(self, item: dict[str, Any], record: dict[str, Any]) -> bool:
        counts = _object(item, "request_counts")
        total = sum(int(v or 0) for v in counts.values())
        try:
            created = datetime.fromisoformat(str(item.get("created_at")).replace("Z", "+00:00")).timestamp()
        except ValueError:
            return False
        return total == record["requests"] and created >= record["intent_at"] - 60

    def retrieve_request(self, batch_id: str) -> HttpRequest:
        return HttpRequest("GET", self._url(f"messages/batches/{quote(batch_id, safe='')}"), self._headers)

    def cancel_request(self, batch_id: str) -> HttpRequest:
        url = self._url(f"messages/batches/{quote(batch_id, safe='')}/cancel")
        return HttpRequest("POST", url, self._headers, b"")

    def parse_status(self, response: HttpResponse) -> BatchStatus:
        data = self._json(response)
        counts = _object(data, "request_counts")
        processing = str(data.get("processing_status"))
        failed = int(counts.get("errored") or 0)
        stopped = int(counts.get("canceled") or 0) + int(counts.get("expired") or 0)
        if processing == "ended":
            state = "completed" if not stopped else ("expired" if counts.get("expired") else "cancelled")
        else:
            state = {"in_progress": "in_progress", "canceling": "cancelling"}.get(processing, processing)
        return BatchStatus(
            state=state,
            total=sum(int(v or 0) for v in counts.values()),
            done=int(counts.get("succeeded") or 0),
            failed=failed,
            output=data.get("results_url"),
            raw=data,
        )

    def download_requests(self, status: BatchStatus) -> list[HttpRequest]:
        if not status.output:
            return []
        url = status.output
        if not urlsplit(url).scheme:  # a relative URL: under the endpoint
            url = join_url(self.provider.endpoint, url.lstrip("/").removeprefix("v1/"))
        return [HttpRequest("GET", url, self._headers)]

    def parse_results(self, status: BatchStatus, bodies: list[bytes]) -> dict[str, RowAnswer]:
        answers: dict[str, RowAnswer] = {}
        for body in bodies:
            for item in _jsonl(body):
                custom_id, result = item.get("custom_id"), item.get("result")
                if not isinstance(custom_id, str) or not isinstance(result, dict):
                    continue
                kind = result.get("type")
                if kind == "succeeded":
                    answers[custom_id] = self._row(200, result.get("message"))
                elif kind == "errored":
                    error = _object(result, "error")
                    inner = _object(error, "error") or error
                    status_code = 500 if inner.get("type") in ("api_error", "overloaded_error") else 400
                    answers[custom_id] = self._row(status_code, {"type": "error", "error": inner})
                elif kind in ("canceled", "expired"):
                    answers[custom_id] = RowAnswer(
                        unanswered="cancelled" if kind == "canceled" else "expired"
                    )
        return answers


class GeminiBatches(BatchDialect):
    """Gemini batch mode with inline requests (``metadata.key`` is the row's ``custom_id``); the
    batch's ``displayName`` is the intent's tag, so a lost create is found by listing."""

    name = "gemini"
    max_requests = 50_000
    #: Inline requests are limited to 20 MB in all; larger runs are split into several batches.
    max_bytes = 20 * 1000 * 1000

    _STATES: ClassVar[dict[str, str]] = {
        "BATCH_STATE_PENDING": "validating",
        "BATCH_STATE_RUNNING": "in_progress",
        "BATCH_STATE_SUCCEEDED": "completed",
        "BATCH_STATE_FAILED": "failed",
        "BATCH_STATE_CANCELLED": "cancelled",
        "BATCH_STATE_EXPIRED": "expired",
    }

    def _url(self, path: str) -> str:
        return join_url(self.provider.endpoint, path)

    def line(self, custom_id: str, messages: list[Message], params: GenerationParams) -> bytes:
        return dumps({"request": self._body(messages, params), "metadata": {"key": custom_id}})

    def create_request(self, file_id: str | None, lines: list[bytes], tag: str) -> HttpRequest:
        head = dumps({"display_name": tag})[:-1]  # '{"display_name":"..."' then the requests
        body = (
            b'{"batch":' + head + b',"input_config":{"requests":{"requests":[' + b",".join(lines) + b"]}}}}"
        )
        url = self.provider._url.replace(":generateContent", ":batchGenerateContent")  # type: ignore[attr-defined]
        return HttpRequest("POST", url, self._headers, body)

    def parse_created(self, response: HttpResponse) -> str:
        return str(self._json(response)["name"])

    def list_request(self, cursor: str | None) -> HttpRequest:
        query = "pageSize=100" + (f"&pageToken={quote(cursor, safe='')}" if cursor else "")
        return HttpRequest("GET", self._url("batches") + "?" + query, self._headers)

    def parse_list(self, response: HttpResponse) -> tuple[list[dict[str, Any]], str | None]:
        data = self._json(response)
        items = [
            item for item in data.get("operations") or data.get("batches") or [] if isinstance(item, dict)
        ]
        cursor = data.get("nextPageToken")
        return items, cursor if isinstance(cursor, str) and cursor else None

    def matches(self, item: dict[str, Any], record: dict[str, Any]) -> bool:
        metadata = _object(item, "metadata") or item
        return bool(metadata.get("displayName") == record["tag"])

    def batch_id(self, item: dict[str, Any]) -> str:
        return str(item["name"])

    def retrieve_request(self, batch_id: str) -> HttpRequest:
        return HttpRequest("GET", self._url(quote(batch_id, safe="/")), self._headers)

    def cancel_request(self, batch_id: str) -> HttpRequest:
        return HttpRequest("POST", self._url(quote(batch_id, safe="/") + ":cancel"), self._headers, b"{}")

    def parse_status(self, response: HttpResponse) -> BatchStatus:
        data = self._json(response)
        metadata = _object(data, "metadata")
        stats = _object(metadata, "batchStats")
        state = self._STATES.get(str(metadata.get("state")), str(metadata.get("state")).lower())
        return BatchStatus(
            state=state,
            total=int(stats.get("requestCount") or 0),
            done=int(stats.get("successfulRequestCount") or 0),
            failed=int(stats.get("failedRequestCount") or 0),
            raw=data,
        )

    def parse_results(self, status: BatchStatus, bodies: list[bytes]) -> dict[str, RowAnswer]:
        data = status.raw
        output = (data.get("response") or {}).get("inlinedResponses") or (
            (data.get("metadata") or {}).get("output") or {}
        ).get("inlinedResponses")
        items = output.get("inlinedResponses") if isinstance(output, dict) else output
        answers: dict[str, RowAnswer] = {}
        for item in items or []:
            if not isinstance(item, dict):
                continue
            key = (item.get("metadata") or {}).get("key")
            if not isinstance(key, str):
                continue
            if isinstance(item.get("response"), dict):
                answers[key] = self._row(200, item["response"])
            elif isinstance(item.get("error"), dict):
                error = item["error"]
                code = error.get("code")
                status_code = code if isinstance(code, int) and 400 <= code < 600 else 400
                answers[key] = self._row(status_code, {"error": error})
        return answers


_DIALECTS: dict[str, type[BatchDialect]] = {
    "openai": OpenAIBatches,
    "azure": AzureBatches,
    "anthropic": AnthropicBatches,
    "gemini": GeminiBatches,
}


def batch_dialect(provider: Provider) -> BatchDialect:
    """The batch API of ``provider``; a ConfigurationError, before anything is sent, for a provider
    without one (local servers, the embedded model, the OpenAI-compatible presets).

    >>> from gen_ai_frames.providers.openai import OpenAIProvider
    >>> batch_dialect(OpenAIProvider(api_key="k", endpoint="https://api.openai.com/v1", model_name="m")).name
    'openai'
    """
    dialect = _DIALECTS.get(provider.name)
    # A preset (Groq, Together, ...) is an OpenAIProvider subclass with its own name: no batch API.
    if dialect is None:
        raise ConfigurationError(
            f"provider {provider.name!r} has no batch API that gen-ai-frames supports: mode='batch' works "
            f"with {', '.join(sorted(_DIALECTS))}; use mode='realtime' (the default) for this provider"
        )
    return dialect(provider)


def json_text(value: Any) -> str:
    """Compact JSON, for the batch records."""
    return json.dumps(value, separators=(",", ":"))
