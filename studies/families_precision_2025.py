"""fp16 and int8 graphs of the 2025-26 families against eager timm fp32, on real photos, at three sizes.

For DINOv3-S, EVA-02-S, PE-core-S, SigLIP 2 B and AIMv2 (large: its smallest size) this builds timm's
own model (``pretrained=False``: random weights, perturbed the way the parity tests perturb them, scaled
to the real width: q/k projections large enough that attention is far from uniform (attention logits of
std ~4), smooth position
tables, LayerScale gammas of trained size), saves it as a timm Hub folder naming the architecture, loads
that folder with vitdeploy (it must load as exactly that family), and writes the fp32, fp16 and int8
graphs with the artifact-set builder (:func:`~vitdeploy.exporters.artifact_set.build_artifact_set`:
dynamic batch x height x width, each graph validated as ``deploy`` validates it; int8 quantized from the
fp32 file under the one int8 policy). An int8 graph its gate refuses is recorded as a refusal with the
numbers that refused it.

Each graph is then run by onnxruntime on the bundled photos at the native size, a larger square size and a
non-square one, and compared with timm's eager fp32 model (``dynamic_img_size=True``) output by output
with :func:`~vitdeploy.parity.compare_outputs`: token outputs per token, vectors per row. fp16 passes when
its worst token / row cosine is >= 0.999; int8 when it is within the ``int8_vs_fp32`` gate. Every graph
also goes through ``vitdeploy check --target tensorrt`` for TensorRT 10.3 (JetPack 6) and 10.14 (the gpu
extra's pin), whose errors and warnings are recorded.

Random weights: no trained checkpoint of these families can be downloaded here. Figures from the CPU
named in the JSON's environment.

    python studies/families_precision_2025.py [--families dinov3,eva02,...] [--calibration-size 64]
    python studies/families_precision_2025.py --merge A.json B.json   # runs of some families each, as one report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from study import RESULTS, command_line, write_results

DEFAULT_OUTPUT = RESULTS / "families_precision_2025.json"
TRT_VERSIONS = ("10.3", "10.14")
FP16_MIN_COSINE = 0.999  # the fp16 bar: worst token (token outputs) / worst row (vectors)
# q/k weights of std sqrt(ATTENTION_LOGIT_STD / width): attention logits of about that std before the softmax,
# far from uniform (the top few keys of a query take most of its weight) yet, unlike the parity tests' tiny
# models (std ~10), not so peaked that 12-24 layers amplify fp32 rounding past the fp32 gate.
ATTENTION_LOGIT_STD = 4.0
NUDGE = 0.4  # other weights: + NUDGE / sqrt(fan_in) * noise (the tests' 0.05 at fan-in 64)


@dataclass(frozen=True)
class FamilyCase:
    """One family at its smallest real size: timm's name, its native size and patch."""

    id: str
    family: str
    timm_name: str
    image: int
    patch: int
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The native size, two patches larger on each side, and a non-square size (two fewer rows, two more columns)."""
        side = self.image // self.patch
        return [(self.image, self.image), ((side + 2) * self.patch, (side + 2) * self.patch),
                ((side - 2) * self.patch, (side + 2) * self.patch)]


CASES: dict[str, FamilyCase] = {case.id: case for case in (
    FamilyCase("dinov3", "dinov3", "vit_small_patch16_dinov3", 256, 16),
    FamilyCase("eva02", "eva02", "eva02_small_patch14_224", 224, 14),
    FamilyCase("pe_core", "pe", "vit_pe_core_small_patch16_384", 384, 16),
    FamilyCase("siglip2", "siglip", "vit_base_patch16_siglip_224", 224, 16),  # timm's .v2_webli weights
    FamilyCase("aimv2", "aimv2", "aimv2_large_patch14_224", 224, 14),  # AIMv2 has no smaller size
)}


def smooth_table(prefix: int, rows: int, cols: int, dim: int, generator: Any) -> Any:
    """A position table like trained ones: unit-scale prefix rows, then a 2-D sin-cos grid (MoCo v3's)."""
    import torch

    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    grid = torch.cat([f(c[..., None] * omega) for c in (y, x) for f in (torch.sin, torch.cos)], dim=-1)
    grid = torch.nn.functional.pad(grid, (0, dim - grid.shape[-1])).reshape(1, rows * cols, dim).float()
    return torch.cat([torch.randn(1, prefix, dim, generator=generator), grid], dim=1)


def perturbed_timm_model(case: FamilyCase, seed: int = 0) -> Any:
    """timm's ``case`` model (random init, ``dynamic_img_size=True``) with every weight moved far from its init."""
    import torch

    from vitdeploy.benchmarks.timm_import import import_timm

    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(case.timm_name, pretrained=False, dynamic_img_size=True, img_size=case.image,
                              **case.model_args).eval()
    width = model.embed_dim
    generator = torch.Generator().manual_seed(seed + 1)
    side = case.image // case.patch
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif name.endswith(("cls_token", "reg_token", "latent")):
                param.copy_(noise)
            elif any(part in name for part in ("attn.qkv.weight", "q_proj.weight", "k_proj.weight")):
                param.copy_(math.sqrt(ATTENTION_LOGIT_STD / width) * noise)
            elif name == "pos_embed":
                prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
                param.copy_(smooth_table(prefix, side, side, param.shape[-1], generator))
            elif param.ndim >= 2:
                param.add_(NUDGE / math.sqrt(param[0].numel()) * noise)
            else:
                param.add_(0.05 * noise)
        if case.family == "pe" and getattr(model, "head", None) is not None and hasattr(model.head, "bias"):
            model.head.bias.zero_()  # PE's projection: timm's zero-bias head
    return model


def save_hub_folder(model: Any, case: FamilyCase, folder: Path) -> Path:
    """``model`` as a timm Hub folder whose ``config.json`` names its architecture."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = model.pretrained_cfg
    config = {"architecture": case.timm_name, "model_args": {"img_size": case.image, **case.model_args},
              "pretrained_cfg": {"mean": list(cfg["mean"]), "std": list(cfg["std"]),
                                 "crop_pct": float(cfg.get("crop_pct", 1.0)), "interpolation": "bicubic"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def trt_check(path: Path, version: str) -> dict[str, Any]:
    """What ``vitdeploy check PATH --target tensorrt --trt-version VERSION`` reports (its own function, in
    this process): whether it passes (exit status 0), and its errors and warnings."""
    from vitdeploy.exporters.trt_support import check_onnx

    report = check_onnx(path, target="tensorrt", tensorrt_version=version, version_source="--trt-version").to_dict()
    return {"exit_status": 0 if report["ok"] else 1, "ok": report["ok"],
            "errors": _grouped(report["findings"], "error"), "warnings": _grouped(report["findings"], "warning")}


def _grouped(findings: list[dict[str, Any]], severity: str) -> list[dict[str, Any]]:
    """Findings of one severity, one entry per kind and op type: how many nodes, and one message."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for item in findings:
        if item["severity"] == severity:
            group = groups.setdefault((item["kind"], item["op_type"]), {
                "kind": item["kind"], "op_type": item["op_type"], "nodes": 0, "example": item["message"]})
            group["nodes"] += 1
    return list(groups.values())


def _metrics(reference: np.ndarray, candidate: np.ndarray, output: str, precision: str) -> dict[str, Any]:
    from vitdeploy.parity import (
        TOKENS_KIND,
        compare_outputs,
        output_kind,
        tolerance_for,
        tolerance_for_output,
    )

    kind = output_kind(output)
    tolerance = tolerance_for_output(tolerance_for(precision, against_fp32=True), output)
    metrics = compare_outputs(reference, candidate, kind, token_floor=tolerance.token_floor)
    worst = metrics.token_cosine_min if kind == TOKENS_KIND else metrics.cosine
    failures = tolerance.check(metrics)
    if precision == "fp16" and not worst >= FP16_MIN_COSINE:
        failures.append(f"worst {'token' if kind == TOKENS_KIND else 'row'} cosine {worst:.6f} is below "
                        f"{FP16_MIN_COSINE}")
    return {"kind": kind, "worst_cosine": worst, "cosine": metrics.cosine, "rel_max_error": metrics.rel_max_error,
            "token_cosine_p1": metrics.token_cosine_p1, "token_share_below": metrics.token_share_below,
            "gate": tolerance.describe(kind), "failures": failures, "passed": not failures}


def measure_family(case: FamilyCase, folder: Path, *, calibration_size: int = 64, photos: int = 4,
                   trt_versions: Sequence[str] = TRT_VERSIONS, progress: Any = None) -> dict[str, Any]:
    """Build, load, export and measure one family (see the module docstring); its JSON-ready record."""
    import torch

    from vitdeploy import runtimes
    from vitdeploy.checkpoints import load_model
    from vitdeploy.exporters.artifact_set import ArtifactSetPlan, build_artifact
    from vitdeploy.exporters.onnx_export import ExportValidationError
    from vitdeploy.exporters.quantize import QuantizationTargetError
    from vitdeploy.exporters.source_check import timm_outputs
    from vitdeploy.outputs import available_outputs
    from vitdeploy.parity import InputFactory

    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    source = perturbed_timm_model(case)
    model = load_model(save_hub_folder(source, case, folder / f"{case.id}_hub"))
    config = model.config
    loaded_as = config.provenance.family
    outputs = available_outputs(config)
    heights, widths = zip(*case.sizes, strict=True)
    plan = ArtifactSetPlan(name=case.id, graphs=("fp32", "fp16", "int8"), batch=(1, photos),
                           height=(min(heights), max(heights)), width=(min(widths), max(widths)),
                           validation_max_batch=1, quantize_from_fp32=True, calibration_size=calibration_size,
                           outputs=outputs, source=case.timm_name)
    pre = config.preprocessing.at(config.image_size)
    inputs = InputFactory(pre, synthetic=False)
    batches = {size: inputs.batch(photos, *size)[0] for size in case.sizes}
    with torch.no_grad():
        references = {size: {name: value.numpy() for name, value in
                             timm_outputs(source, torch.from_numpy(x), outputs).items()}
                      for size, x in batches.items()}
    record: dict[str, Any] = {"timm_name": case.timm_name, "family": case.family, "loaded_as": loaded_as,
                              "parameters_millions": round(sum(p.numel() for p in source.parameters()) / 1e6, 1),
                              "sizes": [list(size) for size in case.sizes], "photos": photos,
                              "outputs": list(outputs), "artifact_set": plan.record(), "graphs": {}}
    out = folder / "graphs"
    out.mkdir(exist_ok=True)
    for graph in plan.graphs:
        say(f"{case.id}: {graph} graph")
        entry: dict[str, Any] = {}
        if graph == "int8" and record["graphs"].get("fp32", {}).get("refused"):
            record["graphs"][graph] = {"refused": True, "refusal": "not made: the fp32 graph it is quantized from "
                                       "was refused"}
            continue
        try:
            result = build_artifact(model, plan, graph, out, progress=None)
        except ExportValidationError as error:  # its gate refused the graph: a result, with the numbers
            entry.update(refused=True, refusal=str(error), report=error.report.to_dict())
            say(f"{case.id}: {graph} graph refused by its gate")
            record["graphs"][graph] = entry
            continue
        except QuantizationTargetError as error:
            entry.update(refused=True, refusal=str(error), search=error.record)
            say(f"{case.id}: {graph} graph refused by its gate")
            record["graphs"][graph] = entry
            continue
        except ValueError as error:  # a failure of the tool itself, not a gate: recorded as such, the run goes on
            entry.update(refused=True, crashed=True, refusal=f"crashed: {type(error).__name__}: {error}")
            say(f"{case.id}: {graph} graph crashed: {error}")
            record["graphs"][graph] = entry
            continue
        entry["refused"] = False
        entry["validation_passed"] = bool(result.report.passed) if result.report is not None else None
        per_output: dict[str, dict[str, Any]] = {name: {} for name in outputs}
        with runtimes.load(result.path) as runtime:
            dtype = np.dtype(getattr(getattr(runtime, "input_spec", None), "dtype", None) or np.float32)
            for size, x in batches.items():
                got = runtime.run_outputs(x.astype(dtype))
                for name in outputs:
                    per_output[name]["x".join(map(str, size))] = _metrics(
                        references[size][name], np.asarray(got[name], dtype=np.float32), name, graph)
        entry["outputs"] = per_output
        entry["worst_cosine"] = {name: min(m["worst_cosine"] for m in sizes.values())
                                 for name, sizes in per_output.items()}
        entry["passed"] = all(m["passed"] for sizes in per_output.values() for m in sizes.values())
        entry["tensorrt_check"] = {version: trt_check(Path(result.path), version) for version in trt_versions}
        record["graphs"][graph] = entry
    return record


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per family x size x graph: the worst token and row cosines, pass/fail, check findings."""
    rows = []
    for case_id, record in results.items():
        for graph, entry in record["graphs"].items():
            checks = entry.get("tensorrt_check", {})
            findings = {v: f"{len(c['errors'])} errors, {len(c['warnings'])} warnings" for v, c in checks.items()}
            if entry["refused"]:
                rows.append({"family": case_id, "size": "all", "graph": graph, "token": None, "row": None,
                             "passed": False, "note": (entry["refusal"] if entry.get("crashed") else "refused by its gate: "
                                                 + entry["refusal"]).splitlines()[0][:160], **findings})
                continue
            for size in record["sizes"]:
                key = "x".join(map(str, size))
                metrics = [entry["outputs"][name][key] for name in record["outputs"]]
                tokens = [m["worst_cosine"] for m in metrics if m["kind"] == "tokens"]
                vectors = [m["worst_cosine"] for m in metrics if m["kind"] != "tokens"]
                rows.append({"family": case_id, "size": key, "graph": graph, "token": min(tokens) if tokens else None,
                             "row": min(vectors) if vectors else None, "passed": all(m["passed"] for m in metrics),
                             **findings})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    lines = ["family   size     graph  worst token  worst row  pass  TRT 10.3 / 10.14 check"]
    for row in rows:
        checks = " / ".join(row.get(v, "-") for v in TRT_VERSIONS)
        lines.append(f"{row['family']:<8} {row['size']:<8} {row['graph']:<6} {cell(row['token']):>11}  "
                     f"{cell(row['row']):>9}  {'yes' if row['passed'] else 'NO':<4}  {checks}"
                     + (f"  ({row['note']})" if row.get("note") else ""))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/families_precision_2025.py",
        description="fp32/fp16/int8 graphs of DINOv3-S, EVA-02-S, PE-core-S, SigLIP 2 B and AIMv2-L (random, "
        "perturbed weights) against eager timm fp32 on the bundled photos at three sizes, and TensorRT checks.")
    parser.add_argument("--families", default=",".join(CASES), metavar="ID,...",
                        help=f"which families (default all: {', '.join(CASES)})")
    parser.add_argument("--calibration-size", type=int, default=64, help="int8 calibration images (default 64)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="REPORT",
                        help="measure nothing: write these reports of this study (runs of some families each, e.g. "
                        "run side by side) as one report to --output, each run's command and machine kept")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON report (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    args.families = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = [name for name in args.families if name not in CASES]
    if unknown or not args.families:
        parser.error(f"--families {unknown or args.families!r}: expected some of {', '.join(CASES)}")
    if args.calibration_size < 1:
        parser.error(f"--calibration-size must be >= 1, got {args.calibration_size}")
    return args


def report(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The JSON document's body: what was measured and how, the summary rows, every family's record."""
    return {
        "weights": "random (timm pretrained=False), perturbed: attention logits of std ~"
                   f"{ATTENTION_LOGIT_STD:g} (far from uniform), smooth position tables, LayerScale 0.5-1; "
                   "no trained checkpoint of these families can be downloaded here",
        "reference": "timm's eager fp32 model (dynamic_img_size=True) of the same weights",
        "inputs": "the bundled photos (vitdeploy/data), resized and centre-cropped to each size",
        "gates": {"fp16": f"worst token / row cosine >= {FP16_MIN_COSINE} and the fp16_vs_fp32 gate",
                  "int8": "the int8_vs_fp32 gate (per token for token outputs)"},
        "calibration_size": args.calibration_size, "families_requested": args.families,
        "summary": summary_rows(results), "families": results}


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """Reports of this study (each some families) as one report body; each run's command and environment in ``runs``."""
    documents = [json.loads(Path(path).read_text()) for path in paths]
    families = {case_id: record for document in documents for case_id, record in document["families"].items()}
    body = {key: value for key, value in documents[0].items() if key not in ("command", "environment")}
    # A report that is itself a merge brings its own runs and calibration sizes (a later report's families win).
    runs = [run for document in documents for run in document.get("runs") or [
        {"families": list(document["families"]), "command": document["command"],
         "environment": document["environment"]}]]
    sizes = {size for document in documents for size in (document["calibration_size"]
                                                          if isinstance(document["calibration_size"], list)
                                                          else [document["calibration_size"]])}
    body.update(families=families, summary=summary_rows(families), families_requested=list(families),
                calibration_size=sorted(sizes), runs=runs)
    return body


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = parse_args(argv)
    if args.merge:
        body = merge(args.merge)
        print(format_table(body["summary"]))
        write_results(args.output, command_line("families_precision_2025", argv), body)
        return 0
    warnings.filterwarnings("ignore")
    results: dict[str, Any] = {}
    command = command_line("families_precision_2025", argv)
    with tempfile.TemporaryDirectory(prefix="families_precision_") as tmp:
        for case_id in args.families:
            folder = Path(tmp) / case_id
            folder.mkdir()
            results[case_id] = measure_family(CASES[case_id], folder, calibration_size=args.calibration_size)
            print(format_table(summary_rows({case_id: results[case_id]})), flush=True)
            write_results(args.output, command, report(results, args))  # after every family: a partial run counts
    print(format_table(summary_rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
