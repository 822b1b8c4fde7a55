"""`vitdeploy inspect`: a variant's or checkpoint's architecture, size and cost per resolution."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    output_file,
    parse_sizes,
    refuse_model_override,
    sizes_arg,
    write_json,
)

ENGINE_SUFFIXES = (".engine", ".plan")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's or artifact's configuration, parameter count, token counts and GFLOPs",
        description="Show a variant's (or a checkpoint's) configuration, exact parameter count beside "
        "the paper's Table 1 size, and the patch grid, sequence length and GFLOPs per image at "
        "the given resolutions. For an exported .onnx file or a TensorRT engine, also its precision, "
        "validated range, tensors and graph variants (from its metadata or manifest); for an engine, its "
        "layers (from <engine>.layers.json, the engine inspector's list written by `vitdeploy build`) and "
        "whether attention was fused. Variant names and artifacts need no torch.",
    )
    parser.add_argument("source", nargs="?",
                        help="variant name (e.g. vit_base_patch16_224), checkpoint file/folder, .onnx or .engine")
    parser.add_argument("--resolution", default=None, type=sizes_arg, metavar="R,R",
                        help="sizes to report: 224 for square or 224x336 for height x width, comma-separated "
                        "(default: native, and 1.5x native)")
    parser.add_argument("--list", action="store_true", help="list every variant name and exit")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--layers", action="store_true",
                        help="for an engine: list every layer (name, type, tactic) from its layer list")
    add_model_override(parser)
    parser.set_defaults(func=run)


def describe(source: str, resolutions: list[tuple[int, int]] | None = None,
             model: str | None = None) -> dict[str, Any]:
    """The inspect report for ``source`` (variant, checkpoint, ``.onnx`` or engine) as a JSON-serialisable dict.

    Variants, ONNX artifacts and engines need no torch: counts come from the config
    (:func:`~vitdeploy.flops.count_params`); checkpoints are loaded (torch), with the architecture of
    the variant ``model`` if given (see :func:`~vitdeploy.checkpoints.resolve_source`).
    """
    from vitdeploy.flops import count_flops, count_params
    from vitdeploy.variants import VARIANTS, paper_size

    artifact: dict[str, Any] | None = None
    preprocessing = None  # an artifact's own (what runtimes apply), else the config's at its native size
    path = Path(source)
    if source in VARIANTS and not path.exists():
        refuse_model_override(model, source, "a variant name already")
        config = VARIANTS[source]
        origin = "variant (no weights)"
    elif path.is_file() and path.suffix.lower() in (".onnx", *ENGINE_SUFFIXES):
        refuse_model_override(model, source, "an artifact, whose metadata records its architecture")
        config, origin, artifact, preprocessing = _artifact(path)
    elif path.exists():
        from vitdeploy.checkpoints import resolve_source

        resolved = resolve_source(source, model=model)
        config = resolved.model.config
        origin = f"{resolved.format} checkpoint"
    else:
        from vitdeploy.variants import closest_hint

        raise CLIError(f"{source!r} is neither a known variant nor an existing checkpoint or artifact path; "
                       + closest_hint(source, "`vitdeploy inspect --list` lists the variants"))
    params = count_params(config)
    native = config.image_size
    if resolutions is None:
        larger = native * 3 // 2 // config.stride * config.stride
        resolutions = [(native, native), (larger, larger)]
    sizes = []
    for height, width in resolutions:
        label = str(height) if height == width else f"{height}x{width}"
        if height % config.stride or width % config.stride:
            raise CLIError(f"resolution {label} is not a multiple of the patch stride {config.stride}")
        sizes.append({
            "resolution": label,
            "height": height,
            "width": width,
            "grid": [height // config.stride, width // config.stride],
            "sequence_length": config.seq_len(height, width),
            "gflops": count_flops(config, height, width) / 1e9,
        })
    paper = paper_size(config)
    if preprocessing is None:
        preprocessing = config.preprocessing.at(native)
    return {
        "source": source,
        "origin": origin,
        "name": config.provenance.name,
        "parameters": params,
        "paper": {"model": paper[0], "parameters_millions": paper[1]} if paper else None,
        "config": config.replace(labels=None).to_dict(),
        "preprocessing": asdict(preprocessing),
        "sizes": sizes,
        "artifact": artifact,
    }


def _artifact(path: Path) -> tuple[Any, str, dict[str, Any], Any]:
    """Config, origin, the artifact section of the report and the preprocessing recorded, for an ONNX
    file or an engine."""
    from vitdeploy.config import ViTConfig

    if path.suffix.lower() == ".onnx":
        from vitdeploy.metadata import read_onnx_metadata

        try:
            metadata = read_onnx_metadata(path)
        except ValueError as error:
            raise CLIError(str(error)) from None
        origin = "ONNX artifact"
        extra: dict[str, Any] = {"target": metadata.target, "variants": metadata.variants,
                                 "transforms": metadata.transforms, "opset": metadata.opset}
    else:
        from vitdeploy.engine_manifest import EngineManifest, manifest_path_for

        manifest = EngineManifest.read(manifest_path_for(path))
        metadata = manifest.artifact_metadata()
        if metadata is None:
            raise CLIError(f"the manifest of {path} records no model config")
        origin = "TensorRT engine"
        extra = {"tensorrt_version": manifest.tensorrt_version, "gpu": manifest.gpu.name,
                 "compute_capability": manifest.gpu.compute_capability,
                 "profiles": [profile.describe() for profile in manifest.profiles],
                 "engine_precision": manifest.precision, "transforms": manifest.transforms,
                 **_engine_layers(path, manifest)}
    rng, validated = metadata.shape_range, metadata.validated_range
    section = {
        "precision": metadata.precision, "fp32_ops": metadata.fp32_ops,
        "inputs": [vars(t) for t in metadata.inputs], "outputs": [vars(t) for t in metadata.outputs],
        "shape_range": {"batch": list(rng.batch), "height": list(rng.height), "width": list(rng.width)},
        "validated_range": None if validated is None else {"batch": list(validated.batch),
                                                           "height": list(validated.height),
                                                           "width": list(validated.width)},
        "random_weights": metadata.random_weights,
        "optimizations": metadata.optimizations,
        "validation": (metadata.validation or {}).get("passed"),
        **extra,
    }
    return ViTConfig.from_dict(metadata.model_config), origin, section, metadata.preprocessing


def _engine_layers(path: Path, manifest: Any) -> dict[str, Any]:
    """The engine's layer list (from ``<engine>.layers.json``) and what it says about attention fusion."""
    from vitdeploy.engine_manifest import attention_fusion, layers_path_for, parse_layer_information

    layers_file = path.with_name(manifest.layers_file) if manifest.layers_file else layers_path_for(path)
    if not layers_file.is_file():
        return {"layers": None, "attention": manifest.attention,
                "layers_note": f"no layer list ({layers_file.name} not found; rebuild with `vitdeploy build`)"}
    try:
        layers = parse_layer_information(layers_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CLIError(f"{layers_file}: {error}") from None
    depth = (manifest.metadata or {}).get("model_config", {}).get("depth")
    attention = attention_fusion(layers, int(depth) if depth else None).to_dict()
    rows = [{"name": layer.get("Name"), "type": layer.get("LayerType"), "tactic": layer.get("TacticName")}
            for layer in layers]
    return {"layers": rows, "attention": attention, "layers_note": None}


def _print_layers(artifact: dict[str, Any], every_layer: bool) -> None:
    attention = artifact.get("attention")
    if attention is not None:
        print(f"  attention    : fused? {attention['summary']}")
        for line in attention.get("evidence", [])[:3]:
            print(f"                 {line}")
    layers = artifact.get("layers")
    if layers is None:
        print(f"  layers       : {artifact.get('layers_note')}")
        return
    kinds: dict[str, int] = {}
    for layer in layers:
        kinds[layer["type"] or "?"] = kinds.get(layer["type"] or "?", 0) + 1
    print(f"  layers       : {len(layers)} (" + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + ")"
          + ("" if every_layer else "; --layers lists them"))
    if every_layer:
        for index, layer in enumerate(layers):
            print(f"    {index:>4} {layer['type'] or '?':<14} {layer['name']}"
                  + (f"  [{layer['tactic']}]" if layer["tactic"] else ""))


def _print_report(report: dict[str, Any], every_layer: bool = False) -> None:
    from vitdeploy.metadata import Preprocessing, ShapeRange

    cfg = report["config"]
    paper = report["paper"]
    paper_text = f"  (paper Table 1: {paper['model']} {paper['parameters_millions']}M)" if paper else ""
    kind = "hybrid ResNet-v2 + ViT" if cfg["hybrid"] else "ViT"
    print(f"{report['name']}  [{report['origin']}]")
    print(f"  architecture : {kind}, hidden {cfg['hidden_size']}, depth {cfg['depth']}, heads {cfg['num_heads']}, "
          f"MLP {cfg['mlp_size']}, patch {cfg['patch_size']}, pooling {cfg['pooling']}")
    if cfg["hybrid"]:
        layers = tuple(cfg["hybrid"]["layers"])
        print(f"  backbone     : ResNet-v2 {f'stages {layers}' if layers else 'stem only (no stage)'}")
    from vitdeploy.config import ViTConfig

    parts = ViTConfig.from_dict(cfg)
    mlp = "SwiGLU" if parts.mlp_type == "swiglu" else parts.act
    print(f"  positions    : {parts.position_scheme}; MLP {mlp}, norm {parts.norm}")
    print(f"  parameters   : {report['parameters']:,} ({report['parameters'] / 1e6:.1f}M){paper_text}")
    print(f"  classes      : {cfg['num_classes']}, native size {cfg['image_size']}")
    print(f"  preprocess   : {Preprocessing(**report['preprocessing']).describe()}")
    artifact = report.get("artifact")
    if artifact:
        declared = ShapeRange(**artifact["shape_range"])
        validated = ShapeRange(**artifact["validated_range"]) if artifact.get("validated_range") else None
        print(f"  precision    : {artifact['precision']}"
              + (f" (fp32 ops: {', '.join(artifact['fp32_ops'])})" if artifact["fp32_ops"] else ""))
        parity = {True: "passed", False: "FAILED", None: "not checked"}[artifact["validation"]]
        print(f"  validated    : {validated.describe() + '; parity ' + parity if validated else 'not checked'}")
        print(f"  declared     : {declared.describe()} (what the graph accepts)")
        if artifact.get("random_weights"):
            print("  weights      : RANDOM (exported from a variant name): the classes mean nothing")
        io = ", ".join(f"{t['name']} {t['dtype']}" for t in artifact["inputs"] + artifact["outputs"])
        print(f"  tensors      : {io}")
        print("  outputs      : " + ", ".join(f"{t['name']} [{', '.join(str(d) for d in t['shape'])}]"
                                             for t in artifact["outputs"]))
        if artifact.get("target"):
            variants = ", ".join(f"{k}: {v['file']}" for k, v in artifact["variants"].items()) or "none"
            print(f"  graph        : {artifact['target']}, opset {artifact['opset']}; validated variants: {variants}")
        if artifact.get("profiles"):
            print(f"  engine       : TensorRT {artifact['tensorrt_version']} on {artifact['gpu']} "
                  f"(sm {artifact['compute_capability']}), {artifact['engine_precision']}; "
                  f"profiles: {'; '.join(artifact['profiles'])}")
            if artifact.get("transforms"):
                print("  rewrites     : " + ", ".join(t["name"] for t in artifact["transforms"]))
            _print_layers(artifact, every_layer)
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
    resolutions = parse_sizes(args.resolution) if args.resolution else None
    report = describe(args.source, resolutions, model=args.model_variant)
    _print_report(report, every_layer=args.layers)
    if args.json:
        write_json(args.json, report)
    return 0
