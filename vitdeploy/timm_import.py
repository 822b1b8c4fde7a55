"""Import the real timm on a machine where torchvision cannot be imported (an import stand-in for
torchvision, nothing more), for the tests and the benchmarks that compare with timm's own models.

timm (1.0.x) imports torchvision when it is imported (``timm/layers/create_norm.py``:
``from torchvision.ops.misc import FrozenBatchNorm2d``; ``timm.data`` imports
``torchvision.transforms``), although its ViT never calls torchvision. Beside the CPU build of
torch, torchvision cannot exist here: PyPI's only Linux wheels are CUDA builds whose ``_C.so``
needs ``libtorch_cuda.so``, and ``import torchvision`` fails with ``RuntimeError: operator
torchvision::nms does not exist``; CI installs timm ``--no-deps``. So while timm is being imported,
and only then, :func:`import_timm` answers ``import torchvision...`` with empty stand-in modules
whose every attribute is a class that raises as soon as it is instantiated or called: nothing of
timm that runs can depend on it without failing loudly. Afterwards the stand-in is removed from
``sys.modules`` and ``sys.meta_path``, so ``importlib.util.find_spec("torchvision")`` (which
torch.onnx asks) is ``None`` again. Where a working torchvision is installed it is used as is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_ROOT = "torchvision"


class TorchvisionAbsentError(RuntimeError):
    """timm reached for a torchvision object, which the stand-in cannot provide."""


class _AbsentMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _absent(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise TorchvisionAbsentError(f"torchvision is not installed here: {cls.__qualname__} cannot be used")


def _absent(qualname: str) -> type:
    return _AbsentMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


class _AbsentModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _absent(f"{self.__name__}.{name}")


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == _ROOT or fullname.startswith(_ROOT + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _AbsentModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _torchvision_imports() -> bool:
    try:
        importlib.import_module(_ROOT)
    except Exception:  # ModuleNotFoundError, or the CUDA build's RuntimeError/OSError
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            del sys.modules[name]
        return False
    return True


def import_timm() -> types.ModuleType | None:
    """The real ``timm`` package, or None when it is not installed."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        return None
    if _torchvision_imports():
        return importlib.import_module("timm")
    finder = _AbsentFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            del sys.modules[name]
