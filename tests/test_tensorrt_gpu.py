"""Real TensorRT: export → build → run → parity with the eager model (fp32 and fp16, three shapes).

Marked ``gpu``: these run only where ``import tensorrt`` works and a CUDA device is visible
(``benchmarks/gpu_check.sh`` runs them all); anywhere else every test is skipped with the
reason. Nothing here uses the test double.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from conftest import make_model, tiny_config
from trt_artifacts import SHAPE_RANGE

from vitdeploy.parity import Tolerance, compare_logits, tolerance_for

SHAPES = [(1, 3, 32, 32), (4, 3, 48, 64), (8, 3, 64, 64)]


def _unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as error:  # ImportError, or OSError when libnvinfer is missing
        return f"TensorRT is not importable here ({error})"
    from vitdeploy.runtimes.tensorrt import TensorRTUnavailable, cuda_device_info

    try:
        cuda_device_info(0)
    except TensorRTUnavailable as error:
        return str(error)
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a CUDA GPU: {REASON}")]

# TensorRT picks its own kernels and summation order. fp32 engines are built with --no-tf32 (full fp32
# matmuls); TF32 (TensorRT's default) is checked against a looser bound. fp16 uses the project's
# fp16-vs-fp32 tolerance.
TRT_FP32 = Tolerance("tensorrt_fp32", max_rel_error=1e-3, min_cosine=0.99999, min_top1=1.0)
TRT_TF32 = Tolerance("tensorrt_tf32", max_rel_error=1e-2, min_cosine=0.9999)


def inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return make_model(tiny_config())


@pytest.fixture(scope="module")
def eager(model):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx

    folder = tmp_path_factory.mktemp("trt-gpu")
    paths = {}
    for precision in ("fp32", "fp16"):
        options = ExportOptions(batch=SHAPE_RANGE.batch, height=SHAPE_RANGE.height, width=SHAPE_RANGE.width,
                                precision=precision)
        paths[precision] = export_onnx(model, folder / f"tiny_{precision}.onnx", options).path
    return paths


def build(onnx_path, engine_path, **kwargs):
    from vitdeploy.exporters.tensorrt_build import run_build
    from vitdeploy.exporters.trt_plan import BuildOptions, plan_build

    profile_specs = kwargs.pop("profile_specs", ())
    plan = plan_build(onnx_path, engine_path, options=BuildOptions(**kwargs), profile_specs=list(profile_specs))
    return plan, run_build(plan, show_progress=False)


@pytest.fixture(scope="module")
def engines(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    return {
        "fp32": build(exported["fp32"], folder / "fp32.engine", tf32=False, timing_cache=str(folder / "cache.bin")),
        "fp16": build(exported["fp16"], folder / "fp16.engine", timing_cache=str(folder / "cache.bin")),
    }


def check(tolerance: Tolerance, reference: np.ndarray, candidate: np.ndarray) -> None:
    failures = tolerance.check(compare_logits(reference, candidate))
    assert failures == [], failures


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_eager(engines, eager, precision, shape) -> None:
    from vitdeploy.runtimes import load

    plan, _ = engines[precision]
    x = inputs(shape)
    with load(plan.engine_path) as runtime:
        out = runtime(x)
    assert out.shape == (shape[0], 10) and out.dtype == np.float32
    check(TRT_FP32 if precision == "fp32" else tolerance_for("fp16", against_fp32=True), eager(x), out)


def test_manifest_describes_this_machine(engines, exported) -> None:
    import tensorrt as trt

    from vitdeploy.engine_manifest import EngineManifest
    from vitdeploy.runtimes.tensorrt import cuda_device_info

    plan, manifest = engines["fp16"]
    on_disk = EngineManifest.read(plan.manifest_path)
    assert on_disk == manifest
    assert manifest.tensorrt_version == trt.__version__ and manifest.gpu == cuda_device_info(0)
    assert manifest.precision == "fp16" and not manifest.converted_to_fp16
    assert manifest.engine_sha256 == hashlib.sha256(plan.engine_path.read_bytes()).hexdigest()
    assert manifest.onnx_sha256 == hashlib.sha256(exported["fp16"].read_bytes()).hexdigest()
    assert [t.dtype for t in manifest.inputs + manifest.outputs] == ["float32", "float32"]  # IO kept fp32
    assert plan.options.timing_cache and (plan.engine_path.parent / "cache.bin").stat().st_size > 0


def test_fp16_engine_from_fp32_graph_converts_first(exported, eager, tmp_path) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, manifest = build(exported["fp32"], tmp_path / "converted.engine", precision="fp16")
    assert manifest.converted_to_fp16 and manifest.precision == "fp16"
    x = inputs((4, 3, 48, 64), seed=1)
    with TensorRTRuntime(plan.engine_path) as runtime:
        check(tolerance_for("fp16", against_fp32=True), eager(x), runtime(x))


def test_tf32_default_is_close_too(exported, eager, tmp_path) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = build(exported["fp32"], tmp_path / "tf32.engine")
    x = inputs((8, 3, 64, 64), seed=2)
    with TensorRTRuntime(plan.engine_path) as runtime:
        check(TRT_TF32, eager(x), runtime(x))


def test_resolution_buckets_and_profile_switching(exported, eager, tmp_path) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, manifest = build(exported["fp32"], tmp_path / "buckets.engine", tf32=False,
                           profile_specs=["res=16:32:32", "batch=1:2:4,res=48:64:64"])
    assert len(manifest.profiles) == 2
    with TensorRTRuntime(plan.engine_path) as runtime:
        for shape in [(2, 3, 32, 32), (4, 3, 64, 48), (1, 3, 16, 24), (3, 3, 48, 48)]:
            x = inputs(shape, seed=sum(shape))
            check(TRT_FP32, eager(x), runtime(x))
        with pytest.raises(ValueError, match="fits none"):
            runtime(inputs((1, 3, 40, 40)))


def test_cuda_graphs_match_plain_execution(engines) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = engines["fp16"]
    with TensorRTRuntime(plan.engine_path) as plain, TensorRTRuntime(plan.engine_path, cuda_graphs=True) as graphed:
        for seed, shape in enumerate(SHAPES * 2):
            x = inputs(shape, seed=seed)
            np.testing.assert_allclose(graphed(x), plain(x), rtol=1e-3, atol=1e-3)  # same engine, same kernels


def test_device_pointer_in_device_buffer_out(engines, eager) -> None:
    from vitdeploy.runtimes.tensorrt import CudaApi, CudaBuffer, TensorRTRuntime, import_cudart

    plan, _ = engines["fp32"]
    cuda = CudaApi(import_cudart())
    x = inputs((4, 3, 48, 64), seed=3)
    source = cuda.malloc(x.nbytes)
    try:
        cuda.check(cuda.rt.cudaMemcpy(source, x.ctypes.data, x.nbytes, cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice),
                   "cudaMemcpy")
        with TensorRTRuntime(plan.engine_path) as runtime:
            out = runtime.run_device(source, shape=x.shape)
            assert isinstance(out, CudaBuffer)
            check(TRT_FP32, eager(x), out.to_host())
            out.free()
    finally:
        cuda.free(source)


def test_torch_cuda_tensor_in_and_out(engines, eager) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA; device-tensor interop needs a CUDA torch")
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = engines["fp32"]
    x = inputs((2, 3, 64, 64), seed=4)
    with TensorRTRuntime(plan.engine_path) as runtime:
        out = runtime(torch.from_numpy(x).cuda())  # DLPack / __cuda_array_interface__
        logits = torch.as_tensor(out, device="cuda")
        check(TRT_FP32, eager(x), logits.cpu().numpy())


def test_threads_share_one_runtime(engines, eager) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = engines["fp32"]
    errors: list[BaseException] = []
    with TensorRTRuntime(plan.engine_path) as runtime:
        def worker(seed: int) -> None:
            try:
                for step in range(5):
                    x = inputs(SHAPES[(seed + step) % 3], seed=seed * 10 + step)
                    check(TRT_FP32, eager(x), runtime(x))
            except BaseException as error:  # reported on the main thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


def test_tampered_engine_is_refused(engines, tmp_path) -> None:
    import shutil

    from vitdeploy.engine_manifest import EngineMismatchError
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = engines["fp32"]
    engine = tmp_path / "copy.engine"
    shutil.copy(plan.engine_path, engine)
    shutil.copy(plan.manifest_path, tmp_path / "copy.engine.json")
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(EngineMismatchError, match="sha256"):
        TensorRTRuntime(engine)


def test_real_variant_fp16_at_native_size(tmp_path) -> None:
    """vit_tiny_patch16_224 (random weights): the real depth and width, fp16 engine vs fp32 eager."""
    import torch

    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.model import create_model
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224")
    onnx_path = export_onnx(model, tmp_path / "vit_tiny.onnx",
                            ExportOptions(batch=(1, 16), height=(112, 448), width=(112, 448), precision="fp16",
                                          validation_max_batch=16)).path  # the profile below reaches batch 16
    plan, _ = build(onnx_path, tmp_path / "vit_tiny.engine", profile_specs=["batch=1:8:16,res=224"])
    x = inputs((8, 3, 224, 224), seed=5)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    with TensorRTRuntime(plan.engine_path) as runtime:
        check(tolerance_for("fp16", against_fp32=True), reference, runtime(x))


def test_cuda_graphs_across_two_profiles(exported, tmp_path) -> None:
    """Issue 13, finding 3: each cached graph has its own context; switching profiles must not corrupt replays."""
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = build(exported["fp32"], tmp_path / "two.engine", tf32=False,
                    profile_specs=["res=16:32:32", "batch=1:2:4,res=48:64:64"])
    with TensorRTRuntime(plan.engine_path) as plain, TensorRTRuntime(plan.engine_path, cuda_graphs=True) as graphed:
        for seed, shape in enumerate([(2, 3, 32, 32), (1, 3, 64, 64), (2, 3, 32, 32), (1, 3, 64, 64)] * 2):
            x = inputs(shape, seed=seed)
            np.testing.assert_allclose(graphed(x), plain(x), rtol=1e-4, atol=1e-4)
        assert graphed.cuda_graphs, "capture fell back to plain execution"


def test_layer_list_and_attention_fusion_are_recorded(engines) -> None:
    from vitdeploy.engine_manifest import parse_layer_information

    plan, manifest = engines["fp16"]
    assert plan.layers_path.is_file() and manifest.attention is not None
    layers = parse_layer_information(plan.layers_path.read_text())
    assert len(layers) == manifest.attention["layers"] > 0
    print("attention fused:", manifest.attention["summary"])  # the evidence the first GPU run reports


def test_softmax_fp16_engine_parity(exported, eager, tmp_path) -> None:
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, manifest = build(exported["fp16"], tmp_path / "softmax16.engine", softmax="fp16")
    assert manifest.transforms[-1]["name"] == "softmax_fp16" and manifest.transforms[-1]["parity"]["passed"]
    print("attention fused with --softmax fp16:", manifest.attention and manifest.attention["summary"])
    x = inputs((4, 3, 48, 64), seed=7)
    with TensorRTRuntime(plan.engine_path) as runtime:
        check(tolerance_for("fp16", against_fp32=True), eager(x), runtime(x))


def test_unaligned_torch_slice_is_staged(engines, eager) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    from vitdeploy.runtimes.tensorrt import TensorRTRuntime

    plan, _ = engines["fp32"]
    x = inputs((3, 3, 32, 32), seed=8)
    flat = torch.zeros(x.size + 1, device="cuda")
    flat[1:] = torch.from_numpy(x.reshape(-1)).cuda()
    sliced = flat[1:].view(x.shape)  # 4 bytes past the allocation: not 256-byte aligned
    with TensorRTRuntime(plan.engine_path) as runtime:
        out = runtime(sliced)
        check(TRT_FP32, eager(x), out.to_host())
