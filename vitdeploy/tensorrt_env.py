"""The CUDA/TensorRT environment both the builder and the runtime need (numpy-free, torch-free).

The TensorRT import and its one-line error, cuda-python's runtime module, TensorRT dtype
names, and the handful of CUDA runtime calls (device count/properties, memory, streams,
graphs) with error checking. Neither ``tensorrt`` nor ``cuda-python`` is imported until a
function here is called, so importing this module costs nothing on a machine without them.
"""

from __future__ import annotations

import importlib
from typing import Any

from vitdeploy.engine_manifest import GpuInfo

INSTALL_HINT = "pip install 'vitdeploy[gpu]' (tensorrt and cuda-python) on a machine with an NVIDIA GPU and driver"
# trt.DataType member names → numpy dtype names (trt.nptype is not defined for every member).
TRT_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
}


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing here; the message says which and how to get it."""


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def import_tensorrt() -> Any:
    """``import tensorrt`` or :class:`TensorRTUnavailable` with one line saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as error:  # OSError: the bindings import but libnvinfer is missing
        raise TensorRTUnavailable(f"TensorRT is not installed here ({error}); {INSTALL_HINT}") from None


def import_cudart() -> Any:
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as error:
            errors.append(str(error))
    raise TensorRTUnavailable(f"cuda-python is not installed here ({errors[0]}); {INSTALL_HINT}")


def dtype_name(trt_dtype: Any) -> str:
    """numpy dtype name of a ``trt.DataType`` (by member name, so it works for every TensorRT version)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_DTYPES:
        raise ValueError(f"TensorRT data type {name} has no numpy equivalent vitdeploy supports")
    return TRT_DTYPES[name]


class CudaApi:
    """The few cuda-python runtime calls the runtime and the builder need, with error checking.

    Every ``cuda.bindings.runtime`` function returns ``(cudaError_t, *results)``; :meth:`check`
    raises :class:`CudaError` with the error's name unless it is ``cudaSuccess`` (0).
    """

    def __init__(self, cudart: Any, device: int = 0) -> None:
        self.rt = cudart
        self.device = device

    def check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            try:
                name = self.rt.cudaGetErrorName(err)[1]
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # the name is only for the message
                name = str(err)
            raise CudaError(f"{what} failed: {name}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        return int(self.check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def set_device(self) -> None:
        self.check(self.rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def device_info(self) -> GpuInfo:
        props = self.check(self.rt.cudaGetDeviceProperties(self.device), f"cudaGetDeviceProperties({self.device})")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name.rstrip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(int(nbytes), 1)), f"cudaMallocHost({nbytes})"))

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def free_host(self, ptr: int) -> None:
        self.check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream_create(self) -> Any:
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_destroy(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def synchronize(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def copy_async(self, dst: int, src: int, nbytes: int, kind: str, stream: Any) -> None:
        """``kind``: ``"htod"``, ``"dtoh"`` or ``"dtod"``."""
        kinds = self.rt.cudaMemcpyKind
        member = {"htod": kinds.cudaMemcpyHostToDevice, "dtoh": kinds.cudaMemcpyDeviceToHost,
                  "dtod": kinds.cudaMemcpyDeviceToDevice}[kind]
        self.check(self.rt.cudaMemcpyAsync(dst, src, int(nbytes), member, stream), f"cudaMemcpyAsync({kind})")

    def begin_capture(self, stream: Any) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream: Any) -> Any:
        return self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")

    def instantiate(self, graph: Any) -> Any:
        return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        self.check(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        self.check(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")


def cuda_device_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``; :class:`TensorRTUnavailable` if there is none."""
    cuda = CudaApi(import_cudart(), device)
    try:
        count = cuda.device_count()
    except CudaError as error:
        raise TensorRTUnavailable(f"no usable CUDA GPU here ({error}); {INSTALL_HINT}") from None
    if count <= device:
        raise TensorRTUnavailable(f"CUDA device {device} does not exist here ({count} visible); {INSTALL_HINT}")
    return cuda.device_info()
