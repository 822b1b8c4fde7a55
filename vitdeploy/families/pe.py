"""Perception Encoder core (Bolya et al. 2025): a learned table AND 2-D RoPE, attention-pool head.

Positions: the table (resampled as timm does) plus RoPE on the patch tokens in timm's
``RotaryEmbeddingCat`` form (:mod:`vitdeploy.rope` ``"eva"``) with PE's parameters: coordinates
offset by 1, column coordinate first (``"xy"``), rescaled to the native grid. A CLIP-like tower
(``norm_pre``, no patch bias) whose attention pool (8 heads) reads every token, class token
included, then the projection into the joint space (timm's zero-bias ``head``, read as ``proj``).

A PE state dict holds no RoPE tensor: bare, it looks like a ViT without RoPE, so a bare one is
refused unless ``model=`` names the variant; a timm Hub folder names it.

Sources: timm ``vit_pe_core_{tiny,small}_patch16_384``, ``vit_pe_core_base_patch16_224``,
``vit_pe_core_large_patch14_336`` state dicts (with ``model=``) and Hub folders; the same for PE
spatial (``vit_pe_spatial_{tiny,small,base}_patch16_512``, ``_large_patch14_448``: no attention pool,
no final norm, the mean patch token; the gigantic sizes are not registered).
"""

from __future__ import annotations

from vitdeploy.families.base import Family, from_timm_eva, variant

_COMMON = dict(family="pe", num_classes=0, pooling="map", pool_heads=8, pre_norm=True, patch_bias=False,
               class_token=True, rope="eva", rope_offset=1.0, rope_indexing="xy", layer_norm_eps=1e-5, crop_pct=1.0)
# (name, image, patch, hidden, depth, heads, projection)
_SIZES = (("vit_pe_core_tiny_patch16_384", 384, 16, 192, 12, 3, 512),
          ("vit_pe_core_small_patch16_384", 384, 16, 384, 12, 6, 512),
          ("vit_pe_core_base_patch16_224", 224, 16, 768, 12, 12, 1024),
          ("vit_pe_core_large_patch14_336", 336, 14, 1024, 24, 16, 1024))

VARIANTS = {
    name: variant(name, image, patch, hidden, depth, heads, 4 * hidden, projection_dim=projection,
                  rope_ref_grid=(image // patch, image // patch), **_COMMON)
    for name, image, patch, hidden, depth, heads, projection in _SIZES
}

def fits_bare(names: frozenset[str]) -> bool:
    """A CLIP-like tower (class token, norm_pre, no patch bias) with an attention pool."""
    return ({"cls_token", "pos_embed", "norm_pre.weight", "attn_pool.latent"} <= names
            and "patch_embed.proj.bias" not in names)


# PE spatial: the same tower without the attention pool or any final norm; mean of the patch tokens.
_SPATIAL = {**_COMMON, "family": "pe_spatial", "pooling": "avg", "pool_heads": None, "projection_dim": None,
            "final_norm": False, "crop_pct": 1.0}
SPATIAL_VARIANTS = {
    name: variant(name, image, patch, hidden, depth, heads, 4 * hidden, rope_ref_grid=(32, 32), **_SPATIAL)
    for name, image, patch, hidden, depth, heads in (
        ("vit_pe_spatial_tiny_patch16_512", 512, 16, 192, 12, 3), ("vit_pe_spatial_small_patch16_512", 512, 16, 384, 12, 6),
        ("vit_pe_spatial_base_patch16_512", 512, 16, 768, 12, 12),
        ("vit_pe_spatial_large_patch14_448", 448, 14, 1024, 24, 16))
}


def fits_bare_spatial(names: frozenset[str]) -> bool:
    """A CLIP-like tower (class token, norm_pre, no patch bias) with no final norm."""
    return ({"cls_token", "pos_embed", "norm_pre.weight"} <= names and "patch_embed.proj.bias" not in names
            and not {"norm.weight", "fc_norm.weight", "attn_pool.latent"} & names)


FAMILY = Family("pe", "Perception Encoder", VARIANTS, key_maps={"timm": from_timm_eva}, defaults=dict(_COMMON),
                fits_bare=fits_bare, lookalike="a ViT without RoPE (class token, norm_pre, attention pool)")
SPATIAL = Family("pe_spatial", "Perception Encoder spatial", SPATIAL_VARIANTS, key_maps={"timm": from_timm_eva},
                 defaults={k: v for k, v in _SPATIAL.items() if k != "projection_dim"}, fits_bare=fits_bare_spatial,
                 lookalike="a ViT without RoPE or final norm")
