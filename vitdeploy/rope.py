"""2-D rotary position embeddings (RoPE) on the patch grid, in each source's own form.

A RoPE family rotates each attention head's queries and keys of the patch tokens (never the
prefix tokens) by angles that depend on the token's row and column. The angles are computed
from the grid of the input at hand, with tensor ops on its (possibly symbolic) size, so one
exported graph computes them for every resolution: ``Range`` on the grid size, ``Cast``,
``Div``/``Mul``, ``Sin``/``Cos`` — no ``If`` node, no size frozen into a constant.

Forms (:data:`ROPE_FORMS`), each reproducing its source:

* ``"dinov3"`` — DINOv3 (facebookresearch/dinov3 ``RopePositionEmbedding``, timm
  ``RotaryEmbeddingDinoV3``, transformers ``DINOv3ViTRopePositionEmbedding``): patch-centre
  coordinates ``(i + 0.5) / n`` mapped to [-1, 1] per axis, periods ``T ** (2j / (d/2))``,
  angles ``2 pi c / period``, the "half" layout (``[f0 .. fk, f0 .. fk]``, rotate-half).
* ``"eva"`` — timm's ``RotaryEmbeddingCat`` with inverse-frequency bands, as EVA-02 and the
  Perception Encoder use it: integer coordinates ``i + offset``, rescaled to a reference grid
  (``t / n * ref``, EVA's fine-tuning rule), bands ``1 / T ** (j / (d/4))``, the interleaved
  layout (``[f0, f0, f1, f1, ..]``, pairwise rotation); ``indexing="xy"`` puts the column
  coordinate first (PE).

This module imports torch only inside the functions that compute (the form names are part of
:class:`~vitdeploy.config.ViTConfig`, which must stay importable without torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROPE_FORMS: tuple[str, ...] = ("dinov3", "eva")
GRID_INDEXINGS: tuple[str, ...] = ("ij", "xy")


@dataclass(frozen=True)
class RopeSpec:
    """Everything that decides a model's RoPE angles: the form, its temperature, the coordinate
    offset, the axis order (``indexing``) and, for ``"eva"``, the reference grid coordinates are
    rescaled to (None: none)."""

    form: str
    head_dim: int
    temperature: float
    offset: float = 0.0
    indexing: str = "ij"
    ref_grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        check_rope(self.form, self.indexing)
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {self.head_dim}")

    @property
    def rotate_half(self) -> bool:
        """The "half" layout (DINOv3) rather than the interleaved one (timm's EVA/PE)."""
        return self.form == "dinov3"


def check_rope(form: str | None, indexing: str = "ij") -> None:
    """Raise ``ValueError`` unless ``form`` is None or one of :data:`ROPE_FORMS` and ``indexing`` is known."""
    if form is not None and form not in ROPE_FORMS:
        raise ValueError(f"unknown RoPE form {form!r}; expected one of {', '.join(ROPE_FORMS)} (or none)")
    if indexing not in GRID_INDEXINGS:
        raise ValueError(f"unknown RoPE grid indexing {indexing!r}; expected one of {', '.join(GRID_INDEXINGS)}")


def _axis_coordinates(spec: RopeSpec, size: Any, ref: int | None) -> torch.Tensor:
    from vitdeploy.pos_embed import positions, size_value

    if spec.form == "dinov3":
        # patch centres normalised by the axis length (timm/dinov3: arange(0.5, n) / n, then 2c - 1)
        return ((positions(size) + 0.5 + spec.offset) / size_value(size)) * 2.0 - 1.0
    coords = positions(size) + spec.offset
    if ref is not None:
        coords = coords / size_value(size) * float(ref)
    return coords


def _frequencies(spec: RopeSpec) -> torch.Tensor:
    """Angle per unit coordinate for each of the ``head_dim // 4`` bands of one axis."""
    import torch

    bands = spec.head_dim // 4
    if spec.form == "dinov3":
        exponents = 2.0 * torch.arange(bands, dtype=torch.float32) / (spec.head_dim // 2)
        periods = spec.temperature ** exponents
        return 2 * math.pi / periods
    exponents = torch.arange(0, bands, dtype=torch.int64).to(torch.float32) / bands
    return 1.0 / (spec.temperature ** exponents)


def rope_sin_cos(spec: RopeSpec, grid: tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``sin`` and ``cos`` ``[rows * cols, head_dim]`` for the patch grid ``grid`` (row-major),
    in ``spec``'s layout; ``grid`` may hold symbolic sizes while tracing."""
    import torch

    rows, cols = grid
    ref = spec.ref_grid or (None, None)
    along_rows = _axis_coordinates(spec, rows, ref[0])
    along_cols = _axis_coordinates(spec, cols, ref[1])
    # [rows, cols, 2] with the coordinate channels in the source's order
    mesh_rows, mesh_cols = torch.meshgrid(along_rows, along_cols, indexing="ij")
    channels = (mesh_rows, mesh_cols) if spec.indexing == "ij" else (mesh_cols, mesh_rows)
    coords = torch.stack(channels, dim=-1).reshape(-1, 2)
    frequencies = _frequencies(spec)
    if spec.form == "dinov3":
        angles = (coords[:, :, None] * frequencies).flatten(1)
    else:
        # timm multiplies the coordinate by the band (EVA); the same product, the same rounding
        angles = (coords[:, :, None] * frequencies[None, None, :]).flatten(1)
    sin, cos = angles.sin(), angles.cos()
    if spec.rotate_half:
        return torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    return sin.repeat_interleave(2, dim=-1), cos.repeat_interleave(2, dim=-1)


def _rotated(x: torch.Tensor, half: bool) -> torch.Tensor:
    import torch

    if half:  # [x0 .. xk, y0 .. yk] -> [-y0 .. -yk, x0 .. xk]
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)
    # [x0, x1, x2, x3, ..] -> [-x1, x0, -x3, x2, ..]
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, half: bool, start: int = 0) -> torch.Tensor:
    """``x`` ``[batch, heads, tokens, head_dim]`` with the tokens from ``start`` on rotated.

    The rotation is computed in float32 (sin and cos stay float32 in fp16 graphs) and cast back
    to ``x``'s dtype, as timm does.
    """
    import torch

    patches = x[:, :, start:]
    wide = patches.float()
    rotated = (wide * cos + _rotated(wide, half) * sin).to(x.dtype)
    return torch.cat([x[:, :, :start], rotated], dim=2) if start else rotated
