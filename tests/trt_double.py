"""TEST DOUBLE of the ``tensorrt`` module and of cuda-python's ``cuda.bindings.runtime`` — NOT TensorRT.

TensorRT cannot be installed on the machines that run this suite, so the thin layers
(:mod:`vitdeploy.exporters.tensorrt_build`, :mod:`vitdeploy.runtimes.tensorrt`) are exercised
against this stand-in. It mirrors the names, signatures and return conventions of the documented
TensorRT 10.x/11.x Python API (``python/src/infer/pyCore.cpp``, ``python/docstrings``,
``include/NvInferRuntime.h`` of NVIDIA/TensorRT 11.1) and of cuda-python 13 (every ``cudaXxx``
returns ``(cudaError_t, *results)``), records each call in ``calls``, and does no optimisation.

It ENFORCES the rules the layers must follow — each one a test in ``tests/test_trt_rules.py``:

1. **CUDA graphs are bound to the context state they were captured from.** A graph replays the
   captured work with the context's profile, shapes and addresses of capture time; launching it
   after that context's shape, addresses or profile changed (TensorRT defers a profile switch's
   layer-resource update to the next ``enqueueV3``, which a graph launch skips) is undefined in
   TensorRT: here it raises :class:`RuleViolation`. Capturing the first enqueue after a shape or
   profile change (TensorRT needs one plain enqueue first), or synchronising a capturing stream,
   invalidates the capture (``cudaErrorStreamCaptureInvalidated``, NULL graph, as CUDA does).
2. **The current device is per host thread** (``cudaSetDevice``; default 0 in every new thread).
   Builders, engines and allocations belong to the device current when they were made; a build or
   an enqueue from a thread whose current device differs fails as in TensorRT (False/None plus a
   logged error); the plan records the device it was built on.
3. **Tensor addresses must be 256-byte aligned** (``setTensorAddress`` returns false otherwise,
   NvInferRuntime.h); ``cudaMalloc`` returns 256-aligned memory, as CUDA does.
4. **Parser and profile failures**: the parser rejects ops without a TensorRT importer
   (``Bernoulli``), non-symmetric or non-INT8/FP8-E4M3 quantization; ``add_optimization_profile``
   returns -1 for a profile that misses an input or contradicts the network (wrong rank, a
   static dimension that differs, min > opt > max); a build without a valid profile fails.
5. **One logger**: TensorRT keeps the first logger and logs a warning when a Builder/Runtime/
   parser brings a different one ("differs from one already provided").
6. **Strong typing**: precision flags (FP16/INT8/FP8/BF16) on a strongly typed network fail the
   build; TensorRT 11 has no such flags at all; FP8 needs compute capability 8.9+.
7. **USER_MANAGED contexts** need ``set_device_memory(ptr, size)`` (aligned, ``size >=
   engine.device_memory_size_v2``) before they execute.
8. **A failed capture still returns a graph to destroy** when the capture body failed (CUDA
   returns NULL only for an invalidated capture); ``live_graphs`` shows leaks.

Everything else is bookkeeping: ``OnnxParser.parse_from_file`` reads the real ONNX file's IO with
``onnx``; ``build_serialized_network`` reports two progress phases and returns a JSON "plan"; the
"engine" computes ``logits[n, k] = mean(x[n]) * (k + 1)`` from the input at the bound address
(device memory is host memory, copies are ``ctypes.memmove``). The engine inspector lists one
layer per ONNX node, and fuses MatMul → Softmax → MatMul into one ``_gemm_mha_v2`` layer only in
fp16 networks whose softmax is not wrapped in Casts — a MODEL of third-party reports (fused MHA
needs fp16/bf16/int8/fp8 batch-matmul inputs per NVIDIA; the Cast-island effect is reported, not
documented), so tests on it check vitdeploy's reading of layer lists, not TensorRT's fusion.
"""

from __future__ import annotations

import _thread
import ctypes
import enum
import importlib.machinery
import json
import sys
import threading
import time
import types
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}
ALIGNMENT = 256
UNSUPPORTED_OPS = {"Bernoulli"}  # no importer in onnx-tensorrt
DEVICE_MEMORY_BYTES = 1 << 20


class RuleViolation(AssertionError):
    """Something TensorRT leaves undefined happened (the real library would compute garbage silently)."""


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT64 = 2
    INT8 = 3
    FP8 = 4


class Doubles:
    """Builds the two fake modules around one call log; ``install(monkeypatch)`` puts them in ``sys.modules``."""

    def __init__(self, version: str = "10.13.0.35", gpu: tuple[str, int, int] = ("Fake GPU (test double)", 8, 9),
                 device_count: int = 1, gpus: list[tuple[str, int, int]] | None = None,
                 driver_version: int = 13000, runtime_version: int = 13000) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.version = version
        self.gpus = list(gpus) if gpus is not None else [gpu] * device_count
        self.driver_version, self.runtime_version = driver_version, runtime_version
        self.memory: dict[int, tuple[np.ndarray, int]] = {}  # aligned address -> (backing buffer, device)
        self.capturing: dict[int, list[Any]] = {}  # stream -> captured work
        self.capture_invalid: dict[int, str] = {}
        self.live_graphs: set[int] = set()
        self.violations: list[str] = []
        self.messages: list[tuple[str, str]] = []  # (severity, text) TensorRT would log
        self.loggers: list[Any] = []
        self.cancel_after_steps: int | None = None
        self.interrupt_main_at_step: int | None = None
        self.fail_capture = False  # invalidate every capture (NULL graph)
        self.fail_execute_in_capture = False  # execute_async_v3 returns False while capturing
        self._thread = threading.local()
        self._streams = 0
        self.trt = self._make_trt()
        self.cudart = self._make_cudart()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def gpu(self) -> tuple[str, int, int]:
        return self.gpus[0]

    @gpu.setter
    def gpu(self, value: tuple[str, int, int]) -> None:
        self.gpus = [value] * max(len(self.gpus), 1)

    @property
    def device_count(self) -> int:
        return len(self.gpus)

    @device_count.setter
    def device_count(self, count: int) -> None:
        self.gpus = (self.gpus[:1] or [("Fake GPU (test double)", 8, 9)]) * count

    def current_device(self) -> int:
        return getattr(self._thread, "device", 0)

    def log(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def error(self, text: str) -> None:
        self.messages.append(("ERROR", text))

    def violate(self, text: str) -> None:
        self.violations.append(text)
        raise RuleViolation(text)

    def install(self, monkeypatch: Any) -> Doubles:
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, self.cudart
        for name, module in (("tensorrt", self.trt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", self.cudart)):
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers expect one
            monkeypatch.setitem(sys.modules, name, module)
        return self

    def _register_logger(self, logger: Any, who: str) -> None:
        if self.loggers and logger is not self.loggers[0]:
            self.messages.append(("WARNING", f"The logger passed into {who} differs from one already provided "
                                             "for an existing builder, runtime, or refitter."))
        if logger not in self.loggers:
            self.loggers.append(logger)

    # ------------------------------------------------------------------ tensorrt
    def _make_trt(self) -> types.ModuleType:
        d = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version
        major = int(self.version.split(".")[0])
        trt.DataType = DataType
        trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
        flags = {"TF32": 6, "VERSION_COMPATIBLE": 13}
        if major < 11:  # deprecated in 10.12, removed in 11.0
            flags.update({"FP16": 0, "INT8": 1, "BF16": 17, "FP8": 18})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
        precision_flags = {getattr(trt.BuilderFlag, n) for n in ("FP16", "INT8", "BF16", "FP8") if n in flags}
        trt.HardwareCompatibilityLevel = enum.IntEnum(
            "HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})
        trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
        trt.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
        trt.ExecutionContextAllocationStrategy = enum.IntEnum(
            "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})

        class Logger:
            VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = 4, 3, 2, 1, 0

            def __init__(self, min_severity: int = 2) -> None:
                d.log("Logger", min_severity)
                self.min_severity = min_severity

        class IProgressMonitor:
            def __init__(self) -> None:
                d.log("IProgressMonitor.__init__")

        class Tensor:
            def __init__(self, name: str, dtype: DataType, shape: tuple[int, ...]) -> None:
                self.name, self.dtype, self.shape = name, dtype, shape

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.inputs, self.outputs = flags, [], []
                self.num_inputs = self.num_outputs = 0
                self.fp8 = self.int8 = False
                self.layers: list[dict[str, Any]] = []

            @property
            def strongly_typed(self) -> bool:
                return major >= 11 or bool(self.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

            def get_output(self, i: int) -> Tensor:
                return self.outputs[i]

        class ParserError:
            def __init__(self, desc: str, node: int, name: str, op: str) -> None:
                self._desc, self._node, self._name, self._op = desc, node, name, op

            def desc(self) -> str:
                return self._desc

            def node(self) -> int:
                return self._node

            def node_name(self) -> str:
                return self._name

            def node_operator(self) -> str:
                return self._op

            def __str__(self) -> str:
                return f"In node {self._node} ({self._name}): {self._desc}"

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                d.log("OnnxParser", network)
                d._register_logger(logger, "OnnxParser")
                self.network, self.errors = network, []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, index: int) -> ParserError:
                return self.errors[index]

            def parse_from_file(self, path: str) -> bool:
                d.log("OnnxParser.parse_from_file", path)
                model = onnx.load(path, load_external_data=False)
                graph = model.graph
                initializers = {t.name: t for t in graph.initializer}
                for index, node in enumerate(graph.node):
                    if node.op_type in UNSUPPORTED_OPS:
                        self.errors.append(ParserError(f"No importer registered for op: {node.op_type}", index,
                                                       node.name, node.op_type))
                    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                        self._check_quantization(index, node, initializers)
                if self.errors:
                    return False

                def tensor(value: Any) -> Tensor:
                    dims = value.type.tensor_type.shape.dim
                    shape = tuple(x.dim_value if x.HasField("dim_value") else -1 for x in dims)
                    return Tensor(value.name, DataType[_ONNX_DTYPES[value.type.tensor_type.elem_type]], shape)

                net = self.network
                net.inputs = [tensor(v) for v in graph.input if v.name not in initializers]
                net.outputs = [tensor(v) for v in graph.output]
                net.num_inputs, net.num_outputs = len(net.inputs), len(net.outputs)
                net.layers = _layers(graph)
                return True

            def _check_quantization(self, index: int, node: Any, initializers: dict[str, Any]) -> None:
                zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                kind = onnx.TensorProto.UINT8 if zero is None else zero.data_type  # uint8: ONNX's default
                if kind == onnx.TensorProto.FLOAT8E4M3FN:
                    self.network.fp8 = True
                elif kind == onnx.TensorProto.INT8:
                    self.network.int8 = True
                else:
                    self.errors.append(ParserError(
                        f"{node.op_type}: TensorRT supports INT8 and FP8 (E4M3) quantization only, got "
                        f"{onnx.TensorProto.DataType.Name(kind)}", index, node.name, node.op_type))
                    return
                values = numpy_helper.to_array(zero).astype(np.float32) if zero is not None else np.zeros(1)
                if np.any(values != 0):
                    self.errors.append(ParserError(f"{node.op_type}: TensorRT only supports symmetric quantization "
                                                   "(zero point must be 0)", index, node.name, node.op_type))

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = bytes(data)

            def serialize(self) -> bytes:
                d.log("ITimingCache.serialize")
                return self.data + b"+timed"

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

            def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
                d.log("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
                self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

        class Config:
            def __init__(self, builder: Builder) -> None:
                self.builder = builder
                self.profiles, self.flags, self.cache, self._monitor = [], set(), None, None
                self._level, self._compat = 3, trt.HardwareCompatibilityLevel.NONE
                self._verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

            def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
                d.log("IBuilderConfig.set_memory_pool_limit", pool, pool_size)

            builder_optimization_level = property(lambda self: self._level, lambda self, v: (
                d.log("IBuilderConfig.builder_optimization_level", v), setattr(self, "_level", v)))
            hardware_compatibility_level = property(lambda self: self._compat, lambda self, v: (
                d.log("IBuilderConfig.hardware_compatibility_level", v), setattr(self, "_compat", v)))
            progress_monitor = property(lambda self: self._monitor, lambda self, v: (
                d.log("IBuilderConfig.progress_monitor", v), setattr(self, "_monitor", v)))
            profiling_verbosity = property(lambda self: self._verbosity, lambda self, v: (
                d.log("IBuilderConfig.profiling_verbosity", v), setattr(self, "_verbosity", v)))

            def set_flag(self, flag: Any) -> None:
                d.log("IBuilderConfig.set_flag", flag)
                self.flags.add(flag)

            def clear_flag(self, flag: Any) -> None:
                d.log("IBuilderConfig.clear_flag", flag)
                self.flags.discard(flag)

            def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
                d.log("IBuilderConfig.create_timing_cache", bytes(serialized_timing_cache))
                return TimingCache(serialized_timing_cache)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                d.log("IBuilderConfig.set_timing_cache", ignore_mismatch)
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                return self.cache

            def add_optimization_profile(self, profile: Profile) -> int:
                d.log("IBuilderConfig.add_optimization_profile")
                network = self.builder.network
                problem = _profile_problem(profile, network)
                if problem:
                    d.error(f"IBuilderConfig::addOptimizationProfile: {problem}")
                    return -1
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger: Logger) -> None:
                d.log("Builder", logger)
                d._register_logger(logger, "createInferBuilder")
                self.device = d.current_device()
                self.network: Network | None = None

            def create_network(self, flags: int = 0) -> Network:
                d.log("Builder.create_network", flags)
                self.network = Network(flags)
                return self.network

            def create_builder_config(self) -> Config:
                d.log("Builder.create_builder_config")
                return Config(self)

            def create_optimization_profile(self) -> Profile:
                d.log("Builder.create_optimization_profile")
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                d.log("Builder.build_serialized_network")
                device = d.current_device()
                if device != self.device:
                    d.error(f"Builder was created on device {self.device} but builds on device {device}: "
                            "CUDA error (invalid resource handle)")
                    return None
                if network.strongly_typed and config.flags & precision_flags:
                    d.error("Strongly typed networks must not set precision flags "
                            f"({sorted(f.name for f in config.flags & precision_flags)})")
                    return None
                if any(t.shape.count(-1) for t in network.inputs) and not config.profiles:
                    d.error("Network has dynamic or shape inputs, but no optimization profile has been defined.")
                    return None
                cc = d.gpus[device][1:]
                if network.fp8 and tuple(cc) < (8, 9):
                    d.error(f"FP8 quantization needs compute capability 8.9 or newer; this GPU is {cc[0]}.{cc[1]}")
                    return None
                monitor, step = config.progress_monitor, 0
                monitor.phase_start("Building engine", None, 2)
                monitor.phase_start("Tactic selection", "Building engine", 4)
                while step < (200 if d.interrupt_main_at_step is not None else 4):
                    if step == d.interrupt_main_at_step:
                        _thread.interrupt_main()  # what Ctrl-C does to the main thread
                    if d.interrupt_main_at_step is not None:
                        time.sleep(0.02)
                    if not monitor.step_complete("Tactic selection", min(step, 3)) or step == d.cancel_after_steps:
                        monitor.phase_finish("Tactic selection")
                        monitor.phase_finish("Building engine")
                        return None
                    step += 1
                monitor.phase_finish("Tactic selection")
                monitor.step_complete("Building engine", 1)
                monitor.phase_finish("Building engine")
                input_name = network.inputs[0].name
                plan = {
                    "version": d.version, "flags": network.flags, "device": device,
                    "profiles": [(input_name, *p.shapes[input_name]) for p in config.profiles],
                    "vc": trt.BuilderFlag.VERSION_COMPATIBLE in config.flags,
                    "verbosity": int(config.profiling_verbosity), "layers": network.layers,
                    "io": [(t.name, t.dtype.name, t.shape, "INPUT") for t in network.inputs]
                    + [(t.name, t.dtype.name, t.shape, "OUTPUT") for t in network.outputs],
                }
                return b"DOUBLE-PLAN" + json.dumps(plan).encode()

        class Context:
            def __init__(self, engine: Engine, strategy: int) -> None:
                self.engine, self.strategy = engine, int(strategy)
                self.profile, self.shape, self.addresses = 0, None, {}
                self.version = 0  # bumped by every change of profile, shape or address
                self.pending_update = False  # set by a profile switch, applied by the next plain enqueue
                self.shape_enqueued = False  # a plain enqueue ran since the last shape/profile change
                self.device_memory: tuple[int, int] | None = None
                self.nvtx_verbosity = trt.ProfilingVerbosity(engine.plan.get("verbosity", 0))

            def _changed(self) -> None:
                self.version += 1
                self.shape_enqueued = False

            def set_device_memory(self, memory: int, size: int) -> None:
                d.log("IExecutionContext.set_device_memory", int(memory), int(size))
                if int(memory) % ALIGNMENT:
                    d.error("setDeviceMemoryV2: memory must be 256-byte aligned")
                    return
                self.device_memory = (int(memory), int(size))

            def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
                d.log("IExecutionContext.set_optimization_profile_async", profile_index, stream_handle)
                if not 0 <= profile_index < len(self.engine.plan["profiles"]):
                    raise RuntimeError("Error in set optimization profile async.")  # PY_ASSERT_RUNTIME_ERROR
                if profile_index != self.profile:
                    # "Changing [the profile] will invalidate all dynamic bindings": the double drops addresses too.
                    self.profile, self.shape, self.addresses = profile_index, None, {}
                    self.pending_update = True
                    self._changed()
                return True

            def set_input_shape(self, name: str, shape: Any) -> bool:
                d.log("IExecutionContext.set_input_shape", name, tuple(shape))
                _, low, _, high = self.engine.plan["profiles"][self.profile]
                if not all(a <= s <= b for s, a, b in zip(tuple(shape), low, high, strict=True)):
                    d.error(f"setInputShape: {tuple(shape)} is outside profile {self.profile}")
                    return False
                if tuple(shape) != self.shape:
                    self.shape = tuple(shape)
                    self._changed()
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                if name == self.engine.input:
                    return self.shape
                return (self.shape[0], self.engine.io[name][1][1])

            def set_tensor_address(self, name: str, memory: int) -> bool:
                d.log("IExecutionContext.set_tensor_address", name, memory)
                if name not in self.engine.io:
                    return False
                if int(memory) % ALIGNMENT:
                    d.error(f"setTensorAddress: address of {name} is not 256-byte aligned")
                    return False
                if self.addresses.get(name) != int(memory):
                    self.addresses[name] = int(memory)
                    self.version += 1  # the shape stays enqueued: only the binding changed
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                d.log("IExecutionContext.execute_async_v3", stream_handle)
                stream = int(stream_handle)
                if d.current_device() != self.engine.device:
                    d.error(f"enqueueV3: engine lives on device {self.engine.device}, the calling thread's current "
                            f"device is {d.current_device()} (invalid device context)")
                    return False
                user_managed = self.strategy == int(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if user_managed and (self.device_memory is None
                                     or self.device_memory[1] < self.engine.device_memory_size_v2):
                    d.error("enqueueV3: a USER_MANAGED context needs set_device_memory() with at least "
                            "device_memory_size_v2 bytes")
                    return False
                if self.shape is None or any(n not in self.addresses for n in self.engine.io):
                    d.error("enqueueV3: input shape or a tensor address is not set")
                    return False
                capturing = stream in d.capturing
                if capturing and d.fail_execute_in_capture:
                    return False
                if capturing and (self.pending_update or not self.shape_enqueued):
                    d.capture_invalid[stream] = ("enqueueV3 captured right after a shape or profile change; "
                                                 "TensorRT needs one plain enqueueV3 first")
                addresses, shape, context, version = dict(self.addresses), self.shape, self, self.version
                profile = self.profile

                def run() -> None:
                    if capturing and (context.version != version or context.pending_update):
                        d.violate(f"CUDA graph replayed after its execution context changed (captured at profile "
                                  f"{profile}, shape {shape}; now profile {context.profile}, shape {context.shape}"
                                  + (", a profile switch pending" if context.pending_update else "") + ")")
                    dtype = np.dtype(_NUMPY[self.engine.io[self.engine.input][0]])
                    x = np.frombuffer((ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(
                        addresses[self.engine.input]), dtype=dtype).reshape(shape)
                    for name in self.engine.outputs:
                        classes = self.engine.io[name][1][1]
                        out_dtype = np.dtype(_NUMPY[self.engine.io[name][0]])
                        logits = (x.astype(np.float64).mean(axis=(1, 2, 3))[:, None] * np.arange(1, classes + 1))
                        data = np.ascontiguousarray(logits.astype(out_dtype))
                        ctypes.memmove(addresses[name], data.ctypes.data, data.nbytes)

                if capturing:
                    d.capturing[stream].append(run)
                else:
                    self.pending_update = False
                    self.shape_enqueued = True
                    run()
                return True

        class Inspector:
            def __init__(self, engine: Engine) -> None:
                self.engine = engine
                self.execution_context = None

            def get_engine_information(self, format: Any) -> str:
                d.log("IEngineInspector.get_engine_information", format)
                verbosity = trt.ProfilingVerbosity(self.engine.plan.get("verbosity", 0))
                layers = self.engine.plan.get("layers", [])
                if verbosity == trt.ProfilingVerbosity.NONE:
                    return json.dumps({"Layers": []})
                if verbosity == trt.ProfilingVerbosity.LAYER_NAMES_ONLY:
                    return json.dumps({"Layers": [layer["Name"] for layer in layers], "Bindings": self.engine.names})
                return json.dumps({"Layers": layers, "Bindings": self.engine.names})

        class Engine:
            def __init__(self, plan: dict[str, Any], device: int) -> None:
                self.plan, self.device = plan, device
                self.io = {name: (dtype, shape) for name, dtype, shape, _ in plan["io"]}
                self.names = [name for name, *_ in plan["io"]]
                self.input = next(name for name, *_, mode in plan["io"] if mode == "INPUT")
                self.outputs = [name for name, *_, mode in plan["io"] if mode == "OUTPUT"]
                self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(plan["profiles"])
                self.num_layers = len(plan.get("layers", []))
                self.device_memory_size_v2 = DEVICE_MEMORY_BYTES

            def get_tensor_name(self, index: int) -> str:
                return self.names[index]

            def get_tensor_mode(self, name: str) -> Any:
                return trt.TensorIOMode.INPUT if name == self.input else trt.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name: str) -> DataType:
                return DataType[self.io[name][0]]

            def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
                _, low, opt, high = self.plan["profiles"][profile_index]
                return [tuple(low), tuple(opt), tuple(high)]

            def create_execution_context(self, strategy: Any = None) -> Context:
                strategy = trt.ExecutionContextAllocationStrategy.STATIC if strategy is None else strategy
                d.log("ICudaEngine.create_execution_context", strategy)
                return Context(self, strategy)

            def create_engine_inspector(self) -> Inspector:
                d.log("ICudaEngine.create_engine_inspector")
                return Inspector(self)

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                d.log("Runtime", logger)
                d._register_logger(logger, "createInferRuntime")
                self.engine_host_code_allowed = False

            def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
                d.log("Runtime.deserialize_cuda_engine", self.engine_host_code_allowed)
                data = bytes(serialized_engine)
                if not data.startswith(b"DOUBLE-PLAN"):
                    return None
                return Engine(json.loads(data[len(b"DOUBLE-PLAN"):]), d.current_device())

        def _profile_problem(profile: Profile, network: Network | None) -> str | None:
            if network is None:
                return "no network"
            for tensor in network.inputs:
                if -1 not in tensor.shape:
                    continue
                if tensor.name not in profile.shapes:
                    return f"no shapes set for dynamic input {tensor.name}"
            for name, (low, opt, high) in profile.shapes.items():
                tensor = next((t for t in network.inputs if t.name == name), None)
                if tensor is None:
                    return f"{name} is not a network input"
                if not len(low) == len(opt) == len(high) == len(tensor.shape):
                    return f"rank of the shapes for {name} differs from the network's {len(tensor.shape)}"
                for axis, fixed in enumerate(tensor.shape):
                    if fixed != -1 and not low[axis] == opt[axis] == high[axis] == fixed:
                        return f"{name} axis {axis} is static ({fixed}) in the network"
                if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                    return f"{name}: min <= opt <= max does not hold"
            return None

        for cls in (Logger, IProgressMonitor, OnnxParser, Builder, Runtime):
            setattr(trt, cls.__name__, cls)
        return trt

    # ------------------------------------------------------------------ cuda.bindings.runtime
    def _make_cudart(self) -> types.ModuleType:
        d = self
        rt = types.ModuleType("cuda.bindings.runtime")
        rt.cudaError_t = enum.IntEnum("cudaError_t", {
            "cudaSuccess": 0, "cudaErrorInvalidValue": 1, "cudaErrorInsufficientDriver": 35,
            "cudaErrorNoDevice": 100, "cudaErrorInvalidDevice": 101, "cudaErrorStreamCaptureUnsupported": 900,
            "cudaErrorStreamCaptureInvalidated": 901})
        rt.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
                                                            "cudaMemcpyDeviceToDevice": 3})
        rt.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})
        errors = rt.cudaError_t
        ok, bad = errors.cudaSuccess, errors.cudaErrorInvalidValue

        class Stream(int):
            pass

        class Graph:
            def __init__(self, work: list[Any]) -> None:
                self.work = work
                d.live_graphs.add(id(self))

        class GraphExec:
            def __init__(self, graph: Graph) -> None:
                self.work = list(graph.work)

        def no_driver() -> Any:
            return errors.cudaErrorInsufficientDriver if d.driver_version == 0 else None

        def alloc(nbytes: int) -> tuple[Any, int]:
            buffer = np.zeros(int(nbytes) + ALIGNMENT, dtype=np.uint8)
            address = buffer.ctypes.data + (-buffer.ctypes.data) % ALIGNMENT  # cudaMalloc: 256-byte aligned
            d.memory[address] = (buffer, d.current_device())
            return ok, address

        def release(ptr: int) -> tuple[Any]:
            return (ok,) if d.memory.pop(int(ptr), None) is not None else (bad,)

        def copy(dst: int, src: int, count: int, kind: Any, stream: Any = None) -> tuple[Any]:
            d.log("cudaMemcpyAsync", kind)
            work = lambda: ctypes.memmove(int(dst), int(src), int(count))  # noqa: E731
            if stream is not None and int(stream) in d.capturing:
                d.capturing[int(stream)].append(work)
            else:
                work()
            return (ok,)

        def device_count() -> tuple[Any, int]:
            if no_driver() is not None:
                return no_driver(), 0
            if not d.gpus:
                return errors.cudaErrorNoDevice, 0
            return ok, len(d.gpus)

        def set_device(device: int) -> tuple[Any]:
            d.log("cudaSetDevice", int(device))
            if not 0 <= int(device) < len(d.gpus):
                return (errors.cudaErrorInvalidDevice,)
            d._thread.device = int(device)
            return (ok,)

        def properties(device: int) -> tuple[Any, Any]:
            name, major, minor = d.gpus[int(device)]
            return ok, types.SimpleNamespace(name=name.encode() + b"\x00", major=major, minor=minor)

        def stream_create() -> tuple[Any, Stream]:
            d._streams += 1
            return ok, Stream(0x5EED + d._streams)

        def synchronize(stream: Any) -> tuple[Any]:
            d.log("cudaStreamSynchronize")
            if int(stream) in d.capturing:
                d.capture_invalid[int(stream)] = "cudaStreamSynchronize on a capturing stream"
                return (errors.cudaErrorStreamCaptureUnsupported,)
            return (ok,)

        def begin_capture(stream: Any, mode: Any) -> tuple[Any]:
            d.log("cudaStreamBeginCapture", mode)
            d.capturing[int(stream)] = []
            return (ok,)

        def end_capture(stream: Any) -> tuple[Any, Graph | None]:
            d.log("cudaStreamEndCapture")
            work = d.capturing.pop(int(stream))
            reason = d.capture_invalid.pop(int(stream), None)
            if d.fail_capture or reason:
                return errors.cudaErrorStreamCaptureInvalidated, None  # CUDA returns NULL for an invalidated capture
            return ok, Graph(work)

        def instantiate(graph: Graph, flags: int) -> tuple[Any, GraphExec]:
            return ok, GraphExec(graph)

        def destroy_graph(graph: Graph) -> tuple[Any]:
            d.live_graphs.discard(id(graph))
            return (ok,)

        def launch(graph_exec: GraphExec, stream: Any) -> tuple[Any]:
            d.log("cudaGraphLaunch")
            for work in graph_exec.work:
                work()
            return (ok,)

        functions = {
            "cudaGetErrorName": lambda error: (ok, rt.cudaError_t(int(error)).name.encode()),
            "cudaGetDeviceCount": device_count,
            "cudaSetDevice": set_device,
            "cudaGetDevice": lambda: (ok, d.current_device()),
            "cudaDriverGetVersion": lambda: (ok, d.driver_version),
            "cudaRuntimeGetVersion": lambda: (ok, d.runtime_version),
            "cudaGetDeviceProperties": properties,
            "cudaMalloc": alloc, "cudaMallocHost": alloc, "cudaFree": release, "cudaFreeHost": release,
            "cudaMemcpyAsync": copy,
            "cudaMemcpy": lambda dst, src, count, kind: (ctypes.memmove(int(dst), int(src), int(count)), (ok,))[1],
            "cudaStreamCreate": stream_create,
            "cudaStreamSynchronize": synchronize,
            "cudaStreamDestroy": lambda stream: (ok,),
            "cudaStreamBeginCapture": begin_capture, "cudaStreamEndCapture": end_capture,
            "cudaGraphInstantiate": instantiate,
            "cudaGraphLaunch": launch,
            "cudaGraphExecDestroy": lambda graph_exec: (ok,), "cudaGraphDestroy": destroy_graph,
        }
        for name, function in functions.items():
            setattr(rt, name, function)
        return rt


def _layers(graph: Any) -> list[dict[str, Any]]:
    """The double's "engine inspector" layer list: one layer per ONNX node, attention fused as modelled above."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in graph.node)
    fused: set[str] = set()
    layers: list[dict[str, Any]] = []
    for node in graph.node:
        if node.op_type != "Softmax" or not half:
            continue
        before = producers.get(node.input[0])
        after = consumers.get(node.output[0], [])
        if before is not None and before.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "MatMul":
            fused.update({before.name, node.name, after[0].name})
            layers.append({"Name": f"_gemm_mha_v2_myl0_{len(layers)}", "LayerType": "kgen",
                           "TacticName": "sm90_fmha_v2_flash_attention_fp16", "Inputs": [], "Outputs": []})
    for node in graph.node:
        if node.name in fused:
            continue
        kind = {"MatMul": "gemm", "Softmax": "Softmax", "LayerNormalization": "Normalization"}.get(node.op_type, "kgen")
        layers.append({"Name": node.name or node.output[0], "LayerType": kind,
                       "TacticName": "sm90_xmma_gemm_f16f16" if kind == "gemm" else "", "Inputs": [], "Outputs": []})
    return layers
