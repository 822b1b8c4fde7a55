"""Analytic FLOP counts of the forward pass (pure Python, no torch).

FLOPs are 2 x multiply-accumulates of the convolutions and matrix products (patch embedding,
hybrid backbone, position-embedding resampling away from the native grid, qkv, attention scores,
attention x values, projections, MLP, attention pool, pre-logits, heads, visual projection).
Normalisation, softmax, GELU and additions are left out, as timm and the paper do; they are
well under 1% of the total for every variant.
"""

from __future__ import annotations

from collections.abc import Iterator

from vitdeploy.config import HybridConfig, ViTConfig
from vitdeploy.pos_embed import resample_macs


def _bottlenecks(hybrid: HybridConfig) -> Iterator[tuple[int, int, int, int]]:
    """``(in_channels, mid, out, stride)`` of every bottleneck block of the ResNet-v2 backbone, in order."""
    channels = hybrid.stem_width * hybrid.width_factor
    for index, depth in enumerate(hybrid.layers):
        out = 256 * hybrid.width_factor * 2**index
        for block in range(depth):
            yield channels, out // 4, out, 2 if index > 0 and block == 0 else 1
            channels = out


def _backbone_macs(hybrid: HybridConfig, in_channels: int, height: int, width: int) -> tuple[int, int, int]:
    """MACs of the ResNet-v2 backbone, and its output height and width."""
    h, w = height // 2, width // 2
    stem_width = hybrid.stem_width * hybrid.width_factor
    macs = h * w * stem_width * in_channels * 7 * 7
    h, w = h // 2, w // 2  # max-pool
    for channels, mid, out, stride in _bottlenecks(hybrid):
        out_h, out_w = h // stride, w // stride
        macs += h * w * channels * mid  # conv1 1x1 at the input resolution
        macs += out_h * out_w * mid * mid * 9  # conv2 3x3, strided
        macs += out_h * out_w * mid * out  # conv3 1x1
        if stride != 1 or channels != out:
            macs += out_h * out_w * channels * out  # projection shortcut
        h, w = out_h, out_w
    return macs, h, w


def count_macs(config: ViTConfig, height: int | None = None, width: int | None = None,
               class_token_last_block: bool = False) -> int:
    """Multiply-accumulates of one image's forward pass at ``height`` x ``width``.

    ``class_token_last_block`` counts the last block as exported token-pooling models compute it
    (``model(x, class_token_last_block=True)``): k and v for every token, the rest for the pooled
    prefix tokens (the class token, and the distillation token of DeiT). Counted: every output
    the model has (both DeiT heads, CLIP's projection, SigLIP's attention pool).
    """
    height = config.image_size if height is None else height
    width = height if width is None else width
    if height % config.stride or width % config.stride:
        raise ValueError(f"input {height}x{width} is not a multiple of the patch stride {config.stride}")
    macs = 0
    channels, h, w = config.in_channels, height, width
    if config.hybrid is not None:
        backbone, h, w = _backbone_macs(config.hybrid, channels, h, w)
        macs += backbone
        channels = config.hybrid.out_channels
    grid_h, grid_w = h // config.patch_size, w // config.patch_size
    patches = grid_h * grid_w
    dim = config.hidden_size
    macs += patches * channels * config.patch_size**2 * dim
    if config.abs_pos_embed:
        macs += resample_macs(config.grid_size, (grid_h, grid_w), dim, config.pos_embed_resample)
    tokens = config.num_prefix_tokens + patches
    # SwiGLU's fc1 is twice as wide (gate and value); RoPE's rotation is elementwise and not counted
    fc1_width = 2 * config.mlp_size if config.mlp_type == "swiglu" else config.mlp_size

    def block(queries: int) -> int:
        return (
            tokens * dim * 2 * dim + queries * dim * dim  # k, v for every token; q for the queries
            + 2 * queries * tokens * dim  # q @ k^T and attn @ v over all heads
            + queries * dim * dim  # output projection
            + queries * dim * (fc1_width + config.mlp_size)  # fc1 + fc2
        )

    num_queries = config.num_pooled_prefix_tokens
    if class_token_last_block and not num_queries:
        raise ValueError(f"class_token_last_block needs pooling 'token', not {config.pooling!r}")
    class_token_blocks = 1 if class_token_last_block else 0
    macs += (config.depth - class_token_blocks) * block(tokens) + class_token_blocks * block(num_queries)
    if config.pooling == "map":  # one latent query over every token, then proj and the (GELU) MLP
        macs += tokens * dim * 2 * dim + 2 * tokens * dim + dim * dim
        if config.pool_form == "latent":  # the query projection and the MLP (AIMv2's head has neither)
            macs += dim * dim + 2 * dim * config.mlp_size
    head_in = config.pooled_size
    if config.representation_size:
        macs += dim * config.representation_size
    macs += head_in * config.num_classes * (2 if config.distilled else 1)
    macs += head_in * (config.projection_dim or 0)
    return macs


def count_flops(config: ViTConfig, height: int | None = None, width: int | None = None,
                class_token_last_block: bool = False) -> int:
    """FLOPs (2 x MACs) of one image's forward pass (see :func:`count_macs`)."""
    return 2 * count_macs(config, height, width, class_token_last_block)


def _backbone_params(hybrid: HybridConfig, in_channels: int) -> int:
    """Parameters of the ResNet-v2 backbone: bias-free convs and GroupNorm affines."""
    stem_width = hybrid.stem_width * hybrid.width_factor
    params = stem_width * in_channels * 7 * 7 + 2 * stem_width
    for channels, mid, out, stride in _bottlenecks(hybrid):
        params += channels * mid + 2 * mid + mid * mid * 9 + 2 * mid + mid * out + 2 * out
        if stride != 1 or channels != out:
            params += channels * out + 2 * out  # projection conv + its GroupNorm
    return params


def count_params(config: ViTConfig) -> int:
    """Exact parameter count of the model ``config`` describes (no torch, no memory)."""
    dim = config.hidden_size
    channels = config.in_channels
    params = 0
    if config.hybrid is not None:
        params += _backbone_params(config.hybrid, channels)
        channels = config.hybrid.out_channels
    params += channels * config.patch_size**2 * dim + (dim if config.patch_bias else 0)  # patch projection
    params += config.num_prefix_tokens * dim  # class, distillation and register tokens
    grid_h, grid_w = config.grid_size
    if config.abs_pos_embed:
        params += (config.num_pos_prefix_tokens + grid_h * grid_w) * dim  # position embeddings
    norm = 2 * dim if config.norm == "layernorm" else dim  # RMSNorm has no bias
    params += norm if config.pre_norm else 0
    params += norm if config.patch_norm else 0
    qkv_bias = 3 * dim if config.qkv_bias else 2 * dim if config.qv_bias else 0
    mlp = dim * config.mlp_size + config.mlp_size + config.mlp_size * dim + dim  # fc1, fc2
    fc1_width = 2 * config.mlp_size if config.mlp_type == "swiglu" else config.mlp_size
    biases = fc1_width + dim if config.proj_bias else 0
    block_mlp = (dim * fc1_width + config.mlp_size * dim + biases
                 + (norm // dim * config.mlp_size if config.mlp_norm else 0))  # fc1, fc2, the hidden norm
    block = (norm  # norm1
             + dim * 3 * dim + qkv_bias + dim * dim + (dim if config.proj_bias else 0)  # qkv, proj
             + (norm if config.attn_norm else 0)  # the norm before proj (EVA-02 CLIP)
             + norm + block_mlp  # norm2, MLP
             + (2 * dim if config.layer_scale else 0))  # ls1, ls2
    params += config.depth * block + (norm if config.final_norm else 0)  # blocks, the final norm (or fc_norm)
    if config.pooling == "map":  # latent, q, kv, proj, norm, MLP (AIMv2's head: latent, kv, proj)
        params += dim + (2 * dim * dim + 2 * dim) + (dim * dim + dim)
        params += (dim * dim + dim) + norm + mlp if config.pool_form == "latent" else 0
    head_in = config.pooled_size
    if config.representation_size:
        params += dim * config.representation_size + config.representation_size
    if config.num_classes > 0:
        params += (head_in * config.num_classes + config.num_classes) * (2 if config.distilled else 1)
    params += head_in * (config.projection_dim or 0)
    return params
