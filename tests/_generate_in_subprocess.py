"""Run df.genai.generate over a Parquet input in its own process, for crash tests.

usage: python _generate_in_subprocess.py INPUT.parquet OUTPUT.parquet CHECKPOINT ENDPOINT MAX_CONCURRENT CHUNK_SIZE
"""

from __future__ import annotations

import sys

import pandas as pd

import gen_ai_frames  # noqa: F401

def main() -> None:
    source, target, checkpoint, endpoint, max_concurrent, chunk_size = sys.argv[1:7]
    df = pd.read_parquet(source)
    out = df.genai.generate(column="prompt", provider="openai", endpoint=endpoint, model_name="m",
                            checkpoint=checkpoint, max_concurrent=int(max_concurrent), chunk_size=int(chunk_size),
                            progress=False)
    out.to_parquet(target)


if __name__ == "__main__":
    main()
