"""Outlier activation channels injected into an fp32 ViT graph, function-preserving (for quantization tests).

Trained ViTs have a few LayerNorm-output channels tens of times larger than the rest (the
quantization literature's "outlier channels"); pretrained weights cannot be downloaded on the
machines this project is developed on, so tests and the quantizer comparison make them: for every
LayerNorm whose output feeds only linear layers, the scale and bias of ``channels`` are
multiplied by ``factor`` and the matching input rows of the consumers' weights divided by it. The
float function is unchanged (up to rounding); the activations a per-tensor int8 scale must cover
are not.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from vitdeploy.exporters.quantize import own_initializers, smoothing_targets

DEFAULT_CHANNELS = (3, 17, 40, 61)
DEFAULT_FACTOR = 30.0
# The outlier ViT: three LayerNorm channels x30 in every block, which channels drawn per seed.
SEED_CHANNELS = 3


def outlier_channels(width: int, seed: int, count: int = SEED_CHANNELS) -> tuple[int, ...]:
    """``count`` distinct channels of a ``width``-wide LayerNorm drawn by ``seed`` (sorted)."""
    if not 0 < count <= width:
        raise ValueError(f"count must be in 1..{width} (the LayerNorm width), got {count}")
    return tuple(sorted(int(c) for c in np.random.default_rng(seed).choice(width, count, replace=False)))


def inject_outlier_channels_eager(model: Any, channels: Sequence[int], factor: float = DEFAULT_FACTOR) -> Any:
    """The same outliers in an eager :class:`~vitdeploy.model.VisionTransformer` (in place, returned).

    Every block's ``norm1``/``norm2`` and the final ``norm`` get ``channels`` of their scale and
    bias multiplied by ``factor``; the input columns of the linear layers they feed (``qkv``,
    ``fc1``, the pre-logits or head) are divided by it, so the logits are unchanged (up to
    rounding) and an export made from the model carries the outliers in its graph.
    """
    import torch

    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    width = model.config.hidden_size
    bad = [c for c in channels if not 0 <= c < width]
    if bad:
        raise ValueError(f"channels {bad} are outside the hidden size {width}")
    pairs = [(block.norm1, block.attn.qkv) for block in model.blocks] + \
        [(block.norm2, block.mlp.fc1) for block in model.blocks]
    after_norm = model.pre_logits.fc if model.pre_logits is not None else model.head
    if isinstance(after_norm, torch.nn.Linear):
        pairs.append((model.norm, after_norm))
    index = torch.tensor(list(channels), dtype=torch.long)
    with torch.no_grad():
        for norm, linear in pairs:
            norm.weight[index] *= factor
            norm.bias[index] *= factor
            linear.weight[:, index] /= factor
    return model


def inject_outlier_channels(model: onnx.ModelProto, channels: Sequence[int] = DEFAULT_CHANNELS,
                            factor: float = DEFAULT_FACTOR) -> onnx.ModelProto:
    """A copy of ``model`` whose LayerNorm outputs have ``channels`` scaled by ``factor`` (see module doc)."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    model = copy.deepcopy(model)
    targets = smoothing_targets(model)
    if not targets:
        raise ValueError("the graph has no LayerNorm feeding only linear layers to inject outliers into")
    own_initializers(model, targets)
    initializers = {init.name: init for init in model.graph.initializer}
    for target in targets:
        width = numpy_helper.to_array(initializers[target.norm.input[1]]).shape[0]
        bad = [c for c in channels if not 0 <= c < width]
        if bad:
            raise ValueError(f"channels {bad} are outside the LayerNorm width {width}")
        scale = np.ones(width, np.float64)
        scale[list(channels)] = factor
        for slot in (1, 2):
            name = target.norm.input[slot]
            array = numpy_helper.to_array(initializers[name]) * scale
            initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
        for use in target.weights:
            name = use.node.input[use.index]
            array = numpy_helper.to_array(initializers[name])
            array = array / (scale[None, :] if use.axis == 0 else scale[:, None])
            initializers[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return model
