"""Labelled image sets for accuracy: an ImageFolder layout (one sub-folder per class) or a labels file.

Class indices are found the way a user would expect from the names:

* ImageFolder: if every sub-folder name is one of the artifact's class labels, that label's
  index; else if every name is an integer, that integer (``0/``, ``1/``, ... ``9/``); else the
  position in sorted order, as ``torchvision.datasets.ImageFolder`` numbers them.
* a labels file: one ``PATH LABEL`` per line (whitespace- or comma-separated; ``#`` comments),
  ``PATH`` relative to the file's folder (or ``root``), ``LABEL`` an integer index or a class
  label of the artifact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vitdeploy.calibration import IMAGE_SUFFIXES


@dataclass(frozen=True)
class LabelledSet:
    """Image files with their class indices, and how the indices were found."""

    items: tuple[tuple[Path, int], ...]
    source: str
    mapping: str  # "labels" | "integers" | "sorted" | "file"

    @property
    def count(self) -> int:
        return len(self.items)


def _index_of(label: str, class_names: list[str] | None, num_classes: int, where: str) -> int:
    if class_names and label in class_names:
        return class_names.index(label)
    if re.fullmatch(r"[+-]?\d+", label):
        index = int(label)
        if not 0 <= index < num_classes:
            raise ValueError(f"{where}: class index {index} is outside 0..{num_classes - 1}")
        return index
    raise ValueError(f"{where}: label {label!r} is neither a class index nor one of the artifact's class labels")


def image_folder(root: str | Path, num_classes: int, class_names: list[str] | None = None) -> LabelledSet:
    """The images of an ImageFolder layout under ``root`` (see the module docstring for the indices)."""
    folder = Path(root)
    if not folder.is_dir():
        raise NotADirectoryError(f"labelled folder {str(folder)!r} is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"labelled folder {str(folder)!r} has no class sub-folders (expected ImageFolder layout: "
                         "DIR/<class>/<image>)")
    names = [p.name for p in classes]
    if class_names and all(name in class_names for name in names):
        mapping, indices = "labels", [class_names.index(name) for name in names]
    elif all(re.fullmatch(r"\d+", name) for name in names):
        mapping, indices = "integers", [int(name) for name in names]
    else:
        mapping, indices = "sorted", list(range(len(names)))
    bad = [name for name, index in zip(names, indices, strict=True) if index >= num_classes]
    if bad:
        raise ValueError(f"class folders {bad} map to indices beyond the model's {num_classes} classes")
    items = []
    for path, index in zip(classes, indices, strict=True):
        items += [(f, index) for f in sorted(path.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"labelled folder {str(folder)!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return LabelledSet(tuple(items), str(folder), mapping)


def labels_file(path: str | Path, num_classes: int, class_names: list[str] | None = None,
                root: str | Path | None = None) -> LabelledSet:
    """The images a labels file lists (``PATH LABEL`` lines; see the module docstring)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"labels file {str(file)!r} does not exist")
    base = Path(root) if root is not None else file.parent
    items = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = [p for p in re.split(r"[,\s]+", text) if p]
        where = f"{file}:{number}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'PATH LABEL', got {line.strip()!r}")
        image = base / parts[0]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {str(image)!r} does not exist")
        items.append((image, _index_of(parts[1], class_names, num_classes, where)))
    if not items:
        raise ValueError(f"labels file {str(file)!r} lists no images")
    return LabelledSet(tuple(items), str(file), "file")
