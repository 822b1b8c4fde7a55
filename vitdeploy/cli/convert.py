"""``vitdeploy convert``: any supported checkpoint → vitdeploy's native format."""

from __future__ import annotations

import argparse
from pathlib import Path

from vitdeploy.cli.common import (
    CLIError,
    add_model_override,
    add_pos_embed_resample,
    output_file,
    output_folder,
    progress,
)

FORMAT_CHOICES = ("auto", "native", "timm", "huggingface", "jax", "dinov2", "dinov3", "openclip")  # = vitdeploy.checkpoints.FORMATS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a timm / Hugging Face / OpenCLIP / JAX checkpoint to vitdeploy's native format",
        description=(
            "Load a checkpoint in any supported format (detected automatically: a timm state dict "
            ".pth/.pt/.bin/.safetensors or timm Hub folder, a Hugging Face transformers folder (ViT, DeiT, "
            "DINOv2, CLIP or SigLIP image tower, ViT-MSN, ViT-MAE, I-JEPA, DINOv3, SigLIP 2, AIMv2), an OpenCLIP "
            "folder or weight file, an original DINOv2 or DINOv3 .pth, an original JAX .npz, or a native "
            "vitdeploy checkpoint) and write it in vitdeploy's native format: "
            "a folder with model.safetensors + config.json, or one .safetensors file when OUT ends in "
            ".safetensors. A registry variant name gives random weights (for pipeline tests)."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint file or folder (or a variant name)")
    parser.add_argument("-o", "--output", metavar="OUT", required=True, type=checkpoint_output,
                        help="output folder, or a file path ending in .safetensors")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                        help="format of SOURCE (default: detect)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="replace the head with a zero-initialised N-class head (0: no head)")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="resample the position embeddings to N x N inputs for good")
    parser.add_argument("--num-heads", type=int, metavar="N",
                        help="attention heads, for timm checkpoints of non-registry widths (not stored in them)")
    add_pos_embed_resample(parser)
    add_model_override(parser)
    parser.set_defaults(func=run)


def checkpoint_output(text: str) -> str:
    """argparse type: a ``.safetensors`` file or a folder that can be written."""
    if Path(text).suffix == ".safetensors":
        return output_file(text)
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a folder or a path ending in .safetensors")
    return output_folder(text)


def run(args: argparse.Namespace) -> int:
    from vitdeploy.checkpoints import resolve_source, save_model

    overrides = {}
    for name in ("num_classes", "image_size", "num_heads"):
        value = getattr(args, name, None)
        if value is not None:
            if value < 0 or (value == 0 and name != "num_classes"):
                flag = "--" + name.replace("_", "-")
                raise CLIError(f"{flag} {value} must be {'>= 0' if name == 'num_classes' else 'positive'}")
            overrides[name] = value
    if args.pos_embed_resample is not None:  # also how --image-size resamples
        overrides["pos_embed_resample"] = args.pos_embed_resample
    output = Path(args.output)

    warned: list[str] = []

    def log(line: str) -> None:
        warned.append(line)
        progress(line)

    resolved = resolve_source(args.source, format=args.format, log=log, model=args.model_variant, **overrides)
    for message in resolved.notes:  # notes loading logged without warning about them
        if f"warning: {message}" not in warned:
            progress(message)

    model = resolved.model
    config = model.config
    kind = "hybrid ViT" if config.hybrid else "ViT"
    print(f"loaded {resolved.format} checkpoint {resolved.source}: {config.provenance.name} ({kind}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters, {config.image_size}px, patch {config.patch_size}, "
          f"{config.num_classes} classes, {config.pos_embed_resample} position-embedding resampling)")
    written = save_model(model, output)
    layout = "single file" if written.suffix == ".safetensors" else "folder: model.safetensors + config.json"
    print(f"wrote native checkpoint {written} ({layout})")
    return 0
