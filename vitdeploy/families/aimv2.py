"""AIMv2 (Fini et al. 2024): a learned table, SwiGLU and RMSNorm, no class token, mean pooling.

Positions: the learned table, resampled as timm does. Every norm is an RMSNorm (weight only), the
patch embedding is followed by one, the SwiGLU MLP (split ``fc1_g``/``fc1_x`` in timm, packed by
:func:`~vitdeploy.families.base.from_timm_eva`) and the attention output projection have no biases,
q/k/v neither. Pooling: the mean of the tokens after the final norm.

Sources: timm ``aimv2_{large,huge,1b,3b}_patch14_{224,336,448}`` state dicts and Hub folders, and
transformers ``Aimv2VisionModel`` folders (``model_type: aimv2_vision_model``, :func:`from_transformers`).
transformers builds the same tower with a biased patch embedding and, by default (``use_head``), an
attention-pool head whose query is its latent itself (``pool_form="aimv2"``), read as ``pooler_output``.
Its positions: a learned table added as it is (``is_native: false``; transformers runs such a model at
its native size only, so vitdeploy resamples it elsewhere as timm does for the same Apple weights,
and checks it against transformers at the native size only), or a 2-D sin-cos table computed for
every grid (``is_native: true``, ``sincos_pos_embed``), which transformers runs at any size.
"""

from __future__ import annotations

import re
from typing import Any

from vitdeploy.constants import CLIP_MEAN, CLIP_STD
from vitdeploy.families.base import (
    Family,
    StateDict,
    from_timm_eva,
    has_part,
    move_block_tensors,
    pop_qkv,
    variant,
)

_COMMON = dict(family="aimv2", num_classes=0, class_token=False, pooling="avg", fc_norm=False, qkv_bias=False,
               proj_bias=False, mlp_type="swiglu", norm="rmsnorm", patch_norm=True, layer_norm_eps=1e-5,
               mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0)
# (size, hidden, heads, mlp); every size has 24 blocks
_SIZES = (("large", 1024, 8, 2816), ("huge", 1536, 12, 4096), ("1b", 2048, 16, 5632), ("3b", 3072, 24, 8192))

VARIANTS = {
    f"aimv2_{size}_patch14_{image}": variant(f"aimv2_{size}_patch14_{image}", image, 14, hidden, 24, heads, mlp,
                                             **_COMMON)
    for size, hidden, heads, mlp in _SIZES for image in (224, 336, 448)
}

def fits_bare(names: frozenset[str]) -> bool:
    """A norm after the patch embedding, no class token and a split SwiGLU: only AIMv2's."""
    return ("patch_embed.norm.weight" in names and "cls_token" not in names and "pos_embed" in names
            and has_part(names, ".mlp.fc1_g."))


_HF_TOP = {"embeddings.patch_embed": "patch_embed.proj", "embeddings.rms_norm": "patch_embed.norm",
           "rms_norm": "norm", "head.output_proj": "attn_pool.proj"}
_HF_LAYER = {"rms_norm1": "norm1", "rms_norm2": "norm2", "attention.out_proj": "attn.proj", "ffn.down_proj": "mlp.fc2"}
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _zeros_like_rows(weight: Any) -> Any:
    import torch

    return torch.zeros(weight.shape[0], dtype=weight.dtype)


def from_transformers(state_dict: StateDict) -> StateDict:
    """transformers ``Aimv2VisionModel`` names → vitdeploy's: q/k/v into one ``qkv``, ``gate_proj``/``up_proj``
    into ``fc1`` (gate first), the head's latent ``cls_token`` and ``k_proj``/``v_proj`` into ``attn_pool``;
    where transformers configures one of the output-projection or MLP biases off and the other on
    (``qkv_bias`` and ``mlp_bias`` apart), the missing ones are zeros (vitdeploy has one switch for both)."""
    import torch

    out: StateDict = {}
    blocks: dict[int, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, kind = key.rpartition(".")
        if (match := _HF_BLOCK.match(key)) is not None:
            blocks.setdefault(int(match[1]), {})[match[2]] = value
        elif module in _HF_TOP:
            out[f"{_HF_TOP[module]}.{kind}"] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key == "head.cls_token":
            out["attn_pool.latent"] = value
        elif not key.startswith(("head.k_proj.", "head.v_proj.")) and key != "embeddings.position_ids":
            out[key] = value  # left for strict loading to report
    if "head.k_proj.weight" in state_dict:
        out["attn_pool.kv.weight"] = torch.cat([state_dict["head.k_proj.weight"], state_dict["head.v_proj.weight"]])
        out["attn_pool.kv.bias"] = torch.cat([state_dict.get(f"head.{p}_proj.bias", _zeros_like_rows(
            state_dict[f"head.{p}_proj.weight"])) for p in "kv"])
    biased = any(name.endswith(("out_proj.bias", "down_proj.bias")) for names in blocks.values() for name in names)
    for index, names in sorted(blocks.items()):
        prefix = f"blocks.{index}"
        move_block_tensors(names, _HF_LAYER, prefix, out)
        weights, biases = pop_qkv(names, "attention")
        out[f"{prefix}.attn.qkv.weight"] = torch.cat(weights)
        if any(b is not None for b in biases):
            out[f"{prefix}.attn.qkv.bias"] = torch.cat([b if b is not None else _zeros_like_rows(w)
                                                        for b, w in zip(biases, weights, strict=True)])
        gate, up = names.pop("ffn.gate_proj.weight"), names.pop("ffn.up_proj.weight")
        out[f"{prefix}.mlp.fc1.weight"] = torch.cat([gate, up])
        gate_bias, up_bias = names.pop("ffn.gate_proj.bias", None), names.pop("ffn.up_proj.bias", None)
        if biased:
            out[f"{prefix}.mlp.fc1.bias"] = (torch.cat([gate_bias, up_bias]) if gate_bias is not None
                                             else _zeros_like_rows(out[f"{prefix}.mlp.fc1.weight"]))
            for target in ("mlp.fc2", "attn.proj"):
                out.setdefault(f"{prefix}.{target}.bias", _zeros_like_rows(out[f"{prefix}.{target}.weight"]))
        out.update({f"{prefix}.{name}": value for name, value in names.items()})  # for strict loading to report
    return out


def transformers_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Config fields of a transformers ``Aimv2VisionConfig`` (``config.json``) that no tensor shows: heads,
    norm epsilon, native size, the sin-cos positions of ``is_native`` and the head's form; a
    ``hidden_act`` other than SiLU is refused (``ValueError``)."""
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r}: vitdeploy's SwiGLU gates with SiLU, expected 'silu'")
    size = data.get("image_size", 224)
    native = bool(data.get("is_native", False))
    fields: dict[str, Any] = dict(num_heads=int(data.get("num_attention_heads", 8)),
                                  layer_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
                                  image_size=int(size if isinstance(size, int) else size[0]), fc_norm=False,
                                  sincos_pos_embed=native, name=str(data.get("_name_or_path") or "hf_aimv2").rstrip("/")
                                  .split("/")[-1] or "hf_aimv2")
    if data.get("use_head", True):
        fields.update(pooling="map", pool_form="aimv2")
    return fields


FAMILY = Family("aimv2", "AIMv2", VARIANTS, key_maps={"timm": from_timm_eva, "huggingface": from_transformers},
                defaults=dict(_COMMON), fits_bare=fits_bare, transformers_fields=transformers_fields)
