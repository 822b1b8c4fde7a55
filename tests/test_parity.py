"""Parity metrics, tolerances, shapes, inputs and the verify loop (numpy only, no model)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from vitdeploy.metadata import Preprocessing, ShapeRange
from vitdeploy.parity import (
    TOLERANCES,
    InputFactory,
    Reference,
    Tolerance,
    compare_logits,
    tolerance_for,
    validation_shapes,
    verify,
)
from vitdeploy.preprocessing import bundled_images, preprocess


def logits(rows: int = 4, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, classes)).astype(np.float32)


def test_identical_outputs_have_zero_error_and_full_agreement():
    ref = logits()
    metrics = compare_logits(ref, ref.copy())
    assert metrics.max_abs == 0.0 and metrics.mean_abs == 0.0 and metrics.rel_max_error == 0.0
    assert metrics.cosine == pytest.approx(1.0)
    assert metrics.top1_agreement == 1.0 and metrics.top5_agreement == 1.0
    assert metrics.num_samples == 4
    assert TOLERANCES["fp32"].check(metrics) == []


def test_errors_are_relative_to_the_largest_reference_logit():
    ref = logits()
    cand = ref.copy()
    cand[2, 3] += 0.01
    metrics = compare_logits(ref, cand)
    assert metrics.max_abs == pytest.approx(0.01, rel=1e-4)
    assert metrics.mean_abs == pytest.approx(0.01 / ref.size, rel=1e-4)
    assert metrics.logit_scale == pytest.approx(float(np.abs(ref).max()))
    assert metrics.rel_max_error == pytest.approx(0.01 / float(np.abs(ref).max()), rel=1e-4)


def test_top1_flip_and_top5_overlap_are_counted_per_sample():
    ref = np.tile(np.arange(10, dtype=np.float32), (2, 1))  # top-5 = classes 9..5
    cand = ref.copy()
    cand[0, [9, 8]] = cand[0, [8, 9]]  # swap the two best: top-1 differs, top-5 set unchanged
    cand[1, 0] = 100.0  # class 0 becomes top-1 and enters the top-5, pushing class 5 out
    metrics = compare_logits(ref, cand)
    assert metrics.top1_agreement == 0.0
    assert metrics.top5_agreement == pytest.approx((5 / 5 + 4 / 5) / 2)


def test_cosine_is_the_minimum_over_samples():
    ref = logits(3)
    cand = ref.copy()
    cand[1] = -cand[1]
    assert compare_logits(ref, cand).cosine == pytest.approx(-1.0)


def test_all_zero_logits_compare_as_equal():
    zeros = np.zeros((2, 5), np.float32)
    metrics = compare_logits(zeros, zeros)
    assert metrics.cosine == 1.0 and metrics.rel_max_error == 0.0


def test_non_finite_candidate_fails_every_tolerance():
    ref = logits()
    cand = ref.copy()
    cand[0, 0] = np.nan
    metrics = compare_logits(ref, cand)
    for tolerance in TOLERANCES.values():
        assert tolerance.check(metrics), tolerance.name


def test_shape_mismatch_is_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(4, 10\)"):
        compare_logits(logits(4), logits(2))


def test_tolerance_failures_name_the_measured_values():
    ref = logits()
    cand = ref + 0.05
    failures = Tolerance("strict", max_rel_error=1e-4, min_cosine=0.99999999, min_top1=1.0).check(
        compare_logits(ref, cand))
    assert any("5e-02" in f or "0.05" in f for f in failures)
    assert any("strict" in f for f in failures)


def test_tolerance_lookup_per_precision():
    assert tolerance_for("fp32") is TOLERANCES["fp32"]
    assert tolerance_for("fp16") is TOLERANCES["fp16"]
    assert tolerance_for("fp16", against_fp32=True) is TOLERANCES["fp16_vs_fp32"]
    # like-for-like references are held to tighter thresholds than fp16-vs-fp32
    assert TOLERANCES["fp16"].max_rel_error < TOLERANCES["fp16_vs_fp32"].max_rel_error
    assert TOLERANCES["fp32"].max_rel_error == 1e-4
    assert TOLERANCES["fp16_vs_fp32"].min_cosine == 0.999
    # quantized graphs have no like-for-like eager model: always the gate against fp32
    assert tolerance_for("int8") is tolerance_for("int8", against_fp32=True) is TOLERANCES["int8_vs_fp32"]
    assert TOLERANCES["int8_vs_fp32"].min_cosine == 0.99
    assert tolerance_for("fp8").name == "fp8_vs_fp32"
    with pytest.raises(ValueError, match="int4"):
        tolerance_for("int4")


def test_validation_shapes_cover_min_middle_max_and_non_square():
    shapes, notes = validation_shapes(ShapeRange(batch=(1, 64), height=(112, 448), width=(112, 448)), 16)
    assert (1, 112, 112) in shapes and (1, 448, 448) in shapes
    assert any(h != w for _, h, w in shapes)
    assert max(b for b, _, _ in shapes) == 8
    assert any("64" in note and "8" in note for note in notes)
    for _, h, w in shapes:
        assert h % 16 == 0 and w % 16 == 0 and 112 <= h <= 448 and 112 <= w <= 448


def test_validation_shapes_small_batch_range_is_not_capped():
    shapes, notes = validation_shapes(ShapeRange(batch=(2, 4), height=(32, 32), width=(32, 64)), 16)
    assert {b for b, _, _ in shapes} == {2, 4}
    assert not any("capped" in note for note in notes)
    assert len(shapes) == len(set(shapes))


def test_validation_shapes_reject_bounds_off_the_stride():
    with pytest.raises(ValueError, match="stride 16"):
        validation_shapes(ShapeRange(batch=(1, 2), height=(100, 224), width=(112, 224)), 16)


def test_square_only_range_is_noted():
    _, notes = validation_shapes(ShapeRange(batch=(1, 1), height=(224, 224), width=(224, 224)), 16)
    assert any("non-square" in note for note in notes)


PRE = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_size=36, crop_size=32)


def test_input_factory_mixes_photos_and_synthetic_deterministically():
    factory = InputFactory(PRE)
    batch, description = factory.batch(3, 32, 48)
    again, _ = InputFactory(PRE).batch(3, 32, 48)
    assert batch.shape == (3, 3, 32, 48) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, again)
    assert "2 photo" in description and "1 synthetic" in description
    # normalised pixels of [0, 1] images stay within (0 - mean) / std .. (1 - mean) / std
    assert batch.min() >= (0 - 0.485) / 0.229 - 1e-4 and batch.max() <= (1 - 0.406) / 0.225 + 1e-4
    # photographs are smooth, uniform noise is not: neighbouring pixels differ far less in photos
    photo_step = np.abs(np.diff(batch[0], axis=-1)).mean()
    noise_step = np.abs(np.diff(batch[2], axis=-1)).mean()
    assert photo_step < 0.5 * noise_step


def test_input_factory_squashes_photos_for_a_squashing_model():
    """A model evaluated on squashed photos is verified on squashed photos: the whole photo at each shape,
    as ``preprocess`` gives it at the native one."""
    squash = dataclasses.replace(PRE, resize_size=32, resize_mode="squash")
    photo = bundled_images()[1]
    assert Image.open(photo).width != Image.open(photo).height
    batch, _ = InputFactory(squash, images=[photo], synthetic=False).batch(1, 32, 32)
    np.testing.assert_allclose(batch[0], preprocess(photo, squash), rtol=0, atol=1e-6)
    cropped, _ = InputFactory(PRE, images=[photo], synthetic=False).batch(1, 32, 32)
    assert np.abs(cropped - batch).mean() > 0.1


def test_input_factory_real_only_and_without_images():
    batch, description = InputFactory(PRE, synthetic=False).batch(2, 16, 16)
    assert "synthetic" not in description and batch.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="no images"):
        InputFactory(PRE, images=[], synthetic=False)


@dataclass
class _Spec:
    dtype: str


class HalfInputModel:
    """A stand-in runtime with an fp16 input spec (records the dtype it was called with)."""

    input_spec = _Spec("float16")

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        self.seen: list[np.dtype] = []

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.seen.append(pixels.dtype)
        return pixels.astype(np.float32).reshape(len(pixels), -1)[:, :64] @ self.weights


def test_verify_runs_every_shape_and_reference_and_reports():
    weights = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)

    def reference(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1)[:, :64] @ weights

    candidate = HalfInputModel(weights)
    shapes = [(1, 16, 16), (2, 16, 32)]
    good = Reference("exact", reference, TOLERANCES["fp16"])
    shifted = Reference("shifted", lambda x: reference(x) + 1.0, TOLERANCES["fp32"])
    report = verify(candidate, [good, shifted], shapes, InputFactory(PRE), candidate_name="double")
    assert len(report.cases) == 4
    assert candidate.seen == [np.float16, np.float16]  # cast to the runtime's input dtype
    assert all(c.passed for c in report.cases if c.reference == "exact")
    assert not any(c.passed for c in report.cases if c.reference == "shifted")
    assert not report.passed and len(report.failures) >= 2
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and len(data["cases"]) == 4
    table = report.format_table()
    assert "1x3x16x16" in table and "2x3x16x32" in table and "FAIL" in table and "pass" in table
    summary = report.summary()
    assert summary["references"]["exact"]["min_cosine"] > 0.999


def test_verify_compares_every_output_both_sides_return():
    def run(pixels: np.ndarray) -> dict[str, np.ndarray]:
        flat = pixels.reshape(len(pixels), -1)
        return {"logits": flat[:, :10], "last_hidden_state": flat[:, :30].reshape(len(pixels), 3, 10)}

    report = verify(run, Reference("same", run, TOLERANCES["fp32"]), [(2, 16, 16)], InputFactory(PRE))
    outputs = {c.output: c for c in report.cases}
    assert set(outputs) == {"logits", "last_hidden_state"}
    assert outputs["last_hidden_state"].metrics.top1_agreement is None
    assert report.passed


def test_parity_module_does_not_import_torch():
    code = "import sys, vitdeploy.parity; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
