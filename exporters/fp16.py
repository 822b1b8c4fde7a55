"""fp16 ONNX graphs that a strongly typed TensorRT network can build, and the matching eager policy.

TensorRT >= 10.12 takes precision from the ONNX graph (strongly typed networks), so an fp16
engine needs an fp16 graph: fp16 weights and matmuls, with the ops in ``fp32_ops``
(``LayerNormalization`` and ``Softmax`` by default) computing in fp32 between Cast nodes.

Two routes lead there:

* :func:`keep_ops_in_fp32` fixes up a graph exported from a half-precision model (the export
  route, see ``onnx_export``): it inserts Casts so that every ``fp32_ops`` node computes in
  fp32. It is needed because the exporter translates ``softmax(x, dtype=float32)`` on an fp16
  ``x`` as ``Cast(Softmax(x))`` — softmax in fp16 — while eager PyTorch casts *before* it.
* :func:`convert_to_fp16` converts an existing fp32 graph: float initializers and constants to
  fp16, Casts around ``fp32_ops``, fp32 inputs/outputs kept (``keep_io_types``) through Casts at
  the graph boundary. Dynamic shapes survive: intermediate ``value_info`` is dropped and
  re-inferred by ONNX shape inference, which keeps symbolic dimensions (no fixed shapes).

:func:`prepare_eager` puts a PyTorch model under the same policy, so eager and graph compare like
for like. Only this function imports torch (lazily): the TensorRT builder can call
:func:`convert_to_fp16` with onnx alone.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.constants import DEFAULT_FP32_OPS

from .graph import GraphIndex, Names, infer_types, replace_uses, set_metadata, tensor_types

# Ops without an fp16 type in the ONNX standard at opset 17-21: always computed in fp32.
SPEC_FP32_OPS = frozenset({"Range"})
# (op, input index) slots whose type the ONNX standard fixes to float32.
FP32_SLOTS = {"Resize": {2}, "Upsample": {1}}
LOW_PRECISION = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
CONTROL_FLOW = {"If", "Loop", "Scan"}
FP16_MAX = float(np.finfo(np.float16).max)


def _check_ops(fp32_ops: Iterable[str]) -> set[str]:
    ops = set(fp32_ops)
    bad = [op for op in ops if not isinstance(op, str) or not op or not op[0].isupper()]
    if bad:
        raise ValueError(f"fp32_ops must be ONNX op type names such as 'LayerNormalization', got {bad}")
    return ops


def _reject_control_flow(graph: onnx.GraphProto) -> None:
    found = sorted({node.op_type for node in graph.node if node.op_type in CONTROL_FLOW})
    if found:
        raise ValueError(f"fp16 conversion does not handle control flow; the graph contains {found}")


def _to_fp16_array(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` as fp16, clipped to the fp16 range; also the number of values that were clipped."""
    finite = np.isfinite(array)
    clipped = int(np.count_nonzero(finite & (np.abs(array) > FP16_MAX)))
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), clipped


def keep_ops_in_fp32(model: onnx.ModelProto, fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                     copy: bool = False) -> onnx.ModelProto:
    """Make every node whose op type is in ``fp32_ops`` compute in fp32.

    fp16/bf16 inputs of those nodes get a Cast to fp32 (an fp16 initializer used only by such
    nodes is converted in place instead); their fp16/bf16 outputs are produced in fp32 and cast
    back, so the rest of the graph is unchanged. Redundant Casts are removed afterwards.
    """
    ops = _check_ops(fp32_ops) | SPEC_FP32_OPS
    if copy:
        model = copy_module.deepcopy(model)
    graph = model.graph
    types = tensor_types(model)
    names = Names(graph)
    uses = GraphIndex(graph).consumers
    initializers = {init.name: init for init in graph.initializer}
    casts: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ops:
            nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if not name or types.get(name) not in LOW_PRECISION:
                continue
            only_fp32_users = all(user.op_type in ops for user in uses.get(name, []))
            if name in initializers and only_fp32_users and types[name] == TensorProto.FLOAT16:
                array = numpy_helper.to_array(initializers[name]).astype(np.float32)
                initializers[name].CopyFrom(numpy_helper.from_array(array, name))
                types[name] = TensorProto.FLOAT
                continue
            if name not in casts:
                casts[name] = names.new(f"{name}_fp32")
                nodes.append(helper.make_node("Cast", [name], [casts[name]], name=names.new(f"{name}_to_fp32"),
                                              to=TensorProto.FLOAT))
            node.input[index] = casts[name]
        after = []
        for index, name in enumerate(node.output):
            if name and types.get(name) in LOW_PRECISION:
                wide = names.new(f"{name}_fp32")
                node.output[index] = wide
                after.append(helper.make_node("Cast", [wide], [name], name=names.new(f"{name}_from_fp32"),
                                              to=types[name]))
        nodes.append(node)
        nodes.extend(after)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_intermediate_value_info(graph)
    return refresh_value_info(remove_redundant_casts(model))


def _drop_intermediate_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``value_info`` with what ONNX shape inference derives from the graph inputs.

    Inference propagates the inputs' symbolic dims, so no intermediate tensor gets a fixed batch
    or sequence length (unlike tools that record the shapes of one sample run).
    """
    _, inferred = infer_types(model)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def remove_redundant_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Casts that change nothing: to the type their input already has, fp16→fp32→fp16
    round trips, and duplicate Casts of one tensor. Works in place and returns ``model``."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        changed = False
        types = tensor_types(model)
        producers = {name: node for node in graph.node for name in node.output}
        seen: dict[tuple[str, int], str] = {}
        remove: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.op_type != "Cast" or node.output[0] in outputs:
                continue
            to = next(a.i for a in node.attribute if a.name == "to")
            source, result = node.input[0], node.output[0]
            replacement = None
            if types.get(source) == to:
                replacement = source
            else:
                parent = producers.get(source)
                if parent is not None and parent.op_type == "Cast":
                    origin = parent.input[0]
                    mid = types.get(source)
                    if types.get(origin) == to and to in LOW_PRECISION and mid in (TensorProto.FLOAT, TensorProto.DOUBLE):
                        replacement = origin
                if replacement is None and (source, to) in seen:
                    replacement = seen[(source, to)]
                seen.setdefault((source, to), result)
            if replacement is not None:
                replace_uses(graph, result, replacement)
                remove.append(node)
                changed = True
        for node in remove:
            graph.node.remove(node)
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.op_type == "Cast" and node.output[0] not in used]
        for node in dead:
            graph.node.remove(node)
            changed = True
    return model


def _convert_attribute_tensor(node: onnx.NodeProto, clipped: list[int]) -> None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            array, count = _to_fp16_array(numpy_helper.to_array(attr.t))
            clipped[0] += count
            attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
        elif attr.name == "value_float" and node.op_type == "Constant":
            value = np.array(attr.f, dtype=np.float32)
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_to_fp16_array(value)[0])))
            return
        elif attr.name == "value_floats" and node.op_type == "Constant":
            value = np.array(list(attr.floats), dtype=np.float32)
            node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_to_fp16_array(value)[0])))
            return


def convert_to_fp16(model: onnx.ModelProto, fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
                    keep_io_types: bool = True, copy: bool = True) -> onnx.ModelProto:
    """Convert an fp32 graph to fp16 with ``fp32_ops`` kept in fp32 (see the module docstring).

    Float initializers and constants become fp16 (values beyond the fp16 range are clipped to
    +-65504 and counted in ``metadata_props["vitdeploy.fp16.clipped_values"]`` when any were),
    except initializers only ``fp32_ops`` nodes use, which stay fp32. With ``keep_io_types``
    float graph inputs and outputs stay fp32 behind Casts; otherwise they become fp16.
    ``copy=False`` converts ``model`` in place (saves memory on multi-GB graphs).
    """
    fp32_ops = tuple(fp32_ops)
    ops = _check_ops(fp32_ops) | SPEC_FP32_OPS
    if copy:
        model = copy_module.deepcopy(model)
    graph = model.graph
    _reject_control_flow(graph)
    uses = GraphIndex(graph).consumers
    fixed_fp32 = {
        node.input[i] for node in graph.node for i in FP32_SLOTS.get(node.op_type, ()) if i < len(node.input)
    }
    graph_outputs = {o.name for o in graph.output}

    def stays_fp32(name: str) -> bool:
        users = uses.get(name, [])
        return name in fixed_fp32 or (bool(users) and name not in graph_outputs
                                      and all(user.op_type in ops for user in users))

    clipped = [0]
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and not stays_fp32(init.name):
            array, count = _to_fp16_array(numpy_helper.to_array(init))
            clipped[0] += count
            init.CopyFrom(numpy_helper.from_array(array, init.name))
    for node in graph.node:
        if node.op_type in ops or any(out in fixed_fp32 for out in node.output):
            continue
        if node.op_type in ("Constant", "ConstantOfShape"):
            _convert_attribute_tensor(node, clipped)
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16

    names = Names(graph)
    head = _half_boundary(graph, names, graph.input, keep_io_types, inputs=True)
    tail = _half_boundary(graph, names, graph.output, keep_io_types, inputs=False)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_intermediate_value_info(graph)
    keep_ops_in_fp32(model, ops)
    if clipped[0]:
        set_metadata(model, {"vitdeploy.fp16.clipped_values": str(clipped[0])})
    _update_artifact_metadata(model, sorted(set(fp32_ops)), keep_io_types)
    return model


def _half_boundary(graph: onnx.GraphProto, names: Names, values: Iterable[onnx.ValueInfoProto], keep_io_types: bool,
                   inputs: bool) -> list[onnx.NodeProto]:
    """Make the graph's float ``values`` (its inputs, or its outputs) fp16: retyped in place, or, with
    ``keep_io_types``, kept fp32 behind a Cast; returns those Casts (to put first, or last)."""
    casts: list[onnx.NodeProto] = []
    for value in values:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if not keep_io_types:
            tensor_type.elem_type = TensorProto.FLOAT16
            continue
        half = names.new(f"{value.name}_fp16")
        if not inputs:  # the producer now writes the fp16 tensor; the Cast writes the output's name
            for node in graph.node:
                for index, name in enumerate(node.output):
                    if name == value.name:
                        node.output[index] = half
        replace_uses(graph, value.name, half)
        source, target, to = (value.name, half, "fp16") if inputs else (half, value.name, "fp32")
        casts.append(helper.make_node("Cast", [source], [target], name=names.new(f"{value.name}_to_{to}"),
                                      to=TensorProto.FLOAT16 if inputs else TensorProto.FLOAT))
    return casts


def _update_artifact_metadata(model: onnx.ModelProto, fp32_ops: list[str], keep_io_types: bool) -> None:
    """Make vitdeploy metadata, if the graph has it, describe the converted graph."""
    from vitdeploy.metadata import ArtifactMetadata

    props = {p.key: p.value for p in model.metadata_props}
    try:
        metadata = ArtifactMetadata.from_props(props)
    except ValueError:
        return  # not a vitdeploy artifact
    metadata.precision = "fp16"
    metadata.fp32_ops = fp32_ops
    if not keep_io_types:
        for info in [*metadata.inputs, *metadata.outputs]:
            if info.dtype == "float32":
                info.dtype = "float16"
    metadata.validation = {"passed": None, "notes": [
        "converted from a validated fp32 graph by convert_to_fp16; this fp16 graph itself was not validated"]}
    set_metadata(model, metadata.to_props())
