"""The tests import the real timm through :mod:`vitdeploy.timm_import` (an import
stand-in for torchvision, which cannot be installed beside the CPU build of torch; see there)."""

from vitdeploy.timm_import import TorchvisionAbsentError, import_timm

__all__ = ["TorchvisionAbsentError", "import_timm"]
