"""The in-memory contrib-op rewrite OrtRuntime applies on CPU: what it fuses, parity, what it leaves alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
from vitdeploy.runtimes import OrtRuntime
from vitdeploy.runtimes.ort_fusion import fuse_for_cpu

RNG = np.random.default_rng(1)


def _export(model, path: Path, **options) -> Path:
    options = {"batch": (1, 4), "height": (16, 64), "width": (16, 64), "validate": False, "preflight": False,
               **options}
    return export_onnx(model, path, ExportOptions(**options)).path


@pytest.fixture(scope="module")
def tiny():
    return make_model(tiny_config(depth=3))


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory, tiny) -> Path:
    return _export(tiny, tmp_path_factory.mktemp("fusion") / "tiny.onnx")


def _eager(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_rewrite_fuses_every_block_and_removes_the_explicit_pattern(tmp_path, tiny):
    model = onnx.load(str(_export(tiny, tmp_path / "full.onnx", full_last_block=True)))
    counts = fuse_for_cpu(model)
    depth = tiny.config.depth
    assert counts == {"attention": depth, "gelu": depth}
    ops = _op_types(model)
    assert ops.count("Attention") == depth and ops.count("BiasGelu") == depth
    assert "Softmax" not in ops and "Erf" not in ops
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute}
    assert attrs["num_heads"] == tiny.config.num_heads
    assert attrs["scale"] == pytest.approx((tiny.config.hidden_size // tiny.config.num_heads) ** -0.5)
    onnx.checker.check_model(model)  # still a valid model (contrib domain declared)
    used = {name for node in model.graph.node for name in node.input}
    assert all(init.name in used for init in model.graph.initializer)


def test_class_token_last_block_keeps_its_explicit_attention(fp32_path, tiny):
    """A logits-only export attends from the class token alone in its last block: that attention
    (q from one token, k and v from all) is not the fused pattern and stays as it is."""
    model = onnx.load(str(fp32_path))
    depth = tiny.config.depth
    assert fuse_for_cpu(model) == {"attention": depth - 1, "gelu": depth}
    ops = _op_types(model)
    assert ops.count("Attention") == depth - 1 and ops.count("Softmax") == 1
    onnx.checker.check_model(model)


def test_file_on_disk_keeps_the_tensorrt_pattern(fp32_path):
    before = fp32_path.read_bytes()
    with OrtRuntime(fp32_path) as runtime:
        assert runtime.fusions["attention"] > 0
    assert fp32_path.read_bytes() == before
    ops = _op_types(onnx.load(str(fp32_path)))
    assert "Softmax" in ops and "Attention" not in ops


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 48, 24), (2, 64, 16)])
def test_fused_runtime_matches_eager_and_unfused(fp32_path, tiny, shape):
    pixels = RNG.normal(size=(shape[0], 3, shape[1], shape[2])).astype(np.float32)
    reference = _eager(tiny, pixels)
    with OrtRuntime(fp32_path) as fused, OrtRuntime(fp32_path, contrib_fusion=False) as plain:
        assert fused.fusions and not plain.fusions
        got, unfused = fused(pixels), plain(pixels)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() / scale <= 1e-4
    assert np.abs(got - unfused).max() / scale <= 1e-4


def test_session_property_exposes_the_fused_session(fp32_path):
    runtime = OrtRuntime(fp32_path)
    pixels = RNG.normal(size=(1, 3, 32, 32)).astype(np.float32)
    bare = runtime.session.run(None, {"pixel_values": pixels})[0]
    np.testing.assert_array_equal(bare, runtime(pixels))
    with pytest.raises(AttributeError):
        runtime.session = None  # read-only
    runtime.close()
    assert runtime.session is None


def test_fp16_graph_is_left_alone(tmp_path, tiny):
    path = _export(tiny, tmp_path / "tiny16.onnx", precision="fp16")
    model = onnx.load(str(path))
    assert not any(fuse_for_cpu(model).values())
    with OrtRuntime(path) as runtime:
        assert not any(runtime.fusions.values())
        pixels = RNG.normal(size=(1, 3, 32, 32)).astype(np.float32)
        assert np.isfinite(runtime(pixels)).all()


def test_contrib_fusion_options_are_checked(fp32_path):
    with pytest.raises(ValueError, match="contrib_fusion applies to provider 'cpu' only"):
        OrtRuntime(fp32_path, provider="cuda", contrib_fusion=True)
    with OrtRuntime(fp32_path, graph_optimization="disabled") as runtime:
        assert runtime.fusions == {}
    with OrtRuntime(fp32_path, graph_optimization="disabled", contrib_fusion=True) as runtime:
        assert runtime.fusions["attention"] > 0


def test_external_data_file_runs_unfused_or_refuses(tmp_path, tiny):
    path = _export(tiny, tmp_path / "ext.onnx", external_data_threshold=0)
    assert path.with_name("ext.onnx.data").exists()
    with OrtRuntime(path) as runtime:
        assert runtime.fusions == {}
    with pytest.raises(ValueError, match="external file"):
        OrtRuntime(path, contrib_fusion=True)
