"""AIMv2 (Fini et al. 2024): a learned table, SwiGLU and RMSNorm, no class token, mean pooling.

Positions: the learned table, resampled as timm does. Every norm is an RMSNorm (weight only), the
patch embedding is followed by one, the SwiGLU MLP (split ``fc1_g``/``fc1_x`` in timm, packed by
:func:`~vitdeploy.families.base.from_timm_eva`) and the attention output projection have no biases,
q/k/v neither. Pooling: the mean of the tokens after the final norm.

Sources: timm ``aimv2_{large,huge,1b,3b}_patch14_{224,336,448}`` state dicts and Hub folders.
transformers' ``Aimv2VisionModel`` is not read yet.
"""

from __future__ import annotations

from vitdeploy.constants import CLIP_MEAN, CLIP_STD
from vitdeploy.families.base import Family, from_timm_eva, has_part, variant

_COMMON = dict(family="aimv2", num_classes=0, class_token=False, pooling="avg", fc_norm=False, qkv_bias=False,
               proj_bias=False, mlp_type="swiglu", norm="rmsnorm", patch_norm=True, layer_norm_eps=1e-5,
               mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0)
# (size, hidden, heads, mlp); every size has 24 blocks
_SIZES = (("large", 1024, 8, 2816), ("huge", 1536, 12, 4096), ("1b", 2048, 16, 5632), ("3b", 3072, 24, 8192))

VARIANTS = {
    f"aimv2_{size}_patch14_{image}": variant(f"aimv2_{size}_patch14_{image}", image, 14, hidden, 24, heads, mlp,
                                             **_COMMON)
    for size, hidden, heads, mlp in _SIZES for image in (224, 336, 448)
}

def fits_bare(names: frozenset[str]) -> bool:
    """A norm after the patch embedding, no class token and a split SwiGLU: only AIMv2's."""
    return ("patch_embed.norm.weight" in names and "cls_token" not in names and "pos_embed" in names
            and has_part(names, ".mlp.fc1_g."))


FAMILY = Family("aimv2", "AIMv2", VARIANTS, key_maps={"timm": from_timm_eva}, defaults=dict(_COMMON),
                fits_bare=fits_bare)
