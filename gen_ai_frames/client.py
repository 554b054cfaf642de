"""The client: the batch processing API over the async engine.

Every sync method is a thin bridge over its async twin (``generate_batch_response`` over
``agenerate_batch_response``) and works inside a running event loop, e.g. in a Jupyter cell.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, overload

from ._sync import run_sync
from .engine import Engine, Result, validate_rate_limit_timeout
from .errors import ConfigurationError, FailedPromptsWarning, InvalidPromptError
from .params import GenerationParams, Message, validate_positive_int
from .providers.base import Provider, redact_url
from .ratelimit import RateLimiter
from .retry import RetryPolicy
from .transport import Transport

__all__ = ["Client", "check_prompt", "prompt_list"]


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
        RateLimiter(requests_per_minute, tokens_per_minute)  # validates both
        validate_rate_limit_timeout(rate_limit_timeout)
        #: Default rate limits of every run of this client; each call may override them.
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        #: Seconds a run may be rate limited without a single answer before waiting rows fail.
        self.rate_limit_timeout = rate_limit_timeout

    def __repr__(self) -> str:
        return (f"Client(provider={self.provider.name!r}, model_name={self.provider.model_name!r}, "
                f"endpoint={redact_url(self.provider.endpoint)!r})")

    @property
    def model_name(self) -> str:
        return self.provider.model_name

    def fingerprint(self) -> dict[str, Any]:
        """Provider, endpoint and model: what checkpoints compare before resuming."""
        return self.provider.fingerprint()

    @asynccontextmanager
    async def engine(self, *, max_concurrent: int = 5, max_retries: int | None = None,
                     requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                     rate_limit_timeout: float | None = None,
                     on_status: Callable[[str | None], None] | None = None) -> AsyncIterator[Engine]:
        """An engine with a fresh transport, closed on exit. The accessor streams through it.

        Rate limits and ``rate_limit_timeout`` left at None fall back to the client's.

        >>> async with client.engine(max_concurrent=64) as engine:  # doctest: +SKIP
        ...     results = await engine.run([[{"role": "user", "content": "Hi"}]], GenerationParams())
        """
        validate_positive_int("max_concurrent", max_concurrent)
        if self.provider.max_parallel is not None:
            max_concurrent = min(max_concurrent, self.provider.max_parallel)
        retry = self.retry
        if max_retries is not None:
            validate_positive_int("max_retries", max_retries, minimum=0)
            retry = RetryPolicy(max_retries=max_retries, initial_delay=retry.initial_delay,
                                max_delay=retry.max_delay, jitter=retry.jitter,
                                max_retry_after=retry.max_retry_after)
        if requests_per_minute is None:
            requests_per_minute = self.requests_per_minute
        if tokens_per_minute is None:
            tokens_per_minute = self.tokens_per_minute
        if rate_limit_timeout is None:
            rate_limit_timeout = self.rate_limit_timeout
        RateLimiter(requests_per_minute, tokens_per_minute)  # validates before the transport opens
        validate_rate_limit_timeout(rate_limit_timeout)
        transport = self._transport_factory()
        try:
            yield Engine(self.provider, transport, max_concurrent=max_concurrent, retry=retry,
                         requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                         rate_limit_timeout=rate_limit_timeout, on_status=on_status)
        finally:
            await transport.aclose()

    # Batch -----------------------------------------------------------------------------------

    @overload
    def generate_batch_response(self, prompts: Sequence[str], max_tokens: int = ..., temperature: float = ...,
                                top_p: float = ..., timeout: float = ..., concurrent: bool = ...,
                                max_concurrent: int = ..., return_error: Literal[False] = ...,
                                **options: Any) -> list[str | None]: ...

    @overload
    def generate_batch_response(self, prompts: Sequence[str], max_tokens: int = ..., temperature: float = ...,
                                top_p: float = ..., timeout: float = ..., concurrent: bool = ...,
                                max_concurrent: int = ..., *, return_error: Literal[True],
                                **options: Any) -> tuple[list[str | None], list[dict[str, Any] | None]]: ...

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
        *,
        system_prompt: str | None = None,
        max_retries: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> Any:
        """Answer many prompts concurrently; results come back in the order of ``prompts``.

        A failed prompt gives ``None`` and one warning sums up the failures; with
        ``return_error=True`` the call returns ``(responses, errors)`` where ``errors[i]`` is None on
        success, else a dict with ``message``, ``suggestion``, ``type``, ``status_code``,
        ``retryable``, ``attempts`` and ``sent``.

        >>> responses, errors = client.generate_batch_response(["Hi", ""], return_error=True)  # doctest: +SKIP
        >>> errors[1]["type"]  # doctest: +SKIP
        'InvalidPromptError'
        """
        results = run_sync(self._batch(prompts, max_tokens, temperature, top_p, timeout, concurrent,
                                       max_concurrent, system_prompt, max_retries, requests_per_minute,
                                       tokens_per_minute))
        return _batch_output(results, return_error)

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
        *,
        system_prompt: str | None = None,
        max_retries: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
    ) -> Any:
        """Async twin of :meth:`generate_batch_response`.

        >>> responses = await client.agenerate_batch_response(["Hi"])  # doctest: +SKIP
        """
        results = await self._batch(prompts, max_tokens, temperature, top_p, timeout, concurrent,
                                    max_concurrent, system_prompt, max_retries, requests_per_minute,
                                    tokens_per_minute)
        return _batch_output(results, return_error)

    async def _batch(self, prompts: Sequence[str], max_tokens: int, temperature: float, top_p: float,
                     timeout: float, concurrent: bool, max_concurrent: int, system_prompt: str | None,
                     max_retries: int | None, requests_per_minute: float | None,
                     tokens_per_minute: float | None) -> list[Result]:
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  timeout=timeout, system_prompt=system_prompt)
        validate_positive_int("max_concurrent", max_concurrent)
        items = prompt_list(prompts)
        results: list[Result | None] = [None] * len(items)
        to_send: list[tuple[int, list[Message]]] = []
        for i, prompt in enumerate(items):
            problem = check_prompt(prompt)
            if problem is None:
                to_send.append((i, [{"role": "user", "content": prompt}]))
            else:
                results[i] = Result(error=problem)
        if to_send:
            async with self.engine(max_concurrent=max_concurrent if concurrent else 1, max_retries=max_retries,
                                   requests_per_minute=requests_per_minute,
                                   tokens_per_minute=tokens_per_minute) as engine:
                async for i, result in engine.stream(to_send, params):
                    results[i] = result
        return results  # type: ignore[return-value]

    # One prompt ------------------------------------------------------------------------------

    def generate_response(self, prompt: str, max_tokens: int = 256, temperature: float = 0,
                          top_p: float = 1.0, timeout: float = 60, *, system_prompt: str | None = None,
                          max_retries: int | None = None) -> str:
        """Answer one prompt; raises a :class:`~gen_ai_frames.errors.RequestError` subclass on failure.

        >>> client.generate_response("What is the capital of France?", max_tokens=20)  # doctest: +SKIP
        'Paris.'
        """
        return run_sync(self.agenerate_response(prompt, max_tokens, temperature, top_p, timeout,
                                                system_prompt=system_prompt, max_retries=max_retries))

    async def agenerate_response(self, prompt: str, max_tokens: int = 256, temperature: float = 0,
                                 top_p: float = 1.0, timeout: float = 60, *, system_prompt: str | None = None,
                                 max_retries: int | None = None) -> str:
        """Async twin of :meth:`generate_response`."""
        if not isinstance(prompt, str):
            raise ConfigurationError(f"prompt must be a string, got {type(prompt).__name__}")
        problem = check_prompt(prompt)
        if problem is not None:
            raise problem
        return await self.agenerate_chat_response([{"role": "user", "content": prompt}], max_tokens,
                                                  temperature, top_p, timeout, system_prompt=system_prompt,
                                                  max_retries=max_retries)

    def generate_chat_response(self, messages: list[Message], max_tokens: int = 256, temperature: float = 0,
                               top_p: float = 1.0, timeout: float = 60, *, system_prompt: str | None = None,
                               max_retries: int | None = None) -> str:
        """Answer one conversation given as chat messages.

        >>> client.generate_chat_response([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        'Hello!'
        """
        return run_sync(self.agenerate_chat_response(messages, max_tokens, temperature, top_p, timeout,
                                                     system_prompt=system_prompt, max_retries=max_retries))

    async def agenerate_chat_response(self, messages: list[Message], max_tokens: int = 256,
                                      temperature: float = 0, top_p: float = 1.0, timeout: float = 60, *,
                                      system_prompt: str | None = None, max_retries: int | None = None) -> str:
        """Async twin of :meth:`generate_chat_response`."""
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  timeout=timeout, system_prompt=system_prompt)
        _check_messages(messages)
        async with self.engine(max_concurrent=1, max_retries=max_retries) as engine:
            (result,) = await engine.run([messages], params)
        if result.error is not None:
            raise result.error
        assert result.text is not None
        return result.text


def prompt_list(prompts: object) -> list[Any]:
    """Check that ``prompts`` is a sequence of prompt texts (None/NaN allowed: they fail per item).

    >>> prompt_list("Hi")
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: prompts must be a list of strings, got one str: wrap it in a list, or call generate_response
    """
    if isinstance(prompts, (str, bytes)):
        raise ConfigurationError(f"prompts must be a list of strings, got one {type(prompts).__name__}: "
                                 "wrap it in a list, or call generate_response")
    if not isinstance(prompts, Iterable) or isinstance(prompts, dict):
        raise ConfigurationError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    items = list(prompts)
    for i, prompt in enumerate(items):
        if not (prompt is None or isinstance(prompt, str) or _is_missing(prompt)):
            raise ConfigurationError(
                f"prompts must be a list of strings: prompts[{i}] is {type(prompt).__name__} {_preview(prompt)}. "
                "Convert the prompts to text first, e.g. [str(p) for p in prompts]."
            )
    return items


def check_prompt(prompt: object) -> InvalidPromptError | None:
    """The per-item error for a prompt that must not be sent, or None if it is fine.

    >>> check_prompt("  ").message
    'the prompt is empty or only whitespace'
    """
    if isinstance(prompt, InvalidPromptError):  # a row already judged unsendable, e.g. by a template
        return prompt
    if prompt is None or _is_missing(prompt):
        return InvalidPromptError("the prompt is missing (None or NaN)", sent=False)
    if not isinstance(prompt, str):
        return InvalidPromptError(f"the prompt is {type(prompt).__name__} {_preview(prompt)}, not text",
                                  suggestion="Convert the column to text first, e.g. df[col].astype(str), "
                                             "or use a template.", sent=False)
    if not prompt.strip():
        return InvalidPromptError("the prompt is empty or only whitespace", sent=False)
    return None


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ConfigurationError(
            "messages must be a non-empty list of dicts like {'role': 'user', 'content': 'Hi'}"
        )


def _is_missing(value: object) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    # pandas.NA and NaT without importing pandas
    return type(value).__name__ in ("NAType", "NaTType")


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _batch_output(results: list[Result], return_error: bool) -> Any:
    responses = [result.text for result in results]
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
            f"First error: {failed[0].message} Pass return_error=True to get each error's message and suggestion.",
            FailedPromptsWarning,
            stacklevel=3,
        )
    return responses
