"""The original DINOv2 state dicts (facebookresearch/dinov2, ``torch.hub``): ``.pth`` or ``.safetensors``.

Their names are almost timm's: ``cls_token``, ``pos_embed`` (class token included),
``register_tokens``, ``mask_token`` (masked-image modelling only, dropped), ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``;
checkpoints saved with ``block_chunks`` name the blocks ``blocks.C.N``. With registers, the class
token's position embedding is folded into ``cls_token`` (timm's ``reg4`` models and vitdeploy give
prefix tokens no position embedding; the original adds it before inserting the registers).

The original resamples position embeddings with bicubic interpolation, no antialias, and scale
factors ``(new + 0.1) / old`` for the models without registers (``interpolate_offset=0.1``), and
with antialiased bicubic at the exact size for the register models (``interpolate_antialias=True,
interpolate_offset=0``, i.e. timm's convention).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from vitdeploy.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    StateDict,
    read_weight_file,
    strip_prefixes,
)
from vitdeploy.checkpoints.conversion import Conversion, build_config, grid_side
from vitdeploy.constants import IMAGENET_MEAN, IMAGENET_STD

# Name of the position-embedding convention of the DINOv2 models without registers (vitdeploy.pos_embed).
DINOV2_RESAMPLE = "dinov2"
HEAD_WIDTH = 64  # every DINOv2 size (S 384/6, B 768/12, L 1024/16, g 1536/24) has 64-wide heads
_SIZES = {384: "s", 768: "b", 1024: "l", 1536: "g"}
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.(.+)$")
_SWIGLU = re.compile(r"^blocks\.\d+\.mlp\.(w12|w3)\.")


def is_dinov2_hub_keys(keys: Iterable[str]) -> bool:
    """Whether tensor names are the original DINOv2's (``mask_token`` or ``register_tokens`` beside
    ``patch_embed.proj.weight``); without either, the names are exactly timm's ``vit_*_dinov2``."""
    names = set(keys)
    return "patch_embed.proj.weight" in names and bool({"mask_token", "register_tokens"} & names)


def convert_dinov2_hub(source: StateDict, where: str, num_heads: int | None = None) -> Conversion:
    """Rename an original DINOv2 state dict to vitdeploy's names, with its config fields."""
    out: StateDict = {}
    notes: list[str] = []
    swiglu = any(_SWIGLU.match(k) for k in source)  # ViT-g: SwiGLUFFNFused w12 (gate; value) and w3
    for key, tensor in source.items():
        if key == "mask_token":
            notes.append("ignored mask_token (masked-image modelling only)")
            continue
        match = _CHUNKED.match(key)
        key = f"blocks.{match[1]}.{match[2]}" if match else key
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = tensor
    if any(_CHUNKED.match(k) for k in source):
        notes.append("flattened the block_chunks names blocks.C.N.* to blocks.N.*")
    registers = "register_tokens" in out
    num_reg = 0
    if registers:
        out["reg_token"] = out.pop("register_tokens")
        num_reg = int(out["reg_token"].shape[1])
        if "cls_token" in out and "pos_embed" in out:
            out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
            out["pos_embed"] = out["pos_embed"][:, 1:]
            notes.append("folded the class token's position embedding into cls_token (prefix tokens carry "
                         "no position embedding, as in timm's reg4 DINOv2)")
    proj, fc1 = out.get("patch_embed.proj.weight"), out.get("blocks.0.mlp.fc1.weight")
    if proj is None or proj.ndim != 4 or fc1 is None or "pos_embed" not in out:
        raise CheckpointError(f"{where}: not a DINOv2 state dict (no patch_embed.proj.weight [D, C, p, p], "
                              "pos_embed or blocks.0.mlp.fc1.weight)")
    hidden, patch = int(proj.shape[0]), int(proj.shape[-1])
    if num_heads is None:
        num_heads = max(hidden // HEAD_WIDTH, 1)
        notes.append(f"{num_heads} attention heads ({HEAD_WIDTH}-wide, as in every DINOv2): the weights do not "
                     "store the head count; pass num_heads= (CLI: `vitdeploy convert --num-heads N`, or --model NAME) if this model differs")
    side = grid_side(out["pos_embed"], 0 if registers else 1, where)
    head = out.get("head.weight")
    size = _SIZES.get(hidden)
    fields = dict(
        family="dinov2", name=f"dinov2_vit{size}{patch}{'_reg' if registers else ''}" if size else "dinov2",
        image_size=side * patch, patch_size=patch, in_channels=int(proj.shape[1]), hidden_size=hidden,
        depth=len({int(k.split(".")[1]) for k in out if k.startswith("blocks.")}), num_heads=num_heads,
        mlp_size=int(fc1.shape[0]) // (2 if swiglu else 1), mlp_type="swiglu" if swiglu else "mlp", num_classes=int(head.shape[0]) if head is not None else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in out, layer_norm_eps=1e-6, act="gelu", class_token=True,
        num_reg_tokens=num_reg, no_embed_class=registers,
        layer_scale=1.0 if "blocks.0.ls1.gamma" in out else None, pooling="token", fc_norm=False,
        pos_embed_resample="timm" if registers else DINOV2_RESAMPLE,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, interpolation="bicubic",
    )
    return Conversion(out, fields, [], notes)


def read_dinov2_tensors(path: Path) -> tuple[StateDict, list[str]]:
    """The tensors of an original DINOv2 file (``.safetensors`` or a weights-only torch pickle)."""
    tensors, notes = read_weight_file(path)
    tensors, stripped = strip_prefixes(tensors)
    return tensors, notes + stripped


def read_dinov2(path: Path, num_heads: int | None = None) -> Checkpoint:
    """Read an original DINOv2 state dict file as a :class:`Checkpoint`."""
    tensors, notes = read_dinov2_tensors(path)
    conversion = convert_dinov2_hub(tensors, str(path), num_heads=num_heads)
    config = build_config(conversion.fields, str(path))
    return Checkpoint(config, conversion.state_dict, "dinov2", [path], conversion.unexpected,
                      notes + conversion.notes)
