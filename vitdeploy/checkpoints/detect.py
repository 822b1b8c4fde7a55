"""Tell a checkpoint's format from its files (never from trying to unpickle it), and say which
supported layout an unrecognised one is closest to."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from vitdeploy.checkpoints.common import (
    CheckpointError,
    folder_weight_files,
    is_torch_file,
    is_torchscript_archive,
    safetensors_metadata,
    unwrap_state_dict,
)
from vitdeploy.checkpoints.dinov2 import is_dinov2_hub_keys
from vitdeploy.checkpoints.huggingface import SUPPORTED_MODEL_TYPES, is_hf_config
from vitdeploy.checkpoints.native import is_native_folder_config, is_native_metadata
from vitdeploy.checkpoints.openclip import CONFIG_FILE as OPENCLIP_CONFIG
from vitdeploy.checkpoints.openclip import is_openclip_folder, is_openclip_keys
from vitdeploy.checkpoints.timm import is_timm_hub_config
from vitdeploy.families.dinov3 import is_original_keys

FORMATS = ("native", "timm", "huggingface", "jax", "dinov2", "dinov3", "openclip")

EXPECTED = (
    "expected a vitdeploy folder (config.json with \"format\": \"vitdeploy\") or .safetensors file, "
    "a timm state dict (.safetensors, .pth, .pth.tar, .pt, .bin, .ckpt) or timm Hub folder, "
    "a Hugging Face folder (config.json with model_type "
    f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} + model.safetensors or pytorch_model.bin), "
    "an original DINOv2 or DINOv3 state dict (.pth, .safetensors), an OpenCLIP folder (open_clip_config.json + "
    "open_clip_model.safetensors or open_clip_pytorch_model.bin) or weight file, or an original JAX ViT .npz"
)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable JSON file ({error}); {EXPECTED}") from None


def checkpoint_path(source: str | Path) -> Path:
    """``source`` as a path that exists; a ``config.json`` (or ``open_clip_config.json``) stands for its folder."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist; {EXPECTED}")
    if path.is_file() and path.name in ("config.json", OPENCLIP_CONFIG):
        path = path.parent
    return path


def weight_keys(path: Path) -> list[str] | None:
    """The tensor names of a weight file (or a folder's weight files), read cheaply
    (safetensors header; torch pickles memory-mapped, weights only), or None if unreadable."""
    try:
        files = folder_weight_files(path) if path.is_dir() else [path]
    except CheckpointError:
        return None
    keys: list[str] = []
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(file), framework="pt") as handle:
                    keys += list(handle.keys())
            except (SafetensorError, OSError):
                return None
        elif is_torch_file(file) and not is_torchscript_archive(file):
            try:
                try:
                    loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a legacy (non-zip) pickle cannot be memory-mapped
                    loaded = torch.load(file, map_location="cpu", weights_only=True)
                keys += list(unwrap_state_dict(loaded, file)[0])
            except Exception:  # not a weights-only pickle: the format's reader says why
                return None
        else:
            return None
    prefixes = ("module.", "_orig_mod.")
    while keys and any(all(k.startswith(p) for k in keys) for p in prefixes):
        prefix = next(p for p in prefixes if all(k.startswith(p) for k in keys))
        keys = [k[len(prefix):] for k in keys]
    return keys


def detect_format(source: str | Path) -> str:
    """One of :data:`FORMATS` for the checkpoint at ``source``, or a :class:`CheckpointError` saying why not."""
    path = checkpoint_path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            if is_openclip_folder(path):
                return "openclip"
            raise CheckpointError(f"folder {path} has no config.json or {OPENCLIP_CONFIG}; {EXPECTED}")
        data = _read_json(config_path)
        if is_native_folder_config(data):
            return "native"
        if is_hf_config(data):
            return "huggingface"
        if is_timm_hub_config(data):
            return "timm"
        if is_openclip_folder(path):  # its config.json is another library's, which vitdeploy does not read
            return "openclip"
        model_type = data.get("model_type") if isinstance(data, dict) else None
        kind = f"model_type {model_type!r}" if model_type else "no recognised format marker"
        keys = weight_keys(path)
        if keys:
            raise CheckpointError(f"{config_path} has {kind}, which vitdeploy does not read; {closest_layout(keys)}")
        raise CheckpointError(f"{config_path} has {kind}; {EXPECTED}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "jax"
    if suffix == ".safetensors":
        if is_native_metadata(safetensors_metadata(path)):
            return "native"
    elif not is_torch_file(path):
        raise CheckpointError(f"cannot tell the checkpoint format of {path} from its suffix {suffix!r}; {EXPECTED}")
    keys = weight_keys(path)
    if keys is not None and is_original_keys(keys):
        return "dinov3"
    if keys is not None and is_openclip_keys(keys):
        return "openclip"
    return "dinov2" if keys is not None and is_dinov2_hub_keys(keys) else "timm"


# --------------------------------------------------------------------------- closest layout

_VIT_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias")
_LS = ("ls1.gamma", "ls2.gamma")
_NORM = ("norm.weight", "norm.bias")
_PATCH = ("patch_embed.proj.weight", "patch_embed.proj.bias")
_HEAD = ("head.weight", "head.bias")
_MAP = tuple(f"attn_pool.{n}" for n in ("latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight",
                                         "proj.bias", "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                         "mlp.fc2.weight", "mlp.fc2.bias"))


def _hf_block(table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(f"{module}.{kind}" for module, kinds in table.items() for kind in kinds)


_WB = ("weight", "bias")
_HF_VIT_BLOCK = _hf_block({m: _WB for m in ("attention.attention.query", "attention.attention.key",
                                             "attention.attention.value", "attention.output.dense",
                                             "intermediate.dense", "output.dense", "layernorm_before",
                                             "layernorm_after")})
_HF_DINOV2_BLOCK = _hf_block({m: _WB for m in ("attention.attention.query", "attention.attention.key",
                                                "attention.attention.value", "attention.output.dense", "norm1",
                                                "norm2", "mlp.fc1", "mlp.fc2")}) + (
    "layer_scale1.lambda1", "layer_scale2.lambda1")
_HF_CLIP_BLOCK = _hf_block({m: _WB for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1",
                                              "mlp.fc2")})
_HF_PATCH = ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias")


def _layout(top: tuple[str, ...], block_prefix: str, block: tuple[str, ...]) -> frozenset[str]:
    return frozenset(top) | {f"{block_prefix}.N.{name}" for name in block}


# Each supported source layout by its tensor names (block index written N, model prefixes dropped).
LAYOUTS: dict[str, frozenset[str]] = {
    "timm ViT": _layout(("cls_token", "pos_embed", *_PATCH, *_NORM, *_HEAD), "blocks", _VIT_BLOCK),
    "timm DeiT (distilled)": _layout(("cls_token", "dist_token", "pos_embed", *_PATCH, *_NORM, *_HEAD,
                                      "head_dist.weight", "head_dist.bias"), "blocks", _VIT_BLOCK),
    "timm DeiT III": _layout(("cls_token", "pos_embed", *_PATCH, *_NORM, *_HEAD), "blocks", _VIT_BLOCK + _LS),
    "timm DINOv2": _layout(("cls_token", "pos_embed", *_PATCH, *_NORM), "blocks", _VIT_BLOCK + _LS),
    "timm DINOv2 with registers": _layout(("cls_token", "reg_token", "pos_embed", *_PATCH, *_NORM), "blocks",
                                          _VIT_BLOCK + _LS),
    "timm CLIP image tower": _layout(("cls_token", "pos_embed", "patch_embed.proj.weight", "norm_pre.weight",
                                      "norm_pre.bias", *_NORM), "blocks", _VIT_BLOCK),
    "timm SigLIP image tower": _layout(("pos_embed", *_PATCH, *_NORM, *_MAP), "blocks", _VIT_BLOCK),
    "original DINOv2": _layout(("cls_token", "pos_embed", "mask_token", *_PATCH, *_NORM), "blocks",
                               _VIT_BLOCK + _LS),
    "original DINOv2 with registers": _layout(("cls_token", "register_tokens", "pos_embed", "mask_token",
                                               *_PATCH, *_NORM), "blocks", _VIT_BLOCK + _LS),
    "Hugging Face ViT": _layout(("embeddings.cls_token", "embeddings.position_embeddings", *_HF_PATCH,
                                 "layernorm.weight", "layernorm.bias"), "encoder.layer", _HF_VIT_BLOCK),
    "Hugging Face DeiT": _layout(("embeddings.cls_token", "embeddings.distillation_token",
                                  "embeddings.position_embeddings", *_HF_PATCH, "layernorm.weight",
                                  "layernorm.bias"), "encoder.layer", _HF_VIT_BLOCK),
    "Hugging Face DINOv2": _layout(("embeddings.cls_token", "embeddings.mask_token",
                                    "embeddings.position_embeddings", *_HF_PATCH, "layernorm.weight",
                                    "layernorm.bias"), "encoder.layer", _HF_DINOV2_BLOCK),
    "Hugging Face DINOv2 with registers": _layout(("embeddings.cls_token", "embeddings.mask_token",
                                                   "embeddings.register_tokens", "embeddings.position_embeddings",
                                                   *_HF_PATCH, "layernorm.weight", "layernorm.bias"),
                                                  "encoder.layer", _HF_DINOV2_BLOCK),
    "Hugging Face CLIP image tower": _layout(("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                                              "embeddings.position_embedding.weight", "pre_layrnorm.weight",
                                              "pre_layrnorm.bias", "post_layernorm.weight",
                                              "post_layernorm.bias"), "encoder.layers", _HF_CLIP_BLOCK),
    "Hugging Face SigLIP image tower": _layout(("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
                                                "embeddings.position_embedding.weight", "post_layernorm.weight",
                                                "post_layernorm.bias", "head.probe"), "encoder.layers",
                                               _HF_CLIP_BLOCK),
}
_MODEL_PREFIXES = ("module.", "_orig_mod.", "vit.", "deit.", "dinov2_with_registers.", "dinov2.", "vision_model.")
_INDEX = re.compile(r"\.\d+\.")


def normalise_keys(keys: Iterable[str]) -> frozenset[str]:
    """Tensor names as :data:`LAYOUTS` writes them: model prefixes dropped, block indices written ``N``."""
    names = set()
    for key in keys:
        for prefix in _MODEL_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        names.add(_INDEX.sub(".N.", key, count=1))
    return frozenset(names)


def _listed(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclass(frozen=True)
class LayoutMatch:
    """How the tensor names of a file compare with the supported layout they overlap most."""

    label: str
    shared: int
    size: int
    missing: frozenset[str]
    unexpected: frozenset[str]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.unexpected


def match_layout(keys: Iterable[str]) -> LayoutMatch:
    """The :data:`LAYOUTS` entry whose tensor names overlap ``keys`` most (Jaccard index of the names)."""
    names = normalise_keys(keys)

    def score(item: tuple[str, frozenset[str]]) -> float:
        union = names | item[1]
        return len(names & item[1]) / len(union) if union else 0.0

    label, layout = max(LAYOUTS.items(), key=score)
    return LayoutMatch(label, len(names & layout), len(layout), layout - names, names - layout)


def closest_layout(keys: Iterable[str]) -> str:
    """One line: the supported layout whose tensor names overlap ``keys`` most, and the names that differ."""
    keys = list(keys)
    match = match_layout(keys)
    if not match.shared:
        return f"its tensor names share nothing with any supported layout ({_listed(normalise_keys(keys))}); {EXPECTED}"
    parts = [f"closest supported layout is {match.label} ({match.shared} of its {match.size} tensor names)"]
    if match.missing:
        parts.append(f"missing {_listed(match.missing)}")
    if match.unexpected:
        parts.append(f"unexpected {_listed(match.unexpected)}")
    return "; ".join(parts)
