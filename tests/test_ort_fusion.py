"""The onnxruntime-CPU graph: what the contrib-op fusion rewrites, that export validates it and writes it
beside the portable graph, and that OrtRuntime runs exactly that validated file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
from vitdeploy.exporters.ort_fusion import fuse_for_cpu
from vitdeploy.files import sha256_file
from vitdeploy.metadata import CPU_FUSION, CPU_VARIANT, PORTABLE, read_onnx_metadata
from vitdeploy.runtimes import OrtRuntime

RNG = np.random.default_rng(1)


def _export(model, path: Path, **options):
    options = {"batch": (1, 4), "height": (16, 64), "width": (16, 64), "preflight": False, **options}
    return export_onnx(model, path, ExportOptions(**options))


@pytest.fixture(scope="module")
def tiny():
    return make_model(tiny_config())  # the model most test files export: its traces are shared


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    return _export(tiny, tmp_path_factory.mktemp("fusion") / "tiny.onnx")


def _eager(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


def _op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_rewrite_fuses_every_block_and_removes_the_explicit_pattern(tmp_path, tiny):
    result = _export(tiny, tmp_path / "full.onnx", class_token_last_block=False, validate=False,
                     cpu_variant=False)
    model = onnx.load(str(result.path))
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


def test_class_token_last_block_keeps_its_explicit_attention(exported, tiny):
    """A logits-only export attends from the class token alone in its last block: that attention
    (q from one token, k and v from all) is not the fused pattern and stays as it is."""
    model = onnx.load(str(exported.path))
    depth = tiny.config.depth
    assert fuse_for_cpu(model) == {"attention": depth - 1, "gelu": depth}
    ops = _op_types(model)
    assert ops.count("Attention") == depth - 1 and ops.count("Softmax") == 1
    onnx.checker.check_model(model)


def test_export_writes_a_validated_cpu_variant_beside_the_portable_graph(exported, tiny):
    portable, variant = exported.path, exported.variant_path
    assert variant == portable.with_name("tiny.cpu.onnx") and variant.is_file()
    ops = _op_types(onnx.load(str(portable)))
    assert "Softmax" in ops and "Attention" not in ops  # what TensorRT needs stays in the portable file
    assert "Attention" in _op_types(onnx.load(str(variant)))
    meta, variant_meta = read_onnx_metadata(portable), read_onnx_metadata(variant)
    assert meta.target == PORTABLE and variant_meta.target == CPU_VARIANT
    assert meta.variants[CPU_VARIANT] == {"file": variant.name, "sha256": sha256_file(variant)}
    assert variant_meta.transforms[-1]["name"] == CPU_FUSION
    # Both graphs were validated against the eager model, each on its own.
    assert meta.validation["passed"] is True and variant_meta.validation["passed"] is True
    assert exported.variant_report.passed and exported.variant_report.cases
    assert variant_meta.validation["references"]["eager fp32"]["rel_max_error"] <= 1e-4


def test_ort_runtime_runs_the_validated_graph_by_default(exported, tiny):
    """The graph OrtRuntime runs on CPU is byte for byte the file export validated."""
    with OrtRuntime(exported.path) as runtime, OrtRuntime(exported.path, variant="portable") as plain:
        assert runtime.graph_path == exported.variant_path and plain.graph_path == exported.path
        assert runtime.fusions["attention"] == tiny.config.depth - 1 and plain.fusions == {}
        validated = runtime.metadata.validation
        assert validated["passed"] is True and runtime.metadata.target == CPU_VARIANT
        for shape in [(1, 32, 32), (3, 48, 24), (2, 64, 16)]:
            pixels = RNG.normal(size=(shape[0], 3, shape[1], shape[2])).astype(np.float32)
            reference = _eager(tiny, pixels)
            scale = np.abs(reference).max()
            assert np.abs(runtime(pixels) - reference).max() / scale <= 1e-4
            assert np.abs(plain(pixels) - reference).max() / scale <= 1e-4


def test_a_tampered_variant_is_not_run(tmp_path, exported):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in (exported.path, exported.variant_path):
        (folder / path.name).write_bytes(path.read_bytes())
    tampered = folder / exported.variant_path.name
    tampered.write_bytes(tampered.read_bytes() + b"\x00")
    with pytest.warns(RuntimeWarning, match="does not match the sha256"), OrtRuntime(folder / "tiny.onnx") as runtime:
        assert runtime.graph_path == folder / "tiny.onnx"


def test_session_property_exposes_the_session(exported):
    runtime = OrtRuntime(exported.path)
    pixels = RNG.normal(size=(1, 3, 32, 32)).astype(np.float32)
    bare = runtime.session.run(None, {"pixel_values": pixels})[0]
    np.testing.assert_array_equal(bare, runtime(pixels))
    with pytest.raises(AttributeError):
        runtime.session = None  # read-only
    runtime.close()
    assert runtime.session is None


def test_fp16_and_external_data_exports_have_no_variant(tmp_path, tiny):
    half = _export(tiny, tmp_path / "tiny16.onnx", precision="fp16", validate=False)
    assert half.variant_path is None and not fuse_for_cpu(onnx.load(str(half.path)))["attention"]
    external = _export(tiny, tmp_path / "ext.onnx", external_data_threshold=0, validate=False)
    assert external.path.with_name("ext.onnx.data").exists() and external.variant_path is None
    with OrtRuntime(external.path) as runtime:
        assert runtime.graph_path == external.path and runtime.fusions == {}


def test_no_validation_means_no_variant_and_a_stale_one_is_removed(tmp_path, tiny):
    first = _export(tiny, tmp_path / "m.onnx")
    assert first.variant_path.is_file()
    again = _export(tiny, tmp_path / "m.onnx", validate=False)
    assert again.variant_path is None and not (tmp_path / "m.cpu.onnx").exists()
    assert read_onnx_metadata(again.path).variants == {}


def test_an_int8_export_writes_a_validated_variant_that_keeps_its_int8_linear_layers(tmp_path, tiny):
    """In the int8 Q/DQ graph the attention core (head split to head merge) becomes MultiHeadAttention and
    bias + GELU BiasGelu, while every linear layer stays the int8 MatMulIntegerToFloat onnxruntime makes
    of it; the variant passes the int8 gate on its own, no less close to the eager model than the file."""
    import onnxruntime as ort

    from vitdeploy.exporters.quantize import QuantizeOptions

    result = _export(tiny, tmp_path / "tiny8.onnx", precision="int8", validation_max_batch=2,
                     quantize=QuantizeOptions(reduce_range=True))
    depth = tiny.config.depth
    assert result.variant_path == tmp_path / "tiny8.cpu.onnx" and result.variant_report.passed
    variant_meta = read_onnx_metadata(result.variant_path)
    assert variant_meta.precision == "int8" and variant_meta.target == CPU_VARIANT
    assert variant_meta.transforms[-1] == {"name": CPU_FUSION, "counts": {"attention": depth - 1, "gelu": depth}}
    ops = _op_types(onnx.load(str(result.variant_path)))
    assert ops.count("MultiHeadAttention") == depth - 1 and ops.count("BiasGelu") == depth
    assert ops.count("Softmax") == 1 and "Erf" not in ops  # the class-token-only last block stays explicit

    def optimized_ops(path: Path) -> list[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.stem}.optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return _op_types(onnx.load(options.optimized_model_filepath))

    # No dequantize -> quantize pair anywhere: every QuantizeLinear reads a float op's output.
    portable = onnx.load(str(result.path))
    producers = {output: node.op_type for node in portable.graph.node for output in node.output}
    assert all(producers.get(node.input[0]) != "DequantizeLinear" for node in portable.graph.node
               if node.op_type == "QuantizeLinear")
    portable_ops, variant_ops = optimized_ops(result.path), optimized_ops(result.variant_path)
    assert variant_ops.count("MatMulIntegerToFloat") == portable_ops.count("MatMulIntegerToFloat") >= 4 * depth
    assert len(variant_ops) < len(portable_ops)

    worst = min(case.metrics.cosine for case in result.report.cases)
    assert min(case.metrics.cosine for case in result.variant_report.cases) >= worst - 1e-4
    with OrtRuntime(result.path) as runtime:
        assert runtime.graph_path == result.variant_path and runtime.fusions["attention"] == depth - 1
