"""The output names every stage shares (vitdeploy.outputs): which a config has, defaults, checks."""

from __future__ import annotations

import pytest

from vitdeploy.config import ViTConfig
from vitdeploy.outputs import (
    OUTPUT_NAMES,
    available_outputs,
    check_outputs,
    default_outputs,
    output_dims,
    parse_outputs,
)


def test_classifier_defaults_to_logits_and_has_token_outputs():
    config = ViTConfig(num_classes=10)
    assert default_outputs(config) == ("logits",)
    assert available_outputs(config) == ("logits", "pooler_output", "last_hidden_state", "patch_tokens")


def test_headless_backbone_and_clip_projection_defaults():
    assert default_outputs(ViTConfig(num_classes=0)) == ("pooler_output",)
    clip = ViTConfig(num_classes=0, projection_dim=512)
    assert default_outputs(clip) == ("image_embeds",)
    assert "image_embeds" in available_outputs(clip)
    assert "image_embeds" not in available_outputs(ViTConfig())


def test_check_outputs_orders_and_rejects():
    config = ViTConfig(num_classes=10)
    assert check_outputs(["patch_tokens", "logits", "logits"], config) == ("logits", "patch_tokens")
    with pytest.raises(ValueError, match="unknown output.*bogus"):
        check_outputs(["bogus"], config)
    with pytest.raises(ValueError, match="no image_embeds output"):
        check_outputs(["image_embeds"], config)
    with pytest.raises(ValueError, match="no logits output"):
        parse_outputs("logits", ViTConfig(num_classes=0))
    with pytest.raises(ValueError, match="no outputs"):
        parse_outputs(" , ", config)


def test_every_output_has_dims():
    for name in OUTPUT_NAMES:
        assert output_dims(name)[0] == "batch"
    with pytest.raises(ValueError, match="unknown output"):
        output_dims("features")
