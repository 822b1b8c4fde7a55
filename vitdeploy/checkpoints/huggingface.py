"""Hugging Face transformers folders: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``.

The plain ViT (``model_type: "vit"``; ViT-MSN's ``"vit_msn"`` and ViT-MAE's ``"vit_mae"`` are the same
encoder: MAE's fixed sin-cos table is stored as its position embeddings, its masking is for pre-training
only and its decoder is left aside) and I-JEPA's encoder (``"ijepa"``: the same layers without a
class token, read by the mean token) are converted here; DeiT, DINOv2 (with registers), CLIP and
SigLIP by :mod:`vitdeploy.checkpoints.hf_families`. Weights are renamed to ours and the separate
query/key/value projections are concatenated into the fused ``qkv``. For the ViT, both the on-disk
names (``encoder.layer.N.attention.attention.query``, which every transformers version writes) and
transformers 5's in-memory names (``layers.N.attention.q_proj``, ``mlp.fc1``) are accepted, with
or without the ``vit.`` prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vitdeploy.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    StateDict,
    folder_weight_files,
    read_weight_files,
    strip_prefixes,
)
from vitdeploy.checkpoints.conversion import Conversion, build_config
from vitdeploy.checkpoints.hf_common import (
    activation,
    labels,
    preprocessing,
    rename_layers,
    square,
    strip_model_prefix,
)
from vitdeploy.checkpoints.hf_families import MODEL_TYPES, convert_hf_family, family_model_type
from vitdeploy.config import InputPreprocessing, Provenance, ViTConfig

# transformers' ViTConfig defaults, for keys an older config.json may omit.
_HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, image_size=224,
    patch_size=16, num_channels=3, qkv_bias=True,
)

_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Per-layer module names (after the layer prefix) → our module within blocks.N, or q/k/v parts of qkv.
_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    # transformers >= 5 in-memory names
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_IGNORED = ("pooler.", "embeddings.mask_token")
# model_type → the prefix of its backbone's tensors in a classifier's (or MAE's pre-training) state dict:
# the plain ViT's layers, also under ViT-MSN's and ViT-MAE's model_type
VIT_MODEL_TYPES = {"vit": "vit.", "ijepa": "ijepa.", "vit_msn": "vit.", "vit_mae": "vit."}
# ViT-MAE's pre-training decoder (ViTMAEForPreTraining): reconstructs masked patches, not part of the encoder
_MAE_DECODER = "decoder."
SUPPORTED_MODEL_TYPES = (*VIT_MODEL_TYPES, *MODEL_TYPES)


def is_hf_vit_config(data: object) -> bool:
    return isinstance(data, dict) and data.get("model_type") in VIT_MODEL_TYPES


def is_hf_config(data: object) -> bool:
    """Whether ``data`` (a parsed ``config.json``) is a transformers config of a supported model."""
    return is_hf_vit_config(data) or family_model_type(data) is not None


def hf_config(data: dict[str, Any], where: Path, num_classes: int) -> ViTConfig:
    """Our :class:`ViTConfig` for a transformers ViT ``config.json`` (``num_classes`` from the weights)."""
    values = {**_HF_DEFAULTS, **data}
    act = activation(values["hidden_act"], where)
    ijepa = data.get("model_type") == "ijepa"
    # I-JEPA's encoder: no class token; its classifier reads the mean of the normed tokens
    tokens = dict(class_token=False, pooling="avg", fc_norm=False) if ijepa else dict(pooling="token")
    try:
        name = str(data.get("_name_or_path") or where.parent.name).rstrip("/").split("/")[-1] or "hf_vit"
        return ViTConfig(
            image_size=square(values["image_size"], "image_size", where),
            patch_size=square(values["patch_size"], "patch_size", where),
            in_channels=int(values["num_channels"]), hidden_size=int(values["hidden_size"]),
            depth=int(values["num_hidden_layers"]), num_heads=int(values["num_attention_heads"]),
            mlp_size=int(values["intermediate_size"]), num_classes=num_classes, qkv_bias=bool(values["qkv_bias"]),
            layer_norm_eps=float(values["layer_norm_eps"]), act=act, **tokens,
            dropout=float(values["hidden_dropout_prob"]),
            attention_dropout=float(values["attention_probs_dropout_prob"]),
            pos_embed_resample="huggingface",
            # ViTImageProcessor's defaults: both sides resized to the model's size, no crop
            preprocessing=InputPreprocessing(crop_pct=1.0, interpolation="bilinear", resize_mode="squash"),
            provenance=Provenance(family="ijepa" if ijepa else "vit", name=name, labels=labels(data, num_classes)),
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: unusable ViT config: {error}") from None


def convert_hf_state_dict(source: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """Rename a transformers ViT state dict to ours; returns (state dict, unmapped keys, notes)."""
    notes: list[str] = []
    source = strip_model_prefix(source, tuple(dict.fromkeys(VIT_MODEL_TYPES.values())))
    decoder = [k for k in source if k.startswith(_MAE_DECODER)]
    if decoder:
        notes.append(f"left aside MAE's pre-training decoder ({len(decoder)} tensors): the encoder is the model")
        source = {k: v for k, v in source.items() if not k.startswith(_MAE_DECODER)}
    ignored = sorted(k for k in source if k.startswith(_IGNORED))
    if ignored:
        notes.append(f"ignored {', '.join(ignored)} (not part of the classifier's forward pass)")
    source = {k: v for k, v in source.items() if not k.startswith(_IGNORED)}
    out, rest, unexpected = rename_layers(source, _LAYER_KEY, _LAYER)
    for key, tensor in rest.items():
        if key in _TOP:
            out[_TOP[key]] = tensor
        else:
            unexpected.append(key)
    return out, unexpected, notes


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not a readable config.json ({error})") from None
    if not is_hf_config(data):
        model_type = data.get("model_type") if isinstance(data, dict) else None
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return data


def convert_hf_folder(folder: Path) -> tuple[Conversion, list[Path]]:
    """The :class:`Conversion` of a transformers folder of a non-ViT family (DeiT, DINOv2, CLIP, SigLIP),
    with preprocessing from its ``preprocessor_config.json``, and the weight files it came from."""
    data = _read_config(folder)
    files = folder_weight_files(folder)
    raw, stripped = strip_prefixes(read_weight_files(files))
    conversion = convert_hf_family(raw, data, str(folder / "config.json"))
    conversion.fields.update(preprocessing(folder, conversion.notes))
    conversion.notes[:0] = stripped
    return conversion, files


def read_huggingface(folder: Path) -> Checkpoint:
    """Read a transformers folder: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` (or shards)."""
    data = _read_config(folder)
    config_path = folder / "config.json"
    if not is_hf_vit_config(data):
        conversion, files = convert_hf_folder(folder)
        config = build_config(conversion.fields, str(config_path))
        return Checkpoint(config, conversion.state_dict, "huggingface", files, conversion.unexpected,
                          conversion.notes)
    files = folder_weight_files(folder)
    raw, stripped = strip_prefixes(read_weight_files(files))
    state_dict, unexpected, notes = convert_hf_state_dict(raw)
    head = state_dict.get("head.weight")
    config = hf_config(data, config_path, int(head.shape[0]) if head is not None else 0)
    fields = preprocessing(folder, notes)
    if fields:
        config = config.replace(**fields)
    return Checkpoint(config, state_dict, "huggingface", files, unexpected, stripped + notes)
