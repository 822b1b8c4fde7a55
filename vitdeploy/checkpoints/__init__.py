"""Checkpoint import and export: native, timm, Hugging Face transformers, OpenCLIP, original DINOv2/DINOv3 and JAX ViTs.

``load_model(source)`` detects the format, reads tensors without ever unpickling code
(safetensors, ``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``), converts them
to vitdeploy's (= timm's) names, infers the architecture where the format stores none, and loads
strictly. ``save_model`` writes the native format. ``resolve_source`` is what the CLI commands
use: a checkpoint path, or a registry variant name (random weights, with a warning).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitdeploy.checkpoints.common import (
    ArchitectureRefused,
    Checkpoint,
    CheckpointError,
    CheckpointWarning,
    file_sha256,
    force_variant,
    instantiate,
    read_weight_file,
    state_dict_sha256,
    strip_prefixes,
)
from vitdeploy.checkpoints.detect import (
    EXPECTED,
    FORMATS,
    checkpoint_path,
    closest_layout,
    detect_format,
    match_layout,
    weight_keys,
)
from vitdeploy.checkpoints.dinov2 import read_dinov2
from vitdeploy.checkpoints.families import read_original_dinov3
from vitdeploy.checkpoints.huggingface import read_huggingface
from vitdeploy.checkpoints.jax import read_jax
from vitdeploy.checkpoints.native import read_native, save_model
from vitdeploy.checkpoints.openclip import read_openclip
from vitdeploy.checkpoints.timm import read_timm
from vitdeploy.families import family_of
from vitdeploy.model import VisionTransformer, create_model
from vitdeploy.variants import VARIANTS, closest_hint, list_variants

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWarning",
    "ResolvedModel",
    "detect_format",
    "file_sha256",
    "load_model",
    "read_checkpoint",
    "resolve_source",
    "save_model",
]

logger = logging.getLogger("vitdeploy.checkpoints")

RANDOM_SEED = 0


def read_checkpoint(source: str | Path, format: str = "auto", num_heads: int | None = None,
                    model: str | None = None) -> Checkpoint:
    """Read ``source`` into a :class:`Checkpoint` (config + tensors in our names) without building a model.

    ``model`` (a registry variant name) forces that variant's architecture instead of the one
    detected from the file (:func:`~vitdeploy.checkpoints.common.force_variant`).
    """
    if model is None or family_of(model) is not None:
        # a family variant's name is the architecture the reader builds exactly (or refuses)
        return _read(source, format, num_heads, model)
    with warnings.catch_warnings():
        # Detection's guesses at what the weights do not show (activation, heads) are moot once the variant's
        # architecture replaces them; they stay in the notes.
        warnings.simplefilter("ignore", CheckpointWarning)
        checkpoint = _read(source, format, num_heads)
    checkpoint.config = force_variant(checkpoint.config, model, f"{checkpoint.format} checkpoint {source}",
                                      checkpoint.notes)
    return checkpoint


def _read(source: str | Path, format: str, num_heads: int | None, model: str | None = None) -> Checkpoint:
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}")
    path = checkpoint_path(source)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "huggingface" and not path.is_dir():
        raise CheckpointError(f"a Hugging Face checkpoint is a folder with config.json; {path} is a file")
    if fmt == "jax" and path.is_dir():
        raise CheckpointError(f"a JAX checkpoint is an .npz file; {path} is a folder")
    if fmt == "dinov2" and path.is_dir():
        raise CheckpointError(f"an original DINOv2 checkpoint is a .pth or .safetensors file; {path} is a folder")
    if fmt == "native":
        return read_native(path)
    if fmt == "dinov2":
        return read_dinov2(path, num_heads=num_heads)
    if fmt == "dinov3":
        state_dict, notes = read_weight_file(path)
        checkpoint = read_original_dinov3(strip_prefixes(state_dict)[0], str(path), [path], num_heads, model)
        checkpoint.notes[:0] = notes
        return checkpoint
    if fmt == "openclip":
        return read_openclip(path, num_heads=num_heads, model=model)
    if model is not None and fmt != "timm":
        raise CheckpointError(f"model={model!r} names a timm architecture; {path} is a {fmt} checkpoint")
    if fmt == "timm":
        try:
            return read_timm(path, num_heads=num_heads, model=model)
        except CheckpointError as error:
            # A file unlike every supported layout: say which one it is closest to, on the same line.
            keys = weight_keys(path) if format == "auto" else None
            if not keys or match_layout(keys).exact or isinstance(error, ArchitectureRefused):
                raise
            raise CheckpointError(f"{error}; {closest_layout(keys)}", details=error.details) from None
    if fmt == "huggingface":
        return read_huggingface(path)
    return read_jax(path, num_heads=num_heads)


def _load(source: str | Path, format: str, overrides: dict[str, Any],
          model: str | None = None) -> tuple[VisionTransformer, Checkpoint]:
    checkpoint = read_checkpoint(source, format, num_heads=overrides.get("num_heads"), model=model)
    model = instantiate(checkpoint, f"{checkpoint.format} checkpoint {source}", overrides)
    for message in checkpoint.notes:
        logger.info("%s: %s", source, message)
    return model, checkpoint


def load_model(source: str | Path, format: str = "auto", model: str | None = None,
               **overrides: Any) -> VisionTransformer:
    """Load a checkpoint file or folder in any supported format as an eval-mode :class:`VisionTransformer`.

    ``format`` is ``"auto"`` (detected) or one of ``native``, ``timm``, ``huggingface``, ``jax``, ``dinov2``.
    ``model`` names the registry variant whose architecture to use instead of the detected one
    (``model="vit_base_patch16_clip_quickgelu_224"`` for an OpenAI CLIP state dict, whose
    activation the weights do not show); strict loading lists every tensor that does not fit.
    ``overrides`` edit the config: ``num_classes`` (a new zero-initialised head when it differs),
    ``image_size`` (position embeddings resampled), ``num_heads`` (formats that do not store it),
    ``mean``/``std``/``labels`` and the like.
    """
    if not Path(source).expanduser().exists() and str(source) in VARIANTS:
        raise FileNotFoundError(
            f"{source!r} is a variant name, not a checkpoint; use create_model({str(source)!r}) or "
            "resolve_source() for random weights"
        )
    return _load(source, format, overrides, model)[0]


@dataclass
class ResolvedModel:
    """A model with where it came from: ``source`` (path or variant name), ``format``, weight ``sha256``.

    ``format`` is ``"variant"`` and ``random_weights`` True for a registry name; the hash is then
    that of the (seeded, reproducible) state dict rather than of a file.
    """

    model: VisionTransformer
    source: str
    format: str
    sha256: str
    random_weights: bool = False
    notes: list[str] = field(default_factory=list)


def resolve_source(source: str, format: str = "auto", log: Callable[[str], None] | None = None,
                   model: str | None = None, **overrides: Any) -> ResolvedModel:
    """A checkpoint path (loaded like :func:`load_model`) or a registry variant name (random weights, warned).

    ``model`` forces a registry variant's architecture on a checkpoint (see :func:`load_model`).
    With ``log``, the warnings loading raises (random weights, resampled position embeddings)
    go to ``log`` as ``warning: ...`` lines instead (what the CLI and the pipeline print).
    """
    if log is None:
        return _resolve(source, format, model, **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = _resolve(source, format, model, **overrides)
    for warning in caught:
        log(f"warning: {warning.message}")
    return resolved


# LayerScale's training init (1e-5 for DINOv2, 1e-6 for DeiT III) all but switches every block off: a
# random-weights model would then be its patch embedding alone, and its fp16 graph would round the
# blocks away entirely (1e-6 of an O(1) residual is below fp16's resolution). Trained checkpoints hold
# gammas of order 0.1, so pipeline runs on variant names use that.
RANDOM_LAYER_SCALE = 0.1


def _scale_residual_branches_as_trained(model: VisionTransformer) -> None:
    """Set every LayerScale of a random-weights ``model`` to :data:`RANDOM_LAYER_SCALE` (a no-op without LayerScale)."""
    from vitdeploy.model import LayerScale

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.fill_(RANDOM_LAYER_SCALE)


def _resolve(source: str, format: str = "auto", model: str | None = None, **overrides: Any) -> ResolvedModel:
    path = Path(source).expanduser()
    if not path.exists() and source in VARIANTS:
        if model is not None and model != source:
            raise ValueError(f"model={model!r} forces the architecture of a checkpoint; {source!r} is a variant "
                             "name already (use one or the other)")
        message = (f"{source} is a variant name, not a checkpoint: using RANDOM weights (seed {RANDOM_SEED}); "
                   "its outputs are meaningless beyond testing the pipeline")
        warnings.warn(message, CheckpointWarning, stacklevel=3)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = create_model(source, **overrides)
        _scale_residual_branches_as_trained(model)
        return ResolvedModel(model, source, "variant", state_dict_sha256(model.state_dict()), True, [message])
    if not path.exists():
        # One short line; the formats and every variant name only on request (``details``).
        error = FileNotFoundError(
            f"{source!r} is neither an existing checkpoint nor a model variant; "
            + closest_hint(source, "`vitdeploy inspect --list` lists the variants; VITDEPLOY_DEBUG=1 the checkpoint "
                           "formats")
        )
        error.details = f"{EXPECTED}; or a variant name: {', '.join(list_variants())}"  # type: ignore[attr-defined]
        raise error
    loaded, checkpoint = _load(path, format, overrides, model)
    sha256 = file_sha256(checkpoint_path(path))
    return ResolvedModel(loaded, str(source), checkpoint.format, sha256, False, checkpoint.notes)
