"""Validation of an exported ONNX file: onnxruntime CPU against the eager model.

Runs the file with :class:`~vitdeploy.runtimes.onnxruntime.OrtRuntime` (the runtime users run,
on its CPU provider, the file exactly as written) and the eager PyTorch model on the same real
and synthetic batches at the minimum, a middle (non-square) and the maximum of the declared
shape range (:func:`vitdeploy.parity.validation_shapes`), against the references
:func:`~vitdeploy.runtimes.torch.eager_references` makes for the graph's precision, for every
output the graph has (cosine and max-abs error for each; top-k agreement for ``logits`` only):

* fp32 graphs against the eager fp32 model (tolerance ``fp32``);
* fp16 graphs against the eager model cast to fp16 under the same precision policy (``fp16``,
  like for like) and against the eager fp32 model (``fp16_vs_fp32``);
* quantized (int8, fp8 Q/DQ) graphs against the eager fp32 model with their own gates
  (``int8_vs_fp32``, ``fp8_vs_fp32``); fp8 runs as onnxruntime's emulation on CPU.

onnxruntime's CPU provider has fp16 kernels for only some ops; for the others it inserts Casts
and computes in fp32 on the fp16-rounded inputs. :func:`ort_cpu_fp32_fallbacks` lists those
ops so the report can say how close the CPU run is to a true fp16 engine.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.parity import (
    CaseResult,
    InputFactory,
    ParityReport,
    Reference,
    Tolerance,
    validation_shapes,
    verify,
)

# onnxruntime's CPU emulation of an fp8 Q/DQ graph against the ONNX reference implementation of the same
# graph (onnx.reference: QuantizeLinear to float8e4m3fn rounds to nearest even and saturates, as the spec
# says). The rounding is the same, the summation order is not, so a value near a rounding boundary may land
# one fp8 step apart and the difference carries through the blocks: measured on four trained DINOv2-S blocks
# at 56x56, worst token 0.9986 and rows 0.99997, ten times closer than fp8 is to fp32 there (worst token
# 0.9886). The gate asks for that order: the figures onnxruntime reports are the graph's. One e4m3 step is
# 1/8 of its binade, so a single flipped rounding of the largest value moves the max-abs error that much.
FP8_REFERENCE = Tolerance("fp8_onnx_reference", max_rel_error=0.15, min_cosine=0.999, min_token_cosine=0.99,
                          min_token_cosine_p1=0.995, token_floor=0.999, max_share_below=None)


class OnnxReferenceRun:
    """A graph evaluated by ``onnx.reference.ReferenceEvaluator`` (numpy, every op as the ONNX spec defines
    it; slow, and exact about fp8 rounding): the CPU's independent check of fp8 numerics."""

    def __init__(self, path: str | Path) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(path))
        self.output_names = [value.name for value in model.graph.output]
        self.input_name = model.graph.input[0].name
        self._evaluator = ReferenceEvaluator(model)

    def run_outputs(self, pixel_values: Any) -> dict[str, Any]:
        outputs = self._evaluator.run(None, {self.input_name: pixel_values})
        return dict(zip(self.output_names, outputs, strict=True))


def fp8_reference_check(path: str | Path, metadata: ArtifactMetadata, images: Sequence[Any] | None = None
                        ) -> ParityReport:
    """onnxruntime's run of the fp8 graph at ``path`` against ``onnx.reference``'s on one photo at the smallest
    validated size, judged by :data:`FP8_REFERENCE` per output kind: what the fp8 figures onnxruntime reports
    on the CPU are the graph's numerics, not an artefact of its emulation."""
    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    shapes, _ = validation_shapes(metadata.shape_range, metadata.stride, 1)
    _, height, width = shapes[0]
    candidate = OrtRuntime(path, variant="portable")
    try:
        return verify(candidate, Reference("onnx.reference evaluator (same graph)", OnnxReferenceRun(path),
                                           FP8_REFERENCE), [(1, height, width)],
                      InputFactory(metadata.preprocessing, images=images, synthetic=False),
                      candidate_name=f"{Path(path).name} (onnxruntime CPU fp8 emulation)")
    finally:
        candidate.close()


def ort_cpu_fp32_fallbacks(path: str | Path) -> dict[str, int] | None:
    """Op types (with node counts) that onnxruntime's CPU provider runs in fp32 in an fp16 graph.

    onnxruntime inserts ``InsertedPrecisionFreeCast_*`` Cast nodes to fp32 in front of nodes it
    has no fp16 kernel for; this reads them from the session's optimised graph. Best effort:
    returns ``None`` when the graph cannot be written or read back.
    """
    import onnx
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory(prefix="vitdeploy-ortcheck-") as folder:
            optimized = Path(folder) / "optimized.onnx"
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.optimized_model_filepath = str(optimized)
            ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            graph = onnx.load(str(optimized), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - purely informational
        return None
    producers = {name: node for node in graph.node for name in node.output}

    def upcast(node: Any) -> bool:
        return (node is not None and node.name.startswith("InsertedPrecisionFreeCast")
                and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute))

    counts: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        if node.op_type != "Cast" and any(upcast(producers.get(name)) for name in node.input):
            counts[node.op_type] += 1
    return dict(sorted(counts.items()))


class _MemoRun:
    """A reference runtime whose outputs are remembered per input batch (the portable graph and
    its CPU variant are validated on the same batches; the eager model runs once per batch)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.input_spec = getattr(runtime, "input_spec", None)
        self.output_name = getattr(runtime, "output_name", "logits")
        self.output_names = list(getattr(runtime, "output_names", [self.output_name]))
        self._memo: dict[tuple[Any, ...], dict[str, Any]] = {}

    def run_outputs(self, pixel_values: Any) -> dict[str, Any]:
        key = (pixel_values.shape, str(pixel_values.dtype), hashlib.blake2b(pixel_values.tobytes()).hexdigest())
        if key not in self._memo:
            outputs = getattr(self.runtime, "run_outputs", None)
            self._memo[key] = (outputs(pixel_values) if outputs is not None
                               else {self.output_name: self.runtime(pixel_values)})
        return self._memo[key]

    def __call__(self, pixel_values: Any) -> Any:
        return self.run_outputs(pixel_values)[self.output_name]


def shared_references(references: Sequence[Reference]) -> list[Reference]:
    """``references`` whose outputs are computed once per batch however many candidates they judge."""
    return [dataclasses.replace(ref, run=_MemoRun(ref.run)) for ref in references]


def validate_onnx(
    path: str | Path,
    model: Any,
    metadata: ArtifactMetadata,
    *,
    max_batch: int = 8,
    images: Sequence[Any] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
    references: Sequence[Any] | None = None,
) -> ParityReport:
    """Compare the ONNX file at ``path`` with the eager ``model`` over ``metadata.shape_range``.

    ``model`` is the eager model in any precision; the references are built from it (fp32, and
    for reduced-precision graphs that precision under ``metadata.fp32_ops``) unless
    ``references`` are given (to share them between a graph and its CPU variant). The file's
    own metadata must describe the graph's outputs; every one of them is compared (a reference
    that does not return one of them is an error).
    """
    from vitdeploy.runtimes.onnxruntime import OrtRuntime
    from vitdeploy.runtimes.torch import eager_references

    candidate = OrtRuntime(path, variant="portable")
    try:
        stored = [t.name for t in candidate.metadata.outputs]
        if stored != candidate.output_names:
            raise ValueError(f"{path}: metadata lists outputs {stored} but the graph has {candidate.output_names}")
        shapes, notes = validation_shapes(metadata.shape_range, metadata.stride, max_batch)
        inputs = InputFactory(metadata.preprocessing, images=images)
        if references is None:
            references = eager_references(model, metadata.precision, metadata.fp32_ops,
                                          shape_range=metadata.shape_range, outputs=metadata.output_names)
        for reference in references:
            returned = list(getattr(reference.run, "output_names", None) or [])
            missing = [name for name in candidate.output_names if returned and name not in returned]
            if missing:
                raise ValueError(f"reference {reference.name!r} does not return the graph's output(s) "
                                 f"{', '.join(missing)}; it returns {', '.join(returned)}")
        if metadata.precision == "fp16":
            fallbacks = ort_cpu_fp32_fallbacks(path)
            if fallbacks:
                listed = ", ".join(f"{op} ({count})" for op, count in fallbacks.items())
                notes.append(
                    "onnxruntime CPU has no fp16 kernel for some nodes and ran them in fp32 on fp16-rounded "
                    f"inputs: {listed}; a TensorRT fp16 engine computes these in fp16"
                )
        if metadata.precision == "fp8":
            notes.append("onnxruntime CPU has no fp8 arithmetic: it runs the fp8 Q/DQ graph as an emulation "
                         "(values rounded to float8e4m3fn, matmuls in fp32), the numerics a TensorRT fp8 engine "
                         "approximates with fp8 tensor-core matmuls")
        report = verify(candidate, references, shapes, inputs, candidate_name=f"{Path(path).name} (onnxruntime CPU)",
                        notes=notes, on_case=on_case)
        if metadata.precision == "fp8":
            # The emulation itself is checked against the ONNX reference implementation of the same graph.
            check = fp8_reference_check(path, metadata, images)
            for case in check.cases:
                if on_case is not None:
                    on_case(case)
            report.cases.extend(check.cases)
        return report
    finally:
        candidate.close()
