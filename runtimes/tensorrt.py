"""Native TensorRT runtime: a ``vitdeploy build`` engine run with tensorrt + cuda-python (no torch).

``TensorRTRuntime("model.engine")`` (or ``vitdeploy.runtimes.load("model.engine")``):

1. reads the manifest ``model.engine.json`` and refuses — with :class:`EngineMismatchError`,
   naming every mismatch — an engine whose sha256, TensorRT version or GPU compute capability
   does not match it (``force=True`` loads anyway, with a warning);
2. deserializes with ``trt.Runtime.deserialize_cuda_engine`` (``engine_host_code_allowed`` for
   version-compatible engines) and makes one execution context and one CUDA stream;
3. allocates device buffers and pinned host buffers once, sized for the largest shape of any
   optimization profile (output sizes from ``IExecutionContext.get_tensor_shape`` after
   ``set_input_shape`` to each profile's max, as NVIDIA's ``samples/python/common_runtime.py``);
4. per call: checks the input like every runtime (:func:`~vitdeploy.runtimes.base.validate_input`)
   and against the engine's profiles (:func:`~vitdeploy.engine_manifest.select_profile`), switches
   profile with ``set_optimization_profile_async`` when needed, ``set_input_shape``,
   ``set_tensor_address``, copies in (``cudaMemcpyAsync``), ``execute_async_v3``, copies out,
   ``cudaStreamSynchronize``.

``cuda_graphs=True`` captures one CUDA graph per (profile, input shape) after a first plain
``execute_async_v3`` (the documented warm-up after a shape change) and replays it afterwards.

Device inputs: call it with an object exposing ``__cuda_array_interface__`` or DLPack
(``__dlpack__``, e.g. a CUDA ``torch.Tensor``), or use :meth:`TensorRTRuntime.run_device` with a
raw pointer; the logits come back as a :class:`CudaBuffer` (``__cuda_array_interface__``, so
``torch.as_tensor(buf, device="cuda")`` or ``cupy.asarray(buf)`` wrap it without a copy).

Thread safety: one execution context and one stream serve every call, and a lock serializes
calls (TensorRT forbids using one execution context from two threads at once). Calls from
several threads are safe but do not overlap on the GPU; for concurrency, make one runtime per
thread.

API sources: TensorRT Python API reference (ICudaEngine, IExecutionContext, Runtime) for
10.x and 11.x, https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/ ;
cuda-python's ``cuda.bindings.runtime`` (cudaMalloc, cudaMallocHost, cudaMemcpyAsync,
cudaStreamCreate, cudaStreamSynchronize, cudaStreamBeginCapture/EndCapture,
cudaGraphInstantiate/Launch), https://nvidia.github.io/cuda-python/ .

Neither tensorrt nor cuda-python is imported at module import; numpy only.

Verification status: written from NVIDIA's documentation on machines where TensorRT cannot be
installed. It has run against the test double in ``tests/trt_double.py`` (call names, order,
values) and, for the CUDA calls, against real cuda-python 12.9 and 13.5 without a GPU (argument
types and error paths) — never against a real TensorRT. ``tests/test_tensorrt_gpu.py`` (run by
``benchmarks/gpu_check.sh``) is the first real run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.engine_manifest import (
    EngineManifest,
    EngineMismatchError,
    Environment,
    OptimizationProfile,
    check_compatibility,
    envelope,
    format_shape,
    manifest_path_for,
    select_profile,
)
from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.runtimes.base import InputSpec, Runtime, validate_input
from vitdeploy.tensorrt_env import (
    INSTALL_HINT,
    CudaApi,
    CudaError,
    TensorRTUnavailable,
    cuda_device_info,
    dtype_name,
    import_cudart,
    import_tensorrt,
)

__all__ = [
    "CudaBuffer",
    "EngineMismatchError",
    "TensorRTRuntime",
    "TensorRTUnavailable",
    "cuda_device_info",
    "import_cudart",
    "import_tensorrt",
]

MAX_CUDA_GRAPHS = 16


def _host_view(ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 numpy view of ``nbytes`` of host memory at ``ptr`` (pinned memory from cudaMallocHost)."""
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=np.uint8)


@dataclass
class DeviceTensor:
    """A CUDA array handed in by the caller: pointer, shape, dtype, and what keeps it alive."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    owner: Any = None
    stream: int | None = None


def _c_contiguous(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    expected = itemsize
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def from_cuda_array_interface(obj: Any) -> DeviceTensor:
    """Parse ``obj.__cuda_array_interface__`` (v2/v3); ``ValueError`` for masked or strided arrays."""
    cai = obj.__cuda_array_interface__
    if cai.get("mask") is not None:
        raise ValueError("masked CUDA arrays are not supported")
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None and not _c_contiguous(shape, tuple(strides), dtype.itemsize):
        raise ValueError(f"CUDA array with strides {tuple(strides)} is not C-contiguous; make it contiguous first")
    stream = cai.get("stream")
    return DeviceTensor(int(cai["data"][0]), shape, dtype.name, obj, int(stream) if stream else None)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


DLPACK_CUDA_DEVICES = {2: "cuda", 13: "cuda_managed"}  # kDLCUDA, kDLCUDAManaged
_DLPACK_DTYPES = {
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64", (4, 16): "bfloat16",
    (0, 8): "int8", (0, 32): "int32", (0, 64): "int64", (1, 8): "uint8", (6, 8): "bool",
}


def dltensor_from_capsule(capsule: Any) -> tuple[int, int, tuple[int, ...], str]:
    """Read a legacy (unversioned) DLPack capsule: ``(device_type, data_ptr, shape, dtype)``.

    The capsule is not consumed (not renamed), so its destructor still calls the producer's
    deleter; keep the capsule alive while the pointer is in use. Follows dlpack.h (DLManagedTensor).
    """
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, b"dltensor")
    tensor = ctypes.cast(address, ctypes.POINTER(_DLManagedTensor)).contents.dl_tensor
    shape = tuple(int(tensor.shape[i]) for i in range(tensor.ndim))
    key = (int(tensor.dtype.code), int(tensor.dtype.bits))
    if key not in _DLPACK_DTYPES or tensor.dtype.lanes != 1:
        raise ValueError(f"DLPack dtype code {key[0]} bits {key[1]} lanes {tensor.dtype.lanes} is not supported")
    dtype = _DLPACK_DTYPES[key]
    if tensor.strides:
        strides = tuple(int(tensor.strides[i]) * np.dtype(dtype).itemsize for i in range(tensor.ndim))
        if not _c_contiguous(shape, strides, np.dtype(dtype).itemsize):
            raise ValueError(f"DLPack tensor with shape {shape} is not C-contiguous; make it contiguous first")
    return int(tensor.device.device_type), int(tensor.data or 0) + int(tensor.byte_offset), shape, dtype


def from_dlpack(obj: Any, stream: int | None) -> DeviceTensor:
    """A CUDA DLPack producer (``__dlpack__``/``__dlpack_device__``) as a :class:`DeviceTensor`.

    ``stream`` is passed to ``__dlpack__`` so the producer orders its pending work before ours.
    """
    device_type, _ = obj.__dlpack_device__()
    if int(device_type) not in DLPACK_CUDA_DEVICES:
        raise ValueError(f"DLPack tensor lives on device type {int(device_type)}, not CUDA; pass a numpy array instead")
    try:
        capsule = obj.__dlpack__(stream=stream)
    except TypeError:
        capsule = obj.__dlpack__()
    _, ptr, shape, dtype = dltensor_from_capsule(capsule)
    return DeviceTensor(ptr, shape, dtype, owner=(obj, capsule))


def as_device_tensor(obj: Any, stream: int | None = None) -> DeviceTensor:
    """Accept a :class:`DeviceTensor`, a CUDA DLPack producer or a ``__cuda_array_interface__`` object.

    DLPack is preferred when the object offers both (torch, CuPy): it hands ``stream`` to the
    producer, which orders its pending work before ours; ``__cuda_array_interface__`` v2 (torch's)
    carries no stream at all.
    """
    if isinstance(obj, DeviceTensor):
        return obj
    dlpack = hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")
    cai = hasattr(obj, "__cuda_array_interface__")
    if dlpack and (not cai or int(obj.__dlpack_device__()[0]) in DLPACK_CUDA_DEVICES):
        return from_dlpack(obj, stream)
    if cai:
        return from_cuda_array_interface(obj)
    raise ValueError(
        f"expected a numpy.ndarray or a CUDA array (__cuda_array_interface__ or DLPack), got {type(obj).__name__}"
    )


def check_input_shape(spec: InputSpec, profiles: list[OptimizationProfile], shape: tuple[int, ...], dtype: str) -> int:
    """The checks every runtime runs, on shape and dtype alone, plus the profile fit; returns the profile index."""
    validate_input(spec, np.broadcast_to(np.zeros((), dtype=dtype), shape))
    return select_profile(profiles, shape)


class CudaBuffer:
    """Device memory the runtime allocated for an output; exposes ``__cuda_array_interface__`` (v3).

    Freed when garbage-collected (or by :meth:`free`). :meth:`to_host` copies it to numpy.
    """

    def __init__(self, cuda: CudaApi, shape: tuple[int, ...], dtype: str) -> None:
        self._cuda = cuda
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr: int | None = cuda.malloc(self.nbytes)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if self.ptr is None:
            raise ValueError("CudaBuffer was freed")
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def to_host(self) -> np.ndarray:
        """Copy to a new numpy array (synchronous)."""
        out = np.empty(self.shape, dtype=self.dtype)
        self._cuda.check(
            self._cuda.rt.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, self._cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost),
            "cudaMemcpy(dtoh)",
        )
        return out

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            self._cuda.free(ptr)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown or a dead context: nothing to report
            self.free()


@dataclass
class _Buffer:
    device: int
    host: int
    nbytes: int
    dtype: str


class TensorRTRuntime(Runtime):
    """Run a TensorRT engine built by ``vitdeploy build``; see the module docstring.

    ``force=True`` loads an engine despite manifest mismatches (or without a manifest, taking the
    profiles from the engine itself), with a warning. ``device`` picks the CUDA device.
    """

    def __init__(
        self,
        engine_path: str | Path,
        *,
        force: bool = False,
        device: int = 0,
        cuda_graphs: bool = False,
        check_finite: bool = False,
        manifest: str | Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.check_finite = check_finite
        self.cuda_graphs = cuda_graphs
        self._lock = threading.Lock()
        self._closed = True
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"engine {self.engine_path} not found")
        manifest_file = Path(manifest) if manifest is not None else manifest_path_for(self.engine_path)
        try:
            self.manifest: EngineManifest | None = EngineManifest.read(manifest_file)
        except FileNotFoundError:
            if not force:
                raise
            warnings.warn(f"loading {self.engine_path} without a manifest (force=True): nothing is checked", stacklevel=2)
            self.manifest = None
        data = self.engine_path.read_bytes()
        if self.manifest is not None:
            # Decided before TensorRT is even imported: a foreign or stale engine is refused on any
            # machine; only a matching one on a machine without TensorRT hears that it is missing.
            self._refuse_or_warn(check_compatibility(self.manifest, engine_sha256=hashlib.sha256(data).hexdigest()),
                                 force)
        problems = []
        trt = import_tensorrt()
        cuda = CudaApi(import_cudart(), device)
        try:
            cuda.set_device()
            gpu = cuda.device_info()
        except CudaError as error:
            raise TensorRTUnavailable(f"no usable CUDA GPU here ({error}); {INSTALL_HINT}") from None
        self.environment = Environment(str(trt.__version__), gpu)
        if self.manifest is not None:
            problems += check_compatibility(self.manifest, self.environment)
        self._refuse_or_warn(problems, force)
        self._trt, self._cuda = trt, cuda
        self._load(data, verbose, force)

    def _refuse_or_warn(self, problems: list[str], force: bool) -> None:
        if not problems:
            return
        text = f"engine {self.engine_path} does not match this machine or its manifest: " + "; ".join(problems)
        if not force:
            raise EngineMismatchError(text + " (pass force=True to load it anyway)")
        warnings.warn(text + " (loading anyway: force=True)", stacklevel=3)

    def _load(self, data: bytes, verbose: bool, force: bool) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.manifest is not None and self.manifest.version_compatible:
            self._runtime.engine_host_code_allowed = True  # the engine embeds its lean runtime
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.engine_path} (see the TensorRT log above)")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not self._outputs:
            raise ValueError(f"engine {self.engine_path} has inputs {inputs} and outputs {self._outputs}; "
                             "expected one input and at least one output")
        self._input = inputs[0]
        self._dtypes = {n: dtype_name(engine.get_tensor_dtype(n)) for n in names}
        self.profiles = self._engine_profiles(force)
        self.metadata: ArtifactMetadata | None = self.manifest.artifact_metadata() if self.manifest else None
        batch, height, width = envelope(self.profiles)
        self.input_spec = InputSpec(
            name=self._input, dtype=self._dtypes[self._input], channels=self.profiles[0].min[1],
            batch=batch, height=height, width=width,
            multiple_of=self.metadata.stride if self.metadata is not None else 1,
        )
        self._logits = "logits" if "logits" in self._outputs else self._outputs[0]
        self._context = engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.engine_path}")
        self._stream = cuda.stream_create()
        self._closed = False
        self._graphs: collections.OrderedDict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = collections.OrderedDict()
        self._buffers: dict[str, _Buffer] = {}
        self._active_profile: int | None = None
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _engine_profiles(self, force: bool) -> list[OptimizationProfile]:
        engine = self._engine
        from_engine = [
            OptimizationProfile(self._input, *(tuple(d) for d in engine.get_tensor_profile_shape(self._input, i)))
            for i in range(engine.num_optimization_profiles)
        ]
        if self.manifest is None:
            return from_engine
        if [p.to_dict() for p in self.manifest.profiles] != [p.to_dict() for p in from_engine]:
            self._refuse_or_warn([f"the engine's optimization profiles {[p.describe() for p in from_engine]} differ "
                                  f"from the manifest's {[p.describe() for p in self.manifest.profiles]}"], force)
        return from_engine

    def _allocate(self) -> None:
        """Device + pinned host buffers sized for the largest shape of any profile (allocated once)."""
        cuda, context = self._cuda, self._context
        sizes = {name: 0 for name in (self._input, *self._outputs)}
        for index, profile in enumerate(self.profiles):
            self._select(index)
            if not context.set_input_shape(self._input, profile.max):
                raise RuntimeError(f"set_input_shape({self._input}, {format_shape(profile.max)}) failed for profile {index}")
            sizes[self._input] = max(sizes[self._input], int(np.prod(profile.max)))
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"output {name} has unresolved shape {shape} for profile {index}")
                sizes[name] = max(sizes[name], int(np.prod(shape)))
        cuda.synchronize(self._stream)
        for name, count in sizes.items():
            nbytes = count * np.dtype(self._dtypes[name]).itemsize
            device = cuda.malloc(nbytes)
            try:
                host = cuda.malloc_host(nbytes)
            except BaseException:
                cuda.free(device)
                raise
            self._buffers[name] = _Buffer(device, host, nbytes, self._dtypes[name])

    def _select(self, index: int) -> None:
        # A fresh context starts on profile 0; switching is enqueued on our stream, so it is ordered before the next enqueue.
        if self._active_profile != index:
            if not self._context.set_optimization_profile_async(index, int(self._stream)):
                raise RuntimeError(f"set_optimization_profile_async({index}) failed")
            self._active_profile = index

    def _bind(self, index: int, shape: tuple[int, ...], addresses: dict[str, int]) -> dict[str, tuple[int, ...]]:
        self._select(index)
        if not self._context.set_input_shape(self._input, shape):
            raise ValueError(f"TensorRT rejected input shape {format_shape(shape)} for profile {index}")
        for name, address in addresses.items():
            if not self._context.set_tensor_address(name, address):
                raise RuntimeError(f"set_tensor_address({name}) failed")
        return {name: tuple(self._context.get_tensor_shape(name)) for name in self._outputs}

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"execute_async_v3 failed for {self.engine_path} (see the TensorRT log above)")

    def _capture(self) -> tuple[Any, Any]:
        cuda, stream = self._cuda, self._stream
        self._execute()  # after a shape change TensorRT must run once before capture
        cuda.synchronize(stream)
        cuda.begin_capture(stream)
        try:
            captured = self._context.execute_async_v3(int(stream))
        finally:
            graph = cuda.end_capture(stream)  # always leave capture mode
        if not captured:
            raise RuntimeError("execute_async_v3 failed during CUDA graph capture")
        return graph, cuda.instantiate(graph)

    def _execute_graph(self, key: tuple[int, tuple[int, ...]]) -> None:
        cached = self._graphs.get(key)
        if cached is None:
            try:
                cached = self._capture()
            except (CudaError, RuntimeError) as error:
                # Some engines cannot be captured (e.g. data-dependent shapes); run them plainly.
                warnings.warn(f"CUDA graph capture failed ({error}); running {self.engine_path} without CUDA graphs",
                              stacklevel=4)
                self.cuda_graphs = False
                self._execute()
                return
            self._graphs[key] = cached
            if len(self._graphs) > MAX_CUDA_GRAPHS:
                self._cuda.destroy_graph(*self._graphs.popitem(last=False)[1])
        self._graphs.move_to_end(key)
        self._cuda.launch(cached[1], self._stream)

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TensorRTRuntime for {self.engine_path} is closed")

    def __call__(self, pixel_values: Any) -> Any:
        """numpy in → numpy logits out; a CUDA array (CAI or DLPack) in → :class:`CudaBuffer` out."""
        if isinstance(pixel_values, np.ndarray):
            return super().__call__(pixel_values)
        return self.run_device(pixel_values)

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        shape = tuple(pixel_values.shape)
        index = select_profile(self.profiles, shape)
        pixel_values = np.ascontiguousarray(pixel_values)
        with self._lock:
            self._ensure_open()
            cuda, stream, buffers = self._cuda, self._stream, self._buffers
            cuda.set_device()
            source = buffers[self._input]
            out_shapes = self._bind(index, shape, {name: buf.device for name, buf in buffers.items()})
            _host_view(source.host, pixel_values.nbytes)[:] = pixel_values.reshape(-1).view(np.uint8)
            cuda.copy_async(source.device, source.host, pixel_values.nbytes, "htod", stream)
            if self.cuda_graphs:
                self._execute_graph((index, shape))
            else:
                self._execute()
            result = buffers[self._logits]
            nbytes = int(np.prod(out_shapes[self._logits])) * np.dtype(result.dtype).itemsize
            cuda.copy_async(result.host, result.device, nbytes, "dtoh", stream)
            cuda.synchronize(stream)
            return _host_view(result.host, nbytes).view(result.dtype).reshape(out_shapes[self._logits]).copy()

    def run_device(self, pixel_values: Any, out: Any = None, shape: tuple[int, ...] | None = None,
                   dtype: str | None = None) -> Any:
        """Run on device memory without host copies; returns the logits on the device.

        ``pixel_values``: a ``__cuda_array_interface__``/DLPack object, or a raw device pointer
        (``int``) with ``shape`` and ``dtype``. ``out``: an optional C-contiguous CUDA array of the
        logits' shape and dtype to write into (returned); otherwise a new :class:`CudaBuffer`.
        The input's contents are not checked for NaN/Inf (that would need a device copy).
        """
        self._ensure_open()
        if isinstance(pixel_values, int):
            if shape is None:
                raise ValueError("a raw device pointer needs shape= (and dtype=, default the engine's input dtype)")
            tensor = DeviceTensor(pixel_values, tuple(int(d) for d in shape), dtype or self.input_spec.dtype)
        else:
            tensor = as_device_tensor(pixel_values, stream=int(self._stream))
        index = check_input_shape(self.input_spec, self.profiles, tensor.shape, tensor.dtype)
        with self._lock:
            self._ensure_open()
            cuda, stream = self._cuda, self._stream
            cuda.set_device()
            if tensor.stream is not None:
                cuda.synchronize(tensor.stream)  # __cuda_array_interface__ v3: the producer's stream must be done
            addresses = {name: buf.device for name, buf in self._buffers.items() if name != self._input}
            addresses[self._input] = tensor.ptr
            out_shape = self._bind(index, tensor.shape, addresses)[self._logits]
            result = out if out is not None else CudaBuffer(cuda, out_shape, self._dtypes[self._logits])
            target = as_device_tensor(result, stream=int(stream))
            if target.shape != out_shape or target.dtype != self._dtypes[self._logits]:
                raise ValueError(f"out must be {self._dtypes[self._logits]} of shape {out_shape}, "
                                 f"got {target.dtype} {target.shape}")
            if not self._context.set_tensor_address(self._logits, target.ptr):
                raise RuntimeError(f"set_tensor_address({self._logits}) failed")
            self._execute()
            cuda.synchronize(stream)
            return result

    def close(self) -> None:
        """Free buffers, graphs, stream, context and engine; calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cuda = self._cuda
            for graph, graph_exec in self._graphs.values():
                cuda.destroy_graph(graph, graph_exec)
            self._graphs.clear()
            for buffer in self._buffers.values():
                cuda.free(buffer.device)
                cuda.free_host(buffer.host)
            self._buffers.clear()
            cuda.stream_destroy(self._stream)
            self._context = self._engine = self._runtime = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # best effort at interpreter shutdown
            self.close()
