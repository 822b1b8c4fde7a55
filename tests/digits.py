"""scikit-learn's handwritten digits as a labelled image set, and the small ViT trained on them.

The 1,797 8x8 greyscale digits (values 0..16, from the UCI Optical Recognition of Handwritten Digits
set that scikit-learn ships) become 32x32 RGB PNG images in an ImageFolder layout
(``<root>/<digit>/<index>.png``), so that ``vitdeploy verify --labelled`` reads them like any
folder of photos. The split is fixed (every fifth image is held out for testing), and the trained
model (``tests/data/digits_vit.safetensors``, made by ``scripts/train_digits_vit.py``) never saw
the held-out images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA / "digits_vit.safetensors"
IMAGE_SIZE = 32
MODEL_CONFIG = dict(name="digits_vit", image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, depth=3, num_heads=4,
                    mlp_size=128, num_classes=10, crop_pct=1.0, interpolation="bilinear",
                    labels=[str(digit) for digit in range(10)])


def digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 8, 8] uint8 0..255, labels [N])`` of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


def split(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and the held-out test images (every fifth image is held out)."""
    indices = np.arange(count)
    return indices[indices % 5 != 0], indices[indices % 5 == 0]


def to_picture(digit: np.ndarray):  # noqa: ANN201 - a PIL image
    """One 8x8 digit as a 32x32 RGB picture (bilinear upsampling, white on black)."""
    from PIL import Image

    return Image.fromarray(digit, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")


def write_image_folder(root: str | Path, which: str = "test", limit: int | None = None) -> Path:
    """Write the ``"train"`` or ``"test"`` images as ``root/<digit>/<index>.png``; returns ``root``."""
    images, labels = digits()
    train, test = split(len(images))
    chosen = train if which == "train" else test
    if limit is not None:
        chosen = chosen[:limit]
    root = Path(root)
    for index in chosen:
        folder = root / str(int(labels[index]))
        folder.mkdir(parents=True, exist_ok=True)
        to_picture(images[index]).save(folder / f"{index:04d}.png")
    return root
