"""Shared fixtures: small real models that keep the suite fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from vitdeploy.config import HybridConfig, ViTConfig
from vitdeploy.model import VisionTransformer


def tiny_config(**overrides) -> ViTConfig:
    """A ViT with the real structure but small sizes: 32x32 input, patch 8, 2 blocks, 10 classes."""
    base = dict(
        name="test_vit_tiny", image_size=32, patch_size=8, hidden_size=64, depth=2, num_heads=4,
        mlp_size=128, num_classes=10, crop_pct=1.0,
    )
    base.update(overrides)
    return ViTConfig(**base)


def tiny_hybrid_config(**overrides) -> ViTConfig:
    """A hybrid ViT with a one-block-per-stage ResNet-v2 (stride 16) and 1x1 patches, 64x64 input."""
    base = dict(
        name="test_vit_tiny_r", image_size=64, patch_size=1, hidden_size=64, depth=2, num_heads=4,
        mlp_size=128, num_classes=10, hybrid=HybridConfig(layers=(1, 1, 1)), crop_pct=1.0,
    )
    base.update(overrides)
    return ViTConfig(**base)


def make_model(config: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A model in eval mode whose every parameter is random (the head and cls token too)."""
    torch.manual_seed(seed)
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")):
                param.uniform_(0.5, 1.5)
            elif param.ndim == 1 or name in ("cls_token", "pos_embed"):
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture
def tiny_model() -> VisionTransformer:
    return make_model(tiny_config())


@pytest.fixture
def tiny_hybrid_model() -> VisionTransformer:
    return make_model(tiny_hybrid_config())
