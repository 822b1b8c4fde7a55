"""Preprocessing (numpy + Pillow) against an independent torch reference, on real photographs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vitdeploy.metadata import ArtifactMetadata, Preprocessing, ShapeRange, TensorInfo
from vitdeploy.preprocessing import (
    DATA_DIR,
    RESIZE_MAX_ABS_BOUND,
    RESIZE_MEAN_ABS_BOUND,
    bundled_images,
    center_crop,
    load_image,
    load_labels,
    preprocess,
    preprocess_batch,
    resized_size,
)

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# Pillow's resize against torch's antialiased one (rounded here), in normalised units: about 0.2 of a grey
# level on average. A 1 px crop shift gives 0.067..0.234 and bilinear instead of bicubic about 0.018, so
# the bound catches both.
MEAN_ABS_BOUND = RESIZE_MEAN_ABS_BOUND
MAX_ABS_BOUND = RESIZE_MAX_ABS_BOUND


def torch_reference(image: Image.Image, pre: Preprocessing, shift: int = 0) -> np.ndarray:
    """timm's eval transform rebuilt on torch ops: antialiased bicubic resize (the short side, or both with
    ``"squash"``), centre crop, normalise."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    width, height = image.size
    short = min(width, height)
    new_h = pre.resize_size if height == short else int(pre.resize_size * height / short)
    new_w = pre.resize_size if width == short else int(pre.resize_size * width / short)
    if pre.resize_mode == "squash":
        new_h = new_w = pre.resize_size
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.clamp(0, 255).round()[0]
    top = int(round((new_h - pre.crop_size) / 2)) + shift
    left = int(round((new_w - pre.crop_size) / 2)) + shift
    crop = resized[:, top:top + pre.crop_size, left:left + pre.crop_size] / 255.0
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return ((crop - mean) / std).numpy()


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [load_image(path) for path in bundled_images()]


@pytest.mark.parametrize("size, crop_pct", [(224, 0.9), (384, 1.0), (32, 1.0), (112, 0.875)])
def test_matches_an_independent_torch_reference(photos, size, crop_pct):
    pre = Preprocessing.for_model(size, crop_pct, interpolation="bicubic", **IMAGENET)
    for photo in photos:
        ours = preprocess(photo, pre)
        assert ours.shape == (3, size, size) and ours.dtype == np.float32
        diff = np.abs(ours - torch_reference(photo, pre))
        assert diff.mean() < MEAN_ABS_BOUND, (size, photo.size, float(diff.mean()))
        assert diff.max() < MAX_ABS_BOUND, (size, photo.size, float(diff.max()))


@pytest.mark.parametrize("size, crop_pct", [(224, 1.0), (224, 0.875), (48, 1.0)])
def test_squash_matches_an_independent_torch_reference(photos, size, crop_pct):
    pre = Preprocessing.for_model(size, crop_pct, interpolation="bicubic", resize_mode="squash", **IMAGENET)
    for photo in photos:
        ours = preprocess(photo, pre)
        assert ours.shape == (3, size, size)
        diff = np.abs(ours - torch_reference(photo, pre))
        assert diff.mean() < MEAN_ABS_BOUND, (size, photo.size, float(diff.mean()))
        assert diff.max() < MAX_ABS_BOUND, (size, photo.size, float(diff.max()))
        if photo.width != photo.height:  # the aspect-keeping resize is far from it
            kept = preprocess(photo, dataclasses.replace(pre, resize_mode="shortest"))
            assert np.abs(kept - torch_reference(photo, pre)).mean() > 10 * MEAN_ABS_BOUND


def test_the_reference_comparison_detects_a_one_pixel_crop_shift(photos):
    pre = Preprocessing.for_model(224, 0.9, interpolation="bicubic", **IMAGENET)
    shifted = [np.abs(preprocess(p, pre) - torch_reference(p, pre, shift=1)).mean() for p in photos]
    assert min(shifted) > MEAN_ABS_BOUND


def test_interpolation_and_resize_size_matter(photos):
    pre = Preprocessing.for_model(224, 0.9, interpolation="bicubic", **IMAGENET)
    bicubic = preprocess(photos[0], pre)
    bilinear = preprocess(photos[0], dataclasses.replace(pre, interpolation="bilinear"))
    larger = preprocess(photos[0], dataclasses.replace(pre, resize_size=256))
    assert np.abs(bicubic - bilinear).mean() > 1e-3
    assert np.abs(bicubic - larger).mean() > 1e-2
    with pytest.raises(ValueError, match="interpolation 'cubic' is not one of"):
        preprocess(photos[0], dataclasses.replace(pre, interpolation="cubic"))


def test_constant_image_normalises_exactly():
    color = (200, 100, 50)
    image = Image.new("RGB", (90, 60), color)
    pre = Preprocessing(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), resize_size=40, crop_size=32)
    out = preprocess(image, pre)
    expected = (np.array(color, np.float32) / 255 - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], (3, 32, 32)), rtol=1e-6)


def test_resize_rule_keeps_aspect_like_torchvision():
    assert resized_size(600, 400, 256) == (int(256 * 600 / 400), 256)
    assert resized_size(400, 600, 256) == (256, int(256 * 600 / 400))
    assert resized_size(451, 300, 248) == (int(248 * 451 / 300), 248)
    assert resized_size(300, 300, 100) == (100, 100)


def test_center_crop_takes_the_middle_and_pads_small_images():
    grid = np.arange(7 * 9).reshape(7, 9, 1)
    crop = center_crop(grid, 3)
    assert crop[0, 0, 0] == grid[2, 3, 0] and crop.shape == (3, 3, 1)
    small = np.ones((2, 3, 3))
    padded = center_crop(small, 5)
    assert padded.shape == (5, 5, 3)
    assert padded.sum() == small.sum()
    assert padded[1:3, 1:4].all() and not padded[0].any() and not padded[:, 0].any()


def test_load_image_accepts_paths_pil_and_arrays(tmp_path):
    path = bundled_images()[0]
    from_path = load_image(path)
    assert from_path.mode == "RGB"
    gray = Image.new("L", (20, 10), 77)
    assert load_image(gray).mode == "RGB"
    assert load_image(np.zeros((10, 20, 3), np.uint8)).size == (20, 10)
    with pytest.raises(ValueError, match="must be uint8"):
        load_image(np.zeros((10, 20, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not an image Pillow can read"):
        load_image(text)


def test_preprocess_batch_stacks_single_results(photos):
    pre = Preprocessing.for_model(64, 0.875, interpolation="bicubic", **IMAGENET)
    batch = preprocess_batch(bundled_images(), pre)
    assert batch.shape == (len(photos), 3, 64, 64) and batch.dtype == np.float32
    for row, photo in zip(batch, photos, strict=True):
        np.testing.assert_array_equal(row, preprocess(photo, pre))
    with pytest.raises(ValueError, match="at least one image"):
        preprocess_batch([], pre)


def test_bundled_images_are_small_real_photographs():
    paths = bundled_images()
    assert len(paths) >= 3
    assert sum(p.stat().st_size for p in paths) < 200_000
    readme = (DATA_DIR / "README.md").read_text()
    for path in paths:
        assert path.name in readme
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) <= 256
            assert np.asarray(image).std() > 20  # a photograph, not a flat placeholder
    assert "public domain" in readme.lower() and "CC0" in readme


def _metadata(labels: list[str] | None, num_classes: int = 3) -> ArtifactMetadata:
    return ArtifactMetadata(
        model_config={"patch_size": 16, "num_classes": num_classes}, preprocessing=Preprocessing(),
        inputs=[TensorInfo("pixel_values", "float32", ["batch", 3, "height", "width"])],
        outputs=[TensorInfo("logits", "float32", ["batch", num_classes])],
        shape_range=ShapeRange(), labels=labels,
    )


def test_load_labels_from_metadata_or_indices():
    assert load_labels(_metadata(["cat", "dog", "rocket"])) == ["cat", "dog", "rocket"]
    assert load_labels(_metadata(None, num_classes=4)) == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="2 labels but the model has 3 classes"):
        load_labels(_metadata(["cat", "dog"]))


def test_preprocessing_does_not_import_torch():
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from vitdeploy.metadata import Preprocessing
        from vitdeploy.preprocessing import bundled_images, preprocess
        out = preprocess(bundled_images()[0], Preprocessing())
        assert out.shape == (3, 224, 224)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Image modes: every mode Pillow opens becomes the 8-bit RGB the eval transform expects


def _round_trip(image: Image.Image, path) -> Image.Image:
    """Save and reopen, so the test reads a real file the way `predict` does."""
    image.save(path)
    with Image.open(path) as opened:
        opened.load()
        assert opened.mode == image.mode, f"{path.suffix} did not keep mode {image.mode}"
        return opened.copy()


def _rgb(image) -> np.ndarray:
    return np.asarray(load_image(image), dtype=np.int64)


def test_eight_bit_modes_become_the_rgb_pillow_gives(tmp_path):
    bits = Image.fromarray(np.array([[0, 255, 0], [255, 255, 0]], np.uint8)).convert("1")
    assert (_rgb(_round_trip(bits, tmp_path / "bits.png")) == np.array([[0, 255, 0], [255, 255, 0]])[..., None]).all()

    palette = Image.new("P", (2, 1))
    palette.putpalette([200, 10, 20, 5, 150, 250] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert _rgb(_round_trip(palette, tmp_path / "palette.png")).tolist() == [[[200, 10, 20], [5, 150, 250]]]

    gray_alpha = Image.new("LA", (2, 2), (90, 10))
    assert (_rgb(_round_trip(gray_alpha, tmp_path / "la.png")) == 90).all()  # alpha dropped, not composited

    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert (_rgb(_round_trip(rgba, tmp_path / "rgba.png")) == [10, 20, 30]).all()

    cmyk = Image.new("CMYK", (1, 1), (100, 50, 0, 30))
    expected = [round((255 - ink) * (255 - 30) / 255) for ink in (100, 50, 0)]  # (255-C)(255-K)/255
    assert _rgb(_round_trip(cmyk, tmp_path / "cmyk.tif")).tolist() == [[expected]]


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.array([[0, 257, 5000], [32768, 65280, 65535]], np.uint16)
    expected = np.round(values / 257.0).astype(np.int64)  # 0, 1, 19, 128, 254, 255
    i16 = _round_trip(Image.fromarray(values), tmp_path / "i16.png")
    assert i16.mode == "I;16"
    assert (_rgb(i16) == expected[..., None]).all()
    big_endian = Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes())
    assert (_rgb(big_endian) == expected[..., None]).all()
    as_int32 = _round_trip(Image.fromarray(values.astype(np.int32)), tmp_path / "i32.tif")
    assert as_int32.mode == "I" and (_rgb(as_int32) == expected[..., None]).all()


def test_a_dark_sixteen_bit_image_is_not_white(tmp_path):
    """The report's case: a 16-bit PNG of 5000s (8 % grey) must preprocess like 8-bit grey 19, not white."""
    Image.fromarray(np.full((20, 30), 5000, np.uint16)).save(tmp_path / "i16.png")
    pre = Preprocessing.for_model(16, 0.875, interpolation="bicubic", **IMAGENET)
    dark = preprocess(tmp_path / "i16.png", pre)
    white = preprocess(Image.new("RGB", (30, 20), (255, 255, 255)), pre)
    grey = preprocess(Image.new("L", (30, 20), 19), pre)
    assert not np.allclose(dark, white)
    np.testing.assert_array_equal(dark, grey)


def test_float_images_in_zero_one_are_scaled_and_others_refused(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [0.75, 0.999, 1.0]], np.float32)
    floats = _round_trip(Image.fromarray(values), tmp_path / "f.tif")
    assert floats.mode == "F"
    assert (_rgb(floats) == np.round(values.astype(np.float64) * 255)[..., None]).all()
    Image.fromarray(values * 255).save(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"f255\.tif.*mode F.*0\.\.255.*\[0, 1\]"):
        load_image(tmp_path / "f255.tif")
    with pytest.raises(ValueError, match=r"mode F.*nan"):
        load_image(Image.fromarray(np.full((2, 2), np.nan, np.float32)))
    with pytest.raises(ValueError, match=r"mode I.*-5\.\.70000.*0\.\.65535"):
        load_image(Image.fromarray(np.array([[-5, 70000]], np.int32)))
