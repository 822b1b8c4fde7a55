"""One test per TensorRT/CUDA rule of issue 13, against the stricter TEST DOUBLE (tests/trt_double.py).

Each of these failed on the code before issue 13 (checked by running this file against that
code): graphs replayed after their context changed, builds on GPU 0 whatever ``--device`` said,
unaligned pointers ending in "set_tensor_address failed", a rejected profile ignored, a failed
capture leaking its graph, one logger per object, ``run_device`` ignoring ``cuda_graphs``, no
int8/fp8 engines, no word on attention fusion. Nothing here runs TensorRT.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import onnx
import pytest
from trt_artifacts import load_tiny, tiny_onnx, with_qdq
from trt_double import Doubles

from vitdeploy.engine_manifest import (
    EngineManifest,
    OptimizationProfile,
    attention_fusion,
    parse_layer_information,
)
from vitdeploy.exporters import tensorrt_build
from vitdeploy.exporters.trt_plan import BuildOptions, BuildPlan, plan_build, read_onnx_info
from vitdeploy.runtimes.tensorrt import TensorRTRuntime
from vitdeploy.tensorrt_env import TensorRTUnavailable, preload_tensorrt_libraries

GPUS = [("Fake GPU A (test double)", 8, 9), ("Fake GPU B (test double)", 9, 0)]


def expected(x: np.ndarray, classes: int = 10) -> np.ndarray:
    return (x.astype(np.float64).mean(axis=(1, 2, 3))[:, None] * np.arange(1, classes + 1)).astype(np.float32)


class DeviceArray:
    """Host memory at a chosen offset from a 256-byte boundary, shown as a CUDA array (the double's device memory is host)."""

    def __init__(self, shape: tuple[int, ...], offset: int = 0, fill: np.ndarray | None = None) -> None:
        nbytes = int(np.prod(shape)) * 4
        self._raw = np.zeros(nbytes + 512, np.uint8)
        start = (-self._raw.ctypes.data) % 256 + offset
        self.array = self._raw[start:start + nbytes].view(np.float32).reshape(shape)
        if fill is not None:
            self.array[...] = fill
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "version": 3, "strides": None,
                                         "data": (self.array.ctypes.data, False), "stream": None}


@pytest.fixture(scope="module", autouse=True)
def exported() -> None:
    tiny_onnx()  # export (torch) before the doubles stand in for tensorrt
    tiny_onnx("fp16")


@pytest.fixture
def doubles(monkeypatch) -> Doubles:
    return Doubles(gpus=GPUS).install(monkeypatch)


def two_profile_engine(tmp_path, device: int = 0):
    plan = plan_build(tiny_onnx(), tmp_path / "two.engine", profile_specs=["res=16:32:32", "batch=1:2:4,res=48:64:64"])
    tensorrt_build.run_build(plan, show_progress=False, device=device)
    return plan.engine_path


# 3. CUDA graphs replayed after the context changed ---------------------------------------------

def test_cuda_graphs_stay_valid_across_profile_switches(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path), cuda_graphs=True)
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 32, 32), (1, 3, 64, 64), (2, 3, 32, 32), (1, 3, 64, 64), (2, 3, 16, 24), (2, 3, 32, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)  # the double raises on an invalid replay
    assert doubles.violations == []
    names = doubles.names()
    assert names.count("cudaStreamBeginCapture") == 3 and names.count("cudaGraphLaunch") == 6
    # one context per cached graph (plus the main one), each on the shared USER_MANAGED scratch buffer
    contexts = [args for name, args in doubles.calls if name == "ICudaEngine.create_execution_context"]
    assert len(contexts) == 4 and {a[0].name for a in contexts} == {"USER_MANAGED"}
    memory = {args for name, args in doubles.calls if name == "IExecutionContext.set_device_memory"}
    assert len(memory) == 1  # every context got the same (pointer, size)
    runtime.close()
    assert doubles.memory == {} and doubles.live_graphs == set()


def test_capture_right_after_a_shape_change_is_refused_by_the_double(doubles, tmp_path) -> None:
    """The double's own rule: a capture without the warm-up enqueue is invalidated (CUDA returns a NULL graph)."""
    runtime = TensorRTRuntime(two_profile_engine(tmp_path), cuda_graphs=True)
    binding_type = type(runtime._main)
    binding = binding_type(runtime._new_context())
    runtime._bind(binding, 0, (1, 3, 32, 32), runtime._own_addresses())
    with pytest.raises(Exception, match="cudaErrorStreamCaptureInvalidated"):
        runtime._cuda.capture(runtime._stream, lambda: binding.context.execute_async_v3(runtime.stream_handle))
    assert doubles.live_graphs == set()
    runtime.close()


# 4. the build device is selected, in the worker thread too ---------------------------------------

def test_build_runs_on_the_requested_device(doubles, tmp_path) -> None:
    plan = plan_build(tiny_onnx(), tmp_path / "d1.engine")
    manifest = tensorrt_build.run_build(plan, show_progress=False, device=1)
    engine = plan.engine_path.read_bytes()
    assert b'"device": 1' in engine  # the double records the current device of the building thread
    assert manifest.gpu.name == "Fake GPU B (test double)" and manifest.gpu.compute_capability == "9.0"
    assert doubles.current_device() == 0  # the caller's thread is left on its own device
    assert not [m for m in doubles.messages if "device" in m[1]]


def test_runtime_on_device_1_from_other_threads(doubles, tmp_path) -> None:
    engine = two_profile_engine(tmp_path, device=1)
    runtime = TensorRTRuntime(engine, device=1)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            x = np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)
            np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)  # a new thread starts on device 0
            assert doubles.current_device() == 0  # and is left there
        except BaseException as error:  # reported on the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and doubles.current_device() == 0
    runtime.close()


# 5. 256-byte alignment ----------------------------------------------------------------------------

def test_unaligned_device_pointers_are_staged(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path))
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    source = DeviceArray(x.shape, offset=4, fill=x)  # like a sliced tensor or a DLPack byte_offset
    target = DeviceArray((2, 10), offset=16)
    assert runtime.run_device(source, out=target) is target
    np.testing.assert_allclose(target.array, expected(x), rtol=1e-6)
    copies = [args[0].name for name, args in doubles.calls if name == "cudaMemcpyAsync"]
    assert copies.count("cudaMemcpyDeviceToDevice") == 2  # staged in and out
    aligned, out = DeviceArray(x.shape, fill=x), DeviceArray((2, 10))
    doubles.calls.clear()
    runtime.run_device(aligned, out=out)
    assert "cudaMemcpyAsync" not in doubles.names()  # aligned pointers are bound directly
    np.testing.assert_allclose(out.array, expected(x), rtol=1e-6)
    with pytest.raises(ValueError, match="not 256-byte aligned"):
        runtime.device_call(source, DeviceArray((2, 10)))
    runtime.close()


# 6. profile failures, capture leaks, one logger, run_device with graphs ---------------------------

def test_a_rejected_optimization_profile_is_a_build_error(doubles, tmp_path) -> None:
    info = read_onnx_info(tiny_onnx())
    bad = OptimizationProfile("pixel_values", (1, 4, 32, 32), (1, 4, 32, 32), (2, 4, 32, 32))  # 4 channels, not 3
    plan = BuildPlan(info, tmp_path / "bad.engine", [bad], BuildOptions())
    with pytest.raises(tensorrt_build.BuildError, match=r"TensorRT rejected optimization profile 0 .*1x4x32x32"):
        tensorrt_build.run_build(plan, show_progress=False)
    assert "Builder.build_serialized_network" not in doubles.names() and not plan.engine_path.exists()


def test_a_failed_capture_destroys_its_graph(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path), cuda_graphs=True)
    doubles.fail_execute_in_capture = True
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="execute_async_v3 failed during CUDA graph capture"):
        np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)
    assert doubles.live_graphs == set() and runtime.cuda_graphs is False
    runtime.close()


def test_one_logger_for_builder_parser_and_runtime(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path))
    runtime.close()
    TensorRTRuntime(tmp_path / "two.engine").close()
    assert len(doubles.loggers) == 1
    assert not [text for _, text in doubles.messages if "differs from one already provided" in text]


def test_run_device_uses_cuda_graphs(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path), cuda_graphs=True)
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    for _ in range(2):
        out = runtime.run_device(DeviceArray(x.shape, fill=x))
        np.testing.assert_allclose(out.to_host(), expected(x), rtol=1e-6)
        out.free()
    assert doubles.names().count("cudaStreamBeginCapture") == 1 and doubles.names().count("cudaGraphLaunch") == 2
    assert doubles.violations == []
    runtime.close()


def test_device_call_enqueues_without_synchronising(doubles, tmp_path) -> None:
    runtime = TensorRTRuntime(two_profile_engine(tmp_path), cuda_graphs=True)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    source, target = DeviceArray(x.shape, fill=x), DeviceArray((2, 10))
    call = runtime.device_call(source, target)
    doubles.calls.clear()
    call()
    assert doubles.names() == ["cudaGraphLaunch"] and call.stream_handle == runtime.stream_handle
    np.testing.assert_allclose(target.array, expected(x), rtol=1e-6)
    runtime(np.zeros((1, 3, 64, 64), np.float32))  # other calls leave the call's own context alone
    call()
    assert doubles.violations == []
    runtime.close()


# int8 / fp8 Q/DQ graphs, strongly typed ------------------------------------------------------------

@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_graphs_build_strongly_typed(doubles, tmp_path, precision) -> None:
    path = tmp_path / f"tiny_{precision}.onnx"
    onnx.save(with_qdq(load_tiny(), precision), str(path))
    plan = plan_build(path, tmp_path / f"{precision}.engine")
    assert plan.precision == precision and not plan.rewrites_graph
    manifest = tensorrt_build.run_build(plan, show_progress=False)
    assert manifest.precision == precision
    assert EngineManifest.read(plan.manifest_path).precision == precision
    flags = [args[0].name for name, args in doubles.calls if name == "IBuilderConfig.set_flag"]
    assert not {"FP16", "INT8", "FP8", "BF16"} & set(flags)
    with pytest.raises(ValueError, match=f"is a {precision} graph .* a fp16 engine cannot be built"):
        plan_build(path, options=BuildOptions(precision="fp16"))


def test_fp8_needs_compute_capability_8_9(monkeypatch, tmp_path) -> None:
    doubles = Doubles(gpu=("Fake A100 (test double)", 8, 0)).install(monkeypatch)
    path = tmp_path / "tiny_fp8.onnx"
    onnx.save(with_qdq(load_tiny(), "fp8"), str(path))
    with pytest.raises(tensorrt_build.BuildError, match="fp8 .* needs compute capability 8.9 or newer.*has 8.0"):
        tensorrt_build.run_build(plan_build(path, tmp_path / "f.engine"), show_progress=False)
    assert "Builder" not in doubles.names()


def test_int8_engine_from_a_float_graph_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="a int8 engine cannot be built from it: quantize it first"):
        plan_build(tiny_onnx(), tmp_path / "q.engine", options=BuildOptions(precision="int8"))


def test_the_double_parser_rejects_asymmetric_quantization(doubles, tmp_path) -> None:
    path = tmp_path / "asym.onnx"
    onnx.save(with_qdq(load_tiny(), "int8", zero_point=3), str(path))
    with pytest.raises(tensorrt_build.BuildError, match="symmetric quantization"):
        tensorrt_build.run_build(plan_build(path, tmp_path / "a.engine"), show_progress=False)


# 8. attention fusion from the engine inspector ------------------------------------------------------

def test_fp16_build_reports_unfused_attention_and_warns(doubles, tmp_path) -> None:
    messages: list[str] = []
    plan = plan_build(tiny_onnx("fp16"), tmp_path / "h.engine")
    manifest = tensorrt_build.run_build(plan, show_progress=False, log=messages.append)
    assert manifest.attention["fused"] is False and manifest.attention["softmax_layers"] == 2  # depth 2
    assert any("did not fuse attention" in m and "--softmax fp16" in m for m in messages)
    layers = parse_layer_information(plan.layers_path.read_text())
    assert manifest.layers_file == plan.layers_path.name and len(layers) == manifest.attention["layers"]


def test_softmax_fp16_is_parity_checked_and_fuses(doubles, tmp_path) -> None:
    messages: list[str] = []
    plan = plan_build(tiny_onnx("fp16"), tmp_path / "s.engine", options=BuildOptions(softmax="fp16"))
    manifest = tensorrt_build.run_build(plan, show_progress=False, log=messages.append)
    transform = next(t for t in manifest.transforms if t["name"] == "softmax_fp16")
    assert transform["parity"]["passed"] and transform["fp32_softmax_left"] == 0
    assert transform["parity"]["worst"]["rel_max_error"] <= 2e-2  # the project's fp16 tolerance
    assert manifest.attention["fused"] is True and manifest.attention["fused_attention_layers"] == 2
    assert "Softmax" not in manifest.metadata["fp32_ops"]
    assert not any("did not fuse" in m for m in messages)
    parsed = dict(doubles.calls)["OnnxParser.parse_from_file"][0]
    assert parsed.endswith(".fp16-softmax.onnx")  # a scratch copy; the exported file is untouched


def test_softmax_fp16_from_an_fp32_graph_converts_without_the_island(doubles, tmp_path) -> None:
    plan = plan_build(tiny_onnx(), tmp_path / "c.engine", options=BuildOptions(precision="fp16", softmax="fp16"))
    manifest = tensorrt_build.run_build(plan, show_progress=False)
    assert [t["name"] for t in manifest.transforms] == ["fp16", "softmax_fp16"]
    assert manifest.transforms[1]["parity"]["tolerance"]["name"] == "fp16_vs_fp32"
    assert manifest.attention["fused"] is True


def test_attention_fusion_reads_real_layer_formats() -> None:
    detailed = parse_layer_information(
        '{"Layers": [{"Name": "_gemm_mha_v2_myl3_12", "LayerType": "kgen", "TacticName": ""},'
        ' {"Name": "/blocks.0/attn/MatMul", "LayerType": "gemm", "TacticName": "sm90_xmma_gemm_f16f16"},'
        ' {"Name": "/blocks.0/attn/Softmax", "LayerType": "Softmax", "TacticName": ""}]}')
    report = attention_fusion(detailed, expected=12)
    assert report.fused is True and report.fused_attention_layers == 1 and report.softmax_layers == 1
    assert "_gemm_mha_v2_myl3_12" in report.evidence[0]
    unfused = attention_fusion(parse_layer_information(
        '{"Layers": [{"Name": "[MATRIX_MULTIPLY]_[scaled_dot_product_attention]_matmul", "LayerType": "gemm", '
        '"TacticName": "sm80_xmma_gemm_f16f16_f16f16_f16_nn_n"}]}'))
    assert unfused.fused is False  # "attention" in a node name is not a fused kernel
    names_only = attention_fusion(parse_layer_information('{"Layers": ["a", "b"]}'))
    assert names_only.fused is None and "rebuild with detailed" in names_only.describe()


# 2. onnxruntime's TensorRT EP needs pip's libnvinfer loaded ---------------------------------------

def test_tensorrt_ep_preload_says_what_to_set(doubles) -> None:
    with pytest.raises(TensorRTUnavailable, match=r"did not load libnvinfer.so.10, libnvonnxparser.so.10.*LD_LIBRARY_PATH="
                                                  r".*tensorrt_libs"):
        preload_tensorrt_libraries()  # the double loads no library
    doubles.trt.__version__ = "11.4.0.106"
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 11.4.0.106 .* links libnvinfer.so.10"):
        preload_tensorrt_libraries()


def test_ort_tensorrt_provider_preloads_before_the_session(doubles, monkeypatch) -> None:
    import onnxruntime

    from vitdeploy.runtimes.onnxruntime import OrtRuntime

    # onnxruntime-gpu cannot be installed here: only its provider list is stood in for.
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    created = []
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: created.append(a))
    with pytest.raises(ValueError, match="provider 'tensorrt': `import tensorrt` did not load libnvinfer.so.10"):
        OrtRuntime(tiny_onnx(), provider="tensorrt")
    assert created == []  # refused before onnxruntime tried (and failed) to dlopen the provider


def test_loaded_library_lookup_finds_real_libraries() -> None:
    from vitdeploy.tensorrt_env import _loaded_libraries

    ctypes.CDLL("libm.so.6")
    assert any(path.endswith("libm.so.6") for path in _loaded_libraries("libm.so.6"))
