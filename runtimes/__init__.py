"""Inference runtimes with one interface; none of them imports torch at import time.

``load(path)`` picks the backend from the file: ``.onnx`` → :class:`OrtRuntime`
(onnxruntime), ``.engine``/``.plan`` → :class:`TensorRTRuntime`, anything else (a checkpoint
file or folder, or a variant name) → :class:`TorchRuntime`, the eager reference;
``load(path, backend="openvino")`` (or ``"onnxruntime"``, ``"tensorrt"``, ``"torch"``) chooses
explicitly, e.g. :class:`OpenVINORuntime` for an ONNX file. A folder that ``vitdeploy tune`` wrote
its ``tune.json`` into opens the artifact it chose with the backend and options it chose
(:mod:`vitdeploy.tune_manifest`). Backends are imported on first use, so ``import
vitdeploy.runtimes`` needs numpy only.
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
__all__ = ["InputSpec", "Runtime", "validate_input", "load", "runtime_kind", "backend_of"]


def runtime_kind(path: str | os.PathLike[str]) -> str:
    """``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``: the backend :func:`load` uses for ``path``;
    ``"tuned"`` for a folder with a tune manifest (its manifest names the backend)."""
    from vitdeploy.tune_manifest import is_tuned_folder

    if is_tuned_folder(path):
        return "tuned"
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnxruntime"
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    return "torch"


def backend_of(runtime: Runtime) -> str | None:
    """The backend (``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``, ``"torch"``) an opened runtime runs on,
    whatever path led to it (a tuned folder included); ``None`` for a runtime class not listed here."""
    names = {cls.__name__ for cls in type(runtime).__mro__}
    return next((backend for backend, cls in BACKENDS.items() if cls in names), None)


def load(path: str | os.PathLike[str], backend: str | None = None, **options: Any) -> Runtime:
    """Open ``path`` with ``backend`` (``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``, ``"torch"``),
    by default the one its kind calls for; ``options`` go to that runtime's constructor (for a tuned
    folder, over the options the manifest chose)."""
    kind = runtime_kind(path)
    if kind == "tuned":
        return _load_tuned(path, backend, options)
    backend = kind if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    if kind not in _BACKEND_KINDS[backend]:
        wanted = {"onnxruntime": "an .onnx file", "tensorrt": "a .engine/.plan file",
                  "torch": "a checkpoint or variant name"}
        raise ValueError(f"backend {backend!r} opens {wanted[_BACKEND_KINDS[backend][0]]}, not {str(path)!r}")
    cls = BACKENDS[backend]
    return getattr(import_module(_LAZY[cls]), cls)(path, **options)


def _load_tuned(folder: str | os.PathLike[str], backend: str | None, options: dict[str, Any]) -> Runtime:
    """The runtime ``FOLDER/tune.json`` chose; warns when this CPU's arithmetic flags differ from the tuned one's."""
    import warnings

    from vitdeploy.cpu_features import cpu_flags
    from vitdeploy.tune_manifest import chosen_artifact, read_manifest

    manifest = read_manifest(folder)
    choice, artifact = chosen_artifact(folder, manifest)
    if backend is not None and backend != choice.backend:
        raise ValueError(f"{str(folder)!r} was tuned to run {choice.artifact} on {choice.backend}, not {backend!r}; "
                         "open the artifact file itself to run it on another backend")
    checked = set(manifest.cpu.get("flags_checked", []))
    tuned_flags, here = set(manifest.cpu.get("flags", [])), checked & cpu_flags()
    if checked and here != tuned_flags:
        warnings.warn(f"{folder} was tuned on a CPU with {sorted(tuned_flags) or 'none of'} {sorted(checked)}; this one "
                      f"has {sorted(here) or 'none'}: run `vitdeploy tune` again for this CPU", RuntimeWarning,
                      stacklevel=3)
    cls = BACKENDS[choice.backend]
    return getattr(import_module(_LAZY[cls]), cls)(artifact, **{**choice.options, **options})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vitdeploy.runtimes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
