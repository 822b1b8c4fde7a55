"""The config split: architecture fields, with the input preprocessing and the provenance as nested parts.

Files written before the split carry ``mean``, ``family``, ``labels`` ... flat beside the architecture;
they must load to the same config, and every reader of artifact metadata (the torch-free runtimes
included) must read them as before.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import make_model, run_without_torch
from onnx_artifacts import export_onnx, make_metadata
from safetensors.torch import save_file

from vitdeploy.checkpoints import load_model
from vitdeploy.checkpoints.native import FORMAT_TAG, META_CONFIG, META_FORMAT, META_VERSION
from vitdeploy.cli import main
from vitdeploy.config import InputPreprocessing, Provenance, ViTConfig
from vitdeploy.metadata import PREFIX, model_provenance, read_onnx_metadata
from vitdeploy.preprocessing import bundled_images, preprocess_batch
from vitdeploy.variants import get_config

# `vitdeploy.model_config` of `vitdeploy export` (before the split) of a 1-block DeiT-Ti-shaped checkpoint with
# three labels, copied verbatim from the file (the same JSON went into the safetensors metadata).
FLAT_CONFIG = json.loads(
    '{"abs_pos_embed": true, "act": "gelu", "attention_dropout": 0.0, "class_token": null, "crop_pct": 0.9, '
    '"depth": 1, "distilled": false, "drop_path": 0.0, "dropout": 0.0, "family": "deit", "fc_norm": null, '
    '"final_norm": true, "hidden_size": 48, "hybrid": null, "image_size": 32, "in_channels": 3, '
    '"interpolation": "bicubic", "labels": ["cat", "dog", "fox"], "layer_norm_eps": 1e-06, "layer_scale": null, '
    '"mean": [0.485, 0.456, 0.406], "mlp_norm": false, "mlp_size": 96, "mlp_type": "mlp", '
    '"name": "deit_tiny_patch16_224", "no_embed_class": false, "norm": "layernorm", "num_classes": 3, '
    '"num_heads": 3, "num_reg_tokens": 0, "patch_bias": true, "patch_norm": false, "patch_size": 16, '
    '"pool_heads": null, "pooling": "token", "pos_embed_resample": "timm", "pre_norm": false, "proj_bias": true, '
    '"projection_dim": null, "qkv_bias": true, "qv_bias": false, "representation_size": null, "rope": null, '
    '"rope_indexing": "ij", "rope_offset": 0.0, "rope_ref_grid": null, "rope_temperature": 10000.0, '
    '"std": [0.229, 0.224, 0.225]}'
)
LABELS = ["cat", "dog", "fox"]


def photos(config: ViTConfig) -> np.ndarray:
    """Two bundled photographs, preprocessed as the config says."""
    return preprocess_batch(bundled_images()[:2], config.preprocessing.at(config.image_size))


def _today() -> ViTConfig:
    """The config FLAT_CONFIG was written from, built with today's code."""
    return get_config("deit_tiny_patch16_224", depth=1, hidden_size=48, num_heads=3, mlp_size=96, num_classes=3,
                      image_size=32, labels=LABELS)


def test_a_flat_config_written_before_the_split_loads_to_the_same_config() -> None:
    config = ViTConfig.from_dict(FLAT_CONFIG)
    assert config == _today()
    assert config.preprocessing == InputPreprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.9, "bicubic")
    assert config.provenance == Provenance("deit", "deit_tiny_patch16_224", LABELS)
    # written back in the nested form, which reads back the same
    data = config.to_dict()
    assert data["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.9,
                                     "interpolation": "bicubic", "resize_mode": "shortest"}
    assert data["provenance"] == {"family": "deit", "name": "deit_tiny_patch16_224", "labels": LABELS}
    assert not {"mean", "std", "crop_pct", "interpolation", "family", "name", "labels"} & set(data)
    assert ViTConfig.from_json(config.to_json()) == config
    # the flat view holds the same values under the same names as the old file
    flat = config.to_fields()
    assert {k: flat[k] for k in FLAT_CONFIG if k not in ("mean", "std")} == {
        k: v for k, v in FLAT_CONFIG.items() if k not in ("mean", "std")}
    assert [list(flat["mean"]), list(flat["std"])] == [FLAT_CONFIG["mean"], FLAT_CONFIG["std"]]


def test_reading_a_config_refuses_mixed_or_unknown_fields_in_one_line() -> None:
    mixed = {**_today().to_dict(), "crop_pct": 1.0}
    with pytest.raises(ValueError, match=r"^ViTConfig fields \['crop_pct'\] given both flat and inside "
                                         r"'preprocessing'; expected one or the other$"):
        ViTConfig.from_dict(mixed)
    data = _today().to_dict()
    data["provenance"]["colour"] = "red"
    with pytest.raises(ValueError, match=r"^unknown provenance fields \['colour'\]; expected a subset of "
                                         r"\['family', 'labels', 'name'\]$"):
        ViTConfig.from_dict(data)
    with pytest.raises(ValueError, match=r"^unknown ViTConfig fields \['colour'\]"):
        ViTConfig.from_dict({**FLAT_CONFIG, "colour": "red"})


@pytest.mark.parametrize(("keyword", "part", "cls"), [
    ("mean", "preprocessing", "InputPreprocessing"), ("crop_pct", "preprocessing", "InputPreprocessing"),
    ("interpolation", "preprocessing", "InputPreprocessing"), ("family", "provenance", "Provenance"),
    ("name", "provenance", "Provenance"), ("labels", "provenance", "Provenance"),
])
def test_the_constructor_refuses_the_old_flat_keywords_naming_the_part(keyword, part, cls) -> None:
    with pytest.raises(TypeError) as error:
        ViTConfig(depth=2, **{keyword: None})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"ViTConfig takes no {keyword}=: it lives in ViTConfig.{part} ({cls}({keyword}=...))")


def test_reading_a_moved_field_says_where_it_went() -> None:
    with pytest.raises(AttributeError, match=r"^ViTConfig has no attribute 'crop_pct': it lives in "
                                             r"ViTConfig.preprocessing \(config.preprocessing.crop_pct\)$"):
        _ = _today().crop_pct
    with pytest.raises(AttributeError, match=r"^ViTConfig has no attribute 'family': it lives in ViTConfig.provenance"):
        _ = _today().family
    assert _today().provenance.family == "deit" and not hasattr(_today(), "colour")


def test_replace_and_from_fields_take_the_parts_fields_by_name() -> None:
    config = _today()
    wider = config.replace(crop_pct=1.0, name="mine", depth=2)
    assert (wider.preprocessing.crop_pct, wider.provenance.name, wider.depth) == (1.0, "mine", 2)
    assert (wider.preprocessing.mean, wider.provenance.family, wider.provenance.labels) == (
        config.preprocessing.mean, "deit", LABELS)
    assert config.preprocessing.crop_pct == 0.9  # the original is untouched
    assert config.replace(preprocessing=InputPreprocessing(crop_pct=0.5)).preprocessing.mean == (0.5, 0.5, 0.5)
    assert ViTConfig.from_fields(config.to_fields()) == config
    assert ViTConfig.field_names() == set(config.to_fields())
    with pytest.raises(ValueError, match=r"^family must be one of vit, .*, got 'resnet'$"):
        config.replace(family="resnet")
    with pytest.raises(ValueError, match=r"^unknown model overrides \['colour'\]; expected some of "):
        config.replace(colour="red")


def test_preprocessing_resolves_to_the_runtime_spec() -> None:
    pre = _today().preprocessing.at(32)
    assert (pre.resize_size, pre.crop_size, pre.mean, pre.interpolation) == (35, 32, (0.485, 0.456, 0.406), "bicubic")


def test_model_provenance_reads_either_form_without_torch_types() -> None:
    nested = _today().to_dict()
    expected = {"family": "deit", "name": "deit_tiny_patch16_224", "labels": LABELS}
    assert model_provenance(nested) == model_provenance(FLAT_CONFIG) == expected
    assert model_provenance({"depth": 1}) == {"family": None, "name": None, "labels": None}


def test_a_native_checkpoint_written_before_the_split_loads(tmp_path) -> None:
    model = make_model(ViTConfig.from_dict(FLAT_CONFIG))
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={META_FORMAT: FORMAT_TAG, META_VERSION: "0.1.0", META_CONFIG: json.dumps(FLAT_CONFIG)})
    loaded = load_model(path)
    assert loaded.config == _today()
    x = torch.from_numpy(photos(model.config))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def flat_artifact(tmp_path_factory):
    """A real ONNX file whose metadata carries the pre-split, flat model config (and no top-level labels)."""
    model = make_model(ViTConfig.from_dict(FLAT_CONFIG))
    path = tmp_path_factory.mktemp("flat") / "old.onnx"
    export_onnx(model, path, make_metadata(model.config))
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == PREFIX + "model_config":
            prop.value = json.dumps(FLAT_CONFIG)
    onnx.save(proto, str(path))
    return path, model


def test_readers_of_artifact_metadata_read_a_flat_model_config(flat_artifact, tmp_path, capsys) -> None:
    path, _ = flat_artifact
    metadata = read_onnx_metadata(path)
    assert metadata.labels is None and metadata.class_labels == LABELS
    assert metadata.model_provenance["name"] == "deit_tiny_patch16_224"
    assert main(["inspect", str(path), "--json", str(tmp_path / "report.json")]) == 0
    assert capsys.readouterr().out.startswith("deit_tiny_patch16_224  [ONNX artifact]")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["provenance"]["family"] == "deit"
    assert report["config"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_the_torch_free_runtime_reads_a_flat_model_config(flat_artifact, tmp_path) -> None:
    path, model = flat_artifact
    pixels = photos(model.config)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).numpy()
    np.save(tmp_path / "pixels.npy", pixels)
    script = f"""
        import numpy as np
        import vitdeploy.runtimes
        from vitdeploy.preprocessing import load_labels
        runtime = vitdeploy.runtimes.load({str(path)!r})
        assert load_labels(runtime.metadata) == {LABELS!r}
        np.save({str(tmp_path / "logits.npy")!r}, runtime(np.load({str(tmp_path / "pixels.npy")!r})))
        assert "torch" not in sys.modules
    """
    done = run_without_torch(script)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-4, rtol=1e-4)
