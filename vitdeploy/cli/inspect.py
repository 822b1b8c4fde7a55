"""`vitdeploy inspect`: a variant's or checkpoint's architecture, size and cost per resolution."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitdeploy.cli.common import CLIError, parse_int_list, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's configuration, parameter count, token counts and GFLOPs",
        description="Show a variant's (or a checkpoint's) configuration, exact parameter count beside "
        "the paper's Table 1 size, and the patch grid, sequence length and GFLOPs per image at "
        "the given resolutions. Variant names need no weights: the model is built without memory.",
    )
    parser.add_argument("source", nargs="?",
                        help="variant name (e.g. vit_base_patch16_224) or checkpoint file/folder")
    parser.add_argument("--resolution", default=None,
                        help="comma-separated square sizes to report (default: native, and 1.5x native)")
    parser.add_argument("--list", action="store_true", help="list every variant name and exit")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.set_defaults(func=run)


def describe(source: str, resolutions: list[int] | None = None) -> dict[str, Any]:
    """The inspect report for ``source`` as a JSON-serialisable dict."""
    from vitdeploy.flops import count_flops
    from vitdeploy.variants import VARIANTS, paper_size

    if source in VARIANTS:
        import torch

        from vitdeploy.model import VisionTransformer

        config = VARIANTS[source]
        with torch.device("meta"):  # exact structure, no memory, no initialisation cost
            model = VisionTransformer(config)
        origin = "variant (no weights)"
    elif Path(source).exists():
        from vitdeploy.checkpoints import resolve_source

        resolved = resolve_source(source)
        model, config = resolved.model, resolved.model.config
        origin = f"{resolved.format} checkpoint"
    else:
        raise CLIError(f"{source!r} is neither a known variant nor an existing checkpoint path; "
                       "run `vitdeploy inspect --list` for the variant names")
    params = sum(p.numel() for p in model.parameters())
    native = config.image_size
    if resolutions is None:
        larger = native * 3 // 2 // config.stride * config.stride
        resolutions = [native, larger]
    sizes = []
    for size in resolutions:
        if size % config.stride:
            raise CLIError(f"resolution {size} is not a multiple of the patch stride {config.stride}")
        grid = size // config.stride
        sizes.append({
            "resolution": size,
            "grid": [grid, grid],
            "sequence_length": config.seq_len(size),
            "gflops": count_flops(config, size) / 1e9,
        })
    paper = paper_size(config)
    return {
        "source": source,
        "origin": origin,
        "name": config.name,
        "parameters": params,
        "paper": {"model": paper[0], "parameters_millions": paper[1]} if paper else None,
        "config": config.to_dict() | {"labels": None},
        "sizes": sizes,
    }


def _print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    paper = report["paper"]
    paper_text = f"  (paper Table 1: {paper['model']} {paper['parameters_millions']}M)" if paper else ""
    kind = "hybrid ResNet-v2 + ViT" if cfg["hybrid"] else "ViT"
    print(f"{report['name']}  [{report['origin']}]")
    print(f"  architecture : {kind}, hidden {cfg['hidden_size']}, depth {cfg['depth']}, heads {cfg['num_heads']}, "
          f"MLP {cfg['mlp_size']}, patch {cfg['patch_size']}, pooling {cfg['pooling']}")
    if cfg["hybrid"]:
        print(f"  backbone     : ResNet-v2 stages {tuple(cfg['hybrid']['layers'])}")
    print(f"  parameters   : {report['parameters']:,} ({report['parameters'] / 1e6:.1f}M){paper_text}")
    print(f"  classes      : {cfg['num_classes']}, native size {cfg['image_size']}")
    print(f"  {'resolution':>10} {'grid':>8} {'seq len':>8} {'GFLOPs':>9}")
    for size in report["sizes"]:
        grid = "x".join(str(v) for v in size["grid"])
        print(f"  {size['resolution']:>10} {grid:>8} {size['sequence_length']:>8} {size['gflops']:>9.2f}")


def run(args: argparse.Namespace) -> int:
    if args.list:
        from vitdeploy.variants import list_variants

        print("\n".join(list_variants()))
        return 0
    if not args.source:
        raise CLIError("give a variant name or a checkpoint path (or --list for the variant names)")
    resolutions = parse_int_list(args.resolution, "resolution") if args.resolution else None
    report = describe(args.source, resolutions)
    _print_report(report)
    if args.json:
        write_json(args.json, report)
    return 0
