"""Resampling of learned 2-D position-embedding grids, in the convention of the checkpoint's framework.

A model run at another resolution must give the logits its users validated in their own
framework, and the frameworks resample differently (:data:`RESAMPLE_METHODS`). Every one of
them is a linear map of the grid, ``P_new = W_h · P · W_wᵀ``, with interpolation matrices that
depend only on the old and new grid sizes. :func:`interpolation_matrix` builds them from tensor
ops (``arange``, ``abs``, ``where``, sums), so a traced forward pass computes them from the
dynamic input size and one exported graph reproduces the convention at every resolution with
ops TensorRT's ONNX parser accepts (an antialiased ``Resize`` it rejects).

:func:`resample_pos_embed` is the one function behind the eager forward pass (which skips it
at the native grid, where every convention is the identity), offline surgery
(``set_image_size``, ``convert --image-size``), checkpoint loading at another grid and export.

This module imports torch only inside the functions that compute: the convention names are
part of :class:`~vitdeploy.config.ViTConfig`, which must stay importable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ResampleMethod:
    """One framework's way to resample a position-embedding grid: the name users pick it by,
    what it computes, and the code it reproduces."""

    name: str
    summary: str
    reproduces: str


RESAMPLE_METHODS: dict[str, ResampleMethod] = {
    method.name: method
    for method in (
        ResampleMethod(
            "timm",
            "bicubic with antialias (PIL's kernel, a = -0.5, widened by the scale factor when downsampling, "
            "window clipped at the borders and renormalised), half-pixel centres",
            "timm's resample_abs_pos_embed: its dynamic_img_size forward and its checkpoint loading at "
            "another size (torch.nn.functional.interpolate(mode='bicubic', antialias=True)), for every family "
            "(ViT, DeiT, DeiT III, DINOv2, CLIP, SigLIP); also Hugging Face transformers' "
            "Dinov2WithRegistersEmbeddings.interpolate_pos_encoding (transformers 5.x: size=..., antialias=True)",
        ),
        ResampleMethod(
            "huggingface",
            "bicubic without antialias (a = -0.75, border pixels repeated), half-pixel centres",
            "Hugging Face transformers' interpolate_pos_encoding of ViT, DeiT, Dinov2, CLIP and SigLIP "
            "(transformers 5.x: interpolate(size=..., mode='bicubic', align_corners=False))",
        ),
        ResampleMethod(
            "jax",
            "linear with corner-aligned samples (the first and last embeddings stay where they are)",
            "the original JAX code (google-research/vision_transformer, big_vision) resizing a checkpoint: "
            "scipy.ndimage.zoom(grid, (new_h / old_h, new_w / old_w, 1), order=1)",
        ),
        ResampleMethod(
            "dinov2",
            "bicubic without antialias (a = -0.75, border pixels repeated) at the scale factor "
            "(new + 0.1) / old: output i samples (i + 0.5) * old / (new + 0.1) - 0.5; the stored grid "
            "itself is returned unchanged",
            "the original DINOv2 code (facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding, "
            "interpolate_offset=0.1, interpolate_antialias=False: interpolate(scale_factor=((h + 0.1) / M, "
            "(w + 0.1) / M), mode='bicubic'), with its early return at the stored grid)",
        ),
        ResampleMethod(
            "siglip2",
            "linear with antialias (triangle kernel, widened by the scale factor when downsampling, window "
            "clipped at the borders and renormalised), half-pixel centres",
            "Hugging Face transformers' Siglip2VisionEmbeddings.resize_positional_embeddings (transformers "
            "5.x: the weights of interpolate(mode='bilinear', align_corners=False, antialias=True))",
        ),
    )
}
DEFAULT_RESAMPLE = "timm"
# Configs written before the convention was recorded were resampled with bicubic, a = -0.75,
# no antialias: exactly Hugging Face's convention, so that is what such a file keeps.
LEGACY_RESAMPLE = "huggingface"


def check_resample(name: str) -> str:
    """``name`` if it is one of :data:`RESAMPLE_METHODS`, else a ``ValueError`` listing them."""
    if name not in RESAMPLE_METHODS:
        raise ValueError(
            f"unknown position-embedding resampling {name!r}; expected one of {', '.join(RESAMPLE_METHODS)}"
        )
    return name


def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel with coefficient ``a`` (zero for ``|x| >= 2``)."""
    import torch

    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def positions(new: Any) -> torch.Tensor:
    """``0 .. new - 1`` as float32: an int64 ``Range`` on the (symbolic) size, then a ``Cast``, in a graph."""
    import torch

    return torch.arange(new).to(torch.float32)


def _antialiased_bicubic(old: int, new: Any, native: Any = None) -> torch.Tensor:
    # torch's antialiased path (PIL's): output i is centred at (i + 0.5) * old/new; when shrinking, the
    # kernel is stretched by old/new; the weights inside the grid are renormalised to sum to 1.
    # Taps outside torch's window have zero weight, so no explicit window is needed.
    import torch

    scale = old / new
    centres = (positions(new) + 0.5) * scale
    taps = torch.arange(old, dtype=torch.float32) + 0.5
    stretch = torch.clamp(torch.full((), scale, dtype=torch.float32), min=1.0)
    weights = _cubic((taps[None, :] - centres[:, None]) / stretch, a=-0.5)
    return weights / weights.sum(dim=1, keepdim=True)


def _antialiased_linear(old: int, new: Any, native: Any = None) -> torch.Tensor:
    # torch's antialiased bilinear (PIL's triangle filter): output i is centred at (i + 0.5) * old/new,
    # the kernel stretched by old/new when shrinking, the weights inside the grid renormalised.
    import torch

    scale = old / new
    centres = (positions(new) + 0.5) * scale - 0.5
    taps = torch.arange(old, dtype=torch.float32)
    stretch = torch.clamp(torch.full((), scale, dtype=torch.float32), min=1.0)
    weights = torch.clamp(1.0 - (taps[None, :] - centres[:, None]).abs() / stretch, min=0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def _bicubic_at(source: torch.Tensor, old: int) -> torch.Tensor:
    # torch's plain bicubic: output i samples x = source[i] with the four taps floor(x) - 1 .. floor(x) + 2,
    # whose indices are clamped into the grid (border repeated). Those taps lie in -2 .. old + 1: weigh
    # every one of them by the kernel (zero beyond the four), then fold the two outside each border onto
    # the border sample (a constant [old + 4, old] matrix).
    import torch

    taps = torch.arange(-2, old + 2, dtype=torch.float32)
    weights = _cubic(taps[None, :] - source[:, None], a=-0.75)  # [new, old + 4]
    fold = torch.arange(old, dtype=torch.float32)[None, :] == torch.clamp(taps, 0.0, float(old - 1))[:, None]
    return weights @ fold.to(torch.float32)


def _bicubic(old: int, new: Any, native: Any = None) -> torch.Tensor:
    # align_corners=False with an output size: output i samples (i + 0.5) * old/new - 0.5.
    return _bicubic_at((positions(new) + 0.5) * (old / new) - 0.5, old)


def size_value(new: Any) -> torch.Tensor:
    """``new`` as a float32 scalar tensor (a sum of ones in a graph, where ``new`` is symbolic)."""
    import torch

    return torch.ones(new, dtype=torch.float32).sum()


def _same_size(new: Any, old: int) -> torch.Tensor:
    """1.0 where ``new == old``, else 0.0, as a tensor computed by arithmetic (no data-dependent branch)."""
    import torch

    return torch.clamp(1.0 - (size_value(new) - float(old)).abs(), min=0.0)


def _offset_bicubic(old: int, new: Any, native: Any = None) -> torch.Tensor:
    # DINOv2's interpolate(scale_factor=(new + 0.1) / old): torch maps output i to (i + 0.5) / scale - 0.5,
    # so the 0.1 shifts every sample, except at the stored grid, which the original returns untouched
    # (native = 1 there: offset 0, scale 1, the identity).
    # The scale is 10*old / (10*new + 1): both exact in float32, so one division rounds it as torch
    # does (float32 of the double 1 / scale_factor); float32(new + 0.1) would already be off by an ulp.
    native = _same_size(new, old) if native is None else native
    scale = (10.0 * old) / (10.0 * size_value(new) + (1.0 - native))
    return _bicubic_at((positions(new) + 0.5) * scale - 0.5, old)


def _corner_aligned_linear(old: int, new: Any, native: Any = None) -> torch.Tensor:
    # scipy.ndimage.zoom(order=1), grid_mode=False: output i samples input i * (old-1)/(new-1)
    # (0 for a single output), linear between the two neighbours.
    import torch

    step = (old - 1) / torch.sym_max(new - 1, 1)
    source = positions(new) * step
    columns = torch.arange(old, dtype=torch.float32)
    return torch.clamp(1.0 - (columns[None, :] - source[:, None]).abs(), min=0.0)


_MATRICES = {"timm": _antialiased_bicubic, "huggingface": _bicubic, "jax": _corner_aligned_linear,
             "dinov2": _offset_bicubic, "siglip2": _antialiased_linear}
# Conventions whose matrix for one axis depends on whether the whole grid is the stored one.
_WHOLE_GRID = frozenset({"dinov2"})


def interpolation_matrix(old: int, new: Any, method: str, native: Any = None) -> torch.Tensor:
    """The float32 ``[new, old]`` matrix that resamples one axis of ``old`` samples to ``new`` by ``method``.

    ``new`` may be a symbolic size while tracing: the matrix is then computed in the graph.
    ``native`` (``"dinov2"`` only) is a 1.0/0.0 tensor saying the whole grid is the stored one
    (the original returns it unchanged); without it, this axis alone decides.
    """
    check_resample(method)
    if int(old) < 1:
        raise ValueError(f"old grid size {old} must be positive")
    return _MATRICES[method](int(old), new, native)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[Any, Any],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    *,
    method: str,
) -> torch.Tensor:
    """Resample ``pos_embed`` ``[1, prefix + old_h*old_w, C]`` to ``[1, prefix + new_h*new_w, C]`` by ``method``.

    Prefix tokens (those that have position embeddings: class, distillation) are kept as they are; the grid part is resampled in float32
    (``W_h · P · W_wᵀ``) and cast back to the input dtype.
    """
    import torch

    check_resample(method)
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not match a {old_grid[0]}x{old_grid[1]} "
            f"grid with {num_prefix_tokens} prefix token(s); expected [1, {expected}, C]"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = grid.shape[-1]
    native = None
    if method in _WHOLE_GRID:
        native = _same_size(new_grid[0], old_grid[0]) * _same_size(new_grid[1], old_grid[1])
    rows = interpolation_matrix(old_grid[0], new_grid[0], method, native)  # [new_h, old_h]
    cols = interpolation_matrix(old_grid[1], new_grid[1], method, native)  # [new_w, old_w]
    grid = grid.float().reshape(old_grid[0], old_grid[1] * channels)
    grid = (rows @ grid).reshape(-1, old_grid[1], channels)  # [new_h, old_w, C]
    grid = (cols @ grid).reshape(1, -1, channels)  # [new_h, new_w, C] → tokens, row-major like the patches
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def resample_macs(old_grid: tuple[int, int], new_grid: tuple[int, int], channels: int, method: str) -> int:
    """Multiply-accumulates of :func:`resample_pos_embed`'s matrix products (pure Python).

    0 at the old grid, where the eager forward pass skips the resampling; an exported graph
    computes it there too (an identity, well under 0.1% of any ViT's FLOPs).
    """
    check_resample(method)
    if tuple(new_grid) == tuple(old_grid):
        return 0
    (old_h, old_w), (new_h, new_w) = old_grid, new_grid
    macs = new_h * old_h * old_w * channels + new_h * new_w * old_w * channels  # W_h · P, then W_w · (W_h · P)
    if method in ("huggingface", "dinov2"):  # each axis's kernel weights times its constant border fold
        macs += new_h * (old_h + 4) * old_h + new_w * (old_w + 4) * old_w
    return macs


def infer_grid(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """The square grid ``(n, n)`` with ``num_prefix_tokens + n*n == num_tokens``."""
    side = round((num_tokens - num_prefix_tokens) ** 0.5)
    if side * side + num_prefix_tokens != num_tokens:
        raise ValueError(
            f"{num_tokens} position embeddings are not {num_prefix_tokens} prefix token(s) plus a square grid"
        )
    return side, side


def sincos_pos_embed(grid: tuple[Any, Any], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """A fixed 2-D sin-cos table ``[1, rows * cols, dim]`` (row-major) for the patch grid ``grid``, laid
    out ``[sin_w | cos_w | sin_h | cos_h]`` with bands ``1 / temperature ** (j / (dim / 4))``: transformers'
    AIMv2 ``is_native`` embedding (``build_2d_sinusoidal_position_embedding`` with its halves swapped).
    Float32; ``grid`` may hold symbolic sizes while tracing, so a graph computes it for every input size."""
    import torch

    quarter = dim // 4
    bands = torch.tensor([1.0 / temperature ** (j / quarter) for j in range(quarter)], dtype=torch.float32)
    rows, cols = grid
    mesh_rows, mesh_cols = torch.meshgrid(positions(rows), positions(cols), indexing="ij")
    along_rows = mesh_rows.reshape(-1, 1) * bands  # [rows * cols, dim / 4]
    along_cols = mesh_cols.reshape(-1, 1) * bands
    table = torch.cat([along_cols.sin(), along_cols.cos(), along_rows.sin(), along_rows.cos()], dim=1)
    return table[None]
