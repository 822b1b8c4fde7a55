"""Checkpoints of the families in :mod:`vitdeploy.families`: which family a file is, and reading it.

A file that names its architecture (a timm Hub ``config.json``'s ``architecture``, or ``model=``)
is read as exactly that family's variant, or refused in one line naming it. A bare state dict is
read as a family only where its tensor names fit that family alone; names that fit two
architectures that compute differently (a Perception Encoder state dict has no RoPE tensor, so
it also fits a ViT without RoPE) are refused with the candidates and ``model=NAME``, unless the
file's name is one of the family's variants (timm's ``NAME[.tag].safetensors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vitdeploy.checkpoints.common import (
    ArchitectureRefused,
    Checkpoint,
    CheckpointError,
    StateDict,
    name_in_file_name,
)
from vitdeploy.checkpoints.conversion import Conversion
from vitdeploy.families import FAMILIES, family_of, unsupported_reason
from vitdeploy.families.aimv2 import FAMILY as AIMV2
from vitdeploy.families.base import Family, infer_family_config, shape_fields, sized_like
from vitdeploy.families.dinov3 import FAMILY as DINOV3
from vitdeploy.families.dinov3 import is_original_keys


def bare_family(keys: Iterable[str], what: str) -> Family | None:
    """The family a bare timm state dict's tensor names fit alone (None: none of them, so the ViT
    readers decide); raises :class:`CheckpointError` when they fit a family and an architecture
    that computes differently."""
    names = frozenset(keys)
    if "patch_embed.proj.weight" not in names:
        return None
    fitting = [family for family in FAMILIES if family.fits_bare is not None and family.fits_bare(names)]
    if len(fitting) == 1 and fitting[0].lookalike is None:
        return fitting[0]
    if fitting:
        candidates = [f"{family.label} ({', '.join(sorted(family.variants)[:2])}, ...)" for family in fitting]
        candidates += [family.lookalike for family in fitting if family.lookalike]
        raise ArchitectureRefused(
            f"{what}: its tensor names fit {' and '.join(candidates)}, which compute differently (RoPE stores no "
            "tensor); name the architecture with model=NAME (CLI: --model NAME)")
    return None


def family_named_by_file(path: Path, state_dict: StateDict, notes: list[str]) -> tuple[Family | None, str | None]:
    """The family variant a bare timm state dict's file name names (``NAME[.tag].safetensors``, as timm
    names its weights), where its tensors fit that variant (the family's names, the variant's sizes);
    else ``(None, None)``. The export's source check takes timm's model of the same name."""
    name = name_in_file_name(path)
    family = family_of(name)
    key_map = family.key_maps.get("timm") if family is not None else None
    if key_map is None or family.fits_bare is None or not family.fits_bare(frozenset(state_dict)):
        return None, None
    try:
        shapes = shape_fields(key_map(state_dict), str(path))
    except ValueError:
        return None, None
    variant = family.variants[name]
    if not sized_like(variant, shapes) or shapes.get("image_size", variant.image_size) != variant.image_size:
        return None, None  # (the variant's RoPE grid is its image size's)
    notes.append(f"architecture {name} from the file name")
    return family, name


def architecture_family(architecture: str | None, what: str) -> Family | None:
    """The family a recorded architecture name belongs to; a name vitdeploy cannot build is refused."""
    reason = unsupported_reason(architecture)
    if reason is not None:
        raise ArchitectureRefused(f"{what}: architecture {architecture!r} is {reason}, which vitdeploy does not build; "
                              "refusing to read it as another architecture")
    return family_of(architecture)


def read_family(family: Family, source_format: str, state_dict: StateDict, what: str, files: list,
                architecture: str | None = None, num_heads: int | None = None,
                base: Mapping[str, Any] | None = None, model_args: Mapping[str, Any] | None = None,
                notes: list[str] | None = None) -> Checkpoint:
    """``state_dict`` (in ``source_format``'s names) as a :class:`Checkpoint` of ``family``."""
    from vitdeploy.checkpoints.timm import clip_head_as_projection

    notes = list(notes or [])
    key_map = family.key_maps.get(source_format)
    if key_map is None:
        raise CheckpointError(f"{what}: vitdeploy reads {family.label} from {', '.join(family.key_maps)} "
                              f"files, not {source_format}")
    mapped = clip_head_as_projection(key_map(state_dict), notes)
    try:
        config, inferred = infer_family_config(family, mapped, what, architecture, num_heads, base, model_args)
    except ValueError as error:
        raise ArchitectureRefused(str(error)) from None
    return Checkpoint(config, mapped, source_format, files, notes=notes + inferred)


def read_original_dinov3(state_dict: StateDict, what: str, files: list, num_heads: int | None = None,
                         architecture: str | None = None) -> Checkpoint:
    """An original facebookresearch/dinov3 hub state dict (its names: ``storage_tokens``, masked qkv bias)."""
    if not is_original_keys(set(state_dict)):
        raise CheckpointError(f"{what}: no storage_tokens tensor, so this is not an original DINOv3 state dict")
    # the original's own output is the normed class token (x_norm_clstoken), as transformers' pooler_output
    checkpoint = read_family(DINOV3, "dinov3", state_dict, what, files, architecture, num_heads,
                             base={"pooling": "token"},
                             notes=["read the original DINOv3 names (storage tokens, masked k bias); "
                                    "its RoPE periods are recomputed in float32, as timm does"])
    return checkpoint


def convert_family_transformers(family: Family, source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """A transformers state dict of ``family`` (its ``key_maps["huggingface"]``) and its ``config.json``
    (its ``transformers_fields``) as a :class:`Conversion`."""
    try:
        state_dict = family.key_maps["huggingface"](source)
        assert family.transformers_fields is not None
        fields = family.transformers_fields(data)
        heads = fields.pop("num_heads")
        config, notes = infer_family_config(family, state_dict, where, num_heads=heads, base=fields)
    except (KeyError, ValueError) as error:
        raise ArchitectureRefused(f"{where}: not a {family.label} transformers state dict ({error})") from None
    return Conversion(state_dict, config.to_dict(), [], notes)


def convert_dinov3_transformers(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """A transformers ``DINOv3ViTModel`` state dict and its ``config.json`` as a :class:`Conversion`."""
    conversion = convert_family_transformers(DINOV3, source, data, where)
    # DINOv3ViTImageProcessor's defaults: both sides resized (bilinear) to the model's size, no crop
    conversion.fields.update(resize_mode="squash", interpolation="bilinear", crop_pct=1.0)
    return conversion


def convert_aimv2_transformers(source: StateDict, data: dict[str, Any], where: str) -> Conversion:
    """A transformers ``Aimv2VisionModel`` state dict and its ``config.json`` as a :class:`Conversion`."""
    conversion = convert_family_transformers(AIMV2, source, data, where)
    if not conversion.fields["sincos_pos_embed"]:
        conversion.notes.append(
            "transformers runs this AIMv2 (is_native false) at its native size only; at other sizes its table "
            "is resampled as timm resamples the same AIMv2 weights")
    return conversion


__all__ = ["FAMILIES", "architecture_family", "bare_family", "family_named_by_file", "is_original_keys", "read_family",
           "read_original_dinov3"]
