"""One session per (model, runtime): loads the runtime once and hands the harness a timed callable per shape.

Each session times what a deployed model spends per request with the input already where
the runtime wants it: on CPU the whole runtime call (numpy in, logits out); on GPU the
forward pass on a device-resident input (host<->device copies excluded). Every GPU runtime is
timed the same way: CUDA events (:class:`~vitdeploy.benchmarks.timing.CudaEventTimer`) on the
runtime's own stream around its enqueue — torch's forward under ``torch.cuda.stream(s)``,
onnxruntime's ``run_with_iobinding`` with ``user_compute_stream`` set to ``s``, and the TensorRT
runtime's :meth:`~vitdeploy.runtimes.tensorrt.TensorRTRuntime.device_call` (``execute_async_v3``
only, no Python-side binding per call) on its own stream. The GPU paths have not run here.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vitdeploy.benchmarks.models import BenchModel, Sweep
from vitdeploy.benchmarks.specs import RuntimeSpec
from vitdeploy.benchmarks.timing import CudaEventTimer, Timer, WallTimer

Log = Callable[[str], None]


class Skip(Exception):
    """The runtime cannot run on this machine (missing library, no GPU); the message says why."""


class Session(Protocol):
    timer: Timer
    threads: int | None
    artifact: str | None
    device_index: int | None
    optimizations: tuple[str, ...]  # output-preserving rewrites in the artifact (ArtifactMetadata.optimizations)

    def bind(self, batch: int, height: int, width: int) -> Callable[[], Any]: ...

    def close(self) -> None: ...


def _input(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, channels, height, width), dtype=np.float32)


def _optimizations(metadata: Any) -> tuple[str, ...]:
    return tuple(metadata.optimizations) if metadata is not None else ()


def _import_or_skip(module: str, name: str, install: str) -> Any:
    """``import module``, or :class:`Skip` saying ``name`` is not installed and ``pip install install`` gets it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skip(f"{name} is not installed ({error}); pip install {install}") from None


def _require_cuda(what: str) -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise Skip(f"{what} needs torch to time CUDA work") from None
    if not torch.cuda.is_available():
        raise Skip(f"{what} needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)")


class TorchSession:
    """Eager (or ``torch.compile``-d) PyTorch: the model cast to the precision, fused SDPA attention."""

    artifact = None
    optimizations: tuple[str, ...] = ()

    def __init__(self, spec: RuntimeSpec, model: BenchModel, threads: int | None, compile_mode: str | None = None) -> None:
        import torch

        if spec.device == "cuda":
            _require_cuda(spec.label)
        self._torch = torch
        self.device = torch.device(spec.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
        if spec.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads() if spec.device == "cpu" else None
        module = copy.deepcopy(model.torch_model()).to(device=self.device, dtype=self.dtype).eval()
        module.requires_grad_(False)
        self.module = module
        if spec.compile:
            kwargs = {"mode": compile_mode} if compile_mode else {}
            self.forward = torch.compile(module, **kwargs)
        else:
            self.forward = module
        self.device_index = (self.device.index or 0) if spec.device == "cuda" else None
        self.stream = torch.cuda.Stream(self.device_index) if spec.device == "cuda" else None
        self.timer: Timer = (CudaEventTimer(stream=self.stream, device=self.device_index) if self.stream is not None
                             else WallTimer())

    def bind(self, batch: int, height: int, width: int) -> Callable[[], Any]:
        torch = self._torch
        pixels = torch.from_numpy(_input(batch, height, width, self.module.config.in_channels))
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        forward, stream = self.forward, self.stream
        if stream is None:
            def run() -> Any:
                with torch.inference_mode():
                    return forward(pixels)

            return run
        torch.cuda.synchronize(self.device_index)  # the input is ready before the session's own stream reads it

        def run_on_stream() -> Any:
            with torch.cuda.stream(stream), torch.inference_mode():
                return forward(pixels)

        return run_on_stream

    def close(self) -> None:
        self.module = None
        self.forward = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


class OrtSession:
    """onnxruntime through :class:`vitdeploy.runtimes.onnxruntime.OrtRuntime` (CPU, CUDA or TensorRT EP)."""

    def __init__(self, spec: RuntimeSpec, model: BenchModel, sweep: Sweep, threads: int | None,
                 log: Log | None = None) -> None:
        ort = _import_or_skip("onnxruntime", "onnxruntime", "onnxruntime")
        from vitdeploy.runtimes.onnxruntime import PROVIDERS, OrtRuntime

        available = ort.get_available_providers()
        if PROVIDERS[spec.provider] not in available:
            package = "onnxruntime-gpu" if spec.provider != "cpu" else "onnxruntime"
            raise Skip(f"onnxruntime provider {PROVIDERS[spec.provider]} is not available "
                       f"(installed: {', '.join(available)}); needs {package}")
        if spec.provider != "cpu":
            _require_cuda(spec.label)
        path = model.onnx(spec.precision, sweep, log)
        self.artifact = str(path)
        self._ort = ort
        options: dict[str, Any] = {"provider": spec.provider}
        if spec.provider == "cpu":
            options.update(intra_op_threads=threads or 0, inter_op_threads=1)
        if spec.provider == "tensorrt":
            options["cache_dir"] = Path(model.cache_dir) / f"{model.name}-{spec.precision}.ort_trt_cache"
        if log is not None and spec.provider == "tensorrt":
            log(f"onnxruntime TensorRT EP builds its engine on the first call of each new profile (cached in "
                f"{options['cache_dir']})")
        self.runtime = OrtRuntime(path, **options)
        self.artifact = str(self.runtime.graph_path)  # on CPU, the validated onnxruntime-CPU variant
        self.optimizations = _optimizations(self.runtime.metadata)
        self.provider = spec.provider
        self.threads = (threads or None) if spec.provider == "cpu" else None
        self.device_index = None if spec.provider == "cpu" else self.runtime.device_id
        self.timer: Timer = WallTimer() if spec.provider == "cpu" else self._own_stream_timer()

    def _own_stream_timer(self) -> Timer:
        """Give onnxruntime a stream of its own (``user_compute_stream``) and time CUDA events on it."""
        import torch

        self.stream = torch.cuda.Stream(self.device_index)
        session = self.runtime.session
        options = session.get_provider_options()
        providers = session.get_providers()
        for name in providers:
            if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
                options[name] = {**options.get(name, {}), "user_compute_stream": str(self.stream.cuda_stream)}
        session.set_providers(providers, [options.get(name, {}) for name in providers])
        return CudaEventTimer(stream=self.stream, device=self.device_index)

    def bind(self, batch: int, height: int, width: int) -> Callable[[], Any]:
        spec = self.runtime.input_spec
        pixels = _input(batch, height, width, spec.channels).astype(spec.dtype)
        from vitdeploy.runtimes.base import validate_input

        validate_input(spec, pixels)  # an out-of-range point fails here with the runtime's own message
        if self.provider == "cpu":
            runtime = self.runtime
            return lambda: runtime(pixels)
        session = self.runtime.session
        device = self.runtime.device_id
        value = self._ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", device)
        binding = session.io_binding()
        binding.bind_ortvalue_input(spec.name, value)
        binding.bind_output(self.runtime.output_name, "cuda", device)
        self._keep = value  # the bound device buffer must outlive the callable

        def run() -> None:
            session.run_with_iobinding(binding)

        return run

    def close(self) -> None:
        self.runtime.close()


class TensorRTSession:
    """A TensorRT engine through :class:`vitdeploy.runtimes.tensorrt.TensorRTRuntime`."""

    threads = None

    def __init__(self, spec: RuntimeSpec, model: BenchModel, sweep: Sweep, log: Log | None = None) -> None:
        try:
            import tensorrt  # noqa: F401
        except Exception as error:  # ImportError, or a stub wheel failing to find libnvinfer
            raise Skip(f"TensorRT is not importable here ({type(error).__name__}: {error})") from None
        _require_cuda(spec.label)
        from vitdeploy.runtimes.tensorrt import TensorRTRuntime, TensorRTUnavailable

        _import_or_skip("cuda", "cuda-python", "'vitdeploy[gpu]'")  # what the runtime drives the GPU with
        path = model.engine(spec.precision, sweep, log)
        self.artifact = str(path)
        try:
            self.runtime = TensorRTRuntime(path)
            self.optimizations = _optimizations(self.runtime.metadata)
        except TensorRTUnavailable as error:
            raise Skip(str(error)) from None
        import torch

        self.device_index = 0
        self.stream = torch.cuda.ExternalStream(self.runtime.stream_handle)  # the runtime's own stream
        self.timer: Timer = CudaEventTimer(stream=self.stream, device=self.device_index)

    def bind(self, batch: int, height: int, width: int) -> Callable[[], Any]:
        import torch

        spec = self.runtime.input_spec
        dtype = {"float32": torch.float32, "float16": torch.float16}[spec.dtype]
        pixels = torch.from_numpy(_input(batch, height, width, spec.channels)).to("cuda", dtype).contiguous()
        probe = self.runtime.run_device(pixels)  # the engine's real output shape and dtype
        logits = torch.empty(probe.shape, device="cuda", dtype=getattr(torch, str(probe.dtype)))
        torch.cuda.synchronize()
        self._keep = (pixels, logits)  # the bound device buffers must outlive the call
        # Enqueue only (execute_async_v3 or a graph launch) on the runtime's stream; the timer synchronises.
        return self.runtime.device_call(pixels, logits)

    def close(self) -> None:
        self.runtime.close()


class OpenVINOSession:
    """OpenVINO through :class:`vitdeploy.runtimes.openvino.OpenVINORuntime` on the CPU: the fp32 graph at
    f32 or bf16 inference precision, or the int8 Q/DQ graph."""

    device_index = None
    timer: Timer

    def __init__(self, spec: RuntimeSpec, model: BenchModel, sweep: Sweep, threads: int | None,
                 log: Log | None = None) -> None:
        _import_or_skip("openvino", "openvino", "'vitdeploy[openvino]'")
        from vitdeploy.runtimes.openvino import OpenVINORuntime

        path = model.onnx(spec.graph_precision, sweep, log)
        self.artifact = str(path)
        try:
            self.runtime = OpenVINORuntime(path, threads=threads or None, **spec.options)
        except ValueError as error:  # bf16 on a CPU without it
            raise Skip(str(error)) from None
        self.optimizations = _optimizations(self.runtime.metadata)
        self.threads = threads or None
        self.timer = WallTimer()

    def bind(self, batch: int, height: int, width: int) -> Callable[[], Any]:
        from vitdeploy.runtimes.base import validate_input

        spec = self.runtime.input_spec
        pixels = _input(batch, height, width, spec.channels).astype(spec.dtype)
        validate_input(spec, pixels)
        runtime = self.runtime
        return lambda: runtime(pixels)

    def close(self) -> None:
        self.runtime.close()


def open_session(spec: RuntimeSpec, model: BenchModel, sweep: Sweep, threads: int | None,
                 log: Log | None = None, compile_mode: str | None = None) -> Session:
    """Load ``spec`` for ``model``; raises :class:`Skip` when it cannot run on this machine."""
    if spec.backend == "torch":
        return TorchSession(spec, model, threads, compile_mode)
    if spec.backend == "onnxruntime":
        return OrtSession(spec, model, sweep, threads, log)
    if spec.backend == "openvino":
        return OpenVINOSession(spec, model, sweep, threads, log)
    return TensorRTSession(spec, model, sweep, log)
