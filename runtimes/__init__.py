"""Inference runtimes with one interface; none of them imports torch at import time.

``load(path)`` picks the backend from the file: ``.onnx`` → :class:`OrtRuntime`
(onnxruntime), ``.engine``/``.plan`` → :class:`TensorRTRuntime`, anything else (a checkpoint
file or folder, or a variant name) → :class:`TorchRuntime`, the eager reference;
``load(path, backend="openvino")`` (or ``"onnxruntime"``, ``"tensorrt"``, ``"torch"``) chooses
explicitly, e.g. :class:`OpenVINORuntime` for an ONNX file. Backends are imported on first use,
so ``import vitdeploy.runtimes`` needs numpy only.
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import Any

from vitdeploy.runtimes.base import InputSpec, Runtime, validate_input

_LAZY = {
    "OrtRuntime": "vitdeploy.runtimes.onnxruntime",
    "TorchRuntime": "vitdeploy.runtimes.torch",
    "TensorRTRuntime": "vitdeploy.runtimes.tensorrt",
    "OpenVINORuntime": "vitdeploy.runtimes.openvino",
}
# backend name -> runtime class; and the artifact kinds each backend opens.
BACKENDS = {"onnxruntime": "OrtRuntime", "openvino": "OpenVINORuntime", "tensorrt": "TensorRTRuntime",
            "torch": "TorchRuntime"}
_BACKEND_KINDS = {"onnxruntime": ("onnxruntime",), "openvino": ("onnxruntime",), "tensorrt": ("tensorrt",),
                  "torch": ("torch",)}
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan")

# The lazy backends stay out of __all__ so that `from vitdeploy.runtimes import *` imports no backend.
__all__ = ["InputSpec", "Runtime", "validate_input", "load", "runtime_kind"]


def runtime_kind(path: str | os.PathLike[str]) -> str:
    """``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``: the backend :func:`load` uses for ``path``."""
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnxruntime"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return "torch"


def load(path: str | os.PathLike[str], backend: str | None = None, **options: Any) -> Runtime:
    """Open ``path`` with ``backend`` (``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``, ``"torch"``),
    by default the one its kind calls for; ``options`` go to that runtime's constructor."""
    kind = runtime_kind(path)
    backend = kind if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if kind not in _BACKEND_KINDS[backend]:
        wanted = {"onnxruntime": "an .onnx file", "tensorrt": "a .engine/.plan file",
                  "torch": "a checkpoint or variant name"}
        raise ValueError(f"backend {backend!r} opens {wanted[_BACKEND_KINDS[backend][0]]}, not {str(path)!r}")
    cls = BACKENDS[backend]
    return getattr(import_module(_LAZY[cls]), cls)(path, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitdeploy.runtimes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
