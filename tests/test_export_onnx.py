"""ONNX export: dynamic shapes, graph structure, metadata, validation, atomic hand-over, external data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_model, tiny_config, tiny_hybrid_config

from vitdeploy.config import ViTConfig
from vitdeploy.exporters.onnx_export import (
    ExportOptions,
    ExportValidationError,
    check_graph,
    export_onnx,
)
from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.model import VisionTransformer
from vitdeploy.parity import compare_logits

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

CFG = tiny_config()  # 32x32 native, patch 8, hidden 64, depth 2, 4 heads, 10 classes


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def eager(model: VisionTransformer, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        hidden = model.forward_features(torch.from_numpy(pixels))
        return model.forward_head(hidden).numpy(), hidden.numpy()


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    return make_model(CFG)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """fp32, logits and last_hidden_state, height/width 16..64, batch 1..16 (validation caps the batch at 4)."""
    folder = tmp_path_factory.mktemp("fp32")
    stages: list[str] = []
    options = ExportOptions(batch=(1, 16), height=(16, 64), width=(16, 64), outputs=("logits", "last_hidden_state"),
                            validation_max_batch=4, source="tiny.safetensors", source_sha256="ab" * 32)
    result = export_onnx(model, folder / "model.onnx", options, progress=stages.append)
    return result, stages


def test_graph_io_names_dtypes_and_dynamic_dims(exported):
    result, _ = exported
    proto = onnx.load(str(result.path))
    (graph_input,) = proto.graph.input
    assert graph_input.name == "pixel_values"
    assert dims(graph_input) == ["batch", 3, "height", "width"]
    assert [o.name for o in proto.graph.output] == ["logits", "last_hidden_state"]
    assert dims(proto.graph.output[0]) == ["batch", CFG.num_classes]
    assert dims(proto.graph.output[1]) == ["batch", "sequence", CFG.hidden_size]
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert check_graph(proto, ["logits", "last_hidden_state"]) == []
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 16, 48), (5, 3, 64, 40), (2, 3, 56, 64), (16, 3, 24, 24)])
def test_one_graph_runs_every_batch_and_resolution(exported, model, shape):
    """No hard-coded batch or sequence length: non-square, above and below native, batches 1..16."""
    result, _ = exported
    pixels = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    logits, hidden = session(result.path).run(None, {"pixel_values": pixels})
    ref_logits, ref_hidden = eager(model, pixels)
    tokens = 1 + (shape[2] // CFG.patch_size) * (shape[3] // CFG.patch_size)
    assert logits.shape == (shape[0], CFG.num_classes)
    assert hidden.shape == (shape[0], tokens, CFG.hidden_size)
    assert compare_logits(ref_logits, logits).rel_max_error <= 1e-4
    assert compare_logits(ref_hidden, hidden, classification=False).rel_max_error <= 1e-4


def test_position_embeddings_are_resampled_in_graph_from_the_input_size(exported):
    """No Resize (TensorRT rejects the antialiased one timm's convention needs): the interpolation
    matrices of vitdeploy.pos_embed come from one Range per axis over the input's patch grid."""
    result = exported[0]
    proto = onnx.load(str(result.path))
    assert "Resize" not in {n.op_type for n in proto.graph.node}
    ranges = [n for n in proto.graph.node if n.op_type == "Range"]
    assert len(ranges) == 2
    constants = {init.name for init in proto.graph.initializer}
    constants |= {out for n in proto.graph.node if n.op_type == "Constant" for out in n.output}
    assert all(r.input[1] not in constants for r in ranges)  # the limit is computed from the shape
    assert result.metadata.model_config["pos_embed_resample"] == CFG.pos_embed_resample == "timm"


def test_layernorm_and_attention_export_in_tensorrt_friendly_form(exported):
    """LayerNormalization ops; attention as MatMul(Q*scale, K^T) -> Softmax -> MatMul(., V)."""
    proto = onnx.load(str(exported[0].path))
    nodes = list(proto.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers = {name: [n for n in nodes if name in n.input] for n in nodes for name in n.output}
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}
    ops = [n.op_type for n in nodes]
    assert ops.count("LayerNormalization") == 2 * CFG.depth + 1
    assert "ReduceMean" not in ops and "Pow" not in ops  # no decomposed LayerNorm
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    assert len(softmaxes) == CFG.depth
    scale = (CFG.hidden_size // CFG.num_heads) ** -0.5
    for softmax in softmaxes:
        scores = producer[softmax.input[0]]
        assert scores.op_type == "MatMul"
        scaled_q = producer[scores.input[0]]
        assert scaled_q.op_type == "Mul", "the scale must be applied to Q before the first MatMul"
        factor = [constants[i] for i in scaled_q.input if i in constants]
        assert factor and float(np.asarray(factor[0]).reshape(-1)[0]) == pytest.approx(scale, rel=1e-6)
        assert [c.op_type for c in consumers[softmax.output[0]]] == ["MatMul"]


def test_metadata_round_trips_through_metadata_props(exported, model):
    result, _ = exported
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    metadata = ArtifactMetadata.from_props(props)
    assert metadata.to_props() == result.metadata.to_props()
    assert ViTConfig.from_dict(metadata.model_config) == model.config
    assert metadata.preprocessing.crop_size == CFG.image_size and tuple(metadata.preprocessing.mean) == CFG.preprocessing.mean
    assert [t.name for t in metadata.inputs] == ["pixel_values"] and metadata.inputs[0].dtype == "float32"
    assert [t.name for t in metadata.outputs] == ["logits", "last_hidden_state"]
    assert metadata.shape_range.batch == (1, 16) and metadata.shape_range.height == (16, 64)
    assert metadata.precision == "fp32" and metadata.fp32_ops == [] and metadata.opset == 18
    assert metadata.source == "tiny.safetensors" and metadata.source_sha256 == "ab" * 32
    assert metadata.optimizations == []  # last_hidden_state needs every token of the last block
    assert metadata.vitdeploy_version
    assert metadata.validation["passed"] is True
    assert metadata.validation["references"]["eager fp32"]["rel_max_error"] <= 1e-4
    # the onnxruntime runtime reads the same metadata (written by another module)
    assert session(result.path).get_modelmeta().custom_metadata_map == props


def test_validation_covered_the_declared_range(exported):
    result, stages = exported
    report = result.report
    assert report.passed
    shapes = {(c.batch, c.height, c.width) for c in report.cases}
    assert (1, 16, 16) in shapes and (1, 64, 64) in shapes
    assert any(h != w for _, h, w in shapes)
    assert max(b for b, _, _ in shapes) == 4 and any("capped" in n for n in report.notes)
    assert {c.output for c in report.cases} == {"logits", "last_hidden_state"}
    assert all(c.metrics.rel_max_error <= 1e-4 for c in report.cases)
    json.dumps(result.to_dict())
    for name in ("trace", "convert", "save", "validate"):
        assert f"{name} ..." in stages and any(s.startswith(f"{name} done in") for s in stages)
    written = {"model.onnx", "model.cpu.onnx"}  # the portable graph and its validated onnxruntime-CPU variant
    assert not [p for p in result.path.parent.iterdir() if p.name not in written], "temporary files left behind"


def test_declared_sizes_must_be_multiples_of_the_stride(model, tmp_path):
    with pytest.raises(ValueError, match=r"height bound 20 is not a multiple of the model's stride 8"):
        export_onnx(model, tmp_path / "m.onnx", ExportOptions(height=(20, 64)))
    assert not list(tmp_path.iterdir())


def test_option_errors_name_the_value():
    with pytest.raises(ValueError, match="opset 16"):
        ExportOptions(opset=16)
    with pytest.raises(ValueError, match="'int4'"):
        ExportOptions(precision="int4")
    with pytest.raises(ValueError, match="need precision int8 or fp8"):
        ExportOptions(precision="fp32", calibration="photos/")
    with pytest.raises(ValueError, match="GELU"):
        ExportOptions(precision="fp16", fp32_ops=("GELU",))
    with pytest.raises(ValueError, match="fp16_io"):
        ExportOptions(fp16_io=True)


def test_hybrid_exports_validates_and_runs_at_other_sizes(tmp_path):
    model = make_model(tiny_hybrid_config())  # stride 16, native 64
    result = export_onnx(model, tmp_path / "hybrid.onnx",
                         ExportOptions(batch=(1, 2), height=(32, 96), width=(32, 96)))
    assert result.report.passed
    proto = onnx.load(str(result.path))
    ops = {n.op_type for n in proto.graph.node}
    assert "ReduceMean" not in ops, "weight standardisation should be folded into the conv weights"
    pixels = np.random.default_rng(0).normal(size=(3, 3, 112, 48)).astype(np.float32)  # beyond the range
    (logits,) = session(result.path).run(None, {"pixel_values": pixels})
    assert compare_logits(eager(model, pixels)[0], logits).rel_max_error <= 1e-4


class DriftingViT(VisionTransformer):
    """A model whose eager output differs from its traced graph: stands in for an exporter bug."""

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        logits = super().forward_head(features)
        if torch.compiler.is_exporting():
            return logits
        return logits + 0.05 * logits.abs().amax()


def drifting_model() -> DriftingViT:
    good = make_model(CFG)
    model = DriftingViT(CFG).eval()
    model.load_state_dict(good.state_dict())
    return model


def test_failed_validation_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    options = ExportOptions(batch=(1, 2), height=(32, 32), width=(32, 48))
    with pytest.raises(ExportValidationError) as info:
        export_onnx(drifting_model(), target, options)
    error = info.value
    assert not error.report.passed and error.kept is None
    assert "FAIL" in str(error) and "e-02" in str(error)  # the numbers are in the message
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]

    with pytest.raises(ExportValidationError) as info:
        export_onnx(drifting_model(), target, ExportOptions(**{**options.__dict__, "keep_failed": True}))
    kept = tmp_path / "model.failed.onnx"
    assert info.value.kept == kept and kept.is_file()
    assert target.read_bytes() == b"previous export"
    session(kept)  # the kept file is a loadable graph


def test_external_data_beside_the_file_and_simplify(model, tmp_path):
    """Above the threshold, weights go to <name>.data; the pair still loads after being moved."""
    options = ExportOptions(batch=(1, 2), height=(16, 48), width=(16, 48), external_data_threshold=1000,
                            simplify=True)
    result = export_onnx(model, tmp_path / "big.onnx", options)
    assert result.report.passed and result.data_path == tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(result.path), load_external_data=False)
    locations = {e.value for init in proto.graph.initializer for e in init.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}
    assert result.path.stat().st_size < result.data_path.stat().st_size
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]  # simplify kept the dynamic dims
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("big.onnx", "big.onnx.data"):
        shutil.copy(tmp_path / name, moved / name)
    pixels = np.random.default_rng(1).normal(size=(2, 3, 40, 24)).astype(np.float32)
    (logits,) = session(moved / "big.onnx").run(None, {"pixel_values": pixels})
    assert compare_logits(eager(model, pixels)[0], logits).rel_max_error <= 1e-4


def test_no_validate_is_recorded_in_metadata(model, tmp_path):
    result = export_onnx(model, tmp_path / "m.onnx", ExportOptions(batch=(1, 2), validate=False, preflight=False))
    assert result.report is None
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert ArtifactMetadata.from_props(props).validation["passed"] is None


def test_export_leaves_the_callers_model_as_it_was(exported, model):
    from vitdeploy.model import Attention

    assert not model.training
    assert all(m.fused for m in model.modules() if isinstance(m, Attention))
    assert next(model.parameters()).dtype == torch.float32


def _class_token_mlp_outputs(path) -> list[str]:
    """MatMul outputs shaped ``[batch, 1, mlp_size]``: an MLP computed for one token."""
    proto = onnx.load(str(path))
    shapes = {v.name: dims(v) for v in proto.graph.value_info}
    return [node.output[0] for node in proto.graph.node if node.op_type == "MatMul"
            and shapes.get(node.output[0]) == ["batch", 1, CFG.mlp_size]]


def test_logits_only_export_runs_the_last_block_for_the_class_token(model, tmp_path):
    sizes = {"batch": (1, 4), "height": (16, 64), "width": (16, 64), "validation_max_batch": 2}
    pruned = export_onnx(model, tmp_path / "pruned.onnx", ExportOptions(**sizes))
    full = export_onnx(model, tmp_path / "full.onnx",
                       ExportOptions(**sizes, class_token_last_block=False, validate=False))
    assert pruned.report.passed
    assert pruned.metadata.optimizations == ["class_token_last_block"] and full.metadata.optimizations == []
    assert len(_class_token_mlp_outputs(pruned.path)) == 1 and _class_token_mlp_outputs(full.path) == []
    for batch, height, width in [(1, 16, 16), (3, 48, 24), (2, 64, 64)]:
        pixels = np.random.default_rng(height).normal(size=(batch, 3, height, width)).astype(np.float32)
        reference = eager(model, pixels)[0]
        (got,) = session(pruned.path).run(None, {"pixel_values": pixels})
        (unpruned,) = session(full.path).run(None, {"pixel_values": pixels})
        assert compare_logits(reference, got).rel_max_error <= 1e-5
        assert compare_logits(unpruned, got).rel_max_error <= 1e-5


def test_mean_pooled_models_export_the_whole_last_block(tmp_path):
    pooled = make_model(tiny_config(pooling="avg"))
    result = export_onnx(pooled, tmp_path / "avg.onnx",
                         ExportOptions(batch=(1, 2), height=(16, 32), width=(16, 32), validation_max_batch=2))
    assert result.report.passed and result.metadata.optimizations == []
    assert _class_token_mlp_outputs(result.path) == []


def test_a_model_of_other_than_three_channels_is_refused_before_tracing(tmp_path) -> None:
    """A grayscale ViT loads (inspect, convert) but its export stops in one line, before any work, nothing written."""
    model = make_model(tiny_config(in_channels=1))
    target = tmp_path / "gray.onnx"
    with pytest.raises(ValueError, match="1-channel images.*3-channel models only"):
        export_onnx(model, target, ExportOptions(batch=(1, 2), height=(16, 48), width=(16, 48)))
    assert list(tmp_path.iterdir()) == []
