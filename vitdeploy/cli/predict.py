"""`vitdeploy predict`: classify images with an artifact (ONNX, engine or checkpoint) and print top-k."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.cli.common import CLIError, output_file, positive_int, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with an ONNX file, TensorRT engine or checkpoint and print the top-k classes",
        description="Preprocess each image as the artifact's metadata says (resize, centre-crop, normalise), "
        "run it through the runtime the artifact calls for (.onnx: onnxruntime, .engine/.plan: TensorRT, "
        "otherwise the eager PyTorch model) and print the top-k classes with softmax probabilities. "
        "Labels come from the metadata when it has them, else class indices are shown.",
    )
    parser.add_argument("artifact", help="an exported .onnx file, a TensorRT .engine/.plan, or a checkpoint")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="how many classes to show per image (default 5)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                        help="onnxruntime provider for .onnx files (default cpu); cpu or cuda for checkpoints")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the predictions as JSON to PATH")
    parser.set_defaults(func=run)


def runtime_options(kind: str, provider: str | None) -> dict[str, Any]:
    """Constructor options for the runtime ``kind`` that honour ``--provider``."""
    if provider is None:
        return {}
    if kind == "onnxruntime":
        return {"provider": provider}
    if kind == "torch" and provider in ("cpu", "cuda"):
        return {"device": provider}
    raise CLIError(f"--provider {provider} does not apply to a {kind} artifact")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one image, best first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"rank": rank + 1, "index": int(i), "label": labels[i], "probability": float(probabilities[i])}
        for rank, i in enumerate(order)
    ]


def predict(runtime: Any, images: list[str], k: int) -> list[dict[str, Any]]:
    """Top-``k`` predictions for every image with ``runtime`` (which must carry metadata)."""
    from vitdeploy.preprocessing import load_labels, preprocess

    metadata = runtime.metadata
    if metadata is None:
        raise CLIError("the artifact has no vitdeploy metadata, so its preprocessing is unknown")
    labels = load_labels(metadata)
    spec = runtime.input_spec
    results: list[dict[str, Any]] = []
    chunk = max(1, spec.batch[1])
    for start in range(0, len(images), chunk):
        names = images[start:start + chunk]
        pixels = np.stack([preprocess(name, metadata.preprocessing) for name in names]).astype(spec.dtype)
        probabilities = softmax(runtime(pixels))
        for name, row in zip(names, probabilities, strict=True):
            results.append({"image": str(name), "top_k": top_k(row, labels, k)})
    return results


def run(args: argparse.Namespace) -> int:
    from vitdeploy.runtimes import load, runtime_kind

    for image in args.images:
        if not Path(image).is_file():
            raise CLIError(f"image {image!r} does not exist or is not a file")
    kind = runtime_kind(args.artifact)
    if kind != "torch" and not Path(args.artifact).is_file():
        raise CLIError(f"artifact {args.artifact!r} does not exist")
    with load(args.artifact, **runtime_options(kind, args.provider)) as runtime:
        k = min(args.top_k, runtime.metadata.num_classes if runtime.metadata else args.top_k)
        results = predict(runtime, list(args.images), k)
    for result in results:
        print(result["image"])
        for entry in result["top_k"]:
            label = entry["label"]
            suffix = f" ({entry['index']})" if label != str(entry["index"]) else ""
            print(f"  {entry['rank']:>2}. {entry['probability']:.4f}  {label}{suffix}")
    if args.json:
        write_json(args.json, {"artifact": str(args.artifact), "runtime": kind, "predictions": results})
    return 0
