"""Helpers for the runtime tests: small real ONNX files with vitdeploy metadata.

The runtime tests need real graphs with metadata they control, not the exporter's whole
pipeline (which has its own tests): the exporter's trace of a tiny model plus an
:class:`ArtifactMetadata` written into ``metadata_props``, and hand-built graphs for the cases an
export never produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from vitdeploy.config import ViTConfig
from vitdeploy.metadata import ArtifactMetadata, ShapeRange, TensorInfo
from vitdeploy.model import VisionTransformer


def make_metadata(config: ViTConfig, shape_range: ShapeRange | None = None, input_dtype: str = "float32",
                  output_dtype: str = "float32", precision: str = "fp32",
                  labels: list[str] | None = None) -> ArtifactMetadata:
    """Metadata for ``config`` as the exporter would write it."""
    return ArtifactMetadata(
        model_config=config.to_dict(),
        preprocessing=config.preprocessing.at(config.image_size),
        inputs=[TensorInfo("pixel_values", input_dtype, ["batch", config.in_channels, "height", "width"])],
        outputs=[TensorInfo("logits", output_dtype, ["batch", config.num_classes])],
        shape_range=shape_range or ShapeRange(batch=(1, 8), height=(16, 64), width=(16, 64)),
        precision=precision,
        fp32_ops=["LayerNormalization", "Softmax"] if precision == "fp16" else [],
        source="tests",
        labels=labels,
    )


def attach_metadata(path: Path, metadata: ArtifactMetadata | None) -> None:
    """Rewrite ``path`` with ``metadata`` in its ``metadata_props`` (none when ``metadata`` is None)."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    if metadata is not None:
        for key, value in metadata.to_props().items():
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def export_onnx(model: VisionTransformer, path: Path, metadata: ArtifactMetadata | None) -> Path:
    """The exporter's traced graph of ``model`` (dynamic batch/height/width), saved with ``metadata``.

    Only the trace is the exporter's (``trace_to_onnx``, shared with the exporter tests through
    the session's trace cache); validation, variants and the exporter's own metadata are left out,
    so the runtime tests see exactly the metadata they set.
    """
    from vitdeploy.exporters import onnx_export

    proto = onnx_export.trace_to_onnx(model, onnx_export.ExportOptions())
    onnx_export.strip_exporter_metadata(proto)
    onnx_export.name_dynamic_dims(proto)
    onnx.save(proto, str(path))
    attach_metadata(path, metadata)
    return path


def fp16_io_graph(path: Path, config: ViTConfig, metadata: ArtifactMetadata, seed: int = 0) -> np.ndarray:
    """A hand-built graph with float16 input and output: global average pool → MatMul → logits.

    Returns the fp16 weight matrix so a test can compute the expected logits.
    """
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(config.in_channels, config.num_classes)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "fp16_io",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT16, ["batch", config.in_channels, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", config.num_classes])],
        [onnx.numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weight


def validated_tiny_export(folder: Path, batch: tuple[int, int] = (1, 8), validation_max_batch: int = 2) -> Path:
    """A real, validated ``vitdeploy export`` of the conftest tiny model (sizes 16..64) into ``folder``.

    Declared batch ``batch``, validated only up to ``validation_max_batch`` (the export caps it), so
    the validated and the declared range differ; the trace comes from the session's trace cache.
    """
    from conftest import make_model, tiny_config

    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    options = ExportOptions(batch=batch, height=(16, 64), width=(16, 64), validation_max_batch=validation_max_batch,
                            preflight=False, cpu_variant=False)
    return export_onnx(make_model(tiny_config()), Path(folder) / "validated.onnx", options).path
