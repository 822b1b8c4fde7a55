"""Registry of named ViT variants, with timm's names and default configurations."""

from __future__ import annotations

from typing import Any

from vitdeploy.config import HybridConfig, ViTConfig

# Paper Table 1: (hidden, depth, heads, mlp, rounded parameter count in millions).
_SIZES: dict[str, tuple[int, int, int, int, int | None]] = {
    "tiny": (192, 12, 3, 768, None),
    "small": (384, 12, 6, 1536, None),
    "base": (768, 12, 12, 3072, 86),
    "large": (1024, 24, 16, 4096, 307),
    "huge": (1280, 32, 16, 5120, 632),
}

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
        name=_name, image_size=_image, patch_size=_patch, hidden_size=_hidden, depth=_depth,
        num_heads=_heads, mlp_size=_mlp, crop_pct=0.9 if _image == 224 else 1.0,
    )

for _image in (224, 384):
    _name = f"vit_base_r50_s16_{_image}"
    VARIANTS[_name] = ViTConfig(
        name=_name, image_size=_image, patch_size=1, hidden_size=768, depth=12, num_heads=12,
        mlp_size=3072, hybrid=HybridConfig(layers=(3, 4, 9)), crop_pct=0.9 if _image == 224 else 1.0,
    )


def paper_size(name_or_config: str | ViTConfig) -> tuple[str, int] | None:
    """The paper's Table 1 model name and rounded size in millions, if this is one of its models."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    for size, (hidden, depth, heads, mlp, millions) in _SIZES.items():
        shape_matches = (config.hidden_size, config.depth, config.num_heads, config.mlp_size) == (
            hidden, depth, heads, mlp)
        if millions is not None and shape_matches and config.hybrid is None:
            return f"ViT-{size[0].upper()}", millions
    return None


def list_variants() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(VARIANTS)


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """The configuration of the variant ``name`` with ``overrides`` applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; expected one of: {', '.join(list_variants())}")
    return VARIANTS[name].replace(**overrides)
