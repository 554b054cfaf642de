"""Secrets and transport safety: the API key appears nowhere, TLS is verified by default, and
credentials in an endpoint URL are redacted wherever the URL is shown."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from gen_ai_frames import APIConnectionError, AuthenticationError, FailedPromptsWarning, create_client
from gen_ai_frames.checkpoint import Checkpoint, read_checkpoint
from gen_ai_frames.testing import FakeServer

from .conftest import FAKE_KEY, FAST_RETRY


def all_text_under(path: Path) -> bytes:
    return b"".join(file.read_bytes() for file in sorted(path.rglob("*")) if file.is_file())


def test_api_key_audit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run with failures and retries, then every artefact searched for the key."""
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's and asyncio's included
    seen: list[str] = []
    with FakeServer(api_key=FAKE_KEY) as server:
        client = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY, retry=FAST_RETRY,
                               rate_limit_timeout=1)  # "limited" is refused for ever: give up after 1 s
        df = pd.DataFrame({"prompt": ["ok", "flaky [[fail_times=2]] [[status=503]]", "bad [[status=400]]",
                                      "limited [[status=429]]", "", None, "html [[html]]"]})
        ckpt = tmp_path / "run.ckpt"
        out = df.genai.generate(column="prompt", client=client, checkpoint=ckpt, details=True, progress=False)
        assert out["attempts"].iloc[1] == 3 and out["error_type"].iloc[3] == "RateLimitError"  # retries happened
        seen += [out.to_csv(), repr(out), read_checkpoint(ckpt).to_csv()]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client.generate_batch_response(list(df["prompt"]))
        assert any(issubclass(w.category, FailedPromptsWarning) for w in caught)
        seen += [str(w.message) for w in caught]
        _, errors = client.generate_batch_response(list(df["prompt"]), return_error=True)
        seen += [repr(errors)]
        wrong = create_client(endpoint=server.url, model_name="m", api_key=FAKE_KEY[::-1])
        with pytest.raises(AuthenticationError) as raised:
            wrong.generate_response("hi")
        seen += [str(raised.value), repr(raised.value), repr(raised.value.to_dict()), str(raised.value.__context__)]
        seen += [repr(client), str(client), repr(client.provider), repr(client.retry), repr(wrong), repr(server)]
        with Checkpoint.open(ckpt, {**client.fingerprint(), "x": 1}, resume=False) as store:
            seen += [repr(store)]
    seen += [record.getMessage() for record in caplog.records]
    seen += [repr(record.args) for record in caplog.records]
    for key in (FAKE_KEY, FAKE_KEY[::-1]):
        assert not [text for text in seen if key in text]
        assert key.encode() not in all_text_under(ckpt)


def test_endpoint_credentials_are_redacted_everywhere(tmp_path: Path) -> None:
    with FakeServer() as server:
        endpoint = server.url.replace("http://", "http://alice:s3cret-pw@")
        client = create_client(endpoint=endpoint, model_name="m")
        df = pd.DataFrame({"prompt": ["a"]})
        out = df.genai.generate(column="prompt", client=client, checkpoint=tmp_path / "c", progress=False)
        assert out["response"].tolist() == ["echo: a"]  # the credentials still work for the request
        shown = [repr(client), str(client.fingerprint()), all_text_under(tmp_path / "c").decode("latin-1")]
    dead = create_client(endpoint="http://bob:hunter2@127.0.0.1:9/v1", model_name="m",
                         retry=FAST_RETRY.__class__(max_retries=0))
    _, errors = dead.generate_batch_response(["a"], return_error=True)
    shown += [errors[0]["message"], errors[0]["suggestion"], repr(dead)]
    assert "***@127.0.0.1:9" in errors[0]["message"]
    assert not [s for s in shown if "s3cret-pw" in s or "hunter2" in s]


# TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, as a private CA would issue."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gen-ai-frames test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def https_url(certificate: tuple[Path, Path]) -> Iterator[str]:
    """The fake server's OpenAI API over HTTPS on a loopback port."""
    from aiohttp import web

    from gen_ai_frames.testing.fake_server import FakeLLM

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(FakeLLM().make_app(), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{port}/v1"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def test_tls_is_verified_by_default(https_url: str) -> None:
    client = create_client(endpoint=https_url, model_name="m", api_key=FAKE_KEY)
    with pytest.raises(APIConnectionError) as caught:
        client.generate_response("hi")
    assert "TLS" in caught.value.message and "verify=" in caught.value.suggestion
    responses, errors = client.generate_batch_response(["a", "b"], return_error=True, max_concurrent=1)
    assert responses == [None, None] and errors[1]["sent"] is False  # a certificate error stops the run


def test_custom_ca_bundle_and_verify_false(https_url: str, certificate: tuple[Path, Path]) -> None:
    trusted = create_client(endpoint=https_url, model_name="m", api_key=FAKE_KEY, verify=str(certificate[0]))
    assert trusted.generate_batch_response(["a", "b"]) == ["echo: a", "echo: b"]
    unverified = create_client(endpoint=https_url, model_name="m", api_key=FAKE_KEY, verify=False)
    assert unverified.generate_response("c") == "echo: c"


# Every credential form, everywhere (issue 13) ---------------------------------------------------
def test_userinfo_plus_a_bearer_key_is_one_clear_error_without_the_password() -> None:
    from gen_ai_frames import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        create_client(endpoint="http://alice:s3cret-pw@127.0.0.1:9/v1", model_name="m", api_key=FAKE_KEY)
    message = str(caught.value)
    assert "has credentials in it" in message and "http://***@127.0.0.1:9/v1" in message
    assert "s3cret-pw" not in message and FAKE_KEY not in message


def test_userinfo_with_a_key_in_its_own_header_sends_both() -> None:
    from gen_ai_frames.testing.hostile import HostileServer

    with HostileServer() as server:
        endpoint = server.url.replace("http://", "http://alice:s3cret-pw@")
        client = create_client(provider="anthropic", endpoint=endpoint, model_name="m", api_key=FAKE_KEY)
        assert client.generate_response("hi") == "echo: hi"
        (seen,) = server.requests
    assert seen.headers["x-api-key"] == FAKE_KEY and seen.headers["authorization"].startswith("Basic ")
    assert "s3cret-pw" not in repr(client) and "s3cret-pw" not in str(client.fingerprint())


@pytest.mark.parametrize(("endpoint", "message"), [
    ("http://bob:hunter2-pw@127.0.0.1:99999/v1", "has an invalid port"),
    ("http://bob:hunter2-pw@127.0.0.1:8x/v1", "has an invalid port"),
    ("http://[::1/v1", "is not a valid URL"),
    ("http://bob:hunter2-pw@[::1/v1", "is not a valid URL"),
    ("http://bob:hunter2-pw@/v1", "has no host name"),
    ("http://127.0.0.1:8000/v1#frag", "has a #fragment"),
    ("http://127.0.0.1:8000/my v1", "contains spaces"),
])
def test_an_unusable_endpoint_is_one_configuration_error(endpoint: str, message: str) -> None:
    from gen_ai_frames import ConfigurationError

    with pytest.raises(ConfigurationError, match=message) as caught:
        create_client(endpoint=endpoint, model_name="m")
    assert "hunter2-pw" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("endpoint", ["http://bob:hunter2-pw@127.0.0.1:99999/v1", "http://[::1/v1",
                                      "http://bob:hunter2-pw@127.0.0.1:9/v1"])
def test_the_cli_reports_a_bad_endpoint_in_one_line(tmp_path: Path, endpoint: str) -> None:
    import os
    import subprocess
    import sys

    source = tmp_path / "in.csv"
    source.write_text("prompt\nhello\n")
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY}  # with the key: userinfo plus a bearer key
    done = subprocess.run([sys.executable, "-m", "gen_ai_frames", "generate", str(source), "-o",
                           str(tmp_path / "out.csv"), "--column", "prompt", "--endpoint", endpoint,
                           "--model", "m", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gen-ai-frames: error: endpoint "), done.stderr
    assert "hunter2-pw" not in done.stderr + done.stdout and FAKE_KEY not in done.stderr
    assert not (tmp_path / "out.csv").exists()


def test_a_key_in_the_query_string_is_sent_but_never_shown(tmp_path: Path) -> None:
    from gen_ai_frames.testing.hostile import HostileServer, Reply

    secret = "qs-secret-4471"
    echo = Reply(status=400,
                 json={"error": {"message": f"bad request for /v1/chat/completions?key={secret}"}})
    with HostileServer({"echo": echo}) as server:
        client = create_client(endpoint=f"{server.url}?key={secret}", model_name="m", retry=FAST_RETRY)
        out = pd.DataFrame({"prompt": ["a", "echo"]}).genai.generate(
            column="prompt", client=client, checkpoint=tmp_path / "c", details=True, progress=False)
        assert server.requests[0].path == f"/v1/chat/completions?key={secret}"  # the gateway gets it
    assert out["response"].iloc[0] == "echo: a"
    assert out["error"].iloc[1] == "HTTP 400: bad request for /v1/chat/completions?key=***"
    dead = create_client(endpoint=f"http://127.0.0.1:9/v1?key={secret}", model_name="m",
                         retry=FAST_RETRY.__class__(max_retries=0))
    _, errors = dead.generate_batch_response(["a"], return_error=True)
    shown = [repr(client), str(client.fingerprint()), repr(client.provider), out.to_csv(), repr(errors),
             all_text_under(tmp_path / "c").decode("latin-1")]
    assert "?key=***" in repr(client) and "?key=***" in errors[0]["message"]
    assert not [text for text in shown if secret in text]


def test_a_key_echoed_by_a_proxy_never_reaches_the_cli_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gen_ai_frames.cli import main
    from gen_ai_frames.testing.hostile import HostileServer, Reply

    source, target = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_text("prompt\nfine\necho\n")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    with HostileServer({"echo": Reply(status=400, echo_key=True)}) as server:
        code = main(["generate", str(source), "-o", str(target), "--column", "prompt", "--endpoint",
                     server.url, "--model", "m", "--no-progress", "--max-concurrent", "1",
                     "--checkpoint", str(tmp_path / "c")])
        assert FAKE_KEY in server.requests[-1].headers["authorization"]
    captured = capsys.readouterr()
    assert code == 1 and "Incorrect API key provided: ***" in captured.err + target.read_text()
    assert FAKE_KEY not in captured.out + captured.err + target.read_text()
    assert FAKE_KEY.encode() not in all_text_under(tmp_path / "c")
