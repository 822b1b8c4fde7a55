"""OrtRuntime on real onnxruntime sessions of small exported ViTs, and runtimes.load dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_model, run_without_torch, tiny_config
from onnx_artifacts import attach_metadata, export_onnx, fp16_io_graph, make_metadata

import vitdeploy.runtimes as runtimes
from vitdeploy.metadata import ShapeRange, read_metadata_props
from vitdeploy.runtimes import InputSpec, OrtRuntime
from vitdeploy.runtimes.onnxruntime import profile_shapes, provider_chain, tensorrt_provider_options

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, make_model(config)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, tiny) -> Path:
    config, model = tiny
    return export_onnx(model, tmp_path_factory.mktemp("ort") / "tiny.onnx", make_metadata(config))


@pytest.fixture(scope="module")
def runtime(onnx_path):
    with OrtRuntime(onnx_path) as rt:
        yield rt


def eager(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels)).numpy()


def pixels(batch: int, height: int, width: int, dtype=np.float32) -> np.ndarray:
    return RNG.normal(size=(batch, 3, height, width)).astype(dtype)


# -- parity and metadata -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 48, 24), (8, 64, 64), (2, 16, 16)])
def test_matches_eager_model_across_batch_and_resolution(runtime, tiny, shape):
    x = pixels(*shape)
    logits = runtime(x)
    assert logits.dtype == np.float32 and logits.shape == (shape[0], tiny[0].num_classes)
    np.testing.assert_allclose(logits, eager(tiny[1], x), atol=1e-4, rtol=1e-4)


def test_input_spec_and_metadata_come_from_the_file(runtime, tiny):
    config = tiny[0]
    spec = runtime.input_spec
    assert (spec.name, spec.dtype, spec.channels) == ("pixel_values", "float32", 3)
    assert (spec.batch, spec.height, spec.width, spec.multiple_of) == ((1, 8), (16, 64), (16, 64), config.stride)
    assert runtime.metadata.model_config == config.to_dict()
    assert runtime.providers[0] == "CPUExecutionProvider"


def test_read_metadata_props_equals_onnx_load(onnx_path):
    expected = {entry.key: entry.value for entry in onnx.load(str(onnx_path)).metadata_props}
    assert read_metadata_props(onnx_path) == expected
    assert any(key.startswith("vitdeploy.") for key in expected)


def test_read_metadata_props_rejects_non_onnx(tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="not a readable ONNX model|not an ONNX model"):
        read_metadata_props(bogus)
    with pytest.raises(ValueError, match="bogus.onnx"):
        OrtRuntime(bogus)


def test_refuses_file_without_metadata_unless_given_a_spec(tmp_path, onnx_path, tiny):
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(onnx_path.read_bytes())
    attach_metadata(foreign, None)
    with pytest.raises(ValueError, match="no vitdeploy metadata.*input_spec"):
        OrtRuntime(foreign)
    spec = InputSpec(batch=(1, 2), height=(32, 32), width=(32, 32), multiple_of=8)
    with OrtRuntime(foreign, input_spec=spec) as rt:
        assert rt.metadata is None and rt.input_spec is spec
        x = pixels(2, 32, 32)
        np.testing.assert_allclose(rt(x), eager(tiny[1], x), atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="height 48 is outside the validated range 32..32"):
            rt(pixels(1, 48, 32))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OrtRuntime(tmp_path / "missing.onnx")


def test_fp16_io_graph_takes_float16_and_returns_float32(tmp_path, tiny):
    config = tiny[0]
    metadata = make_metadata(config, input_dtype="float16", output_dtype="float16", precision="fp16")
    path = tmp_path / "fp16io.onnx"
    weight = fp16_io_graph(path, config, metadata)
    with OrtRuntime(path) as rt:
        assert rt.input_spec.dtype == "float16"
        with pytest.raises(ValueError, match="must have dtype float16, got float32"):
            rt(pixels(1, 32, 32))
        x = pixels(2, 32, 40, np.float16)
        logits = rt(x)
    assert logits.dtype == np.float32
    expected = x.astype(np.float32).mean(axis=(2, 3)) @ weight.astype(np.float32)
    np.testing.assert_allclose(logits, expected, atol=2e-2, rtol=1e-2)


def test_metadata_dtype_must_match_the_graph(tmp_path, tiny):
    config = tiny[0]
    path = tmp_path / "liar.onnx"
    fp16_io_graph(path, config, make_metadata(config, input_dtype="float32"))
    with pytest.raises(ValueError, match="inconsistent with its own vitdeploy metadata: its input dtype is float16, the metadata says float32"):
        OrtRuntime(path)


# -- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["disabled", "basic", "extended"])
def test_graph_optimization_levels_agree(onnx_path, runtime, level):
    x = pixels(2, 32, 48)
    with OrtRuntime(onnx_path, graph_optimization=level, intra_op_threads=1, inter_op_threads=1) as rt:
        np.testing.assert_allclose(rt(x), runtime(x), atol=1e-5, rtol=1e-5)


def test_bad_options_are_refused(onnx_path):
    with pytest.raises(ValueError, match="graph_optimization 'max' is not one of"):
        OrtRuntime(onnx_path, graph_optimization="max")
    with pytest.raises(ValueError, match="intra_op_threads must be >= 0"):
        OrtRuntime(onnx_path, intra_op_threads=-1)
    with pytest.raises(ValueError, match="provider 'rocm' is not one of"):
        OrtRuntime(onnx_path, provider="rocm")
    with pytest.raises(ValueError, match="tensorrt_options, fp16 only apply to provider 'tensorrt'"):
        OrtRuntime(onnx_path, tensorrt_options={"trt_max_workspace_size": 1}, fp16=True)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu installed")
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_without_onnxruntime_gpu_names_the_installed_ones(onnx_path, provider):
    with pytest.raises(ValueError, match=rf"provider '{provider}' needs onnxruntime-gpu.*installed providers: \["):
        OrtRuntime(onnx_path, provider=provider)


def test_provider_chain_orders_fallbacks():
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = provider_chain("tensorrt", available, {"trt_fp16_enable": "True"}, device_id=1)
    assert [name for name, _ in chain] == available
    assert chain[0][1] == {"trt_fp16_enable": "True"} and chain[1][1] == {"device_id": "1"}
    assert [name for name, _ in provider_chain("cuda", available)] == available[1:]
    assert provider_chain("cpu", ["CPUExecutionProvider"]) == [("CPUExecutionProvider", {})]
    with pytest.raises(ValueError, match="TensorRT libraries; installed providers: \\['CUDAExecutionProvider'"):
        provider_chain("tensorrt", available[1:])


def test_tensorrt_options_cover_the_metadata_range(tmp_path, tiny):
    spec = InputSpec.from_metadata(make_metadata(tiny[0], ShapeRange(batch=(1, 32), height=(112, 448), width=(96, 384))))
    options = tensorrt_provider_options(spec, precision="fp16", cache_dir=tmp_path, device_id=0)
    assert options["trt_profile_min_shapes"] == "pixel_values:1x3x112x96"
    assert options["trt_profile_max_shapes"] == "pixel_values:32x3x448x384"
    batch, channels, height, width = (int(v) for v in options["trt_profile_opt_shapes"].split(":")[1].split("x"))
    assert 1 <= batch <= 32 and channels == 3 and 112 <= height <= 448 and 96 <= width <= 384
    assert height % spec.multiple_of == 0 and width % spec.multiple_of == 0
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_engine_cache_enable"] == options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == options["trt_timing_cache_path"] == str(tmp_path)
    fp32 = tensorrt_provider_options(spec, precision="fp32", extra={"trt_max_workspace_size": 1 << 30,
                                                                    "trt_cuda_graph_enable": True})
    assert fp32["trt_fp16_enable"] == "False" and "trt_engine_cache_path" not in fp32
    assert fp32["trt_max_workspace_size"] == str(1 << 30) and fp32["trt_cuda_graph_enable"] == "True"
    assert tensorrt_provider_options(spec, precision="fp32", fp16=True)["trt_fp16_enable"] == "True"


def test_profile_opt_shape_is_clamped_and_rounded_to_the_stride():
    spec = InputSpec(batch=(1, 16), height=(64, 256), width=(64, 256), multiple_of=16)
    shapes = profile_shapes(spec, opt_batch=100, opt_height=200, opt_width=10)
    assert shapes["opt"] == "pixel_values:16x3x192x64"


# -- input checks (before the backend) ---------------------------------------------------------
def test_close_releases_the_session(onnx_path):
    rt = OrtRuntime(onnx_path)
    rt.close()
    assert rt.providers == [] and rt.session is None  # the rest of the close contract: test_runtime_contract.py


# -- runtimes.load ------------------------------------------------------------------------------

def test_load_picks_the_runtime_from_the_path(onnx_path):
    assert runtimes.runtime_kind("a/model.onnx") == "onnxruntime"
    assert runtimes.runtime_kind("model.ENGINE") == runtimes.runtime_kind("model.plan") == "tensorrt"
    assert runtimes.runtime_kind("checkpoint.safetensors") == runtimes.runtime_kind("vit_base_patch16_224") == "torch"
    with runtimes.load(onnx_path, intra_op_threads=1) as rt:
        assert isinstance(rt, OrtRuntime)
        assert rt(pixels(1, 32, 32)).shape == (1, 10)


def test_runtimes_work_without_torch(onnx_path, tiny, tmp_path):
    """numpy + onnxruntime + Pillow only: importing torch is made impossible in a fresh interpreter."""
    from vitdeploy.preprocessing import bundled_images, preprocess

    config, model = tiny
    metadata = make_metadata(config)
    image = bundled_images()[0]
    expected = eager(model, preprocess(image, metadata.preprocessing)[None])
    script = f"""
        import numpy as np
        import vitdeploy.runtimes
        assert "onnxruntime" not in sys.modules, "vitdeploy.runtimes imported onnxruntime eagerly"
        from vitdeploy.preprocessing import preprocess
        runtime = vitdeploy.runtimes.load({str(onnx_path)!r})
        pixels = preprocess({str(image)!r}, runtime.metadata.preprocessing)[None]
        np.save({str(tmp_path / "logits.npy")!r}, runtime(pixels))
        assert "torch" not in sys.modules
    """
    done = run_without_torch(script)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=1e-4)
