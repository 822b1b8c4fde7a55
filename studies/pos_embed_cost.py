"""What the exact in-graph position-embedding resampling costs, against the single ``Resize`` it replaced.

An exported graph resamples the position embeddings with the checkpoint
framework's own convention, as ``W_h · P · W_wᵀ`` with interpolation matrices computed in the
graph from the input size (``vitdeploy.pos_embed``). Before, it was one ONNX ``Resize``
(bicubic, ``a = -0.75``, no antialias: Hugging Face's convention, which cannot express timm's
antialiased one). This script exports the same model (random weights, fixed seed) once per
form with the real tracer and times them with onnxruntime side by side in one process, in
interleaved rounds (the order reverses every round), reporting the median of the per-round p50
latencies: the whole model, and the position-embedding subgraph alone.

    python studies/pos_embed_cost.py [--model vit_small_patch16_224] [--size 288] [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import study
from study import RESULTS, add_run_arguments, check_at_least_one, command_line, model_overrides

from vitdeploy.benchmarks.timing import time_rounds

DEFAULT_OUTPUT = RESULTS / "pos_embed_cost.json"
RESIZE = "resize"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from vitdeploy.pos_embed import RESAMPLE_METHODS

    parser = argparse.ArgumentParser(
        prog="python studies/pos_embed_cost.py",
        description="Time the in-graph interpolation-matrix resampling of each convention against the single "
        "Resize node it replaced (onnxruntime CPU, one process, interleaved rounds).",
    )
    add_run_arguments(parser, rounds=9, iterations=30, warmup=5, default_output=DEFAULT_OUTPUT,
                      iterations_help="timed calls per graph per round")
    parser.add_argument("--size", type=int, default=None,
                        help="input height = width; default 1.25x native (the graph resamples at every size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="timm,huggingface",
                        help=f"conventions to time beside the Resize form, comma-separated (of {', '.join(RESAMPLE_METHODS)})")
    args = parser.parse_args(argv)
    check_at_least_one(parser, args, "batch")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in RESAMPLE_METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods {unknown or '(none)'}: expected some of {', '.join(RESAMPLE_METHODS)}")
    return args


def resize_form(pos_embed: Any, new_grid: Any, old_grid: tuple[int, int], num_prefix_tokens: int = 1,
                *, method: str) -> Any:
    """The earlier resampling (the baseline): one bicubic ``F.interpolate``, which exports as one
    ``Resize`` node. It computes Hugging Face's convention whatever ``method`` says."""
    import torch
    import torch.nn.functional as F

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, channels)], dim=1)


@contextlib.contextmanager
def resampling_by(form: str) -> Iterator[None]:
    """The model's forward pass resamples with ``form``: ``"resize"`` (the baseline) or the exact matrices."""
    import vitdeploy.model as model_module

    saved = model_module.resample_pos_embed
    if form == RESIZE:
        model_module.resample_pos_embed = resize_form
    try:
        yield
    finally:
        model_module.resample_pos_embed = saved


def _export(module: Any, example: Any, path: Path, dims: dict[int, Any]) -> None:
    import torch

    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes={"x": dims},
                                    input_names=["x"], opset_version=18, optimize=True, verbose=False)
    program.save(str(path))


def pos_embed_module(model: Any) -> Any:
    """A module whose output is ``model``'s position embeddings resampled to its input's patch grid,
    by whatever ``vitdeploy.model.resample_pos_embed`` is when it runs (see :func:`resampling_by`)."""
    import torch

    import vitdeploy.model as model_module

    config = model.config

    class PosEmbed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = torch.nn.Parameter(model.pos_embed.detach().clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grid = (x.shape[-2] // config.stride, x.shape[-1] // config.stride)
            return model_module.resample_pos_embed(self.pos_embed, grid, config.grid_size, config.num_prefix_tokens,
                                                   method=config.pos_embed_resample)

    return PosEmbed().eval()


def main(argv: Sequence[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort
    import torch

    import vitdeploy
    from vitdeploy.benchmarks.environment import recording_load
    from vitdeploy.exporters.onnx_export import ExportOptions, trace_to_onnx
    from vitdeploy.parity import compare_logits

    args = parse_args(argv)
    command = command_line("pos_embed_cost", argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = model_overrides(args)
    base = vitdeploy.create_model(args.model, **overrides).eval()
    config = base.config
    size = args.size or (5 * config.image_size // 4) // config.stride * config.stride
    pixels = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    forms = [RESIZE, *args.methods]
    # The Resize form computes Hugging Face's convention: that is its eager reference.
    conventions = {form: "huggingface" if form == RESIZE else form for form in forms}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1

    sessions: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
    parity: dict[str, float] = {}
    nodes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="pos_embed_cost.") as folder:
        for form in forms:
            model = vitdeploy.create_model(args.model, pos_embed_resample=conventions[form], **overrides).eval()
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                reference = model(torch.from_numpy(pixels)).numpy()
            print(f"exporting {args.model} with {form} resampling ...", file=sys.stderr)
            with resampling_by(form):
                proto = trace_to_onnx(model, ExportOptions())
                whole = Path(folder) / f"model-{form}.onnx"
                onnx.save(proto, str(whole))
                del proto
                part = Path(folder) / f"pos_embed-{form}.onnx"
                stride = config.stride
                dims = {2: stride * torch.export.Dim("gh", min=1, max=256),
                        3: stride * torch.export.Dim("gw", min=1, max=256)}
                _export(pos_embed_module(model), torch.zeros(1, 3, config.image_size, config.image_size),
                        part, dims)
            for kind, path, feeds in (("model", whole, {"pixel_values": pixels}),
                                      ("pos_embed", part, {"x": pixels[:1]})):
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                sessions[f"{kind}: {form}"] = (session, feeds)
                nodes[f"{kind}: {form}"] = len(onnx.load(str(path)).graph.node)
            logits = sessions[f"model: {form}"][0].run(None, {"pixel_values": pixels})[0]
            parity[f"model: {form}"] = compare_logits(reference, logits).rel_max_error

    order = [f"{kind}: {form}" for kind in ("model", "pos_embed") for form in forms]
    runners: dict[str, Callable[[], Any]] = {
        name: (lambda s=sessions[name][0], f=sessions[name][1]: s.run(None, f)) for name in order
    }
    with recording_load() as load:
        p50s = time_rounds(runners, args.rounds, args.iterations, args.warmup)

    medians = {name: float(np.median(values)) for name, values in p50s.items()}
    rows = []
    for name, ms in medians.items():
        kind = name.split(":")[0]
        baseline = medians[f"{kind}: {RESIZE}"]
        rows.append({"graph": name, "nodes": nodes[name], "p50_ms_median": round(ms, 4),
                     "p50_ms_rounds": [round(v, 4) for v in p50s[name]], "vs_resize": round(ms / baseline, 4),
                     "extra_us_vs_resize": round((ms - baseline) * 1000, 1),
                     "rel_max_error_vs_eager": parity.get(name)})
    report = {
        **load.to_dict(),
        "setup": {"model": args.model, "depth": config.depth, "batch": args.batch, "height": size, "width": size, "threads": args.threads,
                  "rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
                  "weights": "random (torch.manual_seed(0))", "graphs": "portable graphs as traced (no CPU variant)",
                  "resize": "bicubic a=-0.75 without antialias (Hugging Face's convention), one Resize node",
                  "statistic": "median over rounds of the per-round p50; rounds interleave the graphs"},
        "results": rows,
    }
    print(study.run_line(args, size, load))
    print(f"{'graph':26s} {'nodes':>6s} {'p50 ms':>9s} {'vs resize':>10s} {'extra us':>9s} {'rel err':>9s}")
    for row in rows:
        print(f"{row['graph']:26s} {row['nodes']:6d} {row['p50_ms_median']:9.3f} {row['vs_resize']:9.3f}x "
              f"{row['extra_us_vs_resize']:9.1f} {study.error_cell(row['rel_max_error_vs_eager'])}")
    return study.finish(args, command, report)


if __name__ == "__main__":
    raise SystemExit(main())
