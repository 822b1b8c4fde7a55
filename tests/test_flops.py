"""The analytic FLOP count equals torch's own FLOP counter on real models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, tiny_config, tiny_hybrid_config
from test_families_config import FAMILY_CONFIGS
from torch.utils.flop_counter import FlopCounterMode

from vitdeploy.flops import count_flops, count_macs, count_params
from vitdeploy.variants import VARIANTS, get_config


@pytest.mark.parametrize(("config", "size"), [
    (tiny_config(), (32, 48)),
    (tiny_config(representation_size=32, pooling="avg"), (40, 32)),
    (tiny_hybrid_config(), (64, 96)),
    (tiny_config(pos_embed_resample="huggingface"), (48, 24)),
    (tiny_config(), (32, 32)),  # the native grid: no resampling runs
    *[(config, (40, 24)) for config in FAMILY_CONFIGS.values()],  # both DeiT heads, CLIP's proj, the pool
    (FAMILY_CONFIGS["dinov2_reg"].replace(pos_embed_resample="dinov2"), (24, 48)),
])
def test_count_matches_torch_flop_counter(config, size) -> None:
    model = make_model(config)
    model.set_precision_policy(fused_attention=False)  # the counter does not see CPU SDPA kernels
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *size))
    assert count_flops(config, *size) == counter.get_total_flops()


@pytest.mark.parametrize(("config", "size"), [(tiny_config(), (32, 48)), (tiny_hybrid_config(), (64, 96)),
                                              (FAMILY_CONFIGS["deit_distilled"], (40, 24)),
                                              (FAMILY_CONFIGS["clip"], (24, 32))])
def test_class_token_last_block_count_matches_torch_flop_counter(config, size) -> None:
    model = make_model(config)
    model.set_precision_policy(fused_attention=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *size), class_token_last_block=True)
    pruned = count_flops(config, *size, class_token_last_block=True)
    assert pruned == counter.get_total_flops() and pruned < count_flops(config, *size)
    with pytest.raises(ValueError, match="needs pooling 'token'"):
        count_flops(tiny_config(pooling="avg"), class_token_last_block=True)


@pytest.mark.parametrize(("name", "timm_gmacs"), [
    ("vit_base_patch16_224", 17.6), ("vit_large_patch16_224", 61.6), ("vit_huge_patch14_224", 167.4),
    ("vit_base_patch16_384", 55.5), ("vit_base_r50_s16_384", 67.4)])
def test_variants_match_published_gmacs(name: str, timm_gmacs: float) -> None:
    # timm's model cards round to 0.1 GMACs (and also count norms); we agree within 1%.
    assert count_macs(get_config(name)) / 1e9 == pytest.approx(timm_gmacs, rel=0.01)


def test_bad_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a multiple of the patch stride 16"):
        count_flops(get_config("vit_base_patch16_224"), 200)


@pytest.mark.parametrize("config", [
    *VARIANTS.values(),
    tiny_config(representation_size=32, pooling="avg", qkv_bias=False),
    tiny_config(num_classes=0),
    tiny_hybrid_config(),
], ids=lambda c: c.provenance.name)
def test_parameter_count_without_torch_equals_the_model(config) -> None:
    """``inspect`` counts parameters from the config alone (no torch in the runtime install)."""
    from vitdeploy.model import VisionTransformer

    with torch.device("meta"):  # exact structure, no memory
        model = VisionTransformer(config)
    assert count_params(config) == sum(p.numel() for p in model.parameters())
