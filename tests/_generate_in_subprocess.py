"""Run df.genai.generate over a Parquet input in its own process, for crash tests.

usage: python _generate_in_subprocess.py INPUT.parquet OUTPUT.parquet CHECKPOINT ENDPOINT
           [--max-concurrent N] [--chunk-size N] [--timeout S] [--fast-retry]
"""

from __future__ import annotations

import argparse

import pandas as pd

import gen_ai_frames  # noqa: F401
from gen_ai_frames import RetryPolicy, create_client


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("source", "target", "checkpoint", "endpoint"):
        parser.add_argument(name)
    parser.add_argument("--max-concurrent", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--fast-retry", action="store_true")
    args = parser.parse_args()
    retry = RetryPolicy(initial_delay=0.01, max_delay=0.05, jitter=0.1) if args.fast_retry else None
    client = create_client(endpoint=args.endpoint, model_name="m", retry=retry)
    df = pd.read_parquet(args.source)
    out = df.genai.generate(column="prompt", client=client, checkpoint=args.checkpoint, timeout=args.timeout,
                            max_concurrent=args.max_concurrent, chunk_size=args.chunk_size, progress=False,
                            details=True)
    out.to_parquet(args.target)


if __name__ == "__main__":
    main()
