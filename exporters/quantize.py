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
from vitdeploy.metadata import QUANTIZE_TRANSFORM

from .graph import GraphIndex, Names, attr, graph_bytes, opset_version, set_metadata, topological

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")  # roles with a constant weight
ATTENTION_MATMUL = "AttentionMatMul"  # both of the attention's MatMuls of two activations:
ATTENTION_SCORES = "AttentionScores"  # Q·Kᵀ, whose output reaches a Softmax
ATTENTION_VALUES = "AttentionValues"  # P·V, whose first input is a Softmax's output
GELU = "Gelu"  # exact GELU, as one op or the exporter's x·0.5·(1 + erf(x/√2))
QUANTIZABLE = QUANTIZABLE_ROLES
QUANTIZER = "vitdeploy"
FP8_MIN_OPSET = 19
# The largest magnitude a symmetric quantized value holds: int8 weights use [-127, 127] (narrow
# range, symmetric); float8e4m3fn's largest finite value is 448.
QMAX = {"int8": 127.0, "fp8": 448.0}
# reduce_range: int8 weights in 7 bits. x86 CPUs without VNNI/AMX multiply u8 x s8 pairs into
# saturating 16-bit sums (vpmaddubsw); with weights within +-63 two products cannot overflow.
REDUCED_WEIGHT_QMAX = 63.0
# SmoothQuant's migration strength per precision. fp8 keeps 0 (off): E4M3's exponent holds outlier
# channels, and migrating them measured slightly worse (docs/precision.md, "INT8 and FP8").
DEFAULT_SMOOTH_ALPHA = {"int8": 0.5, "fp8": 0.0}
# Ops a smoothed LayerNorm output may pass through on its way to a linear layer: they select
# tokens or samples and leave the channel (last) axis alone.
_TOKEN_SELECT = ("Slice", "Gather")
# SmoothQuant strengths searched per LayerNorm (0: leave it unsmoothed), as the paper's alpha search.
DEFAULT_ALPHA_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
# The float-fallback loop's goal (worst output cosine vs the fp32 graph on the probe images) and its
# bound (how many layers it tries keeping in float).
DEFAULT_FALLBACK_COSINE = 0.998
DEFAULT_FALLBACK_TRIALS = 6
# ... and while the gate itself is missed (the export would be refused), up to this many: every layer of a
# 12-block ViT (50 linear layers and the patch embedding). The layernorm-weights outlier ViT-S/16 (seed 0) missed
# the gate after 16 tries (probe 0.987) and reached it on the 50th (0.991, 8 layers in float).
DEFAULT_GATE_TRIALS = 64
# Rows (tokens) of each image kept per tensor to measure quantization error on.
SAMPLE_ROWS = 16
HIGH_NORM_ROWS = 4  # and the longest rows of each image (see TensorStats.sample)
# Activation ranges tried per linear layer's input, as fractions of the calibrated maximum (1: "max");
# the one whose int8 outputs measure closest to fp32, token by token, is used (choose_ranges).
DEFAULT_RANGE_GRID = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3)
# The tail of per-token errors a range is judged by: the mean of the worst share of rows.
RANGE_TAIL = 0.02
# Synthetic (uniform random pixel) images added to the fallback probe, as the export's gate uses them.
PROBE_SYNTHETIC = 8
PROBE_CALIBRATION = 16
# Images (photos and synthetic ones, half each) of each probe set at a validation size (probe_shapes).
PROBE_PER_SHAPE = 4
# Probe images (spread over calibration and synthetic ones) each layer's effect on the outputs is measured on
# (layer_sensitivity: one run per layer, so a few).
SENSITIVITY_IMAGES = 8


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
    # Measured choices (int8; see :func:`search_alphas` and :func:`fall_back`). ``alpha_search``: with
    # ``smooth_alpha`` left at None, each smoothed LayerNorm gets the alpha of ``alpha_grid`` (0 = not
    # smoothed) whose quantized consumers reproduce their fp32 outputs best on the calibration set.
    alpha_search: bool = True
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    # The float-fallback loop: while the quantized graph misses its target against the fp32 graph on the probe
    # images, linear layers are kept in float (largest measured error first, at most ``fallback_trials`` tries).
    # The target is the precision's gate, each output judged as its kind (tokens per token, vectors per row),
    # with every row cosine raised to ``fallback_cosine`` (headroom for the other shapes); None turns it off.
    fallback_cosine: float | None = DEFAULT_FALLBACK_COSINE
    fallback_trials: int = DEFAULT_FALLBACK_TRIALS
    gate_trials: int = DEFAULT_GATE_TRIALS
    # A search that misses its target raises QuantizationTargetError (False: the record says so, and the
    # caller's validation decides).
    require_target: bool = True
    # Fractions of each linear layer's calibrated input maximum tried as its range (choose_ranges; int8 with
    # the fallback loop on); () keeps the calibrator's range everywhere.
    range_grid: tuple[float, ...] = DEFAULT_RANGE_GRID
    # When every layer quantized misses the gate itself, rank the layers the fallback tries by their measured
    # effect on the outputs (layer_sensitivity: one probe run per layer) rather than by their own error.
    sensitivity_ranking: bool = True

    def __post_init__(self) -> None:
        check_precision(self.precision, QUANTIZED_PRECISIONS)
        if self.smooth_alpha is None:
            self.smooth_alpha = DEFAULT_SMOOTH_ALPHA[self.precision]
        else:
            self.alpha_search = False  # an explicit strength is used as given
        if self.precision != "int8":
            self.alpha_search = False
            self.fallback_cosine = None
            self.range_grid = ()
        if any(not 0.0 < f <= 1.0 for f in self.range_grid):
            raise ValueError(f"range_grid must be fractions in (0, 1], got {list(self.range_grid)}")
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid must be strengths in [0, 1], got {list(self.alpha_grid)}")
        if self.fallback_cosine is not None and not 0.0 < self.fallback_cosine <= 1.0:
            raise ValueError(f"fallback_cosine must be in (0, 1] or None, got {self.fallback_cosine}")
        if self.fallback_trials < 0 or self.gate_trials < 0:
            raise ValueError(f"fallback_trials and gate_trials must be >= 0, got {self.fallback_trials} and "
                             f"{self.gate_trials}")
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


class QuantizationTargetError(ValueError):
    """The measured choices (smoothing, calibrators, layers kept in float) could not bring the quantized
    graph within its gate on the probe images; carries the search's record and says by how much."""

    def __init__(self, precision: str, record: dict[str, Any]) -> None:
        self.record = record
        figures = "; ".join(f"{name} " + ", ".join(f"{key} {value:g}" for key, value in values.items())
                            for name, values in record.get("final", {}).items())
        super().__init__(
            f"{precision} quantization missed its target on {record.get('probe', {}).get('images', '?')} probe images "
            f"with {len(record.get('kept_float', []))} layer(s) kept in float ({figures}): "
            + "; ".join(record.get("failures", [])) + "; the graph was not written")


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
    fallback: dict[str, Any] = field(default_factory=dict)

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


def attention_role(index: GraphIndex, matmul: onnx.NodeProto) -> str:
    """Which of the attention's MatMuls of two activations ``matmul`` is: ``AttentionValues`` (P·V) when its
    first input is a Softmax's output (through casts), else ``AttentionScores`` (Q·Kᵀ)."""
    producer = index.producers.get(matmul.input[0])
    while producer is not None and producer.op_type in ("Cast", "Identity", "Dropout"):
        producer = index.producers.get(producer.input[0])
    return ATTENTION_VALUES if producer is not None and producer.op_type == "Softmax" else ATTENTION_SCORES


def _before_transpose(index: GraphIndex, node: onnx.NodeProto, slot: int) -> tuple[str, onnx.NodeProto, int]:
    """Where the Q/DQ of ``node``'s input ``slot`` goes: in front of the Transpose producing it when that
    Transpose feeds only ``node`` (a per-tensor scale commutes with it), so that runtimes can still fold
    the transpose into the MatMul (Kᵀ: OpenVINO's int8 attention kernel reads K as it is stored)."""
    name = node.input[slot]
    transpose = index.produced_by(name, "Transpose")
    if transpose is not None and index.only_consumer(name) is node:
        return transpose.input[0], transpose, 0
    return name, node, slot


def plan_quantization(model: onnx.ModelProto, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT,
                      keep_nodes: Iterable[str] = ()) -> Plan:
    """Which tensors of ``model`` get Q/DQ: the float inputs of every node whose role is not in ``keep_float``
    and whose name is not in ``keep_nodes`` (single layers kept in float, see :func:`fall_back`).

    Roles: ``Conv``/``MatMul``/``Gemm`` with a constant weight (activation input per tensor,
    weight per output channel), ``AttentionScores`` and ``AttentionValues`` (both inputs;
    ``AttentionMatMul`` in ``keep_float`` keeps both), ``LayerNormalization`` and
    ``Softmax`` (their data input) and ``Gelu`` (its input). Only nodes whose data input depends
    on the image's values count (:func:`image_dependent`): the position-embedding resampling
    stays float.
    """
    keep = set(keep_float)
    kept_nodes = set(keep_nodes)
    graph = model.graph
    index = GraphIndex(graph)
    dependent = image_dependent(graph)
    plan = Plan()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or not node.input or node.input[0] not in dependent \
                or node.name in kept_nodes:
            continue
        op = node.op_type
        if op in WEIGHTED_OPS:
            weight_slot = 1
            weight = index.const(node.input[weight_slot]) if len(node.input) > weight_slot else None
            if weight is None:
                if op == "MatMul" and node.input[1] in dependent:
                    role = attention_role(index, node)
                    if role not in keep and ATTENTION_MATMUL not in keep:
                        for slot in (0, 1):
                            plan.add_activation(*_before_transpose(index, node, slot))
                        plan.roles[role] = plan.roles.get(role, 0) + 1
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
    samples: list[np.ndarray] = field(default_factory=list)  # per image, some rows [k, channels] (error measures)
    whole: list[np.ndarray] = field(default_factory=list)  # per image, the whole tensor (graph outputs)

    def sample(self, value: np.ndarray, rows: int, rng: np.random.Generator) -> None:
        """Keep up to ``rows`` random rows (tokens) of each image of ``value`` ``[images, ..., channels]`` and
        its :data:`HIGH_NORM_ROWS` longest rows: the few high-norm tokens of a trained ViT set the per-tensor
        range, and a measure that missed them would clip them unseen."""
        per_image = value.reshape(value.shape[0], -1, value.shape[-1])
        for image in per_image:
            if image.shape[0] > rows + HIGH_NORM_ROWS:
                longest = np.argpartition(np.square(image, dtype=np.float32).sum(-1), -HIGH_NORM_ROWS)[-HIGH_NORM_ROWS:]
                rest = np.setdiff1d(np.arange(image.shape[0]), longest)
                pick = np.sort(np.concatenate([longest, rng.choice(rest, rows, replace=False)]))
            else:
                pick = slice(None)
            self.samples.append(np.array(image[pick], dtype=np.float32))

    def sampled(self) -> np.ndarray:
        """The kept rows as ``[images, k, channels]``."""
        return np.stack(self.samples)

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
                  threads: int | None = None, rows: Iterable[str] = (), rows_per_image: int = SAMPLE_ROWS,
                  outputs: bool = False) -> dict[str, TensorStats]:
    """Run ``model`` (fp32) with onnxruntime on ``batches`` and gather magnitude statistics of ``tensors``.

    ``channels`` also get per-channel (last axis) maxima; with ``percentile`` (and ``samples``, the
    number of calibration images) enough of the largest magnitudes are kept to read it exactly;
    ``rows`` keep ``rows_per_image`` random rows of each image (:meth:`TensorStats.sample`);
    ``outputs`` also keeps every graph output whole (:attr:`TensorStats.whole`, one per image), apart from
    its sampled rows: an output that also feeds a linear layer (an attention pool's input) is both.
    """
    graph_outputs = [value.name for value in model.graph.output] if outputs else []
    wanted = list(dict.fromkeys([*tensors, *channels, *rows, *graph_outputs]))
    per_channel = set(channels)
    sampled = set(rows)
    whole = set(graph_outputs)
    rng = np.random.default_rng(0)
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
                if name in sampled:
                    stats[name].sample(values[name], rows_per_image, rng)
                if name in whole:
                    stats[name].whole.extend(np.array(v, dtype=np.float32) for v in values[name])
    return stats


# ---------------------------------------------------------------------------------------------
# Transforms


def _smooth_scale(x_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``s_j = amax(X_j)^alpha / amax(W_j)^(1 - alpha)`` (1 where a channel is all zero)."""
    valid = (x_amax > 0) & (w_amax > 0)
    scale = np.ones_like(x_amax, dtype=np.float64)
    scale[valid] = x_amax[valid].astype(np.float64) ** alpha / w_amax[valid].astype(np.float64) ** (1.0 - alpha)
    return np.clip(scale, 1e-5, 1e5)


def _target_weights(model: onnx.ModelProto, target: SmoothTarget) -> list[tuple[WeightUse, np.ndarray, bool]]:
    """The consumer weights of a smoothing target, each with whether it is stored ``[out, in]`` (Gemm transB)."""
    initializers = {init.name: init for init in model.graph.initializer}
    return [(use, numpy_helper.to_array(initializers[use.node.input[use.index]]), use.axis == 0)
            for use in target.weights]


def _input_channel_amax(weights: list[tuple[WeightUse, np.ndarray, bool]]) -> np.ndarray:
    return np.max([np.abs(w.T if transposed else w).max(axis=1) for _, w, transposed in weights], axis=0)


def smooth_layer_norms(model: onnx.ModelProto, targets: list[SmoothTarget], channel_amax: dict[str, np.ndarray],
                       alpha: float | dict[str, float]) -> int:
    """Migrate activation outliers of each target LayerNorm into its consumers' weights (in place).

    ``s_j = amax(X_j)^alpha / amax(W_j)^(1 - alpha)`` over the LayerNorm output ``X`` and every
    consumer weight's input row ``j``; the LayerNorm's scale and bias are divided by ``s`` and the
    weight rows multiplied by it, so the float function is unchanged. ``alpha`` is one strength or
    one per LayerNorm output name (:func:`search_alphas`; 0 leaves that one alone). Returns how many
    were smoothed.
    """
    own_initializers(model, targets)
    initializers = {init.name: init for init in model.graph.initializer}
    smoothed = 0
    for target in targets:
        x_amax = channel_amax.get(target.norm.output[0])
        strength = alpha.get(target.norm.output[0], 0.0) if isinstance(alpha, dict) else alpha
        if x_amax is None or strength <= 0:
            continue
        weights = _target_weights(model, target)
        scale = _smooth_scale(x_amax, _input_channel_amax(weights), strength)
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


# ---------------------------------------------------------------------------------------------
# Measured choices: the smoothing strength per LayerNorm, and layers kept in float


def _fake_quant_activation(x: np.ndarray, amax: float, qmax: float) -> np.ndarray:
    """``x`` through a per-tensor ``QuantizeLinear -> DequantizeLinear`` pair (int8: -128..127, half to even)."""
    scale = amax / qmax if amax > 0 and math.isfinite(amax) else 1.0
    return (np.clip(np.rint(x / np.float32(scale)), -qmax - 1, qmax) * np.float32(scale)).astype(np.float32)


def _fake_quant_weight(weight: np.ndarray, qmax: float) -> np.ndarray:
    """An ``[in, out]`` weight quantized per output channel (the columns) and restored, as :func:`insert_qdq`."""
    channel_amax = np.abs(weight).max(axis=0).astype(np.float64)
    scale = np.where(channel_amax > 0, channel_amax / qmax, 1.0).astype(np.float32)
    return (np.clip(np.rint(weight.astype(np.float64) / scale), -qmax, qmax) * scale).astype(np.float32)


def _relative_error(x_quantized: np.ndarray, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """``sum ||x_q W_q - x W||^2 / sum ||x W||^2`` over the ``(x W, W_q)`` pairs."""
    error = norm = 0.0
    for exact, weight_quantized in pairs:
        error += float(np.square(x_quantized @ weight_quantized - exact, dtype=np.float64).sum())
        norm += float(np.square(exact, dtype=np.float64).sum())
    return error / norm if norm > 0 else 0.0


def search_alphas(model: onnx.ModelProto, targets: list[SmoothTarget], stats: dict[str, TensorStats],
                  grid: Iterable[float], weight_qmax: float, qmax: float = QMAX["int8"]
                  ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The SmoothQuant strength of each target LayerNorm that its consumers' int8 outputs measure best.

    For every ``alpha`` of ``grid``, on the rows sampled of the LayerNorm output ``X``
    (``stats[...].sampled()``: the probe images, :func:`probe_images`) with its channel maxima over
    the calibration set (``stats[...].channel_amax``, which set the int8 range), the relative error
    ``sum ||Q(X/s) Q(s W) - X W||^2 / sum ||X W||^2`` over the consumer weights ``W`` (activations
    per tensor, weights per output channel, exactly as :func:`insert_qdq` quantizes). Returns the
    chosen strength per LayerNorm output name and, per name, the error at each strength tried.
    """
    own_initializers(model, targets)
    chosen: dict[str, float] = {}
    errors: dict[str, dict[str, float]] = {}
    for target in targets:
        name = target.norm.output[0]
        x = stats[name].sampled().reshape(-1, stats[name].samples[0].shape[-1])
        x_amax = stats[name].channel_amax
        weights = _target_weights(model, target)
        in_major = [w.T if transposed else w for _, w, transposed in weights]
        w_amax = _input_channel_amax(weights)
        exact = [x @ w for w in in_major]  # the float function, the same for every strength
        measured = {}
        for alpha in grid:
            scale = (_smooth_scale(x_amax, w_amax, alpha) if alpha > 0 else np.ones_like(x_amax, np.float64))
            scale32 = scale.astype(np.float32)
            x_smooth = x / scale32
            x_quantized = _fake_quant_activation(x_smooth, float((x_amax / scale).max()), qmax)
            pairs = [(y, _fake_quant_weight(w * scale32[:, None], weight_qmax)) for y, w in zip(exact, in_major, strict=True)]
            measured[alpha] = _relative_error(x_quantized, pairs)
        best = min(measured, key=lambda a: (measured[a], a))
        chosen[name] = float(best)
        errors[name] = {f"{a:g}": float(f"{e:.4g}") for a, e in measured.items()}
    return chosen, errors


def _row_errors(x_quantized: np.ndarray, exact: np.ndarray, weight_quantized: np.ndarray) -> np.ndarray:
    """Per row (token) ``||x_q W_q - x W||^2 / ||x W||^2``."""
    error = np.square(x_quantized @ weight_quantized - exact, dtype=np.float64).sum(-1)
    norm = np.square(exact, dtype=np.float64).sum(-1)
    return error / np.maximum(norm, 1e-30)


def tail_error(errors: np.ndarray, tail: float = RANGE_TAIL) -> float:
    """The mean of the worst ``tail`` share of the per-row errors (at least one row)."""
    count = max(1, math.ceil(tail * errors.size))
    return float(np.mean(np.partition(errors.ravel(), errors.size - count)[errors.size - count:]))


def choose_ranges(model: onnx.ModelProto, plan: Plan, amax: dict[str, float], stats: dict[str, TensorStats],
                  grid: Iterable[float], weight_qmax: float, qmax: float = QMAX["int8"]
                  ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The activation range of each linear layer's input, chosen by measured per-token error.

    For every fraction ``f`` of ``grid``, the input rows sampled on the probe images (``stats``, high-norm
    tokens included) are quantized per tensor with range ``f * amax`` and multiplied by the consumers'
    quantized weights; the range whose worst tokens (:func:`tail_error` of the per-token relative errors)
    come closest to fp32 wins. A per-tensor scale set by a few high-norm tokens (or GELU's long tail into
    ``fc2``) leaves the other tokens few levels; clipping helps them until the clipped tokens' own error
    dominates: this measures where. Returns the new ranges and, per tensor, the error at each fraction.
    """
    index = GraphIndex(model.graph)
    consumers: dict[str, list[np.ndarray]] = {}
    for use in plan.weights:
        name = use.node.input[0]
        if use.node.op_type not in ("MatMul", "Gemm") or name not in stats or not stats[name].samples:
            continue
        weight = index.const(use.node.input[use.index])
        consumers.setdefault(name, []).append(weight.T if use.axis == 0 else weight)
    chosen = dict(amax)
    measured: dict[str, dict[str, float]] = {}
    for name, weights in consumers.items():
        x = stats[name].sampled().reshape(-1, stats[name].samples[0].shape[-1])
        pairs = [(x @ w, _fake_quant_weight(w, weight_qmax)) for w in weights]
        errors = {}
        for fraction in grid:
            x_quantized = _fake_quant_activation(x, fraction * amax.get(name, 0.0), qmax)
            errors[fraction] = max(tail_error(_row_errors(x_quantized, exact, wq)) for exact, wq in pairs)
        best = min(errors, key=lambda f: (errors[f], -f))
        chosen[name] = best * amax.get(name, 0.0)
        measured[name] = {f"{f:g}": float(f"{e:.4g}") for f, e in errors.items()}
        measured[name]["chosen"] = best
    return chosen, measured


def patch_rows(node: onnx.NodeProto, weight: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A patch-embedding Conv (kernel = stride, no padding, dilation or groups) as the MatMul it is: the
    ``[images, patches, C*k*k]`` rows of ``images`` (NCHW) and its ``[C*k*k, out]`` weight; None for other Convs."""
    if node.op_type != "Conv" or weight.ndim != 4 or images.ndim != 4 or images.shape[1] != weight.shape[1]:
        return None
    kernel = tuple(weight.shape[2:])
    if tuple(attr(node, "strides", kernel)) != kernel or any(attr(node, "pads", [0] * 4)) \
            or int(attr(node, "group", 1)) != 1 or any(d != 1 for d in attr(node, "dilations", [1, 1])):
        return None
    n, c, h, w = images.shape
    kh, kw = kernel
    h, w = h - h % kh, w - w % kw
    patches = images[:, :, :h, :w].reshape(n, c, h // kh, kh, w // kw, kw).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, -1, c * kh * kw), weight.reshape(weight.shape[0], -1).T


def layer_errors(model: onnx.ModelProto, plan: Plan, amax: dict[str, float], stats: dict[str, TensorStats],
                 weight_qmax: float, qmax: float = QMAX["int8"], images: np.ndarray | None = None) -> dict[str, float]:
    """Each quantized MatMul/Gemm's own int8 error: the worst image's ``||Q(x) Q(W) - x W||^2 / ||x W||^2``
    on its sampled fp32 input rows ``x`` (``stats``) with the calibrated activation range ``amax``; with the
    graph-input ``images``, the patch-embedding Conv's too (:func:`patch_rows`): it quantizes the pixels, and
    every token carries its error, so the float fallback must be able to choose it."""
    index = GraphIndex(model.graph)
    errors = {}
    for use in plan.weights:
        node = use.node
        if node.op_type == "Conv" and images is not None and node.input[0] == model.graph.input[0].name:
            conv = patch_rows(node, index.const(node.input[use.index]), images)
            if conv is not None:
                rows, weight = conv
                weight_quantized = _fake_quant_weight(weight, weight_qmax)
                errors[node.name] = max(_relative_error(_fake_quant_activation(image, amax.get(node.input[0], 0.0),
                                                                               qmax), [(image @ weight, weight_quantized)])
                                        for image in rows)
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.input[0] not in stats or not stats[node.input[0]].samples:
            continue
        weight = index.const(node.input[use.index])
        weight = weight.T if use.axis == 0 else weight
        weight_quantized = _fake_quant_weight(weight, weight_qmax)
        x = stats[node.input[0]].sampled()
        errors[node.name] = max(_relative_error(_fake_quant_activation(image, amax.get(node.input[0], 0.0), qmax),
                                                [(image @ weight, weight_quantized)]) for image in x)
    return errors


def probe_images(model: onnx.ModelProto, calibration: Any) -> np.ndarray:
    """The images the fallback loop measures on: the first calibration images and, for a vitdeploy
    artifact, synthetic uniform-noise images preprocessed as it says (the export's gate uses both)."""
    from vitdeploy.metadata import ArtifactMetadata
    from vitdeploy.parity import InputFactory

    calibration_images = np.concatenate(list(calibration.batches(PROBE_CALIBRATION)))[:PROBE_CALIBRATION]
    try:
        metadata = ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props})
    except ValueError:
        return calibration_images
    if calibration_images.ndim != 4:
        return calibration_images
    height, width = calibration_images.shape[2:]
    synthetic, _ = InputFactory(metadata.preprocessing, images=[]).batch(PROBE_SYNTHETIC, height, width)
    return np.concatenate([calibration_images, synthetic.astype(calibration_images.dtype)])


def probe_shapes(model: onnx.ModelProto) -> list[np.ndarray]:
    """Probe sets at the export gate's own validation sizes (:func:`vitdeploy.parity.validation_shapes`: the
    range's minimum, a non-square middle, the maximum), :data:`PROBE_PER_SHAPE` images each (photos and synthetic
    images, half each): position resampling and other token counts change which tokens go wrong, so the
    search measures where the gate will. Empty for a graph without vitdeploy metadata."""
    from vitdeploy.metadata import ArtifactMetadata
    from vitdeploy.parity import InputFactory, validation_shapes

    try:
        metadata = ArtifactMetadata.from_props({p.key: p.value for p in model.metadata_props})
    except ValueError:
        return []
    shapes, _ = validation_shapes(metadata.shape_range, metadata.stride, PROBE_PER_SHAPE)
    inputs = InputFactory(metadata.preprocessing)
    sizes = list(dict.fromkeys((height, width) for _, height, width in shapes))
    return [inputs.batch(PROBE_PER_SHAPE, height, width)[0] for height, width in sizes]


def _in_batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    return (images[start:start + batch_size] for start in range(0, len(images), batch_size))


def _run_in_batches(session: Any, names: list[str], images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """The outputs ``names`` of ``session`` for ``images`` run ``batch_size`` at a time, concatenated by name."""
    input_name = session.get_inputs()[0].name
    runs = [session.run(names, {input_name: batch}) for batch in _in_batches(images, batch_size)]
    return {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}


@dataclass
class ProbeResult:
    """A quantized graph on the probe images, judged by the precision's gate (one metric set with the export's)."""

    margin: float  # Tolerance.margin's smallest gap over the outputs, headroom included (< 0: below an aim)
    failures: list[str]  # the gate's thresholds missed (the target: the file is refused while any remain)
    figures: dict[str, dict[str, float]]  # per output: its kind's figures (rounded)
    short_of_headroom: list[str] = field(default_factory=list)  # row cosines below the search's headroom
    shortfall: float = 0.0  # the sum of every similarity's distance below its aim, over outputs and sizes (<= 0)

    def better_than(self, other: ProbeResult) -> bool:
        """Closer to the aim: a smaller total shortfall, then a larger margin."""
        return (self.shortfall, self.margin) > (other.shortfall, other.margin)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def satisfied(self) -> bool:
        """Within the gate and the headroom: the search stops."""
        return not self.failures and not self.short_of_headroom

    @property
    def worst_cosine(self) -> float:
        """The smallest of each output's primary similarity: its worst token's cosine for token outputs,
        its worst row's for vectors and logits."""
        return min(f.get("token_cosine_min", f["cosine"]) for f in self.figures.values())


def probe_gate(model: onnx.ModelProto, sets: list[tuple[np.ndarray, dict[str, np.ndarray]]], tolerance: Any,
               batch_size: int, threads: int | None, row_target: float | None = None) -> ProbeResult:
    """``model``'s outputs against the fp32 references of each probe set ``(images, {output: array})``, each
    output judged as its kind is (:func:`vitdeploy.parity.compare_outputs`: tokens per token, vectors per
    row, logits with top-k) by ``tolerance``; ``row_target`` raises the row-cosine threshold of every output
    (the search's headroom). The figures are the worst over the sets."""
    from dataclasses import replace as replace_fields

    from vitdeploy.parity import compare_outputs, output_kind, tolerance_for_output

    margin, failures, short, figures, shortfall = math.inf, [], [], {}, 0.0
    with tempfile.TemporaryDirectory(prefix="vitdeploy-probe-") as folder:
        session = _session(model, Path(folder), threads)
        for images, reference in sets:
            names = list(reference)
            got = _run_in_batches(session, names, images, batch_size)
            where = f"{images.shape[2]}x{images.shape[3]}" if images.ndim == 4 else f"{len(images)} probe inputs"
            for name in names:
                gate = tolerance_for_output(tolerance, name)
                aim = replace_fields(gate, min_cosine=max(gate.min_cosine, row_target)) if row_target else gate
                metrics = compare_outputs(reference[name], got[name], output_kind(name), gate.token_floor)
                gap = aim.margin(metrics)
                margin = min(margin, gap)
                shortfall += min(0.0, gap) if math.isfinite(gap) else -1.0
                missed = gate.check(metrics)
                failures += [f"{name} at {where}: {failure}" for failure in missed]
                short += [f"{name} at {where}: {failure}" for failure in aim.check(metrics)
                          if "cosine" in failure and failure not in missed]
                entry = figures.setdefault(name, {})
                for key, value in (("cosine", metrics.cosine), ("token_cosine_min", metrics.token_cosine_min),
                                   ("token_cosine_p1", metrics.token_cosine_p1)):
                    if value is not None:
                        entry[key] = round(min(entry.get(key, math.inf), value), 6)
                if metrics.token_share_below is not None:
                    entry["token_share_below"] = round(max(entry.get("token_share_below", 0.0),
                                                           metrics.token_share_below), 6)
    return ProbeResult(margin, failures, figures, short, shortfall)


def output_tail_error(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], tail: float = RANGE_TAIL) -> float:
    """How far ``got`` is from ``reference``, row by row (a token of a token output, a row of a vector or
    logits): the largest over the outputs of the mean ``1 - cosine`` of its worst ``tail`` share of rows."""
    from vitdeploy.parity import token_cosines

    return max(tail_error(1.0 - token_cosines(exact, got[name]), tail) for name, exact in reference.items())


def layer_sensitivity(build: Callable[[list[str]], onnx.ModelProto], layers: list[str], images: np.ndarray,
                      reference: dict[str, np.ndarray], batch_size: int, threads: int | None,
                      say: Callable[[str], None]) -> dict[str, float]:
    """Each layer's effect on the outputs: :func:`output_tail_error` of the graph with only that layer quantized
    (``build(kept)`` with every other layer of ``layers`` kept in float) on ``images`` against their fp32
    ``reference``. A layer's own int8 error does not say how much the layers after it amplify it: in a ViT whose
    attention is sharp, the first blocks' q/k projections move the attention of every later block (perturbed
    DINOv3-S, uniform-noise images: the first qkv alone cost 8.7e-3 mean token 1 - cosine at the output, an fc2
    with a larger own error 4e-4)."""
    scores: dict[str, float] = {}
    say(f"  measuring each of {len(layers)} layers' effect on the outputs (that layer alone quantized, "
        f"{len(images)} probe images)")
    for count, name in enumerate(layers, 1):
        candidate = build([other for other in layers if other != name])
        with tempfile.TemporaryDirectory(prefix="vitdeploy-sensitivity-") as folder:
            got = _run_in_batches(_session(candidate, Path(folder), threads), list(reference), images, batch_size)
        scores[name] = output_tail_error(reference, got)
        if count % 10 == 0 or count == len(layers):
            say(f"    {count}/{len(layers)} layers measured")
    return scores


def fall_back(build: Callable[[list[str]], onnx.ModelProto], errors: dict[str, float],
              measure: Callable[[onnx.ModelProto], ProbeResult], trials: int, say: Callable[[str], None],
              gate_trials: int = 0, first: Iterable[str] = (),
              sensitivity: Callable[[], dict[str, float]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Keep layers in float, largest measured error first, while the probe misses its target.

    ``build(kept)`` makes the quantized graph with the named layers in float, ``measure`` judges it
    (:func:`probe_gate`); a layer stays in float only if it brought the probe closer to its aim
    (:meth:`ProbeResult.better_than`), and at most ``trials`` layers are tried for the headroom, up to
    ``gate_trials`` while the gate itself is still missed (the file is refused otherwise); the layers named in
    ``first`` (of ``errors``) are tried before the ranking. When every layer quantized misses the gate itself
    and ``sensitivity`` is given, the layers are ranked by what it measures first (:func:`layer_sensitivity`:
    each layer's effect on the outputs, which a layer's own error does not tell); should that search still miss
    the gate, the own-error search runs from the start too and the closer of the two is kept (errors that
    compound across layers can make the one-layer effects mislead). Returns the kept layers and the record of
    what was tried, with ``reached`` (whether the target was met) and the probe's figures before and after.
    """
    start = measure(build([]))
    scores = sensitivity() if sensitivity is not None and not start.passed else None
    say(f"  every layer quantized: worst probe cosine {start.worst_cosine:.5f}, margin {start.margin:+.5f}"
        + ("" if start.satisfied else f" (below its aim: up to {min(max(trials, gate_trials), len(scores or errors))} "
           f"layers go back to float, largest {'effect on the outputs' if scores else 'error'} first)"))
    record: dict[str, Any] = {"initial_cosine": round(start.worst_cosine, 6), "initial_margin": round(start.margin, 6),
                              "initial_shortfall": round(start.shortfall, 6), "initial": start.figures}
    searches = [("layer error", sorted(errors, key=lambda name: (name not in set(first), -errors[name])))]
    if scores is not None:
        record["sensitivity"] = {name: float(f"{value:.4g}") for name, value in scores.items()}
        searches.insert(0, ("sensitivity", sorted(scores, key=lambda name: -scores[name])))
    best: tuple[list[str], ProbeResult, list[dict[str, Any]], str] | None = None
    summaries = []
    for ranking, ranked in searches:
        if best is not None:
            if best[1].passed:
                break
            say(f"  the {best[3]} search missed the gate: the {ranking} search from the start")
        kept, result, tried = _greedy(build, measure, start, ranked, trials, gate_trials, say, errors,
                                      record.get("sensitivity"))
        summaries.append({"ranking": ranking, "tries": len(tried), "kept_float": len(kept),
                          "final_cosine": round(result.worst_cosine, 6), "reached": result.passed})
        if best is None or result.better_than(best[1]):
            best = (kept, result, tried, ranking)
    kept, result, tried, ranking = best
    record.update(ranking=ranking, tried=tried,
                  tried_first=[n for n in first if n in errors] if ranking == "layer error" else [])
    if len(summaries) > 1:
        record["searches"] = summaries
    record.update(kept_float=kept, final_cosine=round(result.worst_cosine, 6), final_margin=round(result.margin, 6),
                  final_shortfall=round(result.shortfall, 6),
                  final=result.figures, reached=result.passed, failures=result.failures,
                  headroom_reached=result.satisfied, short_of_headroom=result.short_of_headroom)
    return kept, record


def _greedy(build: Callable[[list[str]], onnx.ModelProto], measure: Callable[[onnx.ModelProto], ProbeResult],
            result: ProbeResult, ranked: list[str], trials: int, gate_trials: int, say: Callable[[str], None],
            errors: dict[str, float], sensitivity: dict[str, float] | None
            ) -> tuple[list[str], ProbeResult, list[dict[str, Any]]]:
    """:func:`fall_back`'s one pass over ``ranked`` from ``result`` (every layer quantized): the kept layers,
    the probe's result with them in float, and one entry per layer tried."""
    kept: list[str] = []
    tried: list[dict[str, Any]] = []
    for count, name in enumerate(ranked[:max(trials, gate_trials)]):
        if result.satisfied or (count >= trials and result.passed):
            break
        trial = measure(build([*kept, name]))
        better = trial.better_than(result)
        entry = {"node": name, "layer_error": float(f"{errors[name]:.4g}") if name in errors else None}
        if sensitivity is not None and name in sensitivity:
            entry["sensitivity"] = sensitivity[name]
        tried.append({**entry, "cosine": round(trial.worst_cosine, 6), "margin": round(trial.margin, 6),
                      "kept_float": better})
        say(f"  {name} in float: worst probe cosine {trial.worst_cosine:.5f}, margin {trial.margin:+.5f} "
            f"({'kept' if better else 'undone'})")
        if better:
            kept.append(name)
            result = trial
    return kept, result, tried


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
    search = options.alpha_search and bool(targets)
    smoothing: dict[str, Any] = {"method": ("smoothquant-layernorm" + (", alpha searched per LayerNorm" if search else ""))
                                 if options.smooth_alpha > 0 else "none",
                                 "alpha": "searched" if search else options.smooth_alpha, "layer_norms": 0,
                                 "candidates": len(targets)}
    percentile = options.percentile if options.calibrator == "percentile" else None
    weight_qmax = REDUCED_WEIGHT_QMAX if options.reduce_range else QMAX[options.precision]
    say(f"calibrating {len(plan.activations)} activation scales on {calibration.count} images ({options.calibrator})"
        + (f" and the output channels of {len(targets)} LayerNorms" if targets else ""))
    norm_outputs = [t.norm.output[0] for t in targets]
    stats = collect_stats(quantized, list(plan.activations), calibration.batches(options.batch_size),
                          channels=norm_outputs, percentile=percentile, samples=calibration.count,
                          threads=options.threads)
    if targets:
        ratios = {name: float(stats[name].channel_amax.max() / max(float(np.median(stats[name].channel_amax)), 1e-12))
                  for name in norm_outputs}
        chosen = [t for t in targets if ratios[t.norm.output[0]] >= options.smooth_threshold]
        channel_amax = {t.norm.output[0]: stats[t.norm.output[0]].channel_amax for t in chosen}
        alpha: float | dict[str, float] = options.smooth_alpha
        if search and chosen:
            say(f"searching the smoothing strength of {len(chosen)} LayerNorms over alpha in "
                f"{', '.join(f'{a:g}' for a in options.alpha_grid)} (int8 error of the layers each feeds)")
            # Errors are measured on the probe images (calibration and synthetic), ranges from calibration.
            images = probe_images(quantized, calibration)
            rows = collect_stats(quantized, [], _in_batches(images, options.batch_size), threads=options.threads,
                                 rows=[t.norm.output[0] for t in chosen])
            for name, value in rows.items():
                value.channel_amax = stats[name].channel_amax
            alpha, errors = search_alphas(quantized, chosen, rows, options.alpha_grid, weight_qmax,
                                          QMAX[options.precision])
            del rows
            smoothing["alphas"] = {name: alpha[name] for name in alpha}
            smoothing["alpha_errors"] = errors
        smoothing["layer_norms"] = smooth_layer_norms(quantized, chosen, channel_amax, alpha)
        smoothing["threshold"] = options.smooth_threshold
        smoothing["max_channel_ratio"] = round(max(ratios.values()), 2)
        say(f"smoothed {smoothing['layer_norms']} of {len(targets)} LayerNorms (largest channel-max ratio "
            f"{smoothing['max_channel_ratio']}, threshold {options.smooth_threshold:g})")
        if smoothing["layer_norms"]:  # smoothed LayerNorm outputs have new ranges: calibrate again (same function)
            say("calibrating the activation scales again after smoothing")
            stats = collect_stats(quantized, list(plan.activations), calibration.batches(options.batch_size),
                                  percentile=percentile, samples=calibration.count, threads=options.threads)
    amax = {name: (s.percentile_amax(options.percentile) if percentile is not None else s.amax)
            for name, s in stats.items()}
    del stats
    if options.precision == "fp8" and opset_version(quantized) < FP8_MIN_OPSET:
        _raise_opset(quantized, FP8_MIN_OPSET)
    kept_nodes: list[str] = []
    fallback: dict[str, Any] = {}
    if options.fallback_cosine is not None:
        kept_nodes, fallback, amax = _measured_fallback(quantized, plan, amax, calibration, options, weight_qmax,
                                                        say)
        if not fallback["reached"] and options.require_target:
            raise QuantizationTargetError(options.precision, fallback)
        if kept_nodes:
            plan = plan_quantization(quantized, options.keep_float, kept_nodes)
    insert_qdq(quantized, plan, amax, options.precision, options.reduce_range)
    record = QuantizationRecord(
        precision=options.precision, quantizer=QUANTIZER,
        weights=f"symmetric per output channel, stored {'int8' if options.precision == 'int8' else 'float8e4m3fn'}"
        + (" in 7 bits (+-63, reduce_range)" if options.reduce_range else ""),
        activations="symmetric per tensor, calibrated", calibrator=options.calibrator
        + (f" {options.percentile:g}" if percentile is not None else ""),
        keep_float=list(options.keep_float), quantized_nodes=dict(sorted(plan.roles.items())),
        smoothing=smoothing, calibration=calibration.describe(), opset=opset_version(quantized),
        reduce_range=options.reduce_range, fallback=fallback,
    )
    _update_metadata(quantized, record)
    return quantized, record


def _measured_fallback(smoothed: onnx.ModelProto, plan: Plan, amax: dict[str, float], calibration: Any,
                       options: QuantizeOptions, weight_qmax: float, say: Callable[[str], None]
                       ) -> tuple[list[str], dict[str, Any], dict[str, float]]:
    """:func:`choose_ranges` and :func:`fall_back` on the smoothed fp32 graph: the probe images
    (:func:`probe_images`), their fp32 outputs and each linear layer's measured error (:func:`layer_errors`)
    on them. Returns the layers kept in float, the record and the activation ranges to use."""
    images = probe_images(smoothed, calibration)
    linear_inputs = [use.node.input[0] for use in plan.weights if use.node.op_type in ("MatMul", "Gemm")]
    say(f"measuring each linear layer's int8 error on {len(images)} probe images (calibration + synthetic)")
    probe = collect_stats(smoothed, [], _in_batches(images, options.batch_size), rows=linear_inputs, outputs=True,
                          threads=options.threads)
    reference = {value.name: np.stack(probe[value.name].whole) for value in smoothed.graph.output}
    sets = [(images, reference)]
    for resized in probe_shapes(smoothed):
        outputs = collect_stats(smoothed, [], [resized], outputs=True, threads=options.threads)
        sets.append((resized, {value.name: np.stack(outputs[value.name].whole) for value in smoothed.graph.output}))
        del outputs
    ranges: dict[str, dict[str, float]] = {}
    if options.range_grid:
        say(f"choosing each linear layer's input range over {', '.join(f'{f:g}' for f in options.range_grid)} "
            "x the calibrated maximum (per-token int8 error)")
        amax, ranges = choose_ranges(smoothed, plan, amax, probe, options.range_grid, weight_qmax,
                                     QMAX[options.precision])
    errors = layer_errors(smoothed, plan, amax, probe, weight_qmax, QMAX[options.precision], images=images)
    del probe

    def build(kept: list[str]) -> onnx.ModelProto:
        candidate = copy.deepcopy(smoothed)
        insert_qdq(candidate, plan_quantization(candidate, options.keep_float, kept), amax, options.precision,
                   options.reduce_range)
        return candidate

    from vitdeploy.parity import tolerance_for

    gate = tolerance_for(options.precision)

    def measure(candidate: onnx.ModelProto) -> ProbeResult:
        return probe_gate(candidate, sets, gate, options.batch_size, options.threads, options.fallback_cosine)

    # The patch embedding goes first: its own error is small, but every token carries it through every block
    # (measured on the layernorm-weights outlier ViT-S/16, seed 0: it alone moved the probe from 0.979 to 0.986,
    # more than any other layer, while ranking by its own error put it last).
    patch = [use.node.name for use in plan.weights if use.node.name in errors and use.node.op_type == "Conv"]
    layers = list(dict.fromkeys(use.node.name for use in plan.weights))
    spread = np.unique(np.linspace(0, len(images) - 1, min(SENSITIVITY_IMAGES, len(images))).round().astype(int))
    sensitivity = (lambda: layer_sensitivity(build, layers, images[spread],
                                             {name: value[spread] for name, value in reference.items()},
                                             options.batch_size, options.threads, say)
                   ) if options.sensitivity_ranking else None
    kept, record = fall_back(build, errors, measure, options.fallback_trials, say, options.gate_trials, first=patch,
                             sensitivity=sensitivity)
    if ranges:
        record["ranges"] = {name: values["chosen"] for name, values in ranges.items()}
        record["range_errors"] = ranges
    record["target"] = {"gate": gate.name, "headroom_row_cosine": max(gate.min_cosine, options.fallback_cosine or 0.0),
                        "token_cosine": gate.min_token_cosine, "token_cosine_p1": gate.min_token_cosine_p1,
                        "token_floor": gate.token_floor, "max_share_below": gate.max_share_below}
    record["probe"] = {"images": len(images), "synthetic": max(0, len(images) - min(PROBE_CALIBRATION, calibration.count)),
                       "sizes": [f"{batch.shape[2]}x{batch.shape[3]}" for batch, _ in sets if batch.ndim == 4],
                       "images_per_validation_size": PROBE_PER_SHAPE}
    say(f"worst probe cosine {record['initial_cosine']:.5f} -> {record['final_cosine']:.5f} with "
        f"{len(kept)} layer(s) in float ({'target reached' if record['reached'] else 'TARGET MISSED'}: "
        f"{gate.name} gate" + ("" if record["headroom_reached"] else
                               f"; short of the headroom rows >= {record['target']['headroom_row_cosine']:g}") + ")")
    return kept, record, amax


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
