"""timm state dicts: our parameter names are timm's, so the mapping is the identity.

Accepted: ``.safetensors`` or weights-only torch pickles (``.pth``/``.pt``/``.bin``/``.ckpt``),
bare or under ``state_dict``/``model``/``state_dict_ema``/``model_ema``, with or without a
``module.`` prefix; and timm's Hugging Face Hub folders (``config.json`` with ``architecture``
and ``pretrained_cfg`` beside ``model.safetensors``). The architecture is inferred from the
tensor shapes (:func:`vitdeploy.checkpoints.common.infer_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vitdeploy.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    folder_weight_files,
    infer_config,
    read_safetensors,
    read_torch,
    read_weight_files,
    strip_prefixes,
    unwrap_state_dict,
)

HF_MARKERS = ("embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.weight")


def is_timm_hub_config(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("architecture"), str)


def _hub_fields(data: dict[str, Any], where: Path) -> tuple[dict[str, Any], int | None]:
    """Config fields (preprocessing, labels) and ``model_args.num_heads`` from a timm Hub ``config.json``."""
    architecture = data["architecture"].split(".")[0]
    if not architecture.startswith("vit_"):
        raise CheckpointError(f"{where}: timm architecture {data['architecture']!r} is not a ViT; expected vit_*")
    fields: dict[str, Any] = {}
    pretrained = data.get("pretrained_cfg") or {}
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if pretrained.get(key) is not None:
            fields[key] = pretrained[key]
    labels = data.get("label_names")
    if isinstance(labels, list) and labels:
        fields["labels"] = [str(label) for label in labels]
    heads = (data.get("model_args") or {}).get("num_heads")
    return fields, int(heads) if heads is not None else None


def read_timm(path: Path, num_heads: int | None = None) -> Checkpoint:
    """Read a timm state dict file or timm Hub folder; ``num_heads`` overrides the inferred heads."""
    notes: list[str] = []
    base: dict[str, Any] = {}
    if path.is_dir():
        config_path = path / "config.json"
        data = json.loads(config_path.read_text())
        if not is_timm_hub_config(data):
            raise CheckpointError(f"{config_path} has no \"architecture\"; not a timm Hub folder")
        base, hub_heads = _hub_fields(data, config_path)
        num_heads = num_heads if num_heads is not None else hub_heads
        files = folder_weight_files(path)
        state_dict = read_weight_files(files)
    else:
        files = [path]
        if path.suffix == ".safetensors":
            state_dict, _ = read_safetensors(path)
        else:
            state_dict, notes = unwrap_state_dict(read_torch(path), path)
    state_dict, stripped = strip_prefixes(state_dict)
    notes += stripped
    if any(key in state_dict for key in HF_MARKERS):
        raise CheckpointError(
            f"{path} looks like a Hugging Face transformers ViT state dict; pass the model folder "
            "(with its config.json) instead, or format='huggingface'"
        )
    labels = base.get("labels")
    head = state_dict.get("head.weight")
    if labels is not None and (head is None or len(labels) != head.shape[0]):
        notes.append(f"ignored {len(labels)} label_names that do not match the head")
        base.pop("labels")
    base["pos_embed_resample"] = "timm"
    config, inferred = infer_config(state_dict, str(path), num_heads=num_heads, base=base)
    return Checkpoint(config, state_dict, "timm", files, notes=notes + inferred)
