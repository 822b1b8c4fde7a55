"""fp16 graphs: dtypes a strongly typed TensorRT network builds from, onnxruntime parity, graph passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_model, tiny_config
from onnx import TensorProto, helper, numpy_helper

from vitdeploy.exporters.fp16 import convert_to_fp16, keep_ops_in_fp32, remove_redundant_casts
from vitdeploy.exporters.graph import tensor_types
from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
from vitdeploy.exporters.validation import ort_cpu_fp32_fallbacks
from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.model import Attention, LayerNorm, prepare_model
from vitdeploy.parity import TOLERANCES, InputFactory, compare_logits

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

CFG = tiny_config()
SHAPES = [(1, 3, 32, 32), (4, 3, 24, 48), (2, 3, 64, 56)]  # native, non-square, larger than native


def session(path_or_proto) -> ort.InferenceSession:
    source = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_eager(model, pixels: np.ndarray) -> np.ndarray:
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(torch.from_numpy(pixels).to(dtype)).float().numpy()


def photos(batch: int, height: int, width: int) -> np.ndarray:
    """Real photographs (the bundled ones) at the given size, normalised as the model expects."""
    pre = CFG.preprocessing.at(CFG.image_size)
    return InputFactory(pre, synthetic=False).batch(batch, height, width)[0]


@pytest.fixture(scope="module")
def model():
    return make_model(CFG)


@pytest.fixture(scope="module")
def fp16_export(model, tmp_path_factory):
    options = ExportOptions(precision="fp16", batch=(1, 4), height=(16, 64), width=(16, 64))
    return export_onnx(model, tmp_path_factory.mktemp("fp16") / "model_fp16.onnx", options)


@pytest.fixture(scope="module")
def fp32_graph(model, tmp_path_factory):
    options = ExportOptions(batch=(1, 4), height=(16, 64), width=(16, 64), validate=False, preflight=False)
    result = export_onnx(model, tmp_path_factory.mktemp("fp32") / "model.onnx", options)
    return onnx.load(str(result.path))


def fp32_resampling_matmuls(proto: onnx.ModelProto) -> list[str]:
    """The MatMuls fed by vitdeploy.pos_embed's interpolation matrices (built from a Range) before the
    Cast to fp16: an fp16 model resamples its position embeddings in fp32, as timm does."""
    fed: set[str] = set()
    found = []
    for node in proto.graph.node:  # topological order
        if node.op_type != "Range" and not any(name in fed for name in node.input):
            continue
        if node.op_type == "Cast" and node.attribute[0].i == TensorProto.FLOAT16:
            continue
        fed.update(node.output)
        if node.op_type == "MatMul":
            found.append(node.output[0])
    return found


def precision_summary(model: onnx.ModelProto) -> dict:
    """Element types in a graph: IO, the compute type of each op type, and weight types.

    ``compute`` maps op type → sorted type names of the nodes' first inputs; ``weights`` maps op
    type → type names of the initializers they read.
    """
    types = tensor_types(model)
    initializers = {init.name for init in model.graph.initializer}
    name = {value: key.lower() for key, value in TensorProto.DataType.items()}
    compute: dict[str, set[str]] = {}
    weights: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.input and node.input[0] in types:
            compute.setdefault(node.op_type, set()).add(name[types[node.input[0]]])
        for item in node.input[1:]:
            if item in initializers:
                weights.setdefault(node.op_type, set()).add(name[types[item]])
    return {
        "inputs": {v.name: name[v.type.tensor_type.elem_type] for v in model.graph.input},
        "outputs": {v.name: name[v.type.tensor_type.elem_type] for v in model.graph.output},
        "compute": {op: sorted(kinds) for op, kinds in sorted(compute.items())},
        "weights": {op: sorted(kinds) for op, kinds in sorted(weights.items())},
    }


def assert_strongly_typed_fp16(summary: dict, io: str = "float", fp32_resampling: bool = False) -> None:
    """fp16 weights and matmuls (but the position-embedding resampling's, with ``fp32_resampling``),
    LayerNorm and Softmax computing in fp32."""
    for op in ("MatMul", "Gemm", "Conv"):
        expected = ["float", "float16"] if op == "MatMul" and fp32_resampling else ["float16"]
        assert summary["weights"][op] == expected, op
        assert summary["compute"][op] == expected, op
    assert summary["compute"]["LayerNormalization"] == ["float"]
    assert summary["weights"]["LayerNormalization"] == ["float"]
    assert summary["compute"]["Softmax"] == ["float"]
    assert set(summary["inputs"].values()) == {io} and set(summary["outputs"].values()) == {io}


def test_exported_fp16_graph_dtypes(fp16_export):
    proto = onnx.load(str(fp16_export.path))
    assert len(fp32_resampling_matmuls(proto)) == 2  # W_h · P, then W_w · (W_h · P)
    assert_strongly_typed_fp16(precision_summary(proto), fp32_resampling=True)
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert metadata.precision == "fp16" and metadata.fp32_ops == ["LayerNormalization", "Softmax"]
    # the softmax is fed by a Cast to fp32 (torch.onnx alone would run it in fp16, then cast)
    producer = {out: n for n in proto.graph.node for out in n.output}
    for softmax in (n for n in proto.graph.node if n.op_type == "Softmax"):
        cast = producer[softmax.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_fp16_graph_parity_with_eager_on_photographs(fp16_export, model):
    """onnxruntime CPU runs the fp16 graph; it matches eager fp16 under the same policy, and fp32 closely."""
    half = prepare_model(model, "fp16", ("LayerNormalization", "Softmax"), fused_attention=False)
    sess = session(fp16_export.path)
    for batch, _, height, width in SHAPES:
        pixels = photos(batch, height, width)
        (logits,) = sess.run(None, {"pixel_values": pixels})
        assert logits.dtype == np.float32
        like_for_like = compare_logits(run_eager(half, pixels), logits)
        against_fp32 = compare_logits(run_eager(model, pixels), logits)
        assert TOLERANCES["fp16"].check(like_for_like) == [], like_for_like
        assert against_fp32.cosine >= 0.999 and TOLERANCES["fp16_vs_fp32"].check(against_fp32) == []
    assert fp16_export.report.passed
    assert {c.reference for c in fp16_export.report.cases} == {
        "eager fp16 (fp32 ops: LayerNormalization,Softmax)", "eager fp32"}


def test_onnxruntime_cpu_fp32_fallbacks_are_reported(fp16_export):
    fallbacks = ort_cpu_fp32_fallbacks(fp16_export.path)
    assert fallbacks is not None
    notes = " ".join(fp16_export.report.notes)
    for op in fallbacks:
        assert op in notes


def test_fp16_io(model, tmp_path):
    options = ExportOptions(precision="fp16", fp16_io=True, batch=(1, 2), height=(32, 48), width=(32, 48))
    result = export_onnx(model, tmp_path / "io16.onnx", options, )
    proto = onnx.load(str(result.path))
    assert len(fp32_resampling_matmuls(proto)) == 2
    assert_strongly_typed_fp16(precision_summary(proto), io="float16", fp32_resampling=True)
    assert result.metadata.inputs[0].dtype == "float16" and result.metadata.outputs[0].dtype == "float16"
    pixels = photos(2, 48, 32)
    (logits,) = session(result.path).run(None, {"pixel_values": pixels.astype(np.float16)})
    assert logits.dtype == np.float16
    assert compare_logits(run_eager(model, pixels), logits).cosine >= 0.999


def test_convert_to_fp16_of_an_fp32_graph(fp32_graph, model):
    converted = convert_to_fp16(fp32_graph)
    assert fp32_graph.graph.initializer[0].data_type == TensorProto.FLOAT  # the input proto is untouched
    assert_strongly_typed_fp16(precision_summary(converted))
    onnx.checker.check_model(converted)
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in converted.metadata_props})
    assert metadata.precision == "fp16" and metadata.fp32_ops == ["LayerNormalization", "Softmax"]
    assert metadata.inputs[0].dtype == "float32" and metadata.validation["passed"] is None
    # value_info is re-inferred from the symbolic inputs: no dim became fixed that the exporter left dynamic
    original = {v.name: v.type.tensor_type.shape.dim for v in fp32_graph.graph.value_info}
    compared = 0
    for value in converted.graph.value_info:
        if value.name in original:
            compared += 1
            for new, old in zip(value.type.tensor_type.shape.dim, original[value.name], strict=True):
                assert new.HasField("dim_param") or not old.HasField("dim_param"), value.name
    assert compared > 20
    assert any(d.dim_param == "batch" for v in converted.graph.value_info for d in v.type.tensor_type.shape.dim)
    sess = session(converted)
    for batch, _, height, width in SHAPES:
        pixels = photos(batch, height, width)
        (logits,) = sess.run(None, {"pixel_values": pixels})
        assert compare_logits(run_eager(model, pixels), logits).cosine >= 0.999


def test_convert_to_fp16_without_io_casts(fp32_graph, model):
    converted = convert_to_fp16(fp32_graph, fp32_ops=("LayerNormalization",), keep_io_types=False)
    summary = precision_summary(converted)
    assert summary["inputs"] == {"pixel_values": "float16"} and summary["outputs"] == {"logits": "float16"}
    assert summary["compute"]["Softmax"] == ["float16"] and summary["compute"]["LayerNormalization"] == ["float"]
    metadata = ArtifactMetadata.from_props({p.key: p.value for p in converted.metadata_props})
    assert metadata.inputs[0].dtype == "float16" and metadata.outputs[0].dtype == "float16"
    assert metadata.fp32_ops == ["LayerNormalization"]
    pixels = photos(2, 32, 40)
    (logits,) = session(converted).run(None, {"pixel_values": pixels.astype(np.float16)})
    assert compare_logits(run_eager(model, pixels), logits).cosine >= 0.999


def _softmax_graph() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])
    node = helper.make_node("Softmax", ["x"], ["y"], axis=-1)
    graph = helper.make_graph([node], "softmax", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_keep_ops_in_fp32_wraps_the_op_in_casts():
    fixed = keep_ops_in_fp32(_softmax_graph(), ["Softmax"], copy=True)
    assert [n.op_type for n in fixed.graph.node] == ["Cast", "Softmax", "Cast"]
    assert precision_summary(fixed)["compute"]["Softmax"] == ["float"]
    x = (np.random.default_rng(0).normal(size=(3, 8)) * 8).astype(np.float16)
    (y,) = session(fixed).run(None, {"x": x})
    wide = x.astype(np.float32)
    expected = np.exp(wide - wide.max(-1, keepdims=True))
    expected = (expected / expected.sum(-1, keepdims=True)).astype(np.float16)
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), atol=1e-3)


def test_remove_redundant_casts_keeps_lossy_round_trips():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4])
    f = helper.make_tensor_value_info("f", TensorProto.FLOAT, [4])
    out_a = helper.make_tensor_value_info("a", TensorProto.FLOAT16, [4])
    out_b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),   # fp16 -> fp32 -> fp16: identity
        helper.make_node("Cast", ["x32"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Relu", ["x16"], ["a"]),
        helper.make_node("Cast", ["f"], ["f16"], to=TensorProto.FLOAT16),  # fp32 -> fp16 -> fp32: rounds
        helper.make_node("Cast", ["f16"], ["f32"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["f32"], ["b"]),
    ]
    graph = helper.make_graph(nodes, "casts", [x, f], [out_a, out_b])
    model = remove_redundant_casts(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    ops = [(n.op_type, list(n.input)) for n in model.graph.node]
    assert ("Relu", ["x"]) in ops
    assert [op for op, _ in ops].count("Cast") == 2
    feed = {"x": np.array([1, 2, 3, 4], np.float16), "f": np.array([1.0001, 2, 3, 4], np.float32)}
    a, b = session(model).run(None, feed)
    np.testing.assert_array_equal(a, feed["x"])
    assert b[0] == np.float32(np.float16(1.0001))


def test_convert_clips_values_beyond_the_fp16_range():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    weight = numpy_helper.from_array(np.array([1e6, -2.0], np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "mul", [x], [y], [weight])
    model = convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert {p.key: p.value for p in model.metadata_props}["vitdeploy.fp16.clipped_values"] == "1"
    (out,) = session(model).run(None, {"x": np.array([1.0, 1.0], np.float32)})
    np.testing.assert_array_equal(out, [65504.0, -2.0])


def test_convert_rejects_control_flow():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "b", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "if", [cond, x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="If"):
        convert_to_fp16(helper.make_model(graph))


def test_prepare_model_applies_the_policy_to_a_copy(model):
    half = prepare_model(model, "fp16", ["LayerNormalization", "Softmax"])
    assert next(model.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.float16
    norms = [m for m in half.modules() if isinstance(m, LayerNorm)]
    attentions = [m for m in half.modules() if isinstance(m, Attention)]
    assert norms and all(m.compute_dtype == torch.float32 for m in norms)
    assert attentions and all(not m.fused and m.softmax_dtype == torch.float32 for m in attentions)
    assert all(m.fused for m in model.modules() if isinstance(m, Attention))
    with pytest.raises(ValueError, match="'fp8'"):
        prepare_model(model, "fp8")
    assert prepare_model(model, "fp32") is model  # nothing to change: no copy
    plain = prepare_model(model, "fp16", ())  # a plain cast keeps SDPA
    assert all(m.fused and m.softmax_dtype is None for m in plain.modules() if isinstance(m, Attention))
