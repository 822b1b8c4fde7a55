"""Outlier activation channels injected into a ViT, function-preserving, and the int8 check on them.

Trained ViTs have a few LayerNorm-output channels tens of times larger than the rest (the
quantization literature's "outlier channels"); pretrained weights cannot be downloaded on the
machines this project is developed on, so tests and the quantizer comparison make them: for every
LayerNorm whose output feeds only linear layers, the scale and bias of ``channels`` are
multiplied by ``factor`` and the matching input rows of the consumers' weights divided by it. The
float function is unchanged (up to rounding); the activations a per-tensor int8 scale must cover
are not. :func:`inject_outlier_channels` does it to an fp32 ONNX graph,
:func:`inject_outlier_channels_eager` to the eager model (so an export carries them), every family
included: the blocks' norms, SigLIP's attention pool (its LayerNorm, and the final norm its ``kv``
reads) and the norm before a classifier head or CLIP's projection.

Run as a module, it is the issue's check: for each seed, a ViT with random weights (that seed),
three LayerNorm channels x30 in every block (drawn by the seed), exported at int8 by the real
exporter (its own gate: eager fp32 at the validation shapes), then the file's default output
(logits; CLIP's ``image_embeds``, SigLIP's ``pooler_output``) compared with eager fp32 on the
bundled photos with onnxruntime and OpenVINO; the target is worst cosine >= 0.995 everywhere.
Accuracy only; no timing::

    python studies/outliers.py [--model vit_small_patch16_224] [--seeds 0,1,2,3,4] [--depth N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from study import RESULTS, command_line, write_results

from vitdeploy.exporters.quantize import own_initializers, smoothing_targets

DEFAULT_CHANNELS = (3, 17, 40, 61)
DEFAULT_FACTOR = 30.0
# The outlier ViT: three LayerNorm channels x30 in every block, which channels drawn per seed.
SEED_CHANNELS = 3
TARGET_COSINE = 0.995
DEFAULT_OUTPUT = RESULTS / "outliers_int8.json"


def outlier_channels(width: int, seed: int, count: int = SEED_CHANNELS) -> tuple[int, ...]:
    """``count`` distinct channels of a ``width``-wide LayerNorm drawn by ``seed`` (sorted)."""
    if not 0 < count <= width:
        raise ValueError(f"count must be in 1..{width} (the LayerNorm width), got {count}")
    return tuple(sorted(int(c) for c in np.random.default_rng(seed).choice(width, count, replace=False)))


def _outlier_pairs(model: Any, outputs: Sequence[str]) -> list[tuple[Any, list[Any]]]:
    """Each LayerNorm that may carry outliers with the linear layers that alone read its output.

    Every block's ``norm1`` (read by ``qkv``) and ``norm2`` (``fc1``); with an attention pool (SigLIP),
    its LayerNorm (read by its MLP's ``fc1``) and the final norm (read by its ``kv``) unless the
    tokens themselves are asked for; and the norm before the head (``norm``, or ``fc_norm``) when
    every output in ``outputs`` is read from it through linear layers only: the representation
    layer, the classifier head (and DeiT's distillation head) or CLIP's projection. CLIP's pre-norm
    is left alone: its output is the residual stream, not only a linear layer's input.
    """
    from torch import nn

    from vitdeploy.outputs import IMAGE_EMBEDS, LOGITS, POOLER_OUTPUT, TOKEN_OUTPUTS

    config = model.config
    pairs: list[tuple[Any, list[Any]]] = [(block.norm1, [block.attn.qkv]) for block in model.blocks]
    pairs += [(block.norm2, [block.mlp.fc1]) for block in model.blocks]
    tokens_asked = any(name in TOKEN_OUTPUTS for name in outputs)
    if config.pooling == "map":
        pairs.append((model.attn_pool.norm, [model.attn_pool.mlp.fc1]))
        if not tokens_asked and isinstance(model.norm, nn.LayerNorm):
            pairs.append((model.norm, [model.attn_pool.kv]))
    pooled_norm = model.fc_norm if config.use_fc_norm else model.norm
    if config.pooling in ("token", "avg") and isinstance(pooled_norm, nn.LayerNorm) \
            and not (tokens_asked and not config.use_fc_norm):
        if model.pre_logits is not None:
            readers = {name: [model.pre_logits.fc] for name in (LOGITS, POOLER_OUTPUT, IMAGE_EMBEDS)}
        else:
            heads = [m for m in (model.head, model.head_dist) if isinstance(m, nn.Linear)]
            readers = {LOGITS: heads, IMAGE_EMBEDS: [model.proj] if isinstance(model.proj, nn.Linear) else []}
        linears = [linear for name in outputs for linear in readers.get(name, [])]
        if linears and all(readers.get(name) for name in outputs if name not in TOKEN_OUTPUTS):
            pairs.append((pooled_norm, list(dict.fromkeys(linears))))
    return pairs


def inject_outlier_channels_eager(model: Any, channels: Sequence[int], factor: float = DEFAULT_FACTOR,
                                  outputs: Sequence[str] | None = None) -> Any:
    """The same outliers in an eager :class:`~vitdeploy.model.VisionTransformer` (in place, returned).

    The LayerNorms of :func:`_outlier_pairs` get ``channels`` of their scale and bias multiplied by
    ``factor`` and the input columns of the linear layers reading them divided by it, so
    ``outputs`` (default: the model's default outputs) are unchanged up to rounding, and an export
    of those outputs carries the outliers in its graph.
    """
    import torch

    from vitdeploy.outputs import check_outputs, default_outputs

    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    width = model.config.hidden_size
    bad = [c for c in channels if not 0 <= c < width]
    if bad:
        raise ValueError(f"channels {bad} are outside the hidden size {width}")
    outputs = check_outputs(outputs or default_outputs(model.config), model.config)
    index = torch.tensor(list(channels), dtype=torch.long)
    with torch.no_grad():
        for norm, linears in _outlier_pairs(model, outputs):
            norm.weight[index] *= factor
            norm.bias[index] *= factor
            for linear in linears:
                linear.weight[:, index] /= factor
    return model


def scale_layer_norm_weights(model: Any, channels: Sequence[int], factor: float = DEFAULT_FACTOR) -> Any:
    """The other construction (in place, returned): ``channels`` of the weight of *every* LayerNorm of the eager
    model multiplied by ``factor``, nothing compensated. The attention inputs carry the outliers as well as the
    MLP's (and the queries and keys grow with them, so attention is far from uniform); it is another model,
    not a re-parametrisation, and its own fp32 export is the reference."""
    import torch
    from torch import nn

    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    index = torch.tensor(list(channels), dtype=torch.long)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) and module.weight is not None:
                module.weight[index] *= factor
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python studies/outliers.py",
                                     description="int8 exports of outlier-channel ViTs (random weights per seed), "
                                     "checked against eager fp32 at the validation shapes and on the photos")
    parser.add_argument("--model", default="vit_small_patch16_224", help="variant name (default vit_small_patch16_224)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated weight/channel seeds (default 0,1,2,3,4)")
    parser.add_argument("--depth", type=int, help="override the number of blocks (a quick dry run: --depth 2)")
    parser.add_argument("--channels", type=int, default=SEED_CHANNELS, help=f"outlier channels (default {SEED_CHANNELS})")
    parser.add_argument("--factor", type=float, default=DEFAULT_FACTOR, help=f"outlier factor (default {DEFAULT_FACTOR:g})")
    parser.add_argument("--calibration", metavar="DIR", help="calibration images (default: bundled photos + crops)")
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--weights", choices=("auto", "full", "7bit"), default="auto",
                        help="int8 weight range: auto (the project's int8 policy, INT8_POLICY in "
                        "exporters/artifact_set.py: full range), full (TensorRT's and VNNI CPUs' form) or 7bit "
                        "(default auto)")
    parser.add_argument("--no-outlier-handling", action="store_true",
                        help="quantize without SmoothQuant migration and without the keep-in-float fallback (the "
                        "control: what the outliers do to plain per-tensor int8)")
    parser.add_argument("--construction", choices=("migrated", "layernorm-weights"), default="migrated",
                        help="migrated: function-preserving channels in the norms before linear layers (default); "
                        "layernorm-weights: the channels x factor in the weight of every LayerNorm, uncompensated")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or (args.depth is not None and args.depth < 1) or args.channels < 1 or args.factor <= 0 \
            or args.calibration_size < 1:
        parser.error("need at least one seed, --depth >= 1, --channels >= 1, --factor > 0, --calibration-size >= 1")
    return args


def _photo_cosines(path: Path, model: Any, preprocessing: Any, output: str) -> dict[str, dict[str, float | None]]:
    """Worst cosine (and, for logits, top-1 agreement) of the int8 file's ``output`` against eager fp32
    on the bundled photos (8 at the native size), on onnxruntime and OpenVINO."""
    import torch

    from vitdeploy.outputs import LOGITS
    from vitdeploy.parity import InputFactory, compare_logits
    from vitdeploy.runtimes import OpenVINORuntime, OrtRuntime

    size = model.config.image_size
    pixels, _ = InputFactory(preprocessing, synthetic=False).batch(8, size, size)
    with torch.no_grad():
        reference = model.forward_outputs(torch.from_numpy(pixels), [output])[output].numpy()
    results = {}
    for backend, runtime_class in (("onnxruntime", OrtRuntime), ("openvino", OpenVINORuntime)):
        with runtime_class(path) as runtime:
            metrics = compare_logits(reference, runtime.run_outputs(pixels)[output], classification=output == LOGITS)
        results[backend] = {"cosine": round(metrics.cosine, 6), "top1_agreement": metrics.top1_agreement}
    return results


def run_seed(args: argparse.Namespace, seed: int, folder: Path) -> tuple[dict[str, Any], float]:
    """One seed: build, inject, export at int8 (the export's gate), check the photos on both runtimes.
    Returns the result row and the seconds it took."""
    import torch

    import vitdeploy
    from vitdeploy.exporters.artifact_set import INT8_POLICY
    from vitdeploy.exporters.onnx_export import ExportOptions, ExportValidationError, export_onnx
    from vitdeploy.exporters.quantize import QuantizationTargetError, QuantizeOptions
    from vitdeploy.outputs import default_outputs

    torch.manual_seed(seed)
    overrides = {"depth": args.depth} if args.depth is not None else {}
    model = vitdeploy.create_model(args.model, **overrides).eval()
    (output,) = default_outputs(model.config)
    channels = outlier_channels(model.config.hidden_size, seed, args.channels)
    injected = [norm for norm, _ in _outlier_pairs(model, [output])]
    names = {id(module): name for name, module in model.named_modules()}
    if getattr(args, "construction", "migrated") == "layernorm-weights":
        scale_layer_norm_weights(model, channels, args.factor)
        injected = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    else:
        inject_outlier_channels_eager(model, channels, args.factor, [output])
    path = folder / f"seed{seed}-int8.onnx"
    reduce_range = {"auto": INT8_POLICY.reduce_range, "full": False, "7bit": True}[args.weights]
    row: dict[str, Any] = {"seed": seed, "output": output, "channels": list(channels), "reduce_range": reduce_range,
                           "outlier_layer_norms": [names[id(norm)] for norm in injected]}
    start = time.perf_counter()
    try:
        result = export_onnx(model, path, ExportOptions(
            precision="int8", calibration=args.calibration, calibration_size=args.calibration_size,
            quantize=QuantizeOptions(reduce_range=reduce_range,
                                     **({"smooth_alpha": 0.0, "fallback_cosine": None} if args.no_outlier_handling
                                        else {})),
            cpu_variant=False, preflight=False))
        report = result.report
        row["export_passed"] = True
        quantization = result.quantization or {}
    except ExportValidationError as error:
        report, quantization = error.report, {}
        row["export_passed"] = False
    except QuantizationTargetError as error:  # refused before validation: the probe's figures say why
        from vitdeploy.parity import ParityReport

        report, quantization = ParityReport(str(path)), {"fallback": error.record}
        row["export_passed"] = False
        row["refused"] = str(error)
    seconds = time.perf_counter() - start  # said on stderr, not recorded: machines here are shared
    row["validation"] = {f"{c.batch}x{c.height}x{c.width}": {"cosine": round(c.metrics.cosine, 6),
                                                              "top1_agreement": c.metrics.top1_agreement}
                         for c in report.cases if c.output == output}
    smoothing = quantization.get("smoothing", {})
    row["quantization"] = {"smoothed_layer_norms": smoothing.get("layer_norms"),
                           "alphas": smoothing.get("alphas"), "fallback": quantization.get("fallback")}
    if row["export_passed"]:
        from vitdeploy.metadata import read_onnx_metadata

        row["photos"] = _photo_cosines(path, model, read_onnx_metadata(path).preprocessing, output)
    worst = [case["cosine"] for case in row["validation"].values()] + \
        [r["cosine"] for r in row.get("photos", {}).values()]
    row["worst_cosine"] = min(worst) if worst else None
    row["meets_target"] = bool(row["export_passed"] and worst and min(worst) >= TARGET_COSINE
                               and len(row.get("photos", {})) == 2)
    return row, seconds


def main(argv: Sequence[str] | None = None) -> int:
    from vitdeploy.cpu_features import int8_dot_flags

    args = parse_args(argv)
    command = command_line("outliers", argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="outliers.") as folder:
        for seed in args.seeds:
            print(f"seed {seed}: {args.model}" + (f" depth {args.depth}" if args.depth else "")
                  + f", {args.channels} channels x{args.factor:g}, int8 export ...", file=sys.stderr, flush=True)
            row, seconds = run_seed(args, seed, Path(folder))
            rows.append(row)
            photos = ", ".join(f"{k} {v['cosine']:.5f}" for k, v in row.get("photos", {}).items())
            print(f"seed {seed}: export {'passed' if row['export_passed'] else 'REFUSED'}; validation worst "
                  f"{min((c['cosine'] for c in row['validation'].values()), default=float('nan')):.5f}; photos {photos or '-'}; "
                  f"target {'met' if row['meets_target'] else 'MISSED'} ({seconds:.0f} s)", file=sys.stderr,
                  flush=True)
    met = all(row["meets_target"] for row in rows)
    report = {"cpu_int8_dot_product": int8_dot_flags(),
              "setup": {"model": args.model, "depth": args.depth, "seeds": args.seeds, "channels": args.channels,
                        "weights": args.weights, "outlier_handling": not args.no_outlier_handling,
                        "factor": args.factor, "calibration": args.calibration or "bundled photos + crops",
                        "calibration_size": args.calibration_size, "target_cosine": TARGET_COSINE,
                        "metrics": "vs eager fp32; cosine is the minimum over each batch's samples"},
              "results": rows, "target_met": met}
    write_results(args.output, command, report)
    print(f"{'every' if met else 'NOT every'} seed meets worst cosine >= {TARGET_COSINE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
