"""``TensorRTRuntime`` against the TensorRT/cuda-python TEST DOUBLE (tests/trt_double.py).

The double's "engine" computes ``logits[n, k] = mean(x[n]) * (k + 1)``, so these tests check the
runtime's own logic — manifest checks, profile selection and switching, buffer sizing, copies in
and out, CUDA-graph caching, device inputs, locking, cleanup — not TensorRT numerics (those are
in test_tensorrt_gpu.py, run on a GPU).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from trt_artifacts import tiny_onnx
from trt_double import Doubles

from vitdeploy import runtimes
from vitdeploy.engine_manifest import EngineMismatchError
from vitdeploy.exporters import tensorrt_build
from vitdeploy.exporters.trt_plan import BuildOptions, plan_build
from vitdeploy.runtimes.tensorrt import CudaBuffer, DeviceTensor, TensorRTRuntime, TensorRTUnavailable


def expected(x: np.ndarray, classes: int = 10) -> np.ndarray:
    return (x.astype(np.float64).mean(axis=(1, 2, 3))[:, None] * np.arange(1, classes + 1)).astype(np.float32)


class HostArrayAsCuda:
    """Host memory presented through ``__cuda_array_interface__``: in the double, device memory is host memory."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str, "version": 3,
                                         "data": (array.ctypes.data, False), "strides": None, "stream": None}


@pytest.fixture(scope="module", autouse=True)
def exported() -> None:
    tiny_onnx()  # export (torch) before the doubles stand in for tensorrt


@pytest.fixture
def doubles(monkeypatch) -> Doubles:
    return Doubles().install(monkeypatch)


@pytest.fixture
def engine(doubles, tmp_path):
    """An engine "built" by the double with two resolution buckets (16..32 and 48..64)."""
    plan = plan_build(tiny_onnx(), tmp_path / "tiny.engine", profile_specs=["res=16:32:32", "batch=1:2:4,res=48:64:64"])
    tensorrt_build.run_build(plan, show_progress=False)
    doubles.calls.clear()
    return plan.engine_path


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (3, 3, 16, 24), (4, 3, 64, 48)])
def test_results_at_three_shapes(engine, shape) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with runtimes.load(engine) as runtime:
        assert isinstance(runtime, TensorRTRuntime)
        np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)


def test_spec_profiles_and_metadata(engine) -> None:
    with TensorRTRuntime(engine) as runtime:
        spec = runtime.input_spec
        assert (spec.name, spec.dtype, spec.channels, spec.multiple_of) == ("pixel_values", "float32", 3, 8)
        assert (spec.batch, spec.height, spec.width) == ((1, 8), (16, 64), (16, 64))
        assert len(runtime.profiles) == 2 and runtime.metadata.num_classes == 10
        assert runtime.environment.gpu.compute_capability == "8.9"


def test_buffers_are_sized_once_for_the_largest_profile(engine, doubles) -> None:
    runtime = TensorRTRuntime(engine)
    sizes = sorted(buffer.nbytes for buffer in runtime._buffers.values())
    # logits at the largest batch (8, profile 0); pixel_values at the largest volume (4x3x64x64 > 8x3x32x32, profile 1)
    assert sizes == [8 * 10 * 4, 4 * 3 * 64 * 64 * 4]
    before = len(doubles.memory)
    runtime(np.zeros((2, 3, 32, 32), np.float32))
    runtime(np.zeros((1, 3, 64, 64), np.float32))
    assert len(doubles.memory) == before  # no allocation per call
    runtime.close()
    runtime.close()  # harmless twice
    assert doubles.memory == {}  # every device and pinned buffer freed
    with pytest.raises(RuntimeError, match="is closed"):
        runtime(np.zeros((1, 3, 32, 32), np.float32))


def test_profile_switching_follows_the_input(engine, doubles) -> None:
    runtime = TensorRTRuntime(engine)
    doubles.calls.clear()
    runtime(np.ones((1, 3, 32, 32), np.float32))
    runtime(np.ones((1, 3, 32, 32), np.float32))
    runtime(np.ones((1, 3, 64, 64), np.float32))
    switches = [args[0] for name, args in doubles.calls if name == "IExecutionContext.set_optimization_profile_async"]
    assert switches == [0, 1]  # allocation left profile 1 active; then 0 for 32x32, 1 for 64x64, once each
    # the documented per-call sequence: copy in, profile switch only when needed, shape, addresses again (a switch
    # invalidates the bindings), enqueue, copy out, one sync
    assert doubles.names()[-8:] == [
        "cudaMemcpyAsync", "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_input_shape",
        "IExecutionContext.set_tensor_address", "IExecutionContext.set_tensor_address",
        "IExecutionContext.execute_async_v3", "cudaMemcpyAsync", "cudaStreamSynchronize",
    ]
    kinds = [args[0].name for name, args in doubles.calls[-8:] if name == "cudaMemcpyAsync"]
    assert kinds == ["cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"]
    doubles.calls.clear()
    runtime(np.ones((1, 3, 64, 64), np.float32))  # same profile and shape: nothing is bound again
    assert [n for n in doubles.names() if n.startswith("IExecutionContext")] == ["IExecutionContext.execute_async_v3"]


def test_input_checks_against_spec_and_profiles(engine) -> None:
    runtime = TensorRTRuntime(engine)
    with pytest.raises(ValueError, match="height 20 is not a multiple of the patch stride 8"):
        runtime(np.zeros((1, 3, 20, 32), np.float32))
    with pytest.raises(ValueError, match="must have dtype float32, got float64"):
        runtime(np.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="batch size 9 is outside the validated range 1..8"):
        runtime(np.zeros((9, 3, 32, 32), np.float32))
    # inside the envelope, between the buckets: no profile holds 40x40
    with pytest.raises(ValueError, match="1x3x40x40 fits none of the engine's optimization profiles"):
        runtime(np.zeros((1, 3, 40, 40), np.float32))
    with pytest.raises(ValueError, match="fits none"):
        runtime(np.zeros((8, 3, 64, 64), np.float32))  # the 64x64 bucket stops at batch 4
    runtime.check_finite = True
    bad = np.zeros((1, 3, 32, 32), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or Inf"):
        runtime(bad)


def test_cuda_graphs_are_captured_once_per_shape(engine, doubles) -> None:
    runtime = TensorRTRuntime(engine, cuda_graphs=True)
    rng = np.random.default_rng(1)
    doubles.calls.clear()
    for shape in [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 64, 64), (2, 3, 32, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)  # replays see the new input
    names = doubles.names()
    assert names.count("cudaStreamBeginCapture") == 2 and names.count("cudaGraphLaunch") == 4
    first = names.index("cudaStreamBeginCapture")
    assert names[first - 2:first] == ["IExecutionContext.execute_async_v3", "cudaStreamSynchronize"]  # warm-up first
    runtime.close()
    assert doubles.memory == {}


def test_failed_capture_falls_back_to_plain_execution(engine, doubles) -> None:
    doubles.fail_capture = True
    runtime = TensorRTRuntime(engine, cuda_graphs=True)
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="cudaErrorStreamCaptureInvalidated"):
        np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)
    assert runtime.cuda_graphs is False
    np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)
    assert doubles.names().count("cudaStreamBeginCapture") == 1


def test_device_inputs_return_device_outputs(engine) -> None:
    runtime = TensorRTRuntime(engine)
    x = np.random.default_rng(2).standard_normal((3, 3, 48, 64)).astype(np.float32)
    out = runtime(HostArrayAsCuda(x))
    assert isinstance(out, CudaBuffer) and out.shape == (3, 10)
    assert out.__cuda_array_interface__["typestr"] == "<f4"
    np.testing.assert_allclose(out.to_host(), expected(x), rtol=1e-6)
    target = np.zeros((3, 10), np.float32)
    assert runtime.run_device(x.ctypes.data, out=HostArrayAsCuda(target), shape=x.shape).array is target
    np.testing.assert_allclose(target, expected(x), rtol=1e-6)
    with pytest.raises(ValueError, match="out must be float32 of shape \\(3, 10\\)"):
        runtime.run_device(DeviceTensor(x.ctypes.data, x.shape, "float32"), out=HostArrayAsCuda(np.zeros((2, 10), np.float32)))
    with pytest.raises(ValueError, match="needs shape="):
        runtime.run_device(x.ctypes.data)
    with pytest.raises(ValueError, match="fits none"):
        runtime.run_device(DeviceTensor(x.ctypes.data, (1, 3, 40, 40), "float32"))
    with pytest.raises(ValueError, match="expected a numpy.ndarray or a CUDA array"):
        runtime([1, 2, 3])
    out.free()


def test_threads_share_one_runtime_safely(engine) -> None:
    runtime = TensorRTRuntime(engine)
    errors: list[BaseException] = []

    shapes = [(1, 3, 16, 16), (2, 3, 32, 24), (4, 3, 64, 64), (3, 3, 48, 56), (8, 3, 32, 32)]  # both profiles

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                x = rng.standard_normal(shapes[int(rng.integers(len(shapes)))]).astype(np.float32)
                np.testing.assert_allclose(runtime(x), expected(x), rtol=1e-6)
        except BaseException as error:  # collected for the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_stale_engine_is_refused(engine) -> None:
    engine.write_bytes(engine.read_bytes() + b" ")  # still a loadable plan, different bytes
    with pytest.raises(EngineMismatchError, match="sha256 .* does not match the manifest"):
        TensorRTRuntime(engine)
    with pytest.warns(UserWarning, match="loading anyway"):
        TensorRTRuntime(engine, force=True).close()


def test_foreign_tensorrt_or_gpu_is_refused(engine, doubles) -> None:
    doubles.trt.__version__ = "10.14.1.48"
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.13.0.35 but TensorRT 10.14.1.48 is installed"):
        TensorRTRuntime(engine)
    doubles.trt.__version__ = "10.13.0.35"
    doubles.gpu = ("NVIDIA H100 80GB HBM3", 9, 0)
    with pytest.raises(EngineMismatchError, match=r"compute capability 8.9 .* this GPU \(NVIDIA H100 80GB HBM3\) has 9.0"):
        TensorRTRuntime(engine)
    assert "Runtime.deserialize_cuda_engine" not in doubles.names()  # refused before deserializing


def test_version_compatible_engine_allows_host_code(doubles, tmp_path) -> None:
    plan = plan_build(tiny_onnx(), tmp_path / "vc.engine", options=BuildOptions(version_compatible=True))
    tensorrt_build.run_build(plan, show_progress=False)
    doubles.trt.__version__ = "10.15.0.1"  # newer TensorRT of the same major: allowed for VC engines
    runtime = TensorRTRuntime(plan.engine_path)
    assert dict(doubles.calls)["Runtime.deserialize_cuda_engine"] == (True,)  # engine_host_code_allowed
    runtime.close()


def test_manifest_is_required_unless_forced(engine, tmp_path) -> None:
    manifest = tmp_path / "tiny.engine.json"
    data = json.loads(manifest.read_text())
    manifest.unlink()
    with pytest.raises(FileNotFoundError, match="tiny.engine.json not found"):
        TensorRTRuntime(engine)
    with pytest.warns(UserWarning, match="without a manifest"):
        runtime = TensorRTRuntime(engine, force=True)
    assert [p.to_dict() for p in runtime.profiles] == data["profiles"]  # read from the engine itself
    assert runtime.input_spec.multiple_of == 1 and runtime.metadata is None
    x = np.ones((1, 3, 16, 16), np.float32)
    np.testing.assert_allclose(runtime(x), expected(x))


def test_manifest_profiles_must_match_the_engine(engine, tmp_path) -> None:
    manifest = tmp_path / "tiny.engine.json"
    data = json.loads(manifest.read_text())
    data["profiles"][0]["max"] = [8, 3, 40, 40]
    manifest.write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="optimization profiles .* differ from the manifest"):
        TensorRTRuntime(engine)


def test_missing_tensorrt_or_gpu(engine, monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed here"):
        TensorRTRuntime(engine)


def test_no_gpu_at_load(engine, doubles) -> None:
    doubles.device_count = 0
    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU is visible"):
        TensorRTRuntime(engine)
