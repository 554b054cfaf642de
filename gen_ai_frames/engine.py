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
    ConfigurationError,
    InvalidPromptError,
    NotSentError,
    RateLimitError,
    RequestError,
    SchemaValidationError,
)
from .params import GenerationParams, Message
from .pricing import estimate_tokens
from .providers.base import Provider, redact_url
from .ratelimit import Pace, RateLimiter, SharedLimits, current_shared_limits, validate_limits
from .retry import RetryPolicy, parse_retry_after
from .schema import SchemaMismatch
from .transport import HttpResponse, Transport, TransportError

__all__ = ["Engine", "Result"]

# What a model is told when its answer broke the schema (structured output's retry).
_SCHEMA_RETRY = (
    "That answer does not match the required JSON schema: {problem}. Answer again with only "
    "the JSON object, matching the schema exactly."
)

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
    #: Sum of the answer's token log-probabilities, when asked for (params.logprobs) and offered.
    logprob: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _RunState:
    """What all workers of one run share: the early-stop cause, the run-wide pause after a 429,
    the rate limiter the user set, the pace learned from the provider, and the progress of the run
    (answers received, since when it has been rate limited without one)."""

    __slots__ = (
        "fatal",
        "paused_until",
        "limiter",
        "pace",
        "clock",
        "on_status",
        "status",
        "answers",
        "limited_since",
        "_status_at",
        "shared",
    )

    def __init__(
        self,
        max_concurrent: int,
        limiter: RateLimiter | None,
        clock: Callable[[], float],
        on_status: Callable[[str | None], None] | None,
        shared: SharedLimits | None = None,
    ) -> None:
        self.fatal: RequestError | None = None
        #: Limits shared with other processes of the run (Dask): they pace, pause and stop it.
        self.shared = shared
        self.paused_until = 0.0
        self.limiter = limiter
        # A user who states the limit needs no slow start: the limiter spaces requests from the first.
        self.pace = Pace(max_concurrent, clock=clock, slow_start=limiter is None)
        self.clock = clock
        self.on_status = on_status
        self.status: str | None = None
        self.answers = 0
        #: When the run was first rate limited since its last answer (None: not rate limited).
        self.limited_since: float | None = None
        self._status_at = float("-inf")

    def pause(self, seconds: float, reason: str) -> None:
        if self.shared is not None:
            self.shared.pause(seconds, reason)  # every process of the run waits, not just this one
        until = self.clock() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.set_status(
                f"{reason}, waiting {seconds:.1f} s" if seconds < 10 else f"{reason}, waiting {seconds:.0f} s"
            )

    def answered(self) -> None:
        self.answers += 1
        self.limited_since = None
        self.pace.on_answer()
        # The pace creeps up with every answer: refresh its text at most once a second.
        if self.pace.rate is not None and self.clock() - self._status_at >= 1.0:
            self.show_pace()

    def show_pace(self) -> None:
        if self.paused_until <= self.clock():
            self._status_at = self.clock()
            self.set_status(self.pace.status)

    def set_status(self, status: str | None) -> None:
        if status != self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)


class Engine:
    """Sends prompts through a provider and a transport.

    ``requests_per_minute`` / ``tokens_per_minute`` cap the run's rate (tokens estimated from the
    prompt length plus ``max_tokens``, corrected by reported usage). Without them the run paces
    itself to the limits the provider states in its rate-limit headers, else to the rate its 429s
    allow (see :class:`~gen_ai_frames.ratelimit.Pace`). A 429 with Retry-After, or rate-limit
    headers at zero, pause every request of the run. A 429 does not use up a row's ``max_retries``:
    the row waits its turn, until ``rate_limit_timeout`` seconds pass without a single answer. Any
    wait the server asks for longer than ``retry.max_retry_after`` stops the run with a message.
    ``on_status`` hears about pauses and the pace (the progress bar shows them).

    >>> engine = Engine(provider, transport, max_concurrent=64)  # doctest: +SKIP
    >>> messages = [[{"role": "user", "content": "Hi"}]]
    >>> results = await engine.run(messages, GenerationParams())  # doctest: +SKIP
    """

    def __init__(
        self,
        provider: Provider,
        transport: Transport,
        *,
        max_concurrent: int = 5,
        retry: RetryPolicy = RetryPolicy(),
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        rate_limit_timeout: float = 600.0,
        on_status: Callable[[str | None], None] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLimits | None = None,
    ) -> None:
        validate_limits(rate_limit_timeout=rate_limit_timeout)
        #: Limits shared with other processes (see :class:`~gen_ai_frames.ratelimit.SharedLimits`);
        #: None: those set by ``sharing_limits`` around the run, if any.
        self.shared = shared
        self.provider = provider
        self.rate_limit_timeout = rate_limit_timeout
        self.transport = transport
        self.max_concurrent = max_concurrent
        self.retry = retry
        self.on_status = on_status
        self._sleep = sleep
        self._clock = clock
        self._limiter = (
            RateLimiter(requests_per_minute, tokens_per_minute, clock=clock)
            if requests_per_minute or tokens_per_minute
            else None
        )
        #: The error that stopped the last run early (a bad key, an unknown model), if any.
        self.fatal: RequestError | None = None
        #: ``(key, result)`` pairs of the last :meth:`stream` that arrived but were never yielded.
        self.unconsumed: list[Any] = []
        self._state: _RunState | None = None

    async def run(self, items: Iterable[list[Message]], params: GenerationParams) -> list[Result]:
        """Results for ``items`` in the same order."""
        results: list[Result | None] = []

        def keyed() -> Iterable[tuple[int, list[Message]]]:
            for i, messages in enumerate(items):
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
        if self._limiter is not None:  # a fresh schedule per run: no slots booked by an earlier run
            self._limiter = RateLimiter(
                self._limiter.requests_per_minute, self._limiter.tokens_per_minute, clock=self._clock
            )
        shared = self.shared if self.shared is not None else current_shared_limits()
        state = self._state = _RunState(
            self.max_concurrent, self._limiter, self._clock, self.on_status, shared
        )
        if shared is not None:
            shared.attach(state.pace)
        self.fatal = None
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done_marker = object()

        async def worker() -> None:
            for key, messages in iterator:
                if state.fatal is not None:
                    queue.put_nowait((key, Result(error=_not_sent(state.fatal))))
                    continue
                queue.put_nowait((key, await self._answer(messages, params, state)))

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
                    failure = item.exception()
                    assert failure is not None  # only a failed worker puts itself on the queue
                    raise failure  # a bug, not a failed request: never swallow it
                else:
                    yield item
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if shared is not None:
                await shared.close()
            state.set_status(None)  # the run is over: nothing left to show
            # Answers that arrived but were not consumed (the caller stopped early, e.g. Ctrl-C):
            # kept, so the caller can still save what was paid for.
            self.unconsumed = [queue.get_nowait() for _ in range(queue.qsize())]
            self.unconsumed = [item for item in self.unconsumed if isinstance(item, tuple)]

    @property
    def rate_limits(self) -> dict[str, float]:
        """The per-minute limits the provider stated in its headers during the last run, by kind
        (``"requests"``, ``"tokens"``, ...); empty before a run or when it stated none. A new dict on
        every read: changing it changes nothing in the engine.

        >>> Engine(provider, transport).rate_limits  # doctest: +SKIP
        {}
        """
        if self._state is None:
            return {}
        return {kind: budget.limit for kind, budget in self._state.pace.budgets.items()}

    def stop(self, reason: NotSentError) -> None:
        """Stop sending (e.g. a budget is spent): requests in flight finish, the rest get ``reason``."""
        if self._state is not None and self._state.fatal is None:
            self._state.fatal = reason

    async def _wait_while_paused(self, state: _RunState) -> None:
        if state.shared is not None and state.shared.paused_until > state.paused_until:
            state.paused_until = state.shared.paused_until  # a pause another process was asked for
        # A loop, not one sleep: another 429 may extend the pause while this worker waits.
        if state.paused_until <= self._clock():
            return
        while (wait := state.paused_until - self._clock()) > 0:
            await self._sleep(wait)
        state.show_pace()

    #: A row refused this many times with 429 while other rows got answers is failed: it is
    #: likely larger than the provider's per-minute token limit and would wait forever.
    MAX_RATE_LIMITED_WHILE_OTHERS_PASS = 10

    async def _answer(self, messages: list[Message], params: GenerationParams, state: _RunState) -> Result:
        """:meth:`_send`, and with a schema, check the answer; ask again (showing the model its
        mistake) up to ``params.schema_retries`` times before the row fails with SchemaValidationError."""
        result = await self._send(messages, params, state)
        schema = params.schema
        if schema is None:
            return result
        spent = [0, 0, 0]  # prompt tokens, completion tokens and attempts of the answers asked again
        for retry in range(params.schema_retries + 1):
            if result.error is not None or result.text is None:
                break
            try:
                schema.validate(result.text)
                break
            except SchemaMismatch as mismatch:
                problem = str(mismatch)
            spent = [
                spent[0] + (result.prompt_tokens or 0),
                spent[1] + (result.completion_tokens or 0),
                spent[2] + result.attempts,
            ]
            if retry == params.schema_retries:
                cut = " (it was cut off at max_tokens)" if result.finish_reason == "length" else ""
                error = SchemaValidationError(f"the answer does not match the schema{cut}: {problem}")
                error.attempts = spent[2]
                return Result(
                    error=error,
                    finish_reason=result.finish_reason,
                    prompt_tokens=spent[0],
                    completion_tokens=spent[1],
                    latency_s=result.latency_s,
                    attempts=spent[2],
                )
            messages = [
                *messages,
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": _SCHEMA_RETRY.format(problem=problem)},
            ]
            result = await self._send(messages, params, state)
        # The row's usage and attempts include every answer it took, as they were all paid for.
        if result.prompt_tokens is not None:
            result.prompt_tokens += spent[0]
        if result.completion_tokens is not None:
            result.completion_tokens += spent[1]
        if result.error is None:
            result.attempts += spent[2]
        return result

    async def _send(self, messages: list[Message], params: GenerationParams, state: _RunState) -> Result:
        try:
            request = self.provider.build_request(messages, params)
        except ConfigurationError:
            raise  # a setting the provider cannot take (e.g. Anthropic's temperature > 1): fail the call
        except (TypeError, ValueError) as err:  # e.g. a lone surrogate that cannot be encoded as JSON
            return Result(error=InvalidPromptError(f"the prompt cannot be sent: {err}", sent=False))
        # The same estimate as the cost preview (pricing.estimate_tokens), before the answer tells.
        texts = [params.system_prompt or "", *(m.get("content") or "" for m in messages)]
        prompt_tokens = estimate_tokens("".join(texts))
        estimated = prompt_tokens + params.max_tokens
        costs = {
            "requests": 1.0,
            "tokens": float(estimated),
            "input-tokens": float(prompt_tokens),
            "output-tokens": float(params.max_tokens),
        }
        pace = state.pace
        shared = state.shared
        started = self._clock()
        attempts = failures = rate_limited = refused_while_others_pass = 0
        answers_at_first_429: int | None = None
        while True:
            await self._wait_while_paused(state)
            await pace.acquire()
            outcome = "failed"  # what the shared limits hear of this slot: no response, so far
            paid = (0, 0)
            try:
                if shared is None:
                    generation = pace.generation
                    wait = pace.reserve(costs)
                    if state.limiter is not None:
                        wait = max(wait, state.limiter.reserve(estimated))
                else:  # the run's one pace, in another process: booked in batches
                    wait = await shared.reserve(costs)
                    generation = shared.generation
                if wait > 0:
                    await self._sleep(wait)
                # Checked even without a pace wait: a 429 may have paused the run while this request
                # waited for its concurrency slot (pace.acquire), after the check at the loop's top.
                paused_until, booked = state.paused_until, pace.generation
                if shared is not None:
                    paused_until, booked = max(paused_until, shared.paused_until), shared.generation
                if paused_until > self._clock() or booked != generation:
                    continue  # a 429 or new limits arrived while this request waited: book again
                if shared is not None and shared.stopped is not None and state.fatal is None:
                    state.fatal = shared.stopped  # the run's budget is spent
                if state.fatal is not None:
                    return Result(error=_not_sent(state.fatal), attempts=attempts)
                attempts += 1
                sent_at = self._clock()
                response: HttpResponse | None = None
                try:
                    async with asyncio.timeout(params.timeout):
                        response = await self.transport.send(request)
                    completion = self.provider.parse_response(response)
                except TimeoutError:
                    error: RequestError = APITimeoutError(
                        f"no answer from {redact_url(self.provider.endpoint)} within "
                        f"timeout={params.timeout:g} s"
                    )
                except TransportError as err:
                    error = self._connection_error(err)
                except RequestError as err:
                    error = err
                    if response is not None and error.retry_after is None:
                        error.retry_after = parse_retry_after(response.headers)
                    if response is not None:
                        outcome = "rate_limited" if error.status_code == 429 else "served"
                else:
                    outcome = "answered"
                    paid = (
                        completion.prompt_tokens if completion.prompt_tokens is not None else prompt_tokens,
                        completion.completion_tokens or 0,
                    )
                    state.answered()
                    if state.limiter is not None and completion.prompt_tokens is not None:
                        state.limiter.correct(
                            estimated, completion.prompt_tokens + (completion.completion_tokens or 0)
                        )
                    self._learn(response, state)
                    return Result(
                        completion.text,
                        None,
                        completion.finish_reason,
                        completion.prompt_tokens,
                        completion.completion_tokens,
                        self._clock() - started,
                        attempts,
                        completion.logprob,
                    )
            finally:
                pace.release()
                if shared is not None:
                    shared.settle(
                        outcome,
                        sent_at=sent_at if outcome == "rate_limited" else None,
                        key=id(messages),
                        prompt_tokens=paid[0],
                        completion_tokens=paid[1],
                        estimated=estimated,
                    )
            error.attempts = attempts
            if response is not None:
                if error.status_code != 429:
                    pace.on_answer()  # served, if not answered: it counts for the rate the server serves
                self._learn(response, state)
            cap = self.retry.max_retry_after
            if error.retryable and error.retry_after is not None and error.retry_after > cap:
                # Waiting hours for one row would hang the run; every other row would be told the same.
                message = (
                    f"{error.message} The server asked to wait {error.retry_after:.0f} s, "
                    f"more than max_retry_after={cap:g} s, so the run stopped."
                )
                error = _with_message(error, message, _LONG_WAIT_SUGGESTION)
                if state.fatal is None:  # stop sending; the rows come back failed, the call does not raise
                    state.fatal = _with_message(error, error.message, error.suggestion, sent=False)
                return Result(error=error, latency_s=self._clock() - started, attempts=attempts)
            if error.status_code == 429 and error.retryable:
                # Not a failure of the row: the run slows down and the row waits its turn.
                rate_limited += 1
                now = self._clock()
                pace.on_rate_limited(sent_at, key=id(messages))
                state.show_pace()
                if answers_at_first_429 is None:
                    answers_at_first_429 = state.answers
                elif state.answers > answers_at_first_429:
                    refused_while_others_pass += 1
                if state.limited_since is None:
                    state.limited_since = now
                if now - state.limited_since > self.rate_limit_timeout:
                    timed_out = _rate_limit_timeout(error, now - state.limited_since, self.rate_limit_timeout)
                    if state.fatal is None:  # the rows still waiting get it too, as not sent
                        state.fatal = timed_out
                    return Result(
                        error=_with_message(
                            timed_out, timed_out.message, timed_out.suggestion, sent=True, attempts=attempts
                        ),
                        latency_s=now - started,
                        attempts=attempts,
                    )
                if refused_while_others_pass >= self.MAX_RATE_LIMITED_WHILE_OTHERS_PASS:
                    error = _with_message(
                        error,
                        f"{error.message} Refused {rate_limited} times while other requests got "
                        "answers: this request may exceed the provider's per-minute token limit "
                        "on its own.",
                        "Shorten the prompt or lower max_tokens, or ask the provider for a higher "
                        "tokens-per-minute limit; set requests_per_minute / tokens_per_minute to pace "
                        "the run.",
                    )
                    return Result(error=error, latency_s=now - started, attempts=attempts)
                delay = self.retry.delay(rate_limited, error.retry_after)
                if error.retry_after:
                    # The server asked the whole client to wait, not just this request: the pause
                    # holds every worker at the top of the loop, this one included.
                    state.pause(delay, "rate limited")
                else:
                    await self._sleep(delay)
                continue
            failures += 1
            if error.retryable and failures <= self.retry.max_retries:
                delay = self.retry.delay(failures, error.retry_after)
                await self._sleep(delay)
                continue
            if error.fatal and state.fatal is None:
                state.fatal = self.fatal = error
            return Result(error=error, latency_s=self._clock() - started, attempts=attempts)

    def _learn(self, response: HttpResponse, state: _RunState) -> None:
        """Take the limits an answer states; wait for a used-up budget's reset, or stop the run
        when that reset is further away than ``max_retry_after``."""
        learned = state.pace.learn(response.headers)
        if state.shared is not None:
            state.shared.learn(response.headers)  # what one process learns paces the whole run
        state.show_pace()
        if learned is None:
            return
        seconds, header = learned
        cap = self.retry.max_retry_after
        if seconds > cap:
            if state.fatal is None:
                state.fatal = RateLimitError(
                    f"the provider's rate limit is used up and resets in {seconds:.0f} s ({header}), "
                    f"more than max_retry_after={cap:g} s, so the run stopped.",
                    suggestion=_LONG_WAIT_SUGGESTION,
                    status_code=response.status,
                    retryable=True,
                    sent=False,
                )
        elif seconds > 0:
            state.pause(seconds, "rate limit budget used up")

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
            error = APIConnectionError(
                f"could not resolve the host of {endpoint}",
                retryable=False,
                suggestion="Check the host name in `endpoint` and this machine's DNS.",
            )
            error.fatal = True
            return error
        if err.kind == "tls":
            error = APIConnectionError(
                f"TLS to {endpoint} failed: {err}",
                retryable=False,
                suggestion="Pass `verify='path/to/ca-bundle.pem'` for a private CA, or fix the server "
                "certificate.",
            )
            error.fatal = True
            return error
        return APIConnectionError(f"request to {endpoint} failed: {err}")


_LONG_WAIT_SUGGESTION = (
    "Run again once the provider's limit has reset (finished rows are kept), or allow longer waits "
    "with retry=RetryPolicy(max_retry_after=SECONDS)."
)


def _rate_limit_timeout(error: RequestError, waited: float, timeout: float) -> RateLimitError:
    return RateLimitError(
        f"rate limited for {waited:.0f} s without a single answer (rate_limit_timeout={timeout:g} s); "
        f"last answer: {error.message}",
        suggestion="Set requests_per_minute (and tokens_per_minute) to your plan's limits, wait for the "
        "provider's quota to reset, or raise rate_limit_timeout. Finished rows are kept.",
        status_code=429,
        retryable=True,
        sent=False,
    )


def _with_message(
    error: RequestError,
    message: str,
    suggestion: str,
    *,
    sent: bool | None = None,
    attempts: int | None = None,
) -> RequestError:
    """A copy of ``error`` (same type) with another message: errors are values shared by rows."""
    return type(error)(
        message,
        suggestion=suggestion,
        status_code=error.status_code,
        retryable=error.retryable,
        attempts=error.attempts if attempts is None else attempts,
        retry_after=error.retry_after,
        sent=error.sent if sent is None else sent,
    )


def _not_sent(cause: RequestError) -> RequestError:
    """The error given to prompts that were not sent because the run stopped early: the cause's
    own type (an unsent row of a run with a bad key is an AuthenticationError too), marked unsent."""
    if isinstance(cause, NotSentError):  # a deliberate stop: its message already explains
        return NotSentError(cause.message, suggestion=cause.suggestion, retryable=False, sent=False)
    if not cause.sent:  # a stop no request failed for (e.g. a rate limit that resets tomorrow)
        return type(cause)(
            cause.message,
            suggestion=cause.suggestion,
            status_code=cause.status_code,
            retryable=cause.retryable,
            sent=False,
        )
    return type(cause)(
        f"not sent: the run stopped early because another request failed with {cause.type}: {cause.message}",
        suggestion=cause.suggestion,
        status_code=cause.status_code,
        retryable=False,
        sent=False,
    )
