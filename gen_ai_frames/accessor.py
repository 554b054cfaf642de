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

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import pandas as pd

from ._sync import run_sync
from .client import Client
from .frames import (
    ESTIMATE_OPTIONS,
    check_clash,
    classify_options,
    estimate_prompts,
    extract_options,
    plan_prompts,
    run_prompts,
)
from .options import RunOptions, split_run_and_client, takes_options
from .plan import DEFAULT_SAMPLE, Plan, empty_template_fields
from .pricing import Estimate
from .prompts import build_prompts
from .runner import RowResults

__all__ = ["GenAIAccessor"]

_ESTIMATE_OPTIONS = ESTIMATE_OPTIONS


@pd.api.extensions.register_dataframe_accessor("genai")
class GenAIAccessor:
    """LLM generation over a DataFrame's rows. Keeps no state: pandas builds it anew on each access."""

    def __init__(self, df: pd.DataFrame) -> None:
        self._df = df

    @takes_options()
    def generate(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Return a copy of the frame with a ``response`` and an ``error`` column.

        ``column`` holds the prompts, or ``template`` builds them from columns (``"Summarize: {text}"``).
        Without ``client``, ``provider``, ``model_name``, ``api_key`` and ``endpoint`` (and any other
        :func:`~gen_ai_frames.create_client` option) build one.

        Every other option is defined in :class:`gen_ai_frames.options.RunOptions` (the table in
        docs/dataframes.md). The main ones: ``checkpoint`` names a directory where answers are saved
        as they arrive; a later call with the same path resumes (``resume=False`` starts over,
        ``retry_errors=True`` resends failed rows). ``dedupe`` sends identical prompts once (default:
        when ``temperature`` is 0). ``details=True`` adds error type, suggestion, status code,
        attempts, finish reason, token counts and latency. ``requests_per_minute`` /
        ``tokens_per_minute`` cap the run's rate; a 429 pauses the whole run for its Retry-After and
        the progress bar says so. ``max_cost`` (US dollars) stops sending once this run's spend
        reaches it, priced from ``prices`` (see :meth:`estimate`); unsent rows get a
        ``NotSentError`` and a later run with a higher budget continues from the checkpoint.
        An unknown option is an error that names the closest valid one.

        >>> out = df.genai.generate(column="prompt", client=client, checkpoint="run.ckpt")  # doctest: +SKIP
        >>> out[out["error"].notna()]  # doctest: +SKIP
        """
        return run_sync(self.agenerate(column, template=template, client=client, **options))

    @takes_options()
    async def agenerate(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Async twin of :meth:`generate`.

        >>> out = await df.genai.agenerate(column="prompt", client=client)  # doctest: +SKIP
        """
        run, client_options = split_run_and_client(options, client, where="df.genai.generate")
        out, _ = await self._run(column, template, client, run, client_options)
        return out

    async def _run(
        self,
        column: Hashable | None,
        template: str | None,
        client: Client | None,
        run: RunOptions,
        client_options: dict[str, Any],
    ) -> tuple[pd.DataFrame, RowResults]:
        """The frame with the run's columns added, and the run's results."""
        df = self._df
        new_columns = check_clash(df.columns, run)
        prompts = build_prompts(df, column, template)
        out = df.copy(deep=False)  # the caller's frame stays untouched
        results = await run_prompts(prompts, client, run, client_options)
        for name, values in results.frame_columns(run).items():
            _set_column(out, new_columns[name], values)
        return out, results

    @takes_options(exclude=("schema", "logprobs"))
    def classify(
        self,
        column: Hashable | None = None,
        *,
        labels: Sequence[str],
        template: str | None = None,
        multi_label: bool = False,
        client: Client | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Label each row with one of ``labels`` (or several, with ``multi_label=True``).

        Adds a categorical ``label`` column whose categories are exactly ``labels`` (``labels``, a list
        column, with ``multi_label=True``), NA where the row failed, and a ``confidence`` column: the
        probability the model gave its answer, from token log-probabilities where the provider returns
        them (OpenAI-compatible servers, Gemini), else NA (Anthropic, the local model). The labels are
        sent as an enum of the structured-output schema, so the model cannot answer anything else.
        Other options are
        those of :meth:`generate` (``prefix=`` names the two columns apart).

        >>> out = df.genai.classify("review", labels=["positive", "negative", "mixed"],
        ...                         client=client)  # doctest: +SKIP
        >>> out["label"].cat.categories.tolist()  # doctest: +SKIP
        ['positive', 'negative', 'mixed']
        """
        return run_sync(
            self.aclassify(
                column, labels=labels, template=template, multi_label=multi_label, client=client, **options
            )
        )

    async def aclassify(
        self,
        column: Hashable | None = None,
        *,
        labels: Sequence[str],
        template: str | None = None,
        multi_label: bool = False,
        client: Client | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Async twin of :meth:`classify`."""
        run, client_options = classify_options(options, labels, multi_label, client, "df.genai.classify")
        out, _ = await self._run(column, template, client, run, client_options)
        return out

    @takes_options(exclude=("schema",))
    def extract(
        self,
        column: Hashable | None = None,
        *,
        fields: Mapping[str, Any],
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """Pull named fields out of each row's text into typed columns: sugar over ``schema=``.

        ``fields`` maps each field to a description (a string: the field is text) or a type (``str``,
        ``int``, ``float``, ``bool``, ``list[str]``), or a ``(type, description)`` pair. Descriptions
        go into the schema, so the model sees them. A field the text does not mention is NA.

        >>> out = df.genai.extract("bio", fields={"company": "the company named", "year": int},
        ...                        client=client)  # doctest: +SKIP
        """
        return self.generate(column, template=template, client=client, **extract_options(options, fields))

    @takes_options(_ESTIMATE_OPTIONS, client_options=False)
    def estimate(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        model_name: str | None = None,
        provider: str | None = None,
        **options: Any,
    ) -> Estimate:
        """What a run would send and cost, without sending anything.

        Takes the generation options of :meth:`generate` (``max_tokens``, ``system_prompt``,
        ``schema``, ...), ``dedupe`` and ``prices``; a schema's tokens count with every request. Prompt
        tokens are estimated at about 4 characters a token (no tokenizer is needed); the completion budget
        assumes every answer uses all of ``max_tokens``, so the cost is an upper bound. Prices come from
        :data:`gen_ai_frames.pricing.DEFAULT_PRICES`, overridden by ``prices`` (USD per million tokens,
        ``{"model": (input, output)}``).

        >>> df = pd.DataFrame({"prompt": ["What is 2 + 2?", "Name a colour.", "What is 2 + 2?"]})
        >>> estimate = df.genai.estimate(column="prompt", model_name="gpt-4o-mini", max_tokens=10)
        >>> estimate.requests, estimate.prompt_tokens, estimate.max_completion_tokens
        (2, 8, 20)
        """
        return estimate_prompts(
            build_prompts(self._df, column, template),
            options,
            where="df.genai.estimate",
            client=client,
            model_name=model_name,
            provider=provider,
        )

    @takes_options()
    def plan(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        sample: int = DEFAULT_SAMPLE,
        context_window: int | None = None,
        **options: Any,
    ) -> Plan:
        """What :meth:`generate` with the same arguments would send, cost and take, before it runs.

        Counts the rows, the requests really sent (after dedupe, checkpoint and cache hits) and shows
        example prompts; sends ``sample`` real requests (0: none) to measure tokens, latency, the
        provider's rate limits and answers cut by ``max_tokens``, then extrapolates cost and duration.
        A bad key or unknown model shows here after one request, and nothing else is sent. The sample's
        answers go to ``checkpoint`` (and the cache), so the run does not pay for them again.
        ``context_window`` (tokens) is the model's, for the warning on prompts too long for it (known
        models have one built in). ``print(plan)`` shows the report; a notebook shows it as HTML.

        >>> plan = df.genai.plan(column="prompt", client=client, checkpoint="run.ckpt")  # doctest: +SKIP
        >>> plan.remaining_requests, plan.cost_usd  # doctest: +SKIP
        (812, 0.0143)
        """
        return run_sync(
            self.aplan(
                column,
                template=template,
                client=client,
                sample=sample,
                context_window=context_window,
                **options,
            )
        )

    @takes_options()
    async def aplan(
        self,
        column: Hashable | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        sample: int = DEFAULT_SAMPLE,
        context_window: int | None = None,
        **options: Any,
    ) -> Plan:
        """Async twin of :meth:`plan`.

        >>> plan = await df.genai.aplan(column="prompt", client=client)  # doctest: +SKIP
        """
        run, client_options = split_run_and_client(
            options, client, where="df.genai.plan", also=("sample", "context_window")
        )
        return await plan_prompts(
            build_prompts(self._df, column, template),
            client,
            run,
            client_options,
            columns=self._df.columns,
            empty_fields=empty_template_fields(self._df, template),
            sample=sample,
            context_window=context_window,
        )


def _set_column(out: pd.DataFrame, name: str, values: Any) -> None:
    # MultiIndex columns need full-length keys.
    padding = ("",) * (out.columns.nlevels - 1)
    out[(name, *padding) if padding else name] = values
