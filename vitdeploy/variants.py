"""Registry of named ViT variants, with timm's names and default configurations.

The plain ViTs of the paper and its hybrids, and the families built from the same block: DeiT
(with and without distillation), DeiT III, DINOv2 (with and without registers), I-JEPA's encoders,
and the image towers of CLIP and SigLIP. Each has timm's architecture and preprocessing; a CLIP
tower is its embedder (the visual projection ``proj``, no classifier), so its parameter count is
timm's with ``num_classes`` = the projection width less that head's bias (timm stores the
projection as a biased ``head``, the bias zero). DINOv2 giant has a SwiGLU MLP. Every SigLIP and
SigLIP 2 tower timm defines is here, with timm's activation (which no tensor shows). Left out:
``vit_so400m_patch14_siglip_384`` and its ``_gap_`` twin (384 is no multiple of 14; timm's conv
drops the last 6 pixels, the ``_378`` variants are the same networks at a size that divides).
"""

from __future__ import annotations

from typing import Any

from vitdeploy.config import HybridConfig, InputPreprocessing, Provenance, ViTConfig
from vitdeploy.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

# Paper Table 1: (hidden, depth, heads, mlp, rounded parameter count in millions).
_SIZES: dict[str, tuple[int, int, int, int, int | None]] = {
    "tiny": (192, 12, 3, 768, None),
    "small": (384, 12, 6, 1536, None),
    "base": (768, 12, 12, 3072, 86),
    "large": (1024, 24, 16, 4096, 307),
    "huge": (1280, 32, 16, 5120, 632),
}
# Families' other sizes by name: (hidden, depth, heads, mlp). OpenCLIP's g/14 and bigG/14 and SigLIP 2's
# g-opt have 16 heads, which their widths do not suggest.
_FAMILY_SIZES: dict[str, tuple[int, int, int, int]] = {
    "so400m": (1152, 27, 16, 4304), "giantopt": (1536, 40, 16, 6144), "giant": (1408, 40, 16, 6144),
    "gigantic": (1664, 48, 16, 8192)}

# CLIP's joint-space width by tower size.
_CLIP_PROJECTION = {"base": 512, "large": 768, "huge": 1024, "giant": 1024, "gigantic": 1280}

# (size, patch, image) for every plain variant that timm defines.
_PLAIN = [
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 8, 224), ("small", 16, 224), ("small", 16, 384), ("small", 32, 224), ("small", 32, 384),
    ("base", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
    ("large", 14, 224), ("large", 16, 224), ("large", 16, 384), ("large", 32, 224), ("large", 32, 384),
    ("huge", 14, 224),
]

VARIANTS: dict[str, ViTConfig] = {}

for _size, _patch, _image in _PLAIN:
    _hidden, _depth, _heads, _mlp, _ = _SIZES[_size]
    _name = f"vit_{_size}_patch{_patch}_{_image}"
    VARIANTS[_name] = ViTConfig(
        image_size=_image, patch_size=_patch, hidden_size=_hidden, depth=_depth, num_heads=_heads, mlp_size=_mlp,
        preprocessing=InputPreprocessing(crop_pct=0.9 if _image == 224 else 1.0), provenance=Provenance(name=_name),
    )
# timm's only weights of ViT-S/8 are DINO's, normalised as ImageNet
VARIANTS["vit_small_patch8_224"] = VARIANTS["vit_small_patch8_224"].replace(mean=IMAGENET_MEAN, std=IMAGENET_STD)

# The hybrids of the paper (R50+ViT-B/16) and of "How to train your ViT" (AugReg): ResNet-v2 stages
# (none: the stem alone, with 8x8 patches on its stride-4 map) under a ViT.
for _name, _size, _patch, _layers in (
    ("vit_base_r50_s16", "base", 1, (3, 4, 9)), ("vit_tiny_r_s16_p8", "tiny", 8, ()),
    ("vit_small_r26_s32", "small", 1, (2, 2, 2, 2)), ("vit_large_r50_s32", "large", 1, (3, 4, 6, 3)),
):
    for _image in (224, 384):
        _hidden, _depth, _heads, _mlp, _ = _SIZES[_size]
        VARIANTS[f"{_name}_{_image}"] = ViTConfig(
            image_size=_image, patch_size=_patch, hidden_size=_hidden, depth=_depth, num_heads=_heads, mlp_size=_mlp,
            hybrid=HybridConfig(layers=_layers), preprocessing=InputPreprocessing(crop_pct=0.9 if _image == 224 else 1.0),
            provenance=Provenance(name=f"{_name}_{_image}"),
        )
VARIANTS["vit_base_r26_s32_224"] = VARIANTS["vit_small_r26_s32_224"].replace(
    hidden_size=768, num_heads=12, mlp_size=3072, provenance=Provenance(name="vit_base_r26_s32_224"))




def _add(name: str, size: str | tuple[int, int, int, int], patch: int, image: int, **fields: Any) -> None:
    """Registers ``name`` (``size``: a name in ``_SIZES`` or ``_FAMILY_SIZES``, or (hidden, depth, heads, mlp));
    ``fields`` by flat name (:meth:`ViTConfig.from_fields`): family, mean, ... too."""
    if isinstance(size, str):
        size = _SIZES[size][:4] if size in _SIZES else _FAMILY_SIZES[size]
    hidden, depth, heads, mlp = size
    fields.setdefault("crop_pct", 0.9 if image == 224 else 1.0)
    VARIANTS[name] = ViTConfig.from_fields(dict(name=name, image_size=image, patch_size=patch, hidden_size=hidden,
                                                depth=depth, num_heads=heads, mlp_size=mlp, **fields))


_DEIT = dict(family="deit", mean=IMAGENET_MEAN, std=IMAGENET_STD)
for _size, _image in (("tiny", 224), ("small", 224), ("base", 224), ("base", 384)):
    _add(f"deit_{_size}_patch16_{_image}", _size, 16, _image, **_DEIT)
    _add(f"deit_{_size}_distilled_patch16_{_image}", _size, 16, _image, distilled=True, **_DEIT)
_DEIT3 = dict(family="deit3", mean=IMAGENET_MEAN, std=IMAGENET_STD, no_embed_class=True, layer_scale=1e-6)
for _size in ("small", "base", "large"):
    for _image in (224, 384):
        _add(f"deit3_{_size}_patch16_{_image}", _size, 16, _image, **_DEIT3)
_add("deit3_medium_patch16_224", (512, 12, 8, 2048), 16, 224, **_DEIT3)
_add("deit3_huge_patch14_224", "huge", 14, 224, **_DEIT3)  # 16 heads, as the paper's ViT-H
# I-JEPA's encoders (timm's *_gap_* names): no class token, the mean patch token, no fc_norm
_IJEPA = dict(family="ijepa", num_classes=0, class_token=False, pooling="avg", fc_norm=False, mean=IMAGENET_MEAN,
              std=IMAGENET_STD)
_add("vit_huge_patch14_gap_224", "huge", 14, 224, **_IJEPA)
_add("vit_huge_patch16_gap_448", "huge", 16, 448, **_IJEPA)
_add("vit_giant_patch16_gap_224", "giant", 16, 224, **_IJEPA)
for _size in ("small", "base", "large"):
    _dinov2 = dict(family="dinov2", num_classes=0, layer_scale=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   crop_pct=1.0)
    _add(f"vit_{_size}_patch14_dinov2", _size, 14, 518, **_dinov2)
    _add(f"vit_{_size}_patch14_reg4_dinov2", _size, 14, 518, num_reg_tokens=4, no_embed_class=True, **_dinov2)
# DINOv2 giant: a SwiGLU MLP (timm's SwiGLUPacked, hidden 4096)
_add("vit_giant_patch14_dinov2", (1536, 40, 24, 4096), 14, 518, mlp_type="swiglu", **_dinov2)
_add("vit_giant_patch14_reg4_dinov2", (1536, 40, 24, 4096), 14, 518, mlp_type="swiglu", num_reg_tokens=4,
     no_embed_class=True, **_dinov2)
for _size, _patch, _image, _acts in (
    ("base", 32, 224, ("gelu", "quick_gelu")), ("base", 32, 256, ("gelu",)), ("base", 16, 224, ("gelu", "quick_gelu")),
    ("large", 14, 224, ("gelu", "quick_gelu")), ("large", 14, 336, ("gelu", "quick_gelu")),
    ("huge", 14, 224, ("gelu", "quick_gelu")), ("huge", 14, 378, ("gelu", "quick_gelu")),
    ("giant", 14, 224, ("gelu",)), ("gigantic", 14, 224, ("gelu", "quick_gelu")), ("gigantic", 14, 378, ("gelu",)),
):
    for _act in _acts:
        _tag = "_quickgelu" if _act == "quick_gelu" else ""
        # timm's (only) weights of the gigantic tower at 378, MetaCLIP 2's, are evaluated squashed
        _add(f"vit_{_size}_patch{_patch}_clip{_tag}_{_image}", _size, _patch, _image,
             family="clip", num_classes=0,
             projection_dim=_CLIP_PROJECTION[_size], pre_norm=True, patch_bias=False, layer_norm_eps=1e-5,
             act=_act, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0,
             resize_mode="squash" if (_size, _image) == ("gigantic", 378) else "shortest")
_SIGLIP = dict(family="siglip", num_classes=0, class_token=False, crop_pct=0.9)
# (size, patch, image, activation) of SigLIP's towers in timm; the SigLIP 2 towers new with it (B/32,
# L/16 at 512, So400m/16, g-opt/16) use GELU's tanh approximation, the others the exact GELU.
for _size, _patch, _image, _act in (
    *(("base", 16, _image, "gelu") for _image in (224, 256, 384, 512)),
    ("base", 32, 256, "gelu_tanh"),
    ("large", 16, 256, "gelu"), ("large", 16, 384, "gelu"), ("large", 16, 512, "gelu_tanh"),
    ("so400m", 14, 224, "gelu"), ("so400m", 14, 378, "gelu"),
    *(("so400m", 16, _image, "gelu_tanh") for _image in (256, 384, 512)),
    *(("giantopt", 16, _image, "gelu_tanh") for _image in (256, 384)),
):
    _add(f"vit_{_size}_patch{_patch}_siglip_{_image}", _size, _patch, _image, pooling="map", act=_act, **_SIGLIP)
    _add(f"vit_{_size}_patch{_patch}_siglip_gap_{_image}", _size, _patch, _image, pooling="avg", fc_norm=False,
         act=_act, **_SIGLIP)
# Backbones without a final norm (timm's final_norm=False): NVIDIA's C-RADIO (registers after the class
# token, a position table for the patches alone; timm resamples it as for any ViT) and InternVL's InternViT-300M.
_RADIO = dict(num_classes=0, no_embed_class=True, final_norm=False, mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0)
for _name, _shape, _fields in (
    ("vit_base_patch16_radio_v3", "base", dict(num_reg_tokens=7, layer_scale=1e-5)),
    ("vit_large_patch16_radio_v3", "large", dict(num_reg_tokens=7, layer_scale=1e-5)),
    ("vit_huge_patch16_radio_v3", "huge", dict(num_reg_tokens=7)),
    ("vit_giant_patch16_radio_v3", (1536, 40, 24, 6144), dict(num_reg_tokens=7)),
    ("vit_so400m_patch16_radio_v4", "so400m", dict(num_reg_tokens=9)),
    ("vit_huge_patch16_radio_v4", "huge", dict(num_reg_tokens=9)),
):
    _add(_name, _shape, 16, 512, **_RADIO, **_fields)
_add("vit_intern300m_patch14_448", "large", 14, 448, num_classes=0, layer_scale=0.1, final_norm=False,
     mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)
# timm's gap towers of So400m/14 at the sizes of its fine-tuned weights (crop 1.0 from 384 up)
for _image in (448, 896):
    _add(f"vit_so400m_patch14_siglip_gap_{_image}", "so400m", 14, _image, pooling="avg", fc_norm=False,
         **{**_SIGLIP, "crop_pct": 1.0})


def paper_size(name_or_config: str | ViTConfig) -> tuple[str, int] | None:
    """The paper's Table 1 model name and rounded size in millions, if this is one of its models."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    for size, (hidden, depth, heads, mlp, millions) in _SIZES.items():
        shape_matches = (config.hidden_size, config.depth, config.num_heads, config.mlp_size) == (
            hidden, depth, heads, mlp)
        if millions is not None and shape_matches and config.hybrid is None and config.provenance.family == "vit":
            return f"ViT-{size[0].upper()}", millions
    return None


def list_variants() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(VARIANTS)


def closest_variants(name: str, count: int = 3) -> list[str]:
    """Up to ``count`` variant names spelled most like ``name`` (best first; empty when none is close)."""
    import difflib

    return difflib.get_close_matches(name, list_variants(), n=count, cutoff=0.6)


def unknown_variant_message(name: str, context: str = "",
                            listing: str = "vitdeploy.list_variants() lists them all") -> str:
    """The one line saying ``name`` is no variant (``context``: where it was given, e.g. ``" for model="``),
    naming the closest variants and where the full list is (``listing``)."""
    return f"unknown model variant {name!r}{context}; {closest_hint(name, listing)}"


def closest_hint(name: str, listing: str = "`vitdeploy inspect --list` lists them all") -> str:
    """``closest: a, b, c (listing)``: the variant names spelled most like ``name`` and where the full list is."""
    close = closest_variants(name)
    hint = f"closest: {', '.join(close)}" if close else "no variant name is close"
    return f"{hint} ({listing})"


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The configuration of the variant ``name`` with ``overrides`` applied."""
    if name not in VARIANTS:
        raise ValueError(unknown_variant_message(name))
    return VARIANTS[name].replace(**overrides)


def _add_families() -> None:
    from vitdeploy.families import all_variants

    VARIANTS.update(all_variants())


_add_families()
