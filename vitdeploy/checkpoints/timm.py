"""timm state dicts: our parameter names are timm's, so the mapping is the identity.

Accepted: ``.safetensors`` or weights-only torch pickles (``.pth``/``.pt``/``.bin``/``.ckpt``),
bare or under ``state_dict``/``model``/``state_dict_ema``/``model_ema``, with or without a
``module.`` prefix; and timm's Hugging Face Hub folders (``config.json`` with ``architecture``
and ``pretrained_cfg`` beside ``model.safetensors``). The architecture is inferred from the
tensor names and shapes (:func:`vitdeploy.checkpoints.common.infer_config`), for every family timm
holds under these names: ViT, DeiT (``dist_token``/``head_dist``), DeiT III, DINOv2 (``reg_token``),
CLIP towers and SigLIP (``attn_pool``). Checkpoints of timm's ``Eva`` and other families
(:mod:`vitdeploy.families`: DINOv3, EVA-02, Perception Encoder, AIMv2) are read by
:mod:`vitdeploy.checkpoints.families`: a Hub folder's ``architecture`` (or ``model=``) names the
family, a bare state dict is read as one only where its tensor names fit it alone.

timm stores a CLIP tower's visual projection as ``head`` (``num_classes`` = the projection width,
its bias zero, as timm's OpenCLIP conversion writes it); vitdeploy's name for it is ``proj``
(no bias), so such a head is renamed: a CLIP tower (``norm_pre``, no patch bias) whose head bias
is all zero is an embedder, one with a bias is a fine-tuned classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vitdeploy.checkpoints.common import (
    ArchitectureRefused,
    Checkpoint,
    CheckpointError,
    StateDict,
    folder_weight_files,
    infer_config,
    name_in_file_name,
    read_weight_file,
    read_weight_files,
    strip_prefixes,
)
from vitdeploy.checkpoints.families import architecture_family, bare_family, family_named_by_file, read_family
from vitdeploy.variants import VARIANTS

# Architecture name prefixes of the timm models vitdeploy reads.
TIMM_PREFIXES = ("vit_", "deit_", "deit3_")
# Parts of timm names of vit_* models built by other classes than its VisionTransformer.
_FOREIGN_MARKERS = ("rope", "_pe_", "dinov3", "naflex", "eva", "aimv2", "lingbot", "sapiens")
# Parts of timm names of VisionTransformers whose blocks compute differently under the same tensor names
# (ResPostBlock: the norms after attention and MLP), refused even where only a file's name says so.
_SAME_NAMES_OTHER_BLOCKS = {"_rpn_": "timm's residual post-norm ViT (ResPostBlock: each norm after its branch)"}
# timm's pretrained_cfg crop_mode → vitdeploy's resize_mode ("border", letterboxing, is not reproduced).
_CROP_MODES = {"center": "shortest", "squash": "squash"}
HF_MARKERS = ("embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.weight")


def is_timm_hub_config(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("architecture"), str)


def _hub_fields(data: dict[str, Any], where: Path, notes: list[str]) -> tuple[dict[str, Any], int | None, str]:
    """Config fields (preprocessing, labels), ``model_args.num_heads`` and the architecture name
    from a timm Hub ``config.json`` (what is not reproduced is said in ``notes``)."""
    architecture = data["architecture"].split(".")[0]
    if not architecture.startswith(TIMM_PREFIXES) and architecture_family(architecture, str(where)) is None:
        raise CheckpointError(f"{where}: timm architecture {data['architecture']!r} is not a ViT; expected "
                              f"{', '.join(p + '*' for p in TIMM_PREFIXES)}")
    fields: dict[str, Any] = {}
    pretrained = data.get("pretrained_cfg") or {}
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if pretrained.get(key) is not None:
            fields[key] = pretrained[key]
    crop_mode = pretrained.get("crop_mode") or "center"
    if pretrained and crop_mode in _CROP_MODES:
        fields["resize_mode"] = _CROP_MODES[crop_mode]
    elif pretrained:
        notes.append(f"{where.name}: pretrained_cfg crop_mode {crop_mode!r} is not reproduced; vitdeploy resizes "
                     "the short side and centre-crops")
    labels = data.get("label_names")
    if isinstance(labels, list) and labels:
        fields["labels"] = [str(label) for label in labels]
    heads = (data.get("model_args") or {}).get("num_heads")
    return fields, int(heads) if heads is not None else None, architecture


def clip_head_as_projection(state_dict: StateDict, notes: list[str]) -> StateDict:
    """A timm CLIP tower's zero-bias ``head`` renamed to vitdeploy's bias-free ``proj`` (see the module doc)."""
    head, bias = state_dict.get("head.weight"), state_dict.get("head.bias")
    is_clip = "norm_pre.weight" in state_dict and "patch_embed.proj.bias" not in state_dict
    if not is_clip or head is None or bias is None or "proj.weight" in state_dict or torch.count_nonzero(bias):
        return state_dict
    state_dict = {k: v for k, v in state_dict.items() if k not in ("head.weight", "head.bias")}
    state_dict["proj.weight"] = head
    notes.append(f"read the CLIP tower's zero-bias head [{head.shape[0]}, {head.shape[1]}] as its visual "
                 "projection proj (image_embeds)")
    return state_dict


def stem_only_backbone_as_stem(state_dict: StateDict) -> StateDict:
    """A hybrid whose ResNet is its stem alone (timm's ``vit_tiny_r_s16_p8_*``: ``patch_embed.backbone``
    is the stem itself) under vitdeploy's names, ``patch_embed.backbone.stem.*``."""
    if "patch_embed.backbone.conv.weight" not in state_dict:
        return state_dict
    prefix = "patch_embed.backbone."
    return {prefix + "stem." + k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def read_timm(path: Path, num_heads: int | None = None, model: str | None = None) -> Checkpoint:
    """Read a timm state dict file or timm Hub folder; ``num_heads`` overrides the inferred heads.

    A family variant's architecture (the Hub folder's, or ``model``) is built exactly or refused
    (:mod:`vitdeploy.checkpoints.families`); so is a bare state dict whose names fit two architectures.
    """
    notes: list[str] = []
    base: dict[str, Any] = {}
    architecture = None
    model_args: dict[str, Any] = {}
    if path.is_dir():
        config_path = path / "config.json"
        data = json.loads(config_path.read_text())
        if not is_timm_hub_config(data):
            raise CheckpointError(f"{config_path} has no \"architecture\"; not a timm Hub folder")
        base, hub_heads, architecture = _hub_fields(data, config_path, notes)
        model_args = dict(data.get("model_args") or {})
        num_heads = num_heads if num_heads is not None else hub_heads
        files = folder_weight_files(path)
        state_dict = read_weight_files(files)
    else:
        files = [path]
        state_dict, notes = read_weight_file(path)
    state_dict, stripped = strip_prefixes(state_dict)
    return timm_checkpoint(state_dict, path, files, architecture=architecture, model=model, num_heads=num_heads,
                           base=base, model_args=model_args, notes=notes + stripped)


def timm_checkpoint(state_dict: StateDict, path: Path, files: list[Path], *, architecture: str | None = None,
                    model: str | None = None, num_heads: int | None = None, base: dict[str, Any] | None = None,
                    model_args: dict[str, Any] | None = None, notes: list[str] | None = None,
                    source_format: str = "timm") -> Checkpoint:
    """A state dict in timm's names (read from ``path``) as a :class:`Checkpoint`: a family variant where
    ``architecture``, ``model``, the file name or the tensor names say so (:func:`read_timm`), else a ViT."""
    notes = list(notes or [])
    base = dict(base or {})
    file_name = name_in_file_name(path) if path.is_file() else None
    state_dict = stem_only_backbone_as_stem(state_dict)
    if any(key in state_dict for key in HF_MARKERS):
        raise CheckpointError(
            f"{path} looks like a Hugging Face transformers ViT state dict; pass the model folder "
            "(with its config.json) instead, or format='huggingface'"
        )
    family = architecture_family(architecture, str(path))
    if family is None and model is not None:
        family = architecture_family(model, str(path))
        architecture = model if family is not None else architecture
    if family is None and architecture is None and path.is_file():
        family, architecture = family_named_by_file(path, state_dict, notes)
    named = architecture or model or file_name or ""
    for marker, what in _SAME_NAMES_OTHER_BLOCKS.items():
        if marker in named and named not in VARIANTS:
            hint = "" if architecture or model else " (the file's name says so: rename the file if it is not)"
            raise ArchitectureRefused(f"{path}: {named!r} names {what}, which vitdeploy does not build; its tensor "
                                      f"names are a pre-norm ViT's, so it is refused rather than read as one{hint}")
    if family is None and architecture is None:
        family = bare_family(state_dict, str(path))
    if family is not None:
        if architecture is not None and model is not None and architecture.split(".")[0] != model:
            raise ArchitectureRefused(f"{path} names the architecture {architecture!r}; model={model!r} names another")
        checkpoint = read_family(family, "timm", state_dict, str(path), files, architecture, num_heads, base,
                                 model_args or {}, notes)
        checkpoint.format = source_format
        return checkpoint
    if architecture is not None and architecture not in VARIANTS and any(
            marker in architecture for marker in _FOREIGN_MARKERS):
        raise ArchitectureRefused(f"{path}: architecture {architecture!r} is not one vitdeploy builds (its name says "
                              "it differs from the ViT layouts); refusing to read it as the closest one")
    state_dict = clip_head_as_projection(state_dict, notes)
    labels = base.get("labels")
    head = state_dict.get("head.weight")
    if labels is not None and (head is None or len(labels) != head.shape[0]):
        notes.append(f"ignored {len(labels)} label_names that do not match the head")
        base.pop("labels")
    base["pos_embed_resample"] = "timm"
    config, inferred = infer_config(state_dict, str(path), num_heads=num_heads, base=base, prefer=architecture,
                                    file_name=file_name, pooling=(model_args or {}).get("global_pool"))
    return Checkpoint(config, state_dict, source_format, files, notes=notes + inferred)
