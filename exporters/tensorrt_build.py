"""Build a TensorRT engine from a :class:`~vitdeploy.exporters.trt_plan.BuildPlan`: the thin layer over ``tensorrt``.

All decisions (profiles, precision, options, trtexec equivalent) are made in
:mod:`vitdeploy.exporters.trt_plan`; this module only performs them, in the order of NVIDIA's
documented Python API and samples (``samples/python/simple_progress_monitor``,
``samples/python/strongly_type_autocast``; Python API reference for ``Builder``,
``NetworkDefinitionCreationFlag``, ``OnnxParser``, ``IBuilderConfig``, ``IOptimizationProfile``,
``IProgressMonitor``, ``ITimingCache``; https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/):

1. ``trt.Logger`` → ``trt.Builder(logger)`` → ``builder.create_network(flags)``: strongly typed.
   TensorRT 11 builds nothing else (``STRONGLY_TYPED`` is accepted but ignored there and
   ``BuilderFlag.FP16`` is gone, see the 10.x → 11.x migration guide); on 10.x the flag
   ``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` is passed. The engine's precision
   is therefore the ONNX graph's.
2. ``trt.OnnxParser(network, logger).parse_from_file(path)`` (external data is found beside it).
3. ``builder.create_builder_config()``; ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``,
   ``builder_optimization_level``, ``hardware_compatibility_level``,
   ``set_flag(BuilderFlag.VERSION_COMPATIBLE)``, ``clear_flag(BuilderFlag.TF32)``; timing cache: ``create_timing_cache(bytes)`` +
   ``set_timing_cache(cache, ignore_mismatch=False)``.
4. one ``builder.create_optimization_profile()`` per profile, ``set_shape(name, min, opt, max)``,
   ``config.add_optimization_profile``.
5. ``config.progress_monitor`` = a ``trt.IProgressMonitor`` whose ``step_complete`` returns False
   once Ctrl-C was pressed, which makes TensorRT cancel the build.
6. ``builder.build_serialized_network(network, config)`` in a worker thread (it releases the
   GIL), so the main thread keeps receiving Ctrl-C; then ``config.get_timing_cache().serialize()``.

The engine, the manifest and the timing cache are written atomically (design decision 7).

Verification status: written from NVIDIA's documentation on machines where TensorRT cannot be
installed. It has run against the test double in ``tests/trt_double.py`` (call names, order,
values) and, for the CUDA calls, against real cuda-python 12.9 and 13.5 without a GPU (argument
types and error paths) — never against a real TensorRT. ``tests/test_tensorrt_gpu.py`` (run by
``benchmarks/gpu_check.sh``) is the first real run.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from vitdeploy import __version__
from vitdeploy.engine_manifest import EngineManifest, EngineTensor, GpuInfo, parse_version
from vitdeploy.exporters.trt_plan import BuildPlan
from vitdeploy.exporters.trt_progress import BuildProgress
from vitdeploy.files import atomic_path, atomic_write_bytes, sha256_file
from vitdeploy.tensorrt_env import TensorRTUnavailable, cuda_device_info, dtype_name, import_tensorrt

__all__ = ["BuildError", "BuildOutput", "TensorRTUnavailable", "build_serialized_engine", "convert_graph_to_fp16", "run_build"]

DEFAULT_FP32_OPS = ("LayerNormalization", "Softmax")
PROTOBUF_LIMIT = 2**31 - 1
Log = Callable[[str], None]


class BuildError(RuntimeError):
    """TensorRT could not parse or build the network; the message carries TensorRT's errors."""


@dataclass
class BuildOutput:
    """What one TensorRT build produced."""

    engine: bytes
    inputs: list[EngineTensor]
    outputs: list[EngineTensor]
    tensorrt_version: str
    timing_cache: bytes | None = None


def check_build_environment(device: int = 0) -> tuple[Any, GpuInfo]:
    """``(tensorrt module, GPU)``, or :class:`TensorRTUnavailable` saying what is missing."""
    trt = import_tensorrt()
    return trt, cuda_device_info(device)


def make_progress_monitor(trt: Any, progress: BuildProgress | None, cancel: threading.Event) -> Any:
    """A ``trt.IProgressMonitor`` forwarding to ``progress``; ``step_complete`` returns False to cancel.

    The callbacks run on TensorRT's threads and must never raise into C++, hence the broad excepts.
    """

    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                if progress is not None:
                    progress.phase_start(phase_name, parent_phase, num_steps)
            except Exception:  # a display problem must not break the build
                pass

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                if progress is not None:
                    progress.step_complete(phase_name, step)
            except Exception:  # a display problem must not break the build
                pass
            return not cancel.is_set()

        def phase_finish(self, phase_name: str) -> None:
            try:
                if progress is not None:
                    progress.phase_finish(phase_name)
            except Exception:  # a display problem must not break the build
                pass

    return ProgressMonitor()


def _tensors(trt: Any, network: Any) -> tuple[list[EngineTensor], list[EngineTensor]]:
    def describe(tensor: Any, mode: str) -> EngineTensor:
        return EngineTensor(tensor.name, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape), mode)

    inputs = [describe(network.get_input(i), "input") for i in range(network.num_inputs)]
    outputs = [describe(network.get_output(i), "output") for i in range(network.num_outputs)]
    return inputs, outputs


def _parser_errors(parser: Any) -> str:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        try:
            text = f"{error.desc()} (node {error.node_name() or error.node()}, op {error.node_operator()})"
        except Exception:  # older bindings lack node_name/node_operator
            text = str(error)
        messages.append(text)
    return "; ".join(messages) or "no error message"


def _build_in_thread(builder: Any, network: Any, config: Any, cancel: threading.Event, log: Log) -> Any:
    """Run ``build_serialized_network`` on a worker thread; Ctrl-C here requests cancellation."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["plan"] = builder.build_serialized_network(network, config)
        except BaseException as error:  # re-raised on the main thread
            result["error"] = error

    worker = threading.Thread(target=work, name="tensorrt-build", daemon=True)
    worker.start()
    interrupted = False
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            if not interrupted:
                log("cancelling the TensorRT build (it stops at the next step) ...")
            interrupted = True
            cancel.set()
    if interrupted:
        raise KeyboardInterrupt
    if "error" in result:
        raise BuildError(f"TensorRT failed to build the engine: {result['error']}") from result["error"]
    return result.get("plan")


def build_serialized_engine(
    trt: Any,
    plan: BuildPlan,
    onnx_path: Path,
    *,
    progress: BuildProgress | None = None,
    cancel: threading.Event | None = None,
    log: Log = lambda message: None,
) -> BuildOutput:
    """Parse ``onnx_path`` and build ``plan`` with TensorRT (``trt`` is the imported module)."""
    cancel = cancel or threading.Event()
    options = plan.options
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if parse_version(trt.__version__)[0] < 11:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path}: {_parser_errors(parser)} "
                         f"(run `vitdeploy check {onnx_path} --target tensorrt`)")
    inputs, outputs = _tensors(trt, network)
    config = builder.create_builder_config()
    if options.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.hardware_compatibility != "none":
        member = {"ampere+": "AMPERE_PLUS", "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}[options.hardware_compatibility]
        if not hasattr(trt.HardwareCompatibilityLevel, member):
            raise BuildError(f"TensorRT {trt.__version__} has no HardwareCompatibilityLevel.{member}; "
                             f"--hardware-compat {options.hardware_compatibility} needs a newer TensorRT")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 matmuls/convs in full fp32 (TF32 is on by default)
    if options.timing_cache:
        cache_file = Path(options.timing_cache)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise BuildError(f"timing cache {cache_file} does not fit this GPU/TensorRT; delete it or use another file")
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(profile.input, profile.min, profile.opt, profile.max)
        config.add_optimization_profile(trt_profile)
    monitor = make_progress_monitor(trt, progress, cancel)
    config.progress_monitor = monitor
    try:
        serialized = _build_in_thread(builder, network, config, cancel, log)
    finally:
        if progress is not None:
            progress.close()
    if serialized is None:
        if cancel.is_set():
            raise KeyboardInterrupt
        raise BuildError("TensorRT failed to build the engine; see its log above (rerun with --verbose for details)")
    timing_cache = bytes(config.get_timing_cache().serialize()) if options.timing_cache else None
    return BuildOutput(bytes(serialized), inputs, outputs, str(trt.__version__), timing_cache)


def convert_graph_to_fp16(plan: BuildPlan, target: Path, log: Log = lambda message: None) -> Path:
    """Write the fp16 version of the plan's fp32 graph to ``target`` with the exporter's converter.

    Uses :func:`vitdeploy.exporters.fp16.convert_to_fp16` (the same code ``vitdeploy export
    --precision fp16`` uses), keeping the metadata's ``fp32_ops`` (LayerNormalization and Softmax by
    default) in fp32 and the IO in fp32.
    """
    try:
        from vitdeploy.exporters.fp16 import convert_to_fp16
    except ImportError as error:
        raise BuildError(f"fp16 conversion is unavailable ({error}); export with --precision fp16 instead") from None
    metadata = plan.onnx.metadata
    fp32_ops = tuple(metadata.fp32_ops) if metadata is not None and metadata.fp32_ops else DEFAULT_FP32_OPS
    log(f"converting the fp32 graph {plan.onnx.path} to fp16 for a strongly typed fp16 engine "
        f"({', '.join(fp32_ops)} kept in fp32) -> {target}")
    model = onnx.load(str(plan.onnx.path))
    converted = convert_to_fp16(model, fp32_ops=fp32_ops, keep_io_types=True)
    external = converted.ByteSize() > PROTOBUF_LIMIT - (64 << 20)
    with atomic_path(target, suffix=".onnx") as tmp:
        onnx.save(converted, str(tmp), save_as_external_data=external,
                  location=target.name + ".data" if external else None)
    return target


def _manifest_metadata(plan: BuildPlan) -> dict[str, Any] | None:
    if plan.onnx.metadata is None:
        return None
    data = json.loads(json.dumps(asdict(plan.onnx.metadata)))  # JSON types, as the manifest file holds them
    if plan.convert_to_fp16:
        data["precision"] = "fp16"
        data["fp32_ops"] = list(data.get("fp32_ops") or DEFAULT_FP32_OPS)
    return data


def run_build(
    plan: BuildPlan,
    *,
    show_progress: bool = True,
    device: int = 0,
    log: Log = lambda message: None,
    cancel: threading.Event | None = None,
) -> EngineManifest:
    """Check the environment, convert to fp16 if planned, build, write engine + manifest (+ timing cache).

    Raises :class:`TensorRTUnavailable` (nothing written) when TensorRT, cuda-python or a GPU is missing.
    """
    trt, gpu = check_build_environment(device)
    log(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability})")
    progress = BuildProgress() if show_progress else None
    start = time.perf_counter()
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vitdeploy-build-", dir=plan.engine_path.parent) as scratch:
        onnx_path = plan.onnx.path
        if plan.convert_to_fp16:
            onnx_path = convert_graph_to_fp16(plan, Path(scratch) / (plan.onnx.path.stem + ".fp16.onnx"), log)
        log(f"building a {plan.precision} engine with {len(plan.profiles)} optimization profile(s): "
            + "; ".join(p.describe() for p in plan.profiles))
        output = build_serialized_engine(trt, plan, onnx_path, progress=progress, cancel=cancel, log=log)
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan.engine_path, output.engine)
    if output.timing_cache is not None and plan.options.timing_cache:
        atomic_write_bytes(plan.options.timing_cache, output.timing_cache)
    manifest = EngineManifest(
        engine_file=plan.engine_path.name,
        engine_sha256=hashlib.sha256(output.engine).hexdigest(),
        engine_bytes=len(output.engine),
        onnx_file=str(plan.onnx.path),
        onnx_sha256=sha256_file(plan.onnx.path),
        tensorrt_version=output.tensorrt_version,
        gpu=gpu,
        precision=plan.precision,
        profiles=list(plan.profiles),
        inputs=output.inputs,
        outputs=output.outputs,
        build_options=plan.options.to_dict(),
        hardware_compatibility=plan.options.hardware_compatibility,
        version_compatible=plan.options.version_compatible,
        build_seconds=round(seconds, 3),
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        vitdeploy_version=__version__,
        converted_to_fp16=plan.convert_to_fp16,
        metadata=_manifest_metadata(plan),
    )
    manifest.write(plan.manifest_path)
    return manifest
