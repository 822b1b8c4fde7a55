"""Throughput through Triton (1 vs N concurrent clients) beside the direct runtime, in one run.

Run it with the torch-free serve venv's Python (the one whose tritonserver stub works), on an
exported ONNX file::

    .venv-serve/bin/python studies/serving.py model.onnx --clients 1,8 --requests 200 \
        --json serving.json

It times the direct :class:`~vitdeploy.runtimes.onnxruntime.OrtRuntime` first, then writes a
model repository and starts ``vitdeploy serve`` as a subprocess on free loopback ports, and
sends ``--requests`` requests of one image each from 1 and from N client threads over HTTP or
gRPC (``tritonclient``). Per setting: images/s (images over wall time) and per-request latency
p50/p99. The server is stopped (SIGTERM) at the end whatever happens. This module talks to the
server only over the network and the command line, so it imports nothing from the serving
layer above it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from study import command_line, write_results

from vitdeploy.benchmarks.environment import load_average
from vitdeploy.benchmarks.stats import summarize
from vitdeploy.console import progress
from vitdeploy.cpu_features import cpu_model

MODEL_KIND = "python"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def summary(latencies_s: list[float], images: int, wall_s: float) -> dict[str, float]:
    stats = summarize([1000.0 * value for value in latencies_s])
    return {"images_per_s": images / wall_s, "p50_ms": stats.p50, "p99_ms": stats.p99, "mean_ms": stats.mean,
            "requests": stats.n}


def time_direct(onnx: Path, pixels: np.ndarray, requests: int, warmup: int) -> dict[str, float]:
    """The runtime called in this process, one request after another."""
    from vitdeploy.runtimes import load

    with load(onnx) as runtime:
        for _ in range(warmup):
            runtime(pixels)
        latencies = []
        start = time.perf_counter()
        for _ in range(requests):
            begin = time.perf_counter()
            runtime(pixels)
            latencies.append(time.perf_counter() - begin)
        wall = time.perf_counter() - start
    return summary(latencies, requests * pixels.shape[0], wall)


def time_server(url: str, protocol: str, model: str, pixels: np.ndarray, requests: int, clients: int,
                warmup: int) -> dict[str, float]:
    """``requests`` requests spread over ``clients`` threads, each with its own connection."""
    from importlib import import_module

    module = import_module(f"tritonclient.{protocol}")
    datatype = "FP32" if pixels.dtype == np.float32 else "FP16"

    def send(client: Any) -> float:
        request = module.InferInput("pixel_values", list(pixels.shape), datatype)
        request.set_data_from_numpy(pixels)
        begin = time.perf_counter()
        client.infer(model, [request], outputs=[module.InferRequestedOutput("logits")])
        return time.perf_counter() - begin

    def worker(count: int) -> list[float]:
        client = module.InferenceServerClient(url)
        try:
            for _ in range(warmup):
                send(client)
            barrier.wait()
            return [send(client) for _ in range(count)]
        finally:
            client.close()

    shares = [requests // clients + (1 if index < requests % clients else 0) for index in range(clients)]
    barrier = threading.Barrier(clients + 1)
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, share) for share in shares]
        barrier.wait()
        start = time.perf_counter()
        latencies = [value for future in futures for value in future.result()]
        wall = time.perf_counter() - start
    return summary(latencies, requests * pixels.shape[0], wall)


def start_server(onnx: Path, folder: Path, max_queue_delay_us: int) -> tuple[subprocess.Popen, dict[str, Any]]:
    """`vitdeploy triton` then `vitdeploy serve` (this Python), waiting for its status file."""
    repository = folder / "repo"
    subprocess.run([sys.executable, "-m", "vitdeploy", "triton", str(onnx), "-o", str(repository), "--kinds",
                    MODEL_KIND, "--max-queue-delay-us", str(max_queue_delay_us)], check=True, cwd=folder)
    status_path = folder / "status.json"
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "vitdeploy", "serve", str(repository), "--http-port", str(ports[0]), "--grpc-port",
         str(ports[1]), "--metrics-port", str(ports[2]), "--json", str(status_path)],
        cwd=folder, start_new_session=True, stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    while not status_path.is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"vitdeploy serve did not start (exit {process.returncode})")
        time.sleep(0.2)
    return process, json.loads(status_path.read_text())


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python studies/serving.py", description=__doc__.split("\n")[0])
    parser.add_argument("onnx", type=Path, help="an exported .onnx file (its .cpu.onnx variant is used when present)")
    parser.add_argument("--clients", default="1,8", help="concurrent client counts (default 1,8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per setting (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per client first (default 5)")
    parser.add_argument("--batch", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's crop size)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc", help="client protocol (default grpc)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="the dynamic batcher's delay")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    clients = [int(value) for value in args.clients.split(",") if value.strip()]
    if not args.onnx.is_file():
        parser.error(f"{args.onnx} does not exist")
    if args.requests < 1 or not clients or min(clients) < 1:
        parser.error("--requests and every --clients value must be >= 1")

    from vitdeploy.metadata import read_onnx_metadata

    metadata = read_onnx_metadata(args.onnx)
    side = args.resolution or metadata.preprocessing.crop_size
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(metadata.inputs[0].dtype)
    progress(f"direct runtime: {args.requests} requests of {args.batch}x3x{side}x{side}")
    command = command_line("serving", argv)
    results: dict[str, Any] = {"onnx": str(args.onnx), "shape": list(pixels.shape), "protocol": args.protocol,
                               "cpu": cpu_model(), "load_average": load_average(),
                               "direct": time_direct(args.onnx, pixels, args.requests, args.warmup)}
    with tempfile.TemporaryDirectory(prefix="vitdeploy-serving-bench-") as folder:
        process, status = start_server(args.onnx.resolve(), Path(folder), args.max_queue_delay_us)
        try:
            url = status[args.protocol].split("://", 1)[1]
            model = status["ready"][0]
            results["server"] = {"version": status["server_version"], "model": model}
            for count in clients:
                progress(f"through Triton: {count} client(s), {args.requests} requests")
                results[f"clients_{count}"] = time_server(url, args.protocol, model, pixels, args.requests, count,
                                                          args.warmup)
        finally:
            stop_server(process)
    print(f"{'setting':<12} {'images/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for key in ["direct", *[f"clients_{count}" for count in clients]]:
        row = results[key]
        print(f"{key:<12} {row['images_per_s']:>10.1f} {row['p50_ms']:>9.2f} {row['p99_ms']:>9.2f}")
    if args.json:
        write_results(args.json, command, results)
    return 0



if __name__ == "__main__":
    sys.exit(main())
