"""Build a TensorRT engine from a :class:`~vitdeploy.exporters.trt_plan.BuildPlan`: the thin layer over ``tensorrt``.

All decisions (profiles, precision, options, trtexec equivalent) are made in
:mod:`vitdeploy.exporters.trt_plan`; this module only performs them, in the order of NVIDIA's
documented Python API and samples (``samples/python/simple_progress_monitor``,
``samples/python/strongly_type_autocast``; Python API reference for ``Builder``,
``NetworkDefinitionCreationFlag``, ``OnnxParser``, ``IBuilderConfig``, ``IOptimizationProfile``,
``IProgressMonitor``, ``ITimingCache``, ``IEngineInspector``;
https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/ ; the bindings in
NVIDIA/TensorRT ``python/src/infer/pyCore.cpp``):

0. ``cudaSetDevice(device)`` on the calling thread and again inside the build worker thread:
   TensorRT builds on the current device of the calling thread, and that is per thread.
1. the process's one ``trt.Logger`` (:func:`vitdeploy.tensorrt_env.get_logger`) →
   ``trt.Builder(logger)`` → ``builder.create_network(flags)``: strongly typed.
   TensorRT 11 builds nothing else (``STRONGLY_TYPED`` is accepted but ignored there and
   ``BuilderFlag.FP16/INT8/FP8`` are gone, see the 10.x → 11.x migration guide); on 10.x the flag
   ``1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` is passed. The engine's precision
   is therefore the ONNX graph's: fp32, fp16, or int8/fp8 from explicit Q/DQ; no precision flag
   is ever set (a strongly typed 10.x network rejects them). FP8 needs compute capability 8.9+.
2. ``trt.OnnxParser(network, logger).parse_from_file(path)`` (external data is found beside it).
3. ``builder.create_builder_config()``; ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)``,
   ``builder_optimization_level``, ``hardware_compatibility_level``,
   ``set_flag(BuilderFlag.VERSION_COMPATIBLE)``, ``clear_flag(BuilderFlag.TF32)``,
   ``profiling_verbosity = ProfilingVerbosity.DETAILED`` (layer types and tactics in the engine
   inspector); timing cache: ``create_timing_cache(bytes)`` + ``set_timing_cache(cache, ignore_mismatch=False)``.
4. one ``builder.create_optimization_profile()`` per profile, ``set_shape(name, min, opt, max)``,
   ``config.add_optimization_profile`` — whose index is checked: -1 means TensorRT rejected it.
5. ``config.progress_monitor`` = a ``trt.IProgressMonitor`` whose ``step_complete`` returns False
   once Ctrl-C was pressed, which makes TensorRT cancel the build.
6. ``builder.build_serialized_network(network, config)`` in a worker thread (it releases the
   GIL), so the main thread keeps receiving Ctrl-C; then ``config.get_timing_cache().serialize()``.
7. ``trt.Runtime(logger).deserialize_cuda_engine(plan).create_engine_inspector()
   .get_engine_information(LayerInformationFormat.JSON)``: the layer list, written beside the
   engine, and whether attention was fused (:func:`~vitdeploy.engine_manifest.attention_fusion`),
   recorded in the manifest; the build warns when an fp16/int8/fp8 engine has no fused attention.

The engine, the manifest, the layer list and the timing cache are written atomically (under a temporary name, then renamed).

Verification status: never run against a real TensorRT; tested with the test double
``tests/trt_double.py`` (:mod:`vitdeploy.tensorrt_env` says how far that goes).
"""

from __future__ import annotations

import datetime
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
from vitdeploy.constants import DEFAULT_FP32_OPS
from vitdeploy.engine_manifest import (
    FP8_MIN_COMPUTE_CAPABILITY,
    AttentionFusion,
    EngineManifest,
    EngineTensor,
    GpuInfo,
    attention_fusion,
    parse_layer_information,
    parse_version,
)
from vitdeploy.exporters.trt_plan import BuildPlan
from vitdeploy.exporters.trt_progress import BuildProgress
from vitdeploy.files import atomic_path, atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file
from vitdeploy.tensorrt_env import (
    CudaApi,
    CudaError,
    TensorRTUnavailable,
    cuda_device_info,
    dtype_name,
    get_logger,
    import_cudart,
    import_tensorrt,
    logger_severity,
)

__all__ = ["BuildError", "BuildOutput", "TensorRTUnavailable", "build_serialized_engine", "convert_graph_to_fp16",
           "prepare_graph", "run_build"]

PROTOBUF_LIMIT = 2**31 - 1
# Attention fusion needs fp16/bf16/int8/fp8 batch-matmul inputs (TensorRT "Fused Attention" guide): fp32
# engines are not expected to fuse, so the build warns only for these.
FUSION_EXPECTED = ("fp16", "int8", "fp8")
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
    layer_information: str | None = None  # the engine inspector's JSON; None where it could not be read


def check_build_environment(device: int = 0) -> tuple[Any, GpuInfo]:
    """``(tensorrt module, GPU)`` with ``device`` selected for this thread, or :class:`TensorRTUnavailable`."""
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


def _build_in_thread(builder: Any, network: Any, config: Any, cancel: threading.Event, log: Log,
                     select_device: Callable[[], None]) -> Any:
    """Run ``build_serialized_network`` on a worker thread; Ctrl-C here requests cancellation.

    The worker selects the build device first: the current CUDA device is per thread, and a new
    thread starts on device 0.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            select_device()
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


def _network_input_shape(network: Any) -> str:
    try:
        return "x".join(str(int(d)) for d in network.get_input(0).shape)
    except Exception:  # only for the message
        return "unknown"


def _add_profiles(builder: Any, network: Any, config: Any, plan: BuildPlan) -> None:
    for index, profile in enumerate(plan.profiles):
        trt_profile = builder.create_optimization_profile()
        trt_profile.set_shape(profile.input, profile.min, profile.opt, profile.max)
        added = config.add_optimization_profile(trt_profile)
        if added is None or int(added) < 0:  # IBuilderConfig::addOptimizationProfile: -1 if the profile is invalid
            raise BuildError(f"TensorRT rejected optimization profile {index} ({profile.describe()}) for input "
                             f"{profile.input!r} (the network's input is {_network_input_shape(network)}); "
                             "see its log above")


def _check_gpu_for_precision(plan: BuildPlan, gpu: GpuInfo | None) -> None:
    if plan.precision == "fp8" and gpu is not None and gpu.cc < FP8_MIN_COMPUTE_CAPABILITY:
        need = ".".join(str(v) for v in FP8_MIN_COMPUTE_CAPABILITY)
        raise BuildError(f"an fp8 (FP8 E4M3 Q/DQ) engine needs compute capability {need} or newer (Ada, Hopper, "
                         f"Blackwell); {gpu.name} has {gpu.compute_capability}: build the int8 or fp16 graph instead")


def inspect_serialized_engine(trt: Any, serialized: bytes) -> str | None:
    """The engine inspector's JSON layer list for a serialized engine (``None`` if it cannot be read).

    ``ICudaEngine.create_engine_inspector()`` and ``IEngineInspector.get_engine_information
    (LayerInformationFormat.JSON)`` (TensorRT Python API); the detail depends on the build's
    ``profiling_verbosity``. Deserializes on the calling thread's current device.
    """
    runtime = trt.Runtime(get_logger(trt))
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    if inspector is None:
        return None
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_serialized_engine(
    trt: Any,
    plan: BuildPlan,
    onnx_path: Path,
    *,
    progress: BuildProgress | None = None,
    cancel: threading.Event | None = None,
    log: Log = lambda message: None,
    device: int = 0,
    gpu: GpuInfo | None = None,
) -> BuildOutput:
    """Parse ``onnx_path`` and build ``plan`` with TensorRT (``trt`` is the imported module) on CUDA ``device``."""
    cancel = cancel or threading.Event()
    options = plan.options
    _check_gpu_for_precision(plan, gpu)
    cuda = CudaApi(import_cudart(), device)
    try:
        cuda.set_device()  # before the builder exists: it belongs to the current device of this thread
    except CudaError as error:
        raise TensorRTUnavailable(f"CUDA device {device} cannot be selected ({error})") from None
    with logger_severity(trt, options.verbose) as logger:
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
            member = {"ampere+": "AMPERE_PLUS", "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}[
                options.hardware_compatibility]
            if not hasattr(trt.HardwareCompatibilityLevel, member):
                raise BuildError(f"TensorRT {trt.__version__} has no HardwareCompatibilityLevel.{member}; "
                                 f"--hardware-compat {options.hardware_compatibility} needs a newer TensorRT")
            config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, member)
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if not options.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 matmuls/convs in full fp32 (TF32 is on by default)
        if options.detailed_profiling:
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if options.timing_cache:
            cache_file = Path(options.timing_cache)
            cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise BuildError(f"timing cache {cache_file} does not fit this GPU/TensorRT; delete it or use another file")
        _add_profiles(builder, network, config, plan)
        monitor = make_progress_monitor(trt, progress, cancel)
        config.progress_monitor = monitor
        try:
            serialized = _build_in_thread(builder, network, config, cancel, log, cuda.set_device)
        finally:
            if progress is not None:
                progress.close()
        if serialized is None:
            if cancel.is_set():
                raise KeyboardInterrupt
            raise BuildError("TensorRT failed to build the engine; see its log above (rerun with --verbose for details)")
        engine = bytes(serialized)
        timing_cache = bytes(config.get_timing_cache().serialize()) if options.timing_cache else None
        try:
            layers = inspect_serialized_engine(trt, engine)
        except Exception as error:  # the engine is good; only its description is missing
            log(f"warning: could not read the engine's layer list ({error})")
            layers = None
    return BuildOutput(engine, inputs, outputs, str(trt.__version__), timing_cache, layers)


def convert_graph_to_fp16(plan: BuildPlan, target: Path, log: Log = lambda message: None) -> Path:
    """Write the graph the plan builds from to ``target``: fp16 conversion and/or fp16 softmax.

    fp32 → fp16 uses :func:`vitdeploy.exporters.fp16.convert_to_fp16` (the same code ``vitdeploy
    export --precision fp16`` uses), keeping the metadata's ``fp32_ops`` (LayerNormalization and
    Softmax by default) in fp32 and the IO in fp32 — except Softmax with ``--softmax fp16``, where
    an fp16 graph's fp32 softmax islands are removed too (:mod:`vitdeploy.exporters.trt_attention`).
    """
    try:
        from vitdeploy.exporters.fp16 import convert_to_fp16
    except ImportError as error:
        raise BuildError(f"fp16 conversion is unavailable ({error}); export with --precision fp16 instead") from None
    from vitdeploy.exporters.trt_attention import softmax_in_fp16

    metadata = plan.onnx.metadata
    fp32_ops = tuple(metadata.fp32_ops) if metadata is not None and metadata.fp32_ops else DEFAULT_FP32_OPS
    if plan.rewrites_softmax:
        fp32_ops = tuple(op for op in fp32_ops if op != "Softmax")
    model = onnx.load(str(plan.onnx.path))
    if plan.convert_to_fp16:
        log(f"converting the fp32 graph {plan.onnx.path} to fp16 for a strongly typed fp16 engine "
            f"({', '.join(fp32_ops) or 'nothing'} kept in fp32) -> {target}")
        model = convert_to_fp16(model, fp32_ops=fp32_ops, keep_io_types=True)
    if plan.rewrites_softmax:
        model, count = softmax_in_fp16(model)
        log(f"softmax in fp16 for TensorRT's fused attention: {count} fp32 softmax island(s) removed -> {target}")
    external = model.ByteSize() > PROTOBUF_LIMIT - (64 << 20)
    with atomic_path(target, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp), save_as_external_data=external,
                  location=target.name + ".data" if external else None)
    return target


def _check_shapes(plan: BuildPlan) -> list[tuple[int, int, int]]:
    """Small parity shapes inside the first profile: the smallest batch at opt size, batch 2 at the max size."""
    profile = plan.profiles[0]
    return [(profile.min[0], profile.opt[2], profile.opt[3]),
            (min(max(profile.min[0], 2), profile.max[0]), profile.max[2], profile.max[3])]


def prepare_graph(plan: BuildPlan, scratch: Path, log: Log = lambda message: None) -> tuple[Path, list[dict[str, Any]]]:
    """The ONNX file TensorRT parses, and the transforms made to get it (parity-checked where rewritten).

    The file itself when the plan builds it as it is; else a rewritten copy in ``scratch``.
    A softmax rewrite is compared with its source graph on onnxruntime CPU (bundled photos,
    :func:`_check_shapes`); a failure is a :class:`BuildError` and nothing is built.
    """
    if not plan.rewrites_graph:
        return plan.onnx.path, []
    path = convert_graph_to_fp16(plan, scratch / plan.fp16_onnx_path.name, log)
    transforms: list[dict[str, Any]] = []
    if plan.convert_to_fp16:
        transforms.append({"name": "fp16", "source_precision": "fp32"})
    if plan.rewrites_softmax:
        from vitdeploy.exporters.trt_attention import TRANSFORM, check_rewrite, softmax_islands

        shapes = _check_shapes(plan)
        log(f"checking the fp16-softmax graph against {plan.onnx.path.name} on onnxruntime CPU at "
            + ", ".join(f"{b}x{h}x{w}" for b, h, w in shapes))
        try:
            check = check_rewrite(plan.onnx.path, path, shapes, plan.onnx.precision)
        except ImportError as error:
            raise BuildError(f"--softmax fp16 needs onnxruntime to check the rewritten graph ({error})") from None
        if not check.passed:
            raise BuildError(f"the fp16-softmax graph fails parity with {plan.onnx.path.name}: "
                             + "; ".join(check.failures[:3]) + " (build without --softmax fp16)")
        left = len(softmax_islands(onnx.load(str(path), load_external_data=False)))
        transforms.append({"name": TRANSFORM, "fp32_softmax_left": left, "parity": check.to_dict()})
    return path, transforms


def _attention(plan: BuildPlan, layers: str | None, log: Log) -> AttentionFusion | None:
    if layers is None:
        return None
    try:
        parsed = parse_layer_information(layers)
    except ValueError as error:
        log(f"warning: {error}")
        return None
    depth = plan.onnx.metadata.model_config.get("depth") if plan.onnx.metadata is not None else None
    return attention_fusion(parsed, int(depth) if depth else None)


def _manifest_metadata(plan: BuildPlan) -> dict[str, Any] | None:
    if plan.onnx.metadata is None:
        return None
    data = json.loads(json.dumps(asdict(plan.onnx.metadata)))  # JSON types, as the manifest file holds them
    if plan.convert_to_fp16:
        data["precision"] = "fp16"
        data["fp32_ops"] = list(data.get("fp32_ops") or DEFAULT_FP32_OPS)
    if plan.rewrites_softmax:
        data["fp32_ops"] = [op for op in (data.get("fp32_ops") or DEFAULT_FP32_OPS) if op != "Softmax"]
    return data


def run_build(
    plan: BuildPlan,
    *,
    show_progress: bool = True,
    device: int = 0,
    log: Log = lambda message: None,
    cancel: threading.Event | None = None,
) -> EngineManifest:
    """Check the environment, rewrite the graph if planned, build on ``device``, write engine + manifest + layers.

    Raises :class:`TensorRTUnavailable` (nothing written) when TensorRT, cuda-python, a usable
    driver or the GPU is missing. Logs a warning when an fp16/int8/fp8 engine has no fused attention.
    """
    trt = import_tensorrt()
    cuda = CudaApi(import_cudart(), device)
    try:
        previous: int | None = cuda.current_device()
    except CudaError:  # no driver: cuda_device_info says so in one line
        previous = None
    try:
        return _run_build(trt, plan, show_progress, device, log, cancel)
    finally:
        if previous is not None and previous != device:
            cuda.check(cuda.rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")  # the caller's device back


def _run_build(trt: Any, plan: BuildPlan, show_progress: bool, device: int, log: Log,
               cancel: threading.Event | None) -> EngineManifest:
    gpu = cuda_device_info(device)
    log(f"TensorRT {trt.__version__} on {gpu.name} (CUDA device {device}, compute capability {gpu.compute_capability})")
    _check_gpu_for_precision(plan, gpu)
    progress = BuildProgress() if show_progress else None
    start = time.perf_counter()
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vitdeploy-build-", dir=plan.engine_path.parent) as scratch:
        onnx_path, transforms = prepare_graph(plan, Path(scratch), log)
        log(f"building a {plan.precision} engine with {len(plan.profiles)} optimization profile(s): "
            + "; ".join(p.describe() for p in plan.profiles))
        output = build_serialized_engine(trt, plan, onnx_path, progress=progress, cancel=cancel, log=log,
                                         device=device, gpu=gpu)
    seconds = time.perf_counter() - start
    attention = _attention(plan, output.layer_information, log)
    atomic_write_bytes(plan.engine_path, output.engine)
    if output.layer_information is not None:
        atomic_write_text(plan.layers_path, output.layer_information)
    if output.timing_cache is not None and plan.options.timing_cache:
        atomic_write_bytes(plan.options.timing_cache, output.timing_cache)
    manifest = EngineManifest(
        engine_file=plan.engine_path.name,
        engine_sha256=sha256_bytes(output.engine),
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
        transforms=transforms,
        layers_file=plan.layers_path.name if output.layer_information is not None else None,
        attention=attention.to_dict() if attention is not None else None,
    )
    manifest.write(plan.manifest_path)
    if attention is not None:
        log(f"attention fused: {attention.describe()}")
        if attention.fused is False and plan.precision in FUSION_EXPECTED:
            hint = " (try --softmax fp16: softmax left to the fused kernel)" if not plan.rewrites_softmax else ""
            log(f"warning: TensorRT did not fuse attention in this {plan.precision} engine{hint}; "
                f"see `vitdeploy inspect {plan.engine_path}`")
    return manifest
