"""The original JAX/Flax ``.npz`` checkpoints of google-research/vision_transformer.

Flax stores dense kernels as ``[in, out]`` and convolutions as HWIO; attention projections keep
the heads as their own axis (``query/kernel [D, heads, head_dim]``, ``out/kernel
[heads, head_dim, D]``), which also tells us the number of heads. Hybrid (R50+ViT) checkpoints
add the ResNet-v2 stem and stages (``conv_root``, ``gn_root``, ``block{s}/unit{u}/...``).
The arrays are converted to timm-named tensors and the architecture inferred from their shapes.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from vitdeploy.checkpoints.common import Checkpoint, CheckpointError, StateDict, infer_config

_PREFIXES = ("opt/target/", "params/")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_UNIT = re.compile(r"^block(\d+)/unit(\d+)/(conv[123]|conv_proj|gn[123]|gn_proj)/(kernel|scale|bias)$")
_BACKBONE = "patch_embed.backbone."


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _conv(array: np.ndarray) -> torch.Tensor:
    """HWIO → OIHW."""
    return _tensor(array.transpose(3, 2, 0, 1))


def _vector(array: np.ndarray) -> torch.Tensor:
    # Norm scales/biases sometimes come as [1, 1, 1, C].
    return _tensor(array.reshape(-1))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (``allow_pickle=False``), with a Flax ``opt/target/`` prefix removed."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is not a readable .npz archive: {error}") from None
    for prefix in _PREFIXES:
        if f"{prefix}embedding/kernel" in arrays:
            arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            break
    if "pos_embedding" in arrays or "Transformer/encoderblock/LayerNorm_0/scale" in arrays:
        raise CheckpointError(
            f"{path} is a big_vision checkpoint; only the original google-research/vision_transformer "
            "layout (Transformer/encoderblock_N/...) is supported"
        )
    return arrays


def _block_param(index: int, rest: str, array: np.ndarray, out: StateDict, qkv: dict) -> bool:
    """Convert one ``Transformer/encoderblock_N/...`` array; False if the name is unknown."""
    prefix = f"blocks.{index}."
    norms = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2"}
    module, _, leaf = rest.rpartition("/")
    if module in norms and leaf in ("scale", "bias"):
        out[f"{prefix}{norms[module]}.{'weight' if leaf == 'scale' else 'bias'}"] = _vector(array)
    elif module in ("MlpBlock_3/Dense_0", "MlpBlock_3/Dense_1") and leaf in ("kernel", "bias"):
        fc = "fc1" if module.endswith("0") else "fc2"
        out[f"{prefix}mlp.{fc}.{'weight' if leaf == 'kernel' else 'bias'}"] = (
            _tensor(array.T) if leaf == "kernel" else _vector(array))
    elif module.startswith("MultiHeadDotProductAttention_1/") and leaf in ("kernel", "bias"):
        proj = module.split("/", 1)[1]
        if proj in ("query", "key", "value"):
            # kernel [D, heads, hd] → rows of the fused [3*heads*hd, D]; bias [heads, hd] → flat.
            tensor = _tensor(array.reshape(array.shape[0], -1).T) if leaf == "kernel" else _vector(array)
            qkv.setdefault((index, leaf), {})[proj] = (tensor, array.shape)
        elif proj == "out":
            if leaf == "kernel":  # [heads, hd, D] → [D, heads*hd]
                out[f"{prefix}attn.proj.weight"] = _tensor(array.reshape(-1, array.shape[-1]).T)
            else:
                out[f"{prefix}attn.proj.bias"] = _vector(array)
        else:
            return False
    else:
        return False
    return True


def _backbone_param(name: str, array: np.ndarray, out: StateDict) -> bool:
    """Convert one ResNet-v2 array of a hybrid; False if the name is unknown."""
    if name == "conv_root/kernel":
        out[f"{_BACKBONE}stem.conv.weight"] = _conv(array)
    elif name in ("gn_root/scale", "gn_root/bias"):
        out[f"{_BACKBONE}stem.norm.{'weight' if name.endswith('scale') else 'bias'}"] = _vector(array)
    elif match := _UNIT.match(name):
        stage, unit, module, leaf = int(match[1]) - 1, int(match[2]) - 1, match[3], match[4]
        block = f"{_BACKBONE}stages.{stage}.blocks.{unit}."
        if module == "conv_proj" and leaf == "kernel":
            out[f"{block}downsample.conv.weight"] = _conv(array)
        elif module == "gn_proj" and leaf != "kernel":
            out[f"{block}downsample.norm.{'weight' if leaf == 'scale' else 'bias'}"] = _vector(array)
        elif module.startswith("conv") and leaf == "kernel":
            out[f"{block}{module}.weight"] = _conv(array)
        elif module.startswith("gn") and leaf != "kernel":
            out[f"{block}norm{module[-1]}.{'weight' if leaf == 'scale' else 'bias'}"] = _vector(array)
        else:
            return False
    else:
        return False
    return True


def convert_jax_arrays(arrays: dict[str, np.ndarray]) -> tuple[StateDict, list[str], int | None]:
    """Convert vision_transformer arrays to timm-named tensors; returns (state dict, unknown names, heads)."""
    out: StateDict = {}
    unknown: list[str] = []
    qkv: dict[tuple[int, str], dict[str, tuple[torch.Tensor, tuple[int, ...]]]] = {}
    simple = {
        "embedding/bias": ("patch_embed.proj.bias", _vector),
        "Transformer/encoder_norm/scale": ("norm.weight", _vector),
        "Transformer/encoder_norm/bias": ("norm.bias", _vector),
        "head/bias": ("head.bias", _vector),
        "pre_logits/bias": ("pre_logits.fc.bias", _vector),
        "cls": ("cls_token", _tensor),
        "Transformer/posembed_input/pos_embedding": ("pos_embed", _tensor),
    }
    for name, array in arrays.items():
        if name in simple:
            target, convert = simple[name]
            out[target] = convert(array)
        elif name == "embedding/kernel":
            out["patch_embed.proj.weight"] = _conv(array)
        elif name in ("head/kernel", "pre_logits/kernel"):
            out["head.weight" if name.startswith("head") else "pre_logits.fc.weight"] = _tensor(array.T)
        elif match := _BLOCK.match(name):
            if not _block_param(int(match[1]), match[2], array, out, qkv):
                unknown.append(name)
        elif not _backbone_param(name, array, out):
            unknown.append(name)
    heads = None
    for (index, leaf), parts in sorted(qkv.items()):
        if len(parts) != 3:  # leaves blocks.N.attn.qkv missing; the orphans are reported with it
            unknown.extend(f"Transformer/encoderblock_{index}/MultiHeadDotProductAttention_1/{p}/{leaf}"
                           for p in parts)
            continue
        out[f"blocks.{index}.attn.qkv.{'weight' if leaf == 'kernel' else 'bias'}"] = torch.cat(
            [parts[p][0] for p in ("query", "key", "value")], dim=0)
        if leaf == "kernel" and len(parts["query"][1]) == 3:
            heads = int(parts["query"][1][1])
    if "head.weight" in out and out["head.weight"].numel() == 0:  # a 0-class head carries nothing
        out.pop("head.weight")
        out.pop("head.bias", None)
    return out, unknown, heads


def read_jax(path: Path, num_heads: int | None = None) -> Checkpoint:
    """Read an original ViT ``.npz``; heads come from the attention kernels unless ``num_heads`` is given."""
    arrays = read_npz(path)
    state_dict, unknown, heads = convert_jax_arrays(arrays)
    # timm's resampling by default: timm is how PyTorch users load these files (its npz loader resamples
    # like its forward pass); the original code's scipy zoom is pos_embed_resample="jax".
    config, notes = infer_config(state_dict, str(path), num_heads=num_heads if num_heads is not None else heads,
                                 base={"pos_embed_resample": "timm"})
    return Checkpoint(config, state_dict, "jax", [path], unexpected=unknown, notes=notes)
