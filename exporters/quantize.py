"""Quantization as a graph transform: an fp32 ViT graph to a calibrated Q/DQ graph (int8 or fp8 E4M3).

TensorRT >= 10 builds INT8/FP8 engines only from explicitly quantized graphs (strongly typed
networks), so a quantized artifact is one more precision *in the graph*: ``QuantizeLinear`` /
``DequantizeLinear`` pairs that TensorRT compiles and that onnxruntime and OpenVINO execute.
The scheme is the one TensorRT's explicit quantization accepts and NVIDIA documents:

* weights: symmetric, **per output channel**, stored quantized (int8, or float8e4m3fn) and
  followed by a ``DequantizeLinear`` (zero point 0);
* activations: symmetric, **per tensor**, a ``QuantizeLinear -> DequantizeLinear`` pair in front
  of each quantized input, with scales measured on calibration images ("max" = the largest
  magnitude seen, or a percentile of the magnitudes);
* what stays in float (``keep_float``, default :data:`DEFAULT_KEEP_FLOAT`): LayerNorm, Softmax,
  GELU and the attention batch-matmuls (``Q·Kᵀ``, ``P·V``), as in NVIDIA's ModelOpt recipe
  for ViTs and the ViT quantization literature; the rest of the graph (residual adds,
  reshapes, the position-embedding resampling) never gets Q/DQ.

**Outlier channels.** Trained ViTs have a few LayerNorm-output channels tens of times larger
than the rest; one per-tensor int8 scale cannot hold them and the small channels. Before
calibrating the final scales, :func:`smooth_layer_norms` migrates the range SmoothQuant-style
(Xiao et al. 2023): for a LayerNorm whose output feeds only linear layers, channel ``j`` is
divided by ``s_j = amax(X_j)^α / amax(W_j)^(1-α)`` (folded into the LayerNorm's scale and
bias) and the consumers' weight rows ``j`` multiplied by ``s_j``. The float function is
unchanged; the activations become flat enough for one scale, and the weights, quantized per
output channel, absorb the range.

FP8 (E4M3, max 448) uses the same form; its Q/DQ ops need opset 19, to which the graph is
raised (every op that changed at 19 only gained types or modes). On CPU, onnxruntime runs the
fp8 graph as an emulation: it rounds to float8e4m3fn and computes in fp32.

Needs ``onnx``, numpy and onnxruntime (calibration runs the fp32 graph); ml_dtypes for fp8.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.constants import (
    CALIBRATORS,
    DEFAULT_KEEP_FLOAT,
    DEFAULT_SMOOTH_THRESHOLD,
    QUANTIZABLE_ROLES,
    QUANTIZED_PRECISIONS,
    check_precision,
)

from .graph import GraphIndex, Names, attr, graph_bytes, opset_version, set_metadata, topological

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")  # roles with a constant weight
ATTENTION_MATMUL = "AttentionMatMul"
GELU = "Gelu"  # exact GELU, as one op or the exporter's x·0.5·(1 + erf(x/√2))
QUANTIZABLE = QUANTIZABLE_ROLES
QUANTIZE_TRANSFORM = "quantize"
QUANTIZER = "vitdeploy"
FP8_MIN_OPSET = 19
# The largest magnitude a symmetric quantized value holds: int8 weights use [-127, 127] (narrow
# range, symmetric); float8e4m3fn's largest finite value is 448.
QMAX = {"int8": 127.0, "fp8": 448.0}
# reduce_range: int8 weights in 7 bits. x86 CPUs without VNNI/AMX multiply u8 x s8 pairs into
# saturating 16-bit sums (vpmaddubsw); with weights within +-63 two products cannot overflow.
REDUCED_WEIGHT_QMAX = 63.0
# SmoothQuant's migration strength per precision. fp8 keeps 0 (off): E4M3's exponent holds outlier
# channels, and migrating them measured slightly worse (README, "INT8 and FP8").
DEFAULT_SMOOTH_ALPHA = {"int8": 0.5, "fp8": 0.0}
# Ops a smoothed LayerNorm output may pass through on its way to a linear layer: they select
# tokens or samples and leave the channel (last) axis alone.
_TOKEN_SELECT = ("Slice", "Gather")


@dataclass
class QuantizeOptions:
    """How to quantize. ``smooth_alpha`` 0 turns the outlier handling off; ``percentile`` is used by
    the ``"percentile"`` calibrator (the magnitude below which that percentage of values lie).
    ``reduce_range`` stores int8 weights in 7 bits (+-63): x86 CPUs without VNNI/AMX (see
    :func:`vitdeploy.cpu_features.int8_dot_flags`) compute u8 x s8 products in saturating 16-bit
    pairs, which full-range weights overflow (OpenVINO measured cosine 0.94 instead of 0.998 for
    ViT-S/16 on such a CPU); TensorRT and VNNI CPUs want the default full range."""

    precision: str = "int8"
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    calibrator: str = "max"
    percentile: float = 99.99
    smooth_alpha: float | None = None  # None: DEFAULT_SMOOTH_ALPHA of the precision
    smooth_threshold: float = DEFAULT_SMOOTH_THRESHOLD
    reduce_range: bool = False
    batch_size: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision, QUANTIZED_PRECISIONS)
        if self.smooth_alpha is None:
            self.smooth_alpha = DEFAULT_SMOOTH_ALPHA[self.precision]
        if not self.smooth_threshold >= 1.0:
            raise ValueError(f"smooth_threshold must be >= 1 (a ratio of channel maxima), got {self.smooth_threshold}")
        self.keep_float = tuple(dict.fromkeys(self.keep_float))
        unknown = [op for op in self.keep_float if op not in QUANTIZABLE]
        if unknown:
            raise ValueError(f"keep_float {unknown} are not quantizable roles; expected some of {list(QUANTIZABLE)}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"calibrator {self.calibrator!r} is not one of {list(CALIBRATORS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1] (0 = no outlier handling), got {self.smooth_alpha}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.reduce_range and self.precision != "int8":
            raise ValueError("reduce_range applies to int8 weights only")


@dataclass
class WeightUse:
    """A constant weight input of a quantized Conv/MatMul/Gemm and its output-channel axis."""

    node: onnx.NodeProto
    index: int
    axis: int


@dataclass
class Plan:
    """What gets Q/DQ: activation tensors (with the node inputs that read them) and weights."""

    activations: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    weights: list[WeightUse] = field(default_factory=list)
    roles: dict[str, int] = field(default_factory=dict)  # role -> quantized node count

    def add_activation(self, name: str, node: onnx.NodeProto, index: int) -> None:
        self.activations.setdefault(name, []).append((node, index))


@dataclass
class SmoothTarget:
    """A LayerNorm whose output reaches only linear layers with constant weights."""

    norm: onnx.NodeProto
    weights: list[WeightUse]


@dataclass
class QuantizationRecord:
    """What was done (stored as the ``quantize`` entry of the artifact's ``transforms``)."""

    precision: str
    quantizer: str
    weights: str
    activations: str
    calibrator: str
    keep_float: list[str]
    quantized_nodes: dict[str, int]
    smoothing: dict[str, Any]
    calibration: dict[str, Any]
    opset: int
    reduce_range: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": QUANTIZE_TRANSFORM, **asdict(self)}


# ---------------------------------------------------------------------------------------------
# Planning


def _gelu_input(index: GraphIndex, erf: onnx.NodeProto) -> str | None:
    """``x`` of the exporter's erf-GELU around ``erf``: ``Erf(Div(x, √2))`` or ``Erf(Mul(x, 1/√2))``."""
    scaled = index.producers.get(erf.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul") or len(scaled.input) != 2:
        return None
    constant = index.scalar(scaled.input[1])
    target = math.sqrt(2.0) if scaled.op_type == "Div" else 1 / math.sqrt(2.0)
    if constant is None or abs(constant - target) > 1e-4:
        return None
    return scaled.input[0]


def _weight_axis(node: onnx.NodeProto, index: int, weight: np.ndarray) -> int | None:
    """The output-channel axis of a constant weight input, or ``None`` if it is not a plain weight."""
    if node.op_type == "Conv" and index == 1 and weight.ndim >= 3:
        return 0
    if node.op_type == "MatMul" and index == 1 and weight.ndim == 2:
        return 1
    if node.op_type == "Gemm" and index == 1 and weight.ndim == 2:
        return 0 if attr(node, "transB", 0) else 1
    return None


def image_dependent(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose *values* depend on the graph inputs (``Shape``/``Size`` pass on shapes only).

    The position-embedding resampling multiplies the constant grid by interpolation matrices
    computed from the input's *shape*: those MatMuls are not linear layers and stay in float.
    """
    dependent = {value.name for value in graph.input}
    for node in graph.node:  # ONNX graphs are stored in topological order
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in dependent for name in node.input if name):
            dependent.update(name for name in node.output if name)
    return dependent


def plan_quantization(model: onnx.ModelProto, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT) -> Plan:
    """Which tensors of ``model`` get Q/DQ: the float inputs of every node whose role is not in ``keep_float``.

    Roles: ``Conv``/``MatMul``/``Gemm`` with a constant weight (activation input per tensor,
    weight per output channel), ``AttentionMatMul`` (both inputs), ``LayerNormalization`` and
    ``Softmax`` (their data input) and ``Gelu`` (its input). Only nodes whose data input depends
    on the image's values count (:func:`image_dependent`): the position-embedding resampling
    stays float.
    """
    keep = set(keep_float)
    graph = model.graph
    index = GraphIndex(graph)
    dependent = image_dependent(graph)
    plan = Plan()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] not in dependent:
            continue
        op = node.op_type
        if op in WEIGHTED_OPS:
            weight_slot = 1
            weight = index.const(node.input[weight_slot]) if len(node.input) > weight_slot else None
            if weight is None:
                if op == "MatMul" and ATTENTION_MATMUL not in keep and node.input[1] in dependent:
                    plan.add_activation(node.input[0], node, 0)
                    plan.add_activation(node.input[1], node, 1)
                    plan.roles[ATTENTION_MATMUL] = plan.roles.get(ATTENTION_MATMUL, 0) + 1
                continue
            if op in keep or weight.dtype != np.float32 or index.const(node.input[0]) is not None:
                continue
            axis = _weight_axis(node, weight_slot, weight)
            if axis is None:
                continue
            plan.add_activation(node.input[0], node, 0)
            plan.weights.append(WeightUse(node, weight_slot, axis))
            plan.roles[op] = plan.roles.get(op, 0) + 1
        elif op in ("LayerNormalization", "Softmax") and op not in keep:
            plan.add_activation(node.input[0], node, 0)
            plan.roles[op] = plan.roles.get(op, 0) + 1
        elif op == "Erf" and GELU not in keep:
            x = _gelu_input(index, node)
            if x is not None:
                for consumer in index.consumers.get(x, []):
                    for slot, name in enumerate(consumer.input):
                        if name == x:
                            plan.add_activation(x, consumer, slot)
                plan.roles[GELU] = plan.roles.get(GELU, 0) + 1
        elif op == "Gelu" and GELU not in keep:
            plan.add_activation(node.input[0], node, 0)
            plan.roles[GELU] = plan.roles.get(GELU, 0) + 1
    return plan


def _reaches_only_linear(index: GraphIndex, name: str, weights: list[WeightUse]) -> bool:
    """Whether every use of ``name`` is (through token-selecting Slice/Gather) the activation input of
    a MatMul/Gemm with a constant 2-D weight; collects those weights."""
    if name in index.outputs:
        return False
    consumers = index.consumers.get(name, [])
    if not consumers:
        return False
    for node in consumers:
        if node.op_type in _TOKEN_SELECT and node.input[0] == name:
            if not _keeps_channels(index, node) or not _reaches_only_linear(index, node.output[0], weights):
                return False
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.input[0] != name or len(node.input) < 2:
            return False
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return False
        weight = index.const(node.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return False
        weights.append(WeightUse(node, 1, _weight_axis(node, 1, weight)))
    return True


def _keeps_channels(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Slice/Gather that leaves the last (channel) axis of a ``[batch, tokens, channels]`` tensor alone."""
    if node.op_type == "Gather":
        return int(attr(node, "axis", 0)) in (0, 1)
    if len(node.input) < 4:
        return False  # no axes input: the slice runs over the leading axes, but only as many as starts has
    axes = index.const(node.input[3])
    return axes is not None and all(int(a) in (0, 1) for a in np.ravel(axes))


def smoothing_targets(model: onnx.ModelProto) -> list[SmoothTarget]:
    """LayerNorms (constant scale and bias over the last axis) whose output feeds only linear layers."""
    index = GraphIndex(model.graph)
    targets = []
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or int(attr(node, "axis", -1)) != -1:
            continue
        gamma, beta = index.const(node.input[1]), index.const(node.input[2])
        if gamma is None or beta is None or gamma.ndim != 1 or node.input[1] not in index.initializers \
                or node.input[2] not in index.initializers:
            continue
        weights: list[WeightUse] = []
        if _reaches_only_linear(index, node.output[0], weights) and weights:
            targets.append(SmoothTarget(node, weights))
    return targets


def own_initializers(model: onnx.ModelProto, targets: list[SmoothTarget]) -> None:
    """Give every initializer a smoothing rescales one reader only: the exporter shares identical
    tensors (LayerNorm scales of all ones, say) between nodes, and each LayerNorm gets its own scale."""
    graph = model.graph
    index = GraphIndex(graph)
    names = Names(graph)
    for node, slot in [(t.norm, s) for t in targets for s in (1, 2)] + \
            [(w.node, w.index) for t in targets for w in t.weights]:
        name = node.input[slot]
        if index.uses(name) > 1:
            copy_name = names.new(f"{name}_{node.name or 'node'}")
            clone = TensorProto()
            clone.CopyFrom(index.initializers[name])
            clone.name = copy_name
            graph.initializer.append(clone)
            node.input[slot] = copy_name
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class TensorStats:
    """Running statistics of one tensor's magnitudes over the calibration batches."""

    amax: float = 0.0
    channel_amax: np.ndarray | None = None
    top: np.ndarray | None = None  # the largest magnitudes seen (percentile calibrator)
    count: int = 0

    def update(self, value: np.ndarray, channels: bool, keep: int | None) -> None:
        magnitude = np.abs(value.astype(np.float32, copy=False))
        self.amax = max(self.amax, float(magnitude.max(initial=0.0)))
        self.count += magnitude.size
        if channels:
            per_channel = magnitude.reshape(-1, magnitude.shape[-1]).max(axis=0)
            self.channel_amax = per_channel if self.channel_amax is None else np.maximum(self.channel_amax, per_channel)
        if keep:
            flat = magnitude.ravel()
            if flat.size > keep:
                flat = np.partition(flat, flat.size - keep)[flat.size - keep:]
            merged = flat if self.top is None else np.concatenate([self.top, flat])
            if merged.size > keep:
                merged = np.partition(merged, merged.size - keep)[merged.size - keep:]
            self.top = merged

    def percentile_amax(self, percentile: float) -> float:
        """The magnitude at ``percentile`` (the smallest of the kept largest values)."""
        if self.top is None or not self.top.size:
            return self.amax
        rank = max(1, math.ceil((1.0 - percentile / 100.0) * self.count))
        kept = np.sort(self.top)[::-1]
        return float(kept[min(rank, kept.size) - 1])


def _session(model: onnx.ModelProto, folder: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    path = folder / "calibration.onnx"
    if graph_bytes(model) > 2**31 - 2**27:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="calibration.onnx.data", size_threshold=1024)
    else:
        path.write_bytes(model.SerializeToString())
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def collect_stats(model: onnx.ModelProto, tensors: Iterable[str], batches: Iterable[np.ndarray], *,
                  channels: Iterable[str] = (), percentile: float | None = None, samples: int | None = None,
                  threads: int | None = None) -> dict[str, TensorStats]:
    """Run ``model`` (fp32) with onnxruntime on ``batches`` and gather magnitude statistics of ``tensors``.

    ``channels`` also get per-channel (last axis) maxima; with ``percentile`` (and ``samples``, the
    number of calibration images) enough of the largest magnitudes are kept to read it exactly.
    """
    wanted = list(dict.fromkeys([*tensors, *channels]))
    per_channel = set(channels)
    probe = copy.deepcopy(model)
    existing = {value.name for value in probe.graph.output}
    input_name = probe.graph.input[0].name
    for name in wanted:
        if name not in existing and name != input_name:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    stats = {name: TensorStats() for name in wanted}
    with tempfile.TemporaryDirectory(prefix="vitdeploy-calibration-") as folder:
        session = _session(probe, Path(folder), threads)
        del probe
        outputs = [name for name in wanted if name != input_name]
        for batch in batches:
            values = dict(zip(outputs, session.run(outputs, {input_name: batch}), strict=True)) if outputs else {}
            if input_name in stats:
                values[input_name] = batch
            for name in wanted:
                keep = None
                if percentile is not None and samples:
                    per_sample = values[name].size // max(1, values[name].shape[0])
                    keep = max(1, math.ceil((1.0 - percentile / 100.0) * per_sample * samples)) + 1
                stats[name].update(values[name], name in per_channel, keep)
    return stats


# ---------------------------------------------------------------------------------------------
# Transforms


def smooth_layer_norms(model: onnx.ModelProto, targets: list[SmoothTarget], channel_amax: dict[str, np.ndarray],
                       alpha: float) -> int:
    """Migrate activation outliers of each target LayerNorm into its consumers' weights (in place).

    ``s_j = amax(X_j)^alpha / amax(W_j)^(1 - alpha)`` over the LayerNorm output ``X`` and every
    consumer weight's input row ``j``; the LayerNorm's scale and bias are divided by ``s`` and the
    weight rows multiplied by it, so the float function is unchanged. Returns how many were smoothed.
    """
    own_initializers(model, targets)
    initializers = {init.name: init for init in model.graph.initializer}
    smoothed = 0
    for target in targets:
        x_amax = channel_amax.get(target.norm.output[0])
        if x_amax is None:
            continue
        weights = []
        for use in target.weights:
            array = numpy_helper.to_array(initializers[use.node.input[use.index]])
            # Rows of a [in, out] MatMul/Gemm weight are its input channels; a transposed Gemm B is [out, in].
            weights.append((use, array, use.axis == 0))
        w_amax = np.max([np.abs(w.T if transposed else w).max(axis=1) for _, w, transposed in weights], axis=0)
        valid = (x_amax > 0) & (w_amax > 0)
        scale = np.ones_like(x_amax, dtype=np.float64)
        scale[valid] = x_amax[valid].astype(np.float64) ** alpha / w_amax[valid].astype(np.float64) ** (1.0 - alpha)
        scale = np.clip(scale, 1e-5, 1e5)
        for slot in (1, 2):
            name = target.norm.input[slot]
            array = numpy_helper.to_array(initializers[name]).astype(np.float64) / scale
            initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
        for use, array, transposed in weights:
            name = use.node.input[use.index]
            scaled = array * (scale[None, :] if transposed else scale[:, None])
            initializers[name].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))
        smoothed += 1
    return smoothed


def _quantize_array(array: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    """``array / scale`` in the quantized type: int8 rounded half to even and clipped to +-127, or
    float8e4m3fn (round to nearest even, saturated to +-448), exactly as ``QuantizeLinear`` does."""
    scaled = array.astype(np.float64) / scale
    if precision == "int8":
        return np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(scaled, -QMAX["fp8"], QMAX["fp8"]).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def _tensor(array: np.ndarray, name: str, precision: str | None = None) -> TensorProto:
    if precision == "fp8":
        raw = np.ascontiguousarray(array).view(np.uint8).tobytes()
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(array.shape), raw, raw=True)
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _zero_point(shape: tuple[int, ...], name: str, precision: str) -> TensorProto:
    if precision == "int8":
        return numpy_helper.from_array(np.zeros(shape, dtype=np.int8), name)
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(shape), bytes(int(np.prod(shape))), raw=True)


def insert_qdq(model: onnx.ModelProto, plan: Plan, amax: dict[str, float], precision: str,
               reduce_range: bool = False) -> dict[str, int]:
    """Put the Q/DQ of ``plan`` into ``model`` (in place): activations per tensor with scale
    ``amax / QMAX``, weights quantized per output channel (int8 weights to +-63 with
    ``reduce_range``, see :class:`QuantizeOptions`). Returns node counts."""
    graph = model.graph
    names = Names(graph)
    qmax = QMAX[precision]
    weight_qmax = REDUCED_WEIGHT_QMAX if reduce_range else qmax
    initializers = {init.name: init for init in graph.initializer}
    new_inits: list[TensorProto] = []
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> Q/DQ nodes placed after its producer
    counts = {"activations": 0, "weights": 0}
    for name, uses in plan.activations.items():
        magnitude = float(amax.get(name, 0.0))
        scale = np.float32(magnitude / qmax if magnitude > 0 and math.isfinite(magnitude) else 1.0)
        scale_name, zero_name = names.new(f"{name}_scale"), names.new(f"{name}_zero_point")
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                      _zero_point((), zero_name, precision)]
        quantized, restored = names.new(f"{name}_quantized"), names.new(f"{name}_dequantized")
        after[name] = [
            helper.make_node("QuantizeLinear", [name, scale_name, zero_name], [quantized],
                             name=names.new(f"{name}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale_name, zero_name], [restored],
                             name=names.new(f"{name}_DequantizeLinear")),
        ]
        for node, slot in uses:
            node.input[slot] = restored
        counts["activations"] += 1
    weight_nodes: dict[int, list[onnx.NodeProto]] = {}
    for use in plan.weights:
        name = use.node.input[use.index]
        array = numpy_helper.to_array(initializers[name])
        reduce_axes = tuple(axis for axis in range(array.ndim) if axis != use.axis)
        channel_amax = np.abs(array).max(axis=reduce_axes).astype(np.float64)
        scale = np.where(channel_amax > 0, channel_amax / weight_qmax, 1.0).astype(np.float32)
        shape = [1] * array.ndim
        shape[use.axis] = -1
        quantized = _quantize_array(array, scale.astype(np.float64).reshape(shape), precision)
        q_name, s_name = names.new(f"{name}_quantized"), names.new(f"{name}_scale")
        z_name, restored = names.new(f"{name}_zero_point"), names.new(f"{name}_dequantized")
        new_inits += [_tensor(quantized, q_name, precision), numpy_helper.from_array(scale, s_name),
                      _zero_point((scale.size,), z_name, precision)]
        weight_nodes.setdefault(id(use.node), []).append(helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [restored], name=names.new(f"{name}_DequantizeLinear"),
            axis=use.axis))
        use.node.input[use.index] = restored
        counts["weights"] += 1
    nodes: list[onnx.NodeProto] = []
    for value in graph.input:
        nodes.extend(after.pop(value.name, []))
    for node in graph.node:
        nodes.extend(weight_nodes.get(id(node), []))
        nodes.append(node)
        for output in node.output:
            nodes.extend(after.pop(output, []))
    for leftover in after.values():  # activations that are initializers (none in exported graphs)
        nodes = leftover + nodes
    graph.initializer.extend(new_inits)
    used = {name for node in nodes for name in node.input} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ordered = topological(graph, nodes)
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]
    return counts


def _raise_opset(model: onnx.ModelProto, version: int) -> None:
    """Declare default-domain opset ``version``: the ops that changed between 17 and 19 (Cast, Pad,
    Reshape, Resize, Shape, Q/DQ, ...) only gained types or new attribute values, so the graph means
    the same."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version


# ---------------------------------------------------------------------------------------------
# The whole transform


def quantize_model(model: onnx.ModelProto, calibration: Any, options: QuantizeOptions | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, QuantizationRecord]:
    """A quantized copy of the fp32 graph ``model`` and what was done.

    ``calibration`` is a :class:`vitdeploy.calibration.CalibrationSet` (or anything with
    ``batches(n)``, ``count`` and ``describe()``). Steps: plan (:func:`plan_quantization`) → one
    calibration pass: per-tensor statistics of every quantized activation and, with
    ``smooth_alpha > 0``, per-channel maxima of the LayerNorm outputs feeding linear layers →
    :func:`smooth_layer_norms` on those whose channel ratio reaches ``smooth_threshold`` (and then
    a second pass for the new ranges) → :func:`insert_qdq`. If the graph carries vitdeploy metadata, it is updated: precision, the
    ``quantize`` transform record, validation cleared (the caller validates).
    """
    options = options or QuantizeOptions()
    say = log or (lambda message: None)
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for node in model.graph.node):
        raise ValueError("the graph is already quantized (it has Q/DQ nodes); quantize the fp32 graph")
    quantized = copy.deepcopy(model)
    # The plan names tensors and node inputs; smoothing changes weights and LayerNorm scales only.
    plan = plan_quantization(quantized, options.keep_float)
    if not plan.activations and not plan.weights:
        raise ValueError("nothing to quantize: the graph has no Conv/MatMul/Gemm with constant weights outside keep_float")
    targets = smoothing_targets(quantized) if options.smooth_alpha > 0 else []
    smoothing: dict[str, Any] = {"method": "smoothquant-layernorm" if options.smooth_alpha > 0 else "none",
                                 "alpha": options.smooth_alpha, "layer_norms": 0, "candidates": len(targets)}
    percentile = options.percentile if options.calibrator == "percentile" else None
    say(f"calibrating {len(plan.activations)} activation scales on {calibration.count} images ({options.calibrator})"
        + (f" and the output channels of {len(targets)} LayerNorms" if targets else ""))
    stats = collect_stats(quantized, list(plan.activations), calibration.batches(options.batch_size),
                          channels=[t.norm.output[0] for t in targets], percentile=percentile,
                          samples=calibration.count, threads=options.threads)
    if targets:
        ratios = {t.norm.output[0]: float(stats[t.norm.output[0]].channel_amax.max()
                                          / max(float(np.median(stats[t.norm.output[0]].channel_amax)), 1e-12))
                  for t in targets}
        chosen = [t for t in targets if ratios[t.norm.output[0]] >= options.smooth_threshold]
        channel_amax = {t.norm.output[0]: stats[t.norm.output[0]].channel_amax for t in chosen}
        smoothing["layer_norms"] = smooth_layer_norms(quantized, chosen, channel_amax, options.smooth_alpha)
        smoothing["threshold"] = options.smooth_threshold
        smoothing["max_channel_ratio"] = round(max(ratios.values()), 2)
        say(f"smoothed {smoothing['layer_norms']} of {len(targets)} LayerNorms (largest channel-max ratio "
            f"{smoothing['max_channel_ratio']}, threshold {options.smooth_threshold:g})")
        if chosen:  # the smoothed LayerNorm outputs have new ranges: calibrate again (the function is the same)
            say("calibrating the activation scales again after smoothing")
            stats = collect_stats(quantized, list(plan.activations), calibration.batches(options.batch_size),
                                  percentile=percentile, samples=calibration.count, threads=options.threads)
    amax = {name: (s.percentile_amax(options.percentile) if percentile is not None else s.amax)
            for name, s in stats.items()}
    if options.precision == "fp8" and opset_version(quantized) < FP8_MIN_OPSET:
        _raise_opset(quantized, FP8_MIN_OPSET)
    insert_qdq(quantized, plan, amax, options.precision, options.reduce_range)
    record = QuantizationRecord(
        precision=options.precision, quantizer=QUANTIZER,
        weights=f"symmetric per output channel, stored {'int8' if options.precision == 'int8' else 'float8e4m3fn'}"
        + (" in 7 bits (+-63, reduce_range)" if options.reduce_range else ""),
        activations="symmetric per tensor, calibrated", calibrator=options.calibrator
        + (f" {options.percentile:g}" if percentile is not None else ""),
        keep_float=list(options.keep_float), quantized_nodes=dict(sorted(plan.roles.items())),
        smoothing=smoothing, calibration=calibration.describe(), opset=opset_version(quantized),
        reduce_range=options.reduce_range,
    )
    _update_metadata(quantized, record)
    return quantized, record


def _update_metadata(model: onnx.ModelProto, record: QuantizationRecord) -> None:
    from vitdeploy.metadata import PORTABLE, ArtifactMetadata

    props = {p.key: p.value for p in model.metadata_props}
    try:
        metadata = ArtifactMetadata.from_props(props)
    except ValueError:
        return  # not a vitdeploy artifact
    metadata.precision = record.precision
    metadata.fp32_ops = []
    metadata.opset = record.opset
    metadata.target = PORTABLE
    metadata.transforms = [t for t in metadata.transforms if t.get("name") != QUANTIZE_TRANSFORM] + [record.to_dict()]
    metadata.variants = {}
    metadata.validation = None
    set_metadata(model, metadata.to_props())


def quantization_record(metadata: Any) -> dict[str, Any] | None:
    """The ``quantize`` entry of an artifact's ``transforms`` (``None`` for a float graph)."""
    for transform in getattr(metadata, "transforms", []) or []:
        if transform.get("name") == QUANTIZE_TRANSFORM:
            return transform
    return None
