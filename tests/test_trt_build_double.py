"""The build thin layer against the TensorRT TEST DOUBLE (tests/trt_double.py): documented calls, order, files.

These tests do not run TensorRT. They check that :mod:`vitdeploy.exporters.tensorrt_build` calls the
documented Python API in the documented order with the planned values, cancels on Ctrl-C, and
writes engine, manifest and timing cache atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading

import pytest
from trt_artifacts import load_tiny, tiny_onnx, with_unsupported_op
from trt_double import Doubles

from vitdeploy.engine_manifest import EngineManifest
from vitdeploy.exporters import tensorrt_build
from vitdeploy.exporters.trt_plan import BuildOptions, plan_build
from vitdeploy.exporters.trt_progress import BuildProgress

DOCUMENTED_ORDER = [
    "Logger", "Builder", "Builder.create_network", "OnnxParser", "OnnxParser.parse_from_file",
    "Builder.create_builder_config", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.builder_optimization_level",
    "IBuilderConfig.hardware_compatibility_level", "IBuilderConfig.set_flag", "IBuilderConfig.clear_flag",
    "IBuilderConfig.profiling_verbosity", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "Builder.create_optimization_profile", "IOptimizationProfile.set_shape",
    "IBuilderConfig.add_optimization_profile", "Builder.create_optimization_profile", "IOptimizationProfile.set_shape",
    "IBuilderConfig.add_optimization_profile", "IProgressMonitor.__init__", "IBuilderConfig.progress_monitor",
    "Builder.build_serialized_network", "ITimingCache.serialize",
    "Runtime", "Runtime.deserialize_cuda_engine", "ICudaEngine.create_engine_inspector",
    "IEngineInspector.get_engine_information",
]


def trt_calls(doubles: Doubles) -> list[str]:
    """The TensorRT calls in order (the CUDA runtime's calls left out)."""
    return [name for name in doubles.names() if not name.startswith("cuda")]


@pytest.fixture(autouse=True)
def exported() -> None:
    tiny_onnx()  # export (torch) before the doubles stand in for tensorrt


@pytest.fixture
def doubles(monkeypatch) -> Doubles:
    return Doubles().install(monkeypatch)


def full_plan(tmp_path, **option_overrides):
    options = dict(workspace=1 << 30, optimization_level=4, timing_cache=str(tmp_path / "timing.cache"),
                   hardware_compatibility="ampere+", version_compatible=True, tf32=False)
    options.update(option_overrides)
    return plan_build(tiny_onnx(), tmp_path / "tiny.engine", options=BuildOptions(**options),
                      profile_specs=["res=16:32:32", "res=48:64:64"])


def test_build_calls_the_documented_api_in_order(doubles, tmp_path) -> None:
    plan = full_plan(tmp_path)
    manifest = tensorrt_build.run_build(plan, show_progress=False)
    assert trt_calls(doubles) == DOCUMENTED_ORDER
    assert doubles.names()[0] == "cudaSetDevice"  # the device is selected before anything else
    calls = dict(doubles.calls)
    assert calls["Builder.create_network"] == (1 << 0,)  # STRONGLY_TYPED on TensorRT 10.x
    assert calls["OnnxParser.parse_from_file"] == (str(tiny_onnx()),)
    assert calls["IBuilderConfig.set_memory_pool_limit"] == (doubles.trt.MemoryPoolType.WORKSPACE, 1 << 30)
    assert calls["IBuilderConfig.builder_optimization_level"] == (4,)
    assert calls["IBuilderConfig.hardware_compatibility_level"] == (doubles.trt.HardwareCompatibilityLevel.AMPERE_PLUS,)
    assert calls["IBuilderConfig.set_flag"] == (doubles.trt.BuilderFlag.VERSION_COMPATIBLE,)
    assert calls["IBuilderConfig.clear_flag"] == (doubles.trt.BuilderFlag.TF32,)
    assert calls["IBuilderConfig.create_timing_cache"] == (b"",)  # no cache file yet: a new cache
    assert calls["IBuilderConfig.set_timing_cache"] == (False,)
    assert calls["IBuilderConfig.profiling_verbosity"] == (doubles.trt.ProfilingVerbosity.DETAILED,)
    assert calls["IEngineInspector.get_engine_information"] == (doubles.trt.LayerInformationFormat.JSON,)
    shapes = [args for name, args in doubles.calls if name == "IOptimizationProfile.set_shape"]
    assert shapes == [("pixel_values", p.min, p.opt, p.max) for p in plan.profiles]
    assert manifest.precision == "fp32" and manifest.tensorrt_version == "10.13.0.35"


def test_tensorrt_11_gets_no_strongly_typed_flag(monkeypatch, tmp_path) -> None:
    doubles = Doubles(version="11.4.0.106").install(monkeypatch)
    engine = tmp_path / "new folder" / "t.engine"  # created on the way
    tensorrt_build.run_build(plan_build(tiny_onnx(), engine), show_progress=False)
    assert engine.is_file() and engine.with_name("t.engine.json").is_file()
    assert dict(doubles.calls)["Builder.create_network"] == (0,)  # strongly typed is the only kind in 11.x
    names = doubles.names()
    assert "IBuilderConfig.set_flag" not in names and "IBuilderConfig.set_memory_pool_limit" not in names
    assert not hasattr(doubles.trt.BuilderFlag, "FP16")  # TensorRT 11 has no precision flags at all
    assert "IBuilderConfig.create_timing_cache" not in names and "ITimingCache.serialize" not in names


def test_engine_manifest_and_timing_cache_are_written(doubles, tmp_path) -> None:
    plan = full_plan(tmp_path)
    (tmp_path / "timing.cache").write_bytes(b"old")
    manifest = tensorrt_build.run_build(plan, show_progress=False)
    engine = (tmp_path / "tiny.engine").read_bytes()
    assert engine.startswith(b"DOUBLE-PLAN")
    assert (tmp_path / "timing.cache").read_bytes() == b"old+timed"  # loaded, then saved back
    assert dict(doubles.calls)["IBuilderConfig.create_timing_cache"] == (b"old",)
    on_disk = EngineManifest.read(tmp_path / "tiny.engine.json")
    assert on_disk == manifest
    assert manifest.engine_sha256 == hashlib.sha256(engine).hexdigest() and manifest.engine_bytes == len(engine)
    assert manifest.onnx_sha256 == hashlib.sha256(tiny_onnx().read_bytes()).hexdigest()
    assert manifest.gpu.name == "Fake GPU (test double)" and manifest.gpu.compute_capability == "8.9"
    assert manifest.profiles == plan.profiles
    assert [(t.name, t.dtype, t.mode) for t in manifest.inputs + manifest.outputs] == [
        ("pixel_values", "float32", "input"), ("logits", "float32", "output")]
    assert manifest.inputs[0].shape == (-1, 3, -1, -1)
    assert manifest.hardware_compatibility == "ampere+" and manifest.version_compatible
    assert manifest.build_options["workspace_bytes"] == 1 << 30 and manifest.build_options["strongly_typed"]
    assert manifest.artifact_metadata().stride == 8 and manifest.built_at.endswith("+00:00")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp files and the scratch folder are gone


def test_progress_monitor_feeds_the_progress_display(doubles, tmp_path) -> None:
    stream = io.StringIO()
    progress = BuildProgress(stream, interactive=False)
    tensorrt_build.build_serialized_engine(doubles.trt, plan_build(tiny_onnx(), tmp_path / "t.engine"), tiny_onnx(),
                                           progress=progress)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[tensorrt] Building engine (2 steps) ..."
    assert lines[1].startswith("[tensorrt] Building engine done in ") and len(lines) == 2


def test_cancel_event_stops_the_build_and_writes_nothing(doubles, tmp_path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(KeyboardInterrupt):
        tensorrt_build.run_build(plan_build(tiny_onnx(), tmp_path / "t.engine"), show_progress=False, cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_the_build_cancels_it(doubles, tmp_path) -> None:
    doubles.interrupt_main_at_step = 2  # the double delivers a KeyboardInterrupt to the main thread mid-build
    messages: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        tensorrt_build.run_build(plan_build(tiny_onnx(), tmp_path / "t.engine"), show_progress=False, log=messages.append)
    assert any("cancelling the TensorRT build" in m for m in messages)
    steps = [n for n in doubles.names() if n == "Builder.build_serialized_network"]
    assert steps == ["Builder.build_serialized_network"] and list(tmp_path.iterdir()) == []


def test_builder_failure_is_a_build_error(doubles, tmp_path) -> None:
    doubles.cancel_after_steps = 1  # the double returns None without a cancel request: a failed build
    with pytest.raises(tensorrt_build.BuildError, match="failed to build the engine"):
        tensorrt_build.run_build(plan_build(tiny_onnx(), tmp_path / "t.engine"), show_progress=False)
    assert not (tmp_path / "t.engine").exists()


def test_parser_errors_are_reported(doubles, tmp_path) -> None:
    import onnx

    path = tmp_path / "bernoulli.onnx"
    onnx.save(with_unsupported_op(load_tiny()), str(path))  # the double's parser has no Bernoulli importer
    with pytest.raises(tensorrt_build.BuildError,
                       match=r"No importer registered for op: Bernoulli \(node extra_bernoulli, op Bernoulli\)"):
        tensorrt_build.run_build(plan_build(path, tmp_path / "t.engine"), show_progress=False)
    assert "Builder.build_serialized_network" not in doubles.names() and not (tmp_path / "t.engine").exists()


def test_missing_gpu_is_reported_before_anything_is_built(monkeypatch, tmp_path) -> None:
    doubles = Doubles(device_count=0).install(monkeypatch)
    with pytest.raises(tensorrt_build.TensorRTUnavailable, match="no CUDA GPU is visible .*cudaErrorNoDevice"):
        tensorrt_build.run_build(plan_build(tiny_onnx(), tmp_path / "t.engine"), show_progress=False)
    assert "Builder" not in doubles.names() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("driver", "expected"), [
    (0, "no NVIDIA driver is installed or loaded here"),
    (12040, r"the NVIDIA driver supports CUDA 12.4 but the CUDA runtime here is 13.0; update the driver to >= 580"),
])
def test_missing_or_old_driver_is_one_clear_line(monkeypatch, tmp_path, driver, expected) -> None:
    doubles = Doubles(driver_version=driver).install(monkeypatch)
    with pytest.raises(tensorrt_build.TensorRTUnavailable, match=expected) as raised:
        tensorrt_build.run_build(plan_build(tiny_onnx(), tmp_path / "t.engine"), show_progress=False)
    assert "\n" not in str(raised.value) and "no usable CUDA GPU" not in str(raised.value)
    assert "Builder" not in doubles.names() and list(tmp_path.iterdir()) == []


def test_fp16_build_of_fp32_graph_converts_first(doubles, tmp_path, monkeypatch) -> None:
    from vitdeploy.exporters import fp16
    assert callable(fp16.convert_to_fp16)
    messages: list[str] = []
    plan = plan_build(tiny_onnx(), tmp_path / "h.engine", options=BuildOptions(precision="fp16"))
    manifest = tensorrt_build.run_build(plan, show_progress=False, log=messages.append)
    assert any("converting the fp32 graph" in m for m in messages)
    parsed = dict(doubles.calls)["OnnxParser.parse_from_file"][0]
    assert parsed.endswith(".fp16.onnx") and ".vitdeploy-build-" in parsed  # scratch copy, removed after
    assert manifest.precision == "fp16" and manifest.converted_to_fp16 and manifest.metadata["precision"] == "fp16"
    assert json.loads((tmp_path / "h.engine.json").read_text())["converted_to_fp16"] is True
