"""Dense matmul peaks: the denominator of "fraction of peak" for each (device, precision)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Square matrix sizes: big enough to reach the BLAS/cuBLAS plateau, small enough to be quick.
_SIZES = {"cpu": 2048, "cuda": 8192}
# The probe that sizes the timed product: near enough the plateau that its rate predicts it.
PROBE_SIZE = 512


@dataclass(frozen=True)
class Peak:
    device: str
    precision: str
    gflops: float
    source: str  # "measured" | "given"
    method: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "gflops": self.gflops,
                "source": self.source, "method": self.method}


# /proc/cpuinfo flags meaning the CPU computes in that precision natively; without them
# oneDNN/MLAS convert to fp32 (and torch.matmul in fp16 is emulated: ~0.3 GFLOP/s on an AMD EPYC).
NATIVE_ARITHMETIC = {"fp16": ("avx512_fp16", "amx_fp16"), "bf16": ("avx512_bf16", "amx_bf16")}


def compute_precision(backend: str, device: str, precision: str, cpu_flags: frozenset[str]) -> str:
    """The precision a backend really computes its matmuls in, whose peak it is measured against.

    onnxruntime's CPU provider has no fp16 MatMul/Gemm kernels and runs them in fp32 on
    fp16-rounded inputs; on a CPU without native fp16 (bf16) arithmetic, torch's fp16 (bf16)
    linear layers compute in fp32 as well. GPUs compute in the precision asked for.
    """
    if device != "cpu" or precision not in NATIVE_ARITHMETIC:
        return precision
    if backend == "onnxruntime" and precision == "fp16":
        return "fp32"
    return precision if cpu_flags & set(NATIVE_ARITHMETIC[precision]) else "fp32"


def _best_seconds(product: Callable[[], float], seconds: float) -> tuple[float, int]:
    """Fastest of repeated timed products within about ``seconds`` (at least one); and how many ran."""
    start = time.perf_counter()
    best, runs = float("inf"), 0
    while True:
        best = min(best, product())
        runs += 1
        if time.perf_counter() - start >= seconds:
            return best, runs


def _onnxruntime_product(n: int, threads: int | None) -> Callable[[], float] | None:
    """A timed ``n x n`` fp32 MatMul on onnxruntime's CPU provider (MLAS), or ``None`` without onnxruntime.

    torch's BLAS is not the fastest fp32 GEMM on every CPU (on an AMD EPYC it reached half of
    MLAS's rate), so a peak from torch alone would be no ceiling for onnxruntime's kernels.
    """
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", values[:2], values[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    session.run(None, feeds)

    def product() -> float:
        t0 = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - t0

    return product


def measure_matmul_peak(device: str, precision: str, threads: int | None = None,
                        size: int | None = None, seconds: float = 1.0) -> Peak:
    """Best achieved GFLOP/s of a dense square matmul, in about ``seconds`` per library.

    ``torch.matmul`` on ``device`` (CPU: ``threads`` intra-op threads, the benchmark's own
    setting; CUDA: timed with CUDA events, TF32 off for fp32, so that is the true fp32 peak); on
    CPU in fp32 also onnxruntime's MatMul; the peak is the fastest library at its fastest size.
    Sizes run from 512 up to the plateau size (2048 on CPU, 8192 on CUDA) but stop where a quick
    512x512 probe says one product would take over a quarter of ``seconds``, so the whole
    measurement stays within about ``seconds`` per library even on a slow path. ``size`` times
    that size alone.
    """
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    previous_threads = torch.get_num_threads()
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)

        def operands(n: int) -> tuple[Any, Any]:
            return tuple(torch.randn(n, n, generator=generator).to(device=device, dtype=dtype) for _ in range(2))

        def seconds_per_product(a: Any, b: Any) -> float:
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                torch.matmul(a, b)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) * 1e-3
            t0 = time.perf_counter()
            torch.matmul(a, b)
            return time.perf_counter() - t0

        with torch.inference_mode():
            largest = size or _SIZES[device]
            if size is None:
                probe = operands(PROBE_SIZE)
                torch.matmul(*probe)
                rate = 2.0 * PROBE_SIZE**3 / max(min(seconds_per_product(*probe) for _ in range(3)), 1e-9)
                while largest > PROBE_SIZE and 2.0 * largest**3 / rate > seconds / 4:
                    largest //= 2
            # The fastest size differs by machine (cache sizes): time each from the probe size up.
            sizes = [largest] if size is not None else [n for n in (512, 1024, 2048, 4096, 8192)
                                                        if PROBE_SIZE <= n <= largest]
            rates: dict[str, tuple[float, int, int]] = {}  # library -> (GFLOP/s, size, runs)
            for n in sizes:
                a, b = operands(n)
                torch.matmul(a, b)
                if device == "cuda":
                    torch.cuda.synchronize()
                products: dict[str, Callable[[], float]] = {
                    "torch.matmul": lambda a=a, b=b: seconds_per_product(a, b)}
                ort_product = _onnxruntime_product(n, threads) if device == "cpu" and precision == "fp32" else None
                if ort_product is not None:
                    products["onnxruntime MatMul"] = ort_product
                for library, product in products.items():
                    best, runs = _best_seconds(product, seconds / len(sizes))
                    gflops = 2.0 * n**3 / best / 1e9
                    if gflops > rates.get(library, (0.0, 0, 0))[0]:
                        rates[library] = (gflops, n, runs)
    finally:
        torch.set_num_threads(previous_threads)
    where = f"{threads} threads" if device == "cpu" else "CUDA events"
    method = "; ".join(f"{library} {n}x{n} {precision} {gflops:.0f} GFLOP/s (best of {runs})"
                       for library, (gflops, n, runs) in rates.items()) + f", {where}"
    gflops = max(rate for rate, _, _ in rates.values())
    return Peak(device=device, precision=precision, gflops=gflops, source="measured", method=method)


def parse_peaks(text: str) -> dict[str, float]:
    """``"345"`` (every precision) or ``"fp32=345,fp16=990000"`` → ``{precision or "*": GFLOP/s}``."""
    peaks: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.rpartition("=")
        key = key.strip() or "*"
        if key not in ("*", "fp32", "fp16", "bf16"):
            raise ValueError(f"--peak-gflops {text!r}: {key!r} is not fp32, fp16 or bf16")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--peak-gflops {text!r}: {value!r} is not a number of GFLOP/s") from None
        if not number > 0:
            raise ValueError(f"--peak-gflops {text!r}: peaks must be > 0 GFLOP/s")
        peaks[key] = number
    if not peaks:
        raise ValueError(f"--peak-gflops {text!r} gives no peak; expected e.g. 345 or fp32=345,fp16=990000")
    return peaks


# Precisions torch.matmul can measure a peak for; int8/fp8 (Q/DQ graphs) have none unless given.
MEASURABLE = ("fp32", "fp16", "bf16")


class PeakTable:
    """Peaks per (device, precision): given ones first, else measured once on first use."""

    def __init__(self, given: dict[str, float] | None = None, measure: bool = True,
                 threads: int | None = None, log: Callable[[str], None] | None = None) -> None:
        self.given = dict(given or {})
        self.measure = measure
        self.threads = threads
        self.log = log
        self._peaks: dict[tuple[str, str], Peak | None] = {}

    def get(self, device: str, precision: str) -> Peak | None:
        key = (device, precision)
        if key not in self._peaks:
            value = self.given.get(precision, self.given.get("*"))
            if value is not None:
                self._peaks[key] = Peak(device, precision, value, "given", "--peak-gflops")
            elif self.measure and precision in MEASURABLE:
                if self.log is not None:
                    self.log(f"measuring the {device} {precision} matmul peak (torch.matmul) ...")
                self._peaks[key] = peak = measure_matmul_peak(device, precision, self.threads)
                if self.log is not None:
                    self.log(f"{device} {precision} matmul peak: {peak.gflops:.1f} GFLOP/s ({peak.method})")
            else:
                self._peaks[key] = None
        return self._peaks[key]

    def to_list(self) -> list[dict[str, Any]]:
        return [peak.to_dict() for peak in self._peaks.values() if peak is not None]
