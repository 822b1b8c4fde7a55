"""Hugging Face transformers and original JAX ViT checkpoints.

The writers (here, and ``jax_archives.py`` for JAX) build each foreign layout from the formats' own
conventions, going the
opposite way from vitdeploy's readers (our tensors → their names and shapes), so a reader that
gets a transpose or a name wrong cannot be cancelled out by a writer sharing its code. The HF
tests also compare against transformers' own forward pass.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config, tiny_hybrid_config
from jax_archives import jax_arrays
from safetensors.torch import save_file

from vitdeploy.checkpoints import (
    CheckpointError,
    CheckpointWarning,
    detect_format,
    load_model,
    read_checkpoint,
    resolve_source,
)
from vitdeploy.config import HybridConfig
from vitdeploy.model import VisionTransformer


def hf_state_dict(model: VisionTransformer, prefix: str = "vit.") -> dict[str, torch.Tensor]:
    """``model``'s weights under transformers' on-disk ViT names (``vit.encoder.layer.N...``)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        f"{prefix}embeddings.cls_token": sd["cls_token"],
        f"{prefix}embeddings.position_embeddings": sd["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": sd["norm.weight"],
        f"{prefix}layernorm.bias": sd["norm.bias"],
    }
    if "head.weight" in sd:
        out["classifier.weight"] = sd["head.weight"]
        out["classifier.bias"] = sd["head.bias"]
    for i in range(model.config.depth):
        src, dst = f"blocks.{i}.", f"{prefix}encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"layernorm_before.{kind}"] = sd[src + f"norm1.{kind}"]
            out[dst + f"layernorm_after.{kind}"] = sd[src + f"norm2.{kind}"]
            out[dst + f"attention.output.dense.{kind}"] = sd[src + f"attn.proj.{kind}"]
            out[dst + f"intermediate.dense.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"output.dense.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
            if src + f"attn.qkv.{kind}" in sd:
                q, k, v = sd[src + f"attn.qkv.{kind}"].chunk(3, dim=0)
                for name, part in (("query", q), ("key", k), ("value", v)):
                    out[dst + f"attention.attention.{name}.{kind}"] = part.clone()
    return out



def _images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def _assert_equal_logits(source: VisionTransformer, loaded: VisionTransformer, scales=(1, 2)) -> None:
    with torch.no_grad():
        for scale in scales:
            x = _images(source.config.image_size * scale)
            assert torch.equal(source(x), loaded(x)), f"logits differ at {scale}x the native size"


# --------------------------------------------------------------------------- Hugging Face

try:
    import transformers
except ImportError:  # a dev dependency; the JAX tests below do not need it
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

HF_LABELS = {str(i): name for i, name in enumerate(["cat", "dog", "fox", "owl", "elk"])}


def _hf_model(tmp_path: Path, image_size: int = 32, **config):
    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=image_size,
        patch_size=8, id2label=HF_LABELS, label2id={v: int(k) for k, v in HF_LABELS.items()}, **config,
    )
    model = transformers.ViTForImageClassification(hf_config).eval()
    with torch.no_grad():  # HF initialises LayerNorms to 1/0 and biases to 0: make every tensor matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


@needs_transformers
def test_hf_folder_matches_transformers_forward(tmp_path):
    hf, folder = _hf_model(tmp_path)
    transformers.ViTImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                   resample=3).save_pretrained(folder)
    assert detect_format(folder) == "huggingface"
    ours = load_model(folder)
    config = ours.config
    assert (config.hidden_size, config.depth, config.num_heads, config.mlp_size, config.num_classes) == (
        64, 2, 4, 128, 5)
    assert config.layer_norm_eps == 1e-12
    assert config.provenance.labels == ["cat", "dog", "fox", "owl", "elk"]
    assert config.preprocessing.mean == (0.485, 0.456, 0.406) and config.preprocessing.std == (0.229, 0.224, 0.225)
    assert config.preprocessing.interpolation == "bicubic"
    with torch.no_grad():
        x = _images(32)
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)
        # 2x: transformers' interpolate_pos_encoding resamples bicubically like we do
        x = _images(64)
        expected = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)


@needs_transformers
def test_hf_config_at_another_size_resamples(tmp_path):
    hf, folder = _hf_model(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["image_size"] = 64
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.warns(CheckpointWarning, match="resampled position embeddings 4x4 → 8x8"):
        ours = load_model(folder)
    assert ours.config.image_size == 64
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x, interpolate_pos_encoding=True).logits,
                                   rtol=0, atol=1e-5)


@needs_transformers
def test_hf_bare_vit_model_ignores_pooler(tmp_path):
    torch.manual_seed(1)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, qkv_bias=False)
    hf = transformers.ViTModel(config).eval()
    hf.save_pretrained(tmp_path / "bare")
    resolved = resolve_source(str(tmp_path / "bare"))
    ours = resolved.model
    assert ours.config.num_classes == 0 and ours.config.qkv_bias is False
    assert any("pooler" in message for message in resolved.notes)
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), hf(pixel_values=x).last_hidden_state,
                                   rtol=0, atol=1e-5)


def _hf_config_json(model: VisionTransformer, **extra) -> dict:
    config = model.config
    return {"model_type": "vit", "hidden_size": config.hidden_size, "num_hidden_layers": config.depth,
            "num_attention_heads": config.num_heads, "intermediate_size": config.mlp_size,
            "image_size": config.image_size, "patch_size": config.patch_size, "num_channels": 3,
            "qkv_bias": config.qkv_bias, "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu",
            "architectures": ["ViTForImageClassification"], **extra}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_legacy_keys_load_exactly(tmp_path, tiny_model, weights):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config_json(tiny_model)))
    tensors = hf_state_dict(tiny_model)
    if weights.endswith(".safetensors"):
        save_file(tensors, str(folder / weights))
    else:
        torch.save(tensors, folder / weights)
    loaded = load_model(folder)
    assert loaded.config.pos_embed_resample == "huggingface"  # a Hugging Face folder resamples like transformers
    tiny_model.config = tiny_model.config.replace(pos_embed_resample="huggingface")
    _assert_equal_logits(tiny_model, loaded)


@needs_transformers
def test_hf_folder_with_tanh_gelu_matches_transformers(tmp_path):
    """hidden_act gelu_new (GELU's tanh approximation) is read as such, not refused nor taken as exact GELU."""
    hf, folder = _hf_model(tmp_path, hidden_act="gelu_new")
    ours = load_model(folder)
    assert ours.config.act == "gelu_tanh"
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)
        exact = VisionTransformer(ours.config.replace(act="gelu")).eval()
        exact.load_state_dict(ours.state_dict())
        assert (exact(x) - hf(pixel_values=x).logits).abs().max() > 1e-4  # the approximation matters here


@needs_transformers
@pytest.mark.parametrize("head", [False, True])
def test_hf_ijepa_folder_matches_transformers_at_native_and_non_square_sizes(tmp_path, head):
    """I-JEPA's encoder: ViT layers, no class token, a position table without prefix rows; its classifier
    reads the mean of the normed tokens. Equal to transformers per token, and by logits, at 32x32 and 48x16."""
    torch.manual_seed(0)
    config = transformers.IJepaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, image_size=32, patch_size=8, num_labels=5)
    hf = (transformers.IJepaForImageClassification if head else transformers.IJepaModel)(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(tmp_path / "ijepa")
    ours = load_model(tmp_path / "ijepa")
    assert (ours.config.provenance.family, ours.config.has_class_token, ours.config.pooling) == ("ijepa", False, "avg")
    assert ours.config.num_classes == (5 if head else 0)
    backbone = hf.ijepa if head else hf
    for size in ((32, 32), (48, 16)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            got = ours.forward_outputs(x, ["last_hidden_state", *(["logits"] if head else [])])
            tokens = backbone(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
            per_token = torch.nn.functional.cosine_similarity(got["last_hidden_state"], tokens, dim=-1)
            assert float(per_token.min()) > 1 - 1e-6 and torch.allclose(got["last_hidden_state"], tokens, atol=1e-5)
            if head:
                torch.testing.assert_close(got["logits"], hf(pixel_values=x, interpolate_pos_encoding=True).logits,
                                           rtol=0, atol=1e-5)


@needs_transformers
@pytest.mark.parametrize("cls", ["ViTMSNModel", "ViTMSNForImageClassification", "ViTMAEModel", "ViTMAEForPreTraining"])
def test_hf_msn_and_mae_folders_match_transformers_per_token(tmp_path, cls):
    """ViT-MSN and ViT-MAE are the plain ViT encoder under their own model_type (MAE: a stored sin-cos table,
    masking and a decoder for pre-training only). Equal to transformers' own view (the source check's: MAE's
    encoder with every patch kept, in order) per token on real photos at 32x32 and 48x16."""
    from vitdeploy.exporters.source_check import hf_outputs
    from vitdeploy.parity import InputFactory

    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                 patch_size=8, num_labels=5)
    mae = cls.startswith("ViTMAE")
    config = (transformers.ViTMAEConfig(**small, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                        decoder_num_attention_heads=2, decoder_intermediate_size=64)
              if mae else transformers.ViTMSNConfig(**small))
    hf = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    hf.save_pretrained(tmp_path / cls)
    ours = load_model(tmp_path / cls)
    assert ours.config.pooling == "token" and ours.config.pos_embed_resample == "huggingface"
    assert ours.config.num_classes == (5 if cls.endswith("Classification") else 0)
    if cls == "ViTMAEForPreTraining":
        checkpoint = read_checkpoint(tmp_path / cls)
        assert any("decoder" in note for note in checkpoint.notes) and not checkpoint.unexpected
    for height, width in ((32, 32), (48, 16)):
        x = torch.from_numpy(InputFactory(ours.config.preprocessing.at(32), synthetic=False).batch(2, height, width)[0])
        theirs = hf_outputs(hf, x)
        assert "last_hidden_state" in theirs and ("logits" in theirs) == cls.endswith("Classification")
        with torch.no_grad():
            got = ours.forward_outputs(x, list(theirs))
        for name, value in theirs.items():
            error = float((got[name] - value).abs().max() / value.abs().max())
            cosine = float(torch.nn.functional.cosine_similarity(got[name], value, dim=-1).min())
            assert error < 1e-5 and cosine > 1 - 1e-6, (cls, name, height, width, error, cosine)


@needs_transformers
def test_hf_transformers5_in_memory_names(tmp_path):
    """transformers >= 5 names (layers.N.attention.q_proj, mlp.fc1) load like the on-disk ones."""
    hf, folder = _hf_model(tmp_path)
    renamed = tmp_path / "v5"
    renamed.mkdir()
    (renamed / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".q_proj." in key for key in state)  # the names this test is about
    save_file(state, str(renamed / "model.safetensors"))
    ours = load_model(renamed)
    x = _images(32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, rtol=0, atol=1e-5)


def test_hf_errors(tmp_path, tiny_model):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_hf_config_json(tiny_model, hidden_act="relu")))
    save_file(hf_state_dict(tiny_model), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported; expected one of gelu, "):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(_hf_config_json(tiny_model)))
    tensors = hf_state_dict(tiny_model)
    del tensors["vit.encoder.layer.1.attention.attention.key.weight"]
    tensors["vit.encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "blocks.1.attn.qkv.weight" in message  # missing, in our names
    assert "encoder.layer.0.attention.attention.extra.weight" in message  # unexpected, in theirs
    assert "encoder.layer.1.attention.attention.query.weight" in message  # orphaned partners
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        load_model(folder)


# --------------------------------------------------------------------------- JAX


JAX_CONFIGS = {"plain": tiny_config, "hybrid": tiny_hybrid_config,
               # AugReg's R+Ti/16: the ResNet stem alone, 4x4 patches on its stride-4 map here
               "stem-only hybrid": lambda: tiny_hybrid_config(hybrid=HybridConfig(layers=()), patch_size=4)}


@pytest.mark.parametrize("kind", sorted(JAX_CONFIGS))
def test_jax_npz_loads_exactly(tmp_path, kind):
    source = make_model(JAX_CONFIGS[kind](), seed=4)
    path = tmp_path / "vit.npz"
    np.savez(path, **jax_arrays(source))
    assert detect_format(path) == "jax"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # heads come from the kernel shapes: no guess
        loaded = load_model(path)
    assert loaded.config.num_heads == 4
    assert loaded.config.hybrid == source.config.hybrid
    _assert_equal_logits(source, loaded)


def test_jax_flax_prefix_avg_pooling_and_pre_logits(tmp_path):
    # the original JAX 'gap' classifier: the encoder norm on the tokens, then the mean (fc_norm=False)
    source = make_model(tiny_config(pooling="avg", fc_norm=False, representation_size=48, qkv_bias=False), seed=6)
    np.savez(tmp_path / "gap.npz", **{f"opt/target/{k}": v for k, v in jax_arrays(source).items()})
    loaded = load_model(tmp_path / "gap.npz")
    assert (loaded.config.pooling, loaded.config.representation_size, loaded.config.qkv_bias) == ("avg", 48, False)
    _assert_equal_logits(source, loaded)


def test_jax_strictness_and_no_pickles(tmp_path, tiny_model):
    arrays = jax_arrays(tiny_model)
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    arrays["Transformer/encoderblock_0/Extra_9/kernel"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "broken.npz")
    assert "blocks.1.mlp.fc2.bias" in str(info.value)
    assert "Transformer/encoderblock_0/Extra_9/kernel" in str(info.value)
    np.savez(tmp_path / "objects.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="objects.npz"):
        load_model(tmp_path / "objects.npz")


def test_jax_image_size_override(tmp_path, tiny_model):
    np.savez(tmp_path / "vit.npz", **jax_arrays(tiny_model))
    with pytest.warns(CheckpointWarning, match="resampled position embeddings 4x4 → 12x12"):
        loaded = load_model(tmp_path / "vit.npz", image_size=96, num_classes=3)
    assert loaded.config.image_size == 96 and loaded.config.num_classes == 3
    assert torch.count_nonzero(loaded.head.weight) == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(_images(96)), tiny_model.forward_features(_images(96)),
                                   rtol=0, atol=1e-6)
