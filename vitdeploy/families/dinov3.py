"""DINOv3 (Siméoni et al. 2025): 2-D RoPE only, class + 4 storage tokens, LayerScale.

Positions: RoPE on the patch tokens only (never the class or storage tokens), patch-centre
coordinates normalised to [-1, 1] per axis and recomputed for every H x W, periods
``100 ** (2j / (d/2))``, the rotate-half layout (:mod:`vitdeploy.rope` form ``"dinov3"``); no
learned table. S, B, L use a GELU MLP, S+ and H+ a SwiGLU; the ``_qkvb`` variants carry q and v
biases (k has none). Pooling as timm's default: the mean of the patch tokens after the final norm
(``pooling="token"`` gives the class token, what the original's ``x_norm_clstoken`` is).

Sources: timm ``vit_*_patch16_dinov3*`` state dicts and Hub folders (its ``Eva`` names,
:func:`~vitdeploy.families.base.from_timm_eva`), and the original facebookresearch/dinov3 hub
state dict (:func:`from_original`: ``storage_tokens``, ``qkv.bias`` with k masked to zero,
``mlp.w1/w2/w3`` for SwiGLU, a ``rope_embed.periods`` buffer that is recomputed, not read).
"""

from __future__ import annotations

from vitdeploy.families.base import Family, StateDict, from_timm_eva, variant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_COMMON = dict(family="dinov3", num_classes=0, qkv_bias=False, layer_scale=1e-5, rope="dinov3",
               rope_temperature=100.0, abs_pos_embed=False, num_reg_tokens=4, class_token=True, pooling="avg",
               fc_norm=False, layer_norm_eps=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)
# (name, hidden, depth, heads, mlp, mlp_type)
_SIZES = (
    ("vit_small_patch16_dinov3", 384, 12, 6, 1536, "mlp"),
    ("vit_small_plus_patch16_dinov3", 384, 12, 6, 1536, "swiglu"),
    ("vit_base_patch16_dinov3", 768, 12, 12, 3072, "mlp"),
    ("vit_large_patch16_dinov3", 1024, 24, 16, 4096, "mlp"),
    ("vit_huge_plus_patch16_dinov3", 1280, 32, 20, 5120, "swiglu"),
)

VARIANTS = {}
for _name, _hidden, _depth, _heads, _mlp, _type in _SIZES:
    for _suffix, _qv in (("", False), ("_qkvb", True)):
        VARIANTS[_name + _suffix] = variant(_name + _suffix, 256, 16, _hidden, _depth, _heads, _mlp, mlp_type=_type,
                                            qv_bias=_qv, **_COMMON)


def from_original(state_dict: StateDict) -> StateDict:
    """facebookresearch/dinov3 names → vitdeploy's: storage tokens are registers, the masked k bias is
    dropped (q and v biases kept), SwiGLU ``w1``/``w2`` (gate, value) pack into ``fc1``, ``w3`` is
    ``fc2``; the pre-training mask token, the recomputed RoPE periods and the k-bias masks are dropped."""
    import torch

    out: StateDict = {}
    for key, value in state_dict.items():
        if key in ("mask_token",) or key.endswith((".periods", ".bias_mask")) or key.startswith("local_cls_norm"):
            continue
        key = key.replace("storage_tokens", "reg_token")
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3, dim=-1)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        out[key.replace("mlp.w3.", "mlp.fc2.")] = value
    for key in [k for k in out if ".mlp.w1." in k]:
        out[key.replace("mlp.w1.", "mlp.fc1.")] = torch.cat([out.pop(key), out.pop(key.replace(".w1.", ".w2."))])
    return out


def is_original_keys(keys: set[str] | frozenset[str]) -> bool:
    """Whether tensor names are the original DINOv3's (its storage tokens)."""
    return "storage_tokens" in keys


FAMILY = Family("dinov3", "DINOv3", VARIANTS, key_maps={"timm": from_timm_eva, "dinov3": from_original},
                defaults={k: v for k, v in _COMMON.items() if k not in ("num_classes", "qkv_bias")})
