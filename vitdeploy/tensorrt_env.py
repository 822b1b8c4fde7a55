"""The CUDA/TensorRT environment both the builder and the runtime need (numpy-free, torch-free).

The TensorRT import and its one-line error, the process's one ``trt.Logger``, cuda-python's
runtime module, TensorRT dtype names, and the handful of CUDA runtime calls (device
count/properties/selection, driver version, memory, streams, graphs) with error checking.
Neither ``tensorrt`` nor ``cuda-python`` is imported until a function here is called, so
importing this module costs nothing on a machine without them.

Rules from NVIDIA's sources that this module encodes (TensorRT 10.16 / 11.1
``include/NvInferRuntime.h`` and ``python/docstrings/infer/pyCoreDoc.h``; cuda-python 13.x
``cuda.bindings.runtime``):

- ``IExecutionContext::setTensorAddress``: "The pointer must have at least 256-byte alignment"
  (:data:`TENSORRT_ALIGNMENT`); it returns false otherwise.
- The current CUDA device is per host thread (``cudaSetDevice``); TensorRT builds and runs on
  the current device of the calling thread, so every thread that touches an engine or a
  builder selects the device first (:meth:`CudaApi.set_device`).
- One logger per process: TensorRT keeps the first ``ILogger`` it is given and warns that a
  different one "differs from one already provided"; Polygraphy's ``get_trt_logger()`` keeps one
  for the same reason (:func:`get_logger`).
- A failed ``cudaStreamEndCapture`` or a failed capture body still leaves a ``cudaGraph_t`` to
  destroy (:meth:`CudaApi.capture`).

Verification status of the TensorRT code (this module, the engine builder
``vitdeploy.exporters.tensorrt_build`` and the runtime ``vitdeploy.runtimes.tensorrt``): written from
NVIDIA's documentation and binding sources on machines where TensorRT cannot be installed. It has run
against the test double in ``tests/trt_double.py`` (call names, order, values, and the rules it
enforces) and, for the CUDA calls, against real cuda-python 12.9 and 13.5 without a GPU (argument
types and error paths) — never against a real TensorRT. ``tests/test_tensorrt_gpu.py`` (run by
``benchmarks/gpu_check.sh``) is the first real run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from vitdeploy.engine_manifest import GpuInfo

# The one supported set (pyproject's `gpu` extra): TensorRT 10.x built for CUDA 13, cuda-python 13,
# onnxruntime-gpu 1.31+ (whose TensorRT provider links libnvinfer.so.10 and libcudart.so.13).
SUPPORTED_TENSORRT_MAJOR = 10
CUDA_MAJOR = 13
MIN_DRIVER = "580"  # CUDA 13.0 needs an r580 (or newer) Linux driver (CUDA toolkit release notes, table 3)
INSTALL_HINT = (
    "pip install 'vitdeploy[gpu]' (tensorrt-cu13 10.x, cuda-python 13) on a machine with an NVIDIA GPU "
    f"and driver >= {MIN_DRIVER}"
)
TENSORRT_ALIGNMENT = 256  # bytes; NvInferRuntime.h, IExecutionContext::setTensorAddress
# trt.DataType member names → numpy dtype names (trt.nptype is not defined for every member).
TRT_DTYPES = {
    "FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
    "INT64": "int64", "BOOL": "bool", "UINT8": "uint8",
}
# cudaError_t names that mean "this machine's driver or GPU", with what to do about them.
_DRIVER_ERRORS = {
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than this CUDA runtime needs",
    "cudaErrorNoDevice": "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)",
    "cudaErrorInvalidDevice": "the CUDA device number is not a visible GPU (check CUDA_VISIBLE_DEVICES)",
    "cudaErrorSystemDriverMismatch": "the NVIDIA kernel module and user-space driver versions differ (reboot or reinstall the driver)",
    "cudaErrorCompatNotSupportedOnDevice": "this GPU does not support the CUDA forward-compatibility package in use",
    "cudaErrorInitializationError": "the CUDA driver failed to initialise",
}


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python, a usable driver or a CUDA GPU is missing here; the message says which and how to get it."""


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


_LOGGERS: dict[int, tuple[Any, Any]] = {}


def get_logger(trt: Any) -> Any:
    """The process's one ``trt.Logger`` (at WARNING), for every Builder, OnnxParser and Runtime.

    TensorRT registers the first logger it is given globally and warns when a Builder/Runtime
    brings another; Polygraphy's ``get_trt_logger()`` keeps a single one likewise. Keyed by the
    module object so a test double never receives the real module's logger.
    """
    entry = _LOGGERS.get(id(trt))
    if entry is None or entry[0] is not trt:
        entry = (trt, trt.Logger(trt.Logger.WARNING))
        _LOGGERS[id(trt)] = entry
    return entry[1]


@contextlib.contextmanager
def logger_severity(trt: Any, verbose: bool) -> Iterator[Any]:
    """The one logger, at VERBOSE for the duration when ``verbose`` (``Logger.min_severity`` is read-write)."""
    logger = get_logger(trt)
    if not verbose:
        yield logger
        return
    previous = logger.min_severity
    logger.min_severity = trt.Logger.VERBOSE
    try:
        yield logger
    finally:
        logger.min_severity = previous


def dtype_name(trt_dtype: Any) -> str:
    """numpy dtype name of a ``trt.DataType`` (by member name, so it works for every TensorRT version)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_DTYPES:
        raise ValueError(f"TensorRT data type {name} has no numpy equivalent vitdeploy supports")
    return TRT_DTYPES[name]


def is_aligned(address: int, alignment: int = TENSORRT_ALIGNMENT) -> bool:
    """Whether a device address meets TensorRT's tensor-address alignment (256 bytes)."""
    return int(address) % alignment == 0


def check_ort_tensorrt_version(trt: Any) -> None:
    """Refuse a TensorRT major other than the one onnxruntime-gpu's TensorRT provider links (``libnvinfer.so.10``)."""
    from vitdeploy.engine_manifest import parse_version

    major = parse_version(trt.__version__)[0]
    if major != SUPPORTED_TENSORRT_MAJOR:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is installed, but onnxruntime-gpu's TensorRT provider links "
            f"libnvinfer.so.{SUPPORTED_TENSORRT_MAJOR}: pip install 'vitdeploy[gpu]' (TensorRT {SUPPORTED_TENSORRT_MAJOR}.x), "
            "or use the native TensorRT runtime (vitdeploy build + TensorRTRuntime), which runs TensorRT 11 too"
        )


def _loaded_libraries(pattern: str) -> list[str]:
    """Paths of shared objects mapped into this process whose file name starts with ``pattern`` (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(pattern))


def preload_tensorrt_libraries() -> list[str]:
    """Load pip-installed TensorRT's libraries so onnxruntime's TensorRT provider finds them.

    onnxruntime-gpu 1.31's ``libonnxruntime_providers_tensorrt.so`` needs ``libnvinfer.so.10`` and
    ``libnvonnxparser.so.10`` (its DT_NEEDED entries); pip puts them in
    ``site-packages/tensorrt_libs``, which is on no search path, and ``onnxruntime.preload_dlls()``
    covers CUDA and cuDNN only. ``import tensorrt`` loads them from that folder (its
    ``__init__`` imports ``tensorrt_libs``; the bindings link both), and the dynamic loader
    resolves a later request for the same soname to the loaded library. Returns the loaded paths;
    :class:`TensorRTUnavailable` says what to install or set (Linux reads ``/proc/self/maps``).
    """
    trt = import_tensorrt()
    check_ort_tensorrt_version(trt)
    major = SUPPORTED_TENSORRT_MAJOR
    needed = [f"libnvinfer.so.{major}", f"libnvonnxparser.so.{major}"]
    loaded = [path for soname in needed for path in _loaded_libraries(soname)]
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/maps"):
        missing = [soname for soname in needed if not _loaded_libraries(soname)]
        if missing:
            package = os.path.dirname(os.path.abspath(getattr(trt, "__file__", None) or "tensorrt"))
            folder = os.path.join(os.path.dirname(package), "tensorrt_libs")
            raise TensorRTUnavailable(
                f"`import tensorrt` did not load {', '.join(missing)}, which onnxruntime's TensorRT provider needs: "
                f"export LD_LIBRARY_PATH={folder}:$LD_LIBRARY_PATH (the folder tensorrt-cu13-libs installs)"
            )
    return loaded


class CudaApi:
    """The few cuda-python runtime calls the runtime and the builder need, with error checking.

    Every ``cuda.bindings.runtime`` function returns ``(cudaError_t, *results)``; :meth:`check`
    raises :class:`CudaError` with the error's name unless it is ``cudaSuccess`` (0).
    """

    def __init__(self, cudart: Any, device: int = 0) -> None:
        self.rt = cudart
        self.device = int(device)

    def error_name(self, err: Any) -> str:
        try:
            name = self.rt.cudaGetErrorName(err)[1]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the name is only for the message
            return str(err)

    def check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise CudaError(f"{what} failed: {self.error_name(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        return int(self.check(self.rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))

    def set_device(self) -> None:
        """Make :attr:`device` current for the calling thread (the current device is per thread)."""
        self.check(self.rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")

    def current_device(self) -> int:
        return int(self.check(self.rt.cudaGetDevice(), "cudaGetDevice"))

    @contextlib.contextmanager
    def using_device(self) -> Iterator[None]:
        """Make :attr:`device` current for the calling thread for the block, then restore the thread's device.

        The current device is per thread and shared with every other CUDA user in it (torch,
        CuPy), so work done for an engine on device N must not leave the caller's thread on N.
        """
        previous = self.current_device()
        if previous != self.device:
            self.set_device()
        try:
            yield
        finally:
            if previous != self.device:
                self.check(self.rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")

    def driver_version(self) -> int:
        """The CUDA version the installed driver supports, as ``major * 1000 + minor * 10`` (0: no driver)."""
        return int(self.check(self.rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))

    def runtime_version(self) -> int:
        return int(self.check(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))

    def device_info(self) -> GpuInfo:
        props = self.check(self.rt.cudaGetDeviceProperties(self.device), f"cudaGetDeviceProperties({self.device})")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name.rstrip("\x00").strip(), compute_capability=f"{props.major}.{props.minor}")

    def malloc(self, nbytes: int) -> int:
        """Device memory; ``cudaMalloc`` aligns to at least 256 bytes, as TensorRT requires."""
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

    def capture(self, stream: Any, body: Callable[[], None]) -> tuple[Any, Any]:
        """Capture ``body``'s work on ``stream`` into ``(graph, graph_exec)``; nothing leaks on failure.

        Capture mode is always left (``cudaStreamEndCapture`` even when ``body`` raises), and the
        captured ``cudaGraph_t`` is destroyed when the body, the end of capture or the
        instantiation fails (cuda-python 13: ``cudaStreamEndCapture`` returns ``(err, graph)``;
        ``cudaGraphInstantiate(graph, flags)`` returns ``(err, graphExec)``).
        """
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        failure: BaseException | None = None
        try:
            body()
        except BaseException as error:  # re-raised once capture mode is left and the graph destroyed
            failure = error
        err, graph = self.rt.cudaStreamEndCapture(stream)
        if failure is not None or int(err) != 0:
            if graph:
                self.rt.cudaGraphDestroy(graph)
            if failure is not None:
                raise failure
            raise CudaError(f"cudaStreamEndCapture failed: {self.error_name(err)}")
        try:
            graph_exec = self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BaseException:
            self.rt.cudaGraphDestroy(graph)
            raise
        return graph, graph_exec

    def launch(self, graph_exec: Any, stream: Any) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph: Any, graph_exec: Any) -> None:
        self.check(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
        self.check(self.rt.cudaGraphDestroy(graph), "cudaGraphDestroy")


def _format_cuda_version(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_device_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``, selected for the calling thread.

    :class:`TensorRTUnavailable` with one line naming the cause: no driver, a driver too old for
    this CUDA runtime (with the versions and the minimum driver), no GPU, or no such device.
    """
    cuda = CudaApi(import_cudart(), device)
    try:
        driver = cuda.driver_version()
    except CudaError:
        driver = 0
    try:
        runtime = cuda.runtime_version()
    except CudaError:
        runtime = 0
    if driver == 0:
        raise TensorRTUnavailable(
            f"no NVIDIA driver is installed or loaded here (cudaDriverGetVersion reports none); install driver >= "
            f"{MIN_DRIVER} for CUDA {CUDA_MAJOR}")
    if runtime and driver < runtime:
        raise TensorRTUnavailable(
            f"the NVIDIA driver supports CUDA {_format_cuda_version(driver)} but the CUDA runtime here is "
            f"{_format_cuda_version(runtime)}; update the driver to >= {MIN_DRIVER} (CUDA {CUDA_MAJOR})")
    try:
        count = cuda.device_count()
    except CudaError as error:
        name = str(error).rsplit(": ", 1)[-1]
        cause = _DRIVER_ERRORS.get(name, "the CUDA runtime could not enumerate GPUs")
        raise TensorRTUnavailable(f"{cause} ({error}; driver supports CUDA {_format_cuda_version(driver)}); "
                                  f"{INSTALL_HINT}") from None
    if count <= device:
        raise TensorRTUnavailable(f"CUDA device {device} does not exist here ({count} visible)")
    try:
        cuda.set_device()
    except CudaError as error:
        name = str(error).rsplit(": ", 1)[-1]
        raise TensorRTUnavailable(f"{_DRIVER_ERRORS.get(name, 'CUDA device cannot be used')} ({error})") from None
    return cuda.device_info()
