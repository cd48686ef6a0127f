"""Serving throughput: dynamic batching vs max_batch_size=1 vs the Predictor in-process.

    python benchmarks/serve.py [--model DIR] [--requests 256] [--port 8123]

Real HTTP on loopback against Ray Serve. For each service (batched, unbatched) and
concurrency (1, 16, 64) it sends a bounded number of requests and reports requests/s
and p50/p99 latency. The ceiling is the Predictor called directly on the same images in
this process (as many torch threads as a replica: serve.cpus_per_replica), measured in
rounds paired with HTTP at concurrency 64. Prints the two ratios the project tracks:
batched / unbatched at concurrency 16 (goal >= 2x), and the median over the rounds of
HTTP batched at concurrency 64 / direct in-process (goal >= 0.7); then what decoding the
uploads in helper processes (serve.isolate_decoding) costs the batched service: its
requests/s and p50 latency against the same service decoding in the replica. Without --model it
exports a randomly initialised detector (the tiny preset's 32 px images, 75 px input):
speed does not depend on the weights. Serve's HTTP ingress is HAProxy, as the embedded Ray
starts it; `RAY_SERVE_ENABLE_HA_PROXY=0 python benchmarks/serve.py` measures Serve's
Python proxy instead.
"""
import argparse
import asyncio
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DEEPFAKE_RAY_PROGRESS", "0")

from deepfake_ray import config, runtime  # noqa: E402
from deepfake_ray.data.sample import face  # noqa: E402
from deepfake_ray.data.decode import encode_jpeg  # noqa: E402

CONCURRENCY = (1, 16, 64)


def export_random_model(path: str, resolution: int, input_size: int) -> str:
    import torch

    from deepfake_ray import checkpoint
    from deepfake_ray.models import detector

    torch.manual_seed(0)
    net = detector.create("inception_resnet_v2", num_classes=2, pretrained="none")
    meta = {"arch": "inception_resnet_v2", "num_classes": 2, "class_names": ["real", "fake"],
            "resolution": resolution, "input_size": input_size,
            "preprocessing": detector.preprocessing(net),
            "threshold": 0.5, "epoch": 0, "metrics": {}, "config": {}, "fingerprints": {}}
    checkpoint.save_model(path, net.state_dict(), meta)
    return path


async def load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    """`requests` POSTs from `concurrency` concurrent clients; latency of each.

    aiohttp (a Ray Serve dependency) rather than httpx: on 2 cores the load generator
    competes with the service for CPU, and aiohttp's C parser costs a fraction of it."""
    import aiohttp

    latencies, failures, next_index = [], 0, iter(range(requests))

    async def client_loop(session):
        nonlocal failures
        for i in next_index:
            start = time.perf_counter()
            async with session.post(url, data=images[i % len(images)]) as response:
                await response.read()
                failures += response.status != 200
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    # answered requests only: a side failing fast must not look fast
    return {"requests": requests, "rps": (requests - failures) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "failures": failures}


def measure(port: int, images: list[bytes], requests: int, concurrency: int) -> dict:
    """One load level against the running service, with the replica's own batch stats."""
    import httpx

    stats = f"http://127.0.0.1:{port}/v1/stats"
    before = httpx.get(stats).json()
    result = asyncio.run(load(f"http://127.0.0.1:{port}/v1/detect", images, requests, concurrency))
    after = httpx.get(stats).json()
    result["mean_batch"] = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
    # share of the wall time the replica spent in Predictor.predict_pixels
    wall = result["requests"] / result["rps"]
    result["busy"] = (after["predict_seconds"] - before["predict_seconds"]) / wall
    return result


def deploy(cfg, model: str, images: list[bytes], port: int) -> None:
    from ray import serve

    from deepfake_ray.serving import app

    serve.run(app.build(cfg, model), name=app.APP_NAME, route_prefix="/", blocking=False)
    measure(port, images, 3 * cfg.serve.max_batch_size, cfg.serve.max_batch_size)  # warm-up


def bench_levels(port: int, images: list[bytes], requests: int) -> dict:
    return {c: measure(port, images, max(requests // 2, 2) if c == 1 else max(requests, 2 * c), c)
            for c in CONCURRENCY}


def paired_rounds(port: int, images: list[bytes], requests: int, predictor, batch: int,
                  rounds: int) -> list[tuple[float, float]]:
    """(HTTP at concurrency 64, direct in-process) req/s, measured back to back each round.

    The machine's speed drifts by a third within one run; a pair measured within seconds
    of each other sees the same machine, so the ratio compares like with like."""
    return [(measure(port, images, requests, 64)["rps"],
             direct_rate(predictor, images, requests, batch)) for _ in range(rounds)]


def direct_rate(predictor, images: list[bytes], requests: int, batch: int) -> float:
    """Requests/s of Predictor.predict_bytes in this process, in batches of `batch`."""
    blobs = [images[i % len(images)] for i in range(requests)]
    started = time.perf_counter()
    for i in range(0, requests, batch):
        predictor.predict_bytes(blobs[i:i + batch])
    return requests / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="exported model folder (default: a random tiny detector)")
    p.add_argument("--requests", type=int, default=256,
                   help="requests per concurrency level (half at concurrency 1)")
    p.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched service")
    p.add_argument("--wait", type=float, default=0.1,
                   help="batch_wait_timeout_s of the batched service (the demo preset's CPU value)")
    p.add_argument("--input-size", type=int, default=75,
                   help="network input of the random detector (75 tiny, 80 demo, 128 the study)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--rounds", type=int, default=5,
                   help="paired rounds of HTTP at concurrency 64 and direct in-process")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both services, e.g. serve.access_log=false")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as scratch:  # the random model: ~220 MB
        run(args, args.model or export_random_model(os.path.join(scratch, "model"), 32, args.input_size))


def run(args, model: str) -> None:
    from deepfake_ray import checkpoint

    resolution = checkpoint.load_meta(model)["resolution"]
    images = [encode_jpeg(face(1, i, resolution), 95) for i in range(32)]
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    runtime.init()
    from ray import serve

    from deepfake_ray.serving import app
    from deepfake_ray.serving.predictor import Predictor

    app.start_serve("127.0.0.1", args.port)  # as `deepfake-ray serve` does
    base = [f"serve.batch_wait_timeout_s={args.wait}", "serve.cpus_per_replica=1", *args.overrides]
    cfg_batched = config.build("tiny", None, base + [f"serve.max_batch_size={args.batch}"])
    cfg_single = config.build("tiny", None, base + ["serve.max_batch_size=1",
                                                    "serve.max_ongoing_requests=64"])
    threads = max(1, int(cfg_batched.serve.cpus_per_replica))  # torch threads, as a replica
    predictor = Predictor(model, threads=threads)
    for _ in range(3):  # warm-up: TorchScript optimizes the graph over its first runs
        predictor.predict_bytes(images[:args.batch])
    deploy(cfg_batched, model, images, args.port)
    batched = bench_levels(args.port, images, args.requests)
    pairs = paired_rounds(args.port, images, args.requests, predictor, args.batch, args.rounds)
    serve.delete(app.APP_NAME)
    deploy(cfg_single, model, images, args.port)
    single = bench_levels(args.port, images, args.requests)
    serve.delete(app.APP_NAME)
    deploy(config.build("tiny", None, base + [f"serve.max_batch_size={args.batch}",
                                              "serve.isolate_decoding=true"]), model, images, args.port)
    isolated = bench_levels(args.port, images, args.requests)
    serve.shutdown()
    runtime.remove_haproxy_folder()  # as `deepfake-ray serve` does: each run's would stay in /tmp
    print(f"\nmodel {model}; batch wait {args.wait}s; {args.requests} requests per level; "
          f"ingress: {runtime.serve_ingress()}; "
          f"replica and direct: {threads} torch thread(s); {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'service':<22}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'busy':>6}")
    for name, results in ((f"batched (max {args.batch})", batched), ("unbatched (max 1)", single),
                          ("batched, isolated", isolated)):
        for c, r in results.items():
            print(f"{name:<22}{c:>5}{r['rps']:>9.1f}{r['p50']:>9.1f}{r['p99']:>9.1f}"
                  f"{r['mean_batch']:>7.1f}{r['busy']:>6.0%}"
                  + (f"  {r['failures']} FAILED" if r["failures"] else ""))
    failed = sum(r["failures"] for results in (batched, single, isolated) for r in results.values())
    if failed:
        sys.exit(f"{failed} requests failed (see FAILED above): no ratios, which they would skew")
    ratios = sorted(http / direct for http, direct in pairs)
    print("paired rounds, HTTP batched at 64 vs direct in-process (Predictor.predict_bytes, "
          f"batches of {args.batch}): " + "; ".join(f"{h:.1f} vs {d:.1f}" for h, d in pairs))
    speedup = batched[16]["rps"] / single[16]["rps"]
    print(f"\nbatching speed-up at concurrency 16: {speedup:.2f}x (goal >= 2x)")
    print(f"HTTP batched at concurrency 64 / direct in-process: {ratios[len(ratios) // 2]:.2f} "
          f"(median of {len(ratios)} paired rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f}; "
          "goal >= 0.70)")
    print("decoding in helper processes (serve.isolate_decoding) / in the replica, batched: "
          + "; ".join(f"concurrency {c}: {isolated[c]['rps'] / batched[c]['rps']:.2f}x req/s, "
                      f"p50 {isolated[c]['p50'] - batched[c]['p50']:+.1f} ms" for c in CONCURRENCY))


if __name__ == "__main__":
    main()
