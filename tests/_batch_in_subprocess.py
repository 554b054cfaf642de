"""Run df.genai.generate(mode="batch") over a Parquet input in its own process, for crash tests.

usage: python _batch_in_subprocess.py INPUT.parquet OUTPUT.parquet CHECKPOINT PROVIDER ENDPOINT KEY
           [--kill-after-create] [--kill-after-upload]

``--kill-after-create`` SIGKILLs this process right after the provider answered the create call
(before the batch id is recorded); ``--kill-after-upload`` right after the requests file was
uploaded (before the create call).
"""

from __future__ import annotations

import argparse
import os
import signal

import pandas as pd

import gen_ai_frames  # noqa: F401
from gen_ai_frames.providers import batches

MODELS = {"openai": "gpt-4o-mini", "azure": "dep", "anthropic": "claude-3-haiku", "gemini": "gemini-2.0-flash"}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("source", "target", "checkpoint", "provider", "endpoint", "key"):
        parser.add_argument(name)
    parser.add_argument("--kill-after-create", action="store_true")
    parser.add_argument("--kill-after-upload", action="store_true")
    args = parser.parse_args()
    dialect = batches._DIALECTS[args.provider]

    def killing(method: str) -> None:
        original = getattr(dialect, method)

        def then_die(self: batches.BatchDialect, *a: object) -> object:
            original(self, *a)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable")

        setattr(dialect, method, then_die)

    if args.kill_after_create:
        killing("parse_created")
    if args.kill_after_upload:
        killing("parse_upload")
    df = pd.read_parquet(args.source)
    out = df.genai.generate(column="prompt", provider=args.provider, model_name=MODELS[args.provider],
                            api_key=args.key, endpoint=args.endpoint, mode="batch", checkpoint=args.checkpoint,
                            poll_interval=0.01, progress=False, details=True)
    out.to_parquet(args.target)


if __name__ == "__main__":
    main()
