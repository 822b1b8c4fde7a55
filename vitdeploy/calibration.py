"""Calibration images for quantization: a folder of real images, or the bundled photos plus synthetic crops.

A quantized graph's activation scales are measured on these images (``exporters/quantize.py``),
preprocessed exactly as the artifact's metadata says (resize the short side, centre-crop,
normalise). Real images from the deployment domain calibrate best (``--calibration DIR``);
without a folder the four bundled photographs and deterministic random crops and flips of them
stand in, with a warning. The set is identified by its size and the sha256 of the preprocessed
pixels, which the quantized artifact records. numpy and Pillow only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitdeploy.console import progress
from vitdeploy.metadata import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_CALIBRATION_SIZE = 64
BUNDLED = "bundled"


@dataclass
class CalibrationSet:
    """Preprocessed calibration images ``[N, 3, size, size]`` (float32) and where they came from."""

    pixels: np.ndarray
    source: str  # the folder, or BUNDLED
    files: int  # real image files used (the rest of ``count`` are synthetic crops)

    @property
    def count(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def sha256(self) -> str:
        """Hash of the preprocessed pixels: the same images, preprocessing and order give the same hash."""
        return hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes()).hexdigest()

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images in order, ``batch_size`` at a time (the last batch may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.count, batch_size):
            yield self.pixels[start:start + batch_size]

    def describe(self) -> dict[str, object]:
        """What the quantized artifact's metadata records about its calibration."""
        synthetic = self.count - self.files
        return {"source": self.source, "count": self.count, "real_images": self.files, "synthetic_crops": synthetic,
                "sha256": self.sha256, "size": list(self.pixels.shape[2:])}


def image_files(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (sub-folders included, e.g. an ImageFolder layout), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"calibration folder {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calibration folder {str(root)!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def spread(items: list[Path], count: int) -> list[Path]:
    """``count`` items evenly spaced over ``items`` (all of them if there are not more), order kept.

    Evenly spaced rather than the first ``count``: sorted ImageFolder paths are grouped by class.
    """
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _normalise(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(2, 0, 1))


def synthetic_crops(count: int, pre: Preprocessing, seed: int = 0) -> np.ndarray:
    """``count`` random resized crops (area 25-100 %, aspect 3/4-4/3) of the bundled photos, half of
    them flipped, preprocessed like the photos: ``[count, 3, crop, crop]`` float32."""
    from PIL import Image

    from vitdeploy.preprocessing import INTERPOLATIONS, bundled_images, load_image

    photos = [load_image(path) for path in bundled_images()]
    if not photos:
        raise ValueError("no bundled photos found to make calibration crops from")
    rng = np.random.default_rng(seed)
    size = int(pre.crop_size)
    resample = INTERPOLATIONS.get(pre.interpolation, Image.Resampling.BICUBIC)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for index in range(count):
        photo = photos[index % len(photos)]
        area = photo.width * photo.height * rng.uniform(0.25, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        width = min(photo.width, max(1, int(round(math.sqrt(area * aspect)))))
        height = min(photo.height, max(1, int(round(math.sqrt(area / aspect)))))
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height)).resize((size, size), resample)
        if index % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[index] = _normalise(np.asarray(crop, dtype=np.uint8), pre)
    return out


def load_calibration(folder: str | Path | None, count: int, pre: Preprocessing, seed: int = 0,
                     log: Callable[[str], None] | None = progress) -> CalibrationSet:
    """``count`` calibration images from ``folder`` (evenly spread over its sorted files), or without a
    folder the bundled photos plus synthetic crops of them (``log`` gets a warning saying so)."""
    from vitdeploy.preprocessing import bundled_images, preprocess

    if count < 1:
        raise ValueError(f"calibration size must be >= 1, got {count}")
    if folder is not None:
        files = spread(image_files(folder), count)
        if len(files) < count and log is not None:
            log(f"calibration folder {folder} has {len(files)} images; calibrating on those (asked for {count})")
        pixels = np.stack([preprocess(path, pre) for path in files])
        return CalibrationSet(pixels, str(folder), len(files))
    photos = bundled_images()[:count]
    if log is not None:
        log(f"warning: no calibration folder given: calibrating on the {len(photos)} bundled photos and "
            f"{count - len(photos)} synthetic crops of them; images from the deployment domain calibrate "
            "better (--calibration DIR)")
    parts = [np.stack([preprocess(path, pre) for path in photos])]
    if count > len(photos):
        parts.append(synthetic_crops(count - len(photos), pre, seed))
    return CalibrationSet(np.concatenate(parts), BUNDLED, len(photos))
