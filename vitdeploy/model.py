"""The Vision Transformer (Dosovitskiy et al. 2020) in PyTorch, laid out like timm's.

Parameter names match timm's ``VisionTransformer`` (its DeiT ``VisionTransformerDistilled``, its
DINOv2, CLIP and SigLIP configurations, and its hybrid ``HybridEmbed``), so a timm state dict
loads without renaming. The forward pass accepts any input size that is a
multiple of the patch stride and resamples the position embeddings to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.config import ACTIVATIONS, ViTConfig
from vitdeploy.constants import DEFAULT_FP32_OPS, POLICY_OPS, torch_dtype
from vitdeploy.outputs import (
    IMAGE_EMBEDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    PATCH_TOKENS,
    POOLER_OUTPUT,
    VECTOR_OUTPUTS,
    check_outputs,
    default_outputs,
)
from vitdeploy.pos_embed import resample_pos_embed, sincos_pos_embed
from vitdeploy.resnetv2 import ResNetV2
from vitdeploy.rope import RopeSpec, apply_rope, rope_sin_cos
from vitdeploy.variants import get_config


class LayerNorm(nn.LayerNorm):
    """LayerNorm that can compute in a wider dtype than its input (the fp16 precision policy)."""

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_dtype is None or x.dtype == self.compute_dtype:
            return super().forward(x)
        dtype = self.compute_dtype
        out = F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (no centring, no bias), computing in a wider dtype
    than its input when the precision policy asks (as :class:`LayerNorm`)."""

    compute_dtype: torch.dtype | None = None

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        wide = x.to(dtype)
        out = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dtype)
        return out.to(x.dtype)


def make_norm(config: ViTConfig, dim: int | None = None) -> nn.Module:
    """The model's norm (``config.norm``) over ``dim`` (default the hidden size), its epsilon from the config."""
    dim = config.hidden_size if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.layer_norm_eps)
    return LayerNorm(dim, eps=config.layer_norm_eps)


class PatchEmbed(nn.Module):
    """Image → token sequence: a conv with stride = patch (after the ResNet for hybrids)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.backbone = ResNetV2(config.hybrid, config.in_channels) if config.hybrid else None
        in_channels = self.backbone.out_channels if self.backbone else config.in_channels
        self.proj = nn.Conv2d(in_channels, config.hidden_size, config.patch_size, stride=config.patch_size,
                              bias=config.patch_bias)
        self.norm = make_norm(config) if config.patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.backbone is not None:
            x = self.backbone(x)
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class Attention(nn.Module):
    """Multi-head attention of queries over keys and values: what every attention layer shares.

    Eager inference uses ``F.scaled_dot_product_attention``. The explicit path (for export, and
    for the fp16 policy that keeps softmax in fp32) scales Q, then MatMul → Softmax → MatMul,
    the pattern TensorRT's fused multi-head attention recognises. ``fused`` and ``softmax_dtype``
    are set by :meth:`VisionTransformer.set_precision_policy` (and the exporter) on every subclass.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = config.attention_dropout
        self.fused = True
        self.softmax_dtype: torch.dtype | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q kᵀ / sqrt(d)) v`` for ``[batch, heads, tokens, head_dim]`` tensors."""
        if self.fused and self.softmax_dtype is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        # Cast before the softmax (not softmax(dtype=...)): the exporter turns the latter into
        # an fp16 Softmax followed by a Cast, which would defeat the fp32 policy.
        if self.softmax_dtype is not None:
            attn = attn.to(self.softmax_dtype)
        attn = attn.softmax(dim=-1).to(v.dtype)
        attn = F.dropout(attn, self.attn_drop, self.training)
        return attn @ v


# sin and cos of a model's RoPE for the grid at hand, with the number of prefix tokens they skip.
Rope = tuple[torch.Tensor, torch.Tensor, int]


class SelfAttention(Attention):
    """Multi-head self-attention with a fused qkv projection (timm's ``Attention``), with EVA's
    separate q/v biases (``qv_bias``), EVA-CLIP's norm before the output projection (``attn_norm``) and 2-D RoPE on the patch tokens' queries and keys where the
    config has them (timm's ``EvaAttention``/``AttentionRope``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)
        if config.qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(hidden))
            self.v_bias = nn.Parameter(torch.zeros(hidden))
        else:
            self.q_bias = self.v_bias = None
        self.norm = make_norm(config) if config.attn_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden, bias=config.proj_bias)
        self.proj_drop = nn.Dropout(config.dropout)
        spec = config.rope_spec
        self.rope_half = spec.rotate_half if spec is not None else False

    def _qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def _rotate(self, t: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        if rope is None:
            return t
        sin, cos, start = rope
        return apply_rope(t, sin, cos, self.rope_half, start)

    def forward(self, x: torch.Tensor, num_queries: int | None = None, rope: Rope | None = None) -> torch.Tensor:
        """Attend from every token, or only from the first ``num_queries`` tokens (keys and values
        still come from all of them); the output has one row per query. ``rope`` rotates the
        queries and keys of the tokens after its prefix count."""
        batch, tokens, channels = x.shape
        if num_queries is None:
            queries = tokens
            qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
            qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q = self._rotate(q, rope)
        else:
            queries = num_queries
            q, k, v = self._project_subset(x, num_queries)
            if rope is not None and num_queries > rope[2]:
                raise ValueError(f"{num_queries} queries reach past the {rope[2]} prefix tokens RoPE skips")
        k = self._rotate(k, rope)
        x = self.attend(q, k, v).transpose(1, 2).reshape(batch, queries, channels)
        return self.proj_drop(self.proj(self.norm(x)))

    def _project_subset(self, x: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, ...]:
        """q for the first ``num_queries`` tokens, k and v for all: the qkv projection split in two."""
        batch, tokens, channels = x.shape
        # Slices, not split(): the exporter folds a Slice of a weight into a constant, not a Split.
        weight_q, weight_kv = self.qkv.weight[:channels], self.qkv.weight[channels:]
        bias = self._qkv_bias()
        bias_q, bias_kv = (bias[:channels], bias[channels:]) if bias is not None else (None, None)
        q = F.linear(x[:, :num_queries], weight_q, bias_q)
        q = q.reshape(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        kv = F.linear(x, weight_kv, bias_kv).reshape(batch, tokens, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """The MLP activation ``name`` (one of :data:`vitdeploy.config.ACTIVATIONS`)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


class Mlp(nn.Module):
    """Linear → activation (``config.act``) → [norm] → Linear."""

    def __init__(self, config: ViTConfig, norm: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.mlp_size, bias=bias)
        self.act = make_activation(config.act)
        self.norm = make_norm(config, config.mlp_size) if norm else nn.Identity()
        self.fc2 = nn.Linear(config.mlp_size, config.hidden_size, bias=bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.norm(self.drop(self.act(self.fc1(x))))))


class SwiGLU(nn.Module):
    """``fc2(norm(silu(gate) * value))`` with ``[gate; value] = fc1(x)`` packed in one Linear (timm's
    ``SwiGLUPacked``/``GluMlp(gate_last=False)``; split checkpoints are packed by their loaders), the
    norm over the hidden width optional (EVA-02's scale-norm)."""

    def __init__(self, config: ViTConfig, norm: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.mlp_size, bias=bias)
        self.act = nn.SiLU()
        self.norm = make_norm(config, config.mlp_size) if norm else nn.Identity()
        self.fc2 = nn.Linear(config.mlp_size, config.hidden_size, bias=bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        size = hidden.shape[-1] // 2
        # Slices, not chunk(): a Split with a computed size is what some parsers mishandle.
        x = self.act(hidden[..., :size]) * hidden[..., size:]
        return self.drop(self.fc2(self.norm(self.drop(x))))


MLPS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLU}


def make_mlp(config: ViTConfig) -> nn.Module:
    """The block MLP the config chooses (``mlp_type``, with ``mlp_norm``)."""
    return MLPS[config.mlp_type](config, norm=config.mlp_norm, bias=config.proj_bias)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT/DeiT III/DINOv2), initialised to ``init``."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, in training only."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm Transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)), each branch
    optionally LayerScaled."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = SelfAttention(config)
        self.ls1 = LayerScale(config.hidden_size, config.layer_scale) if config.layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)
        self.ls2 = LayerScale(config.hidden_size, config.layer_scale) if config.layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, num_queries: int | None = None, rope: Rope | None = None) -> torch.Tensor:
        """All tokens out, or only the first ``num_queries`` (each still attends to every token)."""
        if num_queries is None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope)))
        else:
            attended = self.attn(self.norm1(x), num_queries=num_queries, rope=rope)
            x = x[:, :num_queries] + self.drop_path1(self.ls1(attended))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPool(Attention):
    """SigLIP's attention-pool ("MAP") head, timm's ``AttentionPoolLatent``: one learned latent query
    attends over the patch tokens, then a projection and a residual LayerNorm → MLP."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        if config.pool_heads:
            self.num_heads = config.pool_heads
            self.head_dim = hidden // config.pool_heads
            self.scale = self.head_dim**-0.5
        self.latent = nn.Parameter(torch.zeros(1, 1, hidden))
        latent = config.pool_form == "latent"  # "aimv2": no query projection, no residual norm -> MLP
        self.q = nn.Linear(hidden, hidden) if latent else None
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm = make_norm(config) if latent else None
        self.mlp = Mlp(config) if latent else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, tokens, D]`` → ``[N, D]``."""
        batch, tokens, channels = x.shape
        # the latent's query is the same for every image: project it once, then broadcast it
        query = self.q(self.latent) if self.q is not None else self.latent
        q = query.reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2).expand(batch, -1, -1, -1)
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        x = self.proj(self.attend(q, k, v).transpose(1, 2).reshape(batch, 1, channels))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        return x[:, 0]


class PreLogits(nn.Module):
    """Optional representation layer (Linear + tanh) of models pre-trained on ImageNet-21k."""

    def __init__(self, hidden_size: int, representation_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, representation_size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding + prefix tokens + position embeddings → pre-norm encoder → norm → pooling → head.

    One definition for every family; each architectural concept is one config field:
    ``class_token``, ``distilled`` (DeiT's distillation token and ``head_dist``), ``num_reg_tokens``
    (DINOv2's registers), ``no_embed_class``, ``layer_scale``, ``pre_norm`` (CLIP), ``pooling``
    (token, avg, SigLIP's attention pool ``map``, DINOv2 classifiers' ``token_avg``), ``fc_norm``,
    ``act``, ``patch_bias`` and ``projection_dim`` (CLIP's visual projection ``proj``). Tokens are
    ordered class, distillation, registers, patches, as in timm, and the parameter names are timm's.

    The parts of the 2025-26 families are config fields too: position information (``abs_pos_embed``,
    ``rope`` with its parameters: :mod:`vitdeploy.rope`), the MLP (``mlp_type`` GELU-family or SwiGLU,
    ``mlp_norm``), the norm (``norm``: LayerNorm or RMSNorm; ``patch_norm``, ``final_norm``), EVA's
    ``qv_bias``, ``proj_bias`` and the attention pool's ``pool_heads`` (:mod:`vitdeploy.families`).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.has_class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, config.num_reg_tokens, hidden)) if config.num_reg_tokens else None
        num_tokens = config.num_pos_prefix_tokens + config.grid_size[0] * config.grid_size[1]
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, hidden) * 0.02) if config.abs_pos_embed else None
        self.rope: RopeSpec | None = config.rope_spec
        self.pos_drop = nn.Dropout(config.dropout)
        self.norm_pre = make_norm(config) if config.pre_norm else nn.Identity()
        # Stochastic depth grows linearly with depth, as in timm.
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.Sequential(*[Block(config, rate) for rate in rates])
        self.norm = nn.Identity() if config.use_fc_norm or not config.final_norm else make_norm(config)
        self.attn_pool = AttentionPool(config) if config.pooling == "map" else None
        self.fc_norm = make_norm(config) if config.use_fc_norm and config.final_norm else nn.Identity()
        self.pre_logits: PreLogits | None = None
        if config.representation_size:
            self.pre_logits = PreLogits(hidden, config.representation_size)
        self.head = self._new_head(config.num_classes)
        self.head_dist = self._new_head(config.num_classes) if config.distilled else None
        self.proj = (nn.Linear(config.pooled_size, config.projection_dim, bias=False)
                     if config.projection_dim else None)
        self._init_weights()

    def _new_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.config.pooled_size, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.attn_pool is not None:
            nn.init.trunc_normal_(self.attn_pool.latent, std=self.config.hidden_size**-0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Grid of the stored position embeddings."""
        return self.config.grid_size

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ``ValueError`` unless ``height`` and ``width`` are multiples of the patch stride."""
        stride = self.config.stride
        for axis, size in (("height", height), ("width", width)):
            if size % stride or size <= 0:
                kind = "patch size" if self.config.hybrid is None else "total stride (backbone x patch)"
                raise ValueError(
                    f"input {axis} {size} is not a positive multiple of the {kind} {stride}; "
                    f"resize or crop the image to a multiple of {stride}"
                )

    def _embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, Rope | None]:
        """Patch tokens with the prefix tokens before them and the position embeddings added, and the
        RoPE sin/cos of this grid (None without RoPE)."""
        if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.in_channels:
                raise ValueError(
                    f"pixel_values must be [batch, {self.config.in_channels}, height, width], "
                    f"got shape {tuple(pixel_values.shape)}"
                )
            self.check_input_size(int(pixel_values.shape[2]), int(pixel_values.shape[3]))
        x, grid = self.patch_embed(pixel_values)
        rope = None
        if self.rope is not None:
            sin, cos = rope_sin_cos(self.rope, grid)
            rope = (sin.to(x.device), cos.to(x.device), self.config.num_prefix_tokens)
        if self.config.sincos_pos_embed:
            pos_embed = sincos_pos_embed(grid, self.config.hidden_size).to(device=x.device, dtype=x.dtype)
        elif self.pos_embed is None:
            pos_embed = None
        elif grid == self.grid_size and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            pos_embed = self.pos_embed  # resampling is the identity here; traced graphs keep it for every size
        else:
            pos_embed = resample_pos_embed(self.pos_embed, grid, self.grid_size, self.config.num_pos_prefix_tokens,
                                           method=self.config.pos_embed_resample)
        prefix = [token.expand(x.shape[0], -1, -1) for token in (self.cls_token, self.dist_token, self.reg_token)
                  if token is not None]
        if (self.config.no_embed_class or self.config.sincos_pos_embed) and pos_embed is not None:
            x = x + pos_embed
            x = torch.cat([*prefix, x], dim=1) if prefix else x
        else:
            x = torch.cat([*prefix, x], dim=1) if prefix else x
            x = x + pos_embed if pos_embed is not None else x
        return self.norm_pre(self.pos_drop(x)), rope

    def forward_features(self, pixel_values: torch.Tensor,
                         class_token_last_block: bool = False) -> torch.Tensor:
        """Encoder output after the final norm: ``[N, prefix + (H/p)(W/p), hidden]`` (before any
        ``fc_norm``: with one, the tokens are the last block's output, as in timm).

        ``class_token_last_block`` (token pooling only) returns only the tokens the head reads,
        ``[N, 1, hidden]`` (``[N, 2, hidden]`` with the distillation token), and computes the last
        block for them alone: nothing after the last attention mixes tokens, so the pooled outputs
        are the same while that block's MLP, projection and query work shrink to those tokens.
        Exported classifiers and embedders use it (see :meth:`forward`).
        """
        keep = self.config.num_pooled_prefix_tokens
        if class_token_last_block and not keep:
            raise ValueError(f"class_token_last_block needs pooling 'token', the model pools by "
                             f"{self.config.pooling!r}")
        x, rope = self._embed(pixel_values)
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, num_queries=keep if class_token_last_block and index == last else None, rope=rope)
        return self.norm(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``pooler_output`` from :meth:`forward_features`' tokens: the class token (the mean of class
        and distillation tokens for DeiT), the mean of the patch tokens, the attention pool, or the
        class token and the mean patch token side by side (``token_avg``: ``[N, 2 * hidden]``, what
        transformers' ``Dinov2ForImageClassification`` head reads; registers are left out of the
        mean), then ``fc_norm`` and the representation layer where the model has them."""
        pooling = self.config.pooling
        patches = features[:, self.config.num_prefix_tokens:]
        if pooling == "token":
            x = (features[:, 0] + features[:, 1]) / 2 if self.config.distilled else features[:, 0]
        elif pooling == "avg":
            x = patches.mean(dim=1)
        elif pooling == "token_avg":
            x = torch.cat([features[:, 0], patches.mean(dim=1)], dim=1)
        else:
            x = self.attn_pool(features if self.config.pool_include_prefix else patches)
        x = self.fc_norm(x)
        return self.pre_logits(x) if self.pre_logits is not None else x

    def _logits(self, features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.head_dist is not None:  # DeiT: the mean of the class-token and distillation-token heads
            return (self.head(features[:, 0]) + self.head_dist(features[:, 1])) / 2
        return self.head(pooled)

    def _vector_outputs(self, features: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        pooled = self.pool(features)
        outputs = {}
        if LOGITS in names:
            outputs[LOGITS] = self._logits(features, pooled)
        if POOLER_OUTPUT in names:
            outputs[POOLER_OUTPUT] = pooled
        if IMAGE_EMBEDS in names:
            outputs[IMAGE_EMBEDS] = self.proj(pooled)
        return outputs

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """The model's default output (:func:`vitdeploy.outputs.default_outputs`: logits for a
        classifier, else ``image_embeds`` with a projection, else ``pooler_output``) from its tokens."""
        (name,) = default_outputs(self.config)
        return self._vector_outputs(features, (name,))[name]

    def forward_outputs(self, pixel_values: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs ``names`` (:mod:`vitdeploy.outputs`; checked against the config), exactly those keys.

        When only per-image vectors are asked of a token-pooling model, the last block runs for
        the pooled prefix tokens only (see :meth:`forward_features`).
        """
        names = check_outputs(names, self.config)
        vectors_only = all(name in VECTOR_OUTPUTS for name in names)
        prune = vectors_only and self.config.num_pooled_prefix_tokens > 0
        features = self.forward_features(pixel_values, class_token_last_block=prune)
        outputs: dict[str, torch.Tensor] = {}
        if any(name in VECTOR_OUTPUTS for name in names):
            outputs.update(self._vector_outputs(features, names))
        if LAST_HIDDEN_STATE in names:
            outputs[LAST_HIDDEN_STATE] = features
        if PATCH_TOKENS in names:
            outputs[PATCH_TOKENS] = features[:, self.config.num_prefix_tokens:]
        return {name: outputs[name] for name in names}

    def forward(self, pixel_values: torch.Tensor, class_token_last_block: bool = False) -> torch.Tensor:
        """The model's default output (:meth:`forward_head`).

        ``class_token_last_block`` gives the same output computing only what it depends on: with
        token pooling the last block runs for the pooled prefix tokens alone (see
        :meth:`forward_features`); every other pooling (mean, attention, ``token_avg``) reads every
        token, so there it changes nothing.
        """
        prune = class_token_last_block and self.config.num_pooled_prefix_tokens > 0
        return self.forward_head(self.forward_features(pixel_values, class_token_last_block=prune))

    def reset_head(self, num_classes: int) -> None:
        """Replace the head (both heads of a distilled model) with zero-initialised ones for
        ``num_classes`` (fine-tuning, paper §3.2)."""
        param = next(self.parameters())
        heads = []
        for _ in range(2 if self.config.distilled else 1):
            head = self._new_head(num_classes)
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
            heads.append(head.to(device=param.device, dtype=param.dtype))
        self.head = heads[0]
        if self.config.distilled:
            self.head_dist = heads[1]
        self.config = self.config.replace(num_classes=num_classes, labels=None)

    @torch.no_grad()
    def set_image_size(self, image_size: int) -> None:
        """Resample the stored position embeddings to ``image_size`` for good (fine-tuning at a new size),
        by the config's ``pos_embed_resample`` convention."""
        stride = self.config.stride
        if image_size % stride or image_size <= 0:
            raise ValueError(f"image_size {image_size} is not a positive multiple of the patch stride {stride}")
        side = image_size // stride
        if self.pos_embed is not None:
            resampled = resample_pos_embed(self.pos_embed, (side, side), self.grid_size,
                                           self.config.num_pos_prefix_tokens, method=self.config.pos_embed_resample)
            self.pos_embed = nn.Parameter(resampled)
        crop_pct = self.config.preprocessing.crop_pct if image_size == self.config.image_size else 1.0
        self.config = self.config.replace(image_size=image_size, crop_pct=crop_pct)

    def set_precision_policy(self, fp32_ops: set[str] | None = None, fused_attention: bool | None = None) -> None:
        """Keep the named ops (``LayerNormalization``, ``Softmax``) in fp32 when the model runs in fp16/bf16.

        ``fused_attention=False`` selects the explicit MatMul → Softmax → MatMul attention.
        """
        fp32_ops = set(fp32_ops or ())
        unknown = fp32_ops - POLICY_OPS
        if unknown:
            raise ValueError(f"unknown fp32 ops {sorted(unknown)}; expected some of {sorted(POLICY_OPS)}")
        norm_dtype = torch.float32 if "LayerNormalization" in fp32_ops else None
        softmax_dtype = torch.float32 if "Softmax" in fp32_ops else None
        for module in self.modules():
            if isinstance(module, LayerNorm | RMSNorm):
                module.compute_dtype = norm_dtype
            elif isinstance(module, Attention):
                module.softmax_dtype = softmax_dtype
                if fused_attention is not None:
                    module.fused = fused_attention

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def create_model(name: str, **overrides: Any) -> VisionTransformer:
    """Build the variant ``name`` (timm naming) with random weights; ``overrides`` edit its config.

    ``image_size`` changes the native grid of the position embeddings.
    """
    config = get_config(name, **overrides)
    model = VisionTransformer(config)
    return model.eval()


def prepare_model(
    model: VisionTransformer,
    precision: str = "fp32",
    fp32_ops: tuple[str, ...] | list[str] | set[str] = DEFAULT_FP32_OPS,
    fused_attention: bool | None = None,
    device: Any = None,
) -> VisionTransformer:
    """``model`` cast to ``precision`` on ``device``, in eval mode, under the precision policy.

    The one place a model is put into a precision: in fp16/bf16 the ops in ``fp32_ops``
    compute in fp32 (``()`` for a plain cast); ``fused_attention`` picks SDPA (``True``) or the
    explicit MatMul → Softmax → MatMul that exported graphs contain (``False``); ``None``
    keeps SDPA in fp32 and uses the explicit form wherever ``fp32_ops`` keeps Softmax in fp32
    (SDPA cannot). ``model`` itself is never modified: it is copied unless nothing changes.
    """
    dtype = torch_dtype(precision)
    ops = set(fp32_ops) if precision != "fp32" else set()
    explicit = fused_attention is False or (fused_attention is None and "Softmax" in ops)
    param = next(model.parameters())
    target = torch.device(device) if device is not None else param.device
    unchanged = (param.dtype == dtype and param.device == target and not model.training and not ops
                 and not explicit and all(m.fused for m in model.modules() if isinstance(m, Attention)))
    if unchanged:
        return model
    import copy

    prepared = copy.deepcopy(model).to(device=target, dtype=dtype).eval()
    prepared.set_precision_policy(ops, fused_attention=not explicit)
    return prepared
