"""polars support: ``df.genai`` on a ``pl.DataFrame``, ``lf.genai`` on a ``pl.LazyFrame`` and the
expression namespace ``pl.col(...).genai``.

``import gen_ai_frames`` registers all three when polars is installed (``pip install
"gen-ai-frames[polars]"``); importing this module does too. The module is named after the library
it serves; it imports polars absolutely (``import polars``), so the name never shadows it.

Everything runs the pandas accessor's machinery (:mod:`gen_ai_frames.frames`, :func:`run_rows`):
same options, defaults, errors and checkpoint format, so a checkpoint made from pandas resumes
from polars and the other way round. Prompts are read from polars columns and results come back
through Arrow; pandas is never involved.

>>> import polars as pl, gen_ai_frames
>>> df = pl.DataFrame({"text": ["a cat", "a dog"]})
>>> df.genai.estimate(template="Describe {text}.", model_name="gpt-4o-mini", max_tokens=10).requests
2
>>> out = df.with_columns(
...     pl.col("text").genai.generate(client=client).struct.unnest())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from ._sync import run_sync
from .client import Client
from .factory import create_client
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
from .params import validate_positive_int
from .plan import DEFAULT_SAMPLE, Plan
from .pricing import Estimate
from .prompts import Prompts, build_prompts_from_columns, template_fields
from .results import RESULT_TYPES
from .runner import RowResults, output_names

__all__ = ["PolarsExprGenAI", "PolarsGenAI", "PolarsLazyGenAI", "generate"]

#: Rows per batch of ``lf.genai.generate``: what is held in memory at once (and one checkpoint shard).
DEFAULT_BATCH_ROWS = 50_000


# ------------------------------------------------------------------------------------------ columns


def frame_prompts(df: pl.DataFrame, column: str | None, template: str | None) -> Prompts:
    """The prompts of ``df``'s rows: a column's values, or a template filled from each row.
    A text column is checked through Arrow, without a Python string per row."""
    if template is None and column in df.columns and df.schema[column] == pl.String:
        return Prompts.check_arrow(_string_views(df.get_column(column)))

    def values(name: str) -> list[Any]:
        return df.get_column(name).to_list()

    return build_prompts_from_columns(df.columns, values, column, template)


def series_prompts(series: pl.Series, template: str | None) -> Prompts:
    """The prompts of an expression's values: the values themselves, or a template filled from the
    struct's fields (``pl.struct("a", "b")``) or from the one column it names."""
    if template is None:
        if series.dtype == pl.String:
            return Prompts.check_arrow(_string_views(series))
        return build_prompts_from_columns([series.name], lambda _: series.to_list(), series.name, None)
    if isinstance(series.dtype, pl.Struct):
        fields = [field.name for field in series.dtype.fields]
        return build_prompts_from_columns(
            fields, lambda name: series.struct.field(name).to_list(), None, template
        )
    return build_prompts_from_columns([series.name], lambda _: series.to_list(), None, template)


def _string_views(series: pl.Series) -> pa.ChunkedArray:
    """A polars text column as Arrow ``string_view`` chunks over polars' own buffers: no copy.

    ``to_arrow()`` without a compat level gives ``large_string``, which needs every string
    contiguous: a copy of the whole column. Each chunk is exported alone (``to_arrow`` would first
    rechunk a column of several)."""
    newest = pl.CompatLevel.newest()
    chunks = [chunk.to_arrow(compat_level=newest) for chunk in series.get_chunks()]
    kept = [chunk for chunk in chunks if len(chunk)]
    return pa.chunked_array(kept) if kept else pa.chunked_array([], type=pa.string_view())


def output_dtypes(run: RunOptions) -> dict[str, pl.DataType]:
    """The polars dtype of each output column, keyed like :func:`output_names`."""
    dtypes: dict[str, Any] = {}
    for name in output_names(run):
        if name in RESULT_TYPES:
            dtypes[name] = pl.from_arrow(pa.array([], RESULT_TYPES[name])).dtype  # type: ignore[union-attr]
        elif name == "confidence":
            dtypes[name] = pl.Float64
    if run.schema is not None:
        dtypes.update(run.schema.polars_dtypes())
    return dtypes


def result_series(results: RowResults, run: RunOptions, names: Mapping[str, str]) -> list[pl.Series]:
    """The run's output columns as typed polars Series named as ``names`` says, through Arrow.

    Takes the output columns out of ``results`` (:meth:`RowResults.take_arrow_columns`). Each
    column keeps the run's chunks (``pl.Series(name, chunked)`` would rechunk them: a copy of
    every answer), and a column with no value at all (``error`` when every row succeeded) is made
    as polars' own null column instead of being converted value by value."""
    dtypes = output_dtypes(run)
    out = []
    for name, array in results.take_arrow_columns(run, text=pa.string_view()).items():
        if len(array) and array.null_count == len(array):
            out.append(pl.repeat(None, len(array), dtype=dtypes[name], eager=True).alias(names[name]))
            continue
        if pa.types.is_dictionary(array.type):  # an enum: polars' Enum, with every value, not the seen ones
            array = array.cast(pa.string())
        series = pl.from_arrow(array, rechunk=False)
        assert isinstance(series, pl.Series)  # an array gives a Series, never a frame
        series = series.alias(names[name])
        if series.dtype != dtypes[name]:
            series = series.cast(dtypes[name])
        out.append(series)
    return out


# ------------------------------------------------------------------------------------------ DataFrame


@pl.api.register_dataframe_namespace("genai")
class PolarsGenAI:
    """LLM generation over a polars DataFrame's rows: the methods and options of pandas' ``df.genai``.

    Each method returns a new DataFrame: the rows in the same order, the result columns added (or
    replaced, with ``overwrite=True``) and typed (``pl.String`` text, ``pl.Enum`` labels and enum
    fields, ``pl.Int64`` / ``pl.Float64`` / ``pl.Boolean`` / ``pl.List`` / ``pl.Struct`` fields).
    """

    def __init__(self, df: pl.DataFrame) -> None:
        self._df = df

    @takes_options()
    def generate(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pl.DataFrame:
        """A new frame with a ``response`` and an ``error`` column; see pandas' ``df.genai.generate``.

        >>> out = df.genai.generate("prompt", client=client, checkpoint="run.ckpt")  # doctest: +SKIP
        >>> out.filter(pl.col("error").is_not_null())  # doctest: +SKIP
        """
        return run_sync(self.agenerate(column, template=template, client=client, **options))

    @takes_options()
    async def agenerate(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pl.DataFrame:
        """Async twin of :meth:`generate`."""
        run, client_options = split_run_and_client(options, client, where="df.genai.generate")
        return await self._run(column, template, client, run, client_options)

    async def _run(
        self,
        column: str | None,
        template: str | None,
        client: Client | None,
        run: RunOptions,
        client_options: dict[str, Any],
    ) -> pl.DataFrame:
        names = check_clash(self._df.columns, run)
        prompts = frame_prompts(self._df, column, template)
        results = await run_prompts(prompts, client, run, client_options)
        return self._df.with_columns(result_series(results, run, names))

    @takes_options(exclude=("schema", "logprobs"))
    def classify(
        self,
        column: str | None = None,
        *,
        labels: Sequence[str],
        template: str | None = None,
        multi_label: bool = False,
        client: Client | None = None,
        **options: Any,
    ) -> pl.DataFrame:
        """A ``label`` column of type ``pl.Enum(labels)`` (``labels``, a list of them, with
        ``multi_label=True``) and a ``confidence`` column; see pandas' ``df.genai.classify``."""
        return run_sync(
            self.aclassify(
                column, labels=labels, template=template, multi_label=multi_label, client=client, **options
            )
        )

    async def aclassify(
        self,
        column: str | None = None,
        *,
        labels: Sequence[str],
        template: str | None = None,
        multi_label: bool = False,
        client: Client | None = None,
        **options: Any,
    ) -> pl.DataFrame:
        """Async twin of :meth:`classify`."""
        run, client_options = classify_options(options, labels, multi_label, client, "df.genai.classify")
        return await self._run(column, template, client, run, client_options)

    @takes_options(exclude=("schema",))
    def extract(
        self,
        column: str | None = None,
        *,
        fields: Mapping[str, Any],
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pl.DataFrame:
        """Named fields of each row's text as typed columns; see pandas' ``df.genai.extract``."""
        return self.generate(column, template=template, client=client, **extract_options(options, fields))

    @takes_options(ESTIMATE_OPTIONS, client_options=False)
    def estimate(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        model_name: str | None = None,
        provider: str | None = None,
        **options: Any,
    ) -> Estimate:
        """What a run would send and cost, without sending anything; see pandas' ``df.genai.estimate``."""
        return estimate_prompts(
            frame_prompts(self._df, column, template),
            options,
            where="df.genai.estimate",
            client=client,
            model_name=model_name,
            provider=provider,
        )

    @takes_options()
    def plan(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        sample: int = DEFAULT_SAMPLE,
        context_window: int | None = None,
        **options: Any,
    ) -> Plan:
        """What :meth:`generate` with the same arguments would send, cost and take, measured on
        ``sample`` real requests; see pandas' ``df.genai.plan``.

        >>> print(df.genai.plan("prompt", client=client, checkpoint="run.ckpt"))  # doctest: +SKIP
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
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        sample: int = DEFAULT_SAMPLE,
        context_window: int | None = None,
        **options: Any,
    ) -> Plan:
        """Async twin of :meth:`plan`."""
        run, client_options = split_run_and_client(
            options, client, where="df.genai.plan", also=("sample", "context_window")
        )
        return await plan_prompts(
            frame_prompts(self._df, column, template),
            client,
            run,
            client_options,
            columns=self._df.columns,
            empty_fields=_empty_fields(self._df, template),
            sample=sample,
            context_window=context_window,
        )


def _empty_fields(df: pl.DataFrame, template: str | None) -> dict[str, int]:
    """For each field of ``template``, the rows where its column is null or blank text."""
    counts = {}
    for name in template_fields(template) if template is not None else []:
        if name in df.columns:
            column = df.get_column(name)
            blank = 0
            if column.dtype == pl.String:
                blank = int(column.str.strip_chars().eq("").sum())
            counts[name] = column.null_count() + blank
    return counts


# ------------------------------------------------------------------------------------------ expressions


@pl.api.register_expr_namespace("genai")
class PolarsExprGenAI:
    """``pl.col("review").genai.generate(...)``: an expression for ``with_columns`` / ``select``.

    It evaluates to a ``pl.Struct`` named ``response_column`` whose fields are the columns
    ``df.genai.generate`` would add (``response``, ``error``, the details, a schema's fields);
    ``.struct.unnest()`` spreads them into columns, ``.struct.field("response")`` takes one. With
    ``template=``, the fields of a struct (``pl.struct("city", "country")``) fill it. The whole column
    is one run (``map_batches``, not elementwise), with the same engine, checkpoint and options.
    """

    def __init__(self, expr: pl.Expr) -> None:
        self._expr = expr

    @takes_options()
    def generate(
        self, *, template: str | None = None, client: Client | None = None, **options: Any
    ) -> pl.Expr:
        """The answers of the expression's values (or of ``template`` over its struct fields).

        >>> df.with_columns(pl.col("review").genai.generate(client=client).struct.unnest())  # doctest: +SKIP
        """
        run, client_options = split_run_and_client(options, client, where="pl.Expr.genai.generate")
        return self._map(template, client, run, client_options)

    @takes_options(exclude=("schema", "logprobs"))
    def classify(
        self,
        *,
        labels: Sequence[str],
        template: str | None = None,
        multi_label: bool = False,
        client: Client | None = None,
        **options: Any,
    ) -> pl.Expr:
        """:meth:`PolarsGenAI.classify` as an expression (a struct with ``label`` and ``confidence``)."""
        run, client_options = classify_options(options, labels, multi_label, client, "pl.Expr.genai.classify")
        return self._map(template, client, run, client_options)

    @takes_options(exclude=("schema",))
    def extract(
        self,
        *,
        fields: Mapping[str, Any],
        template: str | None = None,
        client: Client | None = None,
        **options: Any,
    ) -> pl.Expr:
        """:meth:`PolarsGenAI.extract` as an expression (a struct of the typed fields)."""
        return self.generate(template=template, client=client, **extract_options(options, fields))

    def _map(
        self, template: str | None, client: Client | None, run: RunOptions, client_options: dict[str, Any]
    ) -> pl.Expr:
        if template is not None:
            template_fields(template)  # a bad template is an error now, not when the frame is collected
        names = output_names(run)
        dtypes = output_dtypes(run)
        dtype = pl.Struct({names[name]: dtypes[name] for name in names})

        def answer(series: pl.Series) -> pl.Series:
            prompts = series_prompts(series, template)
            results = run_sync(run_prompts(prompts, client, run, client_options))
            return pl.struct(result_series(results, run, names), eager=True).alias(run.response_column)

        # Not elementwise: polars hands the whole column over at once, so a run (and its checkpoint)
        # sees every row, never a slice of them.
        return self._expr.map_batches(answer, return_dtype=dtype).alias(run.response_column)


@takes_options()
def generate(template: str, *, client: Client | None = None, **options: Any) -> pl.Expr:
    """The template form of the expression namespace: the columns ``template`` names fill it.

    ``generate("Is {city} in {country}?", ...)`` is ``pl.struct("city", "country").genai.generate(
    template="Is {city} in {country}?", ...)``.

    >>> from gen_ai_frames.polars import generate
    >>> df.with_columns(generate("Is {city} in {country}?", client=client).struct.unnest())  # doctest: +SKIP
    """
    expr: Any = pl.struct(template_fields(template))  # mypy does not see registered namespaces
    result: pl.Expr = expr.genai.generate(template=template, client=client, **options)
    return result


# ------------------------------------------------------------------------------------------ LazyFrame


@pl.api.register_lazyframe_namespace("genai")
class PolarsLazyGenAI:
    """``lf.genai.generate(...)``: a lazy frame (a scan of a large Parquet file) in batches, in
    bounded memory, as the command line does for files."""

    def __init__(self, lf: pl.LazyFrame) -> None:
        self._lf = lf

    @takes_options()
    def generate(
        self,
        column: str | None = None,
        *,
        template: str | None = None,
        client: Client | None = None,
        output: str | Path | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        **options: Any,
    ) -> pl.LazyFrame:
        """Answer the lazy frame's rows ``batch_rows`` at a time; return a LazyFrame of the results.

        The frame is streamed (``collect_batches``): at most about two batches of input are in
        memory at once. With ``output=`` (a Parquet path) each answered batch is appended to that
        file (written to a temporary name, renamed when every batch is done) and the result is
        ``pl.scan_parquet(output)``: memory stays bounded however large the input. Without it the
        answered batches are kept and returned as one frame's ``.lazy()``.

        ``checkpoint=`` is a directory of one checkpoint per batch (as the CLI writes): a resume
        needs the same ``batch_rows``. Other options are those of ``df.genai.generate``.

        >>> lf = pl.scan_parquet("reviews.parquet")  # doctest: +SKIP
        >>> lf.genai.generate("review", client=client, output="answers.parquet",
        ...                   checkpoint="run.ckpt").collect()  # doctest: +SKIP
        """
        from .checkpoint import run_fingerprint
        from .files import Output
        from .shards import ShardedCheckpoint

        run, client_options = split_run_and_client(
            options, client, where="lf.genai.generate", also=("output", "batch_rows")
        )
        validate_positive_int("batch_rows", batch_rows)
        schema = self._lf.collect_schema()
        names = check_clash(schema.names(), run)
        build_prompts_from_columns(schema.names(), lambda _: [], column, template)  # checks column/template
        dtypes = output_dtypes(run)
        if client is None:
            client = create_client(**client_options)
        state = None
        if run.checkpoint is not None:
            state = ShardedCheckpoint.create(
                run.checkpoint,
                "batches",
                run_fingerprint(client, run.params),
                resume=run.resume,
                shard_rows=batch_rows,
            )
        kept: list[pl.DataFrame] = []
        writer: Output | None = None
        try:
            for index, batch in enumerate(_exact_batches(self._lf, batch_rows), start=1):
                options_now = run
                if state is not None:
                    state.start_shard(index, batch.height)
                    options_now = run.replace(checkpoint=state.shard_path(index))
                prompts = frame_prompts(batch, column, template)
                results = run_sync(run_prompts(prompts, client, options_now, {}, keep=["error_type"]))
                if state is not None:  # counted from the error columns, before they are taken
                    state.finish_shard(index, results.arrays)
                answered = batch.with_columns(result_series(results, run, names))
                if output is None:
                    kept.append(answered)
                    continue
                table = answered.to_arrow()
                if writer is None:
                    writer = Output(Path(output), "parquet", table.schema)
                writer.write(table.cast(writer.schema))
                del answered, table
            if output is None:
                frame = pl.concat(kept) if kept else _empty(schema, names, dtypes)
                if state is not None:
                    state.complete()
                return frame.lazy()
            if writer is None:  # no rows: still a file, with every column
                writer = Output(Path(output), "parquet", _empty(schema, names, dtypes).to_arrow().schema)
            writer.commit()
        finally:
            if writer is not None:
                writer.__exit__(None, None, None)  # discards the temporary file unless committed
        if state is not None:
            state.complete()
        # Parquet keeps enums as dictionaries: give them back their pl.Enum type.
        return pl.scan_parquet(output).cast({names[n]: dtypes[n] for n in names})


def _exact_batches(lf: pl.LazyFrame, rows: int) -> Iterator[pl.DataFrame]:
    """The lazy frame in batches of exactly ``rows`` rows (the last may be shorter), streamed.

    polars' own batches vary in size; checkpoint shards are matched by number, so a batch must hold
    the same rows on every run.
    """
    pending: list[pl.DataFrame] = []
    held = 0
    for chunk in _chunks(lf, rows):
        pending.append(chunk)
        held += chunk.height
        while held >= rows:
            merged = pl.concat(pending, rechunk=False) if len(pending) > 1 else pending[0]
            yield merged.slice(0, rows).rechunk()
            rest = merged.slice(rows)
            pending, held = ([rest] if rest.height else []), rest.height
    if held:
        yield pl.concat(pending).rechunk() if len(pending) > 1 else pending[0]


def _chunks(lf: pl.LazyFrame, rows: int) -> Iterator[pl.DataFrame]:
    """The lazy frame streamed in chunks: ``collect_batches`` where polars has it, else slices
    (each slice a query of its own: a Parquet scan reads only the row groups it needs)."""
    if hasattr(lf, "collect_batches"):
        yield from lf.collect_batches(chunk_size=rows, maintain_order=True)
        return
    offset = 0
    while True:  # pragma: no cover - older polars only
        chunk = lf.slice(offset, rows).collect()
        if chunk.height == 0:
            return
        yield chunk
        offset += chunk.height


def _empty(schema: pl.Schema, names: Mapping[str, str], dtypes: Mapping[str, Any]) -> pl.DataFrame:
    columns: dict[str, Any] = dict(schema)
    columns.update({names[n]: dtypes[n] for n in names})
    return pl.DataFrame(schema=columns)
