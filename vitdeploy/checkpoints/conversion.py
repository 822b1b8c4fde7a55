"""What a format converter hands back, and the one place its config fields become a :class:`ViTConfig`.

Every family converter (Hugging Face folders, DINOv2's own state dicts) is a pure function
``(source tensors, source config) -> Conversion``: tensors renamed to vitdeploy's (= timm's)
names for that family, plus the :class:`~vitdeploy.config.ViTConfig` field values as a plain
dict. :func:`build_config` turns those fields into a config, naming any field this vitdeploy's
``ViTConfig`` does not know instead of failing with a bare ``TypeError``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from vitdeploy.checkpoints.common import CheckpointError, StateDict
from vitdeploy.config import ViTConfig


@dataclass
class Conversion:
    """A converted checkpoint: ``state_dict`` in our names, ``fields`` of its :class:`ViTConfig`,
    the source tensors that map to nothing (``unexpected``) and remarks about the conversion."""

    state_dict: StateDict
    fields: dict[str, Any]
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_config(fields: dict[str, Any], where: str) -> ViTConfig:
    """``ViTConfig.from_fields(fields)``, or a :class:`CheckpointError` naming the bad or unknown fields."""
    known = ViTConfig.field_names() | {f.name for f in dataclasses.fields(ViTConfig)}
    needed = sorted(k for k in fields if k not in known)
    if needed:
        family = fields.get("family", "this")
        raise CheckpointError(
            f"{where}: a {family} checkpoint needs the ViTConfig fields "
            f"{', '.join(f'{k}={fields[k]!r}' for k in needed)}, which this vitdeploy's model does not have"
        )
    try:
        return ViTConfig.from_fields(fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: unusable configuration: {error}") from None


def grid_side(pos_embed: torch.Tensor, num_prefix: int, what: str) -> int:
    """The side of the square patch grid a ``[1, num_prefix + side², D]`` position embedding covers."""
    patches = int(pos_embed.shape[-2]) - num_prefix
    side = int(round(patches ** 0.5))
    if patches < 1 or side * side != patches:
        raise CheckpointError(
            f"{what}: position embedding {list(pos_embed.shape)} with {num_prefix} prefix position(s) "
            f"leaves {patches} patch positions, not a square grid"
        )
    return side
