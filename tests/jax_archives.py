"""Original google-research/vision_transformer ``.npz`` archives written from a model, for the tests.

The writer builds the Flax layout from the format's own conventions (dense kernels ``[in, out]``,
convolutions HWIO, attention heads as their own axis), going the opposite way from vitdeploy's reader,
so a reader that gets a transpose or a name wrong cannot be cancelled out by a writer sharing its code;
timm's own npz loader reads the same archives in the source check's tests.
"""

from __future__ import annotations

import numpy as np
import torch

from vitdeploy.model import VisionTransformer


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def jax_arrays(model: VisionTransformer) -> dict[str, np.ndarray]:
    """The google-research/vision_transformer ``.npz`` arrays of ``model`` (Flax layout)."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    config = model.config
    hidden, heads = config.hidden_size, config.num_heads
    head_dim = hidden // heads
    hwio = (2, 3, 1, 0)  # OIHW → HWIO
    arrays: dict[str, np.ndarray] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(hwio),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        arrays["cls"] = sd["cls_token"]
    if "head.weight" in sd:
        arrays["head/kernel"] = sd["head.weight"].T
        arrays["head/bias"] = sd["head.bias"]
    if "pre_logits.fc.weight" in sd:
        arrays["pre_logits/kernel"] = sd["pre_logits.fc.weight"].T
        arrays["pre_logits/bias"] = sd["pre_logits.fc.bias"]
    for i in range(config.depth):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        arrays[dst + "LayerNorm_0/scale"] = sd[src + "norm1.weight"]
        arrays[dst + "LayerNorm_0/bias"] = sd[src + "norm1.bias"]
        arrays[dst + "LayerNorm_2/scale"] = sd[src + "norm2.weight"]
        arrays[dst + "LayerNorm_2/bias"] = sd[src + "norm2.bias"]
        weights = np.split(sd[src + "attn.qkv.weight"], 3, axis=0)  # each [heads*hd, D]
        biases = np.split(sd[src + "attn.qkv.bias"], 3) if src + "attn.qkv.bias" in sd else None
        for j, name in enumerate(("query", "key", "value")):
            mha = dst + f"MultiHeadDotProductAttention_1/{name}/"
            arrays[mha + "kernel"] = weights[j].T.reshape(hidden, heads, head_dim)
            if biases is not None:
                arrays[mha + "bias"] = biases[j].reshape(heads, head_dim)
        out = dst + "MultiHeadDotProductAttention_1/out/"
        arrays[out + "kernel"] = sd[src + "attn.proj.weight"].T.reshape(heads, head_dim, hidden)
        arrays[out + "bias"] = sd[src + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            arrays[dst + f"MlpBlock_3/Dense_{j}/kernel"] = sd[src + f"mlp.{fc}.weight"].T
            arrays[dst + f"MlpBlock_3/Dense_{j}/bias"] = sd[src + f"mlp.{fc}.bias"]
    if config.hybrid is not None:
        bb = "patch_embed.backbone."
        arrays["conv_root/kernel"] = sd[bb + "stem.conv.weight"].transpose(hwio)
        arrays["gn_root/scale"] = sd[bb + "stem.norm.weight"]
        arrays["gn_root/bias"] = sd[bb + "stem.norm.bias"]
        for s, units in enumerate(config.hybrid.layers):
            for u in range(units):
                src, dst = f"{bb}stages.{s}.blocks.{u}.", f"block{s + 1}/unit{u + 1}/"
                for r in (1, 2, 3):
                    arrays[dst + f"conv{r}/kernel"] = sd[src + f"conv{r}.weight"].transpose(hwio)
                    arrays[dst + f"gn{r}/scale"] = sd[src + f"norm{r}.weight"]
                    arrays[dst + f"gn{r}/bias"] = sd[src + f"norm{r}.bias"]
                if src + "downsample.conv.weight" in sd:
                    arrays[dst + "conv_proj/kernel"] = sd[src + "downsample.conv.weight"].transpose(hwio)
                    arrays[dst + "gn_proj/scale"] = sd[src + "downsample.norm.weight"]
                    arrays[dst + "gn_proj/bias"] = sd[src + "downsample.norm.bias"]
    return arrays
