"""The client: the batch processing API over the async engine.

Every sync method is a thin bridge over its async twin (``generate_batch_response`` over
``agenerate_batch_response``) and works inside a running event loop, e.g. in a Jupyter cell.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, overload

from ._sync import run_sync
from .engine import Engine, Result
from .errors import ConfigurationError, FailedPromptsWarning, InvalidPromptError, NotSentError, RequestError
from .options import (
    CACHE_OPTIONS,
    ENGINE_OPTIONS,
    GENERATION_OPTIONS,
    RunOptions,
    split_options,
    takes_options,
)
from .params import Message, validate_positive_int
from .prompts import Prompts, check_prompt, prompt_list
from .providers.base import Provider, redact_url
from .ratelimit import validate_limits
from .retry import RetryPolicy
from .schema import Schema
from .transport import Transport

__all__ = ["Client"]

#: Run options the batch calls take besides their positional parameters.
BATCH_OPTIONS = (*GENERATION_OPTIONS, *ENGINE_OPTIONS, *CACHE_OPTIONS, "mode", "wait", "poll_interval")
#: Keyword options of the one-prompt calls.
SINGLE_OPTIONS = ("system_prompt", "max_retries")


class Client:
    """Sends prompts to one model of one provider. Build it with :func:`gen_ai_frames.create_client`.

    >>> client = create_client(provider="openai", endpoint="http://127.0.0.1:8000/v1",
    ...                        model_name="m")  # doctest: +SKIP
    >>> client.generate_batch_response(["Hi", "Bye"], max_tokens=20)  # doctest: +SKIP
    ['Hello!', 'Goodbye!']
    """

    def __init__(
        self,
        provider: Provider,
        transport_factory: Callable[[], Transport],
        *,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        rate_limit_timeout: float = 600.0,
    ) -> None:
        self.provider = provider
        self._transport_factory = transport_factory
        validate_positive_int("max_retries", max_retries, minimum=0)
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        validate_limits(requests_per_minute, tokens_per_minute, rate_limit_timeout)
        #: Default rate limits of every run of this client; each call may override them.
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        #: Seconds a run may be rate limited without a single answer before waiting rows fail.
        self.rate_limit_timeout = rate_limit_timeout

    def __repr__(self) -> str:
        return (
            f"Client(provider={self.provider.name!r}, model_name={self.provider.model_name!r}, "
            f"endpoint={redact_url(self.provider.endpoint)!r})"
        )

    @property
    def model_name(self) -> str:
        return self.provider.model_name

    def fingerprint(self) -> dict[str, Any]:
        """Provider, endpoint and model: what checkpoints compare before resuming."""
        return self.provider.fingerprint()

    @asynccontextmanager
    async def engine(
        self,
        *,
        max_concurrent: int = 5,
        max_retries: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        rate_limit_timeout: float | None = None,
        on_status: Callable[[str | None], None] | None = None,
    ) -> AsyncIterator[Engine]:
        """An engine with a fresh transport, closed on exit. The accessor streams through it.

        Rate limits and ``rate_limit_timeout`` left at None fall back to the client's.

        >>> async with client.engine(max_concurrent=64) as engine:  # doctest: +SKIP
        ...     results = await engine.run([[{"role": "user", "content": "Hi"}]], RunOptions().params)
        """
        validate_positive_int("max_concurrent", max_concurrent)
        if self.provider.max_parallel is not None:
            max_concurrent = min(max_concurrent, self.provider.max_parallel)
        retry = self.retry
        if max_retries is not None:
            validate_positive_int("max_retries", max_retries, minimum=0)
            retry = RetryPolicy(
                max_retries=max_retries,
                initial_delay=retry.initial_delay,
                max_delay=retry.max_delay,
                jitter=retry.jitter,
                max_retry_after=retry.max_retry_after,
            )
        if requests_per_minute is None:
            requests_per_minute = self.requests_per_minute
        if tokens_per_minute is None:
            tokens_per_minute = self.tokens_per_minute
        if rate_limit_timeout is None:
            rate_limit_timeout = self.rate_limit_timeout
        validate_limits(
            requests_per_minute, tokens_per_minute, rate_limit_timeout
        )  # before the transport opens
        transport = self._transport_factory()
        try:
            yield Engine(
                self.provider,
                transport,
                max_concurrent=max_concurrent,
                retry=retry,
                requests_per_minute=requests_per_minute,
                tokens_per_minute=tokens_per_minute,
                rate_limit_timeout=rate_limit_timeout,
                on_status=on_status,
            )
        finally:
            await transport.aclose()

    # Batch -----------------------------------------------------------------------------------

    @overload
    def generate_batch_response(
        self,
        prompts: Sequence[str],
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        timeout: float = ...,
        concurrent: bool = ...,
        max_concurrent: int = ...,
        return_error: Literal[False] = ...,
        **options: Any,
    ) -> list[str | None]: ...

    @overload
    def generate_batch_response(
        self,
        prompts: Sequence[str],
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: float = ...,
        timeout: float = ...,
        concurrent: bool = ...,
        max_concurrent: int = ...,
        *,
        return_error: Literal[True],
        **options: Any,
    ) -> tuple[list[str | None], list[dict[str, Any] | None]]: ...

    @takes_options(BATCH_OPTIONS, client_options=False)
    def generate_batch_response(
        self,
        prompts: Sequence[str],
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        concurrent: bool = True,
        max_concurrent: int = 5,
        return_error: bool = False,
        **options: Any,
    ) -> Any:
        """Answer many prompts concurrently; results come back in the order of ``prompts``.

        A failed prompt gives ``None`` and one warning sums up the failures; with
        ``return_error=True`` the call returns ``(responses, errors)`` where ``errors[i]`` is None on
        success, else a dict with ``message``, ``suggestion``, ``type``, ``status_code``,
        ``retryable``, ``attempts`` and ``sent``. With ``schema=`` (a pydantic model, a JSON Schema
        dict or ``"name, age int"``) each response is the parsed answer: a model instance for a
        pydantic schema, else a dict; an answer that breaks the schema is a per-row
        ``SchemaValidationError``. Keyword options: ``system_prompt`` and the limits
        of :class:`~gen_ai_frames.options.RunOptions` (``max_retries``, ``requests_per_minute``,
        ``tokens_per_minute``, ...); an unknown one is an error naming the closest valid one.

        >>> responses, errors = client.generate_batch_response(  # doctest: +SKIP
        ...     ["Hi", ""], return_error=True)
        >>> errors[1]["type"]  # doctest: +SKIP
        'InvalidPromptError'
        """
        run = _batch_options(
            "generate_batch_response",
            max_tokens,
            temperature,
            top_p,
            timeout,
            max_concurrent if concurrent else 1,
            options,
        )
        return _batch_output(run_sync(self._batch(prompts, run)), return_error, run.schema)

    @takes_options(BATCH_OPTIONS, client_options=False)
    async def agenerate_batch_response(
        self,
        prompts: Sequence[str],
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        concurrent: bool = True,
        max_concurrent: int = 5,
        return_error: bool = False,
        **options: Any,
    ) -> Any:
        """Async twin of :meth:`generate_batch_response`.

        >>> responses = await client.agenerate_batch_response(["Hi"])  # doctest: +SKIP
        """
        run = _batch_options(
            "agenerate_batch_response",
            max_tokens,
            temperature,
            top_p,
            timeout,
            max_concurrent if concurrent else 1,
            options,
        )
        return _batch_output(await self._batch(prompts, run), return_error, run.schema)

    async def _batch(self, prompts: Sequence[str], options: RunOptions) -> list[Result]:
        checked = Prompts.check(prompt_list(prompts))
        if options.mode == "batch":
            return await self._batch_rows(checked, options)
        results: list[Result | None] = [None] * len(checked)
        for i, problem in checked.failed.items():
            results[i] = Result(error=problem)
        from .cache import RunCache

        cache = await RunCache.for_run(self, options)
        try:
            sendable, keys = checked.sendable, {}
            if cache is not None:  # answered before, in any run: not sent again
                keys = {i: cache.keys.key(checked.texts[i]) for i in sendable}  # type: ignore[arg-type]
                hits = await cache.lookup(list(dict.fromkeys(keys.values())))
                for i in sendable:
                    if keys[i] in hits:
                        results[i] = hits[keys[i]].result()
                sendable = [i for i in sendable if results[i] is None]
            to_send = [(i, [{"role": "user", "content": checked.texts[i]}]) for i in sendable]
            if to_send:
                async with self.engine(**options.engine_limits) as engine:
                    async for i, result in engine.stream(to_send, options.params):  # type: ignore[arg-type]
                        results[i] = result
                        if cache is not None and result.error is None:
                            cache.put(keys[i], result)
        finally:
            if cache is not None:
                await cache.close()
        return results  # type: ignore[return-value]

    async def _batch_rows(self, checked: Prompts, options: RunOptions) -> list[Result]:
        """The rows' results through the provider's Batch API (:func:`~gen_ai_frames.runner.run_rows`),
        recorded in the default checkpoint of docs/batch.md: ``genai-batch-<hash>.ckpt`` in the
        current directory, so the same call made again finds its batches."""
        from .batch import default_checkpoint
        from .runner import run_rows

        options = options.replace(checkpoint=default_checkpoint(self, options, checked.texts))
        rows = await run_rows(checked, client=self, options=options.replace(progress=False))
        if rows.fatal is not None:
            raise rows.fatal
        columns = rows.columns
        results = []
        for i in range(len(checked)):
            error = None
            attempts = columns["attempts"][i] or 0
            if columns["error"][i] is not None:
                kind = _error_class(columns["error_type"][i])
                error = kind(
                    columns["error"][i],
                    suggestion=columns["error_suggestion"][i],
                    status_code=columns["status_code"][i],
                    attempts=attempts,
                    sent=not issubclass(kind, (NotSentError, InvalidPromptError)),
                )
            results.append(
                Result(
                    text=columns["response"][i],
                    error=error,
                    finish_reason=columns["finish_reason"][i],
                    prompt_tokens=columns["prompt_tokens"][i],
                    completion_tokens=columns["completion_tokens"][i],
                    attempts=attempts,
                )
            )
        return results

    # One prompt ------------------------------------------------------------------------------

    @takes_options(SINGLE_OPTIONS, client_options=False)
    def generate_response(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        **options: Any,
    ) -> str:
        """Answer one prompt; raises a :class:`~gen_ai_frames.errors.RequestError` subclass on failure.

        Keyword options: ``system_prompt`` and ``max_retries``.

        >>> client.generate_response("What is the capital of France?", max_tokens=20)  # doctest: +SKIP
        'Paris.'
        """
        return run_sync(self.agenerate_response(prompt, max_tokens, temperature, top_p, timeout, **options))

    @takes_options(SINGLE_OPTIONS, client_options=False)
    async def agenerate_response(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        **options: Any,
    ) -> str:
        """Async twin of :meth:`generate_response`."""
        if not isinstance(prompt, str):
            raise ConfigurationError(f"prompt must be a string, got {type(prompt).__name__}")
        problem = check_prompt(prompt)
        if problem is not None:
            raise problem
        return await self.agenerate_chat_response(
            [{"role": "user", "content": prompt}], max_tokens, temperature, top_p, timeout, **options
        )

    @takes_options(SINGLE_OPTIONS, client_options=False)
    def generate_chat_response(
        self,
        messages: list[Message],
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        **options: Any,
    ) -> str:
        """Answer one conversation given as chat messages. Keyword options as :meth:`generate_response`.

        >>> client.generate_chat_response([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        'Hello!'
        """
        return run_sync(
            self.agenerate_chat_response(messages, max_tokens, temperature, top_p, timeout, **options)
        )

    @takes_options(SINGLE_OPTIONS, client_options=False)
    async def agenerate_chat_response(
        self,
        messages: list[Message],
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        **options: Any,
    ) -> str:
        """Async twin of :meth:`generate_chat_response`."""
        run, _ = split_options(
            options,
            where="generate_response",
            accepted=SINGLE_OPTIONS,
            also=("prompt", "messages", "max_tokens", "temperature", "top_p", "timeout"),
        )
        run = run.replace(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, timeout=timeout, max_concurrent=1
        )
        _check_messages(messages)
        async with self.engine(**run.engine_limits) as engine:
            (result,) = await engine.run([messages], run.params)
        if result.error is not None:
            raise result.error
        assert result.text is not None
        return result.text


def _error_class(name: str | None) -> type[RequestError]:
    """The error class named ``name`` (from gen_ai_frames.errors), else RequestError."""
    from . import errors

    found = getattr(errors, name or "", None)
    return found if isinstance(found, type) and issubclass(found, RequestError) else RequestError


def _check_messages(messages: object) -> None:
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ConfigurationError(
            "messages must be a non-empty list of dicts like {'role': 'user', 'content': 'Hi'}"
        )


def _batch_output(results: list[Result], return_error: bool, schema: Schema | None) -> Any:
    responses: list[Any] = [result.text for result in results]
    if schema is not None:  # parsed values: model instances for a pydantic schema, dicts otherwise
        responses = [None if text is None else schema.instance(json.loads(text)) for text in responses]
    errors = [result.error for result in results]
    if return_error:
        return responses, [None if error is None else error.to_dict() for error in errors]
    failed = [error for error in errors if error is not None]
    if failed:
        fatal = next((error for error in failed if error.fatal and error.sent), None)
        if fatal is not None:
            raise fatal
        counts = Counter(error.type for error in failed)
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
        warnings.warn(
            f"{len(failed)} of {len(results)} prompts failed ({kinds}); their responses are None. "
            f"First error: {failed[0].message} Pass return_error=True to get each error's message and "
            "suggestion.",
            FailedPromptsWarning,
            stacklevel=3,
        )
    return responses


def _batch_options(
    where: str,
    max_tokens: int,
    temperature: float,
    top_p: float,
    timeout: float,
    max_concurrent: int,
    options: Mapping[str, Any],
) -> RunOptions:
    """The batch calls' positional parameters and keyword options as one checked RunOptions."""
    run, _ = split_options(
        options, where=where, accepted=BATCH_OPTIONS, also=("prompts", "concurrent", "return_error")
    )
    return run.replace(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        timeout=timeout,
        max_concurrent=max_concurrent,
    )
