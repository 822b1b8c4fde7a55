"""Resampling of learned 2-D position-embedding grids (one function for graph and surgery).

A traced forward pass calls :func:`resample_pos_embed` on every call so that one exported
graph serves every resolution (eager skips it at the native grid, where it is the identity); offline checkpoint surgery (fine-tuning at a new resolution, loading
a checkpoint trained at another size) uses the very same function.
Bicubic, ``align_corners=False`` and antialias off: TensorRT's ONNX parser rejects antialiased
``Resize``, and at the native grid size this interpolation is an exact identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int] | tuple[torch.SymInt, torch.SymInt],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample ``pos_embed`` ``[1, prefix + old_h*old_w, C]`` to ``[1, prefix + new_h*new_w, C]``.

    Prefix (class) tokens are kept as they are; the grid part is interpolated in float32 and
    cast back to the input dtype.
    """
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not match a {old_grid[0]}x{old_grid[1]} "
            f"grid with {num_prefix_tokens} prefix token(s); expected [1, {expected}, C]"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=False
    ).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, channels)
    return torch.cat([prefix, grid], dim=1)


def infer_grid(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """The square grid ``(n, n)`` with ``num_prefix_tokens + n*n == num_tokens``."""
    side = round((num_tokens - num_prefix_tokens) ** 0.5)
    if side * side + num_prefix_tokens != num_tokens:
        raise ValueError(
            f"{num_tokens} position embeddings are not {num_prefix_tokens} prefix token(s) plus a square grid"
        )
    return side, side
