"""The family fields of ViTConfig and the registry: validation, round trips, old files, parameter
counts against real timm, the prefix-only last block, the fp16 policy and ``model=``."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, tiny_config
from safetensors.torch import save_file
from timm_without_torchvision import TIMM_MISSING, import_timm

from vitdeploy.checkpoints import CheckpointError, load_model, resolve_source
from vitdeploy.checkpoints.timm import stem_only_backbone_as_stem
from vitdeploy.config import FAMILIES as FAMILY_NAMES
from vitdeploy.config import ViTConfig
from vitdeploy.model import Attention, AttentionPool, LayerNorm, VisionTransformer, prepare_model
from vitdeploy.outputs import available_outputs, default_outputs
from vitdeploy.variants import VARIANTS, get_config

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason=TIMM_MISSING)

# One small config per family piece (32x32 input, patch 8, width 64, two blocks).
FAMILY_CONFIGS = {
    "deit_distilled": tiny_config(distilled=True, family="deit"),
    "deit3": tiny_config(no_embed_class=True, layer_scale=1e-6, family="deit3"),
    "dinov2_reg": tiny_config(num_reg_tokens=4, no_embed_class=True, layer_scale=1e-5, num_classes=0,
                              family="dinov2"),
    "clip": tiny_config(pre_norm=True, patch_bias=False, projection_dim=24, num_classes=0, act="quick_gelu",
                        layer_norm_eps=1e-5, family="clip"),
    "siglip": tiny_config(pooling="map", class_token=False, num_classes=0, act="gelu_tanh", family="siglip"),
    "avg_fc_norm_reg": tiny_config(pooling="avg", class_token=True, num_reg_tokens=2),
    # Dinov2WithRegistersForImageClassification: head(cat(class token, mean of the patch tokens))
    "dinov2_reg_classifier": tiny_config(pooling="token_avg", num_reg_tokens=2, no_embed_class=True,
                                         layer_scale=1e-5, num_classes=3, family="dinov2"),
}


@pytest.mark.parametrize("key", sorted(FAMILY_CONFIGS))
def test_round_trip_keeps_every_field(key):
    config = FAMILY_CONFIGS[key]
    assert ViTConfig.from_dict(config.to_dict()) == config
    assert ViTConfig.from_json(config.to_json()) == config


def test_old_saved_configs_keep_their_meaning():
    """Written before the family fields: mean pooling then meant the final norm on the tokens."""
    old = tiny_config(pooling="avg").to_dict()
    old.update(old.pop("preprocessing") | old.pop("provenance"))  # and before the config was split
    for name in ("class_token", "num_reg_tokens", "distilled", "no_embed_class", "layer_scale", "pre_norm",
                 "fc_norm", "act", "patch_bias", "family"):
        del old[name]
    config = ViTConfig.from_dict(old)
    assert config.use_fc_norm is False and config.num_prefix_tokens == 0 and config.act == "gelu"
    assert "norm.weight" in VisionTransformer(config).state_dict()
    # a config built today follows timm's rule: fc_norm with mean pooling
    assert tiny_config(pooling="avg").use_fc_norm is True
    old_token = tiny_config().to_dict()
    del old_token["class_token"], old_token["fc_norm"]
    assert ViTConfig.from_dict(old_token).num_prefix_tokens == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(pooling="max"), "pooling must be one of token, avg, map, token_avg, got 'max'"),
    (dict(class_token=False), "pooling 'token' needs the class token"),
    (dict(pooling="token_avg", class_token=False), "pooling 'token_avg' needs the class token"),
    (dict(pooling="token_avg", fc_norm=True), "it has no fc_norm or representation layer"),
    (dict(pooling="token_avg", representation_size=32), "it has no fc_norm or representation layer"),
    (dict(pooling="token_avg", distilled=True), "needs pooling 'token' and a class token"),
    (dict(distilled=True, pooling="avg"), "needs pooling 'token' and a class token"),
    (dict(distilled=True, num_reg_tokens=2), "no register tokens or representation layer"),
    (dict(distilled=True, fc_norm=True), "no fc_norm"),
    (dict(num_reg_tokens=-1), "num_reg_tokens must be >= 0, got -1"),
    (dict(act="relu"), "act must be one of gelu, quick_gelu, gelu_tanh, got 'relu'"),
    (dict(family="beit"), f"family must be one of {', '.join(FAMILY_NAMES)}, got 'beit'"),
    (dict(layer_scale=0.0), "layer_scale is the LayerScale init and must be > 0"),
    (dict(projection_dim=0), "projection_dim must be positive"),
])
def test_invalid_combinations_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**overrides)


def test_prefix_tokens_and_their_order():
    model = make_model(FAMILY_CONFIGS["dinov2_reg"])
    assert model.config.num_prefix_tokens == 5 and model.pos_embed.shape[1] == 16  # no_embed_class: patches only
    with torch.no_grad():
        tokens = model.forward_outputs(torch.randn(2, 3, 32, 48), ["last_hidden_state", "patch_tokens"])
    assert tokens["last_hidden_state"].shape == (2, 5 + 4 * 6, 64)
    assert torch.equal(tokens["patch_tokens"], tokens["last_hidden_state"][:, 5:])
    distilled = make_model(FAMILY_CONFIGS["deit_distilled"])
    assert distilled.pos_embed.shape[1] == 2 + 16  # class and distillation tokens have position embeddings
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = distilled.forward_features(x)
        logits = distilled(x)
        pooled = distilled.forward_outputs(x, ["pooler_output"])["pooler_output"]
    expected = (distilled.head(features[:, 0]) + distilled.head_dist(features[:, 1])) / 2
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, (features[:, 0] + features[:, 1]) / 2, rtol=0, atol=1e-6)


def test_token_avg_pools_the_class_token_beside_the_mean_patch_token(tmp_path):
    """``token_avg`` (Dinov2ForImageClassification): ``pooler_output`` is ``cat(class token, mean of the
    patch tokens)`` of the normed tokens, registers left out, ``[N, 2 * hidden]``; the head reads it;
    every block runs for every token (no prefix-only last block); the width reaches the FLOP and
    parameter counts, the output shapes and the exporter; a saved state dict is read back as
    ``token_avg`` from its head's width; ``model=`` a DINOv2 variant keeps the classifier's pooling."""
    from vitdeploy.checkpoints.common import force_variant, infer_config
    from vitdeploy.exporters.onnx_export import ExportOptions, uses_class_token_last_block
    from vitdeploy.flops import count_params
    from vitdeploy.outputs import output_shape

    config = FAMILY_CONFIGS["dinov2_reg_classifier"]
    assert (config.has_class_token, config.num_prefix_tokens, config.num_pooled_prefix_tokens) == (True, 3, 0)
    assert config.pooled_size == 128 and config.use_fc_norm is False
    assert output_shape("pooler_output", config) == ["batch", 128]
    model = make_model(config)
    assert model.head.in_features == 128
    assert count_params(config) == model.num_parameters()
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        out = model.forward_outputs(x, ["logits", "pooler_output", "last_hidden_state"])
        tokens = out["last_hidden_state"]
        torch.testing.assert_close(out["pooler_output"], torch.cat([tokens[:, 0], tokens[:, 3:].mean(1)], dim=1))
        torch.testing.assert_close(out["logits"], model.head(out["pooler_output"]))
        torch.testing.assert_close(model(x, class_token_last_block=True), out["logits"])
    assert not uses_class_token_last_block(config, ExportOptions(outputs=("logits",)))
    assert ExportOptions().output_names(config) == ("logits",)

    state = dict(model.state_dict())
    inferred, _ = infer_config(state, "test", num_heads=config.num_heads)
    assert (inferred.pooling, inferred.pooled_size, inferred.num_reg_tokens) == ("token_avg", 128, 2)
    del state["head.weight"], state["head.bias"]
    assert infer_config(state, "test", num_heads=config.num_heads)[0].pooling == "token"

    backbone = get_config("vit_small_patch14_reg4_dinov2")
    classifier = backbone.replace(pooling="token_avg", num_classes=3)
    forced = force_variant(classifier, "vit_small_patch14_reg4_dinov2", "test", [])
    assert (forced.pooling, forced.num_classes) == ("token_avg", 3)
    assert force_variant(backbone.replace(num_classes=0), "vit_small_patch14_reg4_dinov2", "test",
                         []).pooling == "token"


@pytest.mark.parametrize("key", sorted(FAMILY_CONFIGS))
def test_forward_outputs_returns_exactly_what_is_asked(key):
    model = make_model(FAMILY_CONFIGS[key])
    x = torch.randn(2, 3, 40, 24)
    names = available_outputs(model.config)
    with torch.no_grad():
        everything = model.forward_outputs(x, list(reversed(names)))
        assert list(everything) == list(names)  # canonical order, whatever the order asked
        default = model(x)
        for name in names:
            alone = model.forward_outputs(x, [name])
            assert list(alone) == [name]
            torch.testing.assert_close(alone[name], everything[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(default, everything[default_outputs(model.config)[0]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="has no logits output" if "logits" not in names else "unknown output"):
        model.forward_outputs(x, ["logits" if "logits" not in names else "embeddings"])


@pytest.mark.parametrize("key", ["deit_distilled", "siglip", "clip"])
def test_fp16_policy_reaches_the_attention_pool_and_every_norm(key):
    model = make_model(FAMILY_CONFIGS[key])
    half = prepare_model(model, "fp16", fp32_ops=("LayerNormalization", "Softmax"))
    attentions = [m for m in half.modules() if isinstance(m, Attention)]
    assert any(isinstance(m, AttentionPool) for m in attentions) == (key == "siglip")
    assert all(not m.fused and m.softmax_dtype == torch.float32 for m in attentions)
    assert all(m.compute_dtype == torch.float32 for m in half.modules() if isinstance(m, LayerNorm))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        got = half(x.half()).float()
    assert float(torch.nn.functional.cosine_similarity(got, reference).min()) > 0.999


# --------------------------------------------------------------------------- the registry against timm

# A few of each family, and every CLIP and SigLIP tower (whose activation the weights cannot show):
# vitdeploy's count equals timm's own model of the same name.
TIMM_NAMES = ["deit_small_patch16_224", "deit_base_distilled_patch16_384", "deit3_large_patch16_384",
              "deit3_medium_patch16_224", "deit3_huge_patch14_224", "vit_base_r50_s16_384", "vit_tiny_r_s16_p8_224",
              "vit_small_r26_s32_384", "vit_base_r26_s32_224", "vit_large_r50_s32_224", "vit_huge_patch14_gap_224",
              "vit_huge_patch16_gap_448", "vit_giant_patch16_gap_224",
              "vit_small_patch14_dinov2", "vit_large_patch14_reg4_dinov2", "vit_intern300m_patch14_448",
              *sorted(name for name in VARIANTS if "_radio_" in name),
              *sorted(name for name, config in VARIANTS.items() if config.provenance.family in ("clip", "siglip"))]
TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}


@needs_timm
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_parameter_counts_and_shapes_equal_timm(name):
    config = get_config(name)
    kwargs = {"num_classes": config.projection_dim} if config.projection_dim else {}
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, **kwargs)
        ours = VisionTransformer(config)
    theirs = {k: tuple(v.shape) for k, v in stem_only_backbone_as_stem(reference.state_dict()).items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    if config.projection_dim:  # timm's CLIP projection is a head with a (zero) bias; ours is proj, bias-free
        assert theirs.pop("head.weight") == mine.pop("proj.weight") and theirs.pop("head.bias") == (
            config.projection_dim,)
    assert mine == theirs
    assert reference.patch_embed.img_size[0] == config.image_size
    act = reference.blocks[0].mlp.act
    assert TIMM_ACTIVATIONS[type(act).__name__] + ("_tanh" if getattr(act, "approximate", "none") == "tanh" else "") \
        == config.act
    assert reference.blocks[0].norm1.eps == config.layer_norm_eps
    assert reference.blocks[0].attn.num_heads == config.num_heads
    assert reference.global_pool == config.pooling
    assert reference.norm_pre.__class__.__name__ == ("LayerNorm" if config.pre_norm else "Identity")


@needs_timm
@pytest.mark.parametrize("name", ["deit3_huge_patch14_224", "vit_gigantic_patch14_clip_224", "vit_huge_patch14_gap_224"])
def test_a_bare_state_dict_takes_the_heads_of_the_variant_its_shapes_match(name):
    """Heads leave no trace in the tensors and these widths suggest 20 or 26 (timm: 16): the variant
    the shapes match lends its heads, which are not said to be guessed."""
    import warnings

    from vitdeploy.checkpoints.common import CheckpointWarning, infer_config

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    state = dict(reference.state_dict())
    if "clip" in name:  # timm's CLIP projection is a head with a zero bias (no values on the meta device)
        state["proj.weight"] = state.pop("head.weight")
        del state["head.bias"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        config, _ = infer_config(state, name)
    assert (config.provenance.name, config.num_heads) == (name, reference.blocks[0].attn.num_heads) == (name, 16)
    assert not [w for w in caught if "heads" in str(w.message)]  # (a CLIP tower's activation is still said)


def test_registry_leaves_out_what_it_cannot_build():
    assert VARIANTS["vit_giant_patch14_dinov2"].mlp_type == "swiglu"  # built since the MLP is a part
    assert "vit_so400m_patch14_siglip_384" not in VARIANTS  # 384 is no multiple of 14
    assert "vit_so400m_patch14_siglip_gap_384" not in VARIANTS
    if timm is not None:  # every other SigLIP tower timm defines is registered (NaFlex is another input form)
        assert {n for n in timm.list_models("*siglip*") if not n.startswith("naflex")
                and ("patch14_siglip" not in n or n.endswith(("_224", "_378", "_448", "_896")))} <= set(VARIANTS)
    # every family name has variants (the registered families included)
    assert {c.provenance.family for c in VARIANTS.values()} == set(FAMILY_NAMES)
    assert {"vit", "deit", "deit3", "dinov2", "clip", "siglip"} < set(FAMILY_NAMES)


# --------------------------------------------------------------------------- model= forces an architecture


def test_model_override_forces_a_registry_architecture(tmp_path):
    torch.manual_seed(0)
    source = VisionTransformer(get_config("vit_tiny_patch16_224", depth=12)).eval()
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert load_model(path).config.provenance.name == "vit_tiny_patch16_224"  # plain ViT first: DeiT has the same shapes
    deit = load_model(path, model="deit_tiny_patch16_224")
    assert (deit.config.provenance.name, deit.config.provenance.family, deit.config.preprocessing.mean) == ("deit_tiny_patch16_224", "deit",
                                                                        (0.485, 0.456, 0.406))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(deit(x), source(x), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError,
                       match=r"missing 3: dist_token, head_dist\.weight, head_dist\.bias; wrong shape 1: pos_embed"):
        load_model(path, model="deit_tiny_distilled_patch16_224")
    resolved = resolve_source(str(path), model="deit_tiny_patch16_224")
    assert resolved.model.config.provenance.name == "deit_tiny_patch16_224"
    assert any("forced to deit_tiny_patch16_224" in n for n in resolved.notes)
    with pytest.raises(ValueError, match="unknown model variant 'deit_huge' for model="):
        load_model(path, model="deit_huge")
    with pytest.raises(ValueError, match="is a variant name already"):
        resolve_source("vit_tiny_patch16_224", model="deit_tiny_patch16_224")


def test_an_unsupported_file_names_the_closest_family(tmp_path):
    """DINOv2 giant's SwiGLU MLP (w12/w3) is no block vitdeploy has: one line says what is closest."""
    with torch.device("meta"):
        model = VisionTransformer(get_config("vit_small_patch14_dinov2", depth=2, hidden_size=64, num_heads=2,
                                             mlp_size=128, image_size=28))
    tensors = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if ".mlp.fc" not in k}
    for block in range(2):
        tensors[f"blocks.{block}.mlp.w12.weight"] = torch.zeros(256, 64)
        tensors[f"blocks.{block}.mlp.w3.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(tmp_path / "swiglu.safetensors"))
    with pytest.raises(CheckpointError, match=r"closest supported family: dinov2 \(like vit_\w+_patch14_dinov2\): "
                                              r"it lacks blocks\.\*\.mlp\.fc1\.bias, .*; has blocks\.\*\.mlp\.w12"):
        load_model(tmp_path / "swiglu.safetensors", num_heads=2)


def test_a_clip_tower_fine_tuned_as_a_classifier_keeps_its_head(tmp_path):
    """A biased head on a CLIP tower is a classifier (timm's *_clip_224.*_ft_in1k), not the projection."""
    config = FAMILY_CONFIGS["clip"].replace(projection_dim=None, num_classes=10, act="gelu")
    source = make_model(config)
    with torch.no_grad():
        source.head.bias.normal_()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "ft.safetensors"))
    with pytest.warns(Warning, match="QuickGELU"):
        loaded = load_model(tmp_path / "ft.safetensors", num_heads=4)
    assert (loaded.config.num_classes, loaded.config.projection_dim, loaded.config.provenance.family) == (10, None, "clip")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=1e-5)


def test_strict_loading_resamples_a_patch_only_grid(tmp_path):
    """A checkpoint grid other than the config's is resampled with the register tokens kept out of it."""
    from vitdeploy.checkpoints.common import load_strict
    from vitdeploy.pos_embed import resample_pos_embed

    source = make_model(FAMILY_CONFIGS["dinov2_reg"])  # 4x4 grid, position embeddings for the patches only
    target = VisionTransformer(FAMILY_CONFIGS["dinov2_reg"].replace(image_size=48)).eval()
    notes: list[str] = []
    with pytest.warns(Warning, match="resampled position embeddings 4x4 → 6x6"):
        load_strict(target, dict(source.state_dict()), "test", notes=notes)
    expected = resample_pos_embed(source.pos_embed.detach(), (6, 6), (4, 4), 0, method="timm")
    torch.testing.assert_close(target.pos_embed.detach(), expected, rtol=0, atol=0)


def test_variant_names_get_layer_scales_of_trained_size_not_the_training_init():
    from vitdeploy.checkpoints import RANDOM_LAYER_SCALE, resolve_source
    from vitdeploy.model import LayerScale

    resolved = resolve_source("deit3_small_patch16_224", log=lambda line: None)
    gammas = [m.gamma.detach() for m in resolved.model.modules() if isinstance(m, LayerScale)]
    assert len(gammas) == 2 * resolved.model.config.depth
    assert all(float(g.min()) == float(g.max()) == pytest.approx(RANDOM_LAYER_SCALE) for g in gammas)
    assert resolved.model.config.layer_scale != RANDOM_LAYER_SCALE  # the config keeps timm's init value
