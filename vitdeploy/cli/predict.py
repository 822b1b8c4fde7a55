"""`vitdeploy predict`: classify images with an artifact (ONNX, engine or checkpoint) and print top-k."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    output_file,
    positive_int,
    progress,
    refuse_model_override,
    write_json,
)


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
    parser.add_argument("--top-k", type=positive_int, default=5, metavar="N", help="how many classes to show per image (default 5)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                        help="onnxruntime provider for .onnx files (default cpu); cpu or cuda for checkpoints")
    parser.add_argument("--server", metavar="URL",
                        help="classify with a model on a Triton server: http://HOST:8000 or grpc://HOST:8001")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the predictions as JSON to PATH")
    parser.add_argument("--save-outputs", type=npz_file, metavar="PATH.npz",
                        help="write every output of the artifact (logits, pooler_output, patch_tokens ...) for all "
                        "images, in image order, to PATH.npz (numpy), plus an 'images' array of the file names")
    add_model_override(parser, "ARTIFACT_OR_MODEL")
    parser.set_defaults(func=run)


def npz_file(text: str) -> str:
    """argparse type: a writable ``.npz`` path."""
    if not text.endswith(".npz"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .npz (numpy.savez adds it otherwise)")
    return output_file(text)


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


def _pixels(names: list[str], preprocessing: Any, dtype: Any) -> tuple[list[str], np.ndarray | None, list[dict[str, Any]]]:
    """The images of ``names`` that load, preprocessed and stacked, and one error entry for each that does not
    (a bad preprocessing spec is the artifact's fault, not an image's: it is raised)."""
    from vitdeploy.preprocessing import load_image, preprocess

    good, arrays, errors = [], [], []
    for name in names:
        try:
            picture = load_image(name)
        except (ValueError, OSError) as error:
            errors.append({"image": str(name), "error": " ".join(str(error).split())})
            continue
        arrays.append(preprocess(picture, preprocessing))
        good.append(name)
    return good, (np.stack(arrays).astype(dtype) if arrays else None), errors


def _entries(good: list[str], output: str, values: np.ndarray, labels: list[str], k: int) -> dict[str, dict[str, Any]]:
    """One result per image of ``good``: its top-``k`` classes for ``logits``, else the output's shape and norm."""
    if output != "logits":
        return {str(name): embedding_result(str(name), output, row) for name, row in zip(good, values, strict=True)}
    return {str(name): {"image": str(name), "top_k": top_k(row, labels, k)}
            for name, row in zip(good, softmax(values), strict=True)}


def _in_order(names: list[str], entries: dict[str, dict[str, Any]], errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per name, in order: its result or its error."""
    failed = {entry["image"]: entry for entry in errors}
    return [entries[str(name)] if str(name) in entries else failed[str(name)] for name in names]


def predict(runtime: Any, images: list[str], k: int,
            saved: dict[str, list[np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Top-``k`` predictions for every image with ``runtime`` (which must carry metadata), in order; for an
    artifact without logits, its primary output's shape and L2 norm per image. ``saved`` collects every
    output per batch (for ``--save-outputs``).

    An image that cannot be read gives ``{"image": ..., "error": ...}`` in its place; the others
    are still run.
    """
    from vitdeploy.preprocessing import load_labels

    metadata = runtime.metadata
    if metadata is None:
        raise CLIError("the artifact has no vitdeploy metadata, so its preprocessing is unknown")
    labels = load_labels(metadata)
    spec = runtime.input_spec
    primary = getattr(runtime, "output_name", "logits")
    results: list[dict[str, Any]] = []
    chunk = max(1, spec.batch[1])
    for start in range(0, len(images), chunk):
        names = images[start:start + chunk]
        good, pixels, errors = _pixels(names, metadata.preprocessing, spec.dtype)
        entries: dict[str, dict[str, Any]] = {}
        if pixels is not None:
            if saved is not None:
                outputs = runtime.run_outputs(pixels)
                for key, value in outputs.items():
                    saved.setdefault(key, []).append(np.asarray(value))
                values = outputs[primary]
            else:
                values = runtime(pixels)
            entries = _entries(good, primary, values, labels, k)
        results += _in_order(names, entries, errors)
    return results


def embedding_result(image: str, output: str, value: np.ndarray) -> dict[str, Any]:
    """What ``predict`` reports for one image of an artifact without logits: the output's shape and norm."""
    value = np.asarray(value, dtype=np.float64)
    return {"image": image, "output": output, "shape": list(value.shape), "norm": float(np.linalg.norm(value))}

def describe_runtime(runtime: Any, kind: str, tuned_choice: str | None = None) -> dict[str, Any]:
    """What ran: the backend the runtime is (whatever ``kind`` led to it: a tuned folder opens tune's
    choice), its providers or device, the graph file, its precision and the backend's precision hint
    (OpenVINO's ``inference_precision``), and the input it was given."""
    from vitdeploy.runtimes import backend_of

    metadata = runtime.metadata
    graph = getattr(runtime, "graph_path", None) or getattr(runtime, "path", None)
    variant = graph is not None and getattr(runtime, "path", graph) != graph
    crop = metadata.preprocessing.crop_size if metadata else None
    return {
        "runtime": backend_of(runtime) or kind,
        "tuned_choice": tuned_choice,
        "backend": ", ".join(getattr(runtime, "providers", None) or []) or str(getattr(runtime, "device", "")) or None,
        "graph": str(graph) if graph is not None else None,
        "graph_variant": (metadata.target if metadata else None) if variant else "as given",
        "precision": metadata.precision if metadata else None,
        "precision_hint": getattr(runtime, "inference_precision", None),
        "input": [int(metadata.model_config.get("in_channels", 3)), crop, crop] if crop else None,
        "random_weights": bool(metadata and metadata.random_weights),
    }


def runtime_line(detail: dict[str, Any]) -> str:
    """``onnxruntime (CPUExecutionProvider) ran tiny.cpu.onnx (onnxruntime-cpu variant), fp32, input 3x224x224``;
    for a tuned folder ``tune's choice openvino-bf16: openvino (CPU) ran m.onnx, fp32 graph at inference
    precision bf16, input 3x224x224``."""
    ran = f"tune's choice {detail['tuned_choice']}: " if detail.get("tuned_choice") else ""
    ran += f"{detail['runtime']}" + (f" ({detail['backend']})" if detail["backend"] else "")
    if detail["graph"]:
        ran += f" ran {Path(detail['graph']).name}"
        if detail["graph_variant"] != "as given":
            ran += f" (its validated {detail['graph_variant']} variant)"
    if detail["precision"] and detail.get("precision_hint"):
        ran += f", {detail['precision']} graph at inference precision {detail['precision_hint']}"
    elif detail["precision"]:
        ran += f", {detail['precision']}"
    if detail["input"]:
        ran += ", input " + "x".join(str(v) for v in detail["input"])
    return ran


def predict_server(client: Any, images: list[str], k: int) -> list[dict[str, Any]]:
    """Top-``k`` predictions for every image from a Triton model written by ``vitdeploy triton`` (an unreadable
    image gives an error entry, as in :func:`predict`)."""
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
        good, pixels, errors = _pixels(names, served.preprocessing, served.input_dtype)
        entries: dict[str, dict[str, Any]] = {}
        if pixels is not None and served.primary_output != "logits":
            entries = _entries(good, served.primary_output, client.primary(pixels), labels, k)
        elif pixels is not None:
            logits = client.logits(pixels)
            if not labels:
                labels = [str(index) for index in range(logits.shape[1])]
            entries = _entries(good, "logits", logits, labels, min(k, len(labels)))
        results += _in_order(names, entries, errors)
    return results


def save_outputs(path: str, images: list[str], saved: dict[str, list[np.ndarray]]) -> None:
    """Every output, concatenated over the batches, and the image names, to ``path`` (numpy .npz, atomically)."""
    import io

    from vitdeploy.files import atomic_write_bytes

    buffer = io.BytesIO()
    arrays = {name: np.concatenate(parts) for name, parts in saved.items()}
    np.savez(buffer, images=np.asarray(images), **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    progress(f"wrote {path}: " + ", ".join(f"{name} {list(value.shape)}" for name, value in arrays.items()))


def print_results(results: list[dict[str, Any]]) -> int:
    """Each image, then its ranked classes with probabilities (or its embedding's shape and norm); one
    ``error:`` line on stderr per image that could not be read. Returns how many could not."""
    failed = 0
    for result in results:
        if "error" in result:
            failed += 1
            print(f"vitdeploy predict: error: {result['error']}", file=sys.stderr)
            continue
        if "top_k" not in result:
            shape = "x".join(str(d) for d in result["shape"])
            print(f"{result['image']}\n  {result['output']} [{shape}], L2 norm {result['norm']:.4f}")
            continue
        print(result["image"])
        for entry in result["top_k"]:
            label = entry["label"]
            suffix = f" ({entry['index']})" if label != str(entry["index"]) else ""
            print(f"  {entry['rank']:>2}. {entry['probability']:.4f}  {label}{suffix}")
    return failed


def open_runtime(args: argparse.Namespace, kind: str) -> Any:
    """The runtime for ``args.artifact``; a checkpoint with ``--model`` is loaded with that architecture."""
    from vitdeploy.runtimes import load

    options = runtime_options(kind, args.provider)
    if args.model_variant is None:
        return load(args.artifact, **options)
    if kind != "torch":
        refuse_model_override(args.model_variant, args.artifact, "an artifact, whose metadata records its architecture")
    from vitdeploy.checkpoints import resolve_source
    from vitdeploy.runtimes.torch import TorchRuntime

    return TorchRuntime(resolve_source(args.artifact, log=progress, model=args.model_variant).model, **options)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.runtimes import runtime_kind

    if args.server:
        if args.provider:
            raise CLIError("--provider does not apply with --server: the server's model config decides")
        from vitdeploy.serving.client import TritonClient

        with TritonClient(args.server, args.artifact) as client:
            results = predict_server(client, list(args.images), args.top_k)
        failed = print_results(results)
        if args.json:
            write_json(args.json, {"server": args.server, "model": args.artifact, "runtime": "triton",
                                   "predictions": results})
        return 2 if failed else 0
    kind = runtime_kind(args.artifact)
    if kind not in ("torch", "tuned") and not Path(args.artifact).is_file():
        raise CLIError(f"artifact {args.artifact!r} does not exist")
    saved: dict[str, list[np.ndarray]] | None = {} if args.save_outputs else None
    tuned_choice = None
    if kind == "tuned":
        from vitdeploy.tune_manifest import read_manifest

        chosen = read_manifest(args.artifact).chosen
        tuned_choice = chosen.name if chosen is not None else None
    with open_runtime(args, kind) as runtime:
        detail = describe_runtime(runtime, kind, tuned_choice)
        progress(runtime_line(detail))
        if detail["random_weights"]:
            origin = (f"{args.artifact} is a variant name, not a checkpoint" if kind == "torch" else
                      f"{Path(args.artifact).name} was exported from the variant name {runtime.metadata.source!r}")
            warnings.warn(f"{origin}: its weights are RANDOM, so the classes below mean nothing", stacklevel=1)
        k = min(args.top_k, runtime.metadata.num_classes if runtime.metadata else args.top_k)
        results = predict(runtime, list(args.images), k, saved)
    failed = print_results(results)
    if saved is not None and any("error" not in result for result in results):
        save_outputs(args.save_outputs, [r["image"] for r in results if "error" not in r], saved)
    if args.json:
        if kind == "tuned":
            from vitdeploy.tune_manifest import read_manifest

            kind = f"tuned: {read_manifest(args.artifact).chosen.backend}"
        write_json(args.json, {"artifact": str(args.artifact), "runtime": kind, "ran": detail, "predictions": results})
    return 2 if failed else 0
