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
    linear layers compute in fp32 as well. GPUs compute in the precision asked for. An int8 Q/DQ
    graph computes its linear layers in int8 on every CPU (onnxruntime's ``MatMulIntegerToFloat``,
    OpenVINO's int8 ``FullyConnected``), so it is held against the int8 peak.
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


def _plateau_sizes(rate: float, seconds: float, largest: int) -> list[int]:
    """Square sizes from the probe size up to ``largest``, stopping where one product at ``rate``
    (FLOP/s of the probe) would take over a quarter of ``seconds``."""
    while largest > PROBE_SIZE and 2.0 * largest**3 / rate > seconds / 4:
        largest //= 2
    return [n for n in (512, 1024, 2048, 4096, 8192) if PROBE_SIZE <= n <= largest]


def _fastest_by_library(products_at: Callable[[int], dict[str, Callable[[], float]]], sizes: list[int],
                        seconds: float) -> dict[str, tuple[float, int, int]]:
    """Each library's best rate over ``sizes``: ``{library: (G(FL)OP/s, size, runs)}``, every timed square
    product (``products_at(n)``, one per library) run for about ``seconds / len(sizes)``."""
    rates: dict[str, tuple[float, int, int]] = {}
    for n in sizes:
        for library, product in products_at(n).items():
            best, runs = _best_seconds(product, seconds / len(sizes))
            rate = 2.0 * n**3 / best / 1e9
            if rate > rates.get(library, (0.0, 0, 0))[0]:
                rates[library] = (rate, n, runs)
    return rates


def _describe(rates: dict[str, tuple[float, int, int]], precision: str, unit: str) -> str:
    """``"torch.matmul 1024x1024 fp32 183 GFLOP/s (best of 25); ..."``: how each library's rate was measured."""
    return "; ".join(f"{library} {n}x{n} {precision} {rate:.0f} {unit} (best of {runs})"
                     for library, (rate, n, runs) in rates.items())


def _square_matmul_graph(n: int) -> Any:
    """``c = a @ b``, fp32, ``n x n``."""
    from onnx import TensorProto, helper

    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", values[:2], values[2:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def int8_weight_qmax() -> int:
    """The weight range of the project's int8 files, as :data:`~vitdeploy.exporters.artifact_set.INT8_POLICY`
    chooses it (full range, +-127; 7 bits, +-63, were it ``reduce_range``)."""
    from vitdeploy.exporters.artifact_set import INT8_POLICY
    from vitdeploy.exporters.quantize import QMAX, REDUCED_WEIGHT_QMAX

    return int(REDUCED_WEIGHT_QMAX if INT8_POLICY.reduce_range else QMAX["int8"])


def int8_matmul_graph(n: int, weight_qmax: int, seed: int = 0) -> Any:
    """An ``n x n x n`` linear layer as vitdeploy's quantizer writes it: fp32 ``a`` ->
    ``QuantizeLinear`` (int8, per tensor) -> ``DequantizeLinear`` -> ``MatMul`` with an int8 weight
    (values within ``+-weight_qmax``) behind a per-output-channel ``DequantizeLinear``.

    onnxruntime fuses it into ``QuantizeLinear`` + ``MatMulIntegerToFloat``; OpenVINO into an
    int8 ``FullyConnected``: the kernels our int8 graphs run.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.integers(-weight_qmax, weight_qmax + 1, size=(n, n), dtype=np.int8)
    initializers = [
        numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"), numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "a_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "a_scale", "a_zero"], ["a_q"]),
        helper.make_node("DequantizeLinear", ["a_q", "a_scale", "a_zero"], ["a_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=1),
        helper.make_node("MatMul", ["a_dq", "w_dq"], ["c"]),
    ]
    graph = helper.make_graph(nodes, "int8_peak", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _integer_matmul_graph(n: int) -> Any:
    """``c = a @ b`` with ``MatMulInteger``: uint8 ``a`` x int8 ``b`` -> int32 (the bare kernel)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "int8_peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _timed(run: Callable[[], Any]) -> Callable[[], float]:
    run()

    def product() -> float:
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    return product


def _onnxruntime_product(model: Any, feeds: dict[str, Any], threads: int | None) -> Callable[[], float] | None:
    """A timed run of ``model`` on onnxruntime's CPU provider (MLAS), or ``None`` without onnxruntime.

    torch's BLAS is not the fastest fp32 GEMM on every CPU (on an AMD EPYC it reached half of
    MLAS's rate), so a peak from torch alone would be no ceiling for onnxruntime's kernels.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _timed(lambda: session.run(None, feeds))


def _openvino_product(model: Any, feeds: dict[str, Any], threads: int | None) -> Callable[[], float] | None:
    """A timed run of the ONNX ``model`` compiled by OpenVINO for the CPU, or ``None`` without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(model.SerializeToString()), "CPU", properties)
    request = compiled.create_infer_request()
    inputs = {index: value for index, value in enumerate(feeds.values())}
    return _timed(lambda: request.infer(inputs))


def _int8_products(n: int, threads: int | None, weight_qmax: int) -> dict[str, Callable[[], float]]:
    """Timed ``n x n x n`` int8 products of every int8 GEMM kernel installed here, by library."""
    import numpy as np

    rng = np.random.default_rng(0)
    activations = rng.standard_normal((n, n), dtype=np.float32)
    qdq = int8_matmul_graph(n, weight_qmax)
    integer_feeds = {"a": rng.integers(0, 256, size=(n, n), dtype=np.uint8),
                     "b": rng.integers(-weight_qmax, weight_qmax + 1, size=(n, n), dtype=np.int8)}
    candidates = {
        "onnxruntime Q/DQ MatMul (MatMulIntegerToFloat)": lambda: _onnxruntime_product(qdq, {"a": activations}, threads),
        "onnxruntime MatMulInteger u8xs8": lambda: _onnxruntime_product(_integer_matmul_graph(n), integer_feeds, threads),
        "OpenVINO Q/DQ MatMul (int8 FullyConnected)": lambda: _openvino_product(qdq, {"a": activations}, threads),
    }
    products = {}
    for library, make in candidates.items():
        product = make()
        if product is not None:
            products[library] = product
    return products


def measure_int8_peak(threads: int | None = None, size: int | None = None, seconds: float = 1.0) -> Peak:
    """Best achieved GOP/s (2 x M x N x K) of the int8 GEMM kernels our Q/DQ graphs run on this CPU.

    Kernels: onnxruntime's fused Q/DQ MatMul (``QuantizeLinear`` + ``MatMulIntegerToFloat``, what
    an int8 linear layer of our graphs becomes), its bare ``MatMulInteger`` (uint8 x int8), and
    OpenVINO's int8 ``FullyConnected`` compiled from the same Q/DQ graph; each timed for about
    ``seconds`` over square sizes from 512 up to 2048 (fewer where a 512 probe says one product
    would take over a quarter of ``seconds``; ``size`` times that size alone). Weights span the range
    the project's int8 files use (:func:`int8_weight_qmax`).
    """
    weight_qmax = int8_weight_qmax()
    first = size or PROBE_SIZE
    products = {first: _int8_products(first, threads, weight_qmax)}
    if not products[first]:
        raise ValueError("measuring the int8 matmul peak needs onnxruntime or openvino; neither is installed")
    sizes = [first]
    if size is None:
        rate = 2.0 * PROBE_SIZE**3 / max(min(product() for product in products[first].values() for _ in range(3)), 1e-9)
        sizes = _plateau_sizes(rate, seconds, _SIZES["cpu"])
    rates = _fastest_by_library(lambda n: products.pop(n, None) or _int8_products(n, threads, weight_qmax),
                                sizes, seconds)
    where = f"{threads} threads" if threads else "default threads"
    method = _describe(rates, "int8", "GOP/s") + f", weights within +-{weight_qmax}, {where}"
    return Peak(device="cpu", precision="int8", gflops=max(rate for rate, _, _ in rates.values()),
                source="measured", method=method)


def measure_matmul_peak(device: str, precision: str, threads: int | None = None,
                        size: int | None = None, seconds: float = 1.0) -> Peak:
    """Best achieved GFLOP/s of a dense square matmul, in about ``seconds`` per library.

    ``torch.matmul`` on ``device`` (CPU: ``threads`` intra-op threads, the benchmark's own
    setting; CUDA: timed with CUDA events, TF32 off for fp32, so that is the true fp32 peak); on
    CPU in fp32 also onnxruntime's MatMul; the peak is the fastest library at its fastest size.
    Sizes run from 512 up to the plateau size (2048 on CPU, 8192 on CUDA) but stop where a quick
    512x512 probe says one product would take over a quarter of ``seconds``, so the whole
    measurement stays within about ``seconds`` per library even on a slow path. ``size`` times
    that size alone. int8 (CPU only) is :func:`measure_int8_peak`.
    """
    if precision == "int8":
        if device != "cpu":
            raise ValueError(f"an int8 matmul peak is measured on the CPU only, not on {device!r}")
        return measure_int8_peak(threads, size, seconds)
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
            if size is None:
                probe = operands(PROBE_SIZE)
                torch.matmul(*probe)
                rate = 2.0 * PROBE_SIZE**3 / max(min(seconds_per_product(*probe) for _ in range(3)), 1e-9)
                # The fastest size differs by machine (cache sizes): time each from the probe size up.
                sizes = _plateau_sizes(rate, seconds, _SIZES[device])
            else:
                sizes = [size]

            def products_at(n: int) -> dict[str, Callable[[], float]]:
                a, b = operands(n)
                torch.matmul(a, b)
                if device == "cuda":
                    torch.cuda.synchronize()
                products: dict[str, Callable[[], float]] = {
                    "torch.matmul": lambda a=a, b=b: seconds_per_product(a, b)}
                ort_product = None
                if device == "cpu" and precision == "fp32":
                    ort_product = _onnxruntime_product(_square_matmul_graph(n), {"a": a.numpy(), "b": b.numpy()}, threads)
                if ort_product is not None:
                    products["onnxruntime MatMul"] = ort_product
                return products

            rates = _fastest_by_library(products_at, sizes, seconds)
    finally:
        torch.set_num_threads(previous_threads)
    where = f"{threads} threads" if device == "cpu" else "CUDA events"
    method = _describe(rates, precision, "GFLOP/s") + f", {where}"
    gflops = max(rate for rate, _, _ in rates.values())
    return Peak(device=device, precision=precision, gflops=gflops, source="measured", method=method)


# Precisions a peak is measured for: torch.matmul's (and MLAS's fp32) on any device, int8 on the CPU
# (:func:`measure_int8_peak`); fp8 (a GPU Q/DQ precision) has none unless given.
MEASURABLE = ("fp32", "fp16", "bf16", "int8")


def measurable(device: str, precision: str) -> bool:
    """Whether a matmul peak can be measured for ``precision`` on ``device``."""
    return precision in MEASURABLE and (precision != "int8" or device == "cpu")


def parse_peaks(text: str) -> dict[str, float]:
    """``"345"`` (every precision) or ``"fp32=345,int8=700"`` → ``{precision or "*": GFLOP/s (GOP/s for int8)}``."""
    peaks: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.rpartition("=")
        key = key.strip() or "*"
        if key not in ("*", *MEASURABLE):
            raise ValueError(f"--peak-gflops {text!r}: {key!r} is not one of {', '.join(MEASURABLE)}")
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




class PeakTable:
    """Peaks per (device, precision): given ones first, else measured once on first use
    (about ``seconds`` per library, see :func:`measure_matmul_peak`)."""

    def __init__(self, given: dict[str, float] | None = None, measure: bool = True,
                 threads: int | None = None, log: Callable[[str], None] | None = None,
                 seconds: float = 1.0) -> None:
        self.given = dict(given or {})
        self.measure = measure
        self.threads = threads
        self.seconds = seconds
        self.log = log
        self._peaks: dict[tuple[str, str], Peak | None] = {}

    def get(self, device: str, precision: str) -> Peak | None:
        key = (device, precision)
        if key not in self._peaks:
            value = self.given.get(precision, self.given.get("*"))
            if value is not None:
                self._peaks[key] = Peak(device, precision, value, "given", "--peak-gflops")
            elif self.measure and measurable(device, precision):
                if self.log is not None:
                    self.log(f"measuring the {device} {precision} matmul peak ...")
                self._peaks[key] = peak = measure_matmul_peak(device, precision, self.threads, seconds=self.seconds)
                if self.log is not None:
                    unit = "GOP/s" if precision == "int8" else "GFLOP/s"
                    self.log(f"{device} {precision} matmul peak: {peak.gflops:.1f} {unit} ({peak.method})")
            else:
                self._peaks[key] = None
        return self._peaks[key]

    def to_list(self) -> list[dict[str, Any]]:
        return [peak.to_dict() for peak in self._peaks.values() if peak is not None]
