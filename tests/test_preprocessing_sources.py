"""The preprocessing a checkpoint's own library describes, read by vitdeploy and run on real photos, against
that library's own transform (transformers' image processors) or its own settings (timm's pretrained_cfg,
open_clip's preprocess_cfg). The bundled photos are 3:2 and square, so a resize that keeps the aspect and
one that squashes it give different pixels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitdeploy.checkpoints import load_model, read_checkpoint
from vitdeploy.checkpoints.hf_common import preprocessing
from vitdeploy.config import InputPreprocessing
from vitdeploy.metadata import ArtifactMetadata, Preprocessing, ShapeRange
from vitdeploy.preprocessing import bundled_images, load_image, preprocess

try:
    import transformers
except ImportError:  # pragma: no cover - transformers is in the dev extra
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


@pytest.fixture(scope="module")
def photos():
    pictures = [load_image(path) for path in bundled_images()]
    assert any(p.width != p.height for p in pictures), "the comparison needs a photo that is not square"
    return pictures


def _processor_folder(folder: Path, kind: str, edits: dict) -> Path:
    """``kind``'s default settings saved as transformers saves them, with ``edits`` (older hubs' plain
    numbers, other sizes) written over them."""
    base = kind.replace("FeatureExtractor", "ImageProcessor")
    getattr(transformers, base + "Pil")().save_pretrained(folder)
    path = folder / "preprocessor_config.json"
    settings = {**json.loads(path.read_text()), **edits, "image_processor_type": kind}
    path.write_text(json.dumps(settings))
    return folder


def _ours(photos, fields: dict, size: int) -> np.ndarray:
    return np.stack([preprocess(photo, InputPreprocessing(**fields).at(size)) for photo in photos])


def _theirs(photos, folder: Path, kind: str) -> np.ndarray:
    base = kind.replace("FeatureExtractor", "ImageProcessor")
    processor = getattr(transformers, base + "Pil").from_pretrained(folder)
    return processor(images=photos, return_tensors="np")["pixel_values"]


# (processor, settings over its defaults, the resize vitdeploy must read from them)
PROCESSORS = [
    ("ViTImageProcessor", {}, "squash"),
    ("ViTImageProcessor", {"size": 224}, "squash"),  # older hubs: a plain number is the square's side
    ("ViTFeatureExtractor", {"size": 224}, "squash"),
    ("DeiTImageProcessor", {}, "squash"),  # 256x256, then the centre 224
    ("SiglipImageProcessor", {}, "squash"),
    ("CLIPImageProcessor", {}, "shortest"),
    ("CLIPFeatureExtractor", {"size": 224, "crop_size": 224}, "shortest"),  # a plain number is the short side
    ("BitImageProcessor", {}, "shortest"),
    ("BitImageProcessor", {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, "shortest"),
    ("ViTImageProcessor", {"do_normalize": False}, "squash"),  # the [0, 1] pixels as they are
    ("ViTImageProcessor", {"do_rescale": False}, "squash"),  # 0..255, normalised
    ("ViTImageProcessor", {"rescale_factor": 1 / 127.5, "do_normalize": False}, "squash"),  # 0..2
]


@needs_transformers
@pytest.mark.parametrize("kind, edits, mode", PROCESSORS, ids=lambda v: v if isinstance(v, str) else None)
def test_preprocessing_equals_the_transformers_processor(tmp_path, photos, kind, edits, mode):
    folder = _processor_folder(tmp_path, kind, edits)
    notes: list[str] = []
    fields = preprocessing(folder, notes)
    assert fields["resize_mode"] == mode and not notes
    theirs = _theirs(photos, folder, kind)
    ours = _ours(photos, fields, theirs.shape[-1])
    # both resize with Pillow on 8-bit pixels, then scale and normalise in float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@needs_transformers
def test_what_vitdeploy_does_not_reproduce_is_noted(tmp_path):
    folder = _processor_folder(tmp_path, "BitImageProcessor", {"do_center_crop": False})
    notes: list[str] = []
    assert preprocessing(folder, notes)["resize_mode"] == "shortest"
    assert len(notes) == 1 and "no crop" in notes[0]
    folder = _processor_folder(tmp_path, "ViTImageProcessor", {"size": {"height": 224, "width": 320}})
    notes = []
    assert "resize_mode" not in preprocessing(folder, notes)
    assert len(notes) == 1 and "224x320" in notes[0]
    folder = _processor_folder(tmp_path, "ViTImageProcessor", {"do_rescale": False})
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    del settings["image_mean"]
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    notes = []
    preprocessing(folder, notes)
    assert len(notes) == 1 and "scales pixels by 1 but names no mean and std" in notes[0]


def _hf_vit_folder(tmp_path: Path, processor: str | None) -> Path:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=224, patch_size=32)
    folder = tmp_path / "hf"
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    if processor is not None:
        getattr(transformers, processor + "Pil")().save_pretrained(folder)
    return folder


@needs_transformers
@pytest.mark.parametrize("processor", ["ViTImageProcessor", None])
def test_a_transformers_vit_folder_is_preprocessed_as_transformers_does(tmp_path, photos, processor):
    """A ViT folder, with its processor's settings or (without them) ViTImageProcessor's defaults: the
    artifact's preprocessing gives the pixels transformers' processor gives, squashed, not cropped."""
    folder = _hf_vit_folder(tmp_path, processor)
    config = load_model(folder).config
    pre = config.preprocessing.at(config.image_size)
    assert pre.resize_mode == "squash"
    reference = transformers.ViTImageProcessorPil()(images=photos, return_tensors="np")["pixel_values"]
    ours = np.stack([preprocess(photo, pre) for photo in photos])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    # what keeping the aspect would have given: far off on the 3:2 photos
    cropped = np.stack([preprocess(photo, Preprocessing(**{**pre.__dict__, "resize_mode": "shortest"}))
                        for photo in photos])
    assert np.abs(cropped - reference).max() > 0.5


def test_timm_pretrained_cfg_crop_mode(tmp_path, tiny_model):
    weights = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    for crop_mode, expected, noted in (("squash", "squash", False), ("center", "shortest", False),
                                       (None, "shortest", False), ("border", "shortest", True)):
        folder = tmp_path / f"hub_{crop_mode}"
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"))
        pretrained = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bicubic"}
        if crop_mode is not None:
            pretrained["crop_mode"] = crop_mode
        (folder / "config.json").write_text(json.dumps({
            "architecture": "vit_test_patch8_32", "num_classes": 10, "model_args": {"num_heads": 4},
            "pretrained_cfg": pretrained}))
        checkpoint = read_checkpoint(folder)
        assert checkpoint.config.preprocessing.resize_mode == expected, crop_mode
        assert any("crop_mode 'border'" in note for note in checkpoint.notes) == noted


def test_registry_resizes_as_timm_evaluates_its_default_weights():
    """Each registered name whose normalisation is that of timm's default weights for it resizes as timm's
    pretrained_cfg says (``crop_mode``). Where the normalisation differs, the name stands for other weights
    (the CLIP image towers before fine-tuning) and is left out."""
    from vitdeploy.timm_import import import_timm
    from vitdeploy.variants import VARIANTS

    timm = import_timm()
    if timm is None:  # pragma: no cover - CI installs timm
        pytest.skip("timm is not installed")
    from timm.models import get_pretrained_cfg

    compared, wrong = 0, []
    for name, config in VARIANTS.items():
        pretrained = get_pretrained_cfg(name) if timm.is_model(name) else None
        if pretrained is None or tuple(pretrained.mean) != config.preprocessing.mean:
            continue
        compared += 1
        expected = {"squash": "squash"}.get(pretrained.crop_mode or "center", "shortest")
        if config.preprocessing.resize_mode != expected:
            wrong.append(f"{name}: {config.preprocessing.resize_mode} where timm's {pretrained.tag} has "
                         f"crop_mode {pretrained.crop_mode!r}")
    assert compared > 100
    assert not wrong, wrong


def test_registry_preprocessing_is_that_of_some_weights_timm_has():
    """Every registered name timm has weights for normalises, crops and resizes as one of those weights'
    pretrained_cfg says (a bare file named by timm's convention takes the registry's preprocessing)."""
    from vitdeploy.timm_import import import_timm
    from vitdeploy.variants import VARIANTS

    timm = import_timm()
    if timm is None:  # pragma: no cover - CI installs timm
        pytest.skip("timm is not installed")
    from timm.models import get_pretrained_cfg

    def recipe(mean, std, crop_pct, interpolation, resize_mode) -> tuple:
        return (tuple(round(v, 6) for v in mean), tuple(round(v, 6) for v in std), float(crop_pct), interpolation,
                resize_mode)

    compared, unmatched = 0, []
    for name, config in VARIANTS.items():
        tags = timm.list_pretrained(f"{name}.*") if timm.is_model(name) else []
        if not tags:
            continue
        compared += 1
        theirs = {}
        for tag in tags:
            cfg = get_pretrained_cfg(tag)
            theirs[tag] = recipe(cfg.mean, cfg.std, cfg.crop_pct, cfg.interpolation,
                                 "squash" if cfg.crop_mode == "squash" else "shortest")
        pre = config.preprocessing
        ours = recipe(pre.mean, pre.std, pre.crop_pct, pre.interpolation, pre.resize_mode)
        if ours not in theirs.values():
            unmatched.append(f"{name}: {ours} is none of {theirs}")
    assert compared > 100
    assert not unmatched, unmatched


def test_resize_mode_is_checked_and_older_metadata_resizes_the_short_side():
    with pytest.raises(ValueError, match="resize_mode 'letterbox' is not one of shortest, squash"):
        Preprocessing(resize_mode="letterbox")
    with pytest.raises(ValueError, match="resize_mode 'border'"):
        InputPreprocessing(resize_mode="border")
    written = ArtifactMetadata(model_config={"patch_size": 16}, preprocessing=Preprocessing(resize_mode="squash"),
                               inputs=[], outputs=[], shape_range=ShapeRange())
    props = written.to_props()
    assert ArtifactMetadata.from_props(props).preprocessing.resize_mode == "squash"
    older = json.loads(props["vitdeploy.preprocessing"])
    del older["resize_mode"]
    props["vitdeploy.preprocessing"] = json.dumps(older)
    assert ArtifactMetadata.from_props(props).preprocessing.resize_mode == "shortest"


LABELS = {str(i): name for i, name in enumerate(["cat", "dog", "fox", "owl", "elk"])}
EXPORT_FAST = ["--resolution", "224", "--batch", "1:4", "--no-cpu-variant", "--validation-max-batch", "4"]


def _hf_classifier(folder: Path, processor: Any) -> Any:
    """A small transformers ViT classifier at 224 (patch 32), weights perturbed so the logits spread, saved
    with ``processor``'s settings."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=224, patch_size=32, id2label=LABELS,
                                    label2id={v: int(k) for k, v in LABELS.items()})
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # transformers' init leaves the logits near zero: make every tensor matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


@needs_transformers
def test_predict_on_an_exported_transformers_folder_gives_transformers_own_probabilities(tmp_path, photos):
    """The whole chain a user runs: a transformers classifier folder exported (its preprocessing checked
    against the folder's own processor), then ``predict`` on the 3:2 photos (preprocessing from the
    artifact's metadata, onnxruntime), against transformers' processor and model on the same files."""
    from vitdeploy.cli import main

    processor = transformers.ViTImageProcessorPil(resample=3)
    model = _hf_classifier(tmp_path / "hf", processor)
    onnx, record = tmp_path / "vit.onnx", tmp_path / "export.json"
    assert main(["export", str(tmp_path / "hf"), "-o", str(onnx), "--json", str(record), *EXPORT_FAST]) == 0
    checked = json.loads(record.read_text())["source_check"]["preprocessing"]
    assert checked["passed"] is True and checked["processor"] == "ViTImageProcessorPil"
    assert checked["photos"] == len(bundled_images()) and checked["max_abs"] < 1e-6
    report = tmp_path / "predict.json"
    images = [str(path) for path in bundled_images()]
    assert main(["predict", str(onnx), *images, "--top-k", "5", "--json", str(report)]) == 0
    with torch.no_grad():
        logits = model(**processor(images=photos, return_tensors="pt")).logits.double()
    expected = torch.softmax(logits, dim=1).numpy()
    for row, prediction in enumerate(json.loads(report.read_text())["predictions"]):
        order = [entry["index"] for entry in prediction["top_k"]]
        assert [entry["label"] for entry in prediction["top_k"]] == [LABELS[str(i)] for i in order]
        np.testing.assert_allclose([entry["probability"] for entry in prediction["top_k"]], expected[row, order],
                                   rtol=0, atol=1e-5, err_msg=images[row])


@needs_transformers
def test_an_export_whose_preprocessing_the_source_processor_contradicts_is_refused(tmp_path, capsys):
    """A processor that resizes to 224x320 (which vitdeploy does not reproduce): the graph agrees with
    transformers, the pixels it would be given do not, so the artifact is not handed over."""
    from vitdeploy.cli import main

    _hf_classifier(tmp_path / "hf", transformers.ViTImageProcessorPil(size={"height": 224, "width": 320}))
    onnx = tmp_path / "vit.onnx"
    assert main(["export", str(tmp_path / "hf"), "-o", str(onnx), *EXPORT_FAST]) == 1
    out = capsys.readouterr().out
    assert not onnx.exists()
    assert ("preprocessing differs from ViTImageProcessorPil's on 4 real photos: it gives [4, 3, 224, 320] "
            "pixel_values, vitdeploy [4, 3, 224, 224]") in out
    assert "the artifact disagrees with transformers" in out and "--no-source-check" in out


@needs_transformers
def test_the_preprocessing_check_measures_a_crop_where_the_source_squashes(tmp_path):
    from vitdeploy.exporters.source_check import SourceProcessor, check_preprocessing, transformers_processor

    transformers.ViTImageProcessorPil().save_pretrained(tmp_path)
    processor = transformers_processor(tmp_path)
    assert processor.name == "ViTImageProcessorPil"
    squash = InputPreprocessing(**preprocessing(tmp_path)).at(224)
    assert check_preprocessing(processor, squash).passed is True
    cropped = check_preprocessing(processor, Preprocessing(**{**squash.__dict__, "resize_mode": "shortest"}))
    assert cropped.passed is False and cropped.mean_abs > 0.1
    assert "resize the short side to 224 (bilinear), centre-crop 224" in cropped.failure
    patches = SourceProcessor("NaFlex", lambda images: np.zeros((len(images), 256, 768), np.float32))
    assert check_preprocessing(patches, squash).passed is None
    assert "3-D pixel_values" in check_preprocessing(patches, squash).line()


@needs_transformers
def test_a_processor_that_feeds_another_size_than_the_native_one_is_compared_at_its_own(tmp_path):
    """transformers' DINOv2 folders: a 518-px position table, a processor that crops 224 from 256. The artifact
    keeps its native size; its resize and crop are compared at the processor's size, and the record says so
    (a shape check alone would refuse every such folder)."""
    from vitdeploy.exporters.source_check import check_preprocessing, transformers_processor

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, mlp_ratio=2, image_size=56, patch_size=14)
    transformers.Dinov2Model(config).save_pretrained(tmp_path)
    transformers.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                      resample=3).save_pretrained(tmp_path)
    read = load_model(tmp_path).config
    native = read.preprocessing.at(read.image_size)
    assert (native.resize_size, native.crop_size) == (64, 56)
    check = check_preprocessing(transformers_processor(tmp_path), native)
    assert check.passed is True and check.max_abs < 1e-6, check.line()
    assert "compared at the processor's 28x28; the artifact's preprocessing gives 56x56" in check.line()
    squashed = check_preprocessing(transformers_processor(tmp_path), Preprocessing(**{**native.__dict__,
                                                                                      "resize_mode": "squash"}))
    assert squashed.passed is False
