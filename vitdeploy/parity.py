"""Parity between an artifact and the eager model: metrics, tolerances, reports (numpy only).

Every comparison takes a *reference* (the eager PyTorch model) and a *candidate* (an exported
artifact run by a runtime) on the same input batch and computes, on float64 copies of the
``[N, C]`` logits:

``max_abs``
    largest absolute difference over all ``N x C`` entries.
``mean_abs``
    mean absolute difference over all entries.
``logit_scale``
    the largest absolute reference logit in the batch, ``max |reference|``. This is "the
    logits' scale" that relative errors refer to: an error of 1e-4 relative means
    ``max_abs <= 1e-4 * max |reference|``. (The maximum rather than the standard deviation,
    because it is what fp16 rounding scales with and it is never near zero for a trained head.)
``rel_max_error``
    ``max_abs / logit_scale`` (``max_abs`` itself when every reference logit is zero).
``cosine``
    cosine similarity of each sample's logit vector between reference and candidate, the
    *minimum* over the samples (1.0 for two all-zero vectors).
``top1_agreement``
    fraction of samples whose arg-max class is the same.
``top5_agreement``
    mean over samples of ``|top5(reference) & top5(candidate)| / 5`` (``k = min(5, C)``).

Each output is judged by what it is (:func:`output_kind`):

* ``logits``: one row per image, ``cosine`` per row plus top-1/top-5 agreement;
* vectors (``pooler_output``, ``image_embeds``): ``cosine`` per row (the worst image);
* token outputs (``last_hidden_state``, ``patch_tokens``, ``[N, T, C]``): the cosine of every token's
  ``C``-vector, summarised as ``token_cosine_min`` (the worst token of the batch),
  ``token_cosine_p1`` (the 1st percentile over tokens) and ``token_share_below`` (the share of
  tokens whose cosine is below ``token_floor``). ``cosine`` is still the whole per-image tensor's,
  but a cosine over ``T x C`` values averages a few wrong tokens away, so it is not what gates them.

A :class:`Tolerance` gates ``rel_max_error`` and ``cosine`` (and top-1 agreement where it sets
``min_top1``), and for token outputs the three token figures. Top-1 is not gated for reduced precisions on purpose: if the candidate's
arg-max is class *b* while the reference's is *a*, then ``ref[a] - ref[b] <= 2 * max_abs``, so
every flip that the max-abs gate lets through is a near-tie, and gating on it would only make
the check flaky. It is reported all the same.

:func:`verify` runs a candidate and one or more references over real photographs (resized to
each shape) and synthetic images at several batch sizes and resolutions and returns a
:class:`ParityReport` (per-shape results, ``passed``, ``to_dict()``, ``format_table()``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from vitdeploy.config import snap_to_stride
from vitdeploy.metadata import Preprocessing, ShapeRange

Shape = tuple[int, int, int]  # (batch, height, width)
RunFn = Callable[[np.ndarray], Any]


@dataclass(frozen=True)
class ParityMetrics:
    """How far a candidate's outputs are from the reference's on one batch (see module docstring)."""

    max_abs: float
    mean_abs: float
    logit_scale: float
    rel_max_error: float
    cosine: float
    top1_agreement: float | None
    top5_agreement: float | None
    num_samples: int
    kind: str = "logits"  # logits, vector or tokens (output_kind)
    token_cosine_min: float | None = None  # token outputs only: the worst token's cosine
    token_cosine_p1: float | None = None  # the 1st percentile of the tokens' cosines
    token_share_below: float | None = None  # the share of tokens whose cosine is below token_floor
    token_floor: float | None = None
    num_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    dot = np.sum(reference * candidate, axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    both_zero = (np.linalg.norm(reference, axis=1) == 0) & (np.linalg.norm(candidate, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def _topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    k = min(k, reference.shape[1])
    ref_top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    overlap = [len(set(r.tolist()) & set(c.tolist())) / k for r, c in zip(ref_top, cand_top, strict=True)]
    return float(np.mean(overlap))


LOGITS_KIND, VECTOR_KIND, TOKENS_KIND = "logits", "vector", "tokens"
OUTPUT_KINDS = (LOGITS_KIND, VECTOR_KIND, TOKENS_KIND)
# Token cosines below this count in ``token_share_below`` unless a tolerance sets its own floor.
DEFAULT_TOKEN_FLOOR = 0.99


def output_kind(output: str) -> str:
    """How an output is judged: ``logits`` (rows and top-k), ``tokens`` (per token) or ``vector`` (per row)."""
    from vitdeploy.outputs import LOGITS, TOKEN_OUTPUTS

    if output == LOGITS:
        return LOGITS_KIND
    return TOKENS_KIND if output in TOKEN_OUTPUTS else VECTOR_KIND


def token_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of every token: ``[N, T, C]`` (or ``[N, ..., C]``) to ``N * T`` cosines over the last axis."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    return _cosines(reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1]))


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, kind: str = LOGITS_KIND,
                    token_floor: float = DEFAULT_TOKEN_FLOOR) -> ParityMetrics:
    """Metrics of ``candidate`` against ``reference`` for an output of ``kind`` (see the module docstring):
    ``[N, C]`` rows for ``logits`` and ``vector``, ``[N, T, C]`` for ``tokens``."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output kind {kind!r} is not one of {', '.join(OUTPUT_KINDS)}")
    metrics = compare_logits(reference, candidate, classification=kind == LOGITS_KIND)
    if kind != TOKENS_KIND:
        return replace(metrics, kind=kind)
    reference = np.asarray(reference)
    if reference.ndim < 3:
        raise ValueError(f"a token output is [N, T, C]; got shape {reference.shape}")
    cosines = token_cosines(reference, candidate)
    if not np.isfinite(np.asarray(candidate, dtype=np.float64)).all():
        cosines = np.full_like(cosines, np.nan)
    nan = bool(np.isnan(cosines).any())
    return replace(
        metrics, kind=kind, token_floor=float(token_floor), num_tokens=int(cosines.size),
        token_cosine_min=float("nan") if nan else float(cosines.min()),
        token_cosine_p1=float("nan") if nan else float(np.percentile(cosines, 1.0)),
        token_share_below=float("nan") if nan else float(np.mean(cosines < token_floor)),
    )


def compare_logits(reference: np.ndarray, candidate: np.ndarray, classification: bool = True) -> ParityMetrics:
    """Metrics of ``candidate`` against ``reference``, both ``[N, C]`` (or ``[N, ...]``, flattened per sample).

    ``classification=False`` skips the top-k agreements (for feature outputs). Token outputs are
    judged per token by :func:`compare_outputs`.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(
            f"candidate output shape {candidate.shape} does not match the reference shape {reference.shape}"
        )
    if reference.ndim < 2 or reference.shape[0] == 0:
        raise ValueError(f"expected outputs of shape [N, C] with N >= 1, got {reference.shape}")
    reference = reference.reshape(reference.shape[0], -1)
    candidate = candidate.reshape(candidate.shape[0], -1)
    if not np.isfinite(candidate).all():
        # NaN/Inf outputs: every metric becomes NaN, which fails every tolerance.
        nan = float("nan")
        return ParityMetrics(
            max_abs=nan, mean_abs=nan, logit_scale=float(np.abs(reference).max()), rel_max_error=nan,
            cosine=nan, top1_agreement=0.0 if classification else None,
            top5_agreement=0.0 if classification else None, num_samples=int(reference.shape[0]),
        )
    diff = np.abs(reference - candidate)
    max_abs = float(diff.max())
    scale = float(np.abs(reference).max())
    top1 = top5 = None
    if classification:
        top1 = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
        top5 = _topk_agreement(reference, candidate, 5)
    return ParityMetrics(
        max_abs=max_abs,
        mean_abs=float(diff.mean()),
        logit_scale=scale,
        rel_max_error=max_abs / scale if scale > 0 else max_abs,
        cosine=float(_cosines(reference, candidate).min()),
        top1_agreement=top1,
        top5_agreement=top5,
        num_samples=int(reference.shape[0]),
    )


@dataclass(frozen=True)
class Tolerance:
    """Pass thresholds: ``rel_max_error <= max_rel_error``, ``cosine >= min_cosine`` (and top-1); for token
    outputs also the worst and 1st-percentile token cosines and the share of tokens below ``token_floor``."""

    name: str
    max_rel_error: float
    min_cosine: float
    min_top1: float | None = None
    min_token_cosine: float | None = None
    min_token_cosine_p1: float | None = None
    token_floor: float = DEFAULT_TOKEN_FLOOR
    max_share_below: float | None = None

    def check(self, metrics: ParityMetrics) -> list[str]:
        """The violated thresholds, as sentences naming the measured value (empty when it passes)."""
        failures = []
        if not metrics.rel_max_error <= self.max_rel_error:  # also catches NaN
            failures.append(
                f"max-abs error {metrics.max_abs:.3g} is {metrics.rel_max_error:.3g} of the logit scale "
                f"{metrics.logit_scale:.3g}; tolerance {self.name} allows {self.max_rel_error:g}"
            )
        if not metrics.cosine >= self.min_cosine:
            failures.append(f"cosine {metrics.cosine:.6f} is below {self.min_cosine} (tolerance {self.name})")
        if (
            self.min_top1 is not None
            and metrics.top1_agreement is not None
            and not metrics.top1_agreement >= self.min_top1
        ):
            failures.append(
                f"top-1 agreement {metrics.top1_agreement:.3f} is below {self.min_top1} (tolerance {self.name})"
            )
        if metrics.kind == TOKENS_KIND:
            tokens = f"over {metrics.num_tokens} tokens"
            if self.min_token_cosine is not None and not metrics.token_cosine_min >= self.min_token_cosine:
                failures.append(f"worst token cosine {metrics.token_cosine_min:.6f} {tokens} is below "
                                f"{self.min_token_cosine} (tolerance {self.name})")
            if self.min_token_cosine_p1 is not None and not metrics.token_cosine_p1 >= self.min_token_cosine_p1:
                failures.append(f"1st-percentile token cosine {metrics.token_cosine_p1:.6f} is below "
                                f"{self.min_token_cosine_p1} (tolerance {self.name})")
            if self.max_share_below is not None and not metrics.token_share_below <= self.max_share_below:
                failures.append(f"{100 * metrics.token_share_below:.2f}% of the tokens have cosine below "
                                f"{metrics.token_floor:g}; tolerance {self.name} allows "
                                f"{100 * self.max_share_below:g}%")
        return failures

    def margin(self, metrics: ParityMetrics) -> float:
        """How far the similarity figures are above their thresholds: the smallest ``value - threshold``
        over the cosines this tolerance gates for ``metrics.kind`` (negative: failing; NaN: -inf)."""
        pairs = [(metrics.cosine, self.min_cosine)]
        if metrics.kind == TOKENS_KIND:
            pairs += [(metrics.token_cosine_min, self.min_token_cosine), (metrics.token_cosine_p1,
                                                                          self.min_token_cosine_p1)]
        gaps = [value - threshold for value, threshold in pairs if threshold is not None]
        return float("-inf") if any(not math.isfinite(gap) for gap in gaps) else min(gaps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, kind: str = LOGITS_KIND) -> str:
        """The thresholds that apply to an output of ``kind``, in one short phrase."""
        parts = [f"rel-max<={self.max_rel_error:g}", f"cos>={self.min_cosine:g}"]
        if kind == LOGITS_KIND and self.min_top1 is not None:
            parts.append(f"top-1>={self.min_top1:g}")
        if kind == TOKENS_KIND:
            if self.min_token_cosine is not None:
                parts.append(f"token>={self.min_token_cosine:g}")
            if self.min_token_cosine_p1 is not None:
                parts.append(f"p1>={self.min_token_cosine_p1:g}")
            if self.max_share_below is not None:
                parts.append(f"<{self.token_floor:g}:<={100 * self.max_share_below:g}%")
        return f"{self.name} ({', '.join(parts)})"


# Worst values measured with onnxruntime 1.32 CPU against eager torch 2.13 CPU on the bundled photos
# plus synthetic images, at 112x112 .. 448x448 (non-square included), random-weight variants
# (`vitdeploy export <variant> [--precision fp16]`):
#   fp32 graph vs eager fp32: rel-max 1.5e-6 (vit_small/16, vit_base/16, vit_huge/14)
#   fp16 graph vs eager fp16, same policy: rel-max 1.8e-3 (vit_small), 1.2e-3 (vit_base), 1.9e-3
#     (vit_large); cosine >= 0.999998
#   fp16 graph vs eager fp32: rel-max 8.8e-4, cosine >= 0.999999
# The fp16 thresholds keep ~10x of margin for deeper models and for GPU kernels (TensorRT).
#   int8 Q/DQ graph (vitdeploy's quantizer, 64 calibration images) vs eager fp32: see docs/precision.md's
#     parity table for the worst values measured; cosine >= 0.99 on the bundled photos is the
#     int8 gate. fp8 (E4M3, onnxruntime's CPU emulation) has 3 mantissa bits: its own, looser gate.
#   Token outputs are gated per token (worst, 1st percentile, share below a floor): see docs/precision.md's
#   "Gates" section for the values measured on trained weights that set them.
TOLERANCES: dict[str, Tolerance] = {
    # fp32 artifact vs eager fp32: only summation order differs.
    "fp32": Tolerance("fp32", max_rel_error=1e-4, min_cosine=0.99999, min_top1=1.0, min_token_cosine=0.9999,
                      min_token_cosine_p1=0.99999, token_floor=0.9999, max_share_below=0.0),
    # fp16 graph vs the eager model cast to fp16 under the same precision policy (like for like).
    "fp16": Tolerance("fp16", max_rel_error=2e-2, min_cosine=0.9995, min_token_cosine=0.995,
                      min_token_cosine_p1=0.999, token_floor=0.999, max_share_below=0.01),
    # fp16 graph vs the eager fp32 model: what reduced precision costs.
    "fp16_vs_fp32": Tolerance("fp16_vs_fp32", max_rel_error=5e-2, min_cosine=0.999, min_token_cosine=0.99,
                              min_token_cosine_p1=0.998, token_floor=0.998, max_share_below=0.01),
    # bf16 (8 mantissa bits vs fp16's 11): not measured here, set 5x looser than fp16.
    "bf16": Tolerance("bf16", max_rel_error=1e-1, min_cosine=0.995, min_token_cosine=0.97,
                      min_token_cosine_p1=0.99, token_floor=0.99, max_share_below=0.05),
    "bf16_vs_fp32": Tolerance("bf16_vs_fp32", max_rel_error=2e-1, min_cosine=0.99, min_token_cosine=0.95,
                              min_token_cosine_p1=0.98, token_floor=0.99, max_share_below=0.1),
    # Quantized graphs have no like-for-like eager model: they are judged against eager fp32.
    "int8_vs_fp32": Tolerance("int8_vs_fp32", max_rel_error=3e-1, min_cosine=0.99, min_token_cosine=0.97,
                              min_token_cosine_p1=0.98, token_floor=0.99, max_share_below=0.1),
    "fp8_vs_fp32": Tolerance("fp8_vs_fp32", max_rel_error=3e-1, min_cosine=0.98, min_token_cosine=0.95,
                             min_token_cosine_p1=0.97, token_floor=0.98, max_share_below=0.1),
}
QUANTIZED = ("int8", "fp8")


def tolerance_for_output(tolerance: Tolerance, output: str) -> Tolerance:
    """``tolerance`` as it applies to ``output``: the same error and cosine gates for every output; the
    top-1 gate only for ``logits`` (the others have no classes); the token gates for token outputs."""
    if output_kind(output) == LOGITS_KIND:
        return tolerance
    return replace(tolerance, min_top1=None)


def tolerance_for(precision: str, against_fp32: bool = False) -> Tolerance:
    """The tolerance for an artifact of ``precision`` against a same-precision (or fp32) reference."""
    quantized = precision in QUANTIZED  # only ever compared with fp32
    key = precision if (precision == "fp32" or not (against_fp32 or quantized)) else f"{precision}_vs_fp32"
    if key not in TOLERANCES:
        raise ValueError(f"no tolerance for precision {precision!r}; expected one of fp32, fp16, bf16, int8, fp8")
    return TOLERANCES[key]


@dataclass
class CaseResult:
    """One shape, one output, one reference."""

    batch: int
    height: int
    width: int
    reference: str
    output: str
    tolerance: Tolerance
    metrics: ParityMetrics
    failures: list[str] = field(default_factory=list)
    inputs: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "height": self.height, "width": self.width,
            "reference": self.reference, "output": self.output, "inputs": self.inputs,
            "passed": self.passed, "failures": list(self.failures),
            "tolerance": self.tolerance.to_dict(), "metrics": self.metrics.to_dict(),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


def _conservative(key: str, value: float) -> float:
    """A summary value rounded the safe way: similarities and agreements (``min_*``) down to 7
    decimals, errors up to 4 significant digits, so a summary never looks better than a case."""
    if not math.isfinite(value):
        return value
    if key.startswith("min_"):
        return math.floor(value * 1e7) / 1e7
    if key.startswith("max_token_share"):
        return math.ceil(value * 1e6) / 1e6
    if value == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(value))) - 3
    return float(f"{math.ceil(value / 10**exponent) * 10**exponent:.4g}")


@dataclass
class ParityReport:
    """Results of a verification run: one :class:`CaseResult` per shape x reference x output."""

    candidate: str
    cases: list[CaseResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(case.passed for case in self.cases)

    @property
    def failures(self) -> list[str]:
        return [
            f"{c.output} {c.batch}x3x{c.height}x{c.width} vs {c.reference}: {msg}"
            for c in self.cases for msg in c.failures
        ]

    @property
    def outputs(self) -> list[str]:
        """The outputs compared, in the order they first appear."""
        return list(dict.fromkeys(c.output for c in self.cases))

    def worst(self, reference: str | None = None, output: str | None = None) -> dict[str, float]:
        """Worst values over the cases of ``output`` (default: ``logits`` if compared, else the first
        output): largest relative max error, smallest cosine and agreements."""
        if output is None:
            output = "logits" if "logits" in self.outputs or not self.outputs else self.outputs[0]
        cases = [c for c in self.cases if c.output == output and (reference is None or c.reference == reference)]
        if not cases:
            return {}
        worst: dict[str, float] = {
            "rel_max_error": max(c.metrics.rel_max_error for c in cases),
            "max_abs": max(c.metrics.max_abs for c in cases),
            "min_cosine": min(c.metrics.cosine for c in cases),
        }
        top1 = [c.metrics.top1_agreement for c in cases if c.metrics.top1_agreement is not None]
        top5 = [c.metrics.top5_agreement for c in cases if c.metrics.top5_agreement is not None]
        if top1:
            worst["min_top1_agreement"] = min(top1)
            worst["min_top5_agreement"] = min(top5)
        tokens = [c.metrics for c in cases if c.metrics.kind == TOKENS_KIND]
        if tokens:
            worst["min_token_cosine"] = min(m.token_cosine_min for m in tokens)
            worst["min_token_cosine_p1"] = min(m.token_cosine_p1 for m in tokens)
            worst["max_token_share_below"] = max(m.token_share_below for m in tokens)
        return worst

    def gates(self) -> dict[str, dict[str, Any]]:
        """Per output, how it was judged: its kind and, per reference, the thresholds applied."""
        gates: dict[str, dict[str, Any]] = {}
        for case in self.cases:
            entry = gates.setdefault(case.output, {"kind": case.metrics.kind, "references": {}})
            entry["references"].setdefault(case.reference, case.tolerance.to_dict())
        return gates

    def summary(self) -> dict[str, Any]:
        """A compact summary (stored in artifact metadata): per reference the worst values of the
        primary output (``logits``, else the first), and per output and reference the worst values."""
        references = sorted({c.reference for c in self.cases})

        def worst(ref: str, output: str | None = None) -> dict[str, Any]:
            return {"tolerance": next(c.tolerance.name for c in self.cases if c.reference == ref),
                    **{k: _conservative(k, v) for k, v in self.worst(ref, output).items()}}

        return {
            "passed": self.passed,
            "shapes": sorted({(c.batch, c.height, c.width) for c in self.cases}),
            "references": {ref: worst(ref) for ref in references},
            "outputs": {output: {ref: worst(ref, output) for ref in references
                                 if any(c.output == output and c.reference == ref for c in self.cases)}
                        for output in self.outputs},
            "gates": self.gates(),
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "passed": self.passed,
            "cases": [c.to_dict() for c in self.cases],
            "notes": list(self.notes),
            "failures": self.failures,
        }

    def format_table(self) -> str:
        """A plain-text table, one row per case, then the notes and the verdict."""
        header = ("shape", "output", "reference", "max-abs", "mean-abs", "rel-max", "cosine", "top-1", "top-5",
                  "token worst/p1/<floor", "tolerance", "result")
        rows = [header]
        for c in self.cases:
            m = c.metrics
            tokens = "-"
            if m.kind == TOKENS_KIND:
                tokens = (f"{m.token_cosine_min:.4f}/{m.token_cosine_p1:.4f}/"
                          f"{100 * m.token_share_below:.2f}%<{m.token_floor:g}")
            rows.append((
                f"{c.batch}x3x{c.height}x{c.width}", c.output, c.reference, f"{m.max_abs:.3e}", f"{m.mean_abs:.3e}",
                f"{m.rel_max_error:.2e}", f"{m.cosine:.6f}",
                "-" if m.top1_agreement is None else f"{m.top1_agreement:.3f}",
                "-" if m.top5_agreement is None else f"{m.top5_agreement:.3f}",
                tokens, c.tolerance.describe(m.kind), "pass" if c.passed else "FAIL",
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.extend(f"note: {note}" for note in self.notes)
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failures)} violation(s))"
        lines.append(f"parity of {self.candidate}: {verdict}")
        lines.extend(f"  {failure}" for failure in self.failures)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inputs and shapes


def _snap(value: float, stride: int, low: int, high: int) -> int:
    return snap_to_stride(value, low, high, stride, nearest=True)


def validation_shapes(shape_range: ShapeRange, stride: int, max_batch: int = 8) -> tuple[list[Shape], list[str]]:
    """Shapes that cover a declared range cheaply: its minimum, a middle, the maximum, non-square sizes.

    The larger batch is capped at ``max_batch`` (said in the returned notes); the maximum
    resolution is always included (at the smallest batch).
    """
    (b_lo, b_hi), (h_lo, h_hi), (w_lo, w_hi) = shape_range.batch, shape_range.height, shape_range.width
    for axis, (lo, hi) in (("height", (h_lo, h_hi)), ("width", (w_lo, w_hi))):
        if lo % stride or hi % stride:
            raise ValueError(f"{axis} range {lo}:{hi} must be multiples of the stride {stride}")
    notes = []
    b_big = min(b_hi, max(max_batch, b_lo))
    if b_big < b_hi:
        notes.append(f"batch validated up to {b_big} (declared maximum {b_hi}; larger batches are capped to keep validation cheap)")
    h_mid = _snap((h_lo + h_hi) / 2, stride, h_lo, h_hi)
    w_mid = _snap((w_lo + w_hi) / 2, stride, w_lo, w_hi)
    # A non-square middle shape: width between the minimum and the middle, unlike the height.
    w_ns = _snap((w_lo + w_mid) / 2, stride, w_lo, w_hi)
    if w_ns == h_mid:
        w_ns = next((w for w in (w_mid + stride, w_mid - stride, w_lo, w_hi) if w_lo <= w <= w_hi and w != h_mid), w_ns)
    candidates = [
        (b_lo, h_lo, w_lo),
        (b_big, h_mid, w_ns),
        (b_lo, h_hi, w_lo),
        (b_lo, h_hi, w_hi),
    ]
    shapes: list[Shape] = []
    for shape in candidates:
        if shape not in shapes:
            shapes.append(shape)
    if all(h == w for _, h, w in shapes):
        notes.append("no non-square size fits the declared range; only square sizes were validated")
    return shapes, notes


class InputFactory:
    """Deterministic test batches: real photographs resized to each shape, and synthetic images.

    Real images are fitted to ``height x width`` the way the eval transform does it (resize so
    the image covers the target, centre-crop; or, for ``resize_mode`` ``"squash"``, resize to the
    target) with the artifact's interpolation, then scaled to
    [0, 1] and normalised with its mean/std. Synthetic images are uniform random pixels with the
    same normalisation. In a batch, the first half (rounded up) are photographs.
    """

    def __init__(self, preprocessing: Preprocessing, images: Sequence[Any] | None = None,
                 synthetic: bool = True, seed: int = 0) -> None:
        from vitdeploy.preprocessing import bundled_images, load_image

        sources = list(images) if images is not None else list(bundled_images())
        self.images = [load_image(image) for image in sources]
        if not self.images and not synthetic:
            raise ValueError("no images to verify with: pass images or allow synthetic inputs")
        self.preprocessing = preprocessing
        self.synthetic = synthetic
        self.seed = seed

    def _real(self, index: int, height: int, width: int) -> np.ndarray:
        from PIL import Image

        from vitdeploy.preprocessing import INTERPOLATIONS

        image = self.images[index % len(self.images)]
        if self.preprocessing.resize_mode == "squash":
            size = (width, height)
        else:
            scale = max(height / image.height, width / image.width)
            size = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
        resample = INTERPOLATIONS.get(self.preprocessing.interpolation, Image.Resampling.BICUBIC)
        resized = np.asarray(image.resize(size, resample), dtype=np.float32)
        top, left = (size[1] - height) // 2, (size[0] - width) // 2
        return resized[top:top + height, left:left + width] / np.float32(255.0)

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.preprocessing.mean, dtype=np.float32)
        std = np.asarray(self.preprocessing.std, dtype=np.float32)
        return ((pixels - mean) / std).transpose(2, 0, 1)

    def batch(self, batch: int, height: int, width: int) -> tuple[np.ndarray, str]:
        """A float32 ``[batch, 3, height, width]`` batch and a description of what is in it."""
        rng = np.random.default_rng([self.seed, batch, height, width])
        real = len(self.images) and (batch if not self.synthetic else max(1, math.ceil(batch / 2)))
        samples = []
        for index in range(batch):
            pixels = self._real(index, height, width) if index < real else rng.random((height, width, 3), np.float32)
            samples.append(self._normalise(pixels))
        kinds = []
        if real:
            kinds.append(f"{real} photo(s)")
        if batch - real:
            kinds.append(f"{batch - real} synthetic")
        return np.ascontiguousarray(np.stack(samples), dtype=np.float32), " + ".join(kinds)


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class Reference:
    """A reference to compare against: a callable ``[N,3,H,W] float32 -> logits`` and its tolerance."""

    name: str
    run: RunFn
    tolerance: Tolerance


def _call(fn: RunFn, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of a runtime (every output, through ``run_outputs``) or of a plain callable."""
    spec = getattr(fn, "input_spec", None)
    dtype = getattr(spec, "dtype", None)
    if dtype is not None and np.dtype(dtype) != inputs.dtype:
        inputs = inputs.astype(dtype)
    run_outputs = getattr(fn, "run_outputs", None)
    out = run_outputs(inputs) if run_outputs is not None else fn(inputs)
    if isinstance(out, Mapping):
        return {name: np.asarray(value) for name, value in out.items()}
    return {"logits": np.asarray(out)}


def verify(
    candidate: RunFn,
    references: Reference | Sequence[Reference],
    shapes: Sequence[Shape],
    inputs: InputFactory,
    candidate_name: str = "candidate",
    notes: Sequence[str] = (),
    on_case: Callable[[CaseResult], None] | None = None,
) -> ParityReport:
    """Run ``candidate`` and every reference on the same batches at ``shapes``; compare outputs.

    Callables return logits (or a mapping of output name to array; outputs both sides return
    are compared, ``logits`` with top-k agreement). A :class:`~vitdeploy.runtimes.base.Runtime`
    is asked for every output (``run_outputs``) and gets its inputs cast to ``input_spec.dtype``.
    """
    if isinstance(references, Reference):
        references = [references]
    if not references:
        raise ValueError("verify needs at least one reference")
    report = ParityReport(candidate=candidate_name, notes=list(notes))
    for batch, height, width in shapes:
        pixels, description = inputs.batch(batch, height, width)
        start = time.perf_counter()
        cand_out = _call(candidate, pixels)
        cand_seconds = time.perf_counter() - start
        for ref in references:
            start = time.perf_counter()
            ref_out = _call(ref.run, pixels)
            ref_seconds = time.perf_counter() - start
            for output in [name for name in ref_out if name in cand_out]:
                tolerance = tolerance_for_output(ref.tolerance, output)
                metrics = compare_outputs(ref_out[output], cand_out[output], output_kind(output), tolerance.token_floor)
                case = CaseResult(
                    batch=batch, height=height, width=width, reference=ref.name, output=output,
                    tolerance=tolerance, metrics=metrics, failures=tolerance.check(metrics), inputs=description,
                    seconds={"candidate": cand_seconds, "reference": ref_seconds},
                )
                report.cases.append(case)
                if on_case is not None:
                    on_case(case)
    return report


# ---------------------------------------------------------------------------------------------
# Accuracy on labelled images


@dataclass(frozen=True)
class AccuracyMetrics:
    """Top-1 and top-k accuracy of logits against true labels (fractions in [0, 1])."""

    top1: float
    top5: float
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(logits: np.ndarray, labels: Sequence[int] | np.ndarray, k: int = 5) -> AccuracyMetrics:
    """Top-1 and top-``k`` accuracy (``k = min(k, C)``) of ``[N, C]`` logits for ``labels`` ``[N]``."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or not logits.shape[0]:
        raise ValueError(f"expected logits [N, C] and labels [N] with N >= 1, got {logits.shape} and {labels.shape}")
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return AccuracyMetrics(top1=float(np.mean(top[:, 0] == labels)), top5=float(np.mean((top == labels[:, None]).any(1))),
                           count=int(labels.size))


@dataclass
class AccuracyReport:
    """Accuracy of an artifact and of the eager reference on the same labelled images, and the drop."""

    candidate_name: str
    reference_name: str
    candidate: AccuracyMetrics
    reference: AccuracyMetrics
    parity: ParityMetrics
    tolerance: Tolerance
    source: str = ""
    max_drop: float | None = None  # points of top-1 the artifact may lose, when gated
    notes: list[str] = field(default_factory=list)

    @property
    def top1_drop(self) -> float:
        """Points of top-1 accuracy lost against the reference (negative: the artifact is better)."""
        return 100.0 * (self.reference.top1 - self.candidate.top1)

    @property
    def top5_drop(self) -> float:
        return 100.0 * (self.reference.top5 - self.candidate.top5)

    @property
    def failures(self) -> list[str]:
        failures = self.tolerance.check(self.parity)
        if self.max_drop is not None and not self.top1_drop <= self.max_drop:
            failures.append(f"top-1 accuracy drops {self.top1_drop:.2f} points; at most {self.max_drop:g} allowed")
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate_name, "reference": self.reference_name, "source": self.source,
                "images": self.candidate.count, "accuracy": {"candidate": self.candidate.to_dict(),
                                                            "reference": self.reference.to_dict()},
                "top1_drop_points": round(self.top1_drop, 4), "top5_drop_points": round(self.top5_drop, 4),
                "max_drop_points": self.max_drop, "parity": self.parity.to_dict(),
                "tolerance": self.tolerance.to_dict(), "passed": self.passed, "failures": self.failures,
                "notes": list(self.notes)}

    def format_table(self) -> str:
        """The two accuracies side by side, the drop, the agreement on these images and the verdict."""
        rows = [("", "top-1", "top-5"),
                (self.candidate_name, f"{100 * self.candidate.top1:.2f}%", f"{100 * self.candidate.top5:.2f}%"),
                (self.reference_name, f"{100 * self.reference.top1:.2f}%", f"{100 * self.reference.top5:.2f}%"),
                ("drop (points)", f"{self.top1_drop:+.2f}", f"{self.top5_drop:+.2f}")]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"accuracy on {self.candidate.count} labelled images ({self.source}):"]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        p = self.parity
        lines.append(f"agreement on these images: cosine {p.cosine:.6f}, rel-max {p.rel_max_error:.2e}, "
                     f"top-1 agreement {p.top1_agreement:.4f} (tolerance {self.tolerance.name})")
        lines.extend(f"note: {note}" for note in self.notes)
        lines.append("accuracy check: " + ("PASSED" if self.passed else "FAILED"))
        lines.extend(f"  {failure}" for failure in self.failures)
        return "\n".join(lines)


def evaluate_accuracy(candidate: RunFn, reference: Reference, items: Sequence[tuple[Any, int]],
                      preprocessing: Preprocessing, batch_size: int = 32, candidate_name: str = "artifact",
                      source: str = "", max_drop: float | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> AccuracyReport:
    """Run ``candidate`` and ``reference`` on labelled images ``(image, class index)``, preprocessed with
    the artifact's eval transform, ``batch_size`` at a time; accuracy of both and their agreement."""
    from vitdeploy.preprocessing import preprocess_batch

    if not items:
        raise ValueError("evaluate_accuracy needs at least one labelled image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cand_logits, ref_logits = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pixels = np.ascontiguousarray(preprocess_batch([image for image, _ in chunk], preprocessing), dtype=np.float32)
        cand_logits.append(_call(candidate, pixels)["logits"].astype(np.float32))
        ref_logits.append(_call(reference.run, pixels)["logits"].astype(np.float32))
        if on_batch is not None:
            on_batch(min(start + batch_size, len(items)), len(items))
    labels = [label for _, label in items]
    cand, ref = np.concatenate(cand_logits), np.concatenate(ref_logits)
    return AccuracyReport(candidate_name=candidate_name, reference_name=reference.name,
                          candidate=accuracy(cand, labels), reference=accuracy(ref, labels),
                          parity=compare_logits(ref, cand), tolerance=reference.tolerance, source=source,
                          max_drop=max_drop)
