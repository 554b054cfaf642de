"""One options object for every entry point: same names, defaults, checks and docs everywhere."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gen_ai_frames  # noqa: F401  (registers df.genai)
from gen_ai_frames import create_client
from gen_ai_frames.cli import build_parser, main
from gen_ai_frames.errors import ConfigurationError
from gen_ai_frames.options import RunOptions, option_fields, options_table

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture()
def frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt": ["a", "b"]})


def entry_points(frame: pd.DataFrame, client: Any) -> dict[str, Any]:
    """Each entry point called with one misspelt option: max_token for max_tokens."""
    dask_accessor = pytest.importorskip("gen_ai_frames.dask")  # noqa: F841  (registers ddf.genai)
    import dask.dataframe as dd

    ddf = dd.from_pandas(frame, npartitions=1)
    return {
        "df.genai.generate": lambda: frame.genai.generate(column="prompt", client=client, max_token=5),
        "df.genai.generate (client options)": lambda: frame.genai.generate(
            column="prompt", provider="openai", endpoint="http://127.0.0.1:9/v1", model_name="m", max_token=5),
        "df.genai.agenerate": lambda: asyncio.run(frame.genai.agenerate(column="prompt", client=client,
                                                                       max_token=5)),
        "df.genai.estimate": lambda: frame.genai.estimate(column="prompt", model_name="gpt-4o-mini", max_token=5),
        "ddf.genai.generate": lambda: ddf.genai.generate(column="prompt", client=client, max_token=5),
        "generate_batch_response": lambda: client.generate_batch_response(["a"], max_token=5),
        "agenerate_batch_response": lambda: asyncio.run(client.agenerate_batch_response(["a"], max_token=5)),
        "generate_response": lambda: client.generate_response("a", max_token=5),
        "generate_chat_response": lambda: client.generate_chat_response([{"role": "user", "content": "a"}],
                                                                        max_token=5),
    }


@pytest.mark.parametrize("name", ["df.genai.generate", "df.genai.generate (client options)", "df.genai.agenerate",
                                  "df.genai.estimate", "ddf.genai.generate", "generate_batch_response",
                                  "agenerate_batch_response", "generate_response", "generate_chat_response"])
def test_every_entry_point_names_an_unknown_option_and_the_closest_valid_one(frame: pd.DataFrame,
                                                                            name: str) -> None:
    client = create_client(endpoint="http://127.0.0.1:9/v1", model_name="m")  # port 9: nothing is sent
    with pytest.raises(ConfigurationError, match=r"unknown option 'max_token'.*did you mean 'max_tokens'\?"):
        entry_points(frame, client)[name]()


def test_an_unknown_option_beside_client_is_called_unknown_not_a_client_option(frame: pd.DataFrame) -> None:
    client = create_client(endpoint="http://127.0.0.1:9/v1", model_name="m")
    with pytest.raises(ConfigurationError) as caught:
        frame.genai.generate(column="prompt", client=client, max_token=5)
    assert "not both" not in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"client= or client options \(model_name\), not both"):
        frame.genai.generate(column="prompt", client=client, model_name="x")


def test_a_run_option_the_client_calls_do_not_take_says_where_it_belongs() -> None:
    client = create_client(endpoint="http://127.0.0.1:9/v1", model_name="m")
    with pytest.raises(ConfigurationError, match="'checkpoint' does not apply to generate_batch_response"):
        client.generate_batch_response(["a"], checkpoint="x")


def test_provider_specific_options_are_client_options_not_unknown(frame: pd.DataFrame) -> None:
    # Azure's api_version is an argument of the provider class, not of create_client.
    with pytest.raises(ConfigurationError) as caught:
        frame.genai.generate(column="prompt", provider="azure", endpoint="http://127.0.0.1:9",
                             model_name="m", api_version="2024-10-21", api_vresion="x")
    assert "unknown option 'api_vresion'" in str(caught.value) and "did you mean 'api_version'" in str(caught.value)


@pytest.mark.parametrize(("options", "message"), [
    ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
    ({"max_concurrent": True}, "max_concurrent must be an integer >= 1, got True"),
    ({"max_retries": -1}, "max_retries must be an integer >= 0, got -1"),
    ({"requests_per_minute": 0}, "requests_per_minute must be a number > 0 or None, got 0"),
    ({"max_cost": float("nan")}, "max_cost must be a number > 0 or None, got nan"),
    ({"resume": "yes"}, "resume must be True or False, got 'yes'"),
    ({"dedupe": 1}, "dedupe must be True or False, got 1"),
    ({"response_column": ""}, "response_column must be a non-empty string"),
    ({"prices": {"m": (1.0,)}}, r"prices\['m'\] must be \(input, output\)"),
    ({"temperature": 5}, r"temperature must be a number in \[0, 2\], got 5"),
])
def test_run_options_check_every_value(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RunOptions(**options)


def test_accessor_signature_lists_every_option_with_its_default() -> None:
    signature = inspect.signature(pd.DataFrame({"a": [1]}).genai.generate)
    for spec in option_fields():
        assert signature.parameters[spec.name].default == spec.default, spec.name
    assert list(signature.parameters)[:3] == ["column", "template", "client"]


def test_cli_generate_has_a_flag_for_every_option_with_the_same_default() -> None:
    args = build_parser().parse_args(["generate", "in.csv", "-o", "out.parquet", "--column", "p"])
    for spec in option_fields():
        if spec.metadata["cli"]:
            assert getattr(args, spec.name) == spec.default, spec.name


def test_cli_flags_reach_the_run_options() -> None:
    args = build_parser().parse_args([
        "generate", "in.csv", "-o", "out.parquet", "--column", "p", "--requests-per-minute", "120",
        "--tokens-per-minute", "9000", "--max-cost", "2.5", "--no-dedupe", "--prices", '{"m": [1, 2]}',
        "--max-tokens", "7", "--no-resume", "--retry-errors",
    ])
    from gen_ai_frames.cli import _run_options

    options = _run_options(args)
    assert (options.requests_per_minute, options.tokens_per_minute, options.max_cost) == (120, 9000, 2.5)
    assert options.dedupe is False and options.prices == {"m": (1.0, 2.0)} and options.max_tokens == 7
    assert options.resume is False and options.retry_errors is True


def test_cli_bad_option_value_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("p\nhello\n")
    code = main(["generate", str(source), "-o", str(tmp_path / "o.parquet"), "--column", "p",
                 "--requests-per-minute", "0", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "gen-ai-frames: error: requests_per_minute must be a number > 0 or None, got 0.0"


def test_cli_misspelt_flag_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "in.csv", "-o", "o.parquet", "--column", "p", "--max-tokns", "5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unrecognized arguments: --max-tokns 5; did you mean --max-tokens?" in err


@pytest.mark.parametrize("command", ["generate", "plan"])
def test_cli_abbreviated_flag_is_refused_not_guessed(capsys: pytest.CaptureFixture[str], command: str) -> None:
    # argparse would take --max-token as --max-tokens: a typo must never silently set an option
    argv = [command, "in.csv", "--column", "p", "--max-token", "5"]
    code = main(argv[:2] + ["-o", "o.parquet"] + argv[2:] if command == "generate" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "unrecognized arguments: --max-token 5; did you mean --max-tokens?" in err


def test_dataframes_doc_holds_the_generated_options_table() -> None:
    text = (DOCS / "dataframes.md").read_text()
    found = re.search(r"<!-- options-table:[^\n]*-->\n(.*?)\n<!-- end options-table -->", text, re.S)
    assert found is not None
    assert found.group(1) == options_table()


def test_cli_dedupe_flag_changes_what_is_sent(tmp_path: Path) -> None:
    from gen_ai_frames.testing import FakeServer

    source = tmp_path / "in.csv"
    source.write_text("p\nsame\nsame\nsame\n")
    with FakeServer() as server:
        base = ["generate", str(source), "--column", "p", "--endpoint", server.url, "--model", "m", "--no-progress"]
        assert main([*base, "-o", str(tmp_path / "a.parquet")]) == 0
        deduped = server.stats()["requests"]
        server.reset()
        assert main([*base, "-o", str(tmp_path / "b.parquet"), "--no-dedupe"]) == 0
        assert (deduped, server.stats()["requests"]) == (1, 3)
