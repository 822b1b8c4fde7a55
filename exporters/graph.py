"""The graph toolkit every ONNX → ONNX transform shares (fp16, CPU fusion, quantization, pre-flight).

:class:`GraphIndex` answers the questions pattern matching asks (who produces a tensor, who
consumes it, is it a constant and what is its value); :class:`Names` hands out fresh names;
:func:`infer_types` runs ONNX shape inference on a weight-less skeleton so it works on multi-GB
graphs; :func:`topological` re-orders nodes after a rewrite. Needs the ``onnx`` package only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.metadata import check_onnx_path

DEFAULT_DOMAINS = ("", "ai.onnx")


def load_onnx(path: str | os.PathLike[str], load_external_data: bool = False) -> onnx.ModelProto:
    """Read an ONNX file, refusing with ``ValueError`` what is not one before anything judges it.

    A folder, a missing, empty or truncated file, bytes that are not an ONNX protobuf, and a
    model without a graph are refused, each naming the path and what is wrong.
    """
    path = Path(path)
    check_onnx_path(path)
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except DecodeError as error:
        raise ValueError(f"{path} is not an ONNX file (truncated or not a protobuf: {error})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ValueError(f"{path} is not an ONNX model: it holds no graph nodes")
    return model


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node`` (decoded by ``onnx.helper``), else ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Every attribute of ``node`` as ``{name: value}``, byte strings decoded to ``str``."""
    values = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        values[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return values


class GraphIndex:
    """Producers, consumers and constant values of an ``onnx.GraphProto``, for pattern matching.

    Built once over the graph as it is; a rewrite that changes the graph builds a new index.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                self.producers[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a ``Constant`` node's output (``None`` for an
        initializer whose external data was not loaded)."""
        if name in self.initializers:
            init = self.initializers[name]
            return None if init.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(init)
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def scalar(self, name: str) -> float | None:
        """``name``'s value if it is a one-element constant."""
        value = self.const(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None

    def produced_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        """The standard-domain ``op_type`` node producing ``name``, if that is what produces it."""
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in DEFAULT_DOMAINS else None

    def uses(self, name: str) -> int:
        """How many node inputs (and graph outputs) read ``name``."""
        return len(self.consumers.get(name, [])) + (name in self.outputs)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading ``name``, if exactly one does and it is not a graph output."""
        consumers = self.consumers.get(name, [])
        return consumers[0] if len(consumers) == 1 and name not in self.outputs else None


class Names:
    """Fresh tensor and node names that do not collide with the graph's."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {name for node in graph.node for name in [*node.input, *node.output, node.name]}
        self.used.update(init.name for init in graph.initializer)
        self.used.update(value.name for value in [*graph.input, *graph.output])

    def new(self, base: str) -> str:
        name, index = base, 0
        while name in self.used:
            index += 1
            name = f"{base}_{index}"
        self.used.add(name)
        return name


def replace_uses(graph: onnx.GraphProto, old: str, new: str, skip: onnx.NodeProto | None = None) -> None:
    """Make every node input reading ``old`` read ``new`` instead (except ``skip``'s)."""
    for node in graph.node:
        if node is skip:
            continue
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def topological(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where every input is produced first (stable); raises if impossible."""
    ready = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    order: list[onnx.NodeProto] = []
    waiting = list(nodes)
    while waiting:
        blocked = []
        for node in waiting:
            if all(name in ready for name in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                blocked.append(node)
        if len(blocked) == len(waiting):
            raise ValueError(f"graph rewrite left node {blocked[0].name!r} without its inputs {list(blocked[0].input)}")
        waiting = blocked
    return order


def _stub(init: TensorProto) -> TensorProto:
    stub = TensorProto(name=init.name, data_type=init.data_type)
    stub.dims.extend(init.dims)
    return stub


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the data of large initializers (enough for type and shape inference, < 2 GB)."""
    copy = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(copy, field, getattr(model, field))
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    graph = copy.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        if count <= 4096 or init.data_location == TensorProto.EXTERNAL:
            graph.initializer.append(init)
        else:
            graph.initializer.append(_stub(init))
    return copy


def infer_types(model: onnx.ModelProto) -> tuple[dict[str, int], onnx.ModelProto]:
    """Element type of every tensor in the graph, and the inferred skeleton (its ``value_info``)."""
    inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False)
    graph = inferred.graph
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:  # a Cast's output type is known even where inference gave up
        if node.op_type == "Cast" and node.output and node.output[0] not in types:
            to = attr(node, "to")
            if to is not None:
                types[node.output[0]] = int(to)
    return types, inferred


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every named tensor, via ONNX shape inference."""
    return infer_types(model)[0]


def initializer_bytes(tensor: TensorProto) -> int:
    """Bytes of an initializer's data held in the file (0 for external data)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    return count * itemsize


def graph_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializer data held in the file."""
    return sum(initializer_bytes(init) for init in model.graph.initializer)


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 if none is declared)."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Replace the entries of ``metadata_props`` whose keys are in ``props`` (others are kept)."""
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
