"""EVA-02 (Fang et al. 2023): a learned position table AND 2-D RoPE, SwiGLU, q/v biases.

Positions: the table (resampled as timm does) plus RoPE on the patch tokens in timm's
``RotaryEmbeddingCat`` form (:mod:`vitdeploy.rope` ``"eva"``): integer coordinates rescaled to
the 16 x 16 reference grid every timm EVA-02 was pre-trained at (``ref_feat_shape``), bands
``1 / 10000 ** (j / (d/4))``, interleaved pairs. Ti and S pack their SwiGLU in one ``fc1``; B and
L split it (``fc1_g``/``fc1_x``) and add a norm over its hidden width (the scale-norm), and
split q/k/v (packed by :func:`~vitdeploy.families.base.from_timm_eva`). Pooling: the mean patch
token through ``fc_norm``.

The CLIP towers (``eva02_base_patch16_clip_224``, ``eva02_large_patch14_clip_{224,336}``) are the B and L
blocks plus a norm over the attention output before its projection (timm's ``scale_attn_inner``,
``attn_norm``), pool by the class token through the final norm, and end in timm's biased ``head`` into
the joint space (read as ``head``: its output is what timm's forward returns, named ``logits``). The
base tower's patch is 16 while its RoPE keeps the 16 x 16 reference grid (a 14 x 14 grid at 224 px
is rescaled to it, as timm does).

Sources: timm ``eva02_{tiny,small,base,large}_patch14_{224,336,448}`` and the CLIP towers above, state
dicts and Hub folders. ``eva02_enormous_patch14_clip_224`` (post-norm blocks) is refused.
"""

from __future__ import annotations

from vitdeploy.constants import CLIP_MEAN, CLIP_STD
from vitdeploy.families.base import Family, from_timm_eva, has_part, variant

_COMMON = dict(family="eva02", class_token=True, qkv_bias=False, qv_bias=True, mlp_type="swiglu", rope="eva", rope_ref_grid=(16, 16),
               pooling="avg", layer_norm_eps=1e-6, mean=CLIP_MEAN, std=CLIP_STD)
# (size, hidden, depth, heads, mlp, scale-norm, fine-tuned size)
_SIZES = (("tiny", 192, 12, 3, 512, False, 336), ("small", 384, 12, 6, 1024, False, 336),
          ("base", 768, 12, 12, 2048, True, 448), ("large", 1024, 24, 16, 2730, True, 448))

VARIANTS = {}
for _size, _hidden, _depth, _heads, _mlp, _norm, _tuned in _SIZES:
    for _image, _classes in ((224, 0), (_tuned, 1000)):
        _name = f"eva02_{_size}_patch14_{_image}"
        # timm's default weights at 448 were evaluated squashed (crop_mode='squash'), those at 336 centre-cropped
        VARIANTS[_name] = variant(_name, _image, 14, _hidden, _depth, _heads, _mlp, mlp_norm=_norm,
                                  num_classes=_classes, crop_pct=0.9 if _image == 224 else 1.0,
                                  resize_mode="squash" if _image == 448 else "shortest", **_COMMON)

# The CLIP towers: (name, image, patch, hidden, depth, heads, mlp, projection width).
_CLIP = (("eva02_base_patch16_clip_224", 224, 16, 768, 12, 12, 2048, 512),
         ("eva02_large_patch14_clip_224", 224, 14, 1024, 24, 16, 2730, 768),
         ("eva02_large_patch14_clip_336", 336, 14, 1024, 24, 16, 2730, 768))
for _name, _image, _patch, _hidden, _depth, _heads, _mlp, _width in _CLIP:
    VARIANTS[_name] = variant(_name, _image, _patch, _hidden, _depth, _heads, _mlp, mlp_norm=True, attn_norm=True,
                              num_classes=_width, crop_pct=0.9 if _image == 224 else 1.0,
                              **{**_COMMON, "pooling": "token"})


def fits_bare(names: frozenset[str]) -> bool:
    """A position table with EVA's q/v biases (fused or split q/k/v) and a SwiGLU or GELU MLP."""
    return "pos_embed" in names and (has_part(names, ".attn.q_bias") or has_part(names, ".attn.q_proj."))


# A bare file of no registered size: an fc_norm tensor says mean pooling (the ImageNet models); without
# one the final norm is on the tokens and the pool is the class token (the CLIP towers).
FAMILY = Family("eva02", "EVA-02", VARIANTS, key_maps={"timm": from_timm_eva},
                defaults={**_COMMON, "pooling": "token"}, fits_bare=fits_bare)
