"""Image → ``pixel_values`` the way timm's eval transform does it, with numpy and Pillow only.

timm evaluates with ``Resize(int(size / crop_pct))`` (short side, PIL interpolation) →
``CenterCrop(size)`` → ``ToTensor`` → ``Normalize(mean, std)``; torchvision's PIL path calls
``PIL.Image.resize``, so this module reproduces it without torch. With ``resize_mode`` ``"squash"``
both sides are resized to ``int(size / crop_pct)`` instead (timm's ``crop_mode='squash'``, open_clip's
``resize_mode='squash'``, transformers' processors with a ``{"height", "width"}`` size). The parameters
come from an artifact's :class:`~vitdeploy.metadata.Preprocessing`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vitdeploy.metadata import ArtifactMetadata, Preprocessing

DATA_DIR = Path(__file__).resolve().parent / "data"

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageLike = str | os.PathLike | Image.Image | np.ndarray

# How far two implementations of the same resize may differ, in normalised units: Pillow's bicubic
# (a = -0.5, 8-bit output) against torch's antialiased bicubic (a = -0.75) measured 0.0012..0.0035 on
# average (0.018..0.154 at most) on the bundled photos at 32..384 px. A one-pixel crop shift gives
# 0.067..0.234 on average, a crop where the source squashes far more.
RESIZE_MEAN_ABS_BOUND = 0.008
RESIZE_MAX_ABS_BOUND = 0.25


# Pillow modes that hold more than 8 bits per sample, and how they become 8-bit (see to_rgb).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def to_rgb(picture: Image.Image, name: str = "image") -> Image.Image:
    """``picture`` as an 8-bit RGB image, with the samples of 16-bit, 32-bit and float images scaled, not clipped.

    Pillow's ``convert("RGB")`` (what timm's and torchvision's loaders call) clips every value
    above 255, so a dark 16-bit photo comes out white. The rules here:

    * 8-bit modes (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ...): Pillow's conversion, as
      torchvision/timm users get it (alpha is dropped, not composited; CMYK uses Pillow's formula).
    * ``I;16`` and its byte orders, and ``I`` (32-bit integers, the mode older Pillows and some
      TIFF readers give 16-bit images): samples are taken as full-range 16-bit, 0..65535 → 0..255 by
      ``round(v / 257)`` — the PNG/TIFF convention that sample values span the bit depth, so
      65535 is white and 257·k is the 8-bit k exactly. ``I`` values outside 0..65535 are refused.
    * ``F`` (32-bit float): samples must lie in [0, 1] (the float-image convention of
      scikit-image and ``ToTensor`` output) and are scaled by 255; anything else (negative,
      above 1, NaN) is refused, because [0, 1] and [0, 255] floats cannot be told apart reliably.

    Raises ``ValueError`` naming ``name``, the mode and the value range found.
    """
    if picture.mode == "RGB":
        return picture
    if picture.mode not in WIDE_MODES:
        return picture.convert("RGB")
    values = np.asarray(picture)
    if picture.mode == "F":
        finite = bool(np.isfinite(values).all())
        low, high = (float(values.min()), float(values.max())) if finite else (float("nan"), float("nan"))
        if not finite or low < 0.0 or high > 1.0:
            raise ValueError(f"{name} is a 32-bit float (mode F) image with values {low:g}..{high:g}; "
                             "float images must hold values in [0, 1]; save it as 8- or 16-bit")
        gray = np.round(values.astype(np.float64) * 255.0)
    else:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{name} is a 32-bit integer (mode {picture.mode}) image with values {low}..{high}; "
                             "integer images must be 16-bit (0..65535); save it as 8- or 16-bit")
        gray = np.round(values.astype(np.float64) / 257.0)
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")


def load_image(image: ImageLike) -> Image.Image:
    """Open a path (or take a PIL image / ``HxWx3`` uint8 array) and return it as an RGB PIL image.

    16-bit, 32-bit integer and float images are scaled to 8 bits (see :func:`to_rgb`).
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"image array must be uint8 HxW or HxWxC, got dtype {image.dtype} and shape {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if path.is_dir():
        raise IsADirectoryError(f"image {str(path)!r} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened, repr(str(path)))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not an image Pillow can read ({error})") from None


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(width, height)`` after resizing the short side to ``short_side`` (torchvision's rule)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an ``HxWxC`` array to ``size x size``, zero-padding first if it is smaller."""
    height, width = array.shape[:2]
    if height < size or width < size:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = array.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return array[top:top + size, left:left + size]


def preprocess(image: ImageLike, pre: Preprocessing) -> np.ndarray:
    """One image → float32 ``[3, crop, crop]``: resize (short side, or both sides for ``"squash"``),
    centre-crop, scale to [0, 1], normalise."""
    if pre.interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {pre.interpolation!r} is not one of {list(INTERPOLATIONS)}")
    picture = load_image(image)
    side = int(pre.resize_size)
    size = (side, side) if pre.resize_mode == "squash" else resized_size(*picture.size, side)
    resized = picture.resize(size, INTERPOLATIONS[pre.interpolation])
    pixels = center_crop(np.asarray(resized, dtype=np.uint8), int(pre.crop_size))
    scaled = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def preprocess_batch(images: Sequence[ImageLike], pre: Preprocessing) -> np.ndarray:
    """Several images → float32 ``[N, 3, crop, crop]``."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    return np.stack([preprocess(image, pre) for image in images])


def bundled_images() -> list[Path]:
    """The real photographs shipped in ``vitdeploy/data`` (see its README for sources and licences)."""
    return sorted(DATA_DIR.glob("*.jpg"))


def load_labels(metadata: ArtifactMetadata) -> list[str]:
    """Class names from the artifact's metadata, or the class indices as strings when it has none."""
    labels = metadata.class_labels
    count = metadata.num_classes
    if not labels:
        return [str(index) for index in range(count)]
    if len(labels) != count:
        raise ValueError(f"metadata lists {len(labels)} labels but the model has {count} classes")
    return [str(label) for label in labels]
