"""Every family against timm's own model: DeiT (distilled too), DeiT III, DINOv2 (with registers),
CLIP towers (GELU and QuickGELU) and SigLIP (attention pool and mean pool).

Each case is a real timm model of that family at small sizes (width 64, two blocks, two heads,
``dynamic_img_size=True``), its weights perturbed away from their init and its position embeddings
a smooth grid (timm's 0.02-scale random init would hide a wrong resampling), saved as timm saves
weights and loaded by vitdeploy's timm loader, which must recognise the family from the keys
(the builders live in ``family_sources``).
Every output the family has is compared at the native size and at three others, two of them not
square: ``logits`` with timm's ``forward``, ``pooler_output`` with ``forward_head(pre_logits=True)``,
``last_hidden_state`` with ``forward_features`` and ``patch_tokens`` with its patch rows. Each
case also shows that the wrong resampling convention (and, for CLIP, the wrong activation) misses.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from family_sources import (
    FAMILIES,
    SMALL,
    TOLERANCE,
    Family,
    parity_sizes,
    perturb,
    perturbed_timm_model,
    save_timm,
    timm,
    timm_outputs,
)
from family_sources import rel_err as rel_error
from safetensors.torch import save_file
from timm_without_torchvision import TIMM_MISSING

from vitdeploy.checkpoints import CheckpointWarning, load_model
from vitdeploy.checkpoints.common import infer_config
from vitdeploy.checkpoints.timm import clip_head_as_projection
from vitdeploy.model import VisionTransformer
from vitdeploy.outputs import available_outputs
from vitdeploy.variants import VARIANTS

pytestmark = pytest.mark.skipif(timm is None, reason=TIMM_MISSING)


def errors_against(ours, reference, family: Family, native: int, patch: int,
                   alone: bool = True) -> dict[tuple, float]:
    """Relative errors of every output (all asked at once, and each alone: the prefix-only last
    block of token pooling) at every size."""
    generator = torch.Generator().manual_seed(2)
    result = {}
    for size in parity_sizes(native, patch):
        x = torch.randn(2, 3, *size, generator=generator)
        expected = timm_outputs(reference, x, family.outputs)
        with torch.no_grad():
            got = ours.forward_outputs(x, family.outputs)
            assert list(got) == list(family.outputs)
            for name in family.outputs:
                result[(size, name)] = rel_error(got[name], expected[name])
                if alone and name != "last_hidden_state":  # alone, it is the all-outputs computation
                    result[(size, name, "alone")] = rel_error(ours.forward_outputs(x, [name])[name], expected[name])
    return result


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded_family(request, tmp_path_factory):
    family = FAMILIES[request.param]
    reference = perturbed_timm_model(family)
    path = save_timm(reference, family, tmp_path_factory.mktemp(request.param))
    # heads leave no trace in the weights: a bare state dict needs them, a Hub folder's model_args has them
    heads = {} if family.load.get("hub_folder") else {"num_heads": SMALL["num_heads"]}
    if request.param == "clip":  # a bare CLIP state dict does not show its activation: said, not guessed silently
        with pytest.warns(CheckpointWarning, match="QuickGELU"):
            ours = load_model(path, **heads)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointWarning)
            ours = load_model(path, **heads)
    return request.param, family, reference, ours


def test_the_loader_recognises_the_family_from_its_keys(loaded_family):
    key, family, reference, ours = loaded_family
    config = ours.config
    fields = config.to_fields()  # family= sits in config.provenance
    for name, value in family.expected.items():
        assert (fields[name] if name in fields else getattr(config, name)) == value, (key, name)
    assert config.num_prefix_tokens == reference.num_prefix_tokens
    assert set(available_outputs(config)) == set(family.outputs)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters()) - (
        config.projection_dim or 0)  # timm's CLIP head has a (zero) bias; vitdeploy's proj has none


def test_every_output_matches_timm_at_native_and_other_sizes(loaded_family):
    key, family, reference, ours = loaded_family
    native, patch = ours.config.image_size, ours.config.patch_size
    errors = errors_against(ours, reference, family, native, patch)
    assert max(errors.values()) <= TOLERANCE, (key, {k: v for k, v in errors.items() if v > TOLERANCE})


def test_the_wrong_convention_misses(loaded_family):
    key, family, reference, ours = loaded_family
    native, patch = ours.config.image_size, ours.config.patch_size
    saved = ours.config
    try:
        ours.config = saved.replace(pos_embed_resample="huggingface")
        errors = errors_against(ours, reference, family, native, patch, alone=False)
    finally:
        ours.config = saved
    token_outputs = [e for k, e in errors.items() if k[0] != (native, native) and k[1] == "patch_tokens"]
    assert min(token_outputs) > 10 * TOLERANCE, key
    assert max(e for k, e in errors.items() if k[0] == (native, native)) <= TOLERANCE  # no resampling there


def test_clip_activation_matters():
    """A QuickGELU CLIP tower read as GELU (what a bare state dict gives) misses timm."""
    family = FAMILIES["clip_quickgelu"]
    reference = perturbed_timm_model(family)
    state = clip_head_as_projection(dict(reference.state_dict()), [])
    with pytest.warns(CheckpointWarning, match="QuickGELU"):
        config, _ = infer_config(state, "test", num_heads=2)
    assert config.act == "gelu"
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrong = rel_error(ours.forward_outputs(x, ["image_embeds"])["image_embeds"], reference(x))
        ours_right = VisionTransformer(config.replace(act="quick_gelu")).eval()
        ours_right.load_state_dict(state)
        right = rel_error(ours_right.forward_outputs(x, ["image_embeds"])["image_embeds"], reference(x))
    assert right <= TOLERANCE < wrong


def test_loading_at_another_image_size_resamples_like_timm(loaded_family, tmp_path):
    """``image_size=`` resamples the stored grid for good (only the embedded prefix tokens kept aside)."""
    key, family, reference, ours = loaded_family
    patch = ours.config.patch_size
    size = ours.config.image_size + 2 * patch
    path = save_timm(reference, family, tmp_path)
    heads = {} if family.load.get("hub_folder") else {"num_heads": SMALL["num_heads"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        resized = load_model(path, image_size=size, **heads)
    assert resized.config.image_size == size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    expected = timm_outputs(reference, x, family.outputs)
    with torch.no_grad():
        got = resized.forward_outputs(x, family.outputs)
    errors = {name: rel_error(got[name], expected[name]) for name in family.outputs}
    assert max(errors.values()) <= TOLERANCE, (key, errors)


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_quickgelu_224", "vit_base_patch32_siglip_gap_256"])
def test_a_bare_file_named_as_timm_names_its_weights_gets_the_activation_it_cannot_show(name, tmp_path):
    """OpenAI's CLIP (QuickGELU) and SigLIP 2's B/32 (tanh GELU): no tensor shows the activation. A bare
    file named as timm names it (NAME.tag.safetensors) is read as that variant and equals timm at the
    native and a non-square size, where the same weights with exact GELU miss. Under another name the
    CLIP file is read as its GELU twin (with a warning); the B/32's shapes are that variant's alone."""
    from vitdeploy.outputs import default_outputs

    reference = perturb(timm.create_model(name, pretrained=False, dynamic_img_size=True), seed=3)
    if "clip" in name:
        reference.head.bias.data.zero_()  # timm stores CLIP's projection as a head with a zero bias
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
    named, other = tmp_path / f"{name}.tag.safetensors", tmp_path / "weights.safetensors"
    save_file(tensors, str(named))
    save_file(tensors, str(other))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # nothing guessed
        ours = load_model(named)
    assert (ours.config.provenance.name, ours.config.act) == (name, VARIANTS[name].act) and ours.config.act != "gelu"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        unnamed = load_model(other).config
    if "clip" in name:
        assert unnamed.act == "gelu" and any("QuickGELU" in str(w.message) for w in caught)
    else:
        assert (unnamed.provenance.name, unnamed.act) == (name, ours.config.act)
    gelu = VisionTransformer(ours.config.replace(act="gelu")).eval()
    gelu.load_state_dict(ours.state_dict())
    output = default_outputs(ours.config)[0]
    native, patch = ours.config.image_size, ours.config.patch_size
    errors, gelu_errors = [], []
    for size in ((native, native), (native + 2 * patch, native - patch)):
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            expected = reference.forward_head(reference.forward_features(x), pre_logits=output != "image_embeds")
            errors.append(rel_error(ours.forward_outputs(x, [output])[output], expected))
            gelu_errors.append(rel_error(gelu.forward_outputs(x, [output])[output], expected))
    # tanh's GELU is within 2e-4 of the exact one here: the right activation is 100x closer than that
    assert max(errors) <= TOLERANCE / 10 and min(gelu_errors) > TOLERANCE, (errors, gelu_errors)


@pytest.mark.parametrize("name", ["vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224"])
def test_a_timm_hybrid_matches_timm_at_native_and_non_square_sizes(name, tmp_path):
    """AugReg's hybrids: R+Ti (the ResNet stem alone, 8x8 patches on its map) and R26+S (four stages),
    both stride 32, read from timm's bare files and equal to timm's own model (two blocks, perturbed)."""
    from vitdeploy.metadata import ArtifactMetadata

    reference = perturb(timm.create_model(name, pretrained=False, depth=2, dynamic_img_size=True), seed=5)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    ours = load_model(path)
    assert ours.config.hybrid.layers == VARIANTS[name].hybrid.layers and ours.config.stride == 32
    metadata = ArtifactMetadata(model_config=ours.config.to_dict(), preprocessing=None, inputs=[], outputs=[],
                                shape_range=None)
    stride = metadata.stride  # what an export's validation and runtimes take the sizes by
    assert stride == 32 and isinstance(stride, int)
    errors = []
    for size in ((224, 224), (256, 192)):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            errors.append(rel_error(ours(x), reference(x)))
    assert max(errors) <= TOLERANCE, errors


def test_a_residual_post_norm_vit_is_refused_by_its_name(tmp_path):
    """timm's vit_base_patch16_rpn_224 has a pre-norm ViT's tensor names; read as one, its outputs are wrong."""
    from vitdeploy.checkpoints import CheckpointError

    model = timm.create_model("vit_base_patch16_rpn_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                              img_size=32)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    named = tmp_path / "vit_base_patch16_rpn_224.sw_in1k.safetensors"
    save_file(tensors, str(named))
    with pytest.raises(CheckpointError, match="post-norm") as refused:
        load_model(named, num_heads=2)
    assert "\n" not in str(refused.value)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(tensors, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_rpn_224"}))
    with pytest.raises(CheckpointError, match="post-norm"):
        load_model(hub)


@pytest.mark.parametrize("architecture", ["vit_base_patch16_lingbot", "vit_large_patch16_sapiens2",
                                          "vit_base_patch16_rope_224"])
def test_a_hub_folder_naming_an_architecture_vitdeploy_does_not_build_is_refused_by_name(architecture, tmp_path):
    """timm's Eva-class models vitdeploy has no family for (LingBot-Vision, Sapiens2, RoPE ViTs): refused by the
    name the folder records, not read as the closest ViT whatever its tensors."""
    from vitdeploy.checkpoints import CheckpointError

    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                              img_size=32)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"architecture": architecture}))
    with pytest.raises(CheckpointError, match=architecture) as refused:
        load_model(hub)
    assert "\n" not in str(refused.value) and "build" in str(refused.value)
