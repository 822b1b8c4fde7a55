"""Real exported ONNX graphs for the TensorRT tests, and the edits that make them fail the pre-flight.

The tiny model is exported with ``vitdeploy.exporters.onnx_export.export_onnx`` (dynamic batch
and resolution, metadata included). The flagged variants are edits of that real graph: an
(antialiased) Resize, an op TensorRT's parser lacks, and an fp16 LayerNormalization.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vitdeploy.metadata import ArtifactMetadata, ShapeRange, TensorInfo

SHAPE_RANGE = ShapeRange(batch=(1, 8), height=(16, 64), width=(16, 64))


def tiny_metadata(config, precision: str = "fp32") -> ArtifactMetadata:
    """Metadata as ``vitdeploy export`` writes it, for the tiny test config (stride 8)."""
    return ArtifactMetadata(
        model_config=config.to_dict(),
        preprocessing=config.preprocessing.at(config.image_size),
        inputs=[TensorInfo("pixel_values", "float32", ["batch", config.in_channels, "height", "width"])],
        outputs=[TensorInfo("logits", "float32", ["batch", config.num_classes])],
        shape_range=SHAPE_RANGE,
        precision=precision,
        fp32_ops=["LayerNormalization", "Softmax"],
        opset=18,
        source="tests/trt_artifacts.py",
    )


@functools.cache
def tiny_onnx(precision: str = "fp32") -> Path:
    """Export the tiny ViT (32x32, patch 8) with ``vitdeploy.exporters.onnx_export`` once per session.

    Batch 1..8, height and width 16..64 (:data:`SHAPE_RANGE`); the exporter's own validation is
    skipped here (its tests cover it) to keep this suite fast.
    """
    from conftest import make_model, session_folder, tiny_config

    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    path = session_folder("trt") / f"tiny_{precision}.onnx"
    options = ExportOptions(batch=SHAPE_RANGE.batch, height=SHAPE_RANGE.height, width=SHAPE_RANGE.width,
                            precision=precision, validate=False, preflight=False)
    return export_onnx(make_model(tiny_config()), path, options).path


def load_tiny() -> onnx.ModelProto:
    return onnx.load(str(tiny_onnx()))


def with_resize(model: onnx.ModelProto, antialias: int = 0) -> onnx.ModelProto:
    """An extra output ``thumbnail``: the input image halved by a cubic ``Resize`` (``extra_resize``).

    The exported graph itself has no Resize (vitdeploy.pos_embed resamples with MatMuls); this is
    the node the Resize checks are tried on, as a user's graph might carry it.
    """
    model = copy.deepcopy(model)
    scales = numpy_helper.from_array(np.array([1.0, 1.0, 0.5, 0.5], np.float32), "extra_resize_scales")
    model.graph.initializer.append(scales)
    model.graph.node.append(helper.make_node(
        "Resize", ["pixel_values", "", "extra_resize_scales"], ["thumbnail"], name="extra_resize", mode="cubic",
        coordinate_transformation_mode="half_pixel", keep_aspect_ratio_policy="stretch", antialias=antialias))
    dims = ["batch", 3, "thumbnail_height", "thumbnail_width"]
    model.graph.output.append(helper.make_tensor_value_info("thumbnail", onnx.TensorProto.FLOAT, dims))
    return model


def with_antialias(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with an antialiased ``Resize`` (:func:`with_resize`, ``antialias=1``)."""
    return with_resize(model, antialias=1)


def with_unsupported_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """An extra output sampled with ``Bernoulli`` (no TensorRT importer) from the sigmoid of the logits."""
    model = copy.deepcopy(model)
    model.graph.node.extend([
        helper.make_node("Sigmoid", ["logits"], ["probabilities"], name="extra_sigmoid"),
        helper.make_node("Bernoulli", ["probabilities"], ["sample"], name="extra_bernoulli"),
    ])
    model.graph.output.append(helper.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, ["batch", 10]))
    return model


def with_fp16_layernorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first LayerNormalization computing in fp16: Cast in, fp16 scale/bias, Cast back out."""
    model = copy.deepcopy(model)
    graph = model.graph
    index, node = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "LayerNormalization")
    initializers = {t.name: t for t in graph.initializer}
    half_inputs = [node.input[0] + "_fp16"]
    for name in node.input[1:]:
        array = numpy_helper.to_array(initializers[name]).astype("float16")
        graph.initializer.remove(initializers[name])
        graph.initializer.append(numpy_helper.from_array(array, name + "_fp16"))
        half_inputs.append(name + "_fp16")
    output = node.output[0]
    cast_in = helper.make_node("Cast", [node.input[0]], [half_inputs[0]], to=onnx.TensorProto.FLOAT16, name="ln_cast_in")
    cast_out = helper.make_node("Cast", [output + "_fp16"], [output], to=onnx.TensorProto.FLOAT, name="ln_cast_out")
    del node.input[:]
    node.input.extend(half_inputs)
    node.output[0] = output + "_fp16"
    graph.node.insert(index, cast_in)
    graph.node.insert(index + 2, cast_out)
    return model


def with_qdq(model: onnx.ModelProto, precision: str = "int8", zero_point: int = 0,
             element: int | None = None) -> onnx.ModelProto:
    """The graph with its first MatMul's activation quantized (QuantizeLinear → DequantizeLinear), as a Q/DQ graph.

    ``precision`` "int8" (INT8 zero point) or "fp8" (FLOAT8E4M3FN zero point); ``element`` overrides
    the zero point's type (e.g. UINT8, which TensorRT does not take). The artifact metadata says
    ``precision`` like the quantizer's output would. Not a calibrated quantization: a graph to build.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    index, matmul = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "MatMul")
    kind = element if element is not None else {"int8": onnx.TensorProto.INT8,
                                                 "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision]
    scale = helper.make_tensor("qdq_scale", onnx.TensorProto.FLOAT, [], [0.05])
    zero = helper.make_tensor("qdq_zero", kind, [], [zero_point])
    graph.initializer.extend([scale, zero])
    source = matmul.input[0]
    quantize = helper.make_node("QuantizeLinear", [source, "qdq_scale", "qdq_zero"], ["qdq_q"], name="qdq_quantize")
    dequantize = helper.make_node("DequantizeLinear", ["qdq_q", "qdq_scale", "qdq_zero"], ["qdq_dq"],
                                  name="qdq_dequantize")
    matmul.input[0] = "qdq_dq"
    graph.node.insert(index, dequantize)
    graph.node.insert(index, quantize)
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ArtifactMetadata.from_props(props)
    metadata.precision = precision
    del model.metadata_props[:]
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    return model
