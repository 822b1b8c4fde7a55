"""OpenVINO backend: runs a vitdeploy ONNX artifact (fp32, or a Q/DQ int8 graph) on the CPU.

Needs only numpy and the ``openvino`` package (the ``openvino`` extra); never torch or onnx.
OpenVINO reads the ONNX file itself; the model's dynamic batch, height and width are bounded by
the artifact's validated range before compiling.

Precision: OpenVINO's CPU plugin computes fp32 graphs in bf16 by default on CPUs that have bf16,
so :class:`OpenVINORuntime` always sets ``INFERENCE_PRECISION_HINT`` explicitly: ``"f32"`` by
default (parity), ``"bf16"`` on request, and only where ``/proc/cpuinfo`` shows bf16
instructions (:func:`vitdeploy.cpu_features.has_bf16`). An int8 Q/DQ graph runs its quantized
matmuls in int8 whatever the hint; the hint decides the precision of the rest.

Shapes: by default one model is compiled for the artifact's whole validated range (any batch and
size in it, one compile). ``compile_per_shape=True`` compiles a static-shape model for each input
shape the first time it is seen instead (a second or so per new shape, at most
``MAX_COMPILED_SHAPES`` kept): OpenVINO then plans memory and picks kernels for that shape, which
measured 5 % (batch 1) and 12 % (batch 8) faster for ViT-S/16 int8 on a Zen 4 CPU, for a server whose
batch and size are fixed.

Thread safety: a compiled model is shared, and every call takes an infer request from a pool
(creating one when all are busy) and gives it back after copying the outputs out, so one runtime
may serve many threads; no two calls ever share a request.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.cpu_features import has_bf16, int8_dot_flags
from vitdeploy.metadata import ArtifactMetadata, quantization_record, read_metadata_props

from .base import GraphRuntime, InputSpec

INFERENCE_PRECISIONS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
# OpenVINO element type names -> numpy dtype names for the input check.
_OV_DTYPES = {"f32": "float32", "f16": "float16"}
MAX_COMPILED_SHAPES = 8  # static-shape models kept by compile_per_shape (the oldest is dropped)


class OpenVINORuntime(GraphRuntime):
    """An ONNX file with vitdeploy metadata, compiled and run by OpenVINO on ``device`` (``"CPU"``).

    ``inference_precision`` is ``"f32"`` (default) or ``"bf16"`` (refused on a CPU without bf16);
    ``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, every core);
    ``performance_hint`` is ``"LATENCY"`` (default: one stream, the whole CPU per request) or
    ``"THROUGHPUT"``; ``config`` adds or overrides any compile property; ``compile_per_shape``
    compiles a static-shape model per input shape on first use (see the module docstring). A file
    without vitdeploy metadata needs ``input_spec``. :attr:`compiled` is the ``openvino.CompiledModel``
    (with ``compile_per_shape``, the one of the last shape run; ``None`` before the first call).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "CPU",
        inference_precision: str = "f32",
        threads: int | None = None,
        performance_hint: str = "LATENCY",
        config: Mapping[str, Any] | None = None,
        check_finite: bool = False,
        input_spec: InputSpec | None = None,
        compile_per_shape: bool = False,
    ) -> None:
        import openvino as ov

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {str(self.path)!r} does not exist")
        if self.path.suffix.lower() != ".onnx":
            raise ValueError(f"{self.path} is not an .onnx file; OpenVINORuntime runs vitdeploy ONNX artifacts")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"inference_precision {inference_precision!r} is not one of {list(INFERENCE_PRECISIONS)}")
        if inference_precision == "bf16" and device.upper() == "CPU" and not has_bf16():
            raise ValueError("inference_precision 'bf16' needs a CPU with bf16 instructions (avx512_bf16 or "
                             "amx_bf16 in /proc/cpuinfo); this one has neither: use 'f32'")
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint {performance_hint!r} is not one of {list(PERFORMANCE_HINTS)}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")

        try:
            self.metadata = ArtifactMetadata.from_props(read_metadata_props(self.path))
        except ValueError as error:
            if input_spec is None:
                raise ValueError(f"{self.path}: {error} (pass input_spec=InputSpec(...) to run a foreign ONNX file)") \
                    from None
            self.metadata = None
        self.input_spec = input_spec or InputSpec.from_metadata(self.metadata)
        self.check_finite = bool(check_finite)
        self.device = device
        self.inference_precision = inference_precision

        core = ov.Core()
        model = core.read_model(str(self.path))
        inputs = model.inputs
        if len(inputs) != 1:
            raise ValueError(f"{self.path} has {len(inputs)} inputs; expected one image input")
        name = inputs[0].get_any_name()
        if name != self.input_spec.name:
            raise ValueError(f"{self.path}: graph input is named {name!r} but the metadata says {self.input_spec.name!r}")
        graph_dtype = _OV_DTYPES.get(inputs[0].get_element_type().get_type_name(),
                                     inputs[0].get_element_type().get_type_name())
        if graph_dtype != self.input_spec.dtype:
            raise ValueError(f"{self.path}: graph input dtype is {graph_dtype} but the metadata says "
                             f"{self.input_spec.dtype}")
        spec = self.input_spec
        model.reshape({name: ov.PartialShape([ov.Dimension(*spec.batch), spec.channels, ov.Dimension(*spec.height),
                                              ov.Dimension(*spec.width)])})
        properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision,
                                      "PERFORMANCE_HINT": performance_hint}
        if threads is not None:
            properties["INFERENCE_NUM_THREADS"] = int(threads)
        properties.update(config or {})
        self._warn_int8_saturation(device)
        self.compile_per_shape = bool(compile_per_shape)
        self._models = CompiledShapes(core, model, device, properties, per_shape=self.compile_per_shape)
        self._set_outputs([output.get_any_name() for output in model.outputs])
        self._closed = False

    def _warn_int8_saturation(self, device: str) -> None:
        """Warn when a full-range int8 graph meets a CPU whose int8 path saturates (no VNNI/AMX)."""
        if self.metadata is None or self.metadata.precision != "int8" or device.upper() != "CPU" or int8_dot_flags():
            return
        if not (quantization_record(self.metadata) or {}).get("reduce_range", False):
            warnings.warn(
                f"{self.path.name}: this CPU has no VNNI/AMX int8 dot products, where OpenVINO's int8 matmuls "
                "sum u8 x s8 pairs in saturating 16 bits and full-range int8 weights lose accuracy; quantize "
                "with --reduce-range (7-bit weights) for this CPU", RuntimeWarning, stacklevel=3)

    @property
    def compiled(self) -> Any:
        """The ``openvino.CompiledModel`` (``None`` after :meth:`close`)."""
        return self._models.last  # None once closed: close() clears it

    def property(self, name: str) -> Any:
        """A property of the compiled model, e.g. ``"INFERENCE_PRECISION_HINT"`` or ``"EXECUTION_DEVICES"``."""
        if self._closed:
            raise RuntimeError(f"OpenVINORuntime for {self.path} is closed")
        if self._models.last is None:
            raise RuntimeError(f"OpenVINORuntime for {self.path} compiles per shape and has run no input yet")
        return self._models.last.get_property(name)

    def _outputs(self, pixel_values: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError(f"OpenVINORuntime for {self.path} is closed; create a new runtime to run it again")
        return self._models.infer(pixel_values, names)

    def close(self) -> None:
        """Release the compiled model(s) and their requests; later calls raise ``RuntimeError``."""
        self._closed = True
        self._models.clear()

    def __repr__(self) -> str:
        per_shape = ", compile_per_shape=True" if self.compile_per_shape else ""
        return f"OpenVINORuntime({str(self.path)!r}, inference_precision={self.inference_precision!r}{per_shape})"


def compile_static(core: Any, model: Any, shape: tuple[int, ...], device: str, properties: Mapping[str, Any]) -> Any:
    """A copy of ``model`` with its one input fixed to ``shape``, compiled for ``device``."""
    import openvino as ov

    model = model.clone()
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
    return core.compile_model(model, device, dict(properties))


class CompiledShapes:
    """An ``openvino.Model`` compiled for ``device``: once for its whole range, or with ``per_shape`` a
    static-shape copy per input shape on first use (at most ``MAX_COMPILED_SHAPES`` kept, the oldest
    dropped), each with a pool of infer requests, so many threads may call :meth:`infer` at once."""

    def __init__(self, core: Any, model: Any, device: str, properties: Mapping[str, Any], per_shape: bool = False) -> None:
        self.core, self.model, self.device, self.properties = core, model, device, dict(properties)
        self.per_shape = per_shape
        self.last: Any = None  # the compiled model of the last shape asked for
        self._by_shape: dict[tuple[int, ...] | None, tuple[Any, queue.SimpleQueue[Any]]] = {}
        self._lock = threading.Lock()
        if not per_shape:
            self.compiled_for(None)

    def compiled_for(self, shape: tuple[int, ...] | None) -> tuple[Any, queue.SimpleQueue[Any]]:
        """The compiled model and request pool for input ``shape`` (compiled on first use)."""
        key = shape if self.per_shape else None
        with self._lock:
            entry = self._by_shape.get(key)
            if entry is None:
                compiled = (self.core.compile_model(self.model, self.device, self.properties) if key is None
                            else compile_static(self.core, self.model, key, self.device, self.properties))
                if len(self._by_shape) >= MAX_COMPILED_SHAPES:
                    self._by_shape.pop(next(iter(self._by_shape)))
                entry = self._by_shape[key] = (compiled, queue.SimpleQueue())
            self.last = entry[0]
            return entry

    def infer(self, pixels: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """The outputs ``names`` (default: all, in the model's order) for ``pixels``, as float32 copies."""
        compiled, requests = self.compiled_for(tuple(pixels.shape))
        try:
            request = requests.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            results = request.infer({0: np.ascontiguousarray(pixels)})
            outputs = list(compiled.outputs) if names is None else [compiled.output(name) for name in names]
            # The request reuses its output buffers: copy before handing it back to the pool.
            return [np.array(results[output], dtype=np.float32, copy=True) for output in outputs]
        finally:
            requests.put(request)

    def clear(self) -> None:
        """Drop every compiled model and request."""
        with self._lock:
            self._by_shape = {}
            self.last = None
