"""Where the benchmarks have always imported timm from: :mod:`vitdeploy.timm_import` (the core floor,
so that the exporters' check against timm's own model can use it too)."""

from vitdeploy.timm_import import TorchvisionAbsentError, import_timm

__all__ = ["TorchvisionAbsentError", "import_timm"]
