"""What every frame front end shares, whatever the frame library: pandas' ``df.genai`` and polars'.

The front ends differ only in how they read prompts out of a frame and put columns back in; the
checks, the options of ``classify`` / ``extract`` / ``estimate`` and the run itself live here, so
the two libraries keep the same defaults, the same errors and the same checkpoint format.

>>> check_clash(["prompt", "response"], RunOptions())  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
gen_ai_frames.errors.ConfigurationError: the frame already has column(s) ['response']: pass overwrite=True ...
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .batch import default_checkpoint
from .client import Client
from .errors import ConfigurationError
from .factory import create_client
from .options import GENERATION_OPTIONS, RunOptions, split_options, split_run_and_client
from .pricing import Estimate, batch_price_for, estimate_tokens, price_for
from .prompts import Prompts
from .runner import RowResults, kept_columns, output_names, run_rows
from .schema import classify_instruction, extraction_schema, labels_schema

if TYPE_CHECKING:
    from .plan import Plan

__all__ = [
    "ESTIMATE_OPTIONS",
    "check_clash",
    "classify_options",
    "estimate_prompts",
    "extract_options",
    "run_prompts",
]

#: The options ``estimate`` takes: what it needs to count tokens and price them.
ESTIMATE_OPTIONS = (*GENERATION_OPTIONS, "dedupe", "prices", "mode")

_EXTRACT_INSTRUCTION = (
    "Extract the requested fields from the user's text. Use null for a field the text does not give."
)


def clashing_columns(existing: Collection[Any], run: RunOptions) -> list[str]:
    """The run's output columns the frame already has, unless ``overwrite`` lets the run replace them."""
    return [] if run.overwrite else [name for name in output_names(run).values() if name in existing]


def check_clash(existing: Collection[Any], run: RunOptions) -> dict[str, str]:
    """The run's output column names; a ConfigurationError if the frame has one and not ``overwrite``."""
    clash = clashing_columns(existing, run)
    if clash:
        raise ConfigurationError(
            f"the frame already has column(s) {clash}: pass overwrite=True to replace them, "
            "or choose other names with response_column= / error_column="
            + (" / prefix=" if run.schema else "")
        )
    return output_names(run)


async def run_prompts(
    prompts: Prompts,
    client: Client | None,
    run: RunOptions,
    client_options: dict[str, Any],
    keep: Sequence[str] = (),
) -> RowResults:
    """Answer ``prompts`` (building the client from ``client_options`` if none is given); raise an
    error of the whole run (a bad key, a server that is down) once what was received is saved.
    The results hold the output's columns and ``keep``."""
    if client is None:
        client = create_client(**client_options)
    if run.mode == "batch" and run.checkpoint is None and prompts.sendable:  # see docs/batch.md
        run = run.replace(checkpoint=default_checkpoint(client, run, prompts.texts))
    results = await run_rows(prompts, client=client, options=run, keep=kept_columns(run, *keep))
    if results.fatal is not None:
        raise results.fatal
    return results


def classify_options(
    options: dict[str, Any], labels: Sequence[str], multi_label: bool, client: Client | None, where: str
) -> tuple[RunOptions, dict[str, Any]]:
    """The run and client options of ``classify``: a labels schema, its instruction and logprobs."""
    if "schema" in options:
        raise ConfigurationError(
            "classify builds its schema from labels=; use generate(schema=...) for others"
        )
    schema = labels_schema(labels, multi_label)
    options.setdefault("system_prompt", classify_instruction(labels, multi_label))
    return split_run_and_client({**options, "schema": schema, "logprobs": True}, client, where=where)


def extract_options(options: dict[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``extract``: ``generate``'s with the fields' schema and an instruction."""
    if "schema" in options:
        raise ConfigurationError(
            "extract builds its schema from fields=; use generate(schema=...) for others"
        )
    options.setdefault("system_prompt", _EXTRACT_INSTRUCTION)
    return {**options, "schema": extraction_schema(fields)}


def estimate_prompts(
    prompts: Prompts,
    options: Mapping[str, Any],
    *,
    where: str,
    client: Client | None,
    model_name: str | None,
    provider: str | None,
) -> Estimate:
    """What answering ``prompts`` would send and cost (see ``df.genai.estimate``)."""
    run, _ = split_options(
        options,
        where=where,
        accepted=ESTIMATE_OPTIONS,
        also=("column", "template", "client", "model_name", "provider"),
    )
    if client is not None:
        model_name, provider = client.model_name, client.provider.name
    if model_name is None:
        raise ConfigurationError("estimate needs model_name= (or client=) to look up its price")
    texts = [text for text in prompts.texts if text is not None]
    sent = list(dict.fromkeys(texts)) if run.sends_duplicates_once else texts
    system_tokens = estimate_tokens(run.system_prompt) if run.system_prompt else 0
    if run.schema is not None:  # the schema travels with every request (a format, a tool, ...)
        system_tokens += estimate_tokens(run.schema.canonical())
    return Estimate(
        rows=len(prompts),
        requests=len(sent),
        prompt_tokens=sum(estimate_tokens(p) + system_tokens for p in sent),
        max_completion_tokens=len(sent) * run.max_tokens,
        price=(batch_price_for if run.mode == "batch" else price_for)(model_name, run.prices, provider),
        tokenizer="estimated at ~4 characters a token",
    )


async def plan_prompts(
    prompts: Prompts,
    client: Client | None,
    run: RunOptions,
    client_options: dict[str, Any],
    *,
    columns: Collection[Any],
    empty_fields: Mapping[str, int],
    sample: int,
    context_window: int | None,
) -> Plan:
    """The plan of answering ``prompts`` (see ``df.genai.plan``); ``columns`` are the frame's, to
    warn about result columns ``generate`` would refuse to replace."""
    from .plan import make_plan

    notes = []
    clash = clashing_columns(columns, run)
    if clash:
        notes.append(f"the frame already has column(s) {clash}: generate refuses them without overwrite=True")
    if client is None:
        client = create_client(**client_options)
    return await make_plan(
        prompts,
        client=client,
        options=run,
        sample=sample,
        context_window=context_window,
        empty_fields=dict(empty_fields),
        notes=notes,
    )
