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

import numpy as np
import onnx
from onnx import numpy_helper

from vitdeploy.exporters.quantize import own_initializers, smoothing_targets

DEFAULT_CHANNELS = (3, 17, 40, 61)
DEFAULT_FACTOR = 30.0


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
