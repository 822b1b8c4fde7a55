"""DINOv3 (Siméoni et al. 2025): 2-D RoPE only, class + 4 storage tokens, LayerScale.

Positions: RoPE on the patch tokens only (never the class or storage tokens), patch-centre
coordinates normalised to [-1, 1] per axis and recomputed for every H x W, periods
``100 ** (2j / (d/2))``, the rotate-half layout (:mod:`vitdeploy.rope` form ``"dinov3"``); no
learned table. S, B, L use a GELU MLP, S+ and H+ a SwiGLU; the ``_qkvb`` variants carry q and v
biases (k has none). Pooling follows the source: timm's default is the mean of the patch tokens
after the final norm (a Hub folder's ``global_pool`` says otherwise); transformers' ``pooler_output``
and the original's ``x_norm_clstoken`` are the normed class token (``pooling="token"``).

Sources: timm ``vit_*_patch16_dinov3*`` state dicts and Hub folders (its ``Eva`` names,
:func:`~vitdeploy.families.base.from_timm_eva`), and the original facebookresearch/dinov3 hub
state dict (:func:`from_original`: ``storage_tokens``, ``qkv.bias`` with k masked to zero,
``mlp.w1/w2/w3`` for SwiGLU, a ``rope_embed.periods`` buffer that is recomputed, not read), and
transformers folders (``model_type: dinov3_vit``, :func:`from_transformers`; its ``pooler_output`` is
the class token, so such a checkpoint pools by token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from vitdeploy.constants import IMAGENET_MEAN, IMAGENET_STD
from vitdeploy.families.base import Family, StateDict, from_timm_eva, move_block_tensors, pop_qkv, variant

_COMMON = dict(family="dinov3", num_classes=0, qkv_bias=False, layer_scale=1e-5, rope="dinov3",
               rope_temperature=100.0, abs_pos_embed=False, num_reg_tokens=4, class_token=True, pooling="avg",
               fc_norm=False, layer_norm_eps=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0)
# (name, hidden, depth, heads, mlp, mlp_type)
_SIZES = (
    ("vit_small_patch16_dinov3", 384, 12, 6, 1536, "mlp"),
    ("vit_small_plus_patch16_dinov3", 384, 12, 6, 1536, "swiglu"),
    ("vit_base_patch16_dinov3", 768, 12, 12, 3072, "mlp"),
    ("vit_large_patch16_dinov3", 1024, 24, 16, 4096, "mlp"),
    ("vit_huge_plus_patch16_dinov3", 1280, 32, 20, 5120, "swiglu"),
)

VARIANTS = {}
for _name, _hidden, _depth, _heads, _mlp, _type in _SIZES:
    for _suffix, _qv in (("", False), ("_qkvb", True)):
        VARIANTS[_name + _suffix] = variant(_name + _suffix, 256, 16, _hidden, _depth, _heads, _mlp, mlp_type=_type,
                                            qv_bias=_qv, **_COMMON)


def from_original(state_dict: StateDict) -> StateDict:
    """facebookresearch/dinov3 names → vitdeploy's: storage tokens are registers, the masked k bias is
    dropped (q and v biases kept), SwiGLU ``w1``/``w2`` (gate, value) pack into ``fc1``, ``w3`` is
    ``fc2``; the pre-training mask token, the recomputed RoPE periods and the k-bias masks are dropped."""
    import torch

    out: StateDict = {}
    for key, value in state_dict.items():
        if key in ("mask_token",) or key.endswith((".periods", ".bias_mask")) or key.startswith("local_cls_norm"):
            continue
        key = key.replace("storage_tokens", "reg_token")
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3, dim=-1)
            out[key.replace("qkv.bias", "q_bias")] = q
            out[key.replace("qkv.bias", "v_bias")] = v
            continue
        out[key.replace("mlp.w3.", "mlp.fc2.")] = value
    for key in [k for k in out if ".mlp.w1." in k]:
        out[key.replace("mlp.w1.", "mlp.fc1.")] = torch.cat([out.pop(key), out.pop(key.replace(".w1.", ".w2."))])
    return out


def is_original_keys(keys: Iterable[str]) -> bool:
    """Whether tensor names are the original DINOv3's (its storage tokens)."""
    return "storage_tokens" in set(keys)


_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
           "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.bias": "patch_embed.proj.bias", "norm.weight": "norm.weight",
           "norm.bias": "norm.bias"}
_HF_LAYER = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj", "mlp.down_proj": "mlp.fc2",
             "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_HF_BLOCK = re.compile(r"^(?:dinov3_vit\.)?(?:model\.)?layer\.(\d+)\.(.+)$")


def from_transformers(state_dict: StateDict) -> StateDict:
    """transformers ``DINOv3ViTModel`` names → vitdeploy's: ``model.layer.N`` blocks, q/k/v projections
    into one ``qkv`` (``layer.N`` on disk, ``model.layer.N`` in memory; q and v biases apart when k has none, as DINOv3 trains it; zeros where a bias is
    configured off), ``up_proj``/``gate_proj`` into ``fc1`` (SwiGLU packs gate first), missing MLP or
    output-projection biases as zeros (``mlp_bias``/``proj_bias`` false); the mask token is dropped."""
    import torch

    out: StateDict = {}
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov3_vit.")
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif (match := _HF_BLOCK.match(key)) is not None:
            blocks.setdefault(int(match[1]), {})[match[2]] = value
        elif key != "embeddings.mask_token":
            out[key] = value  # left for strict loading to report
    for index, names in sorted(blocks.items()):
        prefix = f"blocks.{index}"
        move_block_tensors(names, _HF_LAYER, prefix, out)
        weights, biases = pop_qkv(names, "attention")
        out[f"{prefix}.attn.qkv.weight"] = torch.cat(weights)
        if biases[1] is None and biases[0] is not None and biases[2] is not None:
            out[f"{prefix}.attn.q_bias"], out[f"{prefix}.attn.v_bias"] = biases[0], biases[2]
        elif any(b is not None for b in biases):
            out[f"{prefix}.attn.qkv.bias"] = torch.cat([b if b is not None else torch.zeros(w.shape[0])
                                                        for b, w in zip(biases, weights, strict=True)])
        up = names.pop("mlp.up_proj.weight")
        gate = names.pop("mlp.gate_proj.weight", None)
        out[f"{prefix}.mlp.fc1.weight"] = torch.cat([gate, up]) if gate is not None else up
        up_bias, gate_bias = names.pop("mlp.up_proj.bias", None), names.pop("mlp.gate_proj.bias", None)
        fc1_bias = torch.cat([gate_bias, up_bias]) if gate_bias is not None else up_bias
        out[f"{prefix}.mlp.fc1.bias"] = fc1_bias if fc1_bias is not None else torch.zeros(
            out[f"{prefix}.mlp.fc1.weight"].shape[0])
        out.setdefault(f"{prefix}.mlp.fc2.bias", torch.zeros(out[f"{prefix}.mlp.fc2.weight"].shape[0]))
        out.setdefault(f"{prefix}.attn.proj.bias", torch.zeros(out[f"{prefix}.attn.proj.weight"].shape[0]))
        out.update({f"{prefix}.{name}": value for name, value in names.items()})  # for strict loading to report
    return out


def transformers_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Config fields of a transformers ``DINOv3ViTConfig`` (``config.json``) that no tensor shows:
    heads, norm epsilon, RoPE base, native size, and the class-token ``pooler_output`` it returns."""
    size = data.get("image_size", 224)
    return dict(num_heads=int(data.get("num_attention_heads", 6)), layer_norm_eps=float(data.get("layer_norm_eps", 1e-5)),
                rope_temperature=float(data.get("rope_theta", 100.0)),
                image_size=int(size if isinstance(size, int) else size[0]), pooling="token", fc_norm=False)


def fits_bare(names: frozenset[str]) -> bool:
    """No position table beside class and storage tokens: only DINOv3's RoPE among what vitdeploy builds."""
    return "pos_embed" not in names and {"cls_token", "reg_token"} <= names


FAMILY = Family("dinov3", "DINOv3", VARIANTS,
                key_maps={"timm": from_timm_eva, "dinov3": from_original, "huggingface": from_transformers},
                defaults={k: v for k, v in _COMMON.items() if k not in ("num_classes", "qkv_bias")},
                fits_bare=fits_bare, transformers_fields=transformers_fields)
