"""DINOv2 giant's SwiGLU MLP from timm (SwiGLUPacked), transformers (use_swiglu_ffn) and the original
(SwiGLUFFNFused ``w12``/``w3``), each against its own library at three sizes (weights perturbed)."""

from __future__ import annotations

import pytest
import torch
from family_sources import (
    TOLERANCE,
    hf_outputs,
    hub_state_dict,
    original_dinov2_outputs,
    rel_err,
    timm,
    timm_dinov2_giant,
)
from safetensors.torch import save_file

from vitdeploy.checkpoints import load_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")]
SIZES = [(56, 56), (70, 70), (42, 84)]


@pytest.mark.parametrize("registers", [False, True], ids=["giant", "giant_reg4"])
def test_timm_and_original_giant_match_their_source(registers, tmp_path):
    source = timm_dinov2_giant(registers)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    hub = hub_state_dict(source)
    hub = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in hub.items()}
    torch.save(hub, tmp_path / "dinov2_vitg14.pth")
    from_timm = load_model(tmp_path / "timm.safetensors", num_heads=4)
    original = load_model(tmp_path / "dinov2_vitg14.pth", num_heads=4)
    assert from_timm.config.mlp_type == original.config.mlp_type == "swiglu"

    def build(**kw):
        return timm_dinov2_giant(registers, **kw)

    renamed = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in hub.items()}
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            assert rel_err(from_timm.forward_features(x), source.forward_features(x)) <= TOLERANCE
            expected = original_dinov2_outputs(renamed, build, x)["last_hidden_state"]
            assert rel_err(original.forward_features(x), expected) <= TOLERANCE


def test_transformers_giant_matches_transformers(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    source = T.Dinov2Model(T.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                                          image_size=56, patch_size=14, use_swiglu_ffn=True)).eval()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(0.1 * torch.randn(param.shape))
    source.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.config.mlp_type == "swiglu"
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width)
        expected = hf_outputs(source, x)
        with torch.no_grad():
            actual = model.forward_outputs(x, ["pooler_output", "last_hidden_state"])
        assert max(rel_err(actual[n], expected[n]) for n in actual) <= TOLERANCE
