"""OpenVINORuntime on real OpenVINO sessions: parity with onnxruntime, input checks, explicit inference
precision, thread safety, and runtimes.load(backend=...)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import make_model, tiny_config

from vitdeploy import runtimes
from vitdeploy.cpu_features import has_bf16
from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
from vitdeploy.parity import compare_logits
from vitdeploy.runtimes.base import InputSpec

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = make_model(tiny_config())
    path = tmp_path_factory.mktemp("openvino") / "tiny.onnx"
    export_onnx(model, path, ExportOptions(batch=(1, 8), validation_max_batch=2, preflight=False))
    return path


def _pixels(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def test_matches_onnxruntime_at_f32_across_shapes(tiny_onnx):
    with runtimes.load(tiny_onnx, backend="openvino") as ov_runtime, runtimes.load(tiny_onnx) as ort_runtime:
        assert type(ov_runtime).__name__ == "OpenVINORuntime"
        assert ov_runtime.property("INFERENCE_PRECISION_HINT").to_string() == "f32"
        for batch, height, width in ((1, 32, 32), (3, 48, 24), (8, 64, 64)):
            pixels = _pixels(batch, height) if height == width else \
                np.random.default_rng(1).standard_normal((batch, 3, height, width)).astype(np.float32)
            metrics = compare_logits(ort_runtime(pixels), ov_runtime(pixels))
            assert metrics.rel_max_error <= 1e-4, (batch, height, width, metrics)
        assert ov_runtime.run_outputs(_pixels())["logits"].shape == (2, 10)


def test_checks_inputs_like_every_runtime(tiny_onnx):
    with runtimes.load(tiny_onnx, backend="openvino") as runtime:
        with pytest.raises(ValueError, match="channels"):
            runtime(np.zeros((1, 1, 32, 32), np.float32))
        with pytest.raises(ValueError, match="multiple of the patch stride 8"):
            runtime(np.zeros((1, 3, 36, 32), np.float32))
        with pytest.raises(ValueError, match="outside the validated range"):
            runtime(np.zeros((9, 3, 32, 32), np.float32))
        with pytest.raises(ValueError, match="dtype float32"):
            runtime(np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(RuntimeError, match="closed"):
        runtime(_pixels())


def test_bf16_only_where_the_cpu_has_it(tiny_onnx):
    if not has_bf16():
        with pytest.raises(ValueError, match="bf16 instructions"):
            runtimes.load(tiny_onnx, backend="openvino", inference_precision="bf16")
        return
    with runtimes.load(tiny_onnx, backend="openvino", inference_precision="bf16") as bf16, \
            runtimes.load(tiny_onnx, backend="openvino") as f32:
        assert bf16.property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
        assert compare_logits(f32(_pixels()), bf16(_pixels())).cosine >= 0.999


def test_rejects_bad_options_and_files(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="inference_precision 'fp16'"):
        runtimes.load(tiny_onnx, backend="openvino", inference_precision="fp16")
    with pytest.raises(ValueError, match="backend 'openvino' opens an .onnx file"):
        runtimes.load(tmp_path / "model.engine", backend="openvino")
    with pytest.raises(ValueError, match="backend 'onnx'"):
        runtimes.load(tiny_onnx, backend="onnx")
    foreign = tmp_path / "foreign.onnx"
    import onnx

    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(ValueError, match="input_spec"):
        runtimes.load(foreign, backend="openvino")
    spec = InputSpec(batch=(1, 4), height=(32, 32), width=(32, 32), multiple_of=8)
    with runtimes.load(foreign, backend="openvino", input_spec=spec) as runtime:
        assert runtime(_pixels()).shape == (2, 10)


def test_compiled_shapes_keeps_the_newest_shapes_and_runs_a_model_without_metadata(tiny_onnx):
    """The per-shape compile cache the runtime and tune's NNCF peer share: an in-memory model, all outputs
    by default, at most MAX_COMPILED_SHAPES static models (the oldest dropped and compiled again when asked)."""
    import openvino as ov

    from vitdeploy.runtimes.openvino import MAX_COMPILED_SHAPES, CompiledShapes

    core = ov.Core()
    model = core.read_model(str(tiny_onnx))
    models = CompiledShapes(core, model, "CPU", {"INFERENCE_NUM_THREADS": 1}, per_shape=True)
    assert models.last is None
    shapes = [(batch, 3, 32, 32) for batch in range(1, MAX_COMPILED_SHAPES + 2)]
    first = models.compiled_for(shapes[0])[0]
    outputs = models.infer(np.zeros(shapes[0], np.float32))
    assert [o.shape[0] for o in outputs] == [1] * len(model.outputs) and models.last is first
    for shape in shapes[1:]:
        models.compiled_for(shape)
    assert models.compiled_for(shapes[-1])[0] is models.last  # kept
    assert models.compiled_for(shapes[0])[0] is not first  # dropped as the oldest, compiled again
    logits = models.infer(np.zeros(shapes[1], np.float32), [model.outputs[0].get_any_name()])
    assert len(logits) == 1 and logits[0].dtype == np.float32 and logits[0].shape[0] == 2
    assert models.last.inputs[0].get_partial_shape() == ov.PartialShape(list(shapes[1]))


def test_one_runtime_serves_many_threads(tiny_onnx):
    inputs = [_pixels(batch=1 + i % 3, seed=i) for i in range(12)]
    with runtimes.load(tiny_onnx, backend="openvino", threads=1) as runtime:
        expected = [runtime(x) for x in inputs]
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def work(start: int) -> None:
            try:
                for index in range(start, len(inputs), 4):
                    results[index] = runtime(inputs[index])
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for index, value in enumerate(expected):
        np.testing.assert_array_equal(results[index], value)


def test_compile_per_shape_compiles_each_shape_once_and_gives_the_same_outputs(tiny_onnx):
    """A static-shape model per input shape on first use: each is static, a shape seen again reuses its
    model, the outputs equal the whole-range model's, and a shape outside the range is still refused."""
    import openvino as ov

    with runtimes.load(tiny_onnx, backend="openvino") as whole, \
            runtimes.load(tiny_onnx, backend="openvino", compile_per_shape=True) as per_shape:
        assert per_shape.compiled is None and "compile_per_shape=True" in repr(per_shape)
        seen = {}
        for batch, height, width in ((1, 32, 32), (3, 48, 24), (1, 32, 32)):
            pixels = np.random.default_rng(height).standard_normal((batch, 3, height, width)).astype(np.float32)
            metrics = compare_logits(whole(pixels), per_shape(pixels))
            assert metrics.rel_max_error <= 1e-5, (batch, height, width, metrics)
            shape = per_shape.compiled.inputs[0].get_partial_shape()
            assert shape.is_static and shape == ov.PartialShape([batch, 3, height, width])
            seen.setdefault((batch, height, width), per_shape.compiled)
            assert per_shape.compiled is seen[(batch, height, width)]  # compiled once, reused
        assert whole.compiled.inputs[0].get_partial_shape().is_dynamic
        with pytest.raises(ValueError, match="multiple of the patch stride 8"):
            per_shape(np.zeros((1, 3, 36, 32), np.float32))
    with pytest.raises(RuntimeError, match="closed"):
        per_shape(_pixels())
