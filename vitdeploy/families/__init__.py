"""Model families beyond the learned-table ViT: one module each, registered here.

A family module holds its variants (timm's names and defaults), the key map of every source
format it reads, its position scheme (RoPE form and parameters) and the names its sources give
its architecture. :data:`FAMILIES` lists them; :mod:`vitdeploy.variants` adds their variants to
the registry, and the checkpoint readers ask :func:`family_of` which family an architecture name
belongs to before they look at a single tensor, so a checkpoint that names its architecture is
built as exactly that one or refused.

This package imports no torch at import time (the variants are part of the torch-free core).
"""

from __future__ import annotations

from vitdeploy.families import aimv2, dinov3, eva02, pe
from vitdeploy.families.base import Family

FAMILIES: tuple[Family, ...] = (dinov3.FAMILY, eva02.FAMILY, pe.FAMILY, pe.SPATIAL, aimv2.FAMILY)

# Architecture names (or name parts) of models that compute differently from every family
# vitdeploy builds, with what they are: refused by name rather than read as the closest layout.
UNSUPPORTED_NAMES: tuple[tuple[str, str], ...] = (
    ("vit_pe_lang_", "Perception Encoder language tower"),
    ("eva02_enormous", "EVA-02 enormous (post-norm blocks)"),
    ("_rope_", "timm's RoPE ViT (index-grid RoPE)"),
    ("naflexvit", "NaFlex ViT (any aspect ratio, patch sequences)"),
    ("_dinov3", "DINOv3 of a size vitdeploy does not register"),
    ("vit_7b", "DINOv3 7B"),
    ("eva_", "EVA (v1)"),
)


def family_of(architecture: str | None) -> Family | None:
    """The family whose variant ``architecture`` names (a timm name, pretrained tag allowed), or None."""
    if not architecture:
        return None
    name = architecture.split(".")[0]
    for family in FAMILIES:
        if name in family.variants:
            return family
    return None


def unsupported_reason(architecture: str | None) -> str | None:
    """What ``architecture`` is, when it names a model vitdeploy cannot build (None when it may build it)."""
    if not architecture or family_of(architecture) is not None:
        return None
    name = architecture.split(".")[0]
    for part, what in UNSUPPORTED_NAMES:
        if part in name or name.startswith(part):
            return what
    return None


def all_variants() -> dict:
    """Every family's variants by name (for :mod:`vitdeploy.variants`)."""
    merged: dict = {}
    for family in FAMILIES:
        merged.update(family.variants)
    return merged
