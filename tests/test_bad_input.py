"""The bad-input table: what a user sees for each wrong thing they can pass.

Every case asserts its exact outcome: either a clear error raised *before any request is sent*
(the fake server counts requests), or a per-row error while every other row is still answered.

| #  | input                                   | outcome                                                  |
|----|-----------------------------------------|----------------------------------------------------------|
| 1  | None prompt                             | row error InvalidPromptError "missing"                   |
| 2  | NaN prompt                              | row error InvalidPromptError "missing"                   |
| 3  | empty prompt                            | row error InvalidPromptError "empty"                     |
| 4  | whitespace-only prompt                  | row error InvalidPromptError "empty"                     |
| 5  | int in the prompt column                | row error InvalidPromptError "int ... not text"          |
| 6  | bytes in the prompt column              | row error InvalidPromptError "bytes ... not text"        |
| 7  | dict in the prompt column               | row error InvalidPromptError "dict ... not text"         |
| 8  | list in the prompt column               | row error InvalidPromptError "list ... not text"         |
| 9  | lone surrogate in a prompt              | row error InvalidPromptError "cannot be sent"            |
| 10 | template field missing in one row       | row error InvalidPromptError "missing"                   |
| 11 | 1 MB prompt                             | sent and answered like any other                         |
| 12 | missing column                          | ConfigurationError "not found", lists the columns        |
| 13 | template with an unknown field          | ConfigurationError "not found"                           |
| 14 | template with bad syntax                | ConfigurationError "not a valid format string"           |
| 15 | template with a positional field        | ConfigurationError "must name columns"                   |
| 16 | duplicate column names                  | ConfigurationError "appears 2 times"                     |
| 17 | both column= and template=              | ConfigurationError "exactly one of"                      |
| 18 | max_concurrent=0                        | ConfigurationError "max_concurrent must be ... >= 1"     |
| 19 | temperature=5                           | ConfigurationError "temperature ... [0, 2]"              |
| 20 | top_p=0                                 | ConfigurationError "top_p ... (0, 1]"                    |
| 21 | max_tokens=0                            | ConfigurationError "max_tokens"                          |
| 22 | timeout=-1                              | ConfigurationError "timeout"                             |
| 23 | chunk_size=0                            | ConfigurationError "chunk_size"                          |
| 24 | response_column == error_column         | ConfigurationError "must differ"                         |
| 25 | output column already exists            | ConfigurationError "overwrite=True"                      |
| 26 | unknown provider                        | ConfigurationError lists the known providers             |
| 27 | endpoint without a scheme               | ConfigurationError "has no scheme", shows the fix        |
| 28 | checkpoint path that is a file          | CheckpointError "is a file; pass a directory path"       |
| 29 | checkpoint directory without write perm | CheckpointError "not writable"                           |
| 30 | truncated Parquet part                  | CheckpointCorruptError names the file, says how to recover|
| 31 | manifest from another run               | CheckpointMismatchError says resume=False                 |
| 32 | unreachable endpoint                    | APIConnectionError "Is the server running at ..."        |
| 33 | endpoint that answers HTML              | row errors MalformedResponseError "not JSON ... text/html"|
| 34 | 200 answer carrying an error object     | row error with the provider's message                    |
| 35 | endpoint with an invalid port           | ConfigurationError "has an invalid port", password hidden |
| 36 | unparsable endpoint (http://[::1/v1)    | ConfigurationError "is not a valid URL"                  |
| 37 | endpoint with user:pw@ and an API key   | ConfigurationError "has credentials in it", as ***@      |
| 38 | endpoint with a #fragment               | ConfigurationError "has a #fragment"                     |
| 39 | max_response_bytes=0                    | ConfigurationError "max_response_bytes"                  |
| 40 | CSV rows with a trailing comma          | CLI exit 2 "line 2 has 3 fields but the header has 2"    |
| 41 | CSV first data row longer than header   | CLI exit 2, naming the line (both in tests/test_cli.py)  |
| 42 | template without a field                | ConfigurationError "has no {column} field"               |
| 43 | neither column nor template             | ConfigurationError "exactly one of"                      |
| 44 | template over MultiIndex columns        | ConfigurationError "Flatten the columns first"           |
| 45 | column= a partial MultiIndex key        | ConfigurationError "name one with a tuple"               |
|    |   (44, 45 in tests/test_accessor.py)    |                                                          |
| 46 | misspelt option (max_token=5), on every | ConfigurationError "did you mean 'max_tokens'?"          |
|    |   entry point; misspelt CLI flag        |   CLI exit 2 "did you mean --max-tokens?"                |
|    |   (46 in tests/test_options.py)         |                                                          |

Misbehaving servers (redirects, odd fields, huge answers, echoed keys) have their own table in
tests/test_hostile.py.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest

from gen_ai_frames import APIConnectionError, ConfigurationError, RetryPolicy, create_client
from gen_ai_frames.checkpoint import CheckpointCorruptError, CheckpointError, CheckpointMismatchError

from .conftest import FAST_RETRY

ROW_CASES = [
    ("none", None, "InvalidPromptError", "missing"),
    ("nan", math.nan, "InvalidPromptError", "missing"),
    ("empty", "", "InvalidPromptError", "empty"),
    ("whitespace", " \t\n ", "InvalidPromptError", "empty"),
    ("int", 42, "InvalidPromptError", "int 42, not text"),
    ("bytes", b"raw", "InvalidPromptError", "bytes b'raw', not text"),
    ("dict", {"q": "x"}, "InvalidPromptError", "dict {'q': 'x'}, not text"),
    ("list", ["a"], "InvalidPromptError", "list ['a'], not text"),
    ("lone surrogate", "bad \udc80 text", "InvalidPromptError", "cannot be sent"),
    ("200 with an error object", "x [[error_body]]", "BadRequestError", ""),
]


@pytest.fixture
def client(fake_server: Any) -> Any:
    return create_client(endpoint=fake_server.url, model_name="m", retry=FAST_RETRY)


@pytest.mark.parametrize(("value", "error_type", "message"), [c[1:] for c in ROW_CASES],
                         ids=[c[0] for c in ROW_CASES])
def test_bad_row_fails_alone(client: Any, value: Any, error_type: str, message: str) -> None:
    df = pd.DataFrame({"prompt": pd.Series(["before", value, "after"], dtype=object)})
    out = df.genai.generate(column="prompt", client=client, details=True, progress=False)
    assert out["response"].tolist()[0::2] == ["echo: before", "echo: after"]
    assert pd.isna(out["response"].iloc[1])
    assert out["error_type"].iloc[1] == error_type
    assert message in out["error"].iloc[1]
    assert out["error_suggestion"].iloc[1]


def test_template_field_missing_in_one_row(client: Any) -> None:
    df = pd.DataFrame({"name": ["Ann", None, "Bo"]})
    out = df.genai.generate(template="Hello {name}", client=client, details=True, progress=False)
    assert out["response"].tolist()[0::2] == ["echo: Hello Ann", "echo: Hello Bo"]
    assert out["error_type"].iloc[1] == "InvalidPromptError" and "missing" in out["error"].iloc[1]


def test_one_megabyte_prompt_is_sent_like_any_other(client: Any, fake_server: Any) -> None:
    big = "word " * 200_000
    out = pd.DataFrame({"prompt": ["small", big]}).genai.generate(column="prompt", client=client, details=True,
                                                                  progress=False)
    assert out["error"].isna().all()
    assert fake_server.stats()["per_prompt"][big] == 1  # the server received all of it, once
    # The fake server echoes up to max_tokens words, as a model stops at its budget.
    assert out["response"].iloc[1] == "echo: " + " ".join(["word"] * 255)
    assert out["finish_reason"].iloc[1] == "length"


FRAME = pd.DataFrame({"prompt": ["a", "b"], "text": ["x", "y"]})
RAISE_CASES = [
    ("missing column", FRAME, {"column": "nope"}, "column 'nope' not found; the frame has columns"),
    ("unknown template field", FRAME, {"template": "{nope}"}, "column 'nope' not found"),
    ("bad template syntax", FRAME, {"template": "{text"}, "not a valid format string"),
    ("positional template field", FRAME, {"template": "{0}"}, "must name columns"),
    ("template without a field", FRAME, {"template": "no fields"}, r"has no \{column\} field"),
    ("neither column nor template", FRAME, {"column": None}, "exactly one of"),
    ("duplicate column names", pd.DataFrame([["a", "b"]], columns=["prompt", "prompt"]), {"column": "prompt"},
     "appears 2 times"),
    ("column and template", FRAME, {"column": "prompt", "template": "{text}"}, "exactly one of"),
    ("max_concurrent=0", FRAME, {"column": "prompt", "max_concurrent": 0}, "max_concurrent must be an integer >= 1"),
    ("temperature=5", FRAME, {"column": "prompt", "temperature": 5}, r"temperature must be a number in \[0, 2\]"),
    ("top_p=0", FRAME, {"column": "prompt", "top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ("max_tokens=0", FRAME, {"column": "prompt", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ("timeout=-1", FRAME, {"column": "prompt", "timeout": -1}, "timeout must be a number > 0"),
    ("chunk_size=0", FRAME, {"column": "prompt", "chunk_size": 0}, "chunk_size must be an integer >= 1"),
    ("same output names", FRAME, {"column": "prompt", "response_column": "x", "error_column": "x"}, "must differ"),
    ("existing output column", FRAME.assign(response=1), {"column": "prompt"}, "overwrite=True"),
]


@pytest.mark.parametrize(("df", "options", "message"), [c[1:] for c in RAISE_CASES], ids=[c[0] for c in RAISE_CASES])
def test_bad_option_raises_before_any_request(client: Any, fake_server: Any, df: pd.DataFrame,
                                              options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        df.genai.generate(client=client, progress=False, **options)
    assert fake_server.stats()["requests"] == 0


def test_unknown_provider(fake_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="unknown provider 'opnai'; known providers: .*openai"):
        FRAME.genai.generate(column="prompt", provider="opnai", progress=False)


def test_endpoint_without_scheme() -> None:
    with pytest.raises(ConfigurationError, match="has no scheme: write it as 'https://api.example.com/v1'"):
        FRAME.genai.generate(column="prompt", endpoint="api.example.com/v1", api_key="k", progress=False)


def test_checkpoint_path_that_is_a_file(client: Any, fake_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is a file; pass a directory path"):
        FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_checkpoint_directory_without_write_permission(client: Any, fake_server: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.ckpt"
    path.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: simulate what access() tells a normal user
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False)
    else:
        path.chmod(0o500)
    with pytest.raises(CheckpointError, match="not writable"):
        FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_truncated_parquet_part(client: Any, fake_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    part = next(path.glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:40])
    fake_server.reset()
    with pytest.raises(CheckpointCorruptError) as caught:
        FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    assert part.name in str(caught.value) and "repair=True" in str(caught.value)
    assert fake_server.stats()["requests"] == 0


def test_manifest_from_another_run(client: Any, fake_server: Any, tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fingerprint"]["model"] = "some-other-model"
    (path / "manifest.json").write_text(json.dumps(manifest))
    fake_server.reset()
    with pytest.raises(CheckpointMismatchError, match="resume=False"):
        FRAME.genai.generate(column="prompt", client=client, checkpoint=path, progress=False)
    assert fake_server.stats()["requests"] == 0


def test_unreachable_endpoint() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = create_client(endpoint=f"http://127.0.0.1:{port}/v1", model_name="m",
                           retry=RetryPolicy(max_retries=1, initial_delay=0.001))
    with pytest.raises(APIConnectionError, match=f"Is the server running at http://127.0.0.1:{port}/v1"):
        FRAME.genai.generate(column="prompt", client=client, progress=False)


@pytest.fixture
def html_endpoint() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b"<!DOCTYPE html><html><body>Please sign in to the corporate proxy</body></html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join()


def test_endpoint_that_answers_html(html_endpoint: str) -> None:
    client = create_client(endpoint=html_endpoint, model_name="m")
    out = FRAME.genai.generate(column="prompt", client=client, details=True, progress=False)
    assert out["error_type"].tolist() == ["MalformedResponseError"] * 2
    assert "not JSON (text/html" in out["error"].iloc[0] and "sign in" in out["error"].iloc[0]
    assert "endpoint" in out["error_suggestion"].iloc[0]


ENDPOINT_CASES = [
    ("invalid port", {"endpoint": "http://bob:hunter2-pw@127.0.0.1:99999/v1"}, "has an invalid port"),
    ("unparsable", {"endpoint": "http://[::1/v1"}, "is not a valid URL"),
    ("userinfo and a key",
     {"endpoint": "http://bob:hunter2-pw@127.0.0.1:9/v1", "api_key": "sk-bad-input-key"},
     r"endpoint 'http://\*\*\*@127.0.0.1:9/v1' has credentials in it"),
    ("fragment", {"endpoint": "http://127.0.0.1:9/v1#x"}, "has a #fragment"),
]


@pytest.mark.parametrize(("options", "message"), [c[1:] for c in ENDPOINT_CASES],
                         ids=[c[0] for c in ENDPOINT_CASES])
def test_bad_endpoint_raises_before_any_request(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        FRAME.genai.generate(column="prompt", model_name="m", progress=False, **options)
    assert "hunter2-pw" not in str(caught.value)


def test_max_response_bytes_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="max_response_bytes must be an integer >= 1, got 0"):
        create_client(endpoint="http://127.0.0.1:9/v1", model_name="m", max_response_bytes=0)
