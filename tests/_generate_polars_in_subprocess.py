"""Run polars' df.genai.generate over a Parquet input in its own process, for crash tests.

usage: python _generate_polars_in_subprocess.py INPUT.parquet OUTPUT.parquet CHECKPOINT ENDPOINT
           [--max-concurrent N] [--chunk-size N]
"""

from __future__ import annotations

import argparse

import polars as pl

import gen_ai_frames  # noqa: F401  (registers df.genai for polars once polars is imported)
from gen_ai_frames import create_client


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("source", "target", "checkpoint", "endpoint"):
        parser.add_argument(name)
    parser.add_argument("--max-concurrent", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=100)
    args = parser.parse_args()
    client = create_client(endpoint=args.endpoint, model_name="m")
    df = pl.read_parquet(args.source)
    out = df.genai.generate("prompt", client=client, checkpoint=args.checkpoint, max_concurrent=args.max_concurrent,
                            chunk_size=args.chunk_size, progress=False, details=True)
    out.write_parquet(args.target)


if __name__ == "__main__":
    main()
