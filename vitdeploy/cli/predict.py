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
        "Labels come from the metadata when it has them, else class indices are shown. With --server URL the "
        "first argument is a model on a Triton server (written by `vitdeploy triton`): the preprocessing and "
        "labels come from its config, the images go over HTTP (http://) or gRPC (grpc://); no torch needed.",
    )
    parser.add_argument("artifact", metavar="ARTIFACT_OR_MODEL",
                        help="an exported .onnx file, a TensorRT .engine/.plan, a folder `vitdeploy tune` chose a "
                        "runtime for (tune.json), or a checkpoint; with --server, the Triton model name")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (anything Pillow reads)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="how many classes to show per image (default 5)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                        help="onnxruntime provider for .onnx files (default cpu); cpu or cuda for checkpoints")
    parser.add_argument("--server", metavar="URL",
                        help="classify with a model on a Triton server: http://HOST:8000 or grpc://HOST:8001")
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


def predict_server(client: Any, images: list[str], k: int) -> list[dict[str, Any]]:
    """Top-``k`` predictions for every image from a Triton model written by ``vitdeploy triton``."""
    from vitdeploy.preprocessing import preprocess

    served = client.served
    if served.preprocessing is None:
        raise CLIError(f"model {served.name!r} carries no vitdeploy.preprocessing parameter; "
                       "write its repository with `vitdeploy triton`")
    count = served.num_classes or 0
    labels = served.labels or [str(index) for index in range(count)]
    results: list[dict[str, Any]] = []
    chunk = max(1, served.max_batch_size)
    for start in range(0, len(images), chunk):
        names = images[start:start + chunk]
        pixels = np.stack([preprocess(name, served.preprocessing) for name in names]).astype(served.input_dtype)
        logits = client.logits(pixels)
        if not labels:
            labels = [str(index) for index in range(logits.shape[1])]
        probabilities = softmax(logits)
        for name, row in zip(names, probabilities, strict=True):
            results.append({"image": str(name), "top_k": top_k(row, labels, min(k, len(labels)))})
    return results


def print_results(results: list[dict[str, Any]]) -> None:
    """Each image, then its ranked classes with probabilities."""
    for result in results:
        print(result["image"])
        for entry in result["top_k"]:
            label = entry["label"]
            suffix = f" ({entry['index']})" if label != str(entry["index"]) else ""
            print(f"  {entry['rank']:>2}. {entry['probability']:.4f}  {label}{suffix}")


def run(args: argparse.Namespace) -> int:
    from vitdeploy.runtimes import load, runtime_kind

    for image in args.images:
        if not Path(image).is_file():
            raise CLIError(f"image {image!r} does not exist or is not a file")
    if args.server:
        if args.provider:
            raise CLIError("--provider does not apply with --server: the server's model config decides")
        from vitdeploy.serving.client import TritonClient

        with TritonClient(args.server, args.artifact) as client:
            results = predict_server(client, list(args.images), args.top_k)
        print_results(results)
        if args.json:
            write_json(args.json, {"server": args.server, "model": args.artifact, "runtime": "triton",
                                   "predictions": results})
        return 0
    kind = runtime_kind(args.artifact)
    if kind not in ("torch", "tuned") and not Path(args.artifact).is_file():
        raise CLIError(f"artifact {args.artifact!r} does not exist")
    with load(args.artifact, **runtime_options(kind, args.provider)) as runtime:
        k = min(args.top_k, runtime.metadata.num_classes if runtime.metadata else args.top_k)
        results = predict(runtime, list(args.images), k)
    print_results(results)
    if args.json:
        if kind == "tuned":
            from vitdeploy.tune_manifest import read_manifest

            kind = f"tuned: {read_manifest(args.artifact).chosen.backend}"
        write_json(args.json, {"artifact": str(args.artifact), "runtime": kind, "predictions": results})
    return 0
