"""The outputs a ViT artifact can have, named as Hugging Face names them (no torch, no onnx).

One home for which outputs exist, which a model configuration can produce, which an export
gets by default, and each one's dimension names, so the model, the exporter, the runtimes,
``predict``/``verify``/``inspect`` and the Triton writer cannot drift apart.

- ``logits`` ``[batch, num_classes]``: the classifier head's output (classifiers only).
- ``pooler_output`` ``[batch, pooled]``: the vector the head reads: the pooled tokens (class token,
  mean or attention pool; for ``token_avg``, the class token and the mean patch token concatenated,
  twice the hidden size) after the final norm / ``fc_norm`` and the representation layer if any.
- ``image_embeds`` ``[batch, projection]``: ``pooler_output`` through CLIP's visual projection
  (configs with ``projection_dim`` only).
- ``last_hidden_state`` ``[batch, sequence, hidden]``: every token (prefix tokens first) after the
  final norm.
- ``patch_tokens`` ``[batch, patches, hidden]``: ``last_hidden_state`` without the prefix (class,
  distillation and register) tokens: what dense-feature users of DINOv2 read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

LOGITS = "logits"
POOLER_OUTPUT = "pooler_output"
IMAGE_EMBEDS = "image_embeds"
LAST_HIDDEN_STATE = "last_hidden_state"
PATCH_TOKENS = "patch_tokens"

# Canonical order: a graph's outputs are listed in this order whatever order they were asked in.
OUTPUT_NAMES: tuple[str, ...] = (LOGITS, POOLER_OUTPUT, IMAGE_EMBEDS, LAST_HIDDEN_STATE, PATCH_TOKENS)
# Outputs with one row per token (their second axis is the dynamic sequence or patch count).
TOKEN_OUTPUTS: frozenset[str] = frozenset({LAST_HIDDEN_STATE, PATCH_TOKENS})
# Outputs that are one vector per image.
VECTOR_OUTPUTS: frozenset[str] = frozenset({LOGITS, POOLER_OUTPUT, IMAGE_EMBEDS})


def available_outputs(config: Any) -> tuple[str, ...]:
    """The outputs a model of ``config`` (a :class:`~vitdeploy.config.ViTConfig`) can produce, in canonical order."""
    names = []
    if int(getattr(config, "num_classes", 0) or 0) > 0:
        names.append(LOGITS)
    names.append(POOLER_OUTPUT)
    if getattr(config, "projection_dim", None):
        names.append(IMAGE_EMBEDS)
    names += [LAST_HIDDEN_STATE, PATCH_TOKENS]
    return tuple(names)


def default_outputs(config: Any) -> tuple[str, ...]:
    """What an export of ``config`` outputs unless told otherwise: ``logits`` for a classifier,
    ``image_embeds`` for a CLIP tower with its projection, else ``pooler_output`` (a headless backbone)."""
    available = available_outputs(config)
    if LOGITS in available:
        return (LOGITS,)
    if IMAGE_EMBEDS in available:
        return (IMAGE_EMBEDS,)
    return (POOLER_OUTPUT,)


def check_outputs(names: Iterable[str], config: Any) -> tuple[str, ...]:
    """``names`` in canonical order, each once, if ``config`` can produce every one; else ``ValueError``."""
    asked = [str(name) for name in names]
    if not asked:
        raise ValueError(f"no outputs asked for; expected some of {', '.join(available_outputs(config))}")
    unknown = [name for name in asked if name not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(unknown)}; expected some of {', '.join(OUTPUT_NAMES)}")
    available = available_outputs(config)
    missing = [name for name in asked if name not in available]
    if missing:
        raise ValueError(
            f"this model has no {', '.join(missing)} output; it has {', '.join(available)}"
        )
    return tuple(name for name in OUTPUT_NAMES if name in asked)


def parse_outputs(text: str, config: Any = None) -> tuple[str, ...]:
    """A comma-separated list of output names (``"logits,patch_tokens"``), checked by :func:`check_outputs`;
    without ``config`` (command-line parsing, before the model is loaded) only the names are checked."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if config is not None:
        return check_outputs(names, config)
    if not names:
        raise ValueError(f"no outputs given; expected some of {', '.join(OUTPUT_NAMES)}")
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"unknown output(s) {', '.join(unknown)}; expected some of {', '.join(OUTPUT_NAMES)}")
    return tuple(name for name in OUTPUT_NAMES if name in names)


def output_dims(name: str) -> tuple[str, ...]:
    """Dimension names of output ``name`` (the names the exporter gives its dynamic axes)."""
    dims = {
        LOGITS: ("batch", "num_classes"),
        POOLER_OUTPUT: ("batch", "pooled"),
        IMAGE_EMBEDS: ("batch", "projection"),
        LAST_HIDDEN_STATE: ("batch", "sequence", "hidden"),
        PATCH_TOKENS: ("batch", "patches", "hidden"),
    }
    if name not in dims:
        raise ValueError(f"unknown output {name!r}; expected one of {', '.join(OUTPUT_NAMES)}")
    return dims[name]


def output_shape(name: str, config: Any) -> list[int | str]:
    """Shape of output ``name`` for ``config`` (a :class:`~vitdeploy.config.ViTConfig`): dynamic dims by
    name (:func:`output_dims`), the last dim as the number it is (classes, pooled width, projection
    width, hidden size)."""
    dims = list(output_dims(name))
    hidden = int(config.hidden_size)
    width = {
        LOGITS: int(getattr(config, "num_classes", 0) or 0),
        POOLER_OUTPUT: int(config.pooled_size),
        IMAGE_EMBEDS: int(getattr(config, "projection_dim", None) or 0),
    }.get(name, hidden)
    return [*dims[:-1], width]


def primary_output(names: Iterable[str]) -> str:
    """The output a runtime returns when called (``runtime(x)``): ``logits`` if there, else the image
    embedding (``image_embeds``, then ``pooler_output``), else the first of ``names``."""
    names = list(names)
    if not names:
        raise ValueError("an artifact without outputs has no primary output")
    for name in (LOGITS, IMAGE_EMBEDS, POOLER_OUTPUT):
        if name in names:
            return name
    return names[0]
