"""Checkpoints on object storage: the current manifest on a local disk and on S3, and Delta Lake.

Everything runs against moto's S3 server started here on 127.0.0.1 (in this process, in a thread:
its CPU is shared with the client, and it answers in about a millisecond, so real S3, at 10-30 ms a
request, is slower per request; count requests, not milliseconds, when comparing with AWS).

Variants, each writing ``--appends`` chunks of ``--rows`` records (a 200-character answer each):

* ``local``      ``Checkpoint`` on a local directory (flock, fsync, rename): today's path
* ``s3``         ``Checkpoint`` on ``s3://`` (gen_ai_frames.storage: s3fs, lease, conditional writes)
* ``delta``      ``deltalake.write_deltalake(mode="append")`` of the same Arrow chunks to an ``s3://``
                 Delta table (conditional-put commits, ``aws_conditional_put="etag"``)

Measured: ``open`` (empty checkpoint), ``append`` (median and max per chunk), ``resume`` (open the
full checkpoint and read every record, as a resumed run does), and ``read`` (``read_checkpoint``
or ``DeltaTable(...).to_pyarrow_table()``). Also the raw cost of one 100 kB PUT with s3fs, boto3
and pyarrow.fs, the three clients considered for the backend.

    python benchmarks/bench_s3_checkpoint.py                  # 40 appends of 500 rows
    python benchmarks/bench_s3_checkpoint.py --appends 10 --rows 100
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import pyarrow as pa  # noqa: E402

from gen_ai_frames import storage  # noqa: E402
from gen_ai_frames.checkpoint import Checkpoint, _to_table, make_records, read_checkpoint  # noqa: E402


def chunks(appends: int, rows: int) -> list[pa.Table]:
    answer = "x" * 200
    return [
        _to_table(make_records([f"prompt {i * rows + j}" for j in range(rows)], responses=[answer] * rows,
                               positions=range(i * rows, (i + 1) * rows)))
        for i in range(appends)
    ]


def timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def bench_checkpoint(path: str, tables: list[pa.Table]) -> dict[str, Any]:
    fingerprint = {"model": "m"}
    # The first open of a process also builds the client (an s3fs session): measured apart.
    first = timed(lambda: Checkpoint.open(path + "-first", fingerprint).close())
    start = time.perf_counter()
    ckpt = Checkpoint.open(path, fingerprint)
    opened = time.perf_counter() - start
    appends = [timed(lambda t=t: ckpt.append(t)) for t in tables]
    ckpt.close()
    start = time.perf_counter()
    with Checkpoint.open(path, fingerprint) as again:
        rows = len(again.records())
    resume = time.perf_counter() - start
    read = timed(lambda: read_checkpoint(path))
    assert rows == sum(t.num_rows for t in tables)
    return {"first": first, "open": opened, "append": statistics.median(appends),
            "append_max": max(appends), "resume": resume, "read": read}


def bench_delta(url: str, endpoint: str, tables: list[pa.Table]) -> dict[str, Any]:
    from deltalake import DeltaTable, write_deltalake

    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "aws_conditional_put": "etag"}
    first = timed(lambda: write_deltalake(url, tables[0], mode="append", storage_options=options))
    appends = [first] + [
        timed(lambda t=t: write_deltalake(url, t, mode="append", storage_options=options)) for t in tables[1:]
    ]
    start = time.perf_counter()
    table = DeltaTable(url, storage_options=options).to_pyarrow_table()
    read = time.perf_counter() - start
    assert table.num_rows == sum(t.num_rows for t in tables)
    return {"first": first, "open": first, "append": statistics.median(appends),
            "append_max": max(appends), "resume": read, "read": read}


def bench_put(bucket: str, endpoint: str, size: int = 100_000, n: int = 30) -> dict[str, Any]:
    import pyarrow.fs
    import s3fs

    body = os.urandom(size)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    client = boto3.client("s3")
    host = endpoint.split("://", 1)[1]
    arrow = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme="http", access_key="bench",
                                    secret_key="bench", region="us-east-1")
    variants = {
        "s3fs": lambda i: fs.call_s3("put_object", Bucket=bucket, Key=f"put/s3fs-{i}", Body=body),
        "boto3": lambda i: client.put_object(Bucket=bucket, Key=f"put/boto3-{i}", Body=body),
        "pyarrow.fs": lambda i: _arrow_put(arrow, f"{bucket}/put/arrow-{i}", body),
    }
    results: dict[str, Any] = {}
    for name, put in variants.items():
        try:
            put(-1)  # warm up the connection
        except OSError as exc:
            results[name] = f"failed: {str(exc).splitlines()[0][:100]}"
            continue
        results[name] = statistics.median(timed(lambda i=i, put=put: put(i)) for i in range(n))
    return results


def _arrow_put(fs: Any, path: str, body: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=40)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--no-delta", action="store_true")
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_address[1]}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    tables = chunks(args.appends, args.rows)
    print(f"{args.appends} appends of {args.rows} rows; moto S3 on {endpoint}; lease {storage.LEASE_SECONDS} s")
    results = {
        "local": bench_checkpoint(os.path.join(tempfile.mkdtemp(), "run.ckpt"), tables),
        "s3": bench_checkpoint(f"s3://{bucket}/run.ckpt", tables),
    }
    if not args.no_delta:
        results["delta"] = bench_delta(f"s3://{bucket}/delta", endpoint, tables)
    print(f"{'variant':8} {'1st open':>9} {'open ms':>8} {'append ms':>10} {'max ms':>8} {'resume ms':>10} "
          f"{'read ms':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['first'] * 1e3:9.1f} {r['open'] * 1e3:8.1f} {r['append'] * 1e3:10.1f} "
              f"{r['append_max'] * 1e3:8.1f} {r['resume'] * 1e3:10.1f} {r['read'] * 1e3:8.1f}")
    print("one 100 kB PUT, median of 30:")
    for name, seconds in bench_put(bucket, endpoint).items():
        print(f"  {name:10} " + (f"{seconds * 1e3:6.1f} ms" if isinstance(seconds, float) else seconds))
    server.stop()


if __name__ == "__main__":
    main()
