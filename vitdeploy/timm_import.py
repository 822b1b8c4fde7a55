"""Import the real timm (and open_clip) on a machine where torchvision cannot be imported (an import
stand-in for torchvision, nothing more), for the source check, the tests and the benchmarks that
compare with those libraries' own models.

timm (1.0.x) imports torchvision when it is imported (``timm/layers/create_norm.py``:
``from torchvision.ops.misc import FrozenBatchNorm2d``; ``timm.data`` imports
``torchvision.transforms``), although its ViT never calls torchvision; so does open_clip (its image
transforms), whose models never call it either. Beside the CPU build of
torch, torchvision cannot exist here: PyPI's only Linux wheels are CUDA builds whose ``_C.so``
needs ``libtorch_cuda.so``, and ``import torchvision`` fails with ``RuntimeError: operator
torchvision::nms does not exist``; CI installs timm and open_clip_torch ``--no-deps``. So while one of
them is being imported, and only then, :func:`import_with_torchvision_stand_in` answers ``import torchvision...`` with empty stand-in modules
whose every attribute is a class that raises as soon as it is instantiated or called: nothing of
the library that runs can depend on it without failing loudly. Afterwards the stand-in is removed from
``sys.modules`` and ``sys.meta_path``, so ``importlib.util.find_spec("torchvision")`` (which
torch.onnx asks) is ``None`` again. transformers asks that once and keeps the answer (open_clip imports
it), so it is asked before the stand-in exists: otherwise transformers would take torchvision for
installed for the rest of the process and fail to import its vision models. Where a working torchvision
is installed it is used as is.
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


def _settle_transformers() -> None:
    """Have transformers (where installed) decide now, without the stand-in, that torchvision is absent."""
    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from transformers.utils import import_utils
    except Exception:  # noqa: BLE001 - a broken transformers is not this module's to report
        return
    for name in ("is_torchvision_available", "is_torchvision_v2_available"):
        check = getattr(import_utils, name, None)
        if callable(check):
            check()


def import_with_torchvision_stand_in(package: str) -> types.ModuleType | None:
    """The real ``package`` (a library that imports torchvision without running it: timm, open_clip), or
    None when it is not installed."""
    if package in sys.modules:
        return sys.modules[package]
    if importlib.util.find_spec(package) is None:
        return None
    if _torchvision_imports():
        return importlib.import_module(package)
    _settle_transformers()
    finder = _AbsentFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(package)
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == _ROOT or n.startswith(_ROOT + ".")]:
            del sys.modules[name]


def import_timm() -> types.ModuleType | None:
    """The real ``timm`` package, or None when it is not installed."""
    return import_with_torchvision_stand_in("timm")


def import_open_clip() -> types.ModuleType | None:
    """The real ``open_clip`` package (open_clip_torch; its models, not its torchvision transforms), or None
    when it is not installed."""
    import_timm()  # open_clip's timm towers import timm if it can: the same timm as everywhere else
    return import_with_torchvision_stand_in("open_clip")
