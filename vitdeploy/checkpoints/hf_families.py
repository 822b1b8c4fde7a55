"""Hugging Face transformers folders of the ViT families beyond the plain ViT: DeiT, DINOv2
(with and without registers), CLIP and SigLIP image towers.

Each converter is a pure function ``(transformers state dict, config.json data, where) ->``
:class:`~vitdeploy.checkpoints.conversion.Conversion`: the tensors in vitdeploy's names, which
are timm's names for that family (``dist_token``/``head_dist``, ``reg_token``, ``ls1.gamma``,
``norm_pre``, ``attn_pool.*``; CLIP's projection is ``proj.weight``), and the config fields.

Where transformers' model differs from timm's by convention rather than by weights, the
conversion makes them equal:

- DINOv2 with registers: transformers adds the class token's position embedding before inserting
  the registers; timm's ``reg4`` models have no position embedding for prefix tokens
  (``no_embed_class``). ``pos_embed[:, 0]`` is folded into ``cls_token`` (exact at every size,
  since the class position is never resampled).
- ``DeiTForImageClassification`` (one classifier reading the class token, while the
  distillation token still takes part in attention) becomes a distilled model whose
  ``head`` is twice the classifier and whose ``head_dist`` is zero: the averaged heads give
  exactly the classifier's logits.
- CLIP keeps transformers' ``last_hidden_state`` before ``post_layernorm``; vitdeploy (= timm)
  applies that norm to every token (``norm``), so vitdeploy's ``last_hidden_state`` is
  ``post_layernorm(hf.last_hidden_state)``; ``pooler_output`` is the same in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vitdeploy.checkpoints.common import CheckpointError, StateDict
from vitdeploy.checkpoints.conversion import Conversion, grid_side
from vitdeploy.checkpoints.families import convert_aimv2_transformers, convert_dinov3_transformers
from vitdeploy.checkpoints.hf_common import activation, labels, rename_layers, square, strip_model_prefix
from vitdeploy.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

LAYER_KEY = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_QKV_ATTENTION = {
    "attention.attention.query": "attn.q", "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v", "attention.output.dense": "attn.proj",
}
# DeiT's layers are laid out as ViT's.
VIT_LAYER_MODULES = {
    **_QKV_ATTENTION, "layernorm_before": "norm1", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}
DINOV2_LAYER_MODULES = {
    **_QKV_ATTENTION, "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
DINOV2_LAYER_PARAMS = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
CLIP_LAYER_MODULES = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}

# transformers' config defaults per model_type, for keys a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deit": dict(num_attention_heads=12, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True),
    "dinov2": dict(num_attention_heads=12, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                   layerscale_value=1.0, use_swiglu_ffn=False),
    "clip": dict(num_attention_heads=12, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(num_attention_heads=12, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   vision_use_head=True),
}


class _Mapper:
    """Moves named tensors from the source to ours, remembering what is left over."""

    def __init__(self, rest: StateDict, out: StateDict) -> None:
        self.rest, self.out = dict(rest), out

    def move(self, source: str, target: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        tensor = self.rest.pop(source, None)
        if tensor is None:
            return False
        self.out[target] = transform(tensor) if transform else tensor
        return True

    def module(self, source: str, target: str) -> None:
        for kind in ("weight", "bias"):
            self.move(f"{source}.{kind}", f"{target}.{kind}")

    def ignore(self, prefixes: tuple[str, ...]) -> list[str]:
        ignored = sorted(k for k in self.rest if k.startswith(prefixes))
        for key in ignored:
            del self.rest[key]
        return ignored


def _ignored_note(ignored: list[str], why: str) -> list[str]:
    if not ignored:
        return []
    shown = ", ".join(ignored[:4]) + (f" and {len(ignored) - 4} more" if len(ignored) > 4 else "")
    return [f"ignored {len(ignored)} tensor(s) {shown} ({why})"]


def _shape_fields(out: StateDict, num_prefix_positions: int, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Architecture fields read from the converted tensors (and heads/eps/bias from ``data``)."""
    proj = out.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        shape = None if proj is None else list(proj.shape)
        raise CheckpointError(f"{where}: no usable patch embedding (shape {shape}); expected [D, C, p, p]")
    if "pos_embed" not in out:
        raise CheckpointError(f"{where}: no position embedding tensor")
    patch = int(proj.shape[-1])
    side = grid_side(out["pos_embed"], num_prefix_positions, where)
    depth = len({int(k.split(".")[1]) for k in out if k.startswith("blocks.")})
    fc1 = out.get("blocks.0.mlp.fc1.weight")
    fc2 = out.get("blocks.0.mlp.fc2.weight")
    swiglu = fc1 is not None and fc2 is not None and int(fc1.shape[0]) == 2 * int(fc2.shape[1])  # gate; value
    if depth == 0 or fc1 is None:
        raise CheckpointError(f"{where}: no transformer layers found")
    config_patch = data.get("patch_size")
    if config_patch is not None and square(config_patch, "patch_size", where) != patch:
        raise CheckpointError(f"{where}: config.json patch_size {config_patch} but the weights have {patch}")
    return dict(
        image_size=side * patch, patch_size=patch, in_channels=int(proj.shape[1]), hidden_size=int(proj.shape[0]),
        depth=depth, num_heads=int(data["num_attention_heads"]), mlp_size=int(fc1.shape[0]) // (2 if swiglu else 1),
        mlp_type="swiglu" if swiglu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in out, layer_norm_eps=float(data["layer_norm_eps"]),
        act=activation(data["hidden_act"], where),
    )


def _name(data: dict[str, Any], where: str, fallback: str) -> str:
    name = str(data.get("_name_or_path") or Path(where).parent.name).rstrip("/").split("/")[-1]
    return name or fallback


def _head_fields(out: StateDict, data: dict[str, Any]) -> dict[str, Any]:
    head = out.get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0
    return dict(num_classes=num_classes, labels=labels(data, num_classes) if num_classes else None)


# --------------------------------------------------------------------------- DeiT


def convert_deit(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """``DeiTModel`` / ``DeiTForImageClassification`` / ``DeiTForImageClassificationWithTeacher``."""
    data = {**_DEFAULTS["deit"], **data}
    source = strip_model_prefix(source, ("deit.",))
    out, rest, unexpected = rename_layers(source, LAYER_KEY, VIT_LAYER_MODULES)
    m = _Mapper(rest, out)
    notes = _ignored_note(m.ignore(("pooler.", "embeddings.mask_token")),
                          "transformers' tanh pooler and masked-image-modelling token: not in the inference path")
    m.move("embeddings.cls_token", "cls_token")
    distilled = m.move("embeddings.distillation_token", "dist_token")
    m.move("embeddings.position_embeddings", "pos_embed")
    m.module("embeddings.patch_embeddings.projection", "patch_embed.proj")
    m.module("layernorm", "norm")
    m.module("cls_classifier", "head")
    m.module("distillation_classifier", "head_dist")
    if "classifier.weight" in m.rest and distilled:
        weight, bias = m.rest.pop("classifier.weight"), m.rest.pop("classifier.bias", None)
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
        out.update({"head.weight": weight * 2, "head.bias": bias * 2,
                    "head_dist.weight": torch.zeros_like(weight), "head_dist.bias": torch.zeros_like(bias)})
        notes.append("DeiTForImageClassification reads the class token only: loaded as a distilled model "
                     "with head = 2 x classifier and a zero head_dist, whose averaged logits are the classifier's")
    else:
        m.module("classifier", "head")
    fields = dict(
        family="deit", name=_name(data, where, "hf_deit"), class_token=True, distilled=distilled,
        pooling="token", fc_norm=False, pos_embed_resample="huggingface",
        # DeiTImageProcessor's defaults: both sides resized to 256, the centre 224 cropped
        mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic", resize_mode="squash",
        **_shape_fields(out, 2 if distilled else 1, data, where), **_head_fields(out, data),
    )
    return Conversion(out, fields, sorted(unexpected + list(m.rest)), notes)


# --------------------------------------------------------------------------- DINOv2


def convert_dinov2(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """``Dinov2Model`` / ``Dinov2ForImageClassification`` and their ``Dinov2WithRegisters`` twins."""
    data = {**_DEFAULTS["dinov2"], **data}
    source = strip_model_prefix(source, ("dinov2_with_registers.", "dinov2."))
    if data.get("use_swiglu_ffn"):  # ViT-g: Dinov2SwiGLUFFN weights_in (gate; value) and weights_out
        source = {k.replace(".mlp.weights_in.", ".mlp.fc1.").replace(".mlp.weights_out.", ".mlp.fc2."): v
                  for k, v in source.items()}
    out, rest, unexpected = rename_layers(source, LAYER_KEY, DINOV2_LAYER_MODULES, DINOV2_LAYER_PARAMS)
    m = _Mapper(rest, out)
    notes = _ignored_note(m.ignore(("embeddings.mask_token",)),
                          "the masked-image-modelling token: not in the inference path")
    m.move("embeddings.cls_token", "cls_token")
    registers = m.move("embeddings.register_tokens", "reg_token")
    m.move("embeddings.position_embeddings", "pos_embed")
    m.module("embeddings.patch_embeddings.projection", "patch_embed.proj")
    m.module("layernorm", "norm")
    m.module("classifier", "head")
    num_reg = int(out["reg_token"].shape[1]) if registers else 0
    if registers and "pos_embed" in out and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
        notes.append("folded the class token's position embedding into cls_token (registers and class token "
                     "carry no position embedding, as in timm's reg4 DINOv2)")
    shape = _shape_fields(out, 0 if registers else 1, data, where)
    head = out.get("head.weight")
    if head is not None and head.shape[1] != 2 * shape["hidden_size"]:
        raise CheckpointError(f"{where}: classifier.weight {list(head.shape)}; expected [classes, "
                              f"{2 * shape['hidden_size']}] (class token and mean patch token, concatenated)")
    fields = dict(
        family="dinov2", name=_name(data, where, "hf_dinov2"), class_token=True, num_reg_tokens=num_reg,
        no_embed_class=registers, layer_scale=float(data["layerscale_value"]),
        # Dinov2ForImageClassification: head(concat(class token, mean of the patch tokens)).
        pooling="token_avg" if head is not None else "token", fc_norm=False,
        # transformers' Dinov2 resamples with plain bicubic; Dinov2WithRegisters with antialiased bicubic.
        pos_embed_resample="timm" if registers else "huggingface",
        mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic",
        **shape, **_head_fields(out, data),
    )
    return Conversion(out, fields, sorted(unexpected + list(m.rest)), notes)


# --------------------------------------------------------------------------- CLIP and SigLIP

_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


def _tower(source: StateDict) -> tuple[StateDict, list[str]]:
    """The image tower of a CLIP/SigLIP state dict (``vision_model.`` prefix dropped), and a note
    about the text tower left out."""
    mapper = _Mapper(source, {})
    notes = _ignored_note(mapper.ignore(_TEXT_TOWER), "the text tower and the contrastive logit scale/bias")
    return strip_model_prefix(mapper.rest, ("vision_model.",)), notes


def convert_clip(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, or a full ``CLIPModel``'s image tower."""
    data = {**_DEFAULTS["clip"], **data}
    source, notes = _tower(source)
    out, rest, unexpected = rename_layers(source, LAYER_KEY, CLIP_LAYER_MODULES)
    m = _Mapper(rest, out)
    m.ignore(("embeddings.position_ids",))  # a buffer older transformers saved: 0 .. N
    m.move("embeddings.class_embedding", "cls_token", lambda t: t.reshape(1, 1, -1))
    m.module("embeddings.patch_embedding", "patch_embed.proj")
    m.move("embeddings.position_embedding.weight", "pos_embed", lambda t: t.unsqueeze(0))
    m.module("pre_layrnorm", "norm_pre")
    m.module("post_layernorm", "norm")
    m.move("visual_projection.weight", "proj.weight")
    projection = out.get("proj.weight")
    fields = dict(
        family="clip", name=_name(data, where, "hf_clip"), class_token=True, pre_norm=True,
        patch_bias="patch_embed.proj.bias" in out, pooling="token", fc_norm=False, num_classes=0,
        projection_dim=int(projection.shape[0]) if projection is not None else None,
        pos_embed_resample="huggingface", mean=CLIP_MEAN, std=CLIP_STD, crop_pct=1.0, interpolation="bicubic",
        **_shape_fields(out, 1, data, where),
    )
    return Conversion(out, fields, sorted(unexpected + list(m.rest)), notes)


def _split_in_proj(m: _Mapper, kind: str, hidden: int) -> None:
    tensor = m.rest.pop(f"head.attention.in_proj_{kind}", None)
    if tensor is not None:
        m.out[f"attn_pool.q.{kind}"] = tensor[:hidden]
        m.out[f"attn_pool.kv.{kind}"] = tensor[hidden:]


def convert_siglip(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """``SiglipVisionModel``, or a full ``SiglipModel``'s image tower (its MAP head becomes ``attn_pool``)."""
    data = {**_DEFAULTS["siglip"], **data}
    source, notes = _tower(source)
    out, rest, unexpected = rename_layers(source, LAYER_KEY, CLIP_LAYER_MODULES)
    m = _Mapper(rest, out)
    m.ignore(("embeddings.position_ids",))
    m.module("embeddings.patch_embedding", "patch_embed.proj")
    m.move("embeddings.position_embedding.weight", "pos_embed", lambda t: t.unsqueeze(0))
    m.module("post_layernorm", "norm")
    head = m.move("head.probe", "attn_pool.latent")
    if head:
        hidden = int(out["attn_pool.latent"].shape[-1])
        _split_in_proj(m, "weight", hidden)
        _split_in_proj(m, "bias", hidden)
        m.module("head.attention.out_proj", "attn_pool.proj")
        m.module("head.layernorm", "attn_pool.norm")
        m.module("head.mlp.fc1", "attn_pool.mlp.fc1")
        m.module("head.mlp.fc2", "attn_pool.mlp.fc2")
    elif data.get("vision_use_head"):
        notes.append("config.json says vision_use_head but there is no head.probe tensor")
    fields = dict(
        family="siglip", name=_name(data, where, "hf_siglip"), class_token=False,
        pooling="map" if head else "avg", fc_norm=False, num_classes=0, pos_embed_resample="huggingface",
        # SiglipImageProcessor's defaults: both sides resized to the model's size, no crop
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, interpolation="bicubic", resize_mode="squash",
        **_shape_fields(out, 0, data, where),
    )
    return Conversion(out, fields, sorted(unexpected + list(m.rest)), notes)


def convert_siglip2(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """``Siglip2VisionModel`` / ``Siglip2Model``'s tower, read for images of any size (fixed aspect, not
    NaFlex's patch sequences): its linear patch embedding over ``(row, column, channel)``-ordered patch
    pixels is the equivalent convolution, its position table is resampled as transformers resizes it."""
    patch, channels = int(data.get("patch_size", 16)), int(data.get("num_channels", 3))
    source = dict(source)
    for key in [k for k in source if k.endswith("embeddings.patch_embedding.weight")]:
        weight = source[key]
        if weight.ndim == 2:
            source[key] = weight.reshape(weight.shape[0], patch, patch, channels).permute(0, 3, 1, 2)
    conversion = convert_siglip(source, data, where)
    conversion.fields.update(pos_embed_resample="siglip2", name=_name(data, where, "hf_siglip2"))
    conversion.notes.append("read transformers' SigLIP 2 for whole images (one aspect per batch); "
                            "NaFlex's padded patch sequences are not an input here")
    return conversion


# --------------------------------------------------------------------------- dispatch

Converter = Callable[[StateDict, dict[str, Any], str], Conversion]
# model_type → (converter, whether config.json nests the image tower's config under "vision_config").
MODEL_TYPES: dict[str, tuple[Converter, bool]] = {
    "deit": (convert_deit, False),
    "dinov2": (convert_dinov2, False),
    "dinov2_with_registers": (convert_dinov2, False),
    "clip_vision_model": (convert_clip, False),
    "clip": (convert_clip, True),
    "siglip_vision_model": (convert_siglip, False),
    "siglip": (convert_siglip, True),
    "dinov3_vit": (convert_dinov3_transformers, False),
    "siglip2_vision_model": (convert_siglip2, False),
    "siglip2": (convert_siglip2, True),
    "aimv2_vision_model": (convert_aimv2_transformers, False),
}
# transformers architecture names → model_type, for a config.json that lacks model_type.
ARCHITECTURES: dict[str, str] = {
    "DeiTModel": "deit", "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2", "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_with_registers",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "CLIPVisionModel": "clip_vision_model", "CLIPVisionModelWithProjection": "clip_vision_model",
    "CLIPModel": "clip", "SiglipVisionModel": "siglip_vision_model", "SiglipModel": "siglip",
    "DINOv3ViTModel": "dinov3_vit", "Siglip2VisionModel": "siglip2_vision_model", "Siglip2Model": "siglip2",
    "Aimv2VisionModel": "aimv2_vision_model",
}


def family_model_type(data: object) -> str | None:
    """The supported non-ViT ``model_type`` of a transformers ``config.json``, else None."""
    if not isinstance(data, dict):
        return None
    model_type = data.get("model_type")
    if model_type in MODEL_TYPES:
        return str(model_type)
    if model_type is None:
        for architecture in data.get("architectures") or ():
            if architecture in ARCHITECTURES:
                return ARCHITECTURES[architecture]
    return None


def convert_hf_family(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """Convert a transformers state dict of a supported family; ``data`` is its ``config.json``."""
    model_type = family_model_type(data)
    if model_type is None:
        raise CheckpointError(f"{where}: model_type {data.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    converter, nested = MODEL_TYPES[model_type]
    config = data
    if nested:
        config = dict(data.get("vision_config") or {})
        for key in ("_name_or_path", "id2label"):
            if key in data:
                config.setdefault(key, data[key])
    return converter(source, config, where)
