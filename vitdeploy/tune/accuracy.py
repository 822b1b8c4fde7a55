"""The accuracy gate ``tune`` holds every candidate to, and the figures it judges.

Every candidate runs the same inputs once: labelled images (top-1 drop in points against the
reference) or real photos (worst cosine and top-1 agreement), against eager fp32 or, without the
model at hand, the fp32 graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

RunFn = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class AccuracyGate:
    """How much accuracy a candidate may lose: ``max_drop_points`` of labelled top-1 when labelled
    images are given; else ``min_cosine`` (worst over the photos) and ``min_top1_agreement``
    against ``reference`` (eager fp32, or the fp32 graph when tune has no model at hand)."""

    max_drop_points: float = 0.5
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99
    reference: str = field(default="eager fp32", compare=False)

    # Each field: the name ``--max-accuracy-drop`` gives it, its range as written, and the test of that range.
    RANGES: ClassVar[dict[str, tuple[str, str, Callable[[float], bool]]]] = {
        "max_drop_points": ("points", ">= 0", lambda v: 0 <= v < math.inf),
        "min_cosine": ("cosine", "in (0, 1]", lambda v: 0 < v <= 1),
        "min_top1_agreement": ("top1", "in [0, 1]", lambda v: 0 <= v <= 1),
    }

    def __post_init__(self) -> None:
        for field_name, (name, rule, ok) in self.RANGES.items():
            if not ok(getattr(self, field_name)):
                raise ValueError(f"{name} must be {rule}, got {getattr(self, field_name)}")

    @classmethod
    def parse(cls, text: str) -> AccuracyGate:
        """``"0.5"`` (labelled points) or ``"points=0.5,cosine=0.999,top1=0.99"`` (any subset); a bad value
        is named as written (``cosine=1.5: ...``)."""
        keys = {name: field_name for field_name, (name, _, _) in cls.RANGES.items()}
        values: dict[str, float] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, _, value = item.rpartition("=")
            key = key.strip() or "points"
            if key not in keys:
                raise ValueError(f"{item!r}: {key!r} is not one of {', '.join(keys)}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{item!r}: {value.strip()!r} is not a number") from None
            _, rule, ok = cls.RANGES[keys[key]]
            if not ok(number):
                raise ValueError(f"{item!r}: {key} must be {rule}, got {value.strip()}")
            values[keys[key]] = number
        if not values:
            raise ValueError(f"{text!r} sets nothing; e.g. 0.5 or cosine=0.99,top1=0.95")
        return cls(**values)

    def failures(self, accuracy: dict[str, Any]) -> list[str]:
        """Why ``accuracy`` (a candidate's figures) is outside the gate; empty when it passes."""
        if accuracy["kind"] == "labelled":
            drop = accuracy["top1_drop_points"]
            return [] if drop <= self.max_drop_points else [
                f"top-1 drops {drop:.2f} points on {accuracy['images']} labelled images (at most "
                f"{self.max_drop_points:g} allowed)"]
        failures = []
        if not accuracy["cosine"] >= self.min_cosine:  # NaN fails too
            failures.append(f"worst cosine {accuracy['cosine']:.5f} vs {self.reference} on {accuracy['images']} photos is "
                            f"below {self.min_cosine:g}")
        if not accuracy["top1_agreement"] >= self.min_top1_agreement:
            failures.append(f"top-1 agreement {accuracy['top1_agreement']:.3f} is below {self.min_top1_agreement:g}")
        return failures

    def describe(self, labelled: bool) -> str:
        if labelled:
            return f"labelled top-1 drop <= {self.max_drop_points:g} points vs {self.reference}"
        return (f"worst cosine >= {self.min_cosine:g} and top-1 agreement >= {self.min_top1_agreement:g} "
                f"vs {self.reference}")


@dataclass
class AccuracyData:
    """The inputs and reference outputs every candidate is judged on (computed once)."""

    kind: str  # labelled | agreement
    chunks: list[np.ndarray]
    reference_logits: np.ndarray
    labels: np.ndarray | None
    source: str

    def figures(self, run: RunFn) -> dict[str, Any]:
        """A candidate's figures on these inputs (:mod:`vitdeploy.parity` metrics)."""
        from vitdeploy.parity import accuracy, compare_logits

        logits = np.concatenate([np.asarray(run(chunk), dtype=np.float32) for chunk in self.chunks])
        parity = compare_logits(self.reference_logits, logits)
        figures: dict[str, Any] = {"kind": self.kind, "images": int(len(logits)), "source": self.source,
                                   "cosine": parity.cosine, "top1_agreement": parity.top1_agreement,
                                   "top5_agreement": parity.top5_agreement, "rel_max_error": parity.rel_max_error}
        if self.labels is not None:
            mine, ref = accuracy(logits, self.labels), accuracy(self.reference_logits, self.labels)
            figures.update(top1=mine.top1, top5=mine.top5, reference_top1=ref.top1,
                           top1_drop_points=100.0 * (ref.top1 - mine.top1))
        return figures


def accuracy_data(reference: RunFn, metadata: Any, max_batch: int, size: int, labelled: str | None = None,
                  images: str | None = None) -> AccuracyData:
    """Labelled images (ImageFolder ``labelled``) or real photos (``images`` folder, default the bundled
    ones) preprocessed once, in chunks the artifacts accept, with the reference's logits."""
    from vitdeploy.parity import InputFactory
    from vitdeploy.preprocessing import load_labels, preprocess_batch

    chunk = max(1, min(32, max_batch))
    if labelled is not None:
        from vitdeploy.datasets import image_folder

        dataset = image_folder(labelled, metadata.num_classes, load_labels(metadata))
        files = [path for path, _ in dataset.items]
        chunks = [np.ascontiguousarray(preprocess_batch(files[i:i + chunk], metadata.preprocessing), dtype=np.float32)
                  for i in range(0, len(files), chunk)]
        labels = np.asarray([label for _, label in dataset.items], dtype=np.int64)
        kind, source = "labelled", f"{dataset.count} labelled images in {labelled}"
    else:
        from vitdeploy.calibration import image_files
        from vitdeploy.preprocessing import bundled_images

        photos = list(image_files(images) if images is not None else bundled_images())
        if not photos:
            raise ValueError(f"no images to measure agreement on in {images!r}")
        chunks = [InputFactory(metadata.preprocessing, images=photos[i:i + chunk], synthetic=False)
                  .batch(len(photos[i:i + chunk]), size, size)[0] for i in range(0, len(photos), chunk)]
        count = len(photos)
        labels, kind = None, "agreement"
        source = f"{count} real photos at {size}x{size} ({images or 'bundled'})"
    reference_logits = np.concatenate([np.asarray(reference(c), dtype=np.float32) for c in chunks])
    return AccuracyData(kind, chunks, reference_logits, labels, source)


def eager_reference(model: Any) -> RunFn:
    """The eager fp32 model as a numpy callable (``torch.inference_mode``)."""
    import torch

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = model(torch.from_numpy(pixels))
        return (output if isinstance(output, torch.Tensor) else output[0]).float().numpy()

    return run
