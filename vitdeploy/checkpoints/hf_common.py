"""Pieces every Hugging Face transformers folder shares: layer renaming with q/k/v fusion,
labels from ``id2label``, preprocessing from ``preprocessor_config.json``, activation names.

transformers keeps query, key and value as three projections; vitdeploy (like timm) has one
fused ``attn.qkv``. :func:`rename_layers` renames the per-layer tensors of any transformers
layout given its module table, and concatenates the three parts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from vitdeploy.checkpoints.common import CheckpointError, StateDict

# PIL resampling codes used by transformers image processors.
RESAMPLE_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# transformers' hidden_act names → vitdeploy's ``act`` (GELU variants only; others are refused).
ACTIVATIONS = {
    "gelu": "gelu", "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
}
QKV_PARTS = ("attn.q", "attn.k", "attn.v")


def activation(name: Any, where: Path | str) -> str:
    """vitdeploy's ``act`` for a transformers ``hidden_act``, or a :class:`CheckpointError`."""
    if name not in ACTIVATIONS:
        raise CheckpointError(
            f"{where}: hidden_act {name!r} is not supported; expected one of {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def square(value: Any, name: str, where: Path | str) -> int:
    """An image or patch size that must be square, as one int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: {name} {value} is not square; vitdeploy supports square sizes only")
        value = value[0]
    return int(value)


def labels(data: dict[str, Any], num_classes: int | None = None) -> list[str] | None:
    """Class names from ``id2label`` (None for transformers' ``LABEL_i`` placeholders, or a count
    that differs from ``num_classes``)."""
    id2label = data.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if names == [f"LABEL_{i}" for i in range(len(names))]:
        return None  # transformers' placeholders carry no information
    if num_classes is not None and len(names) != num_classes:
        return None
    return names


def preprocessing(folder: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """mean/std/interpolation and the resize (``crop_pct``, ``resize_mode``) from ``preprocessor_config.json``,
    when there is one; what vitdeploy cannot reproduce is said in ``notes``."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}; expected an image processor's settings")
    notes = notes if notes is not None else []
    fields: dict[str, Any] = {}
    if data.get("image_mean") is not None:
        fields["mean"] = tuple(data["image_mean"])
    if data.get("image_std") is not None:
        fields["std"] = tuple(data["image_std"])
    if data.get("do_normalize") is False:  # the rescaled pixels as they are
        fields.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    # vitdeploy computes (pixel / 255 - mean) / std; a processor's (pixel * factor - mean) / std is the
    # same with mean and std divided by 255 * factor
    factor = 1.0 if data.get("do_rescale") is False else float(data.get("rescale_factor") or 1 / 255)
    if abs(factor * 255 - 1) > 1e-9:
        if "mean" not in fields or "std" not in fields:
            notes.append(f"{path.name}: the processor scales pixels by {factor:g} but names no mean and std; "
                         "vitdeploy scales them to 0..1")
        else:
            fields.update(mean=tuple(v / (factor * 255) for v in fields["mean"]),
                          std=tuple(v / (factor * 255) for v in fields["std"]))
    if data.get("resample") in RESAMPLE_CODES:
        fields["interpolation"] = RESAMPLE_CODES[data["resample"]]
    return {**fields, **_resize(data, path, notes)}


# transformers image processors that read a plain-number ``size`` as the short side (the rest as a square).
_SHORT_SIDE_PROCESSORS = ("CLIPImageProcessor", "CLIPFeatureExtractor", "BitImageProcessor", "SiglipImageProcessor")


def _size_dict(value: Any, short_side: bool) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"shortest_edge": value} if short_side else {"height": value, "width": value}
    return None


def _resize(data: dict[str, Any], path: Path, notes: list[str]) -> dict[str, Any]:
    """``crop_pct`` and ``resize_mode`` of a transformers image processor's resize and centre crop."""
    kind = str(data.get("image_processor_type") or data.get("feature_extractor_type") or "")
    short_side = kind.removesuffix("Fast").removesuffix("Pil") in _SHORT_SIDE_PROCESSORS
    size = _size_dict(data.get("size"), short_side)
    crop = _size_dict(data.get("crop_size"), False)
    if data.get("do_resize") is False or size is None:
        return {}
    cropped = bool(data.get("do_center_crop", crop is not None)) and crop is not None and crop.get("height")
    if size.get("shortest_edge"):
        edge, mode = size["shortest_edge"], "shortest"
        if not cropped:
            notes.append(f"{path.name}: the processor keeps the whole resized image (short side "
                         f"{edge}, no crop); vitdeploy centre-crops it square")
    elif size.get("height") and size.get("width"):
        edge, mode = size["height"], "squash"
        if size["height"] != size["width"]:
            notes.append(f"{path.name}: the processor resizes to {size['height']}x{size['width']}, which vitdeploy "
                         "does not reproduce (it resizes to a square)")
            return {}
    else:
        return {}
    return {"resize_mode": mode, "crop_pct": min(float(crop["height"]) / float(edge), 1.0) if cropped else 1.0}


def strip_model_prefix(source: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    """Drop the first of ``prefixes`` (``"vit."``, ``"dinov2."``, ``"vision_model."`` ...) that some key has,
    from every key that has it (heads such as ``classifier.*`` sit outside the prefix)."""
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in source):
            return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in source.items()}
    return source


def rename_layers(source: StateDict, layer_key: re.Pattern[str], modules: dict[str, str],
                  params: dict[str, str] | None = None) -> tuple[StateDict, StateDict, list[str]]:
    """Rename the per-layer tensors of ``source``: ``(ours, the keys that are not layer keys, unexpected)``.

    ``layer_key`` matches a layer tensor with groups (index, rest). ``rest`` is looked up whole in
    ``params`` (``"layer_scale1.lambda1": "ls1.gamma"``), else as ``module.weight``/``module.bias``
    in ``modules`` (``"layer_norm1": "norm1"``; targets ``attn.q``/``attn.k``/``attn.v`` are fused
    into ``attn.qkv``). A layer tensor matching neither, or a q/k/v part without its siblings,
    is unexpected.
    """
    params = params or {}
    out: StateDict = {}
    rest: StateDict = {}
    unexpected: list[str] = []
    parts: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in source.items():
        match = layer_key.match(key)
        if match is None:
            rest[key] = tensor
            continue
        index, name = int(match[1]), match[2]
        if name in params:
            out[f"blocks.{index}.{params[name]}"] = tensor
            continue
        module, _, kind = name.rpartition(".")
        target = modules.get(module)
        if target is None or kind not in ("weight", "bias"):
            unexpected.append(key)
        elif target in QKV_PARTS:
            parts.setdefault((index, kind), {})[target[-1]] = (key, tensor)
        else:
            out[f"blocks.{index}.{target}.{kind}"] = tensor
    for (index, kind), qkv in sorted(parts.items()):
        if len(qkv) != 3:  # leaves blocks.N.attn.qkv missing; the orphans are reported with it
            unexpected.extend(key for key, _ in qkv.values())
            continue
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([qkv[n][1] for n in "qkv"], dim=0)
    return out, rest, unexpected
