"""Where a ViT's time goes on the CPU: each backend's own profiler, by category, against the measured peaks.

    python studies/cpu_profile.py --model vit_small_patch16_224 --precision fp32,int8 \\
        --batch 1,8 --backend onnxruntime,openvino [--output PATH]

Each (backend, precision, batch) runs the graph a user of that backend runs (exported once into
the cache folder and reused, as ``vitdeploy bench`` does): onnxruntime the validated CPU variant
of the fp32 or int8 file (contrib-op attention and GELU), OpenVINO the portable fp32 or int8 file
at ``--openvino-precision`` (f32 by default; ``--per-shape`` compiles it for the input shape), and
``openvino-nncf`` the peer ``tune --compare-nncf`` times: NNCF int8 of the fp32 file, compiled for the
shape at OpenVINO's default precision. Each is run under its backend's own profiler for
several warm calls: onnxruntime's ``SessionOptions.enable_profiling`` (the JSON trace's per-node
kernel times, named as in the optimized graph it saves) and OpenVINO's ``PERF_COUNT``
(``InferRequest.profiling_info``: per executed node its type, kernel and time, tied to the ONNX
nodes it fused by the runtime model's ``originalLayersNames``).

Every executed node lands in one category of :data:`CATEGORIES`; a node that fused several ONNX
nodes (OpenVINO's int8 fully connected layer with its bias, GELU and the next quantize) counts
as the first of them in that order. FLOPs are counted per node, 2 x multiply-accumulates of its
real shapes (onnxruntime: the trace's shapes and the saved graph's weights; OpenVINO: the ONNX
nodes it fused, measured by one unoptimized onnxruntime call of the same file), so a category's
GOP/s is its own FLOPs over its own time, held against the measured peak of the precision its
kernels ran in (int8 kernels against the int8 peak, fp32 against fp32). The whole model's
FLOPs are :func:`vitdeploy.flops.count_flops`, over the median wall time of the runtime with the
profiler off. Shares are of the profiled total (the sum of node times); onnxruntime's time
between nodes is reported beside it.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from study import RESULTS, command_line, write_results

DEFAULT_OUTPUT = RESULTS / "profile.json"
BACKENDS = ("onnxruntime", "openvino", "openvino-nncf")
OPENVINO_PRECISIONS = ("f32", "bf16")
PRECISIONS = ("fp32", "int8")

# Categories in priority order: a fused node counts as the first category among its parts.
CATEGORIES = {
    "gemm": "projection GEMMs (qkv, proj, fc1, fc2, patch conv, head)",
    "fused_attention": "fused attention op (qkv GEMM + attention matmuls + softmax in one kernel)",
    "attention": "attention batch-matmuls (Q·Kᵀ, P·V; with the softmax where one kernel does all three)",
    "softmax": "softmax",
    "layernorm": "LayerNorm",
    "gelu": "GELU / activation",
    "pos_embed": "position-embedding resampling (and other work computed from the input size alone)",
    "qdq": "Q/DQ and casts",
    "layout": "layout (Transpose/Reshape/Concat/Slice/Gather/...)",
    "other": "other (bias and residual adds, ...)",
}
# Categories whose nodes do matrix arithmetic: rows per compute precision, with GOP/s and fraction of peak.
ARITHMETIC = ("gemm", "fused_attention", "attention", "pos_embed")

_MATMULS = {"MatMul", "FusedMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul",
            "QLinearMatMul"}
_GEMMS = {"Gemm", "FusedGemm", "QGemm"}
_CONVS = {"Conv", "FusedConv", "ConvInteger", "QLinearConv", "NhwcFusedConv"}
_FUSED_ATTENTION = {"Attention", "QAttention", "QOrderedAttention"}  # the qkv projection inside
_ATTENTION_CORES = {"MultiHeadAttention", "GroupQueryAttention"}  # q, k, v in: Q·Kᵀ, softmax, P·V
_INTEGER_OPS = {"MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv",
                "ConvInteger", "QGemm", "QAttention", "QOrderedAttention"}
_BY_OP_TYPE = {
    **{op: "softmax" for op in ("Softmax", "LogSoftmax")},
    **{op: "layernorm" for op in ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                                  "SkipSimplifiedLayerNormalization")},
    **{op: "gelu" for op in ("Gelu", "BiasGelu", "FastGelu", "QuickGelu", "Erf", "Sigmoid", "Tanh", "Relu")},
    **{op: "qdq" for op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast")},
    **{op: "layout" for op in ("Transpose", "Reshape", "Concat", "Slice", "Gather", "GatherElements", "Squeeze",
                               "Unsqueeze", "Split", "Expand", "Shape", "Size", "Flatten", "Identity", "Tile", "Pad",
                               "ReorderInput", "ReorderOutput")},
}
# OpenVINO node types of nodes that fused no ONNX node of their own (layouts it inserted, decomposed ops).
_OPENVINO_TYPES = {
    "FullyConnected": "gemm", "Convolution": "gemm", "MatMul": "attention", "Softmax": "softmax",
    "SoftMax": "softmax", "MVN": "layernorm", "RMS": "layernorm", "Gelu": "gelu", "FakeQuantize": "qdq",
    "Convert": "qdq", "Reorder": "layout", "Transpose": "layout", "Reshape": "layout", "Concat": "layout",
    "Split": "layout", "VariadicSplit": "layout", "Gather": "layout", "StridedSlice": "layout", "Slice": "layout",
    "Squeeze": "layout", "Unsqueeze": "layout", "Broadcast": "layout", "ShapeOf": "layout",
}


# ---------------------------------------------------------------------------------------------
# Pure parts: categories, FLOPs, traces → node times → category rows


def categorise_graph(model: Any) -> dict[str, str]:
    """The category of every node of an ONNX graph (``onnx.ModelProto``), by node name.

    Q/DQ ops are ``qdq`` wherever they are; nodes whose values depend on the input's size alone
    (:func:`~vitdeploy.exporters.quantize.image_dependent`: the position-embedding resampling,
    the class-token expand, shape arithmetic) are ``pos_embed``; the exporter's erf GELU is
    ``gelu`` whole; a matmul, Gemm or Conv is ``gemm`` when its weight is a constant (or the
    dequantized constant) and ``attention`` when both operands come from the image.
    """
    from vitdeploy.exporters.graph import GraphIndex
    from vitdeploy.exporters.ort_fusion import match_gelu
    from vitdeploy.exporters.quantize import image_dependent

    graph = model.graph
    index = GraphIndex(graph)
    dependent = image_dependent(graph)
    gelu: set[str] = set()
    for node in graph.node:
        match = match_gelu(index, node)
        if match is not None:
            gelu.update(member.name for member in match[1])
    categories = {}
    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            category = "qdq"
        elif op in ("Shape", "Size"):
            category = "layout"
        elif not any(name in dependent for name in node.output if name):
            category = "pos_embed"
        elif node.name in gelu:
            category = "gelu"
        elif op in _MATMULS | _GEMMS | _CONVS:
            weight = node.input[3 if op.startswith("QLinear") else 1] if len(node.input) > 1 else ""
            category = "attention" if weight in dependent else "gemm"
        elif op in _FUSED_ATTENTION:
            category = "fused_attention"
        elif op in _ATTENTION_CORES:
            category = "attention"
        else:
            category = _BY_OP_TYPE.get(op, "other")
        categories[node.name] = category
    return categories


def openvino_type_category(node_type: str) -> str:
    """The category of an OpenVINO node by its type alone (nodes that fused no ONNX node of the graph)."""
    for prefix, category in _OPENVINO_TYPES.items():
        if node_type.startswith(prefix):
            return category
    return "other"


def openvino_precision(exec_type: str) -> str:
    """The precision an OpenVINO kernel computes in, from its exec type (``brgemm_avx2_I8`` → ``int8``)."""
    kind = exec_type.lower()
    if kind.endswith(("i8", "u8")):
        return "int8"
    if kind.endswith("bf16"):
        return "bf16"
    if kind.endswith("f16"):
        return "fp16"
    return "fp32"


def _prod(values: Iterable[int]) -> int:
    return math.prod(int(v) for v in values)


def node_flops(node: Any, inputs: Sequence[Sequence[int] | None], outputs: Sequence[Sequence[int] | None]) -> int:
    """FLOPs (2 x multiply-accumulates) of one call of an ONNX node with these input and output shapes.

    Matmuls (float, integer, fused, contrib), Gemm, Conv and onnxruntime's ``Attention`` and
    ``MultiHeadAttention`` count; every other op counts 0 (elementwise work is not matrix arithmetic, as in
    :mod:`vitdeploy.flops`). A shape that is not known gives 0.
    """
    from vitdeploy.exporters.graph import attr

    op = node.op_type
    out = outputs[0] if outputs else None
    first = inputs[0] if inputs else None
    if out is None or first is None or len(first) == 0:
        return 0
    if op in _MATMULS:
        transposed = op == "FusedMatMul" and attr(node, "transA", 0) and len(first) >= 2
        return 2 * _prod(out) * int(first[-2] if transposed else first[-1])
    if op in _GEMMS:
        return 2 * _prod(out) * int(first[0] if attr(node, "transA", 0) else first[-1])
    if op in _CONVS:
        weight = inputs[3 if op == "QLinearConv" else 1] if len(inputs) > 1 else None
        return 2 * _prod(out) * _prod(weight[1:]) if weight else 0
    if op in ("Attention", "QAttention"):
        weight = inputs[1] if len(inputs) > 1 else None
        if weight is None or len(first) != 3 or len(weight) != 2:
            return 0
        batch, tokens = int(first[0]), int(first[1])
        hidden = int(weight[1]) // 3
        return 2 * batch * tokens * _prod(weight) + 4 * batch * tokens * tokens * hidden
    if op in _ATTENTION_CORES:
        key = inputs[1] if len(inputs) > 1 else None
        if len(first) != 3 or key is None or len(key) != 3:
            return 0
        return 4 * int(first[0]) * int(first[1]) * int(key[1]) * int(first[2])  # Q·Kᵀ and P·V
    return 0


def _listed_shapes(entries: list[dict[str, list[int]]] | None) -> list[list[int]]:
    """``[{"float": [2, 17, 64]}, ...]`` (a trace's ``input_type_shape``) → ``[[2, 17, 64], ...]``."""
    return [list(next(iter(entry.values()))) for entry in entries or []]


def _input_shapes(node: Any, listed: list[list[int]], initializers: dict[str, list[int]]) -> list[list[int] | None]:
    """The shape of every input of ``node``: a trace lists the inputs it still holds (onnxruntime
    drops the constant weights it pre-packed), so constants take their shape from the graph."""
    queue = list(listed)
    shapes: list[list[int] | None] = []
    for name in node.input:
        if name in initializers:
            if queue and queue[0] == initializers[name]:
                queue.pop(0)
            shapes.append(initializers[name])
        elif name:
            shapes.append(queue.pop(0) if queue else None)
        else:
            shapes.append(None)
    return shapes


def ort_kernel_events(events: list[dict[str, Any]], calls: int) -> list[dict[str, Any]]:
    """The per-node kernel events of the last ``calls`` runs in an onnxruntime profile (earlier runs
    are warm-up), in trace order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) < calls:
        raise ValueError(f"the onnxruntime profile holds {len(runs)} runs; {calls} were asked for")
    windows = [(run["ts"], run["ts"] + run["dur"]) for run in runs[len(runs) - calls:]]
    return [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
            and any(start <= e["ts"] <= end for start, end in windows)]


def ort_run_ms(events: list[dict[str, Any]], calls: int) -> float:
    """Mean duration (ms) of the last ``calls`` ``model_run`` spans of an onnxruntime profile."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-calls:]
    return sum(run["dur"] for run in runs) / 1e3 / len(runs)


@dataclass(frozen=True)
class NodeTime:
    """One executed node: what it is, where it counts, and its time over the profiled calls."""

    name: str
    kind: str  # onnxruntime: the op type; OpenVINO: "node_type/exec_type"
    category: str
    precision: str  # what its arithmetic ran in: "int8", "fp32", "bf16"
    ms: float  # summed over the profiled calls
    flops: int  # per call


def trace_nodes(events: list[dict[str, Any]], model: Any, calls: int) -> list[NodeTime]:
    """onnxruntime's profile (its JSON events) of ``model``, the graph it ran (the optimized graph it
    saved, whose node names the trace uses), as one :class:`NodeTime` per node over the last
    ``calls`` runs. A node missing from the graph is categorised by its op type."""
    from onnx import helper

    categories = categorise_graph(model)
    nodes = {node.name: node for node in model.graph.node}
    initializers = {init.name: list(init.dims) for init in model.graph.initializer}
    totals: dict[str, list[Any]] = {}  # name -> [op type, total ms, flops, precision]
    for event in ort_kernel_events(events, calls):
        name = event["name"][: -len("_kernel_time")]
        args = event.get("args", {})
        op = args.get("op_name", "")
        if name not in totals:
            node = nodes.get(name) or helper.make_node(op, [], [])
            shapes = _input_shapes(node, _listed_shapes(args.get("input_type_shape")), initializers)
            flops = node_flops(node, shapes, _listed_shapes(args.get("output_type_shape")))
            totals[name] = [op, 0.0, flops, "int8" if op in _INTEGER_OPS else "fp32"]
        totals[name][1] += event["dur"] / 1e3
    return [NodeTime(name, op, categories.get(name, _BY_OP_TYPE.get(op, "other")), precision, ms, flops)
            for name, (op, ms, flops, precision) in totals.items()]


def layer_names(model: Any) -> dict[str, str]:
    """The names OpenVINO gives the ONNX nodes of ``model`` → their node names: a node keeps its name,
    except that the node producing a graph output is named after the output."""
    names = {node.name: node.name for node in model.graph.node}
    outputs = {value.name for value in model.graph.output}
    for node in model.graph.node:
        for output in node.output:
            if output in outputs:
                names.setdefault(output, node.name)
    return names


def _original_name(name: str, names: dict[str, str]) -> str | None:
    """The ONNX node an OpenVINO layer name refers to (``names``: :func:`layer_names`): itself, or
    the part before its first ``/`` (``node_MatMul_94/DequantizationMultiply`` is what OpenVINO
    made of ``node_MatMul_94``)."""
    for candidate in (name, name.split("/", 1)[0]):
        if candidate in names:
            return names[candidate]
    return None


def openvino_nodes(rows: Iterable[tuple[str, str, str, float]], originals: dict[str, list[str]],
                   names: dict[str, str], categories: dict[str, str], flops: dict[str, int]) -> list[NodeTime]:
    """OpenVINO's executed nodes ``(name, node_type, exec_type, ms over the profiled calls)``, in execution
    order, as :class:`NodeTime`.

    A node is categorised by the ONNX nodes it fused (``originals``: the runtime model's
    ``originalLayersNames``, resolved by ``names``, see :func:`layer_names`; the first category of
    :data:`CATEGORIES` among them), else by its type; its FLOPs are those of the ONNX nodes it
    fused (``flops``, by ONNX node name), each counted once. OpenVINO renames some layers it
    rewrites (an int8 fully connected layer after a GELU becomes ``Multiply_19082``): the ONNX
    matmuls no node claimed go, in graph order, to the unnamed arithmetic nodes of their category,
    in execution order.
    """
    order = list(CATEGORIES)
    counted: set[str] = set()
    found = []
    for name, node_type, exec_type, ms in rows:
        parts = list(dict.fromkeys(onnx_name for part in originals.get(name) or [name]
                                   if (onnx_name := _original_name(part, names)) in categories))
        category = min((categories[part] for part in parts), key=order.index) if parts \
            else openvino_type_category(node_type)
        work = sum(flops.get(part, 0) for part in parts if part not in counted)
        counted.update(parts)
        found.append([NodeTime(name, f"{node_type}/{exec_type}", category, openvino_precision(exec_type), ms, work),
                      bool(parts)])
    for category in ARITHMETIC:
        unclaimed = [flops[n] for n, c in categories.items() if c == category and flops.get(n) and n not in counted]
        unnamed = [entry for entry in found if not entry[1] and entry[0].category == category]
        for entry, work in zip(unnamed, unclaimed, strict=False):
            entry[0] = replace(entry[0], flops=work)
    return [node for node, _ in found]


@dataclass(frozen=True)
class CategoryRow:
    """One category (per compute precision where it does matrix arithmetic) of one profile."""

    category: str
    precision: str | None
    ms: float  # per call
    share: float  # of the profiled total
    gflop: float  # per call
    gops_per_s: float | None
    peak_gops: float | None
    peak_fraction: float | None
    nodes: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"label": CATEGORIES[self.category], **asdict(self)}


def fraction_of_peak(gops_per_s: float | None, peak: float | None, what: str) -> tuple[float | None, str]:
    """``(fraction, note)``: achieved / peak, or ``None`` and why where there is no peak or the
    fraction would be above 1 (then the measured peak is no ceiling, and no fraction is reported)."""
    if gops_per_s is None or not peak:
        return None, ""
    fraction = gops_per_s / peak
    if fraction > 1.0:
        return None, (f"{what} {gops_per_s:.0f} GOP/s is above the measured peak of {peak:.0f}: that peak is no "
                      "ceiling here, so no fraction is reported")
    return fraction, ""


def aggregate(nodes: Sequence[NodeTime], calls: int, peaks: dict[str, float | None]) -> list[CategoryRow]:
    """Per-call time, share of the profiled total, GOP/s and fraction of peak (``peaks``: GOP/s by
    precision) of every category, in :data:`CATEGORIES` order. Arithmetic categories get one row per
    precision their kernels ran in; the shares add up to 1."""
    total = sum(node.ms for node in nodes)
    groups: dict[tuple[str, str | None], list[NodeTime]] = {}
    for node in nodes:
        key = (node.category, node.precision if node.category in ARITHMETIC else None)
        groups.setdefault(key, []).append(node)
    order = list(CATEGORIES)
    rows = []
    for (category, precision), members in sorted(groups.items(), key=lambda item: (order.index(item[0][0]),
                                                                                    item[0][1] or "")):
        ms = sum(node.ms for node in members) / calls
        flops = sum(node.flops for node in members)
        gops = flops / (ms * 1e-3) / 1e9 if precision is not None and flops and ms > 0 else None
        peak = peaks.get(precision) if precision is not None else None
        fraction, note = fraction_of_peak(gops, peak, category)
        rows.append(CategoryRow(category, precision, ms, ms * calls / total if total > 0 else 0.0, flops / 1e9, gops,
                                peak if gops is not None else None, fraction, len(members), note))
    return rows


# ---------------------------------------------------------------------------------------------
# Running the backends


@dataclass(frozen=True)
class ProfilePlan:
    """What to profile and how: backends x precisions x batches at one size, ``calls`` profiled
    calls after ``warmup`` (the wall time: as many un-profiled calls)."""

    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = (1, 8)
    size: tuple[int, int] | None = None  # (height, width); None: the model's native size
    threads: int = 2
    calls: int = 10
    warmup: int = 3
    openvino_precision: str = "f32"  # OpenVINO's inference precision for what the graph leaves in float
    per_shape: bool = False  # OpenVINO: compile vitdeploy's files for the input shape (as the peer always is)

    def __post_init__(self) -> None:
        if self.openvino_precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"openvino precision {self.openvino_precision!r} is not one of {list(OPENVINO_PRECISIONS)}")
        for name, values, allowed in (("backend", self.backends, BACKENDS), ("precision", self.precisions, PRECISIONS)):
            unknown = [v for v in values if v not in allowed]
            if unknown or not values:
                raise ValueError(f"{name} {unknown or list(values)} is not a list of {', '.join(allowed)}")
        for name in ("threads", "calls", "warmup"):
            if getattr(self, name) < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'warmup' else 1}, got {getattr(self, name)}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be >= 1, got {list(self.batches)}")


def _wall_ms(run: Callable[[], Any], calls: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def profile_onnxruntime(path: Path, pixels: np.ndarray, plan: ProfilePlan, folder: Path
                        ) -> tuple[list[NodeTime], dict[str, Any]]:
    """The node times of ``OrtRuntime(path)`` (the graph it picks) under onnxruntime's profiler, and facts
    about the run: the graph that ran, the wall time with the profiler off, the time between nodes."""
    import json

    import onnx

    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    threads = {"intra_op_threads": plan.threads, "inter_op_threads": 1}
    with OrtRuntime(path, **threads) as runtime:
        graph = runtime.graph_path
        wall = _wall_ms(lambda: runtime(pixels), plan.calls, plan.warmup)
    prefix = folder / f"ort-{path.stem}-b{len(pixels)}"
    with OrtRuntime(path, profile_prefix=prefix, **threads) as runtime:
        for _ in range(plan.warmup + plan.calls):
            runtime(pixels)
        trace = runtime.end_profiling()
        optimized = onnx.load(str(runtime.optimized_graph_path), load_external_data=False)
    events = json.loads(trace.read_text())
    nodes = trace_nodes(events, optimized, plan.calls)
    run_ms = ort_run_ms(events, plan.calls)
    node_ms = sum(node.ms for node in nodes) / plan.calls
    return nodes, {"graph": graph.name, "wall_ms": wall, "profiled_run_ms": run_ms,
                   "outside_nodes_ms": max(0.0, run_ms - node_ms)}


def onnx_node_flops(path: Path, model: Any, pixels: np.ndarray) -> dict[str, int]:
    """FLOPs of every node of ``model`` (the ONNX file at ``path``) for this input, by node name: one
    call of the unoptimized graph under onnxruntime's profiler gives each node's real shapes."""
    import json

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="vitdeploy-shapes.") as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "shapes")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: pixels})
        events = json.loads(Path(session.end_profiling()).read_text())
    return {node.name: node.flops for node in trace_nodes(events, model, 1)}


def _openvino_node_times(compiled: Any, pixels: np.ndarray, plan: ProfilePlan
                         ) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Per executed node of ``compiled`` (compiled with ``PERF_COUNT``): [type, exec type, ms summed over the
    profiled calls], and the ONNX layers each runtime node fused (``originalLayersNames``)."""
    request = compiled.create_infer_request()
    for _ in range(plan.warmup):
        request.infer({0: pixels})
    totals: dict[str, list[Any]] = {}
    for _ in range(plan.calls):
        request.infer({0: pixels})
        for info in request.profiling_info:
            if info.status.name != "EXECUTED":
                continue
            entry = totals.setdefault(info.node_name, [info.node_type, info.exec_type, 0.0])
            entry[2] += info.real_time.total_seconds() * 1e3
    originals = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        originals[op.get_friendly_name()] = [n for n in names.split(",") if n]
    return totals, originals


def _openvino_nodes(graph_path: Path, totals: dict[str, list[Any]], originals: dict[str, list[str]],
                    pixels: np.ndarray) -> list[NodeTime]:
    import onnx

    graph = onnx.load(str(graph_path))
    rows = [(name, node_type, exec_type, ms) for name, (node_type, exec_type, ms) in totals.items()]
    return openvino_nodes(rows, originals, layer_names(graph), categorise_graph(graph),
                          onnx_node_flops(graph_path, graph, pixels))


def profile_openvino(path: Path, pixels: np.ndarray, plan: ProfilePlan) -> tuple[list[NodeTime], dict[str, Any]]:
    """The node times of ``OpenVINORuntime(path)`` (the plan's inference precision, per shape or not) with
    ``PERF_COUNT`` on, and the wall time with it off."""
    from vitdeploy.runtimes.openvino import OpenVINORuntime

    options = {"threads": plan.threads, "inference_precision": plan.openvino_precision,
               "compile_per_shape": plan.per_shape}
    with OpenVINORuntime(path, **options) as runtime:
        wall = _wall_ms(lambda: runtime(pixels), plan.calls, plan.warmup)
    with OpenVINORuntime(path, config={"PERF_COUNT": True}, **options) as runtime:
        runtime(pixels)  # compiles the shape's model when per shape
        totals, originals = _openvino_node_times(runtime.compiled, pixels, plan)
    compiled = "compiled for this shape" if plan.per_shape else "compiled for the file's whole range"
    return _openvino_nodes(path, totals, originals, pixels), {
        "graph": f"{path.name}, inference precision {plan.openvino_precision}, {compiled}", "wall_ms": wall,
        "profiled_run_ms": None, "outside_nodes_ms": None}


def profile_nncf(fp32: Path, quantized: Any, pixels: np.ndarray, plan: ProfilePlan) -> tuple[list[NodeTime], dict[str, Any]]:
    """The same for the peer: OpenVINO + NNCF int8 of the fp32 file (``quantized``), compiled for this
    shape at OpenVINO's default inference precision, as ``tune --compare-nncf`` runs it; its nodes are
    named after the fp32 graph's."""
    import openvino as ov

    from vitdeploy.runtimes.openvino import compile_static
    from vitdeploy.tune.peer import peer_config

    core, config = ov.Core(), peer_config(plan.threads)
    request = compile_static(core, quantized, pixels.shape, "CPU", config).create_infer_request()
    wall = _wall_ms(lambda: request.infer({0: pixels}), plan.calls, plan.warmup)
    compiled = compile_static(core, quantized, pixels.shape, "CPU", {**config, "PERF_COUNT": True})
    totals, originals = _openvino_node_times(compiled, pixels, plan)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return _openvino_nodes(fp32, totals, originals, pixels), {
        "graph": f"NNCF int8 of {fp32.name}, inference precision {precision} (OpenVINO's default), compiled for "
                 "this shape", "wall_ms": wall, "profiled_run_ms": None, "outside_nodes_ms": None}


def profile_point(backend: str, path: Path, precision: str, pixels: np.ndarray, plan: ProfilePlan, folder: Path,
                  model_flops: int, peaks: Any, peer: Any = None) -> dict[str, Any]:
    """One profile: the backend's node times by category, and the whole model against the peak."""
    from vitdeploy.benchmarks.peaks import compute_precision
    from vitdeploy.cpu_features import cpu_flags

    if backend == "onnxruntime":
        nodes, facts = profile_onnxruntime(path, pixels, plan, folder)
    elif backend == "openvino-nncf":
        nodes, facts = profile_nncf(path, peer, pixels, plan)
    else:
        nodes, facts = profile_openvino(path, pixels, plan)
    used = sorted({node.precision for node in nodes if node.category in ARITHMETIC})
    peak_by_precision = {p: (peak.gflops if (peak := peaks.get("cpu", p)) else None) for p in used}
    rows = aggregate(nodes, plan.calls, peak_by_precision)
    whole = compute_precision(backend.removesuffix("-nncf"), "cpu", precision, cpu_flags())
    whole_peak = peaks.get("cpu", whole)
    gops = model_flops / (facts["wall_ms"] * 1e-3) / 1e9
    fraction, note = fraction_of_peak(gops, whole_peak.gflops if whole_peak else None, "the whole model")
    profiled = sum(node.ms for node in nodes) / plan.calls
    top = sorted(nodes, key=lambda node: node.ms, reverse=True)[:10]
    return {
        "backend": backend, "precision": precision, "batch": int(pixels.shape[0]),
        "height": int(pixels.shape[2]), "width": int(pixels.shape[3]), **facts,
        "profiled_ms": profiled, "model_gflop": model_flops / 1e9,
        "node_gflop": sum(node.flops for node in nodes) / 1e9,
        "compute_precision": whole, "model_gops_per_s": gops,
        "peak_gops": whole_peak.gflops if whole_peak else None, "peak_fraction": fraction, "peak_note": note,
        "categories": [row.to_dict() for row in rows],
        "top_nodes": [{"name": n.name, "kind": n.kind, "category": n.category, "ms": n.ms / plan.calls} for n in top],
        "nodes": len(nodes),
    }


def run_profiles(bench: Any, plan: ProfilePlan, peaks: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every profile of ``plan`` for ``bench`` (a :class:`~vitdeploy.benchmarks.models.BenchModel`): its
    files exported (or reused) for the plan's batches at the plan's size, then profiled."""
    from vitdeploy.benchmarks.models import Sweep
    from vitdeploy.flops import count_flops
    from vitdeploy.metadata import CLASS_TOKEN_LAST_BLOCK, read_onnx_metadata

    height, width = plan.size or (bench.config.image_size, bench.config.image_size)
    sweep = Sweep(batches=tuple(sorted(set(plan.batches))), sizes=((height, width),))
    profiles = []
    rng = np.random.default_rng(0)
    peer: tuple[Path, Any] | None = None  # the peer's fp32 file and its NNCF model, made on first use
    with tempfile.TemporaryDirectory(prefix="vitdeploy-profile.") as folder:
        for precision in plan.precisions:
            path = bench.onnx(precision, sweep, log)
            class_token_last_block = CLASS_TOKEN_LAST_BLOCK in read_onnx_metadata(path).optimizations
            per_image = count_flops(bench.config, height, width, class_token_last_block)
            for batch in plan.batches:
                pixels = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
                for backend in plan.backends:
                    if backend == "openvino-nncf" and precision != "int8":
                        continue  # the peer is int8 only
                    source, peer_model = path, None
                    if backend == "openvino-nncf":
                        if peer is None:
                            fp32 = bench.onnx("fp32", sweep, log)
                            peer = fp32, _nncf_model(fp32, max(plan.batches), height, log)
                        source, peer_model = peer
                    log(f"profiling {backend} {precision} batch {batch} at {height}x{width} "
                        f"({plan.warmup} warm-up + {plan.calls} calls)")
                    profiles.append(profile_point(backend, source, precision, pixels, plan, Path(folder),
                                                  per_image * batch, peaks, peer_model))
    return profiles


def _nncf_model(fp32: Path, max_batch: int, size: int, log: Callable[[str], None]) -> Any:
    """The peer's model: NNCF int8 of ``fp32`` on the calibration images tune uses by default."""
    from vitdeploy.calibration import DEFAULT_CALIBRATION_SIZE, load_calibration
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.tune.peer import nncf_quantized

    calibration = load_calibration(None, DEFAULT_CALIBRATION_SIZE, read_onnx_metadata(fp32).preprocessing, log=None)
    log(f"quantizing {fp32.name} with NNCF (the peer; {calibration.count} calibration images)")
    return nncf_quantized(fp32, calibration, max_batch, size)


# ---------------------------------------------------------------------------------------------
# Report


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def profile_markdown(document: dict[str, Any]) -> str:
    """The profiles as Markdown: per (backend, precision, batch) the whole model against its peak and
    a table of categories (ms per call, share, GOP/s, % of peak)."""
    from vitdeploy.benchmarks.report import markdown_table

    env = document["environment"]
    lines = [f"# Where the time goes: {document['setup']['model']}", "", "Command:", "", "```", document["command"],
             "```", "", f"CPU: {env['cpu']['model']} ({env['cpu']['usable_cpus']} usable CPUs, "
             f"{document['setup']['threads']} threads); flags: {', '.join(document['cpu']['arithmetic_flags']) or '-'}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}.",
             f"Weights: {'random' if document['setup']['random_weights'] else 'trained'}.", ""]
    for peak in document["peaks"]:
        lines.append(f"- {peak['precision']} peak: {peak['gflops']:.1f} G{'OP' if peak['precision'] == 'int8' else 'FLOP'}/s "
                     f"({peak['source']}: {peak['method']})")
    lines.append("")
    for p in document["profiles"]:
        fraction = p["peak_fraction"]
        lines += [f"## {p['backend']} {p['precision']}, batch {p['batch']}, {p['height']}x{p['width']} ({p['graph']})", "",
                  f"Whole model: {p['wall_ms']:.2f} ms per call with the profiler off, {p['model_gflop']:.2f} GFLOP, "
                  f"{p['model_gops_per_s']:.1f} GOP/s = "
                  + (f"{100 * fraction:.1f}% of the {p['compute_precision']} peak" if fraction is not None
                     else (p["peak_note"] or f"no {p['compute_precision']} peak"))
                  + f". Profiled: {p['profiled_ms']:.2f} ms per call in {p['nodes']} nodes"
                  + (f", {p['outside_nodes_ms']:.2f} ms between nodes" if p["outside_nodes_ms"] is not None else "")
                  + ".", ""]
        rows = [[c["label"], c["precision"] or "-", f"{c['ms']:.3f}", f"{100 * c['share']:.1f}%",
                 _number(c["gops_per_s"], ".1f"), _number(None if c["peak_fraction"] is None else 100 * c["peak_fraction"], ".1f"),
                 str(c["nodes"])] for c in p["categories"]]
        lines += [markdown_table(["category", "runs in", "ms/call", "share", "GOP/s", "% of peak", "nodes"], rows), ""]
        notes = [c["note"] for c in p["categories"] if c["note"]]
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _csv(text: str, cast: Callable[[str], Any] = str) -> tuple[Any, ...]:
    return tuple(cast(item.strip()) for item in text.split(",") if item.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/cpu_profile.py",
        description="Profile a ViT on onnxruntime and OpenVINO (CPU) with each backend's own profiler: time per "
        "category (GEMMs, attention, softmax, LayerNorm, GELU, Q/DQ, layout, ...) and the fraction of the "
        "measured matmul peak.")
    parser.add_argument("--model", default="vit_small_patch16_224", help="variant name (random weights, seed 0) "
                        "or checkpoint")
    parser.add_argument("--depth", type=int, default=None,
                        help="keep only the first N blocks (a quick check of this script; not for measurements)")
    parser.add_argument("--precision", default="fp32,int8", help="fp32 and/or int8 (default fp32,int8)")
    parser.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--backend", default="onnxruntime,openvino",
                        help="onnxruntime, openvino and/or openvino-nncf (the peer: NNCF int8 of the fp32 file, "
                        "int8 only; default onnxruntime,openvino)")
    parser.add_argument("--openvino-precision", choices=OPENVINO_PRECISIONS, default="f32",
                        help="OpenVINO's inference precision for what vitdeploy's graph leaves in float (default f32)")
    parser.add_argument("--per-shape", action="store_true",
                        help="compile vitdeploy's files for each input shape on OpenVINO (the peer always is)")
    parser.add_argument("--size", type=int, default=None, help="input height = width (default: native)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--calls", type=int, default=10, help="profiled calls per point, after the warm-up (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--peak-gflops", metavar="PEAK", help="peaks to compare with, e.g. fp32=150,int8=200 "
                        "(default: measure them)")
    parser.add_argument("--peak-seconds", type=float, default=1.0,
                        help="seconds per library when measuring a peak (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="exported ONNX files, reused across runs (default: artifacts/ beside --output)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"JSON report; the Markdown table goes beside it (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    try:
        args.plan = ProfilePlan(backends=_csv(args.backend), precisions=_csv(args.precision),
                                batches=_csv(args.batch, int), size=(args.size, args.size) if args.size else None,
                                threads=args.threads, calls=args.calls, warmup=args.warmup,
                                openvino_precision=args.openvino_precision, per_shape=args.per_shape)
        if args.depth is not None and args.depth < 1:
            raise ValueError(f"--depth must be >= 1, got {args.depth}")
        if not args.peak_seconds > 0:
            raise ValueError(f"--peak-seconds must be > 0, got {args.peak_seconds}")
        from vitdeploy.benchmarks.peaks import parse_peaks

        args.peaks = parse_peaks(args.peak_gflops) if args.peak_gflops else None
    except ValueError as error:
        parser.error(str(error))
    return args


def _say(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from vitdeploy.benchmarks.models import BenchModel
    from vitdeploy.benchmarks.peaks import PeakTable
    from vitdeploy.cpu_features import arithmetic_flags, has_bf16, int8_dot_flags
    from vitdeploy.files import atomic_write_text, slug

    args = parse_args(argv)
    command = command_line("cpu_profile", argv)
    cache = args.cache_dir or args.output.parent / "artifacts"
    if args.depth is None:
        bench = BenchModel.open(args.model, cache)
    else:
        import vitdeploy

        model = vitdeploy.create_model(args.model, depth=args.depth)
        bench = BenchModel.from_model(f"{slug(args.model)}-depth{args.depth}", args.model, model, cache, True)
    peaks = PeakTable(args.peaks, threads=args.threads, log=_say, seconds=args.peak_seconds)
    profiles = run_profiles(bench, args.plan, peaks, _say)
    plan = args.plan
    document = {
        "cpu": {"arithmetic_flags": arithmetic_flags(), "int8_dot_product": int8_dot_flags(),
                "bf16": has_bf16()},
        "setup": {"model": args.model, "depth": bench.config.depth, "random_weights": bench.random_weights,
                  "threads": plan.threads, "calls": plan.calls, "warmup": plan.warmup,
                  "categories": CATEGORIES},
        "peaks": peaks.to_list(),
        "profiles": profiles,
    }
    document = write_results(args.output, command, document, threads=plan.threads)
    markdown = profile_markdown(document)
    atomic_write_text(args.output.with_suffix(".md"), markdown)
    print(markdown)
    _say(f"wrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
