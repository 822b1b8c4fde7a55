"""Every timm ``VisionTransformer`` (``vit_*``, ``deit*``) and every model of the families vitdeploy reads from
timm's other classes (``eva*``, ``vit_pe_*``, ``*dinov3*``, ``aimv2*``, ``vit_*rope*``), read by vitdeploy's
loader and run against timm.

The question: does a timm file of each architecture load first try and compute what timm computes,
at the native size and at a changed, non-square one (timm's ``dynamic_img_size``)? A
``VisionTransformer`` is saved as a bare file, with what only a name or config can say (heads,
activation) given, so that what is compared is the computation the tensor names imply; a family
model is saved as a timm Hub folder (``config.json`` naming the architecture, ``model_args`` one
block), since a family's architecture is read from its name.
Architectures with the same block, sizes, tokens and pooling are run once (the first name stands
for the rest). Each model: one block, its own init moved away (weights + 0.05 · N(0, 1), LayerScale
gammas in [0.5, 1], the position table × 30 so attention depends on position), saved as
``NAME.safetensors`` and loaded with :func:`vitdeploy.load_model`; the relative max error of every
output vitdeploy gives (``logits``, ``pooler_output``, ``last_hidden_state``) against
:func:`vitdeploy.exporters.source_check.timm_outputs`, with one random input per size.

A model vitdeploy refuses is listed with its one-line reason; "differs" means a relative max error
above 1e-4.

    python studies/timm_vit_sweep.py [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from study import RESULTS, command_line, write_results

DEFAULT_OUTPUT = RESULTS / "timm_vit_sweep.json"
TOLERANCE = 1e-4
ACTIVATIONS = {"GELU:none": "gelu", "GELU:tanh": "gelu_tanh", "GELUTanh:": "gelu_tanh", "QuickGELU:": "quick_gelu"}


def architecture_key(model: Any) -> str:
    """What makes two timm ViTs compute alike (sizes and structure, not the name)."""
    parts = (model.embed_dim, model.patch_embed.patch_size if hasattr(model.patch_embed, "patch_size") else None,
             getattr(model.patch_embed, "img_size", None), model.num_prefix_tokens, model.global_pool,
             type(model.norm).__name__, type(model.fc_norm).__name__, model.no_embed_class,
             getattr(model, "pool_include_prefix", None), type(model.norm_pre).__name__, repr(model.blocks[0]),
             repr(model.attn_pool), repr(model.head), repr(type(model.patch_embed)))
    return repr(parts)


def family_key(model: Any) -> str:
    """What makes two of timm's ``Eva`` models compute alike."""
    return repr((repr(model.blocks[0]), model.num_prefix_tokens, model.global_pool, repr(getattr(model, "rope", None)),
                 repr(getattr(model, "attn_pool", None)), repr(model.patch_embed), type(model.norm).__name__,
                 type(model.fc_norm).__name__))


def perturbed(timm: Any, name: str) -> Any:
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=1, dynamic_img_size=True).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(("gamma", "gamma_1", "gamma_2")):
                parameter.copy_(0.5 + 0.5 * torch.rand(parameter.shape, generator=generator))
            else:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        if getattr(model, "pos_embed", None) is not None:
            model.pos_embed.mul_(30)
    return model


def given_fields(model: Any) -> dict[str, Any]:
    """Heads and activation, which a name or config gives and no tensor shows."""
    block = model.blocks[0]
    fields: dict[str, Any] = {}
    attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)  # other block classes: neither
    if attention is not None:
        fields["num_heads"] = attention.num_heads
    act = getattr(mlp, "act", None)
    key = f"{type(act).__name__}:{getattr(act, 'approximate', '')}"
    if key in ACTIVATIONS:
        fields["act"] = ACTIVATIONS[key]
    return fields


def compare(timm: Any, name: str, folder: Path, hub: bool = False) -> dict[str, Any]:
    import json

    import torch
    from safetensors.torch import save_file

    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.source_check import timm_outputs
    from vitdeploy.outputs import available_outputs

    try:
        reference = perturbed(timm, name)
    except Exception as error:  # noqa: BLE001 - an architecture timm cannot build at one block is not compared
        return {"status": "not built", "reason": f"timm cannot build it with one block: {str(error)[:200]}"}
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if hub:
        path = folder / name
        path.mkdir()
        save_file(tensors, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"architecture": name, "model_args": {"depth": 1},
                                                      "num_classes": reference.num_classes}))
    else:
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path))
    try:
        ours = load_model(path, **({} if hub else given_fields(reference))).eval()
    except Exception as error:  # noqa: BLE001 - a refusal is a result: its one line is recorded
        return {"status": "refused", "reason": str(error).splitlines()[0][:300]}
    native, stride = ours.config.image_size, ours.config.stride
    sizes = [(native, native), (native + 2 * stride, max(stride, native - 2 * stride))]
    names = [n for n in ("logits", "pooler_output", "last_hidden_state")
             if n in available_outputs(ours.config) and not (n == "logits" and reference.num_classes == 0)]
    errors: dict[str, float] = {}
    for height, width in sizes:
        pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(2))
        expected = timm_outputs(reference, pixels, names)
        with torch.no_grad():
            got = ours.forward_outputs(pixels, names)
        for output in names:
            scale = float(expected[output].abs().max()) or 1.0
            errors[f"{output} {height}x{width}"] = float((got[output] - expected[output]).abs().max()) / scale
    worst = max(errors.values())
    return {"status": "differs" if worst > TOLERANCE else "equal", "worst": worst, "errors": errors,
            "read_as": ours.config.provenance.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON results (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    command = command_line("timm_vit_sweep", argv)
    import torch

    from vitdeploy.timm_import import import_timm

    timm = import_timm()
    if timm is None:
        print("timm_vit_sweep: timm is not installed (pip install --no-deps timm)", file=sys.stderr)
        return 2
    warnings.simplefilter("ignore")
    results: dict[str, Any] = {}
    stands_for: dict[str, str] = {}
    first_of: dict[str, str] = {}
    names = sorted(set(timm.list_models("vit_*") + timm.list_models("deit*") + timm.list_models("eva*")
                       + timm.list_models("aimv2*") + timm.list_models("*dinov3*")))
    with tempfile.TemporaryDirectory() as scratch:
        for index, name in enumerate(names, 1):
            try:
                with torch.device("meta"):
                    meta = timm.create_model(name, pretrained=False)
            except Exception:  # noqa: BLE001 - a name timm cannot build on the meta device is not a candidate
                continue
            hub = type(meta).__name__ == "Eva"  # timm's class of EVA-02, PE, DINOv3, AIMv2 and its RoPE ViTs
            if type(meta).__name__ != "VisionTransformer" and not hub:
                continue
            key = family_key(meta) if hub else architecture_key(meta)
            if key in first_of:
                stands_for[name] = first_of[key]
                continue
            first_of[key] = name
            results[name] = compare(timm, name, Path(scratch), hub=hub)
            print(f"[{index}/{len(names)}] {name}: {results[name]['status']}", file=sys.stderr, flush=True)
    counts = {status: sum(r["status"] == status for r in results.values())
              for status in ("equal", "differs", "refused", "not built")}
    print(f"{len(results)} architectures ({len(stands_for)} more names alike): " +
          ", ".join(f"{n} {s}" for s, n in counts.items()), file=sys.stderr)
    write_results(args.output, command, {
        "question": "does every timm VisionTransformer, and every model of timm's Eva class, load first try and "
                    "equal timm at the native and a non-square size?", "timm_version": timm.__version__,
        "weights": "random: timm's init, one block, moved by 0.05 * N(0, 1), LayerScale gammas in [0.5, 1], the "
                   "position table x 30; no trained weights",
        "reference": "timm's own model of the same weights (exporters.source_check.timm_outputs), eager fp32; "
                     "relative max error of each output (tokens included) to its largest value",
        "tolerance": TOLERANCE,
        "counts": counts, "results": results, "stands_for": stands_for})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
