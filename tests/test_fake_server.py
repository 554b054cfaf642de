"""Tests for gen_ai_frames.testing.fake_server (the fake OpenAI server)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gen_ai_frames.testing import FakeServer
from gen_ai_frames.testing.fake_server import FAULTS

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers
def post(
    url: str,
    payload: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """POST JSON with urllib; return (status, lower-cased headers, body) even for errors."""
    data = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:  # closes the underlying response: no ResourceWarning
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def chat(server: FakeServer, text: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    key = extra.pop("key", None)
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}
    status, headers, body = post(server.url + "/chat/completions", payload, key=key)
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body
    return status, headers, parsed


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


# --------------------------------------------------------------- basic answer
def test_chat_echo_and_usage(server: FakeServer) -> None:
    payload = {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "hello big world"},
        ],
    }
    status, headers, body = post(server.url + "/chat/completions", payload)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    data = json.loads(body)
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-test"
    assert data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello big world"}
    assert choice["finish_reason"] == "stop"
    # prompt tokens = whitespace words of all messages (2 + 2 + 2 + 3)
    assert data["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}

    # Same route without the /v1 prefix, and content given as parts.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x y"}]}]}
    status, _, body = post(server.base_url + "/chat/completions", parts)
    assert status == 200
    data = json.loads(body)
    assert data["choices"][0]["message"]["content"] == "echo: x y"
    assert data["model"] == "fake-model"  # default when the request has none

    stats = server.stats()
    assert stats["requests"] == 2
    assert stats["per_prompt"] == {"hello big world": 1, "x y": 1}
    assert stats["outcomes"] == {"hello big world": ["ok"], "x y": ["ok"]}
    assert stats["status_counts"] == {"200": 2}
    assert stats["in_flight"] == 0


def test_max_tokens_truncates_with_length(server: FakeServer) -> None:
    status, _, data = chat(server, "one two three four five", max_tokens=3)
    assert status == 200
    choice = data["choices"][0]
    assert choice["message"]["content"] == "echo: one two"
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3
    _, _, data = chat(server, "short", max_tokens=3)
    assert data["choices"][0]["finish_reason"] == "stop"


def test_completions_endpoint(server: FakeServer) -> None:
    status, _, body = post(server.url + "/completions", {"model": "m", "prompt": "say hi"})
    assert status == 200
    data = json.loads(body)
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert data["choices"][0]["text"] == "echo: say hi"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}

    # Without /v1, a batch of prompts -> one choice each, in order.
    status, _, body = post(server.base_url + "/completions", {"prompt": ["a", "b c"]})
    data = json.loads(body)
    assert [c["text"] for c in data["choices"]] == ["echo: a", "echo: b c"]
    assert [c["index"] for c in data["choices"]] == [0, 1]

    status, _, body = post(server.url + "/completions", {"prompt": "1 2 3 4", "max_tokens": 2})
    choice = json.loads(body)["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("echo: 1", "length")


# ------------------------------------------------------------ errors / config
def test_auth_401_never_echoes_key() -> None:
    secret = "sk-very-secret-123"
    with FakeServer(api_key=secret) as server:
        payload = {"messages": [{"role": "user", "content": "hi"}]}
        for key in (None, "wrong", secret + "x"):
            status, _, body = post(server.url + "/chat/completions", payload, key=key)
            assert status == 401
            err = json.loads(body)["error"]
            assert err["type"] == "invalid_request_error"
            assert err["code"] == "invalid_api_key"
            assert err["param"] is None
            assert secret not in body.decode()
        status, _, _ = post(server.url + "/chat/completions", payload, key=secret)
        assert status == 200
        stats = server.stats()
        assert stats["outcomes"]["hi"] == ["auth_error"] * 3 + ["ok"]
        assert stats["status_counts"] == {"401": 3, "200": 1}
        # Neither the stats, the config nor repr() reveal the key.
        assert secret not in json.dumps(stats)
        assert secret not in json.dumps(get_json(server.base_url + "/config"))
        assert secret not in repr(server)


def test_unknown_model_404_and_bad_json_400() -> None:
    with FakeServer(models=["good-model"]) as server:
        status, _, data = chat(server, "hi")  # model "fake-model" is not in the list
        assert status == 404
        assert data["error"]["code"] == "model_not_found"
        assert data["error"]["type"] == "invalid_request_error"
        assert "fake-model" in data["error"]["message"]
        payload = {"model": "good-model", "messages": [{"role": "user", "content": "hi"}]}
        assert post(server.url + "/chat/completions", payload)[0] == 200

        status, _, body = post(server.url + "/chat/completions", raw=b"{not json")
        assert status == 400
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        status, _, body = post(server.url + "/chat/completions", {"model": "good-model"})
        assert status == 400
        assert json.loads(body)["error"]["param"] == "messages"
        assert server.stats()["status_counts"] == {"404": 1, "200": 1, "400": 2}


def test_stats_reset_and_config_over_http(server: FakeServer) -> None:
    chat(server, "hi")
    assert get_json(server.base_url + "/stats")["requests"] == 1
    status, _, body = post(server.base_url + "/reset", {})
    assert status == 200
    assert get_json(server.base_url + "/stats")["requests"] == 0

    status, _, body = post(server.base_url + "/config", {"api_key": "k2", "latency": 0.01})
    assert status == 200
    cfg = json.loads(body)
    assert cfg["api_key_set"] is True and cfg["latency"] == 0.01 and "api_key" not in cfg
    assert chat(server, "hi")[0] == 401
    assert post(server.url + "/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}]}, key="k2")[0] == 200
    status, _, body = post(server.base_url + "/config", {"chaos": {"nope": 1}})
    assert status == 400
    status, _, body = post(server.base_url + "/config", {"no_such_setting": 1})
    assert status == 400

    server.configure(api_key=None, latency=0)
    assert chat(server, "hi")[0] == 200
    with pytest.raises(ValueError):
        server.configure(port=1234)
    with pytest.raises(TypeError):
        FakeServer(no_such_setting=1)
    with pytest.raises(ValueError):
        FakeServer(chaos={"500": 0.7, "502": 0.7})


def test_latency(server: FakeServer) -> None:
    server.configure(latency=0.15)
    t0 = time.perf_counter()
    assert chat(server, "slowish")[0] == 200
    assert time.perf_counter() - t0 >= 0.14
    server.configure(latency=0, latency_median=0.05, latency_sigma=0.1, seed=3)
    t0 = time.perf_counter()
    assert chat(server, "lognormal")[0] == 200
    assert 0.02 < time.perf_counter() - t0 < 2


# ----------------------------------------------------------------- directives
def test_directive_status_and_retry_after(server: FakeServer) -> None:
    status, headers, data = chat(server, "boom [[status=503]]")
    assert status == 503
    assert data["error"]["type"] == "server_error"
    assert "retry-after" not in headers

    status, headers, data = chat(server, "limited [[status=429]] [[retry_after=2]]")
    assert status == 429
    assert headers["retry-after"] == "2"
    assert data["error"]["code"] == "rate_limit_exceeded"
    status, headers, _ = chat(server, "plain limit [[status=429]]")
    assert status == 429 and "retry-after" not in headers

    outcomes = server.stats()["outcomes"]
    assert outcomes["boom [[status=503]]"] == ["503"]
    assert outcomes["limited [[status=429]] [[retry_after=2]]"] == ["429_retry_after"]
    assert outcomes["plain limit [[status=429]]"] == ["429_plain"]


def test_directive_fail_times(server: FakeServer) -> None:
    prompt = "flaky [[fail_times=2]]"
    assert [chat(server, prompt)[0] for _ in range(4)] == [500, 500, 200, 200]
    prompt2 = "flaky429 [[fail_times=1]] [[status=429]] [[retry_after=0.01]]"
    s1, h1, _ = chat(server, prompt2)
    time.sleep(0.02)
    s2, _, data = chat(server, prompt2)
    assert (s1, h1["retry-after"], s2) == (429, "0.01", 200)
    assert data["choices"][0]["message"]["content"] == "echo: " + prompt2
    stats = server.stats()
    assert stats["outcomes"][prompt] == ["500", "500", "ok", "ok"]
    assert stats["outcomes"][prompt2] == ["429_retry_after", "ok"]
    assert stats["per_prompt"][prompt] == 4
    # reset() starts the attempt count again
    server.reset()
    assert chat(server, prompt)[0] == 500


def test_directive_html_context_length_content_filter_error_body(server: FakeServer) -> None:
    status, headers, body = chat(server, "page [[html]]")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body.startswith(b"<!DOCTYPE html>")

    status, _, data = chat(server, "too long [[context_length]]")
    assert status == 400
    assert data["error"]["code"] == "context_length_exceeded"

    status, _, data = chat(server, "bad words [[content_filter]]")
    assert status == 200
    choice = data["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] is None

    status, _, data = chat(server, "oops [[error_body]]")
    assert status == 200
    assert "choices" not in data and data["error"]["message"]

    t0 = time.perf_counter()
    status, _, data = chat(server, "nap [[sleep=0.1]]")
    assert status == 200 and time.perf_counter() - t0 >= 0.09

    assert server.stats()["outcome_counts"] == {
        "html": 1, "context_length": 1, "content_filter": 1, "error_body": 1, "ok": 1,
    }


# ---------------------------------------------------------------------- chaos
async def _aio_chat(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[int, Any]:
    """Return (status, parsed JSON or text); raises aiohttp.ClientError on broken answers."""
    payload = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    async with session.post(url + "/chat/completions", json=payload) as resp:
        raw = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(raw)
        return resp.status, raw.decode()


def test_each_chaos_fault() -> None:
    async def run(server: FakeServer) -> None:
        async with aiohttp.ClientSession() as session:
            for fault in FAULTS:
                server.configure(chaos={fault: 1.0})
                prompt = f"fault {fault}"
                if fault in ("reset", "truncated"):
                    with pytest.raises(aiohttp.ClientError):
                        await _aio_chat(session, server.url, prompt)
                    await asyncio.sleep(0.02)  # let the server finish its side
                    assert server.stats()["outcomes"][prompt] == [fault]
                    continue
                payload = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
                async with session.post(server.url + "/chat/completions", json=payload) as r:
                    status, headers, raw = r.status, r.headers, await r.read()
                assert server.stats()["outcomes"][prompt] == [fault]
                if fault == "429_retry_after":
                    assert status == 429
                    assert headers["retry-after"] == "0.05"
                    assert headers["retry-after-ms"] == "50"
                    await asyncio.sleep(0.06)  # stay out of the window
                elif fault == "429_plain":
                    assert status == 429 and "retry-after" not in headers
                elif fault in ("500", "502", "503", "529"):
                    assert status == int(fault)
                    assert json.loads(raw)["error"]["message"]
                elif fault == "html":
                    assert status == 200 and headers["content-type"].startswith("text/html")
                elif fault == "wrong_shape":
                    data = json.loads(raw)
                    assert status == 200 and "choices" not in data
                else:
                    data = json.loads(raw)
                    assert status == 200
                    choice = data["choices"][0]
                    if fault == "slow":
                        assert choice["message"]["content"] == "echo: " + prompt
                    elif fault == "length":
                        assert choice["finish_reason"] == "length"
                        content = choice["message"]["content"]
                        assert ("echo: " + prompt).startswith(content)
                        assert len(content) < len("echo: " + prompt)
                    elif fault == "content_filter":
                        assert choice["finish_reason"] == "content_filter"
                        assert choice["message"]["content"] is None
        assert server.stats()["retry_after_violations"] == 0

    with FakeServer(chaos_retry_after=0.05, chaos_slow_seconds=0.05) as server:
        asyncio.run(run(server))


def _run_chaos_batch(seed: int, prompts: list[str], attempts: int = 6) -> tuple[dict, dict]:
    """Send every prompt concurrently, retrying failures; return (client view, stats)."""
    chaos = {"500": 0.2, "429_plain": 0.1, "wrong_shape": 0.1, "reset": 0.05}

    async def one(session: aiohttp.ClientSession, url: str, prompt: str) -> list[str]:
        seen = []
        for _ in range(attempts):
            try:
                status, data = await _aio_chat(session, url, prompt)
            except aiohttp.ClientError:
                seen.append("reset")
                continue
            if status != 200:
                seen.append(str(status))
            elif "choices" not in data:
                seen.append("wrong_shape")
            else:
                assert data["choices"][0]["message"]["content"] == "echo: " + prompt
                seen.append("ok")
                break
        return seen

    async def run(url: str) -> dict[str, list[str]]:
        async with aiohttp.ClientSession() as session:
            views = await asyncio.gather(*(one(session, url, p) for p in prompts))
        return dict(zip(prompts, views))

    with FakeServer(chaos=chaos, seed=seed) as server:
        client_view = asyncio.run(run(server.url))
        stats = server.stats()
    return client_view, stats


def test_chaos_is_deterministic_and_recorded() -> None:
    prompts = [f"prompt number {i}" for i in range(40)]
    view1, stats1 = _run_chaos_batch(7, prompts)
    view2, stats2 = _run_chaos_batch(7, prompts)
    _, stats3 = _run_chaos_batch(8, prompts)
    # Same seed -> same faults per prompt and attempt, whatever the arrival order.
    assert stats1["outcomes"] == stats2["outcomes"]
    assert stats1["outcomes"] != stats3["outcomes"]
    # The server's record matches what the client saw, attempt by attempt
    # (429_plain shows up as status "429" on the client side).
    server_view = {
        p: ["429" if o == "429_plain" else o for o in outs]
        for p, outs in stats1["outcomes"].items()
    }
    assert server_view == view1
    faults = {o for outs in stats1["outcomes"].values() for o in outs}
    assert {"ok", "500"} <= faults and faults <= {"ok", "500", "429_plain", "wrong_shape", "reset"}
    assert stats1["requests"] == sum(len(v) for v in view1.values())
    assert stats1["per_prompt"] == {p: len(v) for p, v in view1.items()}
    assert stats1["in_flight"] == 0


# ------------------------------------------------------- retry-after windows
def test_retry_after_violations_are_counted() -> None:
    with FakeServer(retry_after_grace=0.2) as server:
        status, headers, _ = chat(server, "limit me [[status=429]] [[retry_after=0.6]]")
        assert status == 429 and headers["retry-after"] == "0.6"
        assert chat(server, "inside the grace period")[0] == 200  # t < grace: allowed
        time.sleep(0.25)
        assert chat(server, "too early")[0] == 200  # inside the window: a violation
        time.sleep(0.4)
        assert chat(server, "after the window")[0] == 200
        stats = server.stats()
        assert stats["retry_after_windows_opened"] == 1
        assert stats["retry_after_violations"] == 1
        (detail,) = stats["retry_after_violation_details"]
        assert detail["prompt"] == "too early"
        assert detail["path"] == "/v1/chat/completions"
        assert detail["window_start"] <= detail["at"] < detail["window_end"]
        server.reset()
        assert server.stats()["retry_after_violations"] == 0


def test_chaos_429_opens_window_and_ms_header() -> None:
    with FakeServer(chaos={"429_retry_after": 1.0}, chaos_retry_after=0.3,
                    retry_after_grace=0.0) as server:
        status, headers, _ = chat(server, "a")
        assert (status, headers["retry-after"], headers["retry-after-ms"]) == (429, "0.3", "300")
        server.configure(chaos={})
        time.sleep(0.05)
        chat(server, "b")
        time.sleep(0.3)
        chat(server, "c")
        assert server.stats()["retry_after_violations"] == 1


# ----------------------------------------------------------------- in flight
def test_max_in_flight_counts_concurrent_requests() -> None:
    async def run(url: str, n: int) -> list[int]:
        connector = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(*(_aio_chat(session, url, f"p{i}") for i in range(n)))
        return [status for status, _ in results]

    with FakeServer(latency=0.4) as server:
        assert asyncio.run(run(server.url, 20)) == [200] * 20
        stats = server.stats()
        assert stats["max_in_flight"] == 20
        assert stats["in_flight"] == 0
        assert stats["requests"] == 20
        server.reset()
        assert asyncio.run(run(server.url, 3)) == [200] * 3
        assert server.stats()["max_in_flight"] == 3


def test_client_disconnect_during_slow_answer_frees_the_slot() -> None:
    async def run(url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=0.1)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                await _aio_chat(session, url, "never mind")

    with FakeServer(chaos={"slow": 1.0}, chaos_slow_seconds=30) as server:
        asyncio.run(run(server.url))
        deadline = time.monotonic() + 2
        while server.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = server.stats()
        assert stats["in_flight"] == 0
        assert stats["outcomes"]["never mind"] == ["slow"]


def test_start_stop_and_restart() -> None:
    server = FakeServer()
    with pytest.raises(RuntimeError):
        server.url
    server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        assert chat(server, "x")[0] == 200
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not server.running
    with server:  # can be started again
        assert chat(server, "y")[0] == 200


# ---------------------------------------------------------------- command line
def _spawn_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "gen_ai_frames.testing.fake_server", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _listening_line(proc: subprocess.Popen) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready:
        pytest.fail("fake server CLI did not print its listening line")
    return proc.stdout.readline()


def _stop_cli(proc: subprocess.Popen, sig: int) -> tuple[str, str]:
    proc.send_signal(sig)
    return proc.communicate(timeout=10)


def test_cli_prints_listening_line_and_stops_on_signals() -> None:
    # Both processes start together: their start-up (interpreter + imports)
    # overlaps, which keeps this test short.
    procs = [
        _spawn_cli("--port", "0", "--latency", "0.01", "--api-key-env", "FAKE_SERVER_TEST_KEY",
                   "--chaos", '{"500": 0.0}', "--seed", "1",
                   env={"FAKE_SERVER_TEST_KEY": "cli-secret"}),
        _spawn_cli("--access-log"),
    ]
    try:
        line = _listening_line(procs[0])
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        assert url.endswith("/v1")
        payload = {"messages": [{"role": "user", "content": "from cli"}]}
        assert post(url + "/chat/completions", payload)[0] == 401
        status, _, body = post(url + "/chat/completions", payload, key="cli-secret")
        assert status == 200
        assert json.loads(body)["choices"][0]["message"]["content"] == "echo: from cli"
        assert get_json(url.removesuffix("/v1") + "/stats")["requests"] == 2
        out, err = _stop_cli(procs[0], signal.SIGTERM)
        assert procs[0].returncode == 0
        assert out == ""  # exactly one line was printed
        assert err == ""  # no warnings, no access log, no key
        assert "cli-secret" not in line

        url2 = _listening_line(procs[1]).split()[-1]
        assert post(url2 + "/completions", {"prompt": "p"})[0] == 200
        _, err = _stop_cli(procs[1], signal.SIGINT)
        assert procs[1].returncode == 0
        assert "POST /v1/completions" in err  # --access-log logs to stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            else:
                proc.communicate()


_HEAVY_CHECK = (
    "import sys; heavy = {'pandas', 'numpy', 'pyarrow'} & set(sys.modules); "
    "assert not heavy, f'heavy modules imported: {sorted(heavy)}'"
)


def test_module_runs_as_a_plain_script_without_the_package() -> None:
    """The module only needs aiohttp, so `python path/to/fake_server.py` works
    too and never imports the package's heavy dependencies."""
    script = REPO_ROOT / "gen_ai_frames" / "testing" / "fake_server" / "__main__.py"
    code = (
        "import runpy, sys; sys.argv = ['fake_server', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n" + _HEAVY_CHECK
    )
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd="/",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "--latency-median" in result.stdout


# ------------------------------------------------------------ vendor dialects
def post_headers(url: str, payload: Any, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    """POST JSON with the given headers; return (status, lower-cased headers, parsed JSON)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json", **headers}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


def anthropic(server: FakeServer, text: str, key: str | None = None, **extra: Any) -> tuple[int, dict, Any]:
    payload = {"model": "claude-test", "max_tokens": 50, "system": "be brief",
               "messages": [{"role": "user", "content": text}], **extra}
    return post_headers(server.endpoint_for("anthropic") + "/messages", payload,
                        {"x-api-key": key} if key else {})


def azure(server: FakeServer, text: str, key: str | None = None, version: str | None = "2024-10-21",
          deployment: str = "my-dep") -> tuple[int, dict, Any]:
    url = server.endpoint_for("azure") + f"/openai/deployments/{deployment}/chat/completions"
    if version:
        url += f"?api-version={version}"
    return post_headers(url, {"messages": [{"role": "user", "content": text}]}, {"api-key": key} if key else {})


def gemini(server: FakeServer, text: str, key: str | None = None, model: str = "gemini-test",
           **extra: Any) -> tuple[int, dict, Any]:
    payload = {"contents": [{"role": "user", "parts": [{"text": text}]}],
               "systemInstruction": {"parts": [{"text": "be brief"}]},
               "generationConfig": {"maxOutputTokens": 50}, **extra}
    return post_headers(server.endpoint_for("gemini") + f"/models/{model}:generateContent", payload,
                        {"x-goog-api-key": key} if key else {})


def test_endpoint_for_each_provider(server: FakeServer) -> None:
    assert server.endpoint_for("openai") == server.endpoint_for("anthropic") == server.url
    assert server.endpoint_for("azure") == server.base_url
    assert server.endpoint_for("gemini") == server.base_url + "/v1beta"


def test_anthropic_dialect_answers_and_checks_the_request() -> None:
    with FakeServer(api_key="k") as server:
        status, _, data = anthropic(server, "hello there", key="k")
        assert status == 200
        assert data["type"] == "message" and data["role"] == "assistant" and data["model"] == "claude-test"
        assert data["content"] == [{"type": "text", "text": "echo: hello there"}]
        assert data["stop_reason"] == "end_turn"
        assert data["usage"] == {"input_tokens": 4, "output_tokens": 3}  # system words count too

        status, _, data = anthropic(server, "hello there", key="wrong")
        assert (status, data["type"], data["error"]["type"]) == (401, "error", "authentication_error")
        assert anthropic(server, "no key")[2]["error"]["message"] == "x-api-key header is required"
        # What the real API refuses, the fake refuses too.
        valid = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        for payload, fragment in [
            ({"model": "m", "messages": valid["messages"]}, "max_tokens: Field required"),
            ({**valid, "temperature": 1.5}, "temperature"),
            ({**valid, "messages": [{"role": "system", "content": "x"}]}, "top-level `system`"),
            ({**valid, "stop": ["x"]}, "stop: Extra inputs are not permitted"),
        ]:
            status, _, data = post_headers(server.url + "/messages", payload, {"x-api-key": "k"})
            assert status == 400 and data["error"]["type"] == "invalid_request_error"
            assert fragment in data["error"]["message"]
        assert server.stats()["outcome_counts"]["auth_error"] == 2


def test_anthropic_dialect_directives() -> None:
    with FakeServer(api_key="k") as server:
        expected = {529: "overloaded_error", 429: "rate_limit_error", 400: "invalid_request_error",
                    404: "not_found_error", 500: "api_error", 413: "request_too_large"}
        for code, kind in expected.items():
            status, _, data = anthropic(server, f"x [[status={code}]]", key="k")
            assert (status, data["type"], data["error"]["type"]) == (code, "error", kind)
        status, headers, _ = anthropic(server, "y [[status=429]] [[retry_after=0.01]]", key="k")
        assert (status, headers["retry-after"]) == (429, "0.01")
        status, _, data = anthropic(server, "z [[content_filter]]", key="k")
        assert (status, data["stop_reason"], data["content"]) == (200, "refusal", [])
        status, _, data = anthropic(server, "one two three four five", key="k", max_tokens=3)
        assert (data["content"][0]["text"], data["stop_reason"]) == ("echo: one two", "max_tokens")
        assert "prompt is too long" in anthropic(server, "w [[context_length]]", key="k")[2]["error"]["message"]
        status, _, data = anthropic(server, "v [[error_body]]", key="k")
        assert status == 200 and data["type"] == "error"


def test_azure_dialect() -> None:
    with FakeServer(api_key="k", models=["my-dep"]) as server:
        status, _, data = azure(server, "hello", key="k")
        assert status == 200
        assert data["choices"][0]["message"]["content"] == "echo: hello"
        assert data["model"] == "my-dep"  # the deployment plays the model
        assert data["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False
        assert azure(server, "hello", key="wrong")[0] == 401
        # A bearer token is not Azure's key header.
        url = server.base_url + "/openai/deployments/my-dep/chat/completions?api-version=1"
        assert post(url, {"messages": [{"role": "user", "content": "hi"}]}, key="k")[0] == 401
        status, _, data = azure(server, "hello", key="k", version=None)
        assert (status, data["error"]["code"]) == (404, "404")
        status, _, data = azure(server, "hello", key="k", deployment="other")
        assert (status, data["error"]["code"]) == (404, "DeploymentNotFound")
        status, _, data = azure(server, "bad [[content_filter]]", key="k")
        assert (status, data["error"]["code"]) == (400, "content_filter")
        assert data["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"
        status, headers, data = azure(server, "slow down [[status=429]] [[retry_after=0.01]]", key="k")
        assert (status, data["error"]["code"], headers["retry-after"]) == (429, "429", "0.01")
        assert "2024-10-21" in data["error"]["message"]
        assert server.stats()["outcomes"]["hello"] == ["ok", "auth_error", "bad_request", "model_not_found"]


def test_gemini_dialect() -> None:
    with FakeServer(api_key="k") as server:
        status, headers, data = gemini(server, "hello there", key="k")
        assert status == 200
        (candidate,) = data["candidates"]
        assert candidate["content"] == {"parts": [{"text": "echo: hello there"}], "role": "model"}
        assert candidate["finishReason"] == "STOP"
        assert data["usageMetadata"] == {"promptTokenCount": 4, "candidatesTokenCount": 3, "totalTokenCount": 7}
        assert data["modelVersion"] == "gemini-test"
        # The key also works as ?key= (Google accepts both).
        url = server.endpoint_for("gemini") + "/models/g:generateContent?key=k"
        assert post_headers(url, {"contents": [{"parts": [{"text": "q"}]}]}, {})[0] == 200

        status, _, data = gemini(server, "hello", key="wrong")
        assert (status, data["error"]["status"]) == (400, "INVALID_ARGUMENT")
        assert data["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        status, _, data = gemini(server, "hello")
        assert (status, data["error"]["status"]) == (403, "PERMISSION_DENIED")

        status, headers, data = gemini(server, "wait [[status=429]] [[retry_after=0.25]]", key="k")
        assert (status, data["error"]["status"]) == (429, "RESOURCE_EXHAUSTED")
        assert "retry-after" not in headers  # Gemini says it in the body
        assert data["error"]["details"] == [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                             "retryDelay": "0.25s"}]
        assert server.stats()["retry_after_windows_opened"] == 1
        time.sleep(0.26)

        status, _, data = gemini(server, "x [[content_filter]]", key="k")
        assert status == 200 and data["promptFeedback"]["blockReason"] == "SAFETY" and "candidates" not in data
        status, _, data = gemini(server, "one two three four", key="k",
                                 generationConfig={"max_output_tokens": 2})  # snake_case is accepted
        assert (data["candidates"][0]["content"]["parts"][0]["text"],
                data["candidates"][0]["finishReason"]) == ("echo: one", "MAX_TOKENS")
        for extra, fragment in [({"generationConfig": {"max_tokens": 5}}, 'Unknown name "max_tokens"'),
                                ({"messages": []}, 'Unknown name "messages"'),
                                ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role")]:
            status, _, data = gemini(server, "hi", key="k", **extra)
            assert (status, data["error"]["status"]) == (400, "INVALID_ARGUMENT")
            assert fragment in data["error"]["message"]
        for code, name in [(500, "INTERNAL"), (503, "UNAVAILABLE"), (404, "NOT_FOUND")]:
            status, _, data = gemini(server, f"e [[status={code}]]", key="k")
            assert (status, data["error"]["code"], data["error"]["status"]) == (code, code, name)
        url = server.endpoint_for("gemini") + "/models/g:streamGenerateContent"
        assert post_headers(url, {"contents": []}, {"x-goog-api-key": "k"})[0] == 404


def test_dialects_share_chaos_and_stats() -> None:
    with FakeServer(chaos={"wrong_shape": 1.0}) as server:
        assert "content" not in anthropic(server, "a")[2]
        assert "candidates" not in gemini(server, "b")[2]
        assert "choices" not in azure(server, "c")[2]
        server.configure(chaos={"length": 1.0})
        assert anthropic(server, "one two three four")[2]["stop_reason"] == "max_tokens"
        assert gemini(server, "one two three four")[2]["candidates"][0]["finishReason"] == "MAX_TOKENS"
        stats = server.stats()
    assert stats["requests"] == 5
    assert stats["outcomes"] == {"a": ["wrong_shape"], "b": ["wrong_shape"], "c": ["wrong_shape"],
                                 "one two three four": ["length", "length"]}


# ------------------------------------------------------------ rate limits
def test_request_limit_is_a_token_bucket_with_openai_headers() -> None:
    # 600 a minute = 10 a second; the bucket holds one second of them.
    with FakeServer(rate_limit_rpm=600) as server:
        answers = [chat(server, f"p{i}") for i in range(12)]
        stats = server.stats()
    statuses = [status for status, _, _ in answers]
    assert statuses[:10] == [200] * 10 and 429 in statuses[10:]  # the burst, then refused
    _, headers, _ = answers[0]
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"].endswith("ms")  # e.g. "100ms": one request's refill
    assert int(answers[9][1]["x-ratelimit-remaining-requests"]) <= 3  # little refilled meanwhile
    status, headers, body = answers[statuses.index(429)]
    assert 0 < int(headers["retry-after-ms"]) <= 100 and headers["retry-after"] == "1"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert stats["outcome_counts"]["rate_limited"] == statuses.count(429)
    assert stats["retry_after_windows_opened"] == statuses.count(429)


def test_token_limit_charges_prompt_words_plus_max_tokens() -> None:
    # 6000 tokens a minute = 100 a second, one second of burst.
    with FakeServer(rate_limit_tpm=6000) as server:
        first = chat(server, "one two three four five", max_tokens=55)  # 5 + 55 = 60 tokens
        second = chat(server, "one two three four five", max_tokens=55)  # 40 left: refused
    assert first[0] == 200 and first[1]["x-ratelimit-limit-tokens"] == "6000"
    assert first[1]["x-ratelimit-remaining-tokens"] == "40"
    assert "x-ratelimit-limit-requests" not in first[1]  # only the limits that are set
    assert second[0] == 429 and 150 <= int(second[1]["retry-after-ms"]) <= 200


def test_retry_after_style_says_nothing_but_retry_after() -> None:
    with FakeServer(rate_limit_rpm=120, rate_limit_style="retry_after") as server:  # 2 a second
        answers = [chat(server, f"p{i}") for i in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert not any(name.startswith("x-ratelimit") for name in answers[0][1])
    assert answers[2][1]["retry-after"] == "1" and "retry-after-ms" not in answers[2][1]


def test_anthropic_dialect_states_limits_in_its_own_headers() -> None:
    with FakeServer(rate_limit_rpm=60, rate_limit_tpm=60000, rate_limit_burst=2) as server:  # 2 requests
        answers = [anthropic(server, f"p{i}") for i in range(3)]
    (status, headers, _), limited = answers[0], answers[2]
    assert status == 200 and headers["anthropic-ratelimit-requests-limit"] == "60"
    assert headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert headers["anthropic-ratelimit-tokens-limit"] == "60000"
    reset = headers["anthropic-ratelimit-requests-reset"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", reset)
    assert not any(name.startswith("x-ratelimit") for name in headers)
    assert limited[0] == 429 and limited[2]["error"]["type"] == "rate_limit_error"
    assert limited[1]["retry-after"] == "1"


def test_gemini_rate_limit_wait_travels_in_the_body() -> None:
    with FakeServer(rate_limit_rpm=60) as server:  # one request of burst
        answers = [gemini(server, f"p{i}") for i in range(2)]
    assert answers[0][0] == 200 and answers[1][0] == 429
    assert "retry-after" not in answers[1][1]
    assert answers[1][2]["error"]["details"][0]["retryDelay"] == "1s"


def test_rate_limit_settings_are_validated_and_reset_refills() -> None:
    for bad in ({"rate_limit_rpm": 0}, {"rate_limit_tpm": -5}, {"rate_limit_burst": 0},
                {"rate_limit_style": "loud"}):
        with pytest.raises(ValueError, match="rate_limit"):
            FakeServer(**bad)
    with FakeServer(rate_limit_rpm=60) as server:
        assert [chat(server, "a")[0], chat(server, "b")[0]] == [200, 429]
        server.reset()  # a fresh bucket, as for a new benchmark round
        assert chat(server, "c")[0] == 200
        server.configure(rate_limit_rpm=None)  # no limit any more
        assert {chat(server, f"d{i}")[0] for i in range(5)} == {200}


def test_cli_takes_rate_limit_options() -> None:
    proc = _spawn_cli("--rate-limit-rpm", "60", "--rate-limit-style", "retry_after")
    try:
        url = _listening_line(proc).split("listening on ", 1)[1].strip()
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert post(url + "/chat/completions", payload)[0] == 200
        status, headers, _ = post(url + "/chat/completions", payload)
        assert status == 429 and headers["retry-after"] == "1"
    finally:
        _stop_cli(proc, signal.SIGTERM)
