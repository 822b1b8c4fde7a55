"""Every family against timm's own model: DeiT (distilled too), DeiT III, DINOv2 (with registers),
CLIP towers (GELU and QuickGELU) and SigLIP (attention pool and mean pool).

Each case is a real timm model of that family at small sizes (width 64, two blocks, two heads,
``dynamic_img_size=True``), its weights perturbed away from their init and its position embeddings
a smooth grid (timm's 0.02-scale random init would hide a wrong resampling), saved as timm saves
weights and loaded by vitdeploy's timm loader, which must recognise the family from the keys.
Every output the family has is compared at the native size and at three others, two of them not
square: ``logits`` with timm's ``forward``, ``pooler_output`` with ``forward_head(pre_logits=True)``,
``last_hidden_state`` with ``forward_features`` and ``patch_tokens`` with its patch rows. Each
case also shows that the wrong resampling convention (and, for CLIP, the wrong activation) misses.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from test_resample_parity import realistic_pos_embed
from timm_without_torchvision import import_timm

from vitdeploy.checkpoints import CheckpointWarning, load_model
from vitdeploy.checkpoints.common import infer_config
from vitdeploy.checkpoints.timm import clip_head_as_projection
from vitdeploy.model import VisionTransformer
from vitdeploy.outputs import available_outputs

timm = import_timm()
pytestmark = pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")

TOLERANCE = 1e-4  # relative max error against timm's own output
SMALL = dict(embed_dim=64, depth=2, num_heads=2)


@dataclass(frozen=True)
class Family:
    """A timm model name, the kwargs that make it small, and what vitdeploy must read from its keys."""

    timm_name: str
    kwargs: dict[str, Any]
    expected: dict[str, Any]
    outputs: tuple[str, ...]
    load: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "deit": Family("deit_tiny_patch16_224", dict(img_size=64, num_classes=10),
                   dict(pooling="token", distilled=False), ("logits", "pooler_output", "last_hidden_state",
                                                             "patch_tokens")),
    "deit_distilled": Family("deit_tiny_distilled_patch16_224", dict(img_size=64, num_classes=10),
                             dict(distilled=True, num_prefix_tokens=2, family="deit"),
                             ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    "deit3": Family("deit3_small_patch16_224", dict(img_size=64, num_classes=10),
                    dict(no_embed_class=True, family="deit3"),
                    ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
    "dinov2": Family("vit_small_patch14_dinov2", dict(img_size=70),
                     dict(num_classes=0, no_embed_class=False, family="dinov2"),
                     ("pooler_output", "last_hidden_state", "patch_tokens")),
    "dinov2_reg4": Family("vit_small_patch14_reg4_dinov2", dict(img_size=70),
                          dict(num_reg_tokens=4, no_embed_class=True, num_prefix_tokens=5, family="dinov2"),
                          ("pooler_output", "last_hidden_state", "patch_tokens")),
    "clip": Family("vit_base_patch16_clip_224", dict(img_size=64, num_classes=32),
                   dict(pre_norm=True, patch_bias=False, projection_dim=32, num_classes=0, act="gelu",
                        layer_norm_eps=1e-5, family="clip"),
                   ("pooler_output", "image_embeds", "last_hidden_state", "patch_tokens")),
    "clip_quickgelu": Family("vit_base_patch16_clip_quickgelu_224", dict(img_size=64, num_classes=32),
                             dict(act="quick_gelu", projection_dim=32, family="clip"),
                             ("pooler_output", "image_embeds", "last_hidden_state", "patch_tokens"),
                             load=dict(hub_folder=True)),
    "siglip": Family("vit_base_patch16_siglip_224", dict(img_size=64),
                     dict(pooling="map", has_class_token=False, num_prefix_tokens=0, family="siglip"),
                     ("pooler_output", "last_hidden_state", "patch_tokens")),
    "siglip_gap": Family("vit_base_patch16_siglip_gap_224", dict(img_size=64, num_classes=10),
                         dict(pooling="avg", use_fc_norm=False, has_class_token=False),
                         ("logits", "pooler_output", "last_hidden_state", "patch_tokens")),
}


def sizes(native: int, patch: int) -> list[tuple[int, int]]:
    """The native size, one larger square and two non-square sizes (one taller, one wider)."""
    grid = native // patch
    return [(native, native), ((grid + 2) * patch,) * 2, ((grid - 1) * patch, (grid + 3) * patch),
            ((grid + 4) * patch, (grid - 2) * patch)]


def perturbed_timm_model(family: Family) -> torch.nn.Module:
    """The small timm model with every weight moved away from its init and a smooth position grid."""
    torch.manual_seed(0)
    model = timm.create_model(family.timm_name, pretrained=False, dynamic_img_size=True,
                              **{**SMALL, **family.kwargs}).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):  # LayerScale: from 1e-5 to order one, so the blocks matter
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith(("cls_token", "reg_token", "dist_token", "latent")):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name != "pos_embed":
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        if "clip" in family.timm_name:
            model.head.bias.zero_()  # timm's CLIP projection: a head without bias
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.copy_(realistic_pos_embed(prefix, model.patch_embed.grid_size[0], model.embed_dim))
    return model


def save_timm(model: torch.nn.Module, family: Family, folder: Path) -> Path:
    """The weights as timm saves them: a bare safetensors file, or a timm Hub folder naming the architecture."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not family.load.get("hub_folder"):
        path = folder / f"{family.timm_name}.safetensors"
        save_file(tensors, str(path))
        return path
    path = folder / family.timm_name
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architecture": family.timm_name, "model_args": {**SMALL, **family.kwargs},
              "pretrained_cfg": {"mean": list(model.pretrained_cfg["mean"]), "std": list(model.pretrained_cfg["std"]),
                                 "crop_pct": 1.0, "interpolation": "bicubic"}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def timm_outputs(model: torch.nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """timm's own view of each output."""
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        head = model.forward_head(tokens)
    values = {"logits": head, "image_embeds": head, "pooler_output": pooled, "last_hidden_state": tokens,
              "patch_tokens": tokens[:, model.num_prefix_tokens:]}
    return {name: values[name] for name in names}


def rel_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return float((ours - reference).abs().max() / reference.abs().max())


def errors_against(ours, reference, family: Family, native: int, patch: int,
                   alone: bool = True) -> dict[tuple, float]:
    """Relative errors of every output (all asked at once, and each alone: the prefix-only last
    block of token pooling) at every size."""
    generator = torch.Generator().manual_seed(2)
    result = {}
    for size in sizes(native, patch):
        x = torch.randn(2, 3, *size, generator=generator)
        expected = timm_outputs(reference, x, family.outputs)
        with torch.no_grad():
            got = ours.forward_outputs(x, family.outputs)
            assert list(got) == list(family.outputs)
            for name in family.outputs:
                result[(size, name)] = rel_error(got[name], expected[name])
                if alone and name != "last_hidden_state":  # alone, it is the all-outputs computation
                    result[(size, name, "alone")] = rel_error(ours.forward_outputs(x, [name])[name], expected[name])
    return result


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded_family(request, tmp_path_factory):
    family = FAMILIES[request.param]
    reference = perturbed_timm_model(family)
    path = save_timm(reference, family, tmp_path_factory.mktemp(request.param))
    # heads leave no trace in the weights: a bare state dict needs them, a Hub folder's model_args has them
    heads = {} if family.load.get("hub_folder") else {"num_heads": SMALL["num_heads"]}
    if request.param == "clip":  # a bare CLIP state dict does not show its activation: said, not guessed silently
        with pytest.warns(CheckpointWarning, match="QuickGELU"):
            ours = load_model(path, **heads)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)
            ours = load_model(path, **heads)
    return request.param, family, reference, ours


def test_the_loader_recognises_the_family_from_its_keys(loaded_family):
    key, family, reference, ours = loaded_family
    config = ours.config
    for name, value in family.expected.items():
        assert getattr(config, name) == value, (key, name)
    assert config.num_prefix_tokens == reference.num_prefix_tokens
    assert set(available_outputs(config)) == set(family.outputs)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters()) - (
        config.projection_dim or 0)  # timm's CLIP head has a (zero) bias; vitdeploy's proj has none


def test_every_output_matches_timm_at_native_and_other_sizes(loaded_family):
    key, family, reference, ours = loaded_family
    native, patch = ours.config.image_size, ours.config.patch_size
    errors = errors_against(ours, reference, family, native, patch)
    assert max(errors.values()) <= TOLERANCE, (key, {k: v for k, v in errors.items() if v > TOLERANCE})


def test_the_wrong_convention_misses(loaded_family):
    key, family, reference, ours = loaded_family
    native, patch = ours.config.image_size, ours.config.patch_size
    saved = ours.config
    try:
        ours.config = saved.replace(pos_embed_resample="huggingface")
        errors = errors_against(ours, reference, family, native, patch, alone=False)
    finally:
        ours.config = saved
    token_outputs = [e for k, e in errors.items() if k[0] != (native, native) and k[1] == "patch_tokens"]
    assert min(token_outputs) > 10 * TOLERANCE, key
    assert max(e for k, e in errors.items() if k[0] == (native, native)) <= TOLERANCE  # no resampling there


def test_clip_activation_matters():
    """A QuickGELU CLIP tower read as GELU (what a bare state dict gives) misses timm."""
    family = FAMILIES["clip_quickgelu"]
    reference = perturbed_timm_model(family)
    state = clip_head_as_projection(dict(reference.state_dict()), [])
    with pytest.warns(CheckpointWarning, match="QuickGELU"):
        config, _ = infer_config(state, "test", num_heads=2)
    assert config.act == "gelu"
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = rel_error(ours.forward_outputs(x, ["image_embeds"])["image_embeds"], reference(x))
        ours_right = VisionTransformer(config.replace(act="quick_gelu")).eval()
        ours_right.load_state_dict(state)
        right = rel_error(ours_right.forward_outputs(x, ["image_embeds"])["image_embeds"], reference(x))
    assert right <= TOLERANCE < wrong


def test_loading_at_another_image_size_resamples_like_timm(loaded_family, tmp_path):
    """``image_size=`` resamples the stored grid for good (only the embedded prefix tokens kept aside)."""
    key, family, reference, ours = loaded_family
    patch = ours.config.patch_size
    size = ours.config.image_size + 2 * patch
    path = save_timm(reference, family, tmp_path)
    heads = {} if family.load.get("hub_folder") else {"num_heads": SMALL["num_heads"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        resized = load_model(path, image_size=size, **heads)
    assert resized.config.image_size == size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    expected = timm_outputs(reference, x, family.outputs)
    with torch.no_grad():
        got = resized.forward_outputs(x, family.outputs)
    errors = {name: rel_error(got[name], expected[name]) for name in family.outputs}
    assert max(errors.values()) <= TOLERANCE, (key, errors)
