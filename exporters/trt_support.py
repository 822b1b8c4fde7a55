"""Pre-flight for TensorRT: what its ONNX parser would reject or treat specially, without TensorRT.

``vitdeploy check model.onnx --target tensorrt`` (and ``vitdeploy export``, which warns) runs
:func:`check_onnx` on any machine. The operator support table is data,
``trt_support_table.json`` beside this file, taken from onnx-tensorrt's ``docs/operators.md``
(the TensorRT 10.15 revision: opset 9 to 24) and its parser source for ``Resize``; see the
``sources`` entry of that file. It flags:

- op types the parser does not import, and ops from non-default domains (custom ops);
- ``Resize`` with ``antialias=1``, an unsupported ``mode``, coordinate transformation,
  nearest mode or aspect-ratio policy;
- the default-domain opset outside the supported range;
- dynamic dimensions of graph inputs/outputs without a name (``dim_param``);
- ``LayerNormalization``/``Softmax`` computing in fp16, which overflows on large activations
  (a strongly typed TensorRT network computes them in the graph's dtype);
- more than 2 GB of weights stored inside the protobuf instead of external data;
- a few other documented restrictions (extra ``LayerNormalization`` outputs, ``TopK`` with
  ``sorted=0``, ``ScatterND`` with a reduction);
- Q/DQ graphs outside what TensorRT's explicit quantization accepts (:func:`_qdq_findings`):
  it is symmetric only (every zero point 0), quantizes to signed INT8 or FP8 E4M3 (INT4/FP4
  for weights), takes constant positive scales, per-tensor scales for activations and
  per-channel scales only on constant weights, and a ``QuantizeLinear`` must feed a
  ``DequantizeLinear``. An asymmetric u8s8 graph (onnxruntime's default) fails here.

Given the TensorRT version the engine will be built with (``check --trt-version 10.3``; JetPack 6
ships 10.3), :func:`_version_findings` also applies the table's ``by_version`` entries, each keyed
by a version range: operators added after that release, inputs that release needs constant,
data types it lacks, and the known field failures of these graphs (an ``If`` node whose branches
differ in shape, rejected before 10.13: TensorRT #4558, #4603; RoPE graphs miscompiled by
10.3-10.4: #4742, #4723). All of it is data read from NVIDIA's documents and issues, never run
against a TensorRT here.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .graph import DEFAULT_DOMAINS, GraphIndex, attrs, graph_bytes, infer_types, load_onnx, tensor_types

TABLE_PATH = Path(__file__).with_name("trt_support_table.json")
TWO_GB = 2**31 - 1
SEVERITIES = ("error", "warning")
_FLOAT16 = onnx.TensorProto.FLOAT16


@functools.lru_cache(maxsize=1)
def load_support_table() -> dict[str, Any]:
    """The operator support table (with its ``sources``) as a dict."""
    return json.loads(TABLE_PATH.read_text(encoding="utf-8"))


def parse_trt_version(text: str) -> tuple[int, int]:
    """``"10.3"``, ``"10.3.0.26"`` → ``(10, 3)``; ``ValueError`` naming the text otherwise."""
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError:
        raise ValueError(f"TensorRT version {text!r} is not a version like 10.3 or 10.14.1") from None


def in_versions(version: tuple[int, int], spec: str) -> bool:
    """Whether ``version`` lies in ``spec``: comma-separated bounds such as ``">=10.0,<10.13"``."""
    for bound in (part.strip() for part in spec.split(",") if part.strip()):
        operator = next(op for op in (">=", "<=", "==", ">", "<") if bound.startswith(op))
        limit = parse_trt_version(bound[len(operator):])
        holds = {">=": version >= limit, "<=": version <= limit, "==": version == limit, ">": version > limit,
                 "<": version < limit}[operator]
        if not holds:
            return False
    return True


def installed_tensorrt_version() -> str | None:
    """The version of the TensorRT Python package installed here (its distribution metadata), else None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def default_tensorrt_version() -> tuple[str, str]:
    """The version an engine would be built with: the installed TensorRT's, else the ``gpu`` extra's pin;
    and where it came from."""
    installed = installed_tensorrt_version()
    if installed:
        return installed, "installed"
    return str(load_support_table()["by_version"]["pinned"]), "the gpu extra's pin, no TensorRT installed"


def opset_range(tensorrt_version: str | None = None) -> tuple[int, int]:
    """Inclusive (min, max) default-domain opset the parser supports.

    ``None`` gives the range every supported TensorRT version (10.x, 11.x) accepts.
    """
    versions = load_support_table()["tensorrt_versions"]
    if tensorrt_version is None:
        ranges = [tuple(v["opset"]) for v in versions.values()]
        return max(r[0] for r in ranges), min(r[1] for r in ranges)
    parts = [int(p) for p in str(tensorrt_version).split(".")[:2] if p.isdigit()]
    major = str(parts[0]) if parts else ""
    if major not in versions:
        raise ValueError(f"TensorRT version {tensorrt_version!r} is not one of the supported majors {sorted(versions)}")
    entry = versions[major]
    low, high = entry["opset"]
    minor = parts[1] if len(parts) > 1 else 0
    for since, opset in entry.get("opset_max_from", {}).items():
        if minor >= int(since.split(".")[1]):
            high = max(high, opset)
    return low, high


@dataclass(frozen=True)
class Finding:
    """One node (or graph-level fact) TensorRT's parser would reject (``error``) or treat specially."""

    severity: str
    node: str
    op_type: str
    message: str
    kind: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")


@dataclass
class PreflightReport:
    """The findings of :func:`check_onnx` for one model."""

    model: str
    target: str
    opset: int | None
    opset_range: tuple[int, int]
    tensorrt_version: str | None
    findings: list[Finding] = field(default_factory=list)
    version_source: str = ""  # where tensorrt_version came from ("--trt-version", "installed", ...)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing would make TensorRT's parser reject the model (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target": self.target,
            "ok": self.ok,
            "opset": self.opset,
            "supported_opsets": list(self.opset_range),
            "tensorrt_version": self.tensorrt_version or "10.x/11.x",
            "tensorrt_version_from": self.version_source or None,
            "support_table": load_support_table()["sources"]["operators"],
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }

    def format_text(self) -> str:
        """A human-readable report: a summary line, then one line per finding."""
        return format_report(self)


def format_report(report: PreflightReport) -> str:
    """Render ``report`` as text (summary line, then ``severity op node: message`` lines)."""
    versions = report.tensorrt_version or "10.x/11.x"
    if report.version_source:
        versions += f" ({report.version_source})"
    head = (
        f"TensorRT {versions} pre-flight of {report.model} (opset {report.opset}; parser supports "
        f"{report.opset_range[0]}..{report.opset_range[1]}): {len(report.errors)} error(s), "
        f"{len(report.warnings)} warning(s)"
    )
    lines = [head]
    for finding in report.findings:
        lines.append(f"  {finding.severity:<7} {finding.op_type or '-':<20} {finding.node}: {finding.message}")
    if report.ok:
        lines.append("  nothing here would make TensorRT's ONNX parser reject the model")
    return "\n".join(lines)


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _check_resize(node: onnx.NodeProto, name: str, table: dict[str, Any]) -> list[Finding]:
    rules, values, findings = table["resize"], attrs(node), []

    def bad(kind: str, message: str) -> None:
        findings.append(Finding("error", name, node.op_type, message, kind))

    if int(values.get("antialias", 0)) not in rules["antialias"]:
        bad("resize-antialias", "antialias=1: TensorRT's parser rejects antialiased Resize "
            "(vitdeploy.pos_embed computes antialiased resampling as MatMuls instead)")
    mode = values.get("mode", "nearest")
    if mode not in rules["modes"]:
        bad("resize-mode", f"mode {mode!r} is not one of {rules['modes']}")
    transform = values.get("coordinate_transformation_mode", "half_pixel")
    if transform not in rules["coordinate_transformation_modes"]:
        bad("resize-coordinate-transform",
            f"coordinate_transformation_mode {transform!r} is not one of {rules['coordinate_transformation_modes']}")
    nearest = values.get("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and nearest not in rules["nearest_modes"]:
        bad("resize-nearest-mode", f"nearest_mode {nearest!r} is not one of {rules['nearest_modes']}")
    if transform == "tf_half_pixel_for_nn" and nearest != "round_prefer_floor":
        bad("resize-nearest-mode", "tf_half_pixel_for_nn needs nearest_mode round_prefer_floor")
    policy = values.get("keep_aspect_ratio_policy", "stretch")
    if policy not in rules["keep_aspect_ratio_policies"]:
        bad("resize-aspect-ratio", f"keep_aspect_ratio_policy {policy!r} is not supported (only 'stretch')")
    return findings


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
    return used


def _restriction_findings(node: onnx.NodeProto, name: str, used: set[str]) -> list[Finding]:
    values = attrs(node)
    if node.op_type == "LayerNormalization" and any(o and o in used for o in node.output[1:]):
        return [Finding("error", name, node.op_type, "only the first output Y is supported (Mean/InvStdDev are used)",
                        "layernorm-extra-outputs")]
    if node.op_type == "TopK" and int(values.get("sorted", 1)) == 0:
        return [Finding("error", name, node.op_type, "sorted=0 is not supported", "topk-unsorted")]
    if node.op_type == "ScatterND" and values.get("reduction", "none") != "none":
        return [Finding("error", name, node.op_type, f"reduction {values['reduction']!r} is not supported",
                        "scatternd-reduction")]
    return []


# Quantized element types TensorRT's explicit quantization accepts (docs: "Working with Quantized Types").
_QDQ_TYPES = {onnx.TensorProto.INT8: "INT8", onnx.TensorProto.FLOAT8E4M3FN: "FP8 E4M3"}
_WEIGHT_ONLY_TYPES = {onnx.TensorProto.INT4: "INT4", onnx.TensorProto.FLOAT4E2M1: "FP4 E2M1"}


def _qdq_findings(model: onnx.ModelProto, types: dict[str, int]) -> list[Finding]:
    """What TensorRT's explicit quantization would refuse in the graph's QuantizeLinear/DequantizeLinear."""
    import numpy as np

    graph = model.graph
    index = GraphIndex(graph)
    findings: list[Finding] = []
    for position, node in enumerate(graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
            continue
        name = _node_name(node, position)

        def bad(kind: str, message: str, node: onnx.NodeProto = node, name: str = name) -> None:
            findings.append(Finding("error", name, node.op_type, message, kind))

        quantized = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
        zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
        qtype = types.get(zero) if zero else types.get(quantized)
        if node.op_type == "QuantizeLinear" and zero is None and attrs(node).get("output_dtype"):
            qtype = int(attrs(node)["output_dtype"])
        if node.op_type == "QuantizeLinear" and qtype is None and zero is None:
            qtype = onnx.TensorProto.UINT8  # the ONNX default without a zero point
        weight_only = node.op_type == "DequantizeLinear" and qtype in _WEIGHT_ONLY_TYPES
        if qtype is not None and qtype not in _QDQ_TYPES and not weight_only:
            type_name = onnx.TensorProto.DataType.Name(qtype)
            bad("qdq-type", f"quantizes to {type_name}: TensorRT's explicit quantization takes signed INT8 or FP8 "
                "E4M3 (INT4/FP4 for weights) only; re-quantize symmetric int8 (vitdeploy quantize)")
        if zero is not None:
            value = index.const(zero)
            if value is None:
                bad("qdq-zero-point", f"zero point {zero!r} is not a constant; TensorRT needs a constant 0")
            elif np.any(value.astype(np.float64) != 0):
                bad("qdq-zero-point", f"zero point {zero!r} is not 0 (asymmetric quantization); TensorRT's "
                    "quantization is symmetric: every zero point must be 0")
        scale = index.const(node.input[1])
        if scale is None:
            bad("qdq-scale", f"scale {node.input[1]!r} is not a constant; TensorRT needs constant scales")
        else:
            if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
                bad("qdq-scale", f"scale {node.input[1]!r} has values <= 0 or not finite; scales must be positive")
            if scale.size > 1 and index.const(node.input[0]) is None:
                bad("qdq-per-channel-activation", f"per-channel scale ({scale.size} values) on an activation: "
                    "TensorRT quantizes activations per tensor; per-channel scales are for constant weights")
        if node.op_type == "QuantizeLinear":
            users = index.consumers.get(node.output[0], [])
            if not users or any(user.op_type != "DequantizeLinear" for user in users):
                bad("qdq-unpaired", "QuantizeLinear output must feed DequantizeLinear nodes only (explicit Q/DQ pairs)")
    return findings


def _graph_findings(model: onnx.ModelProto) -> list[Finding]:
    findings = []
    graph = model.graph
    for kind, values in (("input", graph.input), ("output", graph.output)):
        initializers = {t.name for t in graph.initializer}
        for value in values:
            if value.name in initializers or not value.type.HasField("tensor_type"):
                continue
            tensor = value.type.tensor_type
            for axis, dim in enumerate(tensor.shape.dim):
                if not dim.HasField("dim_value") and not dim.HasField("dim_param"):
                    findings.append(Finding(
                        "warning", value.name, "", f"graph {kind} {value.name!r} axis {axis} is dynamic without a "
                        "name; name it (dim_param) so optimization profiles and runtimes can tell the axes apart",
                        "unnamed-dynamic-dim"))
            if kind == "input" and tensor.elem_type == onnx.TensorProto.DOUBLE:
                findings.append(Finding("warning", value.name, "", "float64 input: TensorRT casts DOUBLE down to FLOAT",
                                        "double-input"))
    inline = graph_bytes(model)
    if inline > TWO_GB:
        findings.append(Finding(
            "error", graph.name or "graph", "", f"{inline / 2**30:.2f} GiB of weights are stored inside the protobuf; "
            "a model over 2 GB must keep them in external data (onnx.save(..., save_as_external_data=True))",
            "weights-over-2gb"))
    return findings


def _node_findings(model: onnx.ModelProto, table: dict[str, Any], types: dict[str, int]) -> list[Finding]:
    operators = table["operators"]
    risky = set(table["fp16_overflow_risk"]["ops"])
    local_functions = {(f.domain, f.name) for f in model.functions}
    findings: list[Finding] = []

    def visit(graph: onnx.GraphProto) -> None:
        used = _used_names(graph)
        for index, node in enumerate(graph.node):
            name = _node_name(node, index)
            if (node.domain, node.op_type) in local_functions:
                continue  # the parser inlines model-local functions; their bodies are checked below
            if node.domain not in DEFAULT_DOMAINS:
                findings.append(Finding(
                    "error", name, node.op_type, f"custom op from domain {node.domain!r}: TensorRT's parser imports "
                    "only default-domain ONNX ops (or a registered plugin of that name)", "custom-domain"))
                continue
            entry = operators.get(node.op_type)
            if entry is None or not entry["supported"]:
                note = f" ({entry['restrictions']})" if entry and entry["restrictions"] else ""
                findings.append(Finding(
                    "error", name, node.op_type,
                    f"op {node.op_type} is not supported by TensorRT's ONNX parser{note}", "unsupported-op"))
                continue
            if node.op_type == "Resize":
                findings.extend(_check_resize(node, name, table))
            findings.extend(_restriction_findings(node, name, used))
            if node.op_type in risky and node.input and types.get(node.input[0]) == _FLOAT16:
                findings.append(Finding(
                    "warning", name, node.op_type, f"{node.op_type} computes in fp16 and may overflow (fp16 max 65504); "
                    "keep it in fp32 (vitdeploy export --precision fp16 does by default)", "fp16-overflow"))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for sub in attribute.graphs:
                        visit(sub)

    visit(model.graph)
    for function in model.functions:
        visit(onnx.helper.make_graph(list(function.node), function.name, [], []))
    return findings


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors the parser sees as weights: initializers and ``Constant`` outputs."""
    names = {t.name for t in graph.initializer}
    names.update(node.output[0] for node in graph.node if node.op_type == "Constant" and node.output)
    return names


def _nodes(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, str, onnx.GraphProto]]:
    """Every node with its name and the graph that holds it, subgraphs (If/Loop bodies) included."""
    found = []
    for index, node in enumerate(graph.node):
        found.append((node, _node_name(node, index), graph))
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for sub in subgraphs:
                found.extend(_nodes(sub))
    return found


def _shape(value: onnx.ValueInfoProto) -> tuple[Any, ...] | None:
    """A value's shape as dim values / names, None where unknown (no shape, or an unnamed dynamic dim)."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            return None
    return tuple(dims)


def _if_branches_differ(node: onnx.NodeProto) -> str | None:
    """Why an ``If`` node's two branches give outputs TensorRT's conditional layer cannot join, or None."""
    branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
    if len(branches) != 2:
        return None
    then, other = branches["then_branch"], branches["else_branch"]
    for position, (left, right) in enumerate(zip(then.output, other.output, strict=False)):
        left_shape, right_shape = _shape(left), _shape(right)
        if left_shape is None or right_shape is None:
            return f"output {position} has no static shape in {'then' if left_shape is None else 'else'}_branch"
        if left_shape != right_shape:
            return f"output {position} is {list(left_shape)} in then_branch but {list(right_shape)} in else_branch"
    return None


def _version_findings(model: onnx.ModelProto, version_text: str, table: dict[str, Any]) -> list[Finding]:
    """What the TensorRT release ``version_text`` rejects or is known to get wrong (the ``by_version`` data)."""
    version = parse_trt_version(version_text)
    rules = table["by_version"]
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    for entry in rules["documented_opset_max"]:
        if opset is not None and in_versions(version, entry["versions"]) and opset > entry["max"]:
            findings.append(Finding("warning", "model", "", f"opset {opset} is above {entry['max']}, the highest the "
                                    f"operator table of TensorRT {version_text} documents ({entry['source']}); "
                                    f"export with --opset {entry['max']} to be sure", "opset-undocumented"))
    try:
        types, inferred = infer_types(model)
    except Exception:  # shapes are a hint; the rules below fall back to what the graph declares
        types, inferred = {t.name: t.data_type for t in model.graph.initializer}, model
    nodes = _nodes(inferred.graph)
    constants = _constant_names(inferred.graph)
    operators = table["operators"]
    for node, name, graph in nodes:
        entry = operators.get(node.op_type)
        if node.domain in DEFAULT_DOMAINS and entry and entry["supported"]:
            since = parse_trt_version(entry["since"])
            if version < since:
                findings.append(Finding("error", name, node.op_type, f"op {node.op_type} is imported by TensorRT's "
                                        f"parser only since {entry['since']}, not by {version_text}", "op-too-new"))
        for rule in rules["constant_inputs"]:
            if (node.op_type == rule["op"] and in_versions(version, rule["versions"]) and len(node.input) > rule["input"]
                    and node.input[rule["input"]]
                    and node.input[rule["input"]] not in constants | _constant_names(graph)):
                findings.append(Finding("error", name, node.op_type, f"{rule['name']} is computed in the graph; "
                                        f"TensorRT {version_text}'s parser needs it constant ({rule['source']})",
                                        "input-not-constant"))
    used_types = set(types.values())
    for rule in rules["data_types"]:
        code = getattr(onnx.TensorProto, rule["type"], None)
        if code is not None and code in used_types and in_versions(version, rule["versions"]):
            findings.append(Finding("error", "model", "", f"{rule['type']} tensors: TensorRT {version_text} does not "
                                    f"import this type ({rule['source']})", "type-too-new"))
    op_types = {node.op_type for node, _, _ in nodes}
    for issue in rules["known_issues"]:
        if not in_versions(version, issue["versions"]):
            continue
        cited = ", ".join(issue["issues"])
        message = issue["message"].format(version=version_text)
        if issue["when"] == "if_branches_differ":
            for node, name, _ in nodes:
                why = _if_branches_differ(node) if node.op_type == "If" else None
                if why:
                    findings.append(Finding(issue["severity"], name, "If", f"{why}: {message} ({cited})", issue["id"]))
        elif issue["when"] == "rope" and {"Sin", "Cos"} <= op_types:
            findings.append(Finding(issue["severity"], "model", "", f"{message} ({cited})", issue["id"]))
    return findings


def check_onnx(
    model: str | os.PathLike[str] | onnx.ModelProto,
    target: str = "tensorrt",
    tensorrt_version: str | None = None,
    version_source: str = "",
) -> PreflightReport:
    """Check an ONNX file or ``ModelProto`` against TensorRT's ONNX parser; returns a :class:`PreflightReport`.

    ``tensorrt_version`` (``"10.3"``, ``"10.15"``, ``"11"`` ...) narrows the opset range and adds what
    that release rejects or is known to get wrong (:func:`_version_findings`); by default the range
    all of TensorRT 10.x and 11.x accept, with no release's own rules. ``version_source`` says where
    the version came from, for the report. External data is not loaded.
    """
    if target != "tensorrt":
        raise ValueError(f"target {target!r} is not supported; expected 'tensorrt'")
    if isinstance(model, onnx.ModelProto):
        proto, label = model, model.graph.name or "<ModelProto>"
    else:
        proto, label = load_onnx(model), str(model)
    table = load_support_table()
    low, high = opset_range(tensorrt_version)
    opset = next((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), None)
    report = PreflightReport(label, target, opset, (low, high), tensorrt_version, version_source=version_source)
    if opset is not None and not low <= opset <= high:
        report.findings.append(Finding(
            "error", "model", "", f"opset {opset} is outside the range {low}..{high} TensorRT's parser supports; "
            f"export with --opset {min(max(opset, low), high)}", "opset"))
    report.findings.extend(_graph_findings(proto))
    try:
        types = tensor_types(proto)
    except Exception:  # inference is a hint here; an exotic graph must not stop the pre-flight
        types = {t.name: t.data_type for t in proto.graph.initializer}
    report.findings.extend(_node_findings(proto, table, types))
    report.findings.extend(_qdq_findings(proto, types))
    if tensorrt_version is not None:
        report.findings.extend(_version_findings(proto, tensorrt_version, table))
    return report
