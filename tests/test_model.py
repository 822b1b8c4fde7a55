"""The model family: exact parameter counts, dynamic resolution, clear errors, fine-tuning helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, tiny_config, tiny_hybrid_config

from vitdeploy import create_model, list_variants
from vitdeploy.config import ViTConfig
from vitdeploy.model import VisionTransformer
from vitdeploy.variants import get_config, paper_size


def meta_param_count(name: str, **overrides) -> int:
    with torch.device("meta"):
        model = VisionTransformer(get_config(name, **overrides))
    return sum(p.numel() for p in model.parameters())


# Exact counts of timm's models of the same name with 1000 classes (timm 1.0.x).
TIMM_PARAMETER_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch8_224": 22_055_272,
    "vit_base_patch16_224": 86_567_656,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch32_384": 306_632_680,
    "vit_huge_patch14_224": 632_045_800,
    "vit_base_r50_s16_224": 98_659_112,
    "vit_base_r50_s16_384": 98_950_952,
}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMETER_COUNTS))
def test_parameter_counts_equal_timm(name: str) -> None:
    assert meta_param_count(name) == TIMM_PARAMETER_COUNTS[name]


@pytest.mark.parametrize(("name", "paper_millions"), [
    ("vit_base_patch16_224", 86), ("vit_large_patch16_224", 307), ("vit_huge_patch14_224", 632)])
def test_paper_table1_sizes(name: str, paper_millions: int) -> None:
    assert paper_size(name)[1] == paper_millions
    # Table 1 rounds; the exact count with a 1000-class head is within 1% of it.
    assert abs(meta_param_count(name) / 1e6 - paper_millions) / paper_millions < 0.01


def test_registry_has_paper_variants() -> None:
    names = set(list_variants())
    for name in ("vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
                 "vit_large_patch16_224", "vit_huge_patch14_224", "vit_base_r50_s16_384",
                 "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_r50_s16_224"):
        assert name in names
    with pytest.raises(ValueError, match="unknown model variant 'vit_gigantic'"):
        create_model("vit_gigantic")


def test_create_model_overrides() -> None:
    model = create_model("vit_tiny_patch16_224", num_classes=7, image_size=64, depth=1)
    assert model.config.num_classes == 7 and model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="unknown model overrides"):
        create_model("vit_tiny_patch16_224", hidden=3)


@pytest.mark.parametrize("make_config", [tiny_config, tiny_hybrid_config])
def test_any_multiple_of_the_stride_works(make_config) -> None:
    model = make_model(make_config())
    stride, native = model.config.stride, model.config.image_size
    with torch.no_grad():
        for height, width in [(native, native), (stride, 3 * stride), (2 * native, native + stride)]:
            logits = model(torch.randn(2, 3, height, width))
            assert logits.shape == (2, 10)
            features = model.forward_features(torch.randn(1, 3, height, width))
            assert features.shape == (1, model.config.seq_len(height, width), 64)


@pytest.mark.parametrize(("make_config", "size", "stride"), [
    (tiny_config, (33, 32), 8), (tiny_config, (32, 20), 8), (tiny_hybrid_config, (64, 72), 16)])
def test_bad_size_raises_clear_error(make_config, size, stride) -> None:
    model = make_model(make_config())
    bad = size[0] if size[0] % stride else size[1]
    with pytest.raises(ValueError, match=rf"{bad} is not a positive multiple of the .*{stride}"):
        model(torch.randn(1, 3, *size))


def test_wrong_channels_raise() -> None:
    model = make_model(tiny_config())
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\], got shape \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


def test_forward_uses_resampled_position_embeddings() -> None:
    """A model fine-tuned at 2x (set_image_size) equals the original run at 2x on the fly."""
    model = make_model(tiny_config())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dynamic = model(x)
        model.set_image_size(64)
        assert model.pos_embed.shape == (1, 1 + 8 * 8, 64) and model.config.image_size == 64
        torch.testing.assert_close(model(x), dynamic, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image_size 60 is not a positive multiple of the patch stride 8"):
        model.set_image_size(60)


def test_reset_head_is_zero_initialised() -> None:
    model = make_model(tiny_config())
    model.reset_head(3)
    assert model.config.num_classes == 3
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    with torch.no_grad():
        assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 3))


def test_dropout_and_drop_path_only_in_training() -> None:
    model = make_model(tiny_config(dropout=0.5, drop_path=0.5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert not torch.equal(first, model(x))


def test_explicit_attention_matches_sdpa() -> None:
    model = make_model(tiny_config())
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        fused = model(x)
        model.set_precision_policy(fused_attention=False)
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)


def test_fp16_precision_policy_keeps_layernorm_and_softmax_in_fp32() -> None:
    model = make_model(tiny_config())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model.half().set_precision_policy({"LayerNormalization", "Softmax"}, fused_attention=False)
        seen: list[torch.dtype] = []
        hook = model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        logits = model(x.half())
        hook.remove()
    assert logits.dtype == torch.float16 and seen == [torch.float16]
    cosine = F.cosine_similarity(logits.float(), reference).min()
    assert cosine > 0.999
    with pytest.raises(ValueError, match="unknown fp32 ops"):
        model.set_precision_policy({"Gelu"})


def test_avg_pooling_and_pre_logits() -> None:
    model = make_model(tiny_config(pooling="avg", representation_size=32))
    assert model.cls_token is None and model.pos_embed.shape[1] == 16
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    assert model.pre_logits.fc.out_features == 32


def test_config_validation_and_json_round_trip() -> None:
    config = tiny_hybrid_config()
    assert ViTConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="hidden_size 65 is not divisible by num_heads 4"):
        tiny_config(hidden_size=65)
    with pytest.raises(ValueError, match="image_size 36 is not a multiple of the total stride 8"):
        tiny_config(image_size=36)
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        ViTConfig.from_dict({"hidden": 3})


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_from_the_first_queries_equals_the_first_rows(fused: bool, qkv_bias: bool) -> None:
    model = make_model(tiny_config(qkv_bias=qkv_bias))
    model.set_precision_policy(fused_attention=fused)
    attention = model.blocks[0].attn
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        every = attention(x)
        for queries in (1, 5):
            first = attention(x, num_queries=queries)
            assert first.shape == (2, queries, 64)
            torch.testing.assert_close(first, every[:, :queries], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("make_config", "size"), [
    (tiny_config, (32, 32)), (tiny_config, (48, 24)), (tiny_hybrid_config, (64, 96)),
])
def test_forward_with_a_class_token_last_block_equals_forward(make_config, size) -> None:
    model = make_model(make_config())
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        reference = model(x)
        features = model.forward_features(x, class_token_last_block=True)
        logits = model(x, class_token_last_block=True)
    assert features.shape == (3, 1, model.config.hidden_size)
    torch.testing.assert_close(features[:, 0], model.forward_features(x)[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_class_token_last_block_under_the_fp16_policy_and_with_mean_pooling() -> None:
    model = make_model(tiny_config())
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        model.half().set_precision_policy({"LayerNormalization", "Softmax"}, fused_attention=False)
        pruned = model(x.half(), class_token_last_block=True)
        torch.testing.assert_close(pruned, model(x.half()), rtol=0, atol=2e-3)
    pooled = make_model(tiny_config(pooling="avg"))
    with torch.no_grad():
        # nothing to prune: every token is pooled
        assert torch.equal(pooled(x, class_token_last_block=True), pooled(x))
    with pytest.raises(ValueError, match="class_token_last_block needs pooling 'token'.*'avg'"):
        pooled.forward_features(x, class_token_last_block=True)
