"""The tests import the real timm through :mod:`vitdeploy.timm_import` (an import
stand-in for torchvision, which cannot be installed beside the CPU build of torch; see there)."""

from vitdeploy.timm_import import TorchvisionAbsentError, import_open_clip, import_timm

__all__ = ["OPEN_CLIP_MISSING", "OPEN_CLIP_VERSION", "TIMM_MISSING", "TIMM_VERSION", "TorchvisionAbsentError",
           "import_open_clip", "import_timm"]

# The timm the README's test command installs (tests/test_readme_commands.py checks they agree), and the
# skip reason of a test that needs it: a hint that works, since the tests import timm through import_timm.
TIMM_VERSION = "1.0.31"
TIMM_MISSING = f"timm is not installed: pip install --no-deps timm=={TIMM_VERSION} (the README's test command does)"
OPEN_CLIP_VERSION = "3.3.0"
OPEN_CLIP_MISSING = (f"open_clip is not installed: pip install --no-deps open_clip_torch=={OPEN_CLIP_VERSION} "
                     "(the README's test command does)")
