"""Timing loops: warm-up, then a fixed number of iterations or a time budget, with one timer per backend.

A backend supplies the timed callable (one forward pass on an input already where the backend
wants it) and a timer: :class:`WallTimer` for CPU backends, :class:`CudaEventTimer` for every GPU
runtime alike — torch, onnxruntime (CUDA and TensorRT providers) and TensorRT each enqueue on a
stream of their own, and the timer records CUDA events on that stream immediately around the
call, then synchronises the end event, every iteration: each sample is one request's device time
and no queued work leaks into the next. The timer's name is recorded beside every figure.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

ProgressFn = Callable[[int, float], None]


@dataclass
class TimingConfig:
    """How long to measure one point.

    ``iterations`` fixes the number of timed calls; ``time_budget_s`` instead stops once that
    much time was spent timing (after at least ``min_iterations``). With both, whichever
    comes first stops. ``max_iterations`` caps a budget run on very fast models.
    """

    warmup: int = 5
    iterations: int | None = None
    time_budget_s: float | None = 5.0
    min_iterations: int = 5
    max_iterations: int = 10_000
    progress_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0 iterations, got {self.warmup}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time budget must be > 0 seconds, got {self.time_budget_s}")
        if self.iterations is None and self.time_budget_s is None:
            raise ValueError("give a number of iterations or a time budget (or both)")
        if self.min_iterations < 1:
            raise ValueError(f"min_iterations must be >= 1, got {self.min_iterations}")
        if self.max_iterations < self.min_iterations:
            raise ValueError(f"max_iterations {self.max_iterations} is below min_iterations {self.min_iterations}")

    @property
    def limit(self) -> int:
        """Most timed iterations this config allows."""
        return self.iterations if self.iterations is not None else self.max_iterations

    def to_dict(self) -> dict[str, Any]:
        return {
            "warmup": self.warmup, "iterations": self.iterations, "time_budget_s": self.time_budget_s,
            "min_iterations": self.min_iterations, "max_iterations": self.max_iterations,
        }


class Timer(Protocol):
    """Times one call of ``fn`` and returns milliseconds."""

    name: str

    def __call__(self, fn: Callable[[], Any]) -> float: ...

    def synchronize(self) -> None: ...


class WallTimer:
    """``time.perf_counter_ns`` around a synchronous call."""

    name = "perf_counter"

    def __call__(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) * 1e-6

    def synchronize(self) -> None:
        return None


class CudaEventTimer:
    """CUDA events recorded on ``stream`` (default: torch's current stream) around each call.

    ``stream`` is the stream the runtime enqueues on: a ``torch.cuda.Stream`` for torch and for
    onnxruntime (handed to it as ``user_compute_stream``), ``torch.cuda.ExternalStream`` of the
    TensorRT runtime's own stream for TensorRT. The end event is synchronised every iteration, so
    a sample is the device time from the start of one request to the end of its last kernel,
    gaps from kernel launches included. Not run here (no GPU): written from PyTorch's documented
    ``torch.cuda.Event``/``ExternalStream`` API.
    """

    name = "cuda_event"

    def __init__(self, stream: Any = None, device: int | None = None) -> None:
        import torch

        self._torch = torch
        self.device = torch.cuda.current_device() if device is None else device
        self.stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self._start.record(self.stream)
        fn()
        self._end.record(self.stream)
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))

    def synchronize(self) -> None:
        self._torch.cuda.synchronize(self.device)


@dataclass
class Measurement:
    """The raw outcome of timing one point."""

    samples_ms: list[float]
    warmup_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    timer: str = "perf_counter"

    @property
    def first_call_ms(self) -> float | None:
        """Latency of the very first call (includes lazy initialisation, compilation, autotuning)."""
        return self.warmup_ms[0] if self.warmup_ms else (self.samples_ms[0] if self.samples_ms else None)


def measure(fn: Callable[[], Any], config: TimingConfig, timer: Timer | None = None,
            progress: ProgressFn | None = None) -> Measurement:
    """Warm up, then time ``fn`` per ``config``; ``progress(done, elapsed_s)`` is called now and then.

    The garbage collector is paused while timing (as :mod:`timeit` does) so a collection
    does not land in one sample.
    """
    timer = timer or WallTimer()
    warmup = [timer(fn) for _ in range(config.warmup)]
    timer.synchronize()
    limit = config.limit
    budget_ns = int(config.time_budget_s * 1e9) if config.time_budget_s is not None else None
    interval_ns = int(config.progress_interval_s * 1e9)
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter_ns()
    next_report = start + interval_ns
    try:
        for done in range(1, limit + 1):
            samples.append(timer(fn))
            now = time.perf_counter_ns()
            if budget_ns is not None and now - start >= budget_ns and done >= config.min_iterations:
                break
            if progress is not None and now >= next_report:
                progress(done, (now - start) * 1e-9)
                next_report = now + interval_ns
    finally:
        if gc_was_enabled:
            gc.enable()
    timer.synchronize()
    wall = (time.perf_counter_ns() - start) * 1e-9
    return Measurement(samples_ms=samples, warmup_ms=warmup, wall_s=wall, timer=timer.name)


@dataclass
class OverheadResult:
    """Harness vs bare loop on one callable (medians over interleaved rounds)."""

    iterations: int
    rounds: int
    bare_ms: float
    harness_reported_ms: float
    harness_wall_ms: float
    noop_overhead_ns: float

    @property
    def reported_overhead(self) -> float:
        """Relative difference of the latency the harness reports vs the bare loop's mean."""
        return self.harness_reported_ms / self.bare_ms - 1.0

    @property
    def wall_overhead(self) -> float:
        """Relative extra wall time per iteration spent in the harness loop vs the bare loop."""
        return self.harness_wall_ms / self.bare_ms - 1.0

    @property
    def noop_fraction(self) -> float:
        """Per-iteration cost of the harness on a no-op call, as a fraction of the bare latency."""
        return self.noop_overhead_ns * 1e-6 / self.bare_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations, "rounds": self.rounds, "bare_loop_ms": self.bare_ms,
            "harness_reported_ms": self.harness_reported_ms, "harness_wall_ms": self.harness_wall_ms,
            "reported_overhead": self.reported_overhead, "wall_overhead": self.wall_overhead,
            "noop_overhead_ns": self.noop_overhead_ns, "noop_fraction": self.noop_fraction,
        }


def _bare_loop_ms(fn: Callable[[], Any], iterations: int, timer: Timer) -> float:
    # Asynchronous (CUDA) work is synchronised per call in the bare loop too, as the timer does.
    sync_each = timer.name == "cuda_event"
    timer.synchronize()
    start = time.perf_counter_ns()
    if sync_each:
        for _ in range(iterations):
            fn()
            timer.synchronize()
    else:
        for _ in range(iterations):
            fn()
    timer.synchronize()
    return (time.perf_counter_ns() - start) * 1e-6 / iterations


def measure_overhead(fn: Callable[[], Any], iterations: int = 50, rounds: int = 5,
                     timer: Timer | None = None, warmup: int = 5) -> OverheadResult:
    """Compare the harness with a bare ``for`` loop on ``fn``, interleaving rounds to share drift.

    Also times the harness on a no-op callable: its per-iteration cost in nanoseconds is the
    overhead independent of the noise of ``fn`` itself.
    """
    if iterations < 1 or rounds < 1:
        raise ValueError(f"iterations and rounds must be >= 1, got {iterations} and {rounds}")
    timer = timer or WallTimer()
    for _ in range(warmup):
        fn()
    config = TimingConfig(warmup=0, iterations=iterations, time_budget_s=None, min_iterations=1)
    bare, reported, wall = [], [], []
    for _ in range(rounds):
        bare.append(_bare_loop_ms(fn, iterations, timer))
        result = measure(fn, config, timer)
        reported.append(statistics.fmean(result.samples_ms))
        wall.append(result.wall_s * 1e3 / iterations)
    noop_iterations = 100_000
    noop = measure(lambda: None, TimingConfig(warmup=0, iterations=noop_iterations, time_budget_s=None,
                                              min_iterations=1, max_iterations=noop_iterations), WallTimer())
    noop_bare = _bare_loop_ms(lambda: None, noop_iterations, WallTimer())
    noop_ns = max(noop.wall_s * 1e9 / noop_iterations - noop_bare * 1e6, 0.0)
    return OverheadResult(
        iterations=iterations, rounds=rounds, bare_ms=statistics.median(bare),
        harness_reported_ms=statistics.median(reported), harness_wall_ms=statistics.median(wall),
        noop_overhead_ns=noop_ns,
    )


def time_rounds(runners: dict[str, Callable[[], Any]], rounds: int, iterations: int,
                warmup: int, on_round: Callable[[int, dict[str, list[float]]], None] | None = None
                ) -> dict[str, list[float]]:
    """p50 latency (ms) of each runner per round; runners alternate, order reversed every round, so
    drift and other processes' load hit every runner alike (``tune`` and the side-by-side studies).
    ``on_round(index, p50s)`` is called after each round (progress lines).

    Each block is timed by :func:`measure` (garbage collector paused) after one untimed call: the
    first call after another runtime pays for cold caches.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    block = TimingConfig(warmup=1, iterations=iterations, time_budget_s=None, min_iterations=1)
    p50s: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(runners)[::-1]
        for name in order:
            p50s[name].append(statistics.median(measure(runners[name], block).samples_ms))
        if on_round is not None:
            on_round(index, p50s)
    return p50s
