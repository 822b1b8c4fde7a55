"""Outlier channels injected into the CLIP and SigLIP towers keep their float function.

``inject_outlier_channels_eager`` must know where a LayerNorm's output is read by linear layers
alone: CLIP's final norm feeds its visual projection (``image_embeds``), SigLIP's final norm feeds
the attention pool's ``kv`` and the pool's own LayerNorm its MLP; CLIP's pre-norm feeds the
residual stream and must be left alone. Tiny towers (width 32, one block), every weight random.
"""

from __future__ import annotations

import pytest
import torch
from outliers import inject_outlier_channels_eager

import vitdeploy
from vitdeploy.outputs import available_outputs, default_outputs

SMALL = dict(hidden_size=32, depth=1, num_heads=2, mlp_size=64, image_size=32)
CHANNELS = (3, 17, 30)
FACTOR = 30.0


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vitdeploy.create_model(name, **{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def norm_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.LayerNorm)}


def injected(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The LayerNorms whose CHANNELS were multiplied by FACTOR (and no other channel touched)."""
    names = set()
    for name, weight in before.items():
        ratio = after[name] / weight
        if torch.allclose(ratio[list(CHANNELS)], torch.full((len(CHANNELS),), FACTOR)):
            others = [c for c in range(len(ratio)) if c not in CHANNELS]
            assert torch.allclose(ratio[others], torch.ones(len(others))), name
            names.add(name)
        else:
            assert torch.equal(after[name], weight), name
    return names


@pytest.mark.parametrize("name, expected", [
    ("vit_base_patch16_clip_224", {"blocks.0.norm1", "blocks.0.norm2", "norm"}),
    ("vit_base_patch16_siglip_224", {"blocks.0.norm1", "blocks.0.norm2", "norm", "attn_pool.norm"}),
])
def test_injection_keeps_the_default_output_and_reaches_the_head_norms(name, expected):
    model = tiny(name)
    (output,) = default_outputs(model.config)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.forward_outputs(x, [output])[output]
    before = norm_scales(model)
    inject_outlier_channels_eager(model, CHANNELS, FACTOR)
    assert injected(before, norm_scales(model)) == expected  # CLIP's norm_pre is not among them
    with torch.no_grad():
        got = model.forward_outputs(x, [output])[output]
    assert float((got - reference).abs().max() / reference.abs().max()) < 1e-5


@pytest.mark.parametrize("name, outputs, final_norm", [
    ("vit_base_patch16_clip_224", ("pooler_output",), False),  # the norm's own output is the result
    ("vit_base_patch16_siglip_224", ("pooler_output", "patch_tokens"), False),  # tokens read the final norm
    ("vit_base_patch16_siglip_224", ("pooler_output",), True),
    ("deit_small_distilled_patch16_224", ("logits",), True),  # both heads divided
])
def test_every_asked_output_is_kept(name, outputs, final_norm):
    model = tiny(name, **({"num_classes": 5} if "deit" in name else {}))
    assert set(outputs) <= set(available_outputs(model.config))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.forward_outputs(x, outputs)
    before = norm_scales(model)
    inject_outlier_channels_eager(model, CHANNELS, FACTOR, outputs)
    assert ("norm" in injected(before, norm_scales(model))) == final_norm
    with torch.no_grad():
        got = model.forward_outputs(x, outputs)
    for key in outputs:
        assert float((got[key] - reference[key]).abs().max() / reference[key].abs().max()) < 1e-5, key
