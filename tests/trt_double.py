"""TEST DOUBLE of the ``tensorrt`` module and of cuda-python's ``cuda.bindings.runtime`` — NOT TensorRT.

TensorRT cannot be installed on the machines that run this suite, so the thin layers
(:mod:`vitdeploy.exporters.tensorrt_build`, :mod:`vitdeploy.runtimes.tensorrt`) are exercised
against this stand-in. It mirrors only the names, signatures and return conventions of the
documented TensorRT 10.x/11.x Python API and of cuda-python (every ``cudaXxx`` returns
``(cudaError_t, *results)``), records each call in ``calls``, and does no optimisation at all:

- ``OnnxParser.parse_from_file`` reads the real ONNX file's IO with ``onnx``;
- ``Builder.build_serialized_network`` reports two progress phases and returns a JSON "plan";
- the "engine" computes ``logits[n, k] = mean(x[n]) * (k + 1)`` from the input it finds at the
  bound device address; device memory is host memory, copies are ``ctypes.memmove``;
- stream capture records work, ``cudaGraphLaunch`` replays it.

Passing tests here say the thin layers call the documented API in the documented order and
move bytes correctly; they say nothing about real TensorRT numerics.
"""

from __future__ import annotations

import _thread
import ctypes
import enum
import importlib.machinery
import json
import sys
import time
import types
from typing import Any

import numpy as np
import onnx

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT64: "INT64"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64}


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT64 = 2


class Doubles:
    """Builds the two fake modules around one call log; ``install(monkeypatch)`` puts them in ``sys.modules``."""

    def __init__(self, version: str = "10.13.0.35", gpu: tuple[str, int, int] = ("Fake GPU (test double)", 8, 9),
                 device_count: int = 1) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.version, self.gpu, self.device_count = version, gpu, device_count
        self.memory: dict[int, np.ndarray] = {}
        self.capturing: list[Any] | None = None
        self.cancel_after_steps: int | None = None
        self.interrupt_main_at_step: int | None = None
        self.fail_capture = False
        self.trt = self._make_trt()
        self.cudart = self._make_cudart()

    def log(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def install(self, monkeypatch: Any) -> Doubles:
        cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        cuda.bindings, bindings.runtime = bindings, self.cudart
        for name, module in (("tensorrt", self.trt), ("cuda", cuda), ("cuda.bindings", bindings),
                             ("cuda.bindings.runtime", self.cudart)):
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers expect one
            monkeypatch.setitem(sys.modules, name, module)
        return self

    # ------------------------------------------------------------------ tensorrt
    def _make_trt(self) -> types.ModuleType:
        d = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version
        trt.DataType = DataType
        trt.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
        trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
        trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6, "VERSION_COMPATIBLE": 13})
        trt.HardwareCompatibilityLevel = enum.IntEnum(
            "HardwareCompatibilityLevel", {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2})

        class Logger:
            VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1

            def __init__(self, min_severity: int = 2) -> None:
                d.log("Logger", min_severity)

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

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

            def get_output(self, i: int) -> Tensor:
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                d.log("OnnxParser", network)
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path: str) -> bool:
                d.log("OnnxParser.parse_from_file", path)
                graph = onnx.load(path, load_external_data=False).graph
                initializers = {t.name for t in graph.initializer}

                def tensor(value: Any) -> Tensor:
                    dims = value.type.tensor_type.shape.dim
                    shape = tuple(x.dim_value if x.HasField("dim_value") else -1 for x in dims)
                    return Tensor(value.name, DataType[_ONNX_DTYPES[value.type.tensor_type.elem_type]], shape)

                self.network.inputs = [tensor(v) for v in graph.input if v.name not in initializers]
                self.network.outputs = [tensor(v) for v in graph.output]
                self.network.num_inputs, self.network.num_outputs = len(self.network.inputs), len(self.network.outputs)
                return True

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = bytes(data)

            def serialize(self) -> bytes:
                d.log("ITimingCache.serialize")
                return self.data + b"+timed"

        class Profile:
            def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:
                d.log("IOptimizationProfile.set_shape", input, tuple(min), tuple(opt), tuple(max))
                self.shapes = (input, tuple(min), tuple(opt), tuple(max))

        class Config:
            def __init__(self) -> None:
                self.profiles, self.flags, self.cache, self._monitor = [], set(), None, None
                self._level, self._compat = 3, trt.HardwareCompatibilityLevel.NONE

            def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
                d.log("IBuilderConfig.set_memory_pool_limit", pool, pool_size)

            builder_optimization_level = property(lambda self: self._level, lambda self, v: (
                d.log("IBuilderConfig.builder_optimization_level", v), setattr(self, "_level", v)))
            hardware_compatibility_level = property(lambda self: self._compat, lambda self, v: (
                d.log("IBuilderConfig.hardware_compatibility_level", v), setattr(self, "_compat", v)))
            progress_monitor = property(lambda self: self._monitor, lambda self, v: (
                d.log("IBuilderConfig.progress_monitor", v), setattr(self, "_monitor", v)))

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
                self.profiles.append(profile.shapes)
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger: Logger) -> None:
                d.log("Builder", logger)

            def create_network(self, flags: int = 0) -> Network:
                d.log("Builder.create_network", flags)
                return Network(flags)

            def create_builder_config(self) -> Config:
                d.log("Builder.create_builder_config")
                return Config()

            def create_optimization_profile(self) -> Profile:
                d.log("Builder.create_optimization_profile")
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                d.log("Builder.build_serialized_network")
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
                plan = {
                    "version": d.version, "flags": network.flags, "profiles": config.profiles,
                    "vc": trt.BuilderFlag.VERSION_COMPATIBLE in config.flags,
                    "io": [(t.name, t.dtype.name, t.shape, "INPUT") for t in network.inputs]
                    + [(t.name, t.dtype.name, t.shape, "OUTPUT") for t in network.outputs],
                }
                return b"DOUBLE-PLAN" + json.dumps(plan).encode()

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine, self.profile, self.shape, self.addresses = engine, 0, None, {}

            def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
                d.log("IExecutionContext.set_optimization_profile_async", profile_index, stream_handle)
                self.profile, self.shape = profile_index, None
                return 0 <= profile_index < engine_profiles(self.engine)

            def set_input_shape(self, name: str, shape: Any) -> bool:
                d.log("IExecutionContext.set_input_shape", name, tuple(shape))
                _, low, _, high = self.engine.plan["profiles"][self.profile]
                self.shape = tuple(shape)
                return all(a <= s <= b for s, a, b in zip(self.shape, low, high, strict=True))

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                if name == self.engine.input:
                    return self.shape
                return (self.shape[0], self.engine.io[name][1][1])

            def set_tensor_address(self, name: str, memory: int) -> bool:
                d.log("IExecutionContext.set_tensor_address", name, memory)
                self.addresses[name] = int(memory)
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                d.log("IExecutionContext.execute_async_v3", stream_handle)
                addresses, shape = dict(self.addresses), self.shape

                def run() -> None:
                    dtype = np.dtype(_NUMPY[self.engine.io[self.engine.input][0]])
                    x = np.frombuffer((ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(
                        addresses[self.engine.input]), dtype=dtype).reshape(shape)
                    for name in self.engine.outputs:
                        classes = self.engine.io[name][1][1]
                        out_dtype = np.dtype(_NUMPY[self.engine.io[name][0]])
                        logits = (x.astype(np.float64).mean(axis=(1, 2, 3))[:, None] * np.arange(1, classes + 1))
                        data = np.ascontiguousarray(logits.astype(out_dtype))
                        ctypes.memmove(addresses[name], data.ctypes.data, data.nbytes)

                if d.capturing is not None:
                    d.capturing.append(run)
                else:
                    run()
                return True

        def engine_profiles(engine: Engine) -> int:
            return len(engine.plan["profiles"])

        class Engine:
            def __init__(self, plan: dict[str, Any]) -> None:
                self.plan = plan
                self.io = {name: (dtype, shape) for name, dtype, shape, _ in plan["io"]}
                self.names = [name for name, *_ in plan["io"]]
                self.input = next(name for name, *_, mode in plan["io"] if mode == "INPUT")
                self.outputs = [name for name, *_, mode in plan["io"] if mode == "OUTPUT"]
                self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(plan["profiles"])

            def get_tensor_name(self, index: int) -> str:
                return self.names[index]

            def get_tensor_mode(self, name: str) -> Any:
                return trt.TensorIOMode.INPUT if name == self.input else trt.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name: str) -> DataType:
                return DataType[self.io[name][0]]

            def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
                _, low, opt, high = self.plan["profiles"][profile_index]
                return [tuple(low), tuple(opt), tuple(high)]

            def create_execution_context(self) -> Context:
                d.log("ICudaEngine.create_execution_context")
                return Context(self)

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                d.log("Runtime", logger)
                self.engine_host_code_allowed = False

            def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
                d.log("Runtime.deserialize_cuda_engine", self.engine_host_code_allowed)
                data = bytes(serialized_engine)
                if not data.startswith(b"DOUBLE-PLAN"):
                    return None
                return Engine(json.loads(data[len(b"DOUBLE-PLAN"):]))

        for cls in (Logger, IProgressMonitor, OnnxParser, Builder, Runtime):
            setattr(trt, cls.__name__, cls)
        return trt

    # ------------------------------------------------------------------ cuda.bindings.runtime
    def _make_cudart(self) -> types.ModuleType:
        d = self
        rt = types.ModuleType("cuda.bindings.runtime")
        rt.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1,
                                                      "cudaErrorInsufficientDriver": 35,
                                                      "cudaErrorStreamCaptureInvalidated": 901})
        rt.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2,
                                                            "cudaMemcpyDeviceToDevice": 3})
        rt.cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", {"cudaStreamCaptureModeThreadLocal": 1})
        ok, bad = rt.cudaError_t.cudaSuccess, rt.cudaError_t.cudaErrorInvalidValue

        class Stream(int):
            pass

        def alloc(nbytes: int) -> tuple[Any, int]:
            buffer = np.zeros(int(nbytes), dtype=np.uint8)
            d.memory[buffer.ctypes.data] = buffer
            return ok, buffer.ctypes.data

        def release(ptr: int) -> tuple[Any]:
            return (ok,) if d.memory.pop(int(ptr), None) is not None else (bad,)

        def copy(dst: int, src: int, count: int, kind: Any, stream: Any = None) -> tuple[Any]:
            d.log("cudaMemcpyAsync", kind)
            work = lambda: ctypes.memmove(int(dst), int(src), int(count))  # noqa: E731
            if d.capturing is not None:
                d.capturing.append(work)
            else:
                work()
            return (ok,)

        def device_count() -> tuple[Any, int]:
            if d.device_count == 0:
                return rt.cudaError_t.cudaErrorInsufficientDriver, 0
            return ok, d.device_count

        def begin_capture(stream: Any, mode: Any) -> tuple[Any]:
            d.log("cudaStreamBeginCapture", mode)
            d.capturing = []
            return (ok,)

        def end_capture(stream: Any) -> tuple[Any, list]:
            d.log("cudaStreamEndCapture")
            graph, d.capturing = d.capturing, None
            if d.fail_capture:
                return rt.cudaError_t.cudaErrorStreamCaptureInvalidated, None
            return ok, graph

        def launch(graph_exec: Any, stream: Any) -> tuple[Any]:
            d.log("cudaGraphLaunch")
            for work in graph_exec:
                work()
            return (ok,)

        functions = {
            "cudaGetErrorName": lambda error: (ok, rt.cudaError_t(int(error)).name.encode()),
            "cudaGetDeviceCount": device_count,
            "cudaSetDevice": lambda device: (ok,) if device < d.device_count else (bad,),
            "cudaGetDeviceProperties": lambda device: (ok, types.SimpleNamespace(
                name=d.gpu[0].encode() + b"\x00", major=d.gpu[1], minor=d.gpu[2])),
            "cudaMalloc": alloc, "cudaMallocHost": alloc, "cudaFree": release, "cudaFreeHost": release,
            "cudaMemcpyAsync": copy,
            "cudaMemcpy": lambda dst, src, count, kind: (ctypes.memmove(int(dst), int(src), int(count)), (ok,))[1],
            "cudaStreamCreate": lambda: (ok, Stream(0x5EED)),
            "cudaStreamSynchronize": lambda stream: (d.log("cudaStreamSynchronize"), (ok,))[1],
            "cudaStreamDestroy": lambda stream: (ok,),
            "cudaStreamBeginCapture": begin_capture, "cudaStreamEndCapture": end_capture,
            "cudaGraphInstantiate": lambda graph, flags: (ok, list(graph)),
            "cudaGraphLaunch": launch,
            "cudaGraphExecDestroy": lambda graph_exec: (ok,), "cudaGraphDestroy": lambda graph: (ok,),
        }
        for name, function in functions.items():
            setattr(rt, name, function)
        return rt
