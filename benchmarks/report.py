"""Render results: the terminal table, CSV, the Markdown report, targets, and writing every file."""

from __future__ import annotations

import csv
import importlib.util
import io
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_write_json, atomic_write_text

CSV_FIELDS = [
    "model", "runtime", "backend", "precision", "compute_precision", "device", "batch", "height", "width", "status", "reason",
    "threads", "timer", "n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "stdev_ms", "min_ms", "max_ms",
    "first_call_ms", "throughput_ips", "speedup_vs_baseline", "gflops_per_s", "peak_gflops", "peak_fraction",
    "peak_rss_mib", "peak_device_mib", "flops_per_image", "artifact", "random_weights", "other_cpu_load",
    "cpu_model", "gpu_name", "torch", "onnxruntime", "tensorrt", "vitdeploy",
]


def _fmt(value: Any, spec: str = ".3f", none: str = "-") -> str:
    if value is None:
        return none
    return format(value, spec)


def _runtime_order(records: list[dict[str, Any]]) -> dict[str, int]:
    order: dict[str, int] = {}
    for record in records:
        order.setdefault(record["runtime"], len(order))
    return order


def sorted_ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ok records ordered by model, size, batch, then the runtime order of the run."""
    order = _runtime_order(records)
    models = list(OrderedDict.fromkeys(r["model"] for r in records))
    ok = [r for r in records if r["status"] == "ok"]
    return sorted(ok, key=lambda r: (models.index(r["model"]), r["height"], r["width"], r["batch"], order[r["runtime"]]))


def not_run(records: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    """``(runtime, status, reason, points)`` for skipped/failed points, one row per distinct reason."""
    groups: OrderedDict[tuple[str, str, str], int] = OrderedDict()
    for record in records:
        if record["status"] != "ok":
            key = (record["runtime"], record["status"], record["reason"] or "")
            groups[key] = groups.get(key, 0) + 1
    return [(runtime, status, reason, count) for (runtime, status, reason), count in groups.items()]


def _rows(document: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "runtime", "batch", "size", "timer", "p50 ms", "p90 ms", "p99 ms", "mean±sd ms", "img/s",
              f"vs {document['baseline']}", "GFLOP/s", "% peak", "RSS MiB", "GPU MiB", "others"]
    rows = []
    for r in sorted_ok(document["records"]):
        lat = r["latency_ms"]
        rows.append([
            r["model"], r["runtime"], str(r["batch"]), f"{r['height']}x{r['width']}", r.get("timer") or "-",
            _fmt(lat["p50"]), _fmt(lat["p90"]), _fmt(lat["p99"]), f"{lat['mean']:.3f}±{lat['stdev']:.3f}",
            _fmt(r["throughput_ips"], ".1f"), _fmt(r["speedup_vs_baseline"], ".2f") + ("x" if r["speedup_vs_baseline"] else ""),
            _fmt(r["gflops_per_s"], ".1f"),
            _fmt(None if r["peak_fraction"] is None else 100 * r["peak_fraction"], ".1f"),
            _fmt(r["peak_rss_mib"], ".0f"), _fmt(r["peak_device_mib"], ".0f"), _fmt(r.get("other_cpu_load"), ".2f"),
        ])
    return header, rows


def terminal_table(document: dict[str, Any]) -> str:
    """A plain-text results table with speedups against the baseline, then what did not run and why."""
    header, rows = _rows(document)
    lines: list[str] = []
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        right = set(range(2, len(header))) - {header.index("timer")}

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

        lines += [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    else:
        lines.append("no point ran successfully")
    for runtime, status, reason, count in not_run(document["records"]):
        lines.append(f"{runtime}: {status} ({count} points): {reason}")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (``|`` in cells escaped)."""

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def records_to_csv(document: dict[str, Any]) -> str:
    """One CSV row per record (flattened latency), with the key environment columns repeated."""
    env = document["environment"]
    versions = env.get("versions", {})
    gpu = env.get("gpu") or {}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in document["records"]:
        lat = r["latency_ms"] or {}
        row = {key: r.get(key) for key in CSV_FIELDS if key in r}
        row.update({
            "n": lat.get("n"), "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
            "mean_ms": lat.get("mean"), "stdev_ms": lat.get("stdev"), "min_ms": lat.get("min"),
            "max_ms": lat.get("max"), "cpu_model": env["cpu"]["model"], "gpu_name": gpu.get("name"),
            "torch": versions.get("torch"), "onnxruntime": versions.get("onnxruntime"),
            "tensorrt": versions.get("tensorrt"), "vitdeploy": versions.get("vitdeploy"),
        })
        writer.writerow(row)
    return buffer.getvalue()


def _find(records: list[dict[str, Any]], model: str, runtime: str, batch: int | None = None,
          size: int | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and r["model"] == model and r["runtime"] == runtime
            and (batch is None or r["batch"] == batch) and (size is None or r["height"] == size)]


def evaluate_targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's benchmark targets, with what this run measured against them (where it measured it).

    ``met`` is ``None`` where the run has no data for a target.
    """
    records = document["records"]
    targets: list[dict[str, Any]] = []

    torch_b1 = _find(records, "vit_small_patch16_224", "torch-eager-fp32", 1, 224)
    ort_b1 = _find(records, "vit_small_patch16_224", "ort-cpu-fp32", 1, 224)
    if torch_b1 and ort_b1 and torch_b1[0]["device"] == "cpu":
        ratio = ort_b1[0]["latency_ms"]["p50"] / torch_b1[0]["latency_ms"]["p50"]
        peak = ort_b1[0]["peak_fraction"]
        note = (f"onnxruntime {ort_b1[0]['latency_ms']['p50']:.3f} ms vs eager {torch_b1[0]['latency_ms']['p50']:.3f} ms (p50)")
        if peak is not None:
            note += f"; onnxruntime reaches {100 * peak:.1f}% of the measured fp32 matmul peak ({ort_b1[0]['peak_gflops']:.0f} GFLOP/s)"
        targets.append({"target": "CPU: onnxruntime fp32 <= 0.8x eager latency, vit_small_patch16_224, batch 1",
                        "measured": f"{ratio:.3f}x", "met": ratio <= 0.8, "note": note})

    trt_b1 = _find(records, "vit_base_patch16_224", "tensorrt-fp16", 1, 224)
    if trt_b1:
        p50 = trt_b1[0]["latency_ms"]["p50"]
        targets.append({"target": "GPU: TensorRT fp16 vit_base_patch16_224 batch 1 <= 0.6 ms",
                        "measured": f"{p50:.3f} ms (p50)", "met": p50 <= 0.6, "note": ""})
    trt_all = _find(records, "vit_base_patch16_224", "tensorrt-fp16", None, 224)
    if trt_all:
        largest = max(trt_all, key=lambda r: r["batch"])
        fraction = largest["peak_fraction"]
        targets.append({"target": "GPU: TensorRT fp16 >= 50% of dense fp16 matmul peak at large batch",
                        "measured": "-" if fraction is None else f"{100 * fraction:.1f}% at batch {largest['batch']}",
                        "met": None if fraction is None else fraction >= 0.5,
                        "note": "" if largest["peak_gflops"] is None else f"peak {largest['peak_gflops']:.0f} GFLOP/s"})
    for entry in document.get("harness_overhead") or []:
        # Negative differences are noise (the harness cannot be faster than no harness): judge magnitudes.
        # With CUDA events the reported latency is device time, which rightly excludes the host's
        # launch-to-GPU delay a wall-clock bare loop includes; there the wall time is the overhead.
        checked = [abs(entry["wall_overhead"]), entry.get("noop_fraction", 0.0)]
        if entry.get("timer", "perf_counter") == "perf_counter":
            checked.append(abs(entry["reported_overhead"]))
        overhead = max(checked)
        targets.append({
            "target": f"harness overhead < 2% at batch {entry['batch']} ({entry['model']}, {entry['runtime']})",
            "measured": (f"reported {100 * entry['reported_overhead']:+.2f}%, wall {100 * entry['wall_overhead']:+.2f}%, "
                         f"no-op {entry['noop_overhead_ns']:.0f} ns/iter"),
            "met": overhead < 0.02,
            "note": f"bare loop {entry['bare_loop_ms']:.3f} ms/iter",
        })
    return targets


def busy_note(document: dict[str, Any], threshold: float = 0.25) -> str | None:
    """A sentence when other processes kept CPUs busy while points were timed (``None`` on a quiet machine)."""
    busy = [r for r in document["records"] if (r.get("other_cpu_load") or 0.0) > threshold]
    if not busy:
        return None
    worst = max(r["other_cpu_load"] for r in busy)
    return (f"other processes were busy while {len(busy)} of {len(document['records'])} points were timed (up to "
            f"{worst:.2f} CPUs); those figures are slower than this machine can do, and ratios between runtimes "
            "timed at different moments are less reliable")


def markdown_report(document: dict[str, Any], plots: list[str] | None = None, title: str | None = None) -> str:
    """The human-readable report: environment, command, per-model tables, speedups, targets, what did not run."""
    env = document["environment"]
    cpu = env["cpu"]
    gpu = env.get("gpu")
    versions = env.get("versions", {})
    suite = document.get("suite")
    lines = [f"# {title or 'vitdeploy benchmark' + (f' — suite {suite}' if suite else '')}", ""]
    lines += ["Command:", "", "```", document["command"], "```", ""]
    load_start, load_end = env.get("load_average_start"), document.get("load_average_end")
    env_rows = [
        ["CPU", f"{cpu['model']} ({cpu['usable_cpus']} usable CPUs, {cpu['threads']} threads pinned)"],
        ["GPU", "none" if not gpu else f"{gpu['name']} (driver {gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')}, "
                                        f"cc {gpu.get('compute_capability')})"],
        ["load average (1/5/15 min) at start / end", f"{load_start} / {load_end}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)],
        ["python / platform", f"{env['python']} / {env['platform']}"],
        ["date (UTC)", env["timestamp"]],
        ["timing", ", ".join(f"{k}={v}" for k, v in document["timing"].items())],
        ["duration", f"{document.get('duration_s', 0):.0f} s"],
    ]
    lines += ["## Environment", "", markdown_table(["", ""], env_rows), ""]

    targets = evaluate_targets(document)
    if targets:
        rows = [[t["target"], t["measured"], {True: "met", False: "**not met**", None: "not measured"}[t["met"]],
                 t["note"]] for t in targets]
        lines += ["## Targets", "", markdown_table(["target", "measured", "", "note"], rows), ""]

    header, rows = _rows(document)
    lines += ["## Results", "",
              f"Latency per call in ms (CPU: whole runtime call; GPU: device-resident input). "
              f"Speedup = {document['baseline']} p50 / p50 at the same model, batch and size. "
              "GFLOP/s from the analytic FLOP count (2 x MACs); % peak against the dense matmul peak below. "
              "'others' = CPUs kept busy by other processes while the point was timed (0 = quiet machine).", ""]
    lines += [markdown_table(header, rows) if rows else "No point ran successfully.", ""]
    busy = busy_note(document)
    if busy:
        lines += [f"**Note:** {busy}.", ""]
    lines += _speedup_matrix(document)

    if document.get("peaks"):
        peak_rows = [[p["device"], p["precision"], f"{p['gflops']:.1f}", p["source"], p.get("method", "")]
                     for p in document["peaks"]]
        lines += ["## Matmul peaks", "",
                  "Each point is divided by the peak of the precision its backend computes in (`compute_precision` "
                  "in results.json): onnxruntime's CPU provider runs fp16 matmuls in fp32, and so does torch on a "
                  "CPU without native fp16 arithmetic; int8 graphs are held against the int8 peak, in GOP/s "
                  "(2 x M x N x K per second) of the fastest int8 GEMM kernel the CPU backends run.", "",
                  markdown_table(["device", "precision", "GFLOP/s (int8: GOP/s)", "source", "method"], peak_rows), ""]
        notes = list(OrderedDict.fromkeys(f"{r['runtime']}: {r['peak_note']}" for r in document["records"]
                                          if r.get("peak_note")))
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if document.get("harness_overhead"):
        rows = [[e["model"], e["runtime"], str(e["batch"]), f"{e['bare_loop_ms']:.4f}", f"{e['harness_reported_ms']:.4f}",
                 f"{100 * e['reported_overhead']:+.2f}%", f"{100 * e['wall_overhead']:+.2f}%", f"{e['noop_overhead_ns']:.0f}"]
                for e in document["harness_overhead"]]
        lines += ["## Harness overhead vs a bare loop", "",
                  "Medians of interleaved rounds; 'reported' compares the latency the harness reports with the bare "
                  "loop's time per call, 'wall' the harness loop's own time per iteration; no-op = harness cost per "
                  "iteration on an empty call.", "",
                  markdown_table(["model", "runtime", "batch", "bare ms", "harness ms", "reported", "wall", "no-op ns"], rows), ""]
    skipped = not_run(document["records"])
    if skipped:
        rows = [[runtime, status, str(count), reason] for runtime, status, reason, count in skipped]
        lines += ["## Not run", "", markdown_table(["runtime", "status", "points", "reason"], rows), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += ["Schema: `benchmarks/schema.json` in the vitdeploy repository (`results.json` has one record per point).", ""]
    return "\n".join(lines)


def _speedup_matrix(document: dict[str, Any]) -> list[str]:
    records = [r for r in document["records"] if r["status"] == "ok" and r["speedup_vs_baseline"] is not None]
    if not records:
        return []
    runtimes = list(_runtime_order(records))
    keys = list(OrderedDict.fromkeys((r["model"], r["height"], r["width"], r["batch"]) for r in sorted_ok(records)))
    table = {(r["model"], r["height"], r["width"], r["batch"], r["runtime"]): r["speedup_vs_baseline"] for r in records}
    rows = [[m, f"{h}x{w}", str(b)] + [_fmt(table.get((m, h, w, b, rt)), ".2f") for rt in runtimes]
            for m, h, w, b in keys]
    return [f"### Speedup vs {document['baseline']} (p50)", "",
            markdown_table(["model", "size", "batch", *runtimes], rows), ""]


def write_outputs(document: dict[str, Any], output_dir: str | Path, plots: bool = True,
                  title: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``report.md`` and the PNG plots into ``output_dir``."""
    if importlib.util.find_spec("jsonschema") is not None:  # the bench extra; the tests always validate
        from vitdeploy.benchmarks.schema import validate

        validate(document)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    atomic_write_json(out / "results.json", document)
    written["json"] = out / "results.json"
    atomic_write_text(out / "results.csv", records_to_csv(document))
    written["csv"] = out / "results.csv"
    plot_names: list[str] = []
    note = None
    if plots and importlib.util.find_spec("matplotlib") is None:
        note = "No plots: matplotlib is not installed (pip install 'vitdeploy[bench]')."
        print(f"[bench] {note}", file=sys.stderr)
    elif plots:
        from vitdeploy.benchmarks.plots import write_plots

        for name, path in write_plots(document, out).items():
            written[name] = path
            plot_names.append(path.name)
    text = markdown_report(document, plot_names, title)
    atomic_write_text(out / "report.md", text + (f"\n{note}\n" if note else ""))
    written["markdown"] = out / "report.md"
    return written
