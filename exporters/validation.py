"""Validation of an exported ONNX file: onnxruntime CPU against the eager model.

Runs the file with onnxruntime's CPU provider and the eager PyTorch model on the same real and
synthetic batches at the minimum, a middle (non-square) and the maximum of the declared shape
range (:func:`vitdeploy.parity.validation_shapes`) and gates the results with
:data:`vitdeploy.parity.TOLERANCES`:

* fp32 graphs against the eager fp32 model (tolerance ``fp32``);
* fp16 graphs against the eager model cast to fp16 under the same precision policy (``fp16``,
  like for like) and against the eager fp32 model (``fp16_vs_fp32``).

onnxruntime's CPU provider has fp16 kernels for only some ops; for the others it inserts Casts
and computes in fp32 on the fp16-rounded inputs. :func:`ort_cpu_fp32_fallbacks` lists those
ops so the report can say how close the CPU run is to a true fp16 engine.
"""

from __future__ import annotations

import collections
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.parity import (
    TOLERANCES,
    CaseResult,
    InputFactory,
    ParityReport,
    Reference,
    validation_shapes,
    verify,
)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxCandidate:
    """An ONNX file run by onnxruntime's CPU provider, returning every output as float32."""

    def __init__(self, path: str | Path, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_dtype = _ORT_TYPES.get(graph_input.type, np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def metadata_props(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(pixel_values.astype(self.input_dtype, copy=False))}
        outputs = self.session.run(self.output_names, feed)
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.output_names, outputs, strict=True)}


def eager_runner(model: Any, features: bool = False) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A numpy-in, numpy-out callable around an eager ``VisionTransformer`` (any dtype)."""
    import torch

    dtype = next(model.parameters()).dtype

    def run(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(dtype)
            hidden = model.forward_features(inputs)
            outputs = {"logits": model.forward_head(hidden).float().numpy()}
            if features:
                outputs["last_hidden_state"] = hidden.float().numpy()
            return outputs

    return run


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


def validate_onnx(
    path: str | Path,
    model: Any,
    metadata: ArtifactMetadata,
    *,
    features: bool = False,
    max_batch: int = 8,
    images: Sequence[Any] | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
) -> ParityReport:
    """Compare the ONNX file at ``path`` with the eager ``model`` over ``metadata.shape_range``.

    ``model`` is the eager model in any precision; the references are built from copies of it
    (fp32, and for fp16 graphs fp16 under ``metadata.fp32_ops``). The file's own metadata must
    parse back to ``metadata``'s IO description.
    """
    from vitdeploy.exporters.fp16 import prepare_eager

    candidate = OnnxCandidate(path)
    stored = ArtifactMetadata.from_props(candidate.metadata_props)
    if [t.name for t in stored.outputs] != candidate.output_names:
        raise ValueError(
            f"{path}: metadata lists outputs {[t.name for t in stored.outputs]} but the graph has {candidate.output_names}"
        )
    shapes, notes = validation_shapes(metadata.shape_range, metadata.stride, max_batch)
    inputs = InputFactory(metadata.preprocessing, images=images)
    import torch

    param = next(model.parameters())
    reusable = param.dtype == torch.float32 and param.device.type == "cpu" and not model.training
    fp32_model = model if reusable else prepare_eager(model, "fp32", device="cpu")
    references = []
    if metadata.precision == "fp32":
        references.append(Reference("eager fp32", eager_runner(fp32_model, features), TOLERANCES["fp32"]))
    else:
        low = prepare_eager(model, metadata.precision, metadata.fp32_ops, device="cpu")
        policy = ",".join(metadata.fp32_ops) or "none"
        references.append(Reference(f"eager {metadata.precision} (fp32 ops: {policy})",
                                    eager_runner(low, features), TOLERANCES[metadata.precision]))
        references.append(Reference("eager fp32", eager_runner(fp32_model, features),
                                    TOLERANCES[f"{metadata.precision}_vs_fp32"]))
        fallbacks = ort_cpu_fp32_fallbacks(path)
        if fallbacks:
            listed = ", ".join(f"{op} ({count})" for op, count in fallbacks.items())
            notes.append(
                "onnxruntime CPU has no fp16 kernel for some nodes and ran them in fp32 on fp16-rounded "
                f"inputs: {listed}; a TensorRT fp16 engine computes these in fp16"
            )
    return verify(candidate, references, shapes, inputs, candidate_name=f"{Path(path).name} (onnxruntime CPU)",
                  notes=notes, on_case=on_case)
