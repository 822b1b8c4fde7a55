"""The accuracy gate ``tune`` holds every candidate to, and the figures it judges.

Every candidate runs the same inputs once: labelled images (top-1 drop in points against the
reference) or real photos, against eager fp32 or, without the model at hand, the fp32 graph. Every
output the artifact has is compared with :func:`vitdeploy.parity.compare_outputs` and judged by what
it is (:func:`vitdeploy.parity.output_kind`):

* ``logits``: worst row cosine and top-1 agreement (or, with labelled images, the top-1 drop);
* vectors (``pooler_output``, ``image_embeds``): worst row cosine;
* token outputs (``last_hidden_state``, ``patch_tokens``): per token, the worst token's cosine and the
  share of tokens whose cosine is below a floor. Their thresholds and floor are the candidate
  precision's parity gate (:func:`precision_gate`, :data:`vitdeploy.parity.TOLERANCES`: the gate the
  export held the file to) unless ``token=``/``share=`` set them for every candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

RunFn = Callable[[np.ndarray], Any]


def precision_gate(precision: str) -> Any:
    """The parity :class:`~vitdeploy.parity.Tolerance` of ``precision`` against fp32, whose token
    thresholds (worst token cosine, floor, share below it) tune applies to token outputs."""
    from vitdeploy.parity import tolerance_for

    return tolerance_for(precision, against_fp32=True)


@dataclass(frozen=True)
class AccuracyGate:
    """How much accuracy a candidate may lose against ``reference`` (eager fp32, or the fp32 graph when
    tune has no model at hand), per output kind: ``logits`` by ``max_drop_points`` of labelled top-1
    when labelled images are given, else by ``min_cosine`` (worst over the photos) and
    ``min_top1_agreement``; vectors by ``min_cosine``; token outputs by the worst token cosine and the
    share of tokens below the floor: ``min_token_cosine``/``max_token_share`` when set, else the
    candidate precision's parity gate (:func:`precision_gate`)."""

    max_drop_points: float = 0.5
    min_cosine: float = 0.999
    min_top1_agreement: float = 0.99
    reference: str = field(default="eager fp32", compare=False)
    min_token_cosine: float | None = None  # None: the precision's gate
    max_token_share: float | None = None  # None: the precision's gate

    # Each field: the name ``--max-accuracy-drop`` gives it, its range as written, and the test of that range.
    RANGES: ClassVar[dict[str, tuple[str, str, Callable[[float], bool]]]] = {
        "max_drop_points": ("points", ">= 0", lambda v: 0 <= v < math.inf),
        "min_cosine": ("cosine", "in (0, 1]", lambda v: 0 < v <= 1),
        "min_top1_agreement": ("top1", "in [0, 1]", lambda v: 0 <= v <= 1),
        "min_token_cosine": ("token", "in (0, 1]", lambda v: 0 < v <= 1),
        "max_token_share": ("share", "in [0, 1]", lambda v: 0 <= v <= 1),
    }

    def __post_init__(self) -> None:
        for field_name, (name, rule, ok) in self.RANGES.items():
            value = getattr(self, field_name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value}")

    @classmethod
    def parse(cls, text: str) -> AccuracyGate:
        """``"0.5"`` (labelled points) or ``"points=0.5,cosine=0.999,top1=0.99,token=0.97,share=0.1"`` (any
        subset); a bad value is named as written (``cosine=1.5: ...``)."""
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

    def token_gate(self, precision: str) -> dict[str, Any]:
        """The per-token thresholds a token output of a ``precision`` candidate is held to: the precision's
        parity gate (``tolerance``), with ``min_token_cosine``/``max_token_share`` where this gate sets them."""
        tolerance = precision_gate(precision)
        return {"tolerance": tolerance.name,
                "min_token_cosine": tolerance.min_token_cosine if self.min_token_cosine is None
                else self.min_token_cosine,
                "token_floor": tolerance.token_floor,
                "max_share_below": tolerance.max_share_below if self.max_token_share is None
                else self.max_token_share}

    def thresholds(self, kind: str, precision: str = "fp32", labelled: bool = False) -> dict[str, Any]:
        """What an output of ``kind`` (``logits``, ``vector``, ``tokens``) is held to."""
        from vitdeploy.parity import LOGITS_KIND, TOKENS_KIND

        if kind == LOGITS_KIND:
            return ({"max_drop_points": self.max_drop_points} if labelled else
                    {"min_cosine": self.min_cosine, "min_top1_agreement": self.min_top1_agreement})
        if kind == TOKENS_KIND:
            return self.token_gate(precision)
        return {"min_cosine": self.min_cosine}

    def failures(self, accuracy: dict[str, Any]) -> list[str]:
        """Why ``accuracy`` (a candidate's figures) is outside the gate; empty when it passes. Figures with
        ``outputs`` are judged output by output (:meth:`output_failures`); older ones by their primary output."""
        if accuracy.get("outputs"):
            return [failure for name in accuracy["outputs"] for failure in self.output_failures(accuracy, name)]
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

    def output_failures(self, accuracy: dict[str, Any], name: str) -> list[str]:
        """Why output ``name`` of ``accuracy`` is outside the gate, each sentence naming the output, its kind,
        the measured figure and the threshold (``patch_tokens (tokens): worst token cosine 0.9120 < 0.97 ...``)."""
        from vitdeploy.parity import LOGITS_KIND, TOKENS_KIND

        entry = accuracy["outputs"][name]
        kind, labelled = entry["kind"], accuracy["kind"] == "labelled"
        where = f"vs {self.reference} on {accuracy['images']} {'labelled images' if labelled else 'photos'}"
        label = f"{name} ({kind})"
        failures = []
        if kind == LOGITS_KIND and labelled:
            drop = accuracy["top1_drop_points"]
            if not drop <= self.max_drop_points:
                failures.append(f"{label}: top-1 drops {drop:.2f} points on {accuracy['images']} labelled images (at "
                                f"most {self.max_drop_points:g} allowed) vs {self.reference}")
        elif kind == TOKENS_KIND:
            gate = self.token_gate(accuracy.get("precision", "fp32"))
            worst, share = entry["token_cosine_min"], entry["token_share_below"]
            tokens = f"over {entry['num_tokens']} tokens {where} (gate {gate['tolerance']})"
            if gate["min_token_cosine"] is not None and not worst >= gate["min_token_cosine"]:
                failures.append(f"{label}: worst token cosine {worst:.4f} < {gate['min_token_cosine']:g} {tokens}")
            if gate["max_share_below"] is not None and not share <= gate["max_share_below"]:
                failures.append(f"{label}: {100 * share:.2f} % of tokens have cosine < {entry['token_floor']:g}, "
                                f"more than the {100 * gate['max_share_below']:g} % allowed {tokens}")
        else:
            if not entry["cosine"] >= self.min_cosine:  # NaN fails too
                failures.append(f"{label}: worst cosine {entry['cosine']:.5f} {where} is below {self.min_cosine:g}")
            if kind == LOGITS_KIND and not entry["top1_agreement"] >= self.min_top1_agreement:
                failures.append(f"{label}: top-1 agreement {entry['top1_agreement']:.3f} is below "
                                f"{self.min_top1_agreement:g} {where}")
        return failures

    def describe(self, labelled: bool, kinds: Iterable[str] = ("logits",), precisions: Iterable[str] = ()) -> str:
        """The rule in one line, for the outputs' ``kinds`` (and, for token outputs, the candidates' ``precisions``)."""
        from vitdeploy.parity import LOGITS_KIND, TOKENS_KIND, VECTOR_KIND

        kinds = set(kinds)
        parts = []
        if LOGITS_KIND in kinds:
            parts.append(f"labelled top-1 drop <= {self.max_drop_points:g} points" if labelled else
                         f"worst cosine >= {self.min_cosine:g} and top-1 agreement >= {self.min_top1_agreement:g}")
        if VECTOR_KIND in kinds:
            parts.append(f"{'vectors: ' if len(kinds) > 1 else ''}worst cosine >= {self.min_cosine:g}")
        if TOKENS_KIND in kinds:
            gates = [(p, self.token_gate(p)) for p in dict.fromkeys(precisions)]
            figures = "; ".join(f"{p} worst >= {g['min_token_cosine']:g}, <= {100 * g['max_share_below']:g} % "
                                f"below {g['token_floor']:g}" for p, g in gates)
            parts.append("token outputs per token: worst token cosine and share of tokens below the floor "
                         + (f"({figures})" if figures else "(the precision's parity gate)"))
        return "; ".join(parts or [f"worst cosine >= {self.min_cosine:g}"]) + f" vs {self.reference}"


def _outputs(run: RunFn, pixels: np.ndarray, primary: str) -> dict[str, np.ndarray]:
    """Every output ``run`` gives for ``pixels``: a runtime's ``run_outputs``, a mapping, or the primary output."""
    run_outputs = getattr(run, "run_outputs", None)
    out = run_outputs(pixels) if run_outputs is not None else run(pixels)
    if isinstance(out, Mapping):
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}
    return {primary: np.asarray(out, dtype=np.float32)}


def _run_chunks(run: RunFn, chunks: Iterable[np.ndarray], primary: str) -> dict[str, np.ndarray]:
    """Every output ``run`` gives (:func:`_outputs`) for each of ``chunks``, concatenated over them by name."""
    got: dict[str, list[np.ndarray]] = {}
    for pixels in chunks:
        for name, value in _outputs(run, pixels, primary).items():
            got.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in got.items()}


def _entry(metrics: Any) -> dict[str, Any]:
    """One output's figures for the manifest: its kind and the :class:`~vitdeploy.parity.ParityMetrics` that apply."""
    return {key: value for key, value in metrics.to_dict().items() if value is not None}


@dataclass
class AccuracyData:
    """The inputs and reference outputs every candidate is judged on (computed once): every output of
    the artifact by name, ``primary`` the one a runtime's call returns."""

    kind: str  # labelled | agreement
    chunks: list[np.ndarray]
    reference_outputs: dict[str, np.ndarray]
    primary: str
    labels: np.ndarray | None
    source: str

    @property
    def kinds(self) -> dict[str, str]:
        """Each output and how it is judged (:func:`vitdeploy.parity.output_kind`)."""
        from vitdeploy.parity import output_kind

        return {name: output_kind(name) for name in self.reference_outputs}

    def figures(self, run: RunFn, precision: str = "fp32", gate: AccuracyGate | None = None) -> dict[str, Any]:
        """A candidate's figures on these inputs (:func:`vitdeploy.parity.compare_outputs` per output, the
        token floor of ``precision``'s gate): the primary output's at the top level (as before), every
        output's under ``outputs``; with ``gate``, each output also records its thresholds and failures."""
        from vitdeploy.parity import accuracy, compare_outputs, output_kind

        floor = precision_gate(precision).token_floor
        got = _run_chunks(run, self.chunks, self.primary)
        missing = [name for name in self.reference_outputs if name not in got]
        if missing:
            raise ValueError(f"the candidate has no {', '.join(missing)} output; the reference has "
                             f"{', '.join(self.reference_outputs)}")
        outputs = {name: _entry(compare_outputs(reference, got[name], output_kind(name), floor))
                   for name, reference in self.reference_outputs.items()}
        primary = outputs[self.primary]
        figures: dict[str, Any] = {"kind": self.kind, "images": int(primary["num_samples"]), "source": self.source,
                                   "cosine": primary["cosine"], "top1_agreement": primary.get("top1_agreement"),
                                   "top5_agreement": primary.get("top5_agreement"),
                                   "rel_max_error": primary["rel_max_error"], "primary": self.primary,
                                   "precision": precision, "outputs": outputs}
        if self.labels is not None:
            if "logits" not in got:
                raise ValueError(f"labelled accuracy needs a logits output; the artifact has {', '.join(got)}")
            logits = got["logits"]
            mine, ref = accuracy(logits, self.labels), accuracy(self.reference_outputs["logits"], self.labels)
            figures.update(top1=mine.top1, top5=mine.top5, reference_top1=ref.top1,
                           top1_drop_points=100.0 * (ref.top1 - mine.top1))
        if gate is not None:
            for name, entry in outputs.items():
                entry["gate"] = gate.thresholds(entry["kind"], precision, self.labels is not None)
                entry["failures"] = gate.output_failures(figures, name)
        return figures


def accuracy_data(reference: RunFn, metadata: Any, max_batch: int, size: int, labelled: str | None = None,
                  images: str | None = None) -> AccuracyData:
    """Labelled images (ImageFolder ``labelled``) or real photos (``images`` folder, default the bundled
    ones) preprocessed once, in chunks the artifacts accept, with every output the reference gives
    (of the artifact's outputs, ``metadata.output_names``)."""
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
    names, primary = metadata.output_names, metadata.primary_output
    got = {name: value for name, value in _run_chunks(reference, chunks, primary).items() if name in names}
    if primary not in got:
        raise ValueError(f"the accuracy reference gives no {primary} output (it gives {', '.join(got) or 'none'})")
    reference_outputs = {name: got[name] for name in names if name in got}
    return AccuracyData(kind, chunks, reference_outputs, primary, labels, source)


def eager_reference(model: Any, outputs: Iterable[str] | None = None) -> RunFn:
    """The eager fp32 model as a numpy callable (``torch.inference_mode``): its default output, or with
    ``outputs`` (and a model with ``forward_outputs``) a mapping of those outputs by name."""
    import torch

    names = list(outputs) if outputs is not None else None

    def run(pixels: np.ndarray) -> Any:
        with torch.inference_mode():
            if names and hasattr(model, "forward_outputs"):
                values = model.forward_outputs(torch.from_numpy(pixels), names)
                return {name: value.float().numpy() for name, value in values.items()}
            output = model(torch.from_numpy(pixels))
        return (output if isinstance(output, torch.Tensor) else output[0]).float().numpy()

    return run
