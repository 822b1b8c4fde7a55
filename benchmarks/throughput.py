"""Throughput modes: what each CPU backend does to keep every core busy with many requests at once.

Latency mode runs one request at a time with every thread on it; a serving process instead
keeps several requests in flight. Each backend has its own way:

* onnxruntime: ``sessions`` independent sessions of the same file, each with ``threads //
  sessions`` intra-op threads, called from as many Python threads (``InferenceSession.run``
  releases the GIL);
* OpenVINO: the model compiled with ``PERFORMANCE_HINT=THROUGHPUT`` (OpenVINO picks the number
  of streams) and an ``AsyncInferQueue`` of its ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``.

A :class:`ThroughputRunner` is one *burst* (every worker runs ``calls`` requests of ``batch``
images) so that bursts of different candidates can be timed side by side in interleaved rounds
(:func:`vitdeploy.benchmarks.timing.time_rounds`); images/s = images per burst / burst time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ThroughputRunner:
    """One burst per call; ``images`` per burst; ``describe`` says how (sessions, streams, requests)."""

    images: int
    mode: str
    describe: str
    _burst: Any = field(repr=False, default=None)
    _close: Any = field(repr=False, default=None)

    def __call__(self) -> None:
        self._burst()

    def close(self) -> None:
        if self._close is not None:
            self._close()


def onnxruntime_parallel(path: str | os.PathLike[str], pixels: np.ndarray, threads: int, calls: int = 2,
                         sessions: int | None = None) -> ThroughputRunner:
    """``sessions`` (default ``threads``) onnxruntime sessions of ``path``, one Python thread each."""
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    sessions = max(1, sessions or threads)
    per_session = max(1, threads // sessions)
    runtimes = [OrtRuntime(path, intra_op_threads=per_session, inter_op_threads=1) for _ in range(sessions)]
    pool = ThreadPoolExecutor(max_workers=sessions, thread_name_prefix="tune-ort")

    def work(runtime: Any) -> None:
        for _ in range(calls):
            runtime(pixels)

    def burst() -> None:
        for future in [pool.submit(work, runtime) for runtime in runtimes]:
            future.result()

    def close() -> None:
        pool.shutdown(wait=True)
        for runtime in runtimes:
            runtime.close()

    burst()  # every session's first call (allocations) stays out of the timing
    return ThroughputRunner(images=sessions * calls * len(pixels), mode="parallel-sessions",
                            describe=f"{sessions} onnxruntime sessions x {per_session} thread(s)",
                            _burst=burst, _close=close)


def openvino_throughput(path: str | os.PathLike[str], pixels: np.ndarray, threads: int, calls: int = 2,
                        inference_precision: str = "f32", compile_per_shape: bool = False) -> ThroughputRunner:
    """OpenVINO's THROUGHPUT hint: its streams, an async queue of its optimal number of requests
    (``compile_per_shape``: the model compiled for ``pixels``' shape alone)."""
    import openvino as ov

    from vitdeploy.runtimes.openvino import OpenVINORuntime

    runtime = OpenVINORuntime(path, threads=threads, performance_hint="THROUGHPUT",
                              inference_precision=inference_precision, compile_per_shape=compile_per_shape)
    if compile_per_shape:
        runtime.run_outputs(pixels)  # compiles the model for this shape
    compiled = runtime.compiled
    requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    streams = compiled.get_property("NUM_STREAMS")
    queue = ov.AsyncInferQueue(compiled, requests)
    feed = {0: np.ascontiguousarray(pixels)}

    def burst() -> None:
        for _ in range(requests * calls):
            queue.start_async(feed)
        queue.wait_all()

    burst()
    return ThroughputRunner(images=requests * calls * len(pixels), mode="THROUGHPUT hint",
                            describe=f"OpenVINO THROUGHPUT hint: {streams} stream(s), {requests} requests in flight",
                            _burst=burst, _close=runtime.close)
