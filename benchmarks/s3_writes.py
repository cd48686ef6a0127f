"""Small-file writes to S3: what the work directory's markers, figures and the pipeline's
held-out test images cost, against moto's S3 server on loopback (started here).

Baselines, in the same run: a plain boto3 `put_object` loop (what a script would do;
one request a file), and pyarrow's S3 output stream, as opened by default (a multipart
upload a file: create, part, complete, three requests) and with `allow_delayed_open`
(small files as one PutObject). Measured against the boto3 loop, each round timing
every way back to back, in an order that rotates (the median ratio):
  - `storage.write_bytes`, one file at a time (one boto3 PutObject a file under 64 MB,
    with the checks and retries the work directory's writes need);
  - `storage.write_many`, 32 at a time (how the score stage writes the test images).

moto runs in this process, so its Python and boto3's share one GIL on loopback: 32
writers at once gain less here than against a real store, where they wait on the network.

    python benchmarks/s3_writes.py [--files 300] [--bytes 4000] [--rounds 5]

Against real S3 the gain per file is larger: each request is a network round trip of
~10-30 ms, where moto on loopback spends ~5-10 ms of Python per request.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import time
from statistics import median

import pyarrow.fs as pafs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> object:
    from moto.server import ThreadedMotoServer

    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def per_file_ms(write, files: dict[str, bytes]) -> float:
    started = time.perf_counter()
    write(files)
    return (time.perf_counter() - started) / len(files) * 1000


def pyarrow_one_by_one(fs: pafs.S3FileSystem):
    def write(files: dict[str, bytes]) -> None:
        for uri, data in files.items():
            with fs.open_output_stream(uri.removeprefix("s3://")) as f:
                f.write(data)
    return write


def boto3_one_by_one(client):
    def write(files: dict[str, bytes]) -> None:
        for uri, data in files.items():
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            client.put_object(Bucket=bucket, Key=key, Body=data)
    return write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--bytes", type=int, default=4000, help="size of each file (a 128 px JPEG: ~4-6 KB)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    server = start_moto()
    from deepfake_ray import storage  # after the endpoint is in the environment

    import boto3

    blob = os.urandom(args.bytes)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    ways = {"baseline: boto3 put_object, one at a time": boto3_one_by_one(boto3.client("s3")),
            "pyarrow stream (a multipart upload a file)":
                pyarrow_one_by_one(pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1")),
            "pyarrow stream, allow_delayed_open (PutObject)":
                pyarrow_one_by_one(pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1",
                                                     allow_delayed_open=True)),
            "storage.write_bytes, one at a time (PutObject)":
                lambda files: [storage.write_bytes(u, d) for u, d in files.items()],
            "storage.write_many, 32 at a time": storage.write_many}
    times = {name: [] for name in ways}
    try:
        for r in range(args.rounds):
            order = list(ways.items())
            for i, (name, write) in enumerate(order[r % len(order):] + order[:r % len(order)]):
                files = {f"s3://bench/r{r}/w{i}/{n:05d}.jpg": blob for n in range(args.files)}
                times[name].append(per_file_ms(write, files))
    finally:
        server.stop()
    base = list(times)[0]
    print(f"{args.files} files of {args.bytes:,} bytes to moto's S3 on loopback, {args.rounds} rounds")
    for name, ms in times.items():
        ratio = median(b / t for b, t in zip(times[base], ms))
        print(f"  {name:55s} {median(ms):6.1f} ms a file  {ratio:5.2f}x the baseline")


if __name__ == "__main__":
    main()
