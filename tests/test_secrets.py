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
        seen += [repr(client), str(client), repr(client.provider), repr(wrong), repr(server)]
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
