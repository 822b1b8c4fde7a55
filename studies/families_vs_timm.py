"""Each family's exported graphs against its eager timm model, side by side on the CPU at hand.

The question: at batch 1 and the native size, is the fp32 graph vitdeploy exports of
each family no slower than the same family's eager timm model, and where does the int8 graph
stand beside them? For each family's representative variant (DeiT-S distilled, DeiT III-S,
DINOv2-S with registers at 518, CLIP B/16, SigLIP B/16 by default):

- the real timm model (``timm.create_model``, random weights, seed 0; LayerScale gammas set to
  0.1, the size trained gammas have, as vitdeploy's variant names do), fp32 under
  ``torch.inference_mode``, as timm runs it (its fused attention);
- vitdeploy's fp32 graph of the same weights (saved as a timm Hub folder and loaded by vitdeploy's
  timm loader, exported and validated by the real exporter) on onnxruntime, the way ``OrtRuntime``
  runs it on a CPU (the validated onnxruntime-CPU variant);
- the int8 graph of the same weights, quantized from that fp32 graph in the project's int8 form
  (:data:`~vitdeploy.exporters.artifact_set.INT8_POLICY`), on onnxruntime.

Each output is checked against timm's on the bundled photos (the fp32 graph's relative error shows
the weights are the same). A family's three contenders are timed in interleaved rounds whose order
reverses every round (:func:`~vitdeploy.benchmarks.timing.time_rounds`), families one after
another, all in one process; each contender's figure is the median over rounds of its per-round
p50, and the ratios are graph / eager timm. The JSON carries the command, the CPU and its flags,
the versions (timm's too) and the other processes' load while timing.

    python studies/families_vs_timm.py [--models NAME,...] [--rounds 7] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from study import RESULTS, add_run_arguments, check_at_least_one, command_line, write_results

from vitdeploy.benchmarks.timing import time_rounds

DEFAULT_MODELS = ("deit_small_distilled_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
                  "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224")
DEFAULT_OUTPUT = RESULTS / "families_vs_timm.json"
EAGER, FP32, INT8 = "timm eager fp32", "vitdeploy fp32 graph (onnxruntime)", "vitdeploy int8 graph (onnxruntime)"
CONTENDERS = (EAGER, FP32, INT8)
TRAINED_GAMMA = 0.1  # LayerScale: the size of trained gammas (timm inits them at 1e-5 / 1e-6, blocks all but off)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/families_vs_timm.py",
        description="For each family, time the eager timm model, vitdeploy's fp32 graph and its int8 graph "
        "(onnxruntime) side by side at batch 1 and the native size; report p50s, the ratios to eager timm "
        "and whether the fp32 graph is no slower.",
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), metavar="NAME,...",
                        help="timm variant names, comma-separated (default: one per family: "
                        f"{', '.join(DEFAULT_MODELS)})")
    add_run_arguments(parser, rounds=7, iterations=10, warmup=2, default_output=DEFAULT_OUTPUT,
                      iterations_help="timed calls per contender per round", model=False)
    args = parser.parse_args(argv)
    check_at_least_one(parser, args)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not args.models:
        parser.error(f"--models {args.models!r} names no model")
    return args


def summarize(p50s: dict[str, list[float]]) -> dict[str, Any]:
    """Medians over rounds of each contender's per-round p50 (ms), the graphs' ratios to eager timm,
    and whether the fp32 graph is no slower than eager timm."""
    missing = [name for name in CONTENDERS if not p50s.get(name)]
    if missing:
        raise ValueError(f"no timings for {missing}; expected per-round p50s of {list(CONTENDERS)}")
    medians = {name: float(np.median(p50s[name])) for name in CONTENDERS}
    eager = medians[EAGER]
    return {
        "p50_ms": {name: round(ms, 3) for name, ms in medians.items()},
        "p50_ms_rounds": {name: [round(v, 3) for v in p50s[name]] for name in CONTENDERS},
        "fp32_graph_vs_eager": round(medians[FP32] / eager, 4),
        "int8_graph_vs_eager": round(medians[INT8] / eager, 4),
        "fp32_graph_no_slower_than_eager": medians[FP32] <= eager,
    }


@dataclass
class Family:
    """One family's contenders: what they are, how to call them, and how they compare with timm."""

    model: str
    setup: dict[str, Any]
    runners: dict[str, Callable[[], Any]]
    accuracy: dict[str, dict[str, float]]
    close: Callable[[], None]


def _timm_model(timm: Any, name: str, depth: int | None) -> Any:
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"depth": depth} if depth else {})).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("gamma"):
                param.fill_(TRAINED_GAMMA)
        if getattr(model, "head", None) is not None and getattr(model.head, "bias", None) is not None \
                and "clip" in name:
            model.head.bias.zero_()  # timm's CLIP head is the bias-free visual projection
    return model


def _save_hub_folder(model: Any, name: str, depth: int | None, folder: Path) -> Path:
    """The weights as timm's Hub folders hold them: ``model.safetensors`` and a ``config.json`` naming the architecture."""
    from safetensors.torch import save_file

    path = folder / name
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    config = {"architecture": name, "model_args": {"depth": depth} if depth else {},
              "pretrained_cfg": {key: model.pretrained_cfg[key] for key in ("mean", "std", "crop_pct", "interpolation")
                                 if key in model.pretrained_cfg}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def prepare_family(timm: Any, name: str, args: argparse.Namespace, folder: Path,
                   say: Callable[[str], None]) -> Family:
    """Build the timm model, export vitdeploy's fp32 and int8 graphs of its weights, open them, check them."""
    import torch

    from vitdeploy.benchmarks.artifacts import artifact_plan
    from vitdeploy.benchmarks.models import Sweep
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.artifact_set import build_artifact
    from vitdeploy.outputs import LOGITS, default_outputs
    from vitdeploy.parity import InputFactory, compare_logits
    from vitdeploy.runtimes import OrtRuntime

    reference = _timm_model(timm, name, args.depth)
    model = load_model(_save_hub_folder(reference, name, args.depth, folder)).eval()
    size = model.config.image_size
    (output,) = default_outputs(model.config)
    sweep = Sweep(batches=(1,), sizes=((size, size),))
    say(f"{name}: exporting fp32 and int8 at batch 1, {size}x{size} (validated)")
    plan = artifact_plan(name, sweep, source=name, quantize_from_fp32=True)  # one trace for both
    fp32 = build_artifact(model, plan, "fp32", folder).path
    int8 = build_artifact(model, plan, "int8", folder).path
    threads = {"intra_op_threads": args.threads, "inter_op_threads": 1}
    runtimes = {FP32: OrtRuntime(fp32, **threads), INT8: OrtRuntime(int8, **threads)}

    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    tensor = torch.from_numpy(pixels)

    def eager() -> Any:
        with torch.inference_mode():
            return reference(tensor)

    runners: dict[str, Callable[[], Any]] = {EAGER: eager, FP32: lambda: runtimes[FP32](pixels),
                                             INT8: lambda: runtimes[INT8](pixels)}
    photos, _ = InputFactory(runtimes[FP32].metadata.preprocessing, synthetic=False).batch(4, size, size)
    with torch.inference_mode():
        expected = reference(torch.from_numpy(photos)).numpy()
    accuracy = {}
    for contender, runtime in runtimes.items():
        got = np.concatenate([runtime.run_outputs(photo[None])[output] for photo in photos])
        metrics = compare_logits(expected, got, classification=output == LOGITS)
        accuracy[contender] = {"cosine": round(metrics.cosine, 6), "rel_max_error": float(f"{metrics.rel_max_error:.3g}")}
    setup = {"model": name, "depth": model.config.depth, "batch": 1, "height": size, "width": size, "output": output,
             "graphs": {contender: runtime.graph_path.name for contender, runtime in runtimes.items()},
             "int8_reduce_range": plan.int8.reduce_range}

    def close() -> None:
        for runtime in runtimes.values():
            runtime.close()

    return Family(name, setup, runners, accuracy, close)


def _say(message: str) -> None:
    print(f"[families] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from vitdeploy.benchmarks.environment import package_versions, recording_load
    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.timm_import import import_timm

    args = parse_args(argv)
    command = command_line("families_vs_timm", argv)
    timm = import_timm()
    if timm is None:
        print("python studies/families_vs_timm.py: error: timm is not installed (pip install --no-deps timm)",
              file=sys.stderr)
        return 2
    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        print(f"python studies/families_vs_timm.py: error: --models {','.join(unknown)}: not timm model names "
              "(timm.list_models() has them)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="families.") as folder:
        for index, name in enumerate(args.models, 1):
            _say(f"[{index}/{len(args.models)}] {name}")
            try:
                family = prepare_family(timm, name, args, Path(folder), _say)
            except ExportValidationError as error:  # nothing is open yet: the exports come first
                print(f"python studies/families_vs_timm.py: error: {name}: a graph failed its export gate: "
                      f"{'; '.join(error.report.failures[:2])}", file=sys.stderr)
                return 1
            try:
                _say(f"{name}: {len(CONTENDERS)} contenders x {args.rounds} rounds x {args.iterations} calls, interleaved")
                with recording_load() as load:
                    p50s = time_rounds(family.runners, args.rounds, args.iterations, args.warmup)
            finally:
                family.close()
            row = {**family.setup, **summarize(p50s), "accuracy_vs_eager": family.accuracy, **load.to_dict()}
            results.append(row)
            _say(f"{name}: eager {row['p50_ms'][EAGER]:.2f} ms, fp32 graph {row['p50_ms'][FP32]:.2f} ms "
                 f"({row['fp32_graph_vs_eager']:.3f}x), int8 graph {row['p50_ms'][INT8]:.2f} ms "
                 f"({row['int8_graph_vs_eager']:.3f}x; cosine {family.accuracy[INT8]['cosine']:.5f}); "
                 f"{load.describe()}")
    report = {
        "timm_version": package_versions(("timm",))["timm"],
        "setup": {"models": args.models, "depth": args.depth, "threads": args.threads, "rounds": args.rounds,
                  "iterations": args.iterations, "warmup": args.warmup,
                  "weights": f"random (timm, torch.manual_seed(0); LayerScale gammas {TRAINED_GAMMA}), the same in "
                             "every contender",
                  "accuracy": "vs eager timm fp32 on the 4 bundled photos at the native size",
                  "statistic": "median over rounds of the per-round p50; rounds interleave a family's contenders"},
        "results": results,
        "fp32_graph_no_slower_than_eager_everywhere": all(r["fp32_graph_no_slower_than_eager"] for r in results),
    }
    print(f"{'model':34s} {'eager ms':>9s} {'fp32 ms':>9s} {'fp32/eager':>10s} {'int8 ms':>9s} {'int8/eager':>10s} "
          f"{'int8 cos':>9s}")
    for r in results:
        print(f"{r['model']:34s} {r['p50_ms'][EAGER]:9.2f} {r['p50_ms'][FP32]:9.2f} {r['fp32_graph_vs_eager']:9.3f}x "
              f"{r['p50_ms'][INT8]:9.2f} {r['int8_graph_vs_eager']:9.3f}x {r['accuracy_vs_eager'][INT8]['cosine']:9.5f}")
    print(f"fp32 graph no slower than eager timm: "
          f"{'every family' if report['fp32_graph_no_slower_than_eager_everywhere'] else 'NOT every family'}")
    write_results(args.output, command, report, threads=args.threads)
    _say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
