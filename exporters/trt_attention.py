"""fp16 softmax for TensorRT's fused attention: the graph rewrite behind ``vitdeploy build --softmax fp16``.

vitdeploy's fp16 graphs keep softmax in fp32 (``fp32_ops``): attention exports as
``Mul(q, scale) → MatMul → Cast(fp32) → Softmax → Cast(fp16) → MatMul``. NVIDIA documents
attention fusion for "IMatrixMultiplyLayer → ISoftMaxLayer → IMatrixMultiplyLayer" graphs whose
batch-matmul inputs are fp16/bf16/int8/fp8 (TensorRT "Fused Attention" guide, method 2), and says
nothing of a Cast-wrapped fp32 softmax between them; third-party reports say removing such fp32
islands took TensorRT 10.15 from 0 to 96 fused MHA kernels. The fused kernels accumulate the
softmax in fp32 internally, so leaving softmax to them costs little precision — and that is
checked, not assumed: :func:`check_rewrite` compares the rewritten graph with the graph it came
from on onnxruntime (CPU) over the bundled photos before anything is built from it.

Whether TensorRT then fuses is read from the engine (``vitdeploy inspect model.engine``), never
assumed: nothing here has run against a real TensorRT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from vitdeploy.exporters.graph import GraphIndex, attr, set_metadata
from vitdeploy.metadata import ArtifactMetadata

TRANSFORM = "softmax_fp16"


def _cast_to(node: onnx.NodeProto | None, element: int) -> bool:
    return node is not None and node.op_type == "Cast" and attr(node, "to") == element


def softmax_islands(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """``(Cast to fp32, Softmax, Cast to fp16)`` triples: softmax computed in fp32 between fp16 tensors."""
    index = GraphIndex(model.graph)
    islands = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        cast_in = index.producers.get(node.input[0])
        cast_out = index.only_consumer(node.output[0])
        if _cast_to(cast_in, TensorProto.FLOAT) and _cast_to(cast_out, TensorProto.FLOAT16) \
                and index.only_consumer(cast_in.output[0]) is node:
            islands.append((cast_in, node, cast_out))
    return islands


def softmax_in_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every fp32 softmax island computed in fp16; returns ``(model, count)``.

    ``X(fp16) → Cast(fp32) → Softmax → Cast(fp16) → Z`` becomes ``X → Softmax → Z``. The artifact
    metadata (if any) drops Softmax from ``fp32_ops``, records the transform and marks the graph
    as not yet validated.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    islands = softmax_islands(model)
    removed = set()
    for cast_in, softmax, cast_out in islands:
        softmax.input[0] = cast_in.input[0]
        softmax.output[0] = cast_out.output[0]
        removed.update({id(cast_in), id(cast_out)})
    kept = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]  # stale fp32 types of the removed tensors; shape inference re-derives them
    props = {p.key: p.value for p in model.metadata_props}
    try:
        metadata = ArtifactMetadata.from_props(props)
    except ValueError:
        return model, len(islands)
    metadata.fp32_ops = [op for op in metadata.fp32_ops if op != "Softmax"]
    metadata.transforms = [*metadata.transforms, {"name": TRANSFORM, "islands_removed": len(islands)}]
    metadata.validation = {"passed": None, "notes": [f"{TRANSFORM}: softmax computed in fp16 for TensorRT's fused "
                                                     "attention; checked against the graph it came from at build"]}
    set_metadata(model, metadata.to_props())
    return model, len(islands)


@dataclass
class RewriteCheck:
    """The parity of a rewritten graph against the graph it came from."""

    passed: bool
    reference: str
    tolerance: dict[str, Any]
    worst: dict[str, float]
    shapes: list[tuple[int, int, int]]
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reference": self.reference, "tolerance": self.tolerance,
                "worst": self.worst, "shapes": [list(s) for s in self.shapes], "failures": self.failures}


def check_rewrite(original: Path, rewritten: Path, shapes: list[tuple[int, int, int]],
                  reference_precision: str) -> RewriteCheck:
    """Run both graphs on onnxruntime CPU over the bundled photos at ``shapes`` (batch, height, width).

    The rewritten fp16 graph is judged with the project's fp16 tolerance against an fp16
    ``original`` (same precision, one policy difference) or with the fp16-vs-fp32 tolerance against
    an fp32 one. Needs onnxruntime; no torch.
    """
    from vitdeploy.parity import InputFactory, Reference, tolerance_for, verify
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    tolerance = tolerance_for("fp16", against_fp32=reference_precision == "fp32")
    reference = OrtRuntime(original, provider="cpu", variant="portable")
    candidate = OrtRuntime(rewritten, provider="cpu", variant="portable")
    try:
        inputs = InputFactory(candidate.metadata.preprocessing)
        report = verify(candidate, Reference(f"{original.name} on onnxruntime CPU", reference, tolerance),
                        shapes, inputs, candidate_name=rewritten.name)
    finally:
        candidate.close()
        reference.close()
    worst = report.worst()
    return RewriteCheck(report.passed, f"{original.name} ({reference_precision}, onnxruntime CPU)",
                        tolerance.to_dict(), {k: float(v) for k, v in worst.items()}, list(shapes), report.failures)
