"""DINOv3, EVA-02 and the Perception Encoder loaded from timm's files, against timm's own model.

Eager parity (<= 1e-4 relative, every output, at the native size, a larger square and a
non-square size through timm's ``dynamic_img_size``) with weights perturbed so attention is far
from uniform; the same model without its RoPE misses timm by far more (the test can fail).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from family_sources import rel_err
from rope_sources import (
    CASES,
    TOLERANCE,
    original_dinov3_state_dict,
    save_timm_rope,
    timm,
    timm_rope_model,
    timm_rope_outputs,
)
from safetensors.torch import save_file

from vitdeploy.checkpoints import load_model
from vitdeploy.model import VisionTransformer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(timm is None, reason="timm is not installed (CI: pip install --no-deps timm)")]


def _photo(height: int, width: int, batch: int = 2) -> torch.Tensor:
    """Real photos (scikit-image's astronaut and coffee), resized and normalised."""
    from skimage import data

    images = []
    for image in (data.astronaut(), data.coffee())[:batch]:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
        tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True)
        images.append((tensor - 0.5) / 0.25)
    return torch.cat(images)


def _worst(model: VisionTransformer, source: torch.nn.Module, case, sizes) -> float:
    worst = 0.0
    for height, width in sizes:
        x = _photo(height, width)
        expected = timm_rope_outputs(source, case, x)
        with torch.no_grad():
            actual = model.forward_outputs(x, list(expected))
        worst = max(worst, *(rel_err(actual[name], expected[name]) for name in expected))
    return worst


ROPE = sorted(case for case in CASES if case != "aimv2")


@pytest.mark.parametrize("case_id", ROPE)
def test_hub_folder_matches_timm_at_three_sizes(case_id, tmp_path):
    case = CASES[case_id]
    source = timm_rope_model(case)
    model = load_model(save_timm_rope(source, case, tmp_path, hub=True))
    assert model.config.provenance.family == case.family
    assert model.config.provenance.name == case.timm_name
    assert model.config.rope is not None
    assert _worst(model, source, case, case.sizes) <= TOLERANCE
    # without its RoPE the same weights miss timm by far: the parity above depends on the rotation
    blind = VisionTransformer(model.config.replace(rope=None)).eval()
    blind.load_state_dict(model.state_dict())
    assert _worst(blind, source, case, case.sizes[:1]) > 100 * TOLERANCE


def test_aimv2_hub_folder_matches_timm_at_three_sizes(tmp_path):
    """AIMv2: RMSNorm everywhere (after the patch embedding too), bias-free SwiGLU and projections."""
    case = CASES["aimv2"]
    source = timm_rope_model(case)
    model = load_model(save_timm_rope(source, case, tmp_path, hub=True))
    assert (model.config.provenance.family, model.config.norm, model.config.mlp_type) == ("aimv2", "rmsnorm", "swiglu")
    assert not model.config.proj_bias and model.config.patch_norm
    assert _worst(model, source, case, case.sizes) <= TOLERANCE


@pytest.mark.parametrize("case_id", ["dinov3", "eva02", "eva02_clip", "aimv2"])
def test_bare_state_dict_loads_as_its_family(case_id, tmp_path):
    """A bare DINOv3, EVA-02 (ImageNet or CLIP tower) or AIMv2 state dict fits its family alone: read as it
    (heads given, as the weights do not store them), and equal to timm."""
    case = CASES[case_id]
    source = timm_rope_model(case)
    model = load_model(save_timm_rope(source, case, tmp_path, hub=False), num_heads=4)
    assert model.config.provenance.family == case.family
    if case.family == "dinov3":
        model.config = model.config.replace(image_size=case.image)
    assert _worst(model, source, case, case.sizes) <= TOLERANCE


@pytest.mark.parametrize("case_id", ["pe", "pe_spatial"])
def test_bare_pe_state_dict_is_refused_then_loads_with_model(case_id, tmp_path):
    """A PE state dict stores no RoPE tensor, so it also fits a ViT without RoPE: refused in one line
    naming the candidates and model=; with model= naming the variant it loads as PE, equal to timm."""
    from vitdeploy.checkpoints import CheckpointError

    case = CASES[case_id]
    source = timm_rope_model(case)
    path = save_timm_rope(source, case, tmp_path, hub=False)
    with pytest.raises(CheckpointError) as error:
        load_model(path, num_heads=4)
    message = str(error.value)
    assert "\n" not in message and "Perception Encoder" in message and "model=NAME" in message
    assert case.timm_name.rsplit("_", 3)[0] in message
    model = load_model(path, model=case.timm_name, num_heads=4)
    assert model.config.provenance.family == case.family and model.config.rope == "eva"
    assert _worst(model, source, case, case.sizes) <= TOLERANCE


@pytest.mark.parametrize("case_id", ["pe", "pe_spatial"])
def test_bare_pe_state_dict_named_as_timm_names_its_weights_loads_as_pe(case_id, tmp_path):
    """The same ambiguous PE tensors, at the variant's own sizes, in a file named as timm names its
    weights (NAME.tag.safetensors): the name picks the variant (as the export's source check takes
    timm's model of that name; its heads too) and the model equals timm. Another family's name, or
    sizes that are not the named variant's, change nothing: refused as before."""
    from vitdeploy.checkpoints import CheckpointError
    from vitdeploy.variants import VARIANTS

    small = CASES[case_id]
    case = dataclasses.replace(small, image=VARIANTS[small.timm_name].image_size)  # the variant as timm has it
    source = timm_rope_model(case, size={})
    path = save_timm_rope(source, case, tmp_path, hub=False, name=f"{case.timm_name}.fb.safetensors")
    model = load_model(path)
    assert (model.config.provenance.family, model.config.provenance.name) == (case.family, case.timm_name)
    assert model.config.rope == "eva" and model.config.num_heads == source.blocks[0].attn.num_heads
    # at the native size only: through twelve perturbed blocks, the 1e-6 (fp32) difference between
    # timm's and vitdeploy's table resampling grows chaotically (the other sizes: the tests above)
    assert _worst(model, source, case, case.sizes[:1]) <= TOLERANCE
    with pytest.raises(CheckpointError, match="model=NAME"):
        load_model(save_timm_rope(source, case, tmp_path, hub=False, name="eva02_tiny_patch14_224.safetensors"))
    tiny = save_timm_rope(timm_rope_model(small), small, tmp_path, hub=False, name=f"{case.timm_name}.safetensors")
    with pytest.raises(CheckpointError, match="model=NAME"):
        load_model(tiny, num_heads=4)


def test_original_dinov3_state_dict_matches_timm(tmp_path):
    """facebookresearch/dinov3's own names (storage tokens, masked qkv bias, w1/w2/w3, bf16 periods)."""
    case = CASES["dinov3_plus_qkvb"]
    source = timm_rope_model(case)
    path = tmp_path / "dinov3_vits16plus.pth"
    torch.save(original_dinov3_state_dict(source), path)
    model = load_model(path, num_heads=4)
    assert model.config.provenance.family == "dinov3" and model.config.mlp_type == "swiglu" and model.config.qv_bias
    assert model.config.pooling == "token"  # the original's x_norm_clstoken
    assert _worst(model, source, case, case.sizes) <= TOLERANCE


@pytest.mark.parametrize("architecture, what", [
    ("vit_pe_lang_large_patch14_448", "Perception Encoder language"),
    ("eva02_enormous_patch14_clip_224", "EVA-02 enormous"),
    ("vit_medium_patch16_rope_reg1_gap_256", "RoPE ViT"),
])
def test_hub_folder_naming_an_unbuilt_architecture_is_refused(architecture, what, tmp_path):
    """A Hub folder naming an architecture vitdeploy does not build is refused in one line naming it,
    however well its tensors fit another layout."""
    import json

    from vitdeploy.checkpoints import CheckpointError

    case = CASES["pe"]
    source = timm_rope_model(case)
    folder = save_timm_rope(source, case, tmp_path, hub=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": architecture}))
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    assert architecture in str(error.value) and what in str(error.value) and "\n" not in str(error.value)


def test_hub_folder_naming_an_eva02_clip_tower_with_imagenet_weights_is_refused(tmp_path):
    """EVA-02 CLIP towers differ from the ImageNet models in the attention's norm and the pooling: a Hub
    folder naming the tower whose tensors are an ImageNet EVA-02's is refused, naming what differs."""
    import json

    from vitdeploy.checkpoints import CheckpointError

    case = CASES["eva02_base"]
    folder = save_timm_rope(timm_rope_model(case), case, tmp_path, hub=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architecture": "eva02_base_patch16_clip_224"}))
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    message = str(error.value)
    assert "eva02_base_patch16_clip_224" in message and "attn_norm" in message and "\n" not in message


def test_hub_folder_naming_pe_never_loads_as_siglip(tmp_path):
    """The defect this guards: a Hub folder naming vit_pe_core_* whose tensors differ from PE's (here: a
    SigLIP tower's) is refused, never read as the layout that fits."""
    import json

    from family_sources import FAMILIES, perturbed_timm_model, save_timm

    from vitdeploy.checkpoints import CheckpointError

    path = save_timm(perturbed_timm_model(FAMILIES["siglip"]), FAMILIES["siglip"], tmp_path)
    folder = tmp_path / "hub"
    folder.mkdir()
    path.rename(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_pe_core_tiny_patch16_384",
                                                    "model_args": {"num_heads": 2}}))
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    assert "vit_pe_core_tiny_patch16_384" in str(error.value) and "\n" not in str(error.value)


def test_variants_build_with_timm_parameter_counts():
    """Every registered size has timm's parameter count (timm's rope buffers and EVA's k-bias buffer are
    not parameters; timm's CLIP-style PE head is a biased Linear, vitdeploy's projection has no bias)."""
    from vitdeploy.flops import count_params
    from vitdeploy.model import create_model

    for name in ("vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb", "eva02_tiny_patch14_224",
                 "eva02_base_patch14_448", "eva02_base_patch16_clip_224", "eva02_large_patch14_clip_336",
                 "vit_pe_core_tiny_patch16_384", "aimv2_large_patch14_224"):
        with torch.device("meta"):
            ours = create_model(name)
            theirs = timm.create_model(name, pretrained=False)
        expected = sum(p.numel() for p in theirs.parameters())
        if ours.config.provenance.family == "pe":
            expected -= theirs.head.bias.numel()
        assert ours.num_parameters() == expected, name
        assert count_params(ours.config) == expected, name


def test_save_file_roundtrip_keeps_the_family(tmp_path):
    """vitdeploy's own format keeps a RoPE family's config (form, temperature, reference grid)."""
    from vitdeploy.checkpoints import save_model

    case = CASES["pe"]
    model = load_model(save_timm_rope(timm_rope_model(case), case, tmp_path, hub=True))
    path = tmp_path / "native.safetensors"
    save_model(model, path)
    again = load_model(path)
    assert again.config == model.config
    x = _photo(48, 80)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_transformers_dinov3_matches_transformers_at_three_sizes(gated, tmp_path):
    """A transformers DINOv3ViTModel folder (save_pretrained): read as DINOv3 with class-token pooling
    (its pooler_output), equal to transformers at the native size and two others, one not square."""
    from rope_sources import hf_dinov3, hf_dinov3_outputs

    source = hf_dinov3(gated, tmp_path)
    model = load_model(tmp_path)
    assert model.config.provenance.family == "dinov3" and model.config.pooling == "token"
    assert model.config.mlp_type == ("swiglu" if gated else "mlp") and model.config.qv_bias
    worst = 0.0
    for height, width in [(64, 64), (80, 80), (48, 96)]:
        x = _photo(height, width)
        expected = hf_dinov3_outputs(source, x)
        with torch.no_grad():
            actual = model.forward_outputs(x, list(expected))
            # the pooled vector alone: the last block runs for the class token only (RoPE skips it)
            pooled = model.forward_outputs(x, ["pooler_output"])["pooler_output"]
        worst = max(worst, rel_err(pooled, expected["pooler_output"]),
                    *(rel_err(actual[name], expected[name]) for name in expected))
    assert worst <= TOLERANCE


def test_transformers_folder_of_an_unread_model_type_is_refused_in_one_line(tmp_path):
    """A transformers folder whose config.json names a model type vitdeploy does not read
    (BeitModel) is refused naming it, never read as the closest layout."""
    import transformers as T

    from vitdeploy.checkpoints import CheckpointError

    small = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    model = T.BeitModel(T.BeitConfig(**small, patch_size=14, image_size=56))
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "\n" not in message and model.config.model_type in message and "does not read" in message


def test_timm_siglip2_hub_folder_loads_as_siglip_and_matches_timm(tmp_path):
    """timm's SigLIP 2 weights (``vit_*_siglip_*.v2_webli``) are the SigLIP architecture: a Hub folder
    naming one loads as SigLIP and equals timm at three sizes, one not square (fixed-aspect inputs;
    NaFlex is not read)."""
    import json

    from family_sources import FAMILIES, SMALL, perturbed_timm_model, timm_outputs

    family = FAMILIES["siglip"]
    source = perturbed_timm_model(family)
    folder = tmp_path / "siglip2"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_base_patch16_siglip_224.v2_webli", "model_args": {**SMALL, **family.kwargs},
        "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bicubic"}}))
    model = load_model(folder)
    assert model.config.provenance.family == "siglip" and model.config.pooling == "map"
    for height, width in [(64, 64), (80, 80), (48, 96)]:
        x = _photo(height, width)
        expected = timm_outputs(source, x, family.outputs)
        with torch.no_grad():
            actual = model.forward_outputs(x, list(expected))
        assert max(rel_err(actual[n], expected[n]) for n in expected) <= TOLERANCE


def test_transformers_siglip2_matches_transformers_at_three_sizes(tmp_path):
    """transformers' Siglip2VisionModel, fed each whole image as one patch sequence (its spatial shape,
    no padding): read as SigLIP with transformers' antialiased-bilinear table resizing, equal to it at
    the native size and two others, one not square."""
    from family_sources import hf_outputs
    from rope_sources import hf_siglip2

    source = hf_siglip2(tmp_path)
    model = load_model(tmp_path)
    assert model.config.provenance.family == "siglip" and model.config.pos_embed_resample == "siglip2"
    assert model.config.image_size == 64
    worst = 0.0
    for height, width in [(64, 64), (80, 80), (48, 96)]:
        x = _photo(height, width)
        expected = hf_outputs(source, x)
        with torch.no_grad():
            actual = model.forward_outputs(x, ["pooler_output", "last_hidden_state"])
        worst = max(worst, *(rel_err(actual[name], expected[name]) for name in actual))
        if (height, width) != (64, 64):  # timm's antialiased bicubic, the closest other convention, misses
            other = VisionTransformer(model.config.replace(pos_embed_resample="timm")).eval()
            other.load_state_dict(model.state_dict())
            with torch.no_grad():
                tokens = other.forward_outputs(x, ["last_hidden_state"])["last_hidden_state"]
            assert rel_err(tokens, expected["last_hidden_state"]) > 10 * TOLERANCE
    assert worst <= TOLERANCE
