"""Native and timm checkpoints, format detection, strict loading, overrides and resolve_source."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model, tiny_config, tiny_hybrid_config
from safetensors.torch import save_file

from vitdeploy.checkpoints import (
    CheckpointError,
    CheckpointWarning,
    detect_format,
    file_sha256,
    load_model,
    resolve_source,
    save_model,
)
from vitdeploy.config import HybridConfig
from vitdeploy.model import create_model

CONFIGS = {"plain": tiny_config, "hybrid": tiny_hybrid_config}


_SOURCES: dict[str, object] = {}
_LOGITS: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}


@pytest.fixture(params=sorted(CONFIGS))
def source_model(request):
    """One model per architecture for the module (the hybrid's forward pass is the slow part)."""
    if request.param not in _SOURCES:
        _SOURCES[request.param] = make_model(CONFIGS[request.param](), seed=7)
    return _SOURCES[request.param]


def images(model, scale: int = 1, batch: int = 2) -> torch.Tensor:
    size = model.config.image_size * scale
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(11))


def reference_logits(model, scale: int) -> torch.Tensor:
    key = (id(model), scale)
    # The cache holds the model too: a freed model's id can be reused by a new one.
    if key not in _LOGITS or _LOGITS[key][0] is not model:
        with torch.no_grad():
            _LOGITS[key] = (model, model(images(model, scale)))
    return _LOGITS[key][1]


def assert_same_logits(expected_model, loaded, scales=(1, 2)) -> None:
    with torch.no_grad():
        for scale in scales:
            x = images(expected_model, scale)
            expected = reference_logits(expected_model, scale)
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6,
                                       msg=lambda m, s=scale: f"logits differ at {s}x the native size: {m}")


def state_dict_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- native


@pytest.mark.parametrize("single_file", [False, True], ids=["folder", "file"])
def test_native_round_trip(tmp_path, source_model, single_file):
    target = tmp_path / ("model.safetensors" if single_file else "ckpt")
    written = save_model(source_model, target)
    assert written == target
    assert detect_format(target) == "native"
    loaded = load_model(target)
    assert not loaded.training
    assert loaded.config == source_model.config
    assert_same_logits(source_model, loaded)
    leftovers = [p.name for p in target.parent.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_native_folder_layout(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "out")
    document = json.loads((tmp_path / "out" / "config.json").read_text())
    assert document["format"] == "vitdeploy"
    assert document["vitdeploy_version"]
    assert document["config"] == tiny_model.config.to_dict()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    # the folder's hash is the weight file's
    expected = hashlib.sha256((tmp_path / "out" / "model.safetensors").read_bytes()).hexdigest()
    assert file_sha256(tmp_path / "out") == expected


def test_native_config_at_another_size_resamples(tmp_path, tiny_model):
    """A checkpoint whose weights were trained at 32px but whose config says 64px is resampled on load."""
    save_model(tiny_model, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    document = json.loads(config_path.read_text())
    document["config"]["image_size"] = 64
    config_path.write_text(json.dumps(document))
    with pytest.warns(CheckpointWarning, match="resampled position embeddings 4x4 → 8x8"):
        loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.image_size == 64
    assert loaded.pos_embed.shape == (1, 1 + 64, 64)
    x = images(tiny_model, scale=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_model(x), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- timm


def test_timm_state_dict(tmp_path, source_model):
    path = tmp_path / "weights.pth"
    torch.save(state_dict_of(source_model), path)
    assert detect_format(path) == "timm"
    loaded = load_model(path, num_heads=4)
    assert loaded.config.hybrid == source_model.config.hybrid
    assert loaded.config.num_classes == 10
    assert_same_logits(source_model, loaded)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "state_dict_ema"])
def test_timm_pickle_wrappers_and_module_prefix(tmp_path, wrapper):
    model = make_model(tiny_config(), seed=8)
    tensors = {f"module.{k}": v for k, v in state_dict_of(model).items()}
    payload = tensors if wrapper is None else {wrapper: tensors, "epoch": 3}
    torch.save(payload, tmp_path / "weights.pth")
    loaded = load_model(tmp_path / "weights.pth", num_heads=4)
    assert_same_logits(model, loaded)


def test_an_ijepa_training_checkpoint_is_read_by_its_encoder(tmp_path):
    """I-JEPA's .pth.tar: the image encoder (no class token, mean pooled) under "encoder" with DataParallel's
    prefix, beside the predictor, the EMA target encoder and the optimizer; read as timm reads it."""
    from vitdeploy.checkpoints import resolve_source

    config = tiny_config(class_token=False, pooling="avg", fc_norm=False, num_classes=0)
    encoder, target = make_model(config, seed=8), make_model(config, seed=9)
    path = tmp_path / "IN1K-vit.t.16-300e.pth.tar"
    torch.save({"encoder": {f"module.{k}": v for k, v in state_dict_of(encoder).items()},
                "predictor": {"module.predictor_embed.weight": torch.zeros(2, 2)},
                "target_encoder": {f"module.{k}": v for k, v in state_dict_of(target).items()},
                "opt": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 300, "loss": 0.5}, path)
    assert detect_format(path) == "timm"
    resolved = resolve_source(str(path), num_heads=4)
    assert any("under the 'encoder' key (not opt, predictor, target_encoder)" in note for note in resolved.notes)
    loaded = resolved.model
    assert (loaded.config.has_class_token, loaded.config.pooling) == (False, "avg")
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)


def test_timm_prefers_ema_weights(tmp_path, tiny_model):
    other = make_model(tiny_config(), seed=99)
    torch.save({"state_dict": state_dict_of(other), "state_dict_ema": state_dict_of(tiny_model)}, tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt", num_heads=4)
    assert_same_logits(tiny_model, loaded, scales=(1,))


def test_timm_safetensors_and_inferred_architecture(tmp_path):
    config = tiny_hybrid_config(hybrid=HybridConfig(layers=(1, 2, 1)), num_classes=7, qkv_bias=False)
    model = make_model(config, seed=3)
    path = tmp_path / "hybrid.safetensors"
    save_file(state_dict_of(model), str(path))
    assert detect_format(path) == "timm"
    loaded = load_model(path, num_heads=4)
    assert loaded.config.hybrid.layers == (1, 2, 1)
    assert (loaded.config.num_classes, loaded.config.qkv_bias, loaded.config.image_size) == (7, False, 64)
    assert_same_logits(model, loaded, scales=(1,))


def test_timm_avg_pooling_and_pre_logits_inferred(tmp_path):
    model = make_model(tiny_config(pooling="avg", representation_size=48), seed=5)
    torch.save(state_dict_of(model), tmp_path / "m.bin")
    loaded = load_model(tmp_path / "m.bin", num_heads=4)
    assert loaded.config.pooling == "avg"
    assert loaded.config.representation_size == 48
    assert_same_logits(model, loaded)


def test_timm_heads_are_guessed_with_a_warning(tmp_path, tiny_model):
    torch.save(state_dict_of(tiny_model), tmp_path / "m.pth")
    with pytest.warns(CheckpointWarning, match="num_heads"):
        loaded = load_model(tmp_path / "m.pth")
    assert loaded.config.num_heads == 1  # 64 // 64: the guess, which the override above corrects


def test_timm_hub_folder(tmp_path, tiny_model):
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(state_dict_of(tiny_model), str(folder / "model.safetensors"))
    labels = [f"c{i}" for i in range(10)]
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_test_patch8_32.custom", "num_classes": 10, "model_args": {"num_heads": 4},
        "label_names": labels,
        "pretrained_cfg": {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2], "crop_pct": 0.95,
                           "interpolation": "bilinear"},
    }))
    assert detect_format(folder) == "timm"
    loaded = load_model(folder)
    config = loaded.config
    assert (config.num_heads, config.preprocessing.mean, config.preprocessing.crop_pct, config.preprocessing.interpolation) == (
        4, (0.4, 0.5, 0.6), 0.95, "bilinear")
    assert config.provenance.labels == labels
    assert_same_logits(tiny_model, loaded, scales=(1,))
    assert file_sha256(folder) == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_real_size_state_dict_names_the_variant(tmp_path):
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224")
    path = tmp_path / "tiny.safetensors"
    save_file(state_dict_of(model), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # heads come from the registry: no guess
        loaded = load_model(path)
    assert loaded.config.provenance.name == "vit_tiny_patch16_224"
    assert loaded.config.num_heads == 3
    assert loaded.config == model.config
    assert_same_logits(model, loaded, scales=(1,))


def test_pickles_load_weights_only(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": {"x": Payload()}}, handle, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- strictness


def test_strict_loading_lists_every_problem(tmp_path, tiny_model):
    tensors = state_dict_of(tiny_model)
    del tensors["blocks.1.norm1.bias"]
    tensors["blocks.0.attn.extra"] = torch.zeros(3)
    tensors["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(path, num_heads=4)
    message = str(info.value)
    assert str(path) in message
    for name in ("missing 1: blocks.1.norm1.bias", "unexpected 1: blocks.0.attn.extra",
                 "blocks.1.mlp.fc2.weight (checkpoint [64, 100], model [64, 128])"):
        assert name in message


def test_native_checkpoint_from_another_architecture_is_rejected(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"wrong shape .*blocks\.0\.mlp\.fc1\.weight"):
        load_model(tmp_path / "ckpt", mlp_size=256)


def test_inconsistent_timm_keys_and_hf_state_dicts_are_named(tmp_path, tiny_model):
    tensors = state_dict_of(tiny_model)
    tensors["fc_norm.weight"] = torch.ones(64)  # fc_norm (so mean pooling), yet a final norm and no fc_norm.bias
    save_file(tensors, str(tmp_path / "fc_norm.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1: fc_norm\.bias; unexpected 2: norm\.bias, norm\.weight"):
        load_model(tmp_path / "fc_norm.safetensors", num_heads=4)
    save_file({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(64, 3, 8, 8)},
              str(tmp_path / "hf.safetensors"))
    with pytest.raises(CheckpointError, match="Hugging Face"):
        load_model(tmp_path / "hf.safetensors")


# --------------------------------------------------------------------------- overrides


def test_image_size_override_resamples_pos_embed(tmp_path, source_model):
    torch.save(state_dict_of(source_model), tmp_path / "m.pth")
    native = source_model.config.image_size
    old = native // source_model.config.stride
    with pytest.warns(CheckpointWarning, match=f"resampled position embeddings {old}x{old} → {2 * old}x{2 * old}"):
        loaded = load_model(tmp_path / "m.pth", num_heads=4, image_size=2 * native)
    assert loaded.config.image_size == 2 * native
    assert loaded.grid_size == (2 * old, 2 * old)
    x = images(source_model, scale=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source_model(x), rtol=0, atol=1e-6)


def test_num_classes_override_gives_zero_head(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "c")
    loaded = load_model(tmp_path / "c", num_classes=5)
    assert loaded.config.num_classes == 5
    assert torch.count_nonzero(loaded.head.weight) == 0 and torch.count_nonzero(loaded.head.bias) == 0
    with torch.no_grad():
        logits = loaded(images(tiny_model))
    assert logits.shape == (2, 5) and torch.count_nonzero(logits) == 0
    same = load_model(tmp_path / "c", num_classes=10)  # same count: the trained head stays
    assert torch.equal(same.head.weight, tiny_model.head.weight)


def test_other_overrides_edit_the_config(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "c.safetensors")
    labels = [f"class {i}" for i in range(10)]
    loaded = load_model(tmp_path / "c.safetensors", mean=(0.1, 0.2, 0.3), labels=labels)
    assert loaded.config.preprocessing.mean == (0.1, 0.2, 0.3)
    assert loaded.config.provenance.labels == labels
    with pytest.raises(ValueError, match="unknown model overrides"):
        load_model(tmp_path / "c.safetensors", colour="red")


# --------------------------------------------------------------------------- detection & resolve_source


def test_detection_errors_name_the_path_and_formats(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*expected a vitdeploy folder.*JAX"):
        detect_format(text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "swin").mkdir()
    (tmp_path / "swin" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(CheckpointError, match="model_type 'swin'"):
        load_model(tmp_path / "swin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="variant name"):
        load_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown checkpoint format 'onnx'"):
        load_model(text, format="onnx")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(garbage)


def test_resolve_source_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    resolved = resolve_source(str(path))
    assert (resolved.format, resolved.random_weights, resolved.source) == ("native", False, str(path))
    assert resolved.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_logits(tiny_model, resolved.model, scales=(1,))


def test_resolve_source_variant_warns_and_is_reproducible():
    with pytest.warns(CheckpointWarning, match="RANDOM weights"):
        first = resolve_source("vit_tiny_patch16_224", depth=2, num_classes=3)
    with pytest.warns(CheckpointWarning):
        second = resolve_source("vit_tiny_patch16_224", depth=2, num_classes=3)
    assert first.random_weights and first.format == "variant"
    assert first.model.config.depth == 2 and first.model.config.num_classes == 3
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    assert torch.equal(first.model.pos_embed, second.model.pos_embed)
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint nor a model variant"):
        resolve_source("vit_nonexistent_patch3")
