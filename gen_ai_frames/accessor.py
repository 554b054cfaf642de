"""The ``df.genai`` accessor: a column of prompts (or a template over columns) in, answers out.

``import gen_ai_frames`` registers it.

>>> import pandas as pd, gen_ai_frames
>>> df = pd.DataFrame({"text": ["a cat", "a dog"]})
>>> out = df.genai.generate(template="Describe {text}.", provider="openai",
...                         endpoint="http://127.0.0.1:8000/v1", model_name="m")  # doctest: +SKIP
>>> list(out.columns)  # doctest: +SKIP
['text', 'response', 'error']
"""

from __future__ import annotations

import os
import string
from collections.abc import Hashable, Mapping
from typing import Any

import pandas as pd

from ._sync import run_sync
from .client import Client, check_prompt
from .errors import ConfigurationError, InvalidPromptError
from .factory import create_client
from .params import GenerationParams
from .pricing import Estimate, estimate_tokens, price_for
from .runner import DETAIL_COLUMNS, run_rows

__all__ = ["GenAIAccessor", "build_prompts", "check_client_choice"]

_CLIENT_OPTIONS = ("provider", "model_name", "api_key", "endpoint")


@pd.api.extensions.register_dataframe_accessor("genai")
class GenAIAccessor:
    """LLM generation over a DataFrame's rows. Keeps no state: pandas builds it anew on each access."""

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    def generate(
        self,
        column: Hashable | None = None,
        *,
        client: Client | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        response_column: str = "response",
        error_column: str = "error",
        chunk_size: int = 500,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = True,
        retry_errors: bool = False,
        dedupe: bool | None = None,
        progress: bool = True,
        details: bool = False,
        overwrite: bool = False,
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        max_concurrent: int = 5,
        max_retries: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_cost: float | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        **client_options: Any,
    ) -> pd.DataFrame:
        """Return a copy of the frame with a ``response`` and an ``error`` column.

        ``column`` holds the prompts, or ``template`` builds them from columns (``"Summarize: {text}"``).
        Without ``client``, ``provider``, ``model_name``, ``api_key`` and ``endpoint`` build one.
        ``checkpoint`` names a directory where answers are saved as they arrive; a later call with
        the same path resumes (``resume=False`` starts over, ``retry_errors=True`` resends failed rows).
        ``dedupe`` sends identical prompts once (default: when ``temperature`` is 0). ``details=True``
        adds error type, suggestion, status code, attempts, finish reason, token counts and latency.
        ``requests_per_minute`` / ``tokens_per_minute`` cap the run's rate; a 429 pauses the whole run
        for its Retry-After and the progress bar says so. ``max_cost`` (US dollars) stops sending once
        this run's spend reaches it, priced from ``prices`` (see :meth:`estimate`); unsent rows get
        a ``NotSentError`` and a later run with a higher budget continues from the checkpoint.

        >>> out = df.genai.generate(column="prompt", client=client, checkpoint="run.ckpt")  # doctest: +SKIP
        >>> out[out["error"].notna()]  # doctest: +SKIP
        """
        return run_sync(self.agenerate(
            column, client=client, template=template, system_prompt=system_prompt,
            response_column=response_column, error_column=error_column, chunk_size=chunk_size,
            checkpoint=checkpoint, resume=resume, retry_errors=retry_errors, dedupe=dedupe, progress=progress,
            details=details, overwrite=overwrite, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            timeout=timeout, max_concurrent=max_concurrent, max_retries=max_retries,
            requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, max_cost=max_cost,
            prices=prices, **client_options,
        ))

    async def agenerate(
        self,
        column: Hashable | None = None,
        *,
        client: Client | None = None,
        template: str | None = None,
        system_prompt: str | None = None,
        response_column: str = "response",
        error_column: str = "error",
        chunk_size: int = 500,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = True,
        retry_errors: bool = False,
        dedupe: bool | None = None,
        progress: bool = True,
        details: bool = False,
        overwrite: bool = False,
        max_tokens: int = 256,
        temperature: float = 0,
        top_p: float = 1.0,
        timeout: float = 60,
        max_concurrent: int = 5,
        max_retries: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        max_cost: float | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        **client_options: Any,
    ) -> pd.DataFrame:
        """Async twin of :meth:`generate`.

        >>> out = await df.genai.agenerate(column="prompt", client=client)  # doctest: +SKIP
        """
        df = self._df
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  timeout=timeout, system_prompt=system_prompt)
        new_columns = _output_names(response_column, error_column, details)
        clash = [name for name in new_columns.values() if name in df.columns]
        if clash and not overwrite:
            raise ConfigurationError(
                f"the frame already has column(s) {clash}: pass overwrite=True to replace them, "
                "or choose other names with response_column= / error_column="
            )
        prompts = build_prompts(df, column, template)
        client = _client(client, client_options)
        out = df.copy(deep=False)  # the caller's frame stays untouched
        results = await run_rows(
            prompts, client=client, params=params, max_concurrent=max_concurrent, max_retries=max_retries,
            requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
            max_cost=max_cost, prices=prices, chunk_size=chunk_size, checkpoint=checkpoint, resume=resume, retry_errors=retry_errors,
            dedupe=dedupe, progress=progress and len(df) > 0,
        )
        if results.fatal is not None:
            raise results.fatal
        for name, values in results.frame_columns(details).items():
            out[new_columns[name]] = values
        return out


    def estimate(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        model_name: str | None = None,
        provider: str | None = None,
        system_prompt: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0,
        dedupe: bool | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
    ) -> Estimate:
        """What a run would send and cost, without sending anything.

        Prompt tokens are estimated at about 4 characters a token (no tokenizer is needed); the
        completion budget assumes every answer uses all of ``max_tokens``, so the cost is an upper
        bound. Prices come from :data:`gen_ai_frames.pricing.DEFAULT_PRICES`, overridden by ``prices``
        (USD per million tokens, ``{"model": (input, output)}``).

        >>> df = pd.DataFrame({"prompt": ["What is 2 + 2?", "Name a colour.", "What is 2 + 2?"]})
        >>> estimate = df.genai.estimate(column="prompt", model_name="gpt-4o-mini", max_tokens=10)
        >>> estimate.requests, estimate.prompt_tokens, estimate.max_completion_tokens
        (2, 8, 20)
        """
        GenerationParams(max_tokens=max_tokens, temperature=temperature, system_prompt=system_prompt)
        if client is not None:
            model_name, provider = client.model_name, client.provider.name
        if model_name is None:
            raise ConfigurationError("estimate needs model_name= (or client=) to look up its price")
        prompts = [p for p in build_prompts(self._df, column, template) if check_prompt(p) is None]
        if dedupe is None:
            dedupe = temperature == 0
        sent = list(dict.fromkeys(prompts)) if dedupe else prompts
        system_tokens = estimate_tokens(system_prompt) if system_prompt else 0
        return Estimate(
            rows=len(self._df), requests=len(sent),
            prompt_tokens=sum(estimate_tokens(p) + system_tokens for p in sent),  # type: ignore[arg-type]
            max_completion_tokens=len(sent) * max_tokens,
            price=price_for(model_name, prices, provider), tokenizer="estimated at ~4 characters a token",
        )


def _output_names(response_column: str, error_column: str, details: bool) -> dict[str, str]:
    names = {"response": response_column, "error": error_column}
    if details:
        names.update({name: name for name in DETAIL_COLUMNS})
    if len(set(names.values())) != len(names):
        raise ConfigurationError(f"output column names must differ, got {sorted(names.values())}")
    return names


def check_client_choice(client: Client | None, options: dict[str, Any]) -> None:
    """Either a client from ``create_client`` or the options to build one, not both."""
    if client is None:
        return
    if options:
        raise ConfigurationError(
            f"pass either client= or client options ({', '.join(sorted(options))}), not both"
        )
    if not isinstance(client, Client):
        raise ConfigurationError(f"client must come from create_client(), got {type(client).__name__}")


def _client(client: Client | None, options: dict[str, Any]) -> Client:
    check_client_choice(client, options)
    return client if client is not None else create_client(**options)


def build_prompts(df: pd.DataFrame, column: Hashable | None, template: str | None) -> list[object]:
    """The prompt of every row: a column's values, or a template filled from each row.

    A row whose template field is missing gets an :class:`InvalidPromptError` in place of a prompt,
    which fails that row alone.

    >>> build_prompts(pd.DataFrame({"city": ["Paris", None]}), None, "Where is {city}?")[0]
    'Where is Paris?'
    """
    if (column is None) == (template is None):
        raise ConfigurationError("pass exactly one of column= (a column of prompts) or template= "
                                 "(e.g. 'Summarize: {text}')")
    if template is not None:
        return _fill_template(df, template)
    _check_columns(df, [column])
    return df[column].tolist()


def _fill_template(df: pd.DataFrame, template: str) -> list[object]:
    if not isinstance(template, str):
        raise ConfigurationError(f"template must be a string, got {type(template).__name__}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigurationError(
            f"template {template!r} is not a valid format string ({err}); write fields as {{column}} "
            "and literal braces as {{ and }}"
        ) from None
    if not fields:
        raise ConfigurationError(f"template {template!r} has no {{column}} field: every row would get the same prompt")
    names = []
    for name in fields:
        if name == "" or name.isdigit():
            raise ConfigurationError(f"template fields must name columns, like {{text}}; got {{{name}}}")
        names.append(name.split(".", 1)[0].split("[", 1)[0])
    names = list(dict.fromkeys(names))
    _check_columns(df, names)
    prompts: list[object] = []
    values = df[names].itertuples(index=False, name=None)
    for row in values:
        missing = [n for n, v in zip(names, row) if v is None or (pd.api.types.is_scalar(v) and pd.isna(v))]
        if missing:
            prompts.append(InvalidPromptError(f"template field(s) {missing} are missing in this row", sent=False,
                                              suggestion="Fill or drop the rows with missing values first."))
            continue
        try:
            prompts.append(template.format_map(dict(zip(names, row))))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            prompts.append(InvalidPromptError(f"template could not be filled for this row: {err!r}", sent=False))
    return prompts


def _check_columns(df: pd.DataFrame, names: list[Any]) -> None:
    for name in names:
        if name not in df.columns:
            raise ConfigurationError(
                f"column {name!r} not found; the frame has columns {list(map(str, df.columns))[:20]}"
            )
        count = int((df.columns == name).sum())
        if count > 1:
            raise ConfigurationError(f"column {name!r} appears {count} times: rename the duplicates first")
