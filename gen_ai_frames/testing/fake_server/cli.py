"""The fake server's command line: ``python -m gen_ai_frames.testing.fake_server``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from .app import FakeLLM
from .common import _loads
from .loopback import _start_site
from .settings import _RATE_LIMIT_STYLES, _validate


# ------------------------------------------------------------------ command line
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gen_ai_frames.testing.fake_server",
        description="OpenAI-compatible fake LLM server (prints 'listening on URL').",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="fixed latency (s)")
    parser.add_argument(
        "--latency-median", type=float, default=None, help="lognormal latency median (s); overrides --latency"
    )
    parser.add_argument("--latency-sigma", type=float, default=0.5)
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="require the API key stored in this environment variable "
        "(never on the command line, where `ps` shows it)",
    )
    parser.add_argument("--models", default=None, help="comma-separated accepted models")
    parser.add_argument("--chaos", default=None, help="JSON, e.g. '{\"500\": 0.1}'")
    parser.add_argument("--chaos-retry-after", type=float, default=1.0)
    parser.add_argument("--chaos-slow-seconds", type=float, default=30.0)
    parser.add_argument("--retry-after-grace", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rate-limit-rpm", type=float, default=None, help="requests per minute (token bucket)"
    )
    parser.add_argument("--rate-limit-tpm", type=float, default=None, help="tokens per minute (token bucket)")
    parser.add_argument(
        "--rate-limit-burst", type=float, default=1.0, help="seconds of the rate a bucket holds"
    )
    parser.add_argument(
        "--rate-limit-style",
        choices=_RATE_LIMIT_STYLES,
        default="headers",
        help="state the limits in headers, or only Retry-After on 429s",
    )
    parser.add_argument("--access-log", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    if args.api_key_env is not None and not os.environ.get(args.api_key_env):
        parser.error(f"environment variable {args.api_key_env} is not set or empty")
    try:
        _validate(
            {
                "rate_limit_rpm": args.rate_limit_rpm,
                "rate_limit_tpm": args.rate_limit_tpm,
                "rate_limit_burst": args.rate_limit_burst,
            }
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.chaos is not None:
        try:
            args.chaos = _loads(args.chaos.encode())
            _validate({"chaos": args.chaos})
        except (ValueError, TypeError) as exc:
            parser.error(f"--chaos: {exc}")
    return args


async def _serve(args: argparse.Namespace) -> None:
    settings: dict[str, Any] = {
        "latency": args.latency,
        "latency_median": args.latency_median,
        "latency_sigma": args.latency_sigma,
        "chaos": args.chaos or {},
        "chaos_retry_after": args.chaos_retry_after,
        "chaos_slow_seconds": args.chaos_slow_seconds,
        "retry_after_grace": args.retry_after_grace,
        "seed": args.seed,
        "rate_limit_rpm": args.rate_limit_rpm,
        "rate_limit_tpm": args.rate_limit_tpm,
        "rate_limit_burst": args.rate_limit_burst,
        "rate_limit_style": args.rate_limit_style,
    }
    if args.api_key_env:
        settings["api_key"] = os.environ[args.api_key_env]
    if args.models:
        settings["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    fake = FakeLLM(**settings)
    runner = fake.make_runner(access_log=args.access_log)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    try:
        port = await _start_site(runner, args.host, args.port)
        # The one line a parent process waits for; flushed because stdout is a pipe.
        print(f"listening on http://{args.host}:{port}/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0
