"""Native TensorRT runtime: a ``vitdeploy build`` engine run with tensorrt + cuda-python (no torch).

``TensorRTRuntime("model.engine")`` (or ``vitdeploy.runtimes.load("model.engine")``):

1. reads the manifest ``model.engine.json`` and refuses — with :class:`EngineMismatchError`,
   naming every mismatch — an engine whose sha256, TensorRT version or GPU compute capability
   does not match it (``force=True`` loads anyway, with a warning);
2. selects CUDA device ``device`` for the calling thread (and again, then restores the caller's
   device, on every call, close and free: the current device is per thread), deserializes with
   ``trt.Runtime(logger).deserialize_cuda_engine`` (the process's one logger;
   ``engine_host_code_allowed`` for version-compatible engines), allocates one scratch buffer of
   ``engine.device_memory_size_v2`` bytes and one CUDA stream;
3. makes execution contexts with ``ExecutionContextAllocationStrategy.USER_MANAGED`` that all
   share that scratch buffer (``set_device_memory(ptr, size)``): safe because every context runs
   on the runtime's one stream, under its lock, one after another;
4. allocates device buffers and pinned host buffers once, sized for the largest shape of any
   optimization profile (output sizes from ``IExecutionContext.get_tensor_shape`` after
   ``set_input_shape`` to each profile's max, as NVIDIA's ``samples/python/common_runtime.py``);
5. per call: checks the input like every runtime (:func:`~vitdeploy.runtimes.base.validate_input`)
   and against the engine's profiles (:func:`~vitdeploy.engine_manifest.select_profile`), switches
   profile with ``set_optimization_profile_async`` when needed, ``set_input_shape``,
   ``set_tensor_address``, copies in (``cudaMemcpyAsync``), ``execute_async_v3``, copies out,
   ``cudaStreamSynchronize``.

``cuda_graphs=True``: a CUDA graph replays work with the execution context's state of capture
time, and TensorRT defers a profile switch's layer-resource update to the next
``execute_async_v3`` — which a graph launch skips. So every cached graph gets its *own*
execution context, bound once to (profile, input shape, the runtime's own buffers) and never
changed afterwards; the main context serves plain calls. Capture follows TensorRT's CUDA-graph
guidance: one plain ``execute_async_v3`` after the shape is set, then capture on the runtime's
(non-default) stream. At most :data:`MAX_CUDA_GRAPHS` graphs are kept (least recently used go).

Device inputs: call it with an object exposing ``__cuda_array_interface__`` or DLPack
(``__dlpack__``, e.g. a CUDA ``torch.Tensor``), or use :meth:`TensorRTRuntime.run_device` with a
raw pointer; the logits come back as a :class:`CudaBuffer` (``__cuda_array_interface__``, so
``torch.as_tensor(buf, device="cuda")`` or ``cupy.asarray(buf)`` wrap it without a copy).
TensorRT needs 256-byte-aligned tensor addresses (``setTensorAddress``, NvInferRuntime.h); a
caller's pointer that is not (a sliced tensor, a DLPack ``byte_offset``) is staged through the
runtime's own buffers with a device-to-device copy, as are all device calls with CUDA graphs.
:meth:`TensorRTRuntime.device_call` returns an enqueue-only callable on its own context for
timing (the benchmark records CUDA events around it on :attr:`TensorRTRuntime.stream_handle`).

Thread safety: a lock serializes calls (TensorRT forbids using one execution context from two
threads at once, and all contexts share one scratch buffer). Calls from several threads are
safe but do not overlap on the GPU; for concurrency, make one runtime per thread.

API sources: TensorRT Python API reference (ICudaEngine, IExecutionContext, Runtime) for 10.x
and 11.x, https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/ , and the
bindings in NVIDIA/TensorRT ``python/src/infer/pyCore.cpp`` (``create_execution_context(strategy)``,
``set_device_memory(memory, size)``, ``device_memory_size_v2``; ``set_optimization_profile_async``
raises ``RuntimeError`` on failure); cuda-python's ``cuda.bindings.runtime`` (cudaMalloc,
cudaMallocHost, cudaMemcpyAsync, cudaStreamCreate, cudaStreamSynchronize,
cudaStreamBeginCapture/EndCapture, cudaGraphInstantiate/Launch), https://nvidia.github.io/cuda-python/ .

Neither tensorrt nor cuda-python is imported at module import; numpy only.

Verification status: never run against a real TensorRT; tested with the test double
``tests/trt_double.py`` (:mod:`vitdeploy.tensorrt_env` says how far that goes).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import threading
import warnings
from dataclasses import dataclass, field
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
from vitdeploy.files import sha256_bytes
from vitdeploy.metadata import ArtifactMetadata
from vitdeploy.outputs import primary_output
from vitdeploy.runtimes.base import InputSpec, Runtime, validate_input
from vitdeploy.tensorrt_env import (
    TENSORRT_ALIGNMENT,
    CudaApi,
    CudaError,
    TensorRTUnavailable,
    cuda_device_info,
    dtype_name,
    import_cudart,
    import_tensorrt,
    is_aligned,
    logger_severity,
)

__all__ = [
    "CudaBuffer",
    "DeviceCall",
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
        with self._cuda.using_device():
            self._cuda.check(
                self._cuda.rt.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes,
                                         self._cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost),
                "cudaMemcpy(dtoh)",
            )
        return out

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            with self._cuda.using_device():
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


@dataclass
class _Binding:
    """One execution context and what is bound to it (a graph context never changes after capture)."""

    context: Any
    profile: int | None = 0  # a fresh context starts on profile 0
    shape: tuple[int, ...] | None = None
    addresses: dict[str, int] = field(default_factory=dict)
    graph: tuple[Any, Any] | None = None  # (cudaGraph_t, cudaGraphExec_t)


class DeviceCall:
    """An enqueue-only call of one engine on fixed device buffers, on its own execution context.

    ``call()`` enqueues the engine (or replays its CUDA graph) on :attr:`stream_handle` and returns
    without synchronising; what :meth:`TensorRTRuntime.device_call` hands the benchmark, whose
    CUDA events bracket exactly this enqueue. Valid until the runtime is closed.
    """

    def __init__(self, runtime: TensorRTRuntime, binding: _Binding, output: Any) -> None:
        self._runtime, self._binding, self.output = runtime, binding, output
        self.stream_handle = runtime.stream_handle

    def __call__(self) -> None:
        self._runtime._enqueue(self._binding)


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
            self._refuse_or_warn(check_compatibility(self.manifest, engine_sha256=sha256_bytes(data)),
                                 force)
        problems = []
        trt = import_tensorrt()
        cuda = CudaApi(import_cudart(), device)
        previous = _current_device(cuda)
        try:
            gpu = cuda_device_info(device)  # selects the device; one clear line for a missing driver or GPU
            self.environment = Environment(str(trt.__version__), gpu)
            if self.manifest is not None:
                problems += check_compatibility(self.manifest, self.environment)
            self._refuse_or_warn(problems, force)
            self._trt, self._cuda = trt, cuda
            self._load(data, verbose, force)
        finally:
            if previous is not None and previous != device:
                cuda.check(cuda.rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")  # the caller's device back

    def _refuse_or_warn(self, problems: list[str], force: bool) -> None:
        if not problems:
            return
        text = f"engine {self.engine_path} does not match this machine or its manifest: " + "; ".join(problems)
        if not force:
            raise EngineMismatchError(text + " (pass force=True to load it anyway)")
        warnings.warn(text + " (loading anyway: force=True)", stacklevel=3)

    def _load(self, data: bytes, verbose: bool, force: bool) -> None:
        trt, cuda = self._trt, self._cuda
        with logger_severity(trt, verbose) as logger:
            self._runtime = trt.Runtime(logger)
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
        self.output_names = list(self._outputs)
        self.output_name = primary_output(self.output_names)
        self._logits = self.output_name  # the output a call returns (and run_device writes)
        self._buffers: dict[str, _Buffer] = {}
        self._graphs: collections.OrderedDict[tuple[int, tuple[int, ...]], _Binding] = collections.OrderedDict()
        self._calls: list[_Binding] = []
        self._scratch: int | None = None
        self._stream = cuda.stream_create()
        self._closed = False
        try:
            self._scratch_bytes = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
            self._scratch = cuda.malloc(self._scratch_bytes)
            self._main = _Binding(self._new_context())
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _new_context(self) -> Any:
        """An execution context on the shared scratch buffer (USER_MANAGED, ``set_device_memory``)."""
        trt, engine = self._trt, self._engine
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.engine_path}")
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self._scratch, self._scratch_bytes)  # TensorRT >= 10.1
        else:
            context.device_memory = self._scratch
        detailed = getattr(trt, "ProfilingVerbosity", None)
        if detailed is not None and getattr(engine, "profiling_verbosity", None) == detailed.DETAILED:
            # NVTX ranges at DETAILED verbosity add enqueue latency (IExecutionContext.nvtx_verbosity); lowering is allowed.
            context.nvtx_verbosity = detailed.LAYER_NAMES_ONLY
        return context

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
        cuda, binding = self._cuda, self._main
        sizes = {name: 0 for name in (self._input, *self._outputs)}
        for index, profile in enumerate(self.profiles):
            self._select(binding, index)
            if not binding.context.set_input_shape(self._input, profile.max):
                raise RuntimeError(f"set_input_shape({self._input}, {format_shape(profile.max)}) failed for profile {index}")
            binding.shape = tuple(profile.max)
            sizes[self._input] = max(sizes[self._input], int(np.prod(profile.max)))
            for name in self._outputs:
                shape = tuple(binding.context.get_tensor_shape(name))
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

    @property
    def stream_handle(self) -> int:
        """The runtime's CUDA stream (``cudaStream_t`` as an int), e.g. for ``torch.cuda.ExternalStream``."""
        return int(self._stream)

    # -- binding ------------------------------------------------------------------------------

    def _select(self, binding: _Binding, index: int) -> None:
        # A fresh context starts on profile 0; the switch is enqueued on our stream, so it is ordered before the
        # next enqueue. The bindings raise RuntimeError on failure (PY_ASSERT_RUNTIME_ERROR); older ones return False.
        if binding.profile != index:
            try:
                switched = binding.context.set_optimization_profile_async(index, self.stream_handle)
            except RuntimeError as error:
                raise RuntimeError(f"set_optimization_profile_async({index}) failed: {error}") from None
            if not switched:
                raise RuntimeError(f"set_optimization_profile_async({index}) failed")
            # "Changing [the active profile] will invalidate all dynamic bindings" (IExecutionContext docs): shapes and,
            # to be safe, addresses are set again.
            binding.profile, binding.shape = index, None
            binding.addresses.clear()

    def _bind(self, binding: _Binding, index: int, shape: tuple[int, ...], addresses: dict[str, int]) -> dict[str, tuple[int, ...]]:
        self._select(binding, index)
        if binding.shape != shape:
            if not binding.context.set_input_shape(self._input, shape):
                raise ValueError(f"TensorRT rejected input shape {format_shape(shape)} for profile {index}")
            binding.shape = shape
        for name, address in addresses.items():
            if binding.addresses.get(name) == address:
                continue
            if not is_aligned(address):
                raise ValueError(f"device address 0x{address:x} for {name} is not {TENSORRT_ALIGNMENT}-byte aligned, "
                                 "as TensorRT requires (IExecutionContext.set_tensor_address)")
            if not binding.context.set_tensor_address(name, address):
                raise RuntimeError(f"set_tensor_address({name}, 0x{address:x}) failed (TensorRT rejected the address)")
            binding.addresses[name] = address
        return {name: tuple(binding.context.get_tensor_shape(name)) for name in self._outputs}

    def _own_addresses(self) -> dict[str, int]:
        return {name: buf.device for name, buf in self._buffers.items()}

    def _execute(self, binding: _Binding) -> None:
        if not binding.context.execute_async_v3(self.stream_handle):
            raise RuntimeError(f"execute_async_v3 failed for {self.engine_path} (see the TensorRT log above)")

    def _enqueue(self, binding: _Binding) -> None:
        with self._lock:
            self._ensure_open()
            with self._cuda.using_device():
                if binding.graph is not None:
                    self._cuda.launch(binding.graph[1], self._stream)
                else:
                    self._execute(binding)

    # -- CUDA graphs ----------------------------------------------------------------------------

    def _capture(self, binding: _Binding) -> None:
        """Warm up (one plain enqueue after the shape was set, as TensorRT requires), then capture."""
        cuda, stream = self._cuda, self._stream
        self._execute(binding)
        cuda.synchronize(stream)

        def body() -> None:
            if not binding.context.execute_async_v3(self.stream_handle):
                raise RuntimeError("execute_async_v3 failed during CUDA graph capture")

        binding.graph = cuda.capture(stream, body)

    def _graph_binding(self, index: int, shape: tuple[int, ...]) -> _Binding | None:
        """The cached graph for (profile, shape) on its own context, captured on first use; None if capture failed."""
        key = (index, shape)
        binding = self._graphs.get(key)
        if binding is None:
            binding = _Binding(self._new_context())
            self._bind(binding, index, shape, self._own_addresses())
            try:
                self._capture(binding)
            except (CudaError, RuntimeError) as error:
                # Some engines cannot be captured (e.g. data-dependent shapes); run them plainly from now on.
                warnings.warn(f"CUDA graph capture failed ({error}); running {self.engine_path} without CUDA graphs",
                              stacklevel=4)
                self.cuda_graphs = False
                return None
            self._graphs[key] = binding
            if len(self._graphs) > MAX_CUDA_GRAPHS:
                _, evicted = self._graphs.popitem(last=False)
                self._cuda.destroy_graph(*evicted.graph)
        self._graphs.move_to_end(key)
        return binding

    def _forward(self, index: int, shape: tuple[int, ...], addresses: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Enqueue one forward pass: the cached graph (own buffers) or the main context (``addresses``)."""
        if self.cuda_graphs:
            binding = self._graph_binding(index, shape)
            if binding is not None:
                self._cuda.launch(binding.graph[1], self._stream)
                return {name: tuple(binding.context.get_tensor_shape(name)) for name in self._outputs}
        out_shapes = self._bind(self._main, index, shape, addresses)
        self._execute(self._main)
        return out_shapes

    # -- calls --------------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TensorRTRuntime for {self.engine_path} is closed")

    def __call__(self, pixel_values: Any) -> Any:
        """numpy in → numpy logits out; a CUDA array (CAI or DLPack) in → :class:`CudaBuffer` out."""
        if isinstance(pixel_values, np.ndarray):
            return super().__call__(pixel_values)
        return self.run_device(pixel_values)

    def _run(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._host_outputs(pixel_values, [self._logits])[self._logits]

    def run_outputs(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Every engine output (:attr:`output_names`) for a numpy batch, by name, as host arrays."""
        validate_input(self.input_spec, pixel_values, self.check_finite)
        return self._host_outputs(pixel_values, self.output_names)

    def _host_outputs(self, pixel_values: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        shape = tuple(pixel_values.shape)
        index = select_profile(self.profiles, shape)
        pixel_values = np.ascontiguousarray(pixel_values)
        with self._lock:
            self._ensure_open()
            cuda, stream, buffers = self._cuda, self._stream, self._buffers
            with cuda.using_device():
                source = buffers[self._input]
                _host_view(source.host, pixel_values.nbytes)[:] = pixel_values.reshape(-1).view(np.uint8)
                cuda.copy_async(source.device, source.host, pixel_values.nbytes, "htod", stream)
                out_shapes = self._forward(index, shape, self._own_addresses())
                sizes = {}
                for name in names:
                    result = buffers[name]
                    sizes[name] = int(np.prod(out_shapes[name])) * np.dtype(result.dtype).itemsize
                    cuda.copy_async(result.host, result.device, sizes[name], "dtoh", stream)
                cuda.synchronize(stream)
                return {name: _host_view(buffers[name].host, sizes[name]).view(buffers[name].dtype)
                        .reshape(out_shapes[name]).copy() for name in names}

    def _device_tensor(self, pixel_values: Any, shape: tuple[int, ...] | None, dtype: str | None) -> DeviceTensor:
        if isinstance(pixel_values, int):
            if shape is None:
                raise ValueError("a raw device pointer needs shape= (and dtype=, default the engine's input dtype)")
            return DeviceTensor(pixel_values, tuple(int(d) for d in shape), dtype or self.input_spec.dtype)
        return as_device_tensor(pixel_values, stream=self.stream_handle)

    def _output_shape(self, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
        # The logits' shape for this input, from the main context (cheap: shape inference only).
        return self._bind(self._main, index, shape, {})[self._logits]

    def run_device(self, pixel_values: Any, out: Any = None, shape: tuple[int, ...] | None = None,
                   dtype: str | None = None) -> Any:
        """Run on device memory without host copies; returns the logits on the device.

        ``pixel_values``: a ``__cuda_array_interface__``/DLPack object, or a raw device pointer
        (``int``) with ``shape`` and ``dtype``. ``out``: an optional C-contiguous CUDA array of the
        logits' shape and dtype to write into (returned); otherwise a new :class:`CudaBuffer`.
        Pointers that are not 256-byte aligned, and every call with ``cuda_graphs=True``, go
        through the runtime's own buffers (a device-to-device copy each way). The input's
        contents are not checked for NaN/Inf (that would need a device copy).
        """
        self._ensure_open()
        tensor = self._device_tensor(pixel_values, shape, dtype)
        index = check_input_shape(self.input_spec, self.profiles, tensor.shape, tensor.dtype)
        with self._lock:
            self._ensure_open()
            cuda, stream, buffers = self._cuda, self._stream, self._buffers
            with cuda.using_device():
                if tensor.stream is not None:
                    cuda.synchronize(tensor.stream)  # __cuda_array_interface__ v3: the producer's stream must be done
                out_shape = self._output_shape(index, tensor.shape)
                result = out if out is not None else CudaBuffer(cuda, out_shape, self._dtypes[self._logits])
                target = as_device_tensor(result, stream=self.stream_handle)
                if target.shape != out_shape or target.dtype != self._dtypes[self._logits]:
                    raise ValueError(f"out must be {self._dtypes[self._logits]} of shape {out_shape}, "
                                     f"got {target.dtype} {target.shape}")
                in_bytes = int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
                out_bytes = int(np.prod(out_shape)) * np.dtype(target.dtype).itemsize
                stage_in = self.cuda_graphs or not is_aligned(tensor.ptr)
                stage_out = self.cuda_graphs or not is_aligned(target.ptr)
                addresses = self._own_addresses()
                if stage_in:
                    cuda.copy_async(buffers[self._input].device, tensor.ptr, in_bytes, "dtod", stream)
                else:
                    addresses[self._input] = tensor.ptr
                if not stage_out:
                    addresses[self._logits] = target.ptr
                self._forward(index, tensor.shape, addresses)
                if stage_out:
                    cuda.copy_async(target.ptr, buffers[self._logits].device, out_bytes, "dtod", stream)
                cuda.synchronize(stream)
                return result

    def device_call(self, pixel_values: Any, out: Any) -> DeviceCall:
        """A :class:`DeviceCall` that enqueues the engine on ``pixel_values`` → ``out`` (both on the device).

        Binds a dedicated execution context once (and with ``cuda_graphs=True`` captures its
        graph), so each call is only ``execute_async_v3`` (or ``cudaGraphLaunch``) on
        :attr:`stream_handle`, with no synchronisation: the timed part of a benchmark. Both
        arrays must be C-contiguous and 256-byte aligned; they must outlive the call object.
        """
        self._ensure_open()
        tensor = as_device_tensor(pixel_values, stream=self.stream_handle)
        target = as_device_tensor(out, stream=self.stream_handle)
        index = check_input_shape(self.input_spec, self.profiles, tensor.shape, tensor.dtype)
        for what, item in (("input", tensor), ("out", target)):
            if not is_aligned(item.ptr):
                raise ValueError(f"device_call {what} address 0x{item.ptr:x} is not {TENSORRT_ALIGNMENT}-byte aligned")
        with self._lock:
            self._ensure_open()
            with self._cuda.using_device():
                binding = _Binding(self._new_context())
                addresses = {**self._own_addresses(), self._input: tensor.ptr, self._logits: target.ptr}
                out_shape = self._bind(binding, index, tensor.shape, addresses)[self._logits]
                if target.shape != out_shape or target.dtype != self._dtypes[self._logits]:
                    raise ValueError(f"out must be {self._dtypes[self._logits]} of shape {out_shape}, "
                                     f"got {target.dtype} {target.shape}")
                if self.cuda_graphs:
                    self._capture(binding)
                self._calls.append(binding)
        return DeviceCall(self, binding, (tensor.owner, target.owner))

    def close(self) -> None:
        """Free graphs, contexts, buffers, scratch memory, stream and engine; calling it twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cuda = self._cuda
            with cuda.using_device():
                for binding in [*self._graphs.values(), *self._calls]:
                    if binding.graph is not None:
                        cuda.destroy_graph(*binding.graph)
                        binding.graph = None
                self._graphs.clear()
                self._calls.clear()
                self._main = None
                for buffer in self._buffers.values():
                    cuda.free(buffer.device)
                    cuda.free_host(buffer.host)
                self._buffers.clear()
                if self._scratch is not None:
                    cuda.free(self._scratch)  # after every context using it is gone from our lists
                    self._scratch = None
                cuda.stream_destroy(self._stream)
            self._engine = self._runtime = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # best effort at interpreter shutdown
            self.close()


def _current_device(cuda: CudaApi) -> int | None:
    """The calling thread's current device, or None where no driver lets it be read."""
    try:
        return cuda.current_device()
    except Exception:  # no driver or no cuda-python runtime: cuda_device_info explains it in one line
        return None
