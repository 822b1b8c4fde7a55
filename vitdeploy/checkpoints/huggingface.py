"""Hugging Face transformers ViT folders (``model_type: "vit"``).

Weights are renamed to ours and the separate query/key/value projections are concatenated into
the fused ``qkv``. Both the on-disk names (``encoder.layer.N.attention.attention.query``, which
every transformers version writes) and transformers 5's in-memory names
(``layers.N.attention.q_proj``, ``mlp.fc1``) are accepted, with or without the ``vit.`` prefix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vitdeploy.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    StateDict,
    folder_weight_files,
    read_weight_files,
    strip_prefixes,
)
from vitdeploy.config import ViTConfig

# transformers' ViTConfig defaults, for keys an older config.json may omit.
_HF_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, image_size=224,
    patch_size=16, num_channels=3, qkv_bias=True,
)
# PIL resampling codes used by transformers image processors.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

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
# Per-layer names (after the layer prefix) → our name within blocks.N, or q/k/v parts of qkv.
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
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = ("pooler.", "embeddings.mask_token")


def is_hf_vit_config(data: object) -> bool:
    return isinstance(data, dict) and data.get("model_type") == "vit"


def _square(value: Any, name: str, where: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: {name} {value} is not square; vitdeploy supports square sizes only")
        value = value[0]
    return int(value)


def _labels(data: dict[str, Any]) -> list[str] | None:
    id2label = data.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if labels == [f"LABEL_{i}" for i in range(len(labels))]:
        return None  # transformers' placeholders carry no information
    return labels


def hf_config(data: dict[str, Any], where: Path, num_classes: int) -> ViTConfig:
    """Our :class:`ViTConfig` for a transformers ViT ``config.json`` (``num_classes`` from the weights)."""
    values = {**_HF_DEFAULTS, **data}
    if values["hidden_act"] != "gelu":
        raise CheckpointError(
            f"{where}: hidden_act {values['hidden_act']!r} is not supported; expected 'gelu' (exact, erf-based)"
        )
    labels = _labels(data)
    if labels is not None and len(labels) != num_classes:
        labels = None
    try:
        return ViTConfig(
            name=str(data.get("_name_or_path") or where.parent.name).rstrip("/").split("/")[-1] or "hf_vit",
            image_size=_square(values["image_size"], "image_size", where),
            patch_size=_square(values["patch_size"], "patch_size", where),
            in_channels=int(values["num_channels"]), hidden_size=int(values["hidden_size"]),
            depth=int(values["num_hidden_layers"]), num_heads=int(values["num_attention_heads"]),
            mlp_size=int(values["intermediate_size"]), num_classes=num_classes, qkv_bias=bool(values["qkv_bias"]),
            layer_norm_eps=float(values["layer_norm_eps"]), pooling="token",
            dropout=float(values["hidden_dropout_prob"]),
            attention_dropout=float(values["attention_probs_dropout_prob"]),
            crop_pct=1.0, interpolation="bilinear", labels=labels, pos_embed_resample="huggingface",
        )
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: unusable ViT config: {error}") from None


def _preprocessing(folder: Path) -> dict[str, Any]:
    """mean/std/interpolation/crop_pct from ``preprocessor_config.json``, when there is one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    fields: dict[str, Any] = {}
    if data.get("image_mean") is not None:
        fields["mean"] = tuple(data["image_mean"])
    if data.get("image_std") is not None:
        fields["std"] = tuple(data["image_std"])
    if data.get("resample") in _RESAMPLE:
        fields["interpolation"] = _RESAMPLE[data["resample"]]
    size, crop = data.get("size"), data.get("crop_size")
    if data.get("do_center_crop") and isinstance(size, dict) and isinstance(crop, dict):
        edge = size.get("shortest_edge") or size.get("height")
        if edge and crop.get("height"):
            fields["crop_pct"] = min(float(crop["height"]) / float(edge), 1.0)
    return fields


def convert_hf_state_dict(source: StateDict) -> tuple[StateDict, list[str], list[str]]:
    """Rename a transformers ViT state dict to ours; returns (state dict, unmapped keys, notes)."""
    notes: list[str] = []
    if any(key.startswith("vit.") for key in source):
        source = {(k[4:] if k.startswith("vit.") else k): v for k, v in source.items()}
    out: StateDict = {}
    unexpected: list[str] = []
    parts: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    ignored = sorted(k for k in source if k.startswith(_IGNORED))
    if ignored:
        notes.append(f"ignored {', '.join(ignored)} (not part of the classifier's forward pass)")
    for key, tensor in source.items():
        if key.startswith(_IGNORED):
            continue
        if key in _TOP:
            out[_TOP[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        target = _LAYER.get(match[2]) if match else None
        if match is None or target is None:
            unexpected.append(key)
            continue
        index, kind = int(match[1]), match[3]
        if target in ("attn.q", "attn.k", "attn.v"):
            parts.setdefault((index, kind), {})[target[-1]] = (key, tensor)
        else:
            out[f"blocks.{index}.{target}.{kind}"] = tensor
    for (index, kind), qkv in sorted(parts.items()):
        if len(qkv) != 3:  # leaves blocks.N.attn.qkv missing; the orphans are reported with it
            unexpected.extend(key for key, _ in qkv.values())
            continue
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv[n][1] for n in "qkv"], dim=0)
    return out, unexpected, notes


def read_huggingface(folder: Path) -> Checkpoint:
    """Read a transformers ViT folder: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` (or shards)."""
    config_path = folder / "config.json"
    try:
        data = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not a readable config.json ({error})") from None
    if not is_hf_vit_config(data):
        raise CheckpointError(
            f"{config_path} has model_type {data.get('model_type')!r}; expected 'vit' (transformers ViT)"
        )
    files = folder_weight_files(folder)
    raw, stripped = strip_prefixes(read_weight_files(files))
    state_dict, unexpected, notes = convert_hf_state_dict(raw)
    head = state_dict.get("head.weight")
    config = hf_config(data, config_path, int(head.shape[0]) if head is not None else 0)
    preprocessing = _preprocessing(folder)
    if preprocessing:
        config = config.replace(**preprocessing)
    return Checkpoint(config, state_dict, "huggingface", files, unexpected, stripped + notes)
