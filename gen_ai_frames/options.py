"""Every option of a run, defined once: name, default, check, command-line flag and help.

``df.genai.generate``, its async twin, the Dask accessor, the CLI and the client's batch calls all
take these options by name and build one :class:`RunOptions`. A new option is a new field here and
nothing else: the entry points accept it, the CLI grows its flag and the docs test sees it.

>>> RunOptions(max_concurrent=32).max_concurrent
32
>>> RunOptions(max_concurent=32)
Traceback (most recent call last):
...
TypeError: RunOptions.__init__() got an unexpected keyword argument 'max_concurent'
>>> split_options({"max_concurent": 32}, where="df.genai.generate")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
gen_ai_frames.errors.ConfigurationError: unknown option 'max_concurent' ...; did you mean 'max_concurrent'?
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigurationError
from .params import GenerationParams, check_number, validate_positive_int
from .pricing import check_prices
from .schema import Schema

__all__ = [
    "GROUPS",
    "RunOptions",
    "option_fields",
    "options_table",
    "split_options",
    "split_run_and_client",
    "takes_options",
]

#: Option groups, in the order the CLI's --help and the docs show them.
GROUPS = {
    "generation": "what to ask the model for",
    "limits": "concurrency, retries and rate limits",
    "budget": "cost control",
    "run": "checkpoint, cache, dedupe and progress",
    "output": "result columns",
    "structured": "typed columns from a schema",
}


def _about(
    help: str,
    *,
    group: str,
    check: Callable[[str, Any], None] | None = None,
    metavar: str | None = None,
    cli: bool = True,
    parse: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """What every entry point needs to know about an option of :class:`RunOptions`, besides its default."""
    return {"help": help, "group": group, "check": check, "metavar": metavar, "cli": cli, "parse": parse}


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, got {value!r}")


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None:
        _check_bool(name, value)


def _check_positive_int(name: str, value: Any) -> None:
    validate_positive_int(name, value)


def _check_optional_count(name: str, value: Any) -> None:
    if value is not None:
        validate_positive_int(name, value, minimum=0)


def _check_optional_positive(name: str, value: Any) -> None:
    if value is not None:
        check_number(name, value, "> 0 or None", lambda v: v > 0)


def _check_poll_interval(name: str, value: Any) -> None:
    check_number(name, value, "> 0 (seconds)", lambda v: v > 0)


def _check_mode(name: str, value: Any) -> None:
    if value not in ("realtime", "batch"):
        raise ConfigurationError(f"{name} must be 'realtime' or 'batch', got {value!r}")


def _check_column_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty string, got {value!r}")


def _check_path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(f"{name} must be a directory path or None, got {type(value).__name__}")


def _check_cache(name: str, value: Any) -> None:
    if value is None or isinstance(value, bool) or isinstance(value, os.PathLike):
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be True, False, None or a file path, got {value!r}")


def _parse_cache(text: str) -> bool | str:
    """The CLI's --cache: on/off words, else a path (see gen_ai_frames.cache.parse_cache_flag)."""
    from .cache import parse_cache_flag

    return parse_cache_flag(text)


def _check_prices(name: str, value: Any) -> None:
    check_prices(value, name)


def _check_schema(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, Schema):
        raise ConfigurationError(f"{name} was not parsed")  # __post_init__ parses it first


def _parse_schema(text: str) -> Schema:
    """The CLI's --schema: a path to a JSON Schema file, or the short syntax."""
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            return Schema.parse(json.loads(path.read_text(encoding="utf-8")))
        except OSError as err:
            raise ConfigurationError(f"--schema {text!r}: cannot read the file ({err})") from None
        except ValueError as err:
            if isinstance(err, ConfigurationError):
                raise
            raise ConfigurationError(f"--schema {text!r} is not a JSON file: {err}") from None
    return Schema.parse(text)


def _check_prefix(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")


def _parse_prices(text: str) -> dict[str, tuple[float, float]]:
    """The CLI's --prices: a JSON object ``{"model": [input, output]}``."""
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigurationError(
            f"--prices must be JSON like '{{\"my-model\": [0.15, 0.6]}}', got {text!r}"
        ) from None
    _check_prices("--prices", value)
    return {model: (float(p[0]), float(p[1])) for model, p in value.items()}


def _check_storage_options(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value)):
        raise ConfigurationError(
            f"{name} must be a dict of s3fs options such as {{'endpoint_url': 'http://...'}} or None, "
            f"got {type(value).__name__}"
        )


def _parse_storage_options(text: str) -> dict[str, Any]:
    """The CLI's --storage-options: a JSON object (the value is never echoed: it may hold a secret)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigurationError(
            '--storage-options must be a JSON object like \'{"endpoint_url": "http://127.0.0.1:9000"}\''
        )
    return value


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The validated options of one run. Build it with keywords; every value is checked at once.

    ``params`` is the generation subset that providers see; ``engine_limits`` what the engine takes.

    >>> RunOptions(temperature=0.7).params.temperature
    0.7
    >>> RunOptions(chunk_size=0)
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: chunk_size must be an integer >= 1, got 0
    """

    # generation (checked by GenerationParams)
    system_prompt: str | None = field(
        default=None,
        metadata=_about("system message sent with every prompt", group="generation", metavar="TEXT"),
    )
    max_tokens: int = field(
        default=256, metadata=_about("answer length limit", group="generation", metavar="N")
    )
    temperature: float = field(
        default=0,
        metadata=_about(
            "0 to 2; at 0 identical prompts are sent once (see dedupe)", group="generation", metavar="T"
        ),
    )
    top_p: float = field(
        default=1.0, metadata=_about("nucleus sampling, in (0, 1]", group="generation", metavar="P")
    )
    timeout: float = field(
        default=60, metadata=_about("seconds to wait for one answer", group="generation", metavar="S")
    )
    # limits
    max_concurrent: int = field(
        default=5,
        metadata=_about("requests in flight at once", group="limits", check=_check_positive_int, metavar="N"),
    )
    max_retries: int | None = field(
        default=None,
        metadata=_about(
            "retries of a failed request (None: the client's, 3 by default)",
            group="limits",
            check=_check_optional_count,
            metavar="N",
        ),
    )
    requests_per_minute: float | None = field(
        default=None,
        metadata=_about(
            "pace request starts to this rate (None: the client's, else learned from the provider)",
            group="limits",
            check=_check_optional_positive,
            metavar="R",
        ),
    )
    tokens_per_minute: float | None = field(
        default=None,
        metadata=_about(
            "keep prompt + answer tokens under this rate (None: the client's)",
            group="limits",
            check=_check_optional_positive,
            metavar="T",
        ),
    )
    rate_limit_timeout: float | None = field(
        default=None,
        metadata=_about(
            "seconds a run may be rate limited without a single answer before the waiting rows fail with "
            "RateLimitError (None: the client's, 600 by default)",
            group="limits",
            check=_check_optional_positive,
            metavar="S",
        ),
    )
    # budget
    max_cost: float | None = field(
        default=None,
        metadata=_about(
            "stop sending once this run has spent this many US dollars (needs the model's price)",
            group="budget",
            check=_check_optional_positive,
            metavar="USD",
        ),
    )
    prices: Mapping[str, tuple[float, float]] | None = field(
        default=None,
        metadata=_about(
            "prices in USD per million tokens, {model: (input, output)}, over the built-in table",
            group="budget",
            check=_check_prices,
            metavar="JSON",
            parse=_parse_prices,
        ),
    )
    # run
    chunk_size: int = field(
        default=500,
        metadata=_about("rows per checkpoint write", group="run", check=_check_positive_int, metavar="N"),
    )
    checkpoint: str | os.PathLike[str] | None = field(
        default=None,
        metadata=_about(
            "save answers in this directory as they arrive; the same call resumes a killed run",
            group="run",
            check=_check_path,
            metavar="DIR",
        ),
    )
    resume: bool = field(
        default=True,
        metadata=_about(
            "with a checkpoint: continue from what it holds (False: start over)",
            group="run",
            check=_check_bool,
        ),
    )
    retry_errors: bool = field(
        default=False,
        metadata=_about(
            "with a checkpoint: send the rows that failed last time again", group="run", check=_check_bool
        ),
    )
    repair: bool = field(
        default=False,
        metadata=_about(
            "with a checkpoint: drop unreadable parts and rebuild a lost manifest (with a warning) "
            "instead of refusing",
            group="run",
            check=_check_bool,
        ),
    )
    dedupe: bool | None = field(
        default=None,
        metadata=_about(
            "send identical prompts once (None: when temperature is 0)",
            group="run",
            check=_check_optional_bool,
        ),
    )
    progress: bool = field(
        default=True, metadata=_about("show a progress bar", group="run", check=_check_bool)
    )
    # --- s3ckpt options ---
    storage_options: Mapping[str, Any] | None = field(
        default=None,
        repr=False,  # may hold credentials: never shown
        metadata=_about(
            "with an s3:// checkpoint: s3fs options such as endpoint_url, key, secret (None: the AWS_* "
            "environment); never stored",
            group="run",
            check=_check_storage_options,
            metavar="JSON",
            parse=_parse_storage_options,
        ),
    )
    # --- batchapi options ---
    mode: str = field(
        default="realtime",
        metadata=_about(
            "'batch': send through the provider's Batch API (about half the price, answers within 24 h; "
            "needs a checkpoint, see docs/batch.md); 'realtime': one request per prompt now",
            group="run",
            check=_check_mode,
            metavar="MODE",
            cli=False,
        ),
    )
    wait: bool = field(
        default=True,
        metadata=_about(
            "batch mode: wait for the batches to finish (False: submit and return; a later call with the "
            "same checkpoint collects)",
            group="run",
            check=_check_bool,
        ),
    )
    poll_interval: float = field(
        default=60.0,
        metadata=_about(
            "batch mode: the longest wait between two polls of a batch, in seconds (polls start at 1 s "
            "and back off)",
            group="run",
            check=_check_poll_interval,
        ),
    )
    # --- cache options ---
    cache: bool | str | os.PathLike[str] | None = field(
        default=None,
        metadata={
            **_about(
                "keep answers across runs in a response cache and never pay twice: True (or CLI --cache) for "
                "the user's cache directory, or a file path; None: on when GEN_AI_FRAMES_CACHE is 1 or a "
                "path, at temperature 0 only",
                group="run",
                check=_check_cache,
                metavar="PATH",
                parse=_parse_cache,
            ),
            "const": True,  # CLI: --cache alone means the default location
        },
    )
    cache_max_size: int = field(
        default=1 << 30,
        metadata=_about(
            "with a cache: its size cap in bytes; the least recently used answers go first",
            group="run",
            check=_check_positive_int,
            metavar="BYTES",
        ),
    )
    cache_max_age: float | None = field(
        default=None,
        metadata=_about(
            "with a cache: answers stored longer ago than this many seconds are sent again (None: no limit)",
            group="run",
            check=_check_optional_positive,
            metavar="S",
        ),
    )
    # output
    details: bool = field(
        default=False,
        metadata=_about(
            "add error type, suggestion, status code, attempts, finish reason, token counts, latency, "
            "logprob and cached (answered from the response cache) columns",
            group="output",
            check=_check_bool,
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_about(
            "replace existing columns of the same names", group="output", check=_check_bool, cli=False
        ),
    )
    response_column: str = field(
        default="response",
        metadata=_about(
            "name of the answer column", group="output", check=_check_column_name, metavar="NAME"
        ),
    )
    error_column: str = field(
        default="error",
        metadata=_about("name of the error column", group="output", check=_check_column_name, metavar="NAME"),
    )
    # structured output
    schema: Any = field(
        default=None,
        metadata=_about(
            "a pydantic model, a JSON Schema dict or 'name, age int, mood happy|sad': one typed column per "
            "field (CLI: the short syntax or a .json file)",
            group="structured",
            check=_check_schema,
            metavar="SCHEMA",
            parse=_parse_schema,
        ),
    )
    schema_retries: int = field(
        default=1,
        metadata=_about(
            "with a schema: ask again this many times, showing the model what was wrong, before the row "
            "fails",
            group="structured",
            check=_check_optional_count,
            metavar="N",
        ),
    )
    logprobs: bool = field(
        default=False,
        metadata=_about(
            "ask for token log-probabilities where the provider offers them and add a confidence column: the "
            "probability of each answer (NA where the provider returns none)",
            group="structured",
            check=_check_bool,
        ),
    )
    prefix: str = field(
        default="",
        metadata=_about(
            "with a schema: put this before each field's column name, to avoid clashes",
            group="structured",
            check=_check_prefix,
            metavar="TEXT",
        ),
    )

    def __post_init__(self) -> None:
        if self.schema is not None:  # a pydantic model, a JSON Schema dict or the short syntax
            object.__setattr__(self, "schema", Schema.parse(self.schema))
        for spec in fields(self):
            check = spec.metadata["check"]
            if check is not None:
                check(spec.name, getattr(self, spec.name))
        self.params  # noqa: B018  (validates the generation options)

    @property
    def params(self) -> GenerationParams:
        """The generation parameters every request of the run carries."""
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            timeout=self.timeout,
            system_prompt=self.system_prompt,
            schema=self.schema,
            schema_retries=self.schema_retries,
            logprobs=self.logprobs,
        )

    @property
    def engine_limits(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`gen_ai_frames.client.Client.engine`."""
        return {name: getattr(self, name) for name in ENGINE_OPTIONS}

    @property
    def sends_duplicates_once(self) -> bool:
        """Dedupe as asked, or by default when answers are deterministic (temperature 0)."""
        return self.temperature == 0 if self.dedupe is None else self.dedupe

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with some options changed (and checked again)."""
        return replace(self, **changes)

    def as_kwargs(self) -> dict[str, Any]:
        """Every option by name, to pass on to another entry point.

        >>> RunOptions(max_tokens=5).as_kwargs()["max_tokens"]
        5
        """
        return {spec.name: getattr(self, spec.name) for spec in fields(self)}


#: Options the engine takes; the client's batch calls accept exactly these plus the generation ones.
ENGINE_OPTIONS = (
    "max_concurrent",
    "max_retries",
    "requests_per_minute",
    "tokens_per_minute",
    "rate_limit_timeout",
)
GENERATION_OPTIONS = (
    "system_prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "timeout",
    "schema",
    "schema_retries",
)
#: Options of the response cache (gen_ai_frames.cache), which the client's batch calls take too.
CACHE_OPTIONS = ("cache", "cache_max_size", "cache_max_age")


def option_fields(group: str | None = None) -> list[Any]:
    """The dataclass fields of :class:`RunOptions`, optionally of one group, in definition order.

    >>> [f.name for f in option_fields("budget")]
    ['max_cost', 'prices']
    """
    return [f for f in fields(RunOptions) if group is None or f.metadata["group"] == group]


def split_options(
    given: Mapping[str, Any],
    *,
    where: str,
    accepted: Collection[str] | None = None,
    client_options: Collection[str] = (),
    also: Iterable[str] = (),
) -> tuple[RunOptions, dict[str, Any]]:
    """Split keyword arguments into run options and client options; reject anything else by name.

    ``accepted`` limits which run options ``where`` takes (None: all of them); ``client_options``
    are the names ``create_client`` and the provider accept; ``also`` other parameters of the entry
    point, offered as suggestions.

    >>> options, client = split_options({"max_tokens": 5, "provider": "openai"}, where="generate",
    ...                                 client_options={"provider"})
    >>> options.max_tokens, client
    (5, {'provider': 'openai'})
    """
    run_names = [f.name for f in fields(RunOptions)]
    allowed = set(run_names if accepted is None else accepted)
    run: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for name, value in given.items():
        if name in allowed:
            run[name] = value
        elif name in client_options:
            client[name] = value
        elif name in run_names:
            raise ConfigurationError(
                f"option {name!r} does not apply to {where}; it is an option of df.genai.generate and the CLI"
            )
        else:
            known = sorted({*allowed, *client_options, *also})
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(known)}"
            raise ConfigurationError(f"unknown option {name!r} for {where}{hint}")
    return RunOptions(**run), client


def client_option_names(provider_class: type | None) -> set[str]:
    """Keyword arguments ``create_client`` takes for ``provider_class``: its own and the provider's.

    >>> {"provider", "api_key", "endpoint", "model_name", "verify"} <= client_option_names(None)
    True
    """
    from .factory import create_client

    names = {n for n, p in inspect.signature(create_client).parameters.items() if p.kind is not p.VAR_KEYWORD}
    if provider_class is not None:
        names |= {
            n for n, p in inspect.signature(provider_class).parameters.items() if p.kind is p.KEYWORD_ONLY
        }
    return names


def split_run_and_client(
    given: Mapping[str, Any],
    client: object,
    *,
    where: str,
    accepted: Collection[str] | None = None,
    also: Iterable[str] = (),
) -> tuple[RunOptions, dict[str, Any]]:
    """:func:`split_options` for an entry point that takes ``client=`` or the options to build one.

    Returns the run options and the ``create_client`` options (empty when ``client`` is given).

    >>> split_run_and_client({"max_token": 5}, None, where="df.genai.generate")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gen_ai_frames.errors.ConfigurationError: unknown option 'max_token' ...; did you mean 'max_tokens'?
    """
    from .client import Client
    from .providers import get_provider

    if client is not None and not isinstance(client, Client):
        raise ConfigurationError(f"client must come from create_client(), got {type(client).__name__}")
    provider_class: type | None = None
    if client is not None:
        provider_class = type(client.provider)
    elif isinstance(given.get("provider", "openai"), str):
        provider_class = get_provider(given.get("provider", "openai"))
    run, client_options = split_options(
        given,
        where=where,
        accepted=accepted,
        client_options=client_option_names(provider_class),
        also=("column", "template", "client", *also),
    )
    if client is not None and client_options:
        raise ConfigurationError(
            f"pass either client= or client options ({', '.join(sorted(client_options))}), not both"
        )
    return run, client_options


F = TypeVar("F", bound=Callable[..., Any])


def takes_options(
    accepted: Collection[str] | None = None, *, client_options: bool = True, exclude: Collection[str] = ()
) -> Callable[[F], F]:
    """Decorator: spell out a function's ``**options`` in its signature as the run options it
    accepts, so ``help()``, Jupyter's Shift-Tab and IDEs show every option with its default.

    >>> @takes_options(["max_tokens"], client_options=False)
    ... def f(prompt, **options): ...
    >>> inspect.signature(f)
    <Signature (prompt, *, max_tokens: 'int' = 256)>
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        parameters = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        named = {p.name for p in parameters}
        for spec in fields(RunOptions):
            if (
                (accepted is None or spec.name in accepted)
                and spec.name not in named
                and spec.name not in exclude
            ):
                parameters.append(
                    inspect.Parameter(
                        spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default, annotation=spec.type
                    )
                )
        if client_options:  # provider=, model_name=, api_key=, endpoint=, ...: see create_client
            parameters.append(
                inspect.Parameter("client_options", inspect.Parameter.VAR_KEYWORD, annotation="Any")
            )
        function.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return function

    return decorate


def options_table() -> str:
    """The Markdown table of every run option (docs/dataframes.md embeds it; a test keeps it equal).

    >>> print(options_table().splitlines()[2])
    | `system_prompt` | `None` | `--system-prompt` | system message sent with every prompt |
    """
    lines = ["| option | default | CLI flag | meaning |", "|---|---|---|---|"]
    for spec in fields(RunOptions):
        meta = spec.metadata
        flag = "--" + spec.name.replace("_", "-")
        if str(spec.type) == "bool" and spec.default:
            flag = "--no-" + flag[2:]
        elif str(spec.type) == "bool | None":
            flag = f"{flag} / --no-{flag[2:]}"
        lines.append(
            f"| `{spec.name}` | `{spec.default!r}` | {f'`{flag}`' if meta['cli'] else '-'} | {meta['help']} |"
        )
    return "\n".join(lines)
