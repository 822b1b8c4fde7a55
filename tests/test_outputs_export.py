"""Every stage carries the outputs asked for (vitdeploy.outputs): export, runtimes, graph transforms, Triton.

Two real exports of tiny models are shared by the whole module (a class-token headless backbone
with ``pooler_output`` + ``patch_tokens``, and a mean-pooled classifier with ``logits`` +
``last_hidden_state`` + ``patch_tokens``: no prefix tokens, so its sequence is its patch count); the
fp16 and int8 graphs are made from the headless one by the transforms themselves. Every output
is compared with the eager model at non-square sizes through onnxruntime and OpenVINO.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy import runtimes
from vitdeploy.exporters.onnx_export import (
    ExportOptions,
    build_metadata,
    export_onnx,
    uses_class_token_last_block,
)
from vitdeploy.metadata import CLASS_TOKEN_LAST_BLOCK, ArtifactMetadata, read_onnx_metadata
from vitdeploy.parity import InputFactory, compare_logits

SMALL = dict(hidden_size=32, depth=1, num_heads=2, mlp_size=64)
RANGE = dict(batch=(1, 4), height=(16, 48), width=(16, 48), validation_max_batch=2)
SIZES = [(2, 24, 40), (1, 48, 16)]  # non-square, both orientations
HEADLESS_OUTPUTS = ("pooler_output", "patch_tokens")
CLASSIFIER_OUTPUTS = ("logits", "last_hidden_state", "patch_tokens")


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def headless():
    return make_model(tiny_config(num_classes=0, **SMALL), seed=1)


@pytest.fixture(scope="module")
def classifier():
    return make_model(tiny_config(pooling="avg", **SMALL), seed=2)


@pytest.fixture(scope="module")
def headless_export(headless, tmp_path_factory):
    """The headless backbone, validated, with its onnxruntime CPU variant beside it."""
    path = tmp_path_factory.mktemp("headless") / "backbone.onnx"
    return export_onnx(headless, path, ExportOptions(outputs=HEADLESS_OUTPUTS, **RANGE))


@pytest.fixture(scope="module")
def classifier_export(classifier, tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier") / "classifier.onnx"
    return export_onnx(classifier, path, ExportOptions(outputs=CLASSIFIER_OUTPUTS, cpu_variant=False, preflight=False,
                                                       **RANGE))


def eager(model, pixels: np.ndarray, names) -> dict[str, np.ndarray]:
    with torch.no_grad():
        values = model.forward_outputs(torch.from_numpy(pixels), names)
    return {name: value.numpy() for name, value in values.items()}


def batches(metadata: ArtifactMetadata):
    factory = InputFactory(metadata.preprocessing)
    for batch, height, width in SIZES:
        yield factory.batch(batch, height, width)[0]


def assert_matches(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], rel: float, cosine: float) -> None:
    assert sorted(outputs) == sorted(expected)
    for name, value in expected.items():
        metrics = compare_logits(value, outputs[name], classification=name == "logits")
        assert metrics.rel_max_error <= rel, (name, metrics)
        assert metrics.cosine >= cosine, (name, metrics)


# -- which outputs a model has and the class-token optimisation ---------------------------------


def test_default_outputs_and_the_vector_only_optimisation(headless):
    classifier = make_model(tiny_config(**SMALL), seed=2)  # class-token pooling
    assert ExportOptions().output_names(headless.config) == ("pooler_output",)
    assert ExportOptions().output_names(classifier.config) == ("logits",)
    assert ExportOptions(outputs=("last_hidden_state", "logits")).output_names(classifier.config) == (
        "logits", "last_hidden_state")
    assert ExportOptions(outputs=("patch_tokens", "logits")).output_names(classifier.config) == ("logits", "patch_tokens")
    with pytest.raises(ValueError, match="this model has no logits output"):
        ExportOptions(outputs=("logits",)).output_names(headless.config)
    with pytest.raises(ValueError, match="sequence of output names"):
        ExportOptions(outputs="logits")
    # Vector outputs only: the last block runs for the class token alone, and the values are the same.
    vectors = ExportOptions(outputs=("logits", "pooler_output"))
    assert uses_class_token_last_block(classifier.config, vectors)
    assert not uses_class_token_last_block(classifier.config, ExportOptions(outputs=CLASSIFIER_OUTPUTS))
    whole_block = ExportOptions(outputs=("logits",), class_token_last_block=False)
    assert not uses_class_token_last_block(classifier.config, whole_block)
    shape = build_metadata(headless, ExportOptions(), ExportOptions().shape_range(headless.config))
    assert shape.optimizations == [CLASS_TOKEN_LAST_BLOCK] and shape.output_names == ["pooler_output"]
    pixels = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        pruned = classifier.forward_outputs(pixels, ["logits", "pooler_output"])
        full = classifier.forward_outputs(pixels, ["logits", "pooler_output", "last_hidden_state"])
        features = classifier.forward_features(pixels)
    torch.testing.assert_close(pruned["logits"], full["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pruned["pooler_output"], full["pooler_output"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full["logits"], classifier(pixels))
    torch.testing.assert_close(full["last_hidden_state"], features)
    with torch.no_grad():
        tokens = classifier.forward_outputs(pixels, ["patch_tokens"])["patch_tokens"]
    assert tokens.shape == (2, (32 // 8) * (24 // 8), 32)
    torch.testing.assert_close(tokens, features[:, 1:])


def test_metadata_reads_back_outputs_and_files_from_before_outputs_were_recorded(classifier):
    from onnx_artifacts import make_metadata

    metadata = make_metadata(classifier.config)
    metadata.outputs.append(type(metadata.outputs[0])("last_hidden_state", "float32", ["batch", "sequence", 32]))
    props = metadata.to_props()
    features_era = ArtifactMetadata.from_props(props)  # an old `--features` export
    assert features_era.output_names == ["logits", "last_hidden_state"] and features_era.primary_output == "logits"
    del props["vitdeploy.outputs"]
    oldest = ArtifactMetadata.from_props(props)
    assert oldest.output_names == ["logits"] and oldest.output("logits").shape == ["batch", 10]
    with pytest.raises(KeyError, match="no output 'patch_tokens'; it has logits"):
        oldest.output("patch_tokens")


# -- the exported graphs ---------------------------------------------------------------------------


def test_graphs_export_only_the_outputs_asked_for_with_named_dynamic_dims(headless_export, classifier_export):
    headless_graph = onnx.load(str(headless_export.path))
    assert [o.name for o in headless_graph.graph.output] == list(HEADLESS_OUTPUTS)
    assert dims(headless_graph.graph.output[0]) == ["batch", 32]
    assert dims(headless_graph.graph.output[1]) == ["batch", "patches", 32]
    classifier_graph = onnx.load(str(classifier_export.path))
    assert [o.name for o in classifier_graph.graph.output] == list(CLASSIFIER_OUTPUTS)
    assert [dims(o) for o in classifier_graph.graph.output] == [["batch", 10], ["batch", "sequence", 32],
                                                                 ["batch", "patches", 32]]
    # Metadata records the outputs and reads them back; tokens asked for: the whole last block runs.
    for result, names in ((headless_export, HEADLESS_OUTPUTS), (classifier_export, CLASSIFIER_OUTPUTS)):
        metadata = read_onnx_metadata(result.path)
        assert metadata.output_names == list(names)
        assert metadata.optimizations == []
        assert metadata.output("patch_tokens").shape == ["batch", "patches", 32]
    assert read_onnx_metadata(headless_export.path).primary_output == "pooler_output"


def test_validation_reports_every_output_with_classification_metrics_for_logits_only(headless_export,
                                                                                      classifier_export):
    for result, names in ((headless_export, HEADLESS_OUTPUTS), (classifier_export, CLASSIFIER_OUTPUTS)):
        report = result.report
        assert report.passed and report.outputs == list(names)
        for case in report.cases:
            assert (case.metrics.top1_agreement is not None) == (case.output == "logits")
            assert (case.tolerance.min_top1 is not None) == (case.output == "logits")
        summary = result.metadata.validation
        assert sorted(summary["outputs"]) == sorted(names)
        assert summary["outputs"]["patch_tokens"]["eager fp32"]["rel_max_error"] <= 1e-4
    # The per-reference summary speaks of the primary output: logits, else the pooled embedding.
    assert "min_top1_agreement" in classifier_export.metadata.validation["references"]["eager fp32"]
    assert "min_top1_agreement" not in headless_export.metadata.validation["references"]["eager fp32"]
    # The CPU variant (onnxruntime contrib-op fusion) keeps every output and was validated on each.
    assert headless_export.variant_path is not None
    variant = onnx.load(str(headless_export.variant_path))
    assert [o.name for o in variant.graph.output] == list(HEADLESS_OUTPUTS)
    assert headless_export.variant_report.passed and headless_export.variant_report.outputs == list(HEADLESS_OUTPUTS)


def test_validation_refuses_references_without_one_of_the_graph_outputs(headless_export, headless):
    from vitdeploy.exporters.validation import validate_onnx
    from vitdeploy.parity import Reference, tolerance_for
    from vitdeploy.runtimes.torch import TorchRuntime

    partial = TorchRuntime(headless, outputs=("pooler_output",), batch=(1, 4), height=(16, 48), width=(16, 48))
    reference = Reference("eager fp32, pooled only", partial, tolerance_for("fp32"))
    with pytest.raises(ValueError, match="does not return the graph's output.s. patch_tokens; it returns pooler_output"):
        validate_onnx(headless_export.path, headless, headless_export.metadata, references=[reference])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("which", ["headless", "classifier"])
def test_runtimes_match_eager_for_every_output_at_non_square_sizes(backend, which, request):
    model = request.getfixturevalue(which)
    result = request.getfixturevalue(f"{which}_export")
    names = HEADLESS_OUTPUTS if which == "headless" else CLASSIFIER_OUTPUTS
    with runtimes.load(result.path, backend=backend) as runtime:
        assert runtime.output_names == list(names)
        assert runtime.output_name == ("pooler_output" if which == "headless" else "logits")
        for pixels in batches(result.metadata):
            expected = eager(model, pixels, names)
            assert_matches(runtime.run_outputs(pixels), expected, rel=1e-4, cosine=0.99999)
            np.testing.assert_allclose(runtime(pixels), expected[runtime.output_name], rtol=1e-4, atol=1e-5)


def test_torch_runtime_takes_outputs_and_returns_the_primary_one(headless):
    from vitdeploy.runtimes.torch import TorchRuntime

    with TorchRuntime(headless, outputs=("patch_tokens", "pooler_output")) as runtime:
        assert runtime.output_names == list(HEADLESS_OUTPUTS)
        assert [t.name for t in runtime.metadata.outputs] == list(HEADLESS_OUTPUTS)
        pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 40), dtype=np.float32)
        outputs = runtime.run_outputs(pixels)
        assert outputs["patch_tokens"].shape == (2, 2 * 5, 32)
        np.testing.assert_allclose(runtime(pixels), outputs["pooler_output"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no logits output"):
        TorchRuntime(headless, outputs=("logits",))


# -- graph transforms keep every output ---------------------------------------------------------


@pytest.fixture(scope="module")
def transformed(headless_export):
    """fp16 and int8 graphs of the headless export, made by the transforms (no new trace)."""
    from vitdeploy.calibration import load_calibration
    from vitdeploy.exporters.fp16 import convert_to_fp16
    from vitdeploy.exporters.quantize import QuantizeOptions, quantize_model

    fp32 = onnx.load(str(headless_export.path))
    calibration = load_calibration(None, 8, headless_export.metadata.preprocessing, log=None)
    int8, _ = quantize_model(fp32, calibration, QuantizeOptions(precision="int8"))
    folder = headless_export.path.parent
    paths = {"fp16": folder / "backbone.fp16.onnx", "int8": folder / "backbone.int8.onnx"}
    onnx.save(convert_to_fp16(fp32), str(paths["fp16"]))
    onnx.save(int8, str(paths["int8"]))
    return paths


@pytest.mark.parametrize("precision, cosine", [("fp16", 0.9999), ("int8", 0.99)])
def test_fp16_and_int8_graphs_keep_every_output(transformed, headless, headless_export, precision, cosine):
    from vitdeploy.exporters.trt_support import check_onnx

    path = transformed[precision]
    graph = onnx.load(str(path))
    assert [o.name for o in graph.graph.output] == list(HEADLESS_OUTPUTS)
    assert [dims(o) for o in graph.graph.output] == [["batch", 32], ["batch", "patches", 32]]
    assert read_onnx_metadata(path).precision == precision
    with runtimes.load(path) as runtime:
        for pixels in batches(headless_export.metadata):
            assert_matches(runtime.run_outputs(pixels), eager(headless, pixels, HEADLESS_OUTPUTS), rel=0.3,
                           cosine=cosine)
    report = check_onnx(path)
    assert report.ok, report.findings


def test_tensorrt_plan_reads_every_output(headless_export, transformed, tmp_path):
    from vitdeploy.exporters.trt_plan import plan_build, trtexec_command

    for path, precision in ((headless_export.path, "fp32"), (transformed["int8"], "int8")):
        plan = plan_build(path, tmp_path / f"{precision}.engine")
        assert plan.onnx.output_names == list(HEADLESS_OUTPUTS)
        assert plan.onnx.precision == precision
        assert plan.profiles and plan.profiles[0].max[2:] == (48, 48)
        assert "--onnx=" + str(path) in trtexec_command(plan, path)


# -- Triton ---------------------------------------------------------------------------------------


def test_triton_repository_lists_each_output_with_its_dims(headless_export, classifier_export, tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc]")
    text_format = pytest.importorskip("google.protobuf.text_format")
    from vitdeploy.serving.client import ServedModel
    from vitdeploy.serving.repository import RepositoryOptions, write_repository

    expected = {"backbone": [("pooler_output", [32]), ("patch_tokens", [-1, 32])],
                "classifier": [("logits", [10]), ("last_hidden_state", [-1, 32]), ("patch_tokens", [-1, 32])]}
    entries = write_repository([headless_export.path, classifier_export.path], tmp_path / "repo",
                               RepositoryOptions(kinds=("python", "onnxruntime")))
    assert len(entries) == 4
    for entry in entries:
        text = (entry.path / "config.pbtxt").read_text(encoding="utf-8")
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        stem = entry.name.rsplit("_", 1)[0]
        assert [(o.name, list(o.dims)) for o in config.output] == expected[stem]
        params = {key: value.string_value for key, value in config.parameters.items()}
        assert json.loads(params["vitdeploy.outputs"]) == [name for name, _ in expected[stem]]
        served = ServedModel.from_config({"name": entry.name, "input": [{"name": "pixel_values"}],
                                          "output": [{"name": o.name} for o in config.output],
                                          "parameters": {k: {"string_value": v} for k, v in params.items()}})
        assert served.primary_output == ("pooler_output" if stem == "backbone" else "logits")


# -- TensorRT runtime (the test double: its "engine" computes mean(x[n]) * (k + 1) for every output) ----


def two_output_graph(path, names: tuple[str, str]):
    """The tiny exported graph with a second output (an Identity of the first) and metadata to match."""
    from trt_artifacts import load_tiny

    from vitdeploy.exporters.graph import set_metadata

    proto = load_tiny()
    metadata = read_onnx_metadata(_tiny_path())
    first = proto.graph.output[0]
    if names[0] != first.name:
        for node in proto.graph.node:
            node.output[:] = [names[0] if out == first.name else out for out in node.output]
        first.name = names[0]
    proto.graph.node.append(onnx.helper.make_node("Identity", [names[0]], [names[1]]))
    second = proto.graph.output.add()
    second.CopyFrom(first)
    second.name = names[1]
    metadata.outputs = [type(metadata.outputs[0])(name, "float32", ["batch", 10]) for name in names]
    set_metadata(proto, metadata.to_props())
    onnx.save(proto, str(path))
    return path


def _tiny_path():
    from trt_artifacts import tiny_onnx

    return tiny_onnx()


@pytest.mark.parametrize("names, primary", [(("logits", "pooler_output"), "logits"),
                                            (("pooler_output", "image_embeds"), "image_embeds")])
def test_tensorrt_runtime_returns_every_engine_output(names, primary, tmp_path, monkeypatch):
    from trt_double import Doubles

    from vitdeploy.exporters import tensorrt_build
    from vitdeploy.exporters.trt_plan import plan_build
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    graph = two_output_graph(tmp_path / "two.onnx", names)  # torch work before the doubles stand in
    Doubles().install(monkeypatch)
    plan = plan_build(graph, tmp_path / "two.engine", profile_specs=["res=16:32:32"])
    tensorrt_build.run_build(plan, show_progress=False)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 24)).astype(np.float32)
    expected = (x.astype(np.float64).mean(axis=(1, 2, 3))[:, None] * np.arange(1, 11)).astype(np.float32)
    with TensorRTRuntime(plan.engine_path) as runtime:
        assert runtime.output_names == list(names) and runtime.output_name == primary
        outputs = runtime.run_outputs(x)
        assert sorted(outputs) == sorted(names)
        for value in outputs.values():
            np.testing.assert_allclose(value, expected, rtol=1e-6)
        np.testing.assert_allclose(runtime(x), expected, rtol=1e-6)
        with pytest.raises(ValueError, match="not a multiple of the patch stride"):
            runtime.run_outputs(x[:, :, :, :20])
