"""The async batch engine: keeps up to ``max_concurrent`` requests in flight, retries transient
failures, stops early when every request would fail the same way, and reports every item.

Workers pull from one shared iterator instead of one task per prompt: memory stays flat for a
million rows, and a caller can feed items lazily (the accessor feeds chunk after chunk without
letting concurrency drain at a chunk boundary).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidPromptError,
    RequestError,
)
from .params import GenerationParams, Message
from .providers.base import Provider, redact_url
from .retry import RetryPolicy, parse_retry_after
from .transport import HttpResponse, Transport, TransportError

__all__ = ["Engine", "Result"]

K = TypeVar("K")


@dataclass(slots=True)
class Result:
    """The outcome of one prompt: ``text`` on success, else ``error``."""

    text: str | None = None
    error: RequestError | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class _RunState:
    """What all workers of one run share: the early-stop cause and a run-wide pause after a 429."""

    __slots__ = ("fatal", "paused_until")

    def __init__(self) -> None:
        self.fatal: RequestError | None = None
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


class Engine:
    """Sends prompts through a provider and a transport.

    >>> engine = Engine(provider, transport, max_concurrent=64)  # doctest: +SKIP
    >>> results = await engine.run([[{"role": "user", "content": "Hi"}]], GenerationParams())  # doctest: +SKIP
    """

    def __init__(
        self,
        provider: Provider,
        transport: Transport,
        *,
        max_concurrent: int = 5,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.provider = provider
        self.transport = transport
        self.max_concurrent = max_concurrent
        self.retry = retry
        self._sleep = sleep
        #: The error that stopped the last run early (a bad key, an unknown model), if any.
        self.fatal: RequestError | None = None

    async def run(self, items: Iterable[list[Message]], params: GenerationParams) -> list[Result]:
        """Results for ``items`` in the same order."""
        results: list[Result | None] = []
        indexed = ((i, messages) for i, messages in enumerate(items))

        def keyed() -> Iterable[tuple[int, list[Message]]]:
            for i, messages in indexed:
                results.append(None)
                yield i, messages

        async for i, result in self.stream(keyed(), params):
            results[i] = result
        return results  # type: ignore[return-value]

    async def stream(
        self, items: Iterable[tuple[K, list[Message]]], params: GenerationParams
    ) -> AsyncIterator[tuple[K, Result]]:
        """Yield ``(key, result)`` for every item, in completion order.

        ``items`` is consumed lazily, at most ``max_concurrent`` ahead of the answers.
        """
        iterator = iter(items)
        state = _RunState()
        self.fatal = None
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done_marker = object()

        async def worker() -> None:
            for key, messages in iterator:
                if state.fatal is not None:
                    queue.put_nowait((key, Result(error=_not_sent(state.fatal))))
                    continue
                queue.put_nowait((key, await self._send(messages, params, state)))

        def finished(task: asyncio.Task[None]) -> None:
            queue.put_nowait(done_marker if task.cancelled() or task.exception() is None else task)

        workers = [asyncio.ensure_future(worker()) for _ in range(self.max_concurrent)]
        for task in workers:
            task.add_done_callback(finished)
        running = len(workers)
        try:
            while running:
                item = await queue.get()
                if item is done_marker:
                    running -= 1
                elif isinstance(item, asyncio.Task):
                    raise item.exception()  # a bug, not a failed request: never swallow it
                else:
                    yield item
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _send(self, messages: list[Message], params: GenerationParams, state: _RunState) -> Result:
        try:
            request = self.provider.build_request(messages, params)
        except (TypeError, ValueError) as err:  # e.g. a lone surrogate that cannot be encoded as JSON
            return Result(error=InvalidPromptError(f"the prompt cannot be sent: {err}", sent=False))
        started = time.monotonic()
        attempts = 0
        while True:
            wait = state.paused_until - time.monotonic()
            if wait > 0:
                await self._sleep(wait)
            if state.fatal is not None:
                return Result(error=_not_sent(state.fatal), attempts=attempts)
            attempts += 1
            response: HttpResponse | None = None
            try:
                async with asyncio.timeout(params.timeout):
                    response = await self.transport.send(request)
                completion = self.provider.parse_response(response)
            except TimeoutError:
                error: RequestError = APITimeoutError(
                    f"no answer from {redact_url(self.provider.endpoint)} within timeout={params.timeout:g} s"
                )
            except TransportError as err:
                error = self._connection_error(err)
            except RequestError as err:
                error = err
                if response is not None and error.retry_after is None:
                    error.retry_after = parse_retry_after(response.headers)
            else:
                return Result(
                    completion.text, None, completion.finish_reason, completion.prompt_tokens,
                    completion.completion_tokens, time.monotonic() - started, attempts,
                )
            error.attempts = attempts
            if error.retryable and attempts <= self.retry.max_retries:
                delay = self.retry.delay(attempts, error.retry_after)
                if error.status_code == 429 and error.retry_after:
                    # The server asked the whole client to wait, not just this request: the pause
                    # holds every worker at the top of the loop, this one included.
                    state.pause(delay)
                else:
                    await self._sleep(delay)
                continue
            if error.fatal and state.fatal is None:
                state.fatal = self.fatal = error
            return Result(error=error, latency_s=time.monotonic() - started, attempts=attempts)

    def _connection_error(self, err: TransportError) -> APIConnectionError:
        endpoint = redact_url(self.provider.endpoint)
        if err.kind == "refused":
            error = APIConnectionError(
                f"could not connect to {endpoint}: {err}",
                suggestion=f"Is the server running at {endpoint}? Start it, or fix `endpoint`.",
            )
            # Every request to a dead address fails alike: once retries are spent, stop the run.
            error.fatal = True
            return error
        if err.kind == "dns":
            error = APIConnectionError(f"could not resolve the host of {endpoint}", retryable=False,
                                       suggestion="Check the host name in `endpoint` and this machine's DNS.")
            error.fatal = True
            return error
        if err.kind == "tls":
            error = APIConnectionError(
                f"TLS to {endpoint} failed: {err}", retryable=False,
                suggestion="Pass `verify='path/to/ca-bundle.pem'` for a private CA, or fix the server certificate.",
            )
            error.fatal = True
            return error
        return APIConnectionError(f"request to {endpoint} failed: {err}")


def _not_sent(cause: RequestError) -> RequestError:
    """The error given to prompts that were not sent because the run stopped early: the cause's
    own type (an unsent row of a run with a bad key is an AuthenticationError too), marked unsent."""
    return type(cause)(
        f"not sent: the run stopped early because another request failed with {cause.type}: {cause.message}",
        suggestion=cause.suggestion, status_code=cause.status_code, retryable=False, sent=False,
    )
