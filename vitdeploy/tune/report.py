"""What ``vitdeploy tune`` shows: the candidates table (terminal and Markdown) and latency vs accuracy.

Every candidate is a row, run or not: timed ones with their p50 latency per batch and its spread
across the interleaved rounds (p25-p75), images/s, their throughput-mode images/s, their accuracy
and whether their speed was unstable here; dropped and unavailable ones with the reason. An artifact
with several outputs (or a non-logits one) also gets a table per candidate and output: the figures of the
output's kind (per token for token outputs), the thresholds and the verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitdeploy.tune_manifest import TuneManifest


def output_figures_text(entry: dict[str, Any]) -> str:
    """One output's figures in a short phrase: per row for logits and vectors, per token for token outputs."""
    if entry["kind"] == "tokens":
        return (f"worst token cos {entry['token_cosine_min']:.4f}, p1 {entry['token_cosine_p1']:.4f}, "
                f"{100 * entry['token_share_below']:.2f} % < {entry['token_floor']:g} ({entry['num_tokens']} tokens)")
    text = f"worst cos {entry['cosine']:.5f}"
    return text + (f", top-1 agr {entry['top1_agreement']:.3f}" if entry.get("top1_agreement") is not None else "")


def output_verdict(name: str, entry: dict[str, Any]) -> str:
    """``pass``, or why output ``name`` is outside the gate (its failures, without repeating the output's name)."""
    if "failures" not in entry:
        return "-"
    label = f"{name} ({entry['kind']}): "
    return "; ".join(f.removeprefix(label) for f in entry["failures"]) if entry["failures"] else "pass"


def _accuracy_text(accuracy: dict[str, Any] | None) -> str:
    """The primary output's figure as before, then every other output's (by kind)."""
    if not accuracy:
        return "-"
    if accuracy["kind"] == "labelled":
        text = f"top-1 {100 * accuracy['top1']:.2f}% (drop {accuracy['top1_drop_points']:+.2f} pt)"
    else:
        text = f"cos {accuracy['cosine']:.5f}" + (f", top-1 agr {accuracy['top1_agreement']:.2f}"
                                                 if accuracy.get("top1_agreement") is not None else "")
    others = {name: entry for name, entry in (accuracy.get("outputs") or {}).items() if name != accuracy.get("primary")}
    return "; ".join([text, *(f"{name}: {output_figures_text(entry)}" for name, entry in others.items())])


def worst_similarity(accuracy: dict[str, Any]) -> float:
    """The lowest similarity the gate judges: over the outputs, the worst row cosine (logits, vectors)
    or the worst token's cosine (token outputs); the primary cosine for figures without ``outputs``."""
    entries = (accuracy.get("outputs") or {}).values()
    values = [e["token_cosine_min"] if e["kind"] == "tokens" else e["cosine"] for e in entries]
    return min(values) if values else accuracy["cosine"]


def _latency_text(median: float | None, spread: dict[str, float] | None) -> str:
    if median is None:
        return "-"
    return f"{median:.3f}" + (f" [{spread['p25']:.3f}-{spread['p75']:.3f}]" if spread else "")


def _speed_text(candidate: Any) -> str:
    """``UNSTABLE (b1)`` where the candidate's speed was flagged, ``steady`` where it was timed."""
    if candidate.unstable:
        return f"UNSTABLE ({', '.join(k if k == 'throughput' else 'b' + k for k in candidate.unstable)})"
    return "steady" if candidate.latency_ms else "-"


def _rows(manifest: TuneManifest) -> tuple[list[str], list[list[str]]]:
    batches = [str(b) for b in manifest.batches]
    header = ["candidate", "status", *[f"b{b} p50 ms [p25-p75]" for b in batches],
              *[f"b{b} img/s" for b in batches], "throughput img/s", "accuracy", "speed", "reason / notes"]
    chosen = manifest.chosen.name if manifest.chosen else None
    rows = []
    for c in manifest.candidates:
        status = "CHOSEN" if c.name == chosen else c.status
        latency = [_latency_text(c.latency_ms.get(b), c.latency_spread.get(b)) for b in batches]
        ips = [f"{c.images_per_s[b]:.1f}" if b in c.images_per_s else "-" for b in batches]
        throughput = f"{c.throughput['images_per_s']:.1f} (b{c.throughput['batch']})" if c.throughput else "-"
        reason = c.reason or "; ".join(c.notes) or ""
        rows.append([c.name, status, *latency, *ips, throughput, _accuracy_text(c.accuracy), _speed_text(c), reason])
    if manifest.peer is not None:
        peer = manifest.peer
        latency = [_latency_text(peer.get("latency_ms", {}).get(b), peer.get("latency_spread", {}).get(b))
                   for b in batches]
        ips = [f"{int(b) * 1000 / peer['latency_ms'][b]:.1f}" if b in peer.get("latency_ms", {}) else "-"
               for b in batches]
        rows.append([peer["name"], "peer" if peer.get("latency_ms") else "unavailable", *latency, *ips, "-",
                     _accuracy_text(peer.get("accuracy")), "-", peer.get("reason") or peer["description"]])
    return header, rows


def terminal_table(manifest: TuneManifest) -> str:
    """The candidates as a plain-text table, then the choice and the peer ratio."""
    header, rows = _rows(manifest)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:-1], widths, strict=True)) + "  " + header[-1]]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
              for row in rows]
    lines.append(_verdict(manifest))
    return "\n".join(lines)


def _verdict(manifest: TuneManifest) -> str:
    text = (f"chosen: {manifest.chosen.name} ({manifest.chosen.artifact} on {manifest.chosen.backend}"
            f"{', ' + str(manifest.chosen.options) if manifest.chosen.options else ''}): {manifest.chosen.why}"
            if manifest.chosen else f"no candidate passed the accuracy gate ({manifest.gate['rule']})")
    ratios = (manifest.peer or {}).get("chosen_vs_peer")
    if ratios:
        text += "; vs the peer: " + ", ".join(f"batch {b} {r:.3f}x" for b, r in ratios.items())
    return text


def render_markdown(manifest: TuneManifest, load: str = "", plot: str | None = None) -> str:
    """``tune.md``: the setup, the table, the choice, the dropped candidates with their reasons."""
    cpu = manifest.cpu
    lines = ["# vitdeploy tune", "", "Command:", "", "```", manifest.command or "(library call)", "```", "",
             f"CPU: {cpu['model']}, {cpu['usable_cpus']} usable CPUs, {cpu['threads']} threads; arithmetic flags: "
             f"{', '.join(cpu['flags']) or 'none'}. Accuracy: {manifest.gate['accuracy_on']} against "
             f"{manifest.reference}; gate: {manifest.gate['rule']}. Timing: candidates interleaved in "
             f"{manifest.rounds} rounds (order reversed every round), median of the per-round p50 and, in "
             "brackets, the 25th-75th percentile of the rounds" + (f"; {load}" if load else "") + "."
             + (f" Stability: {manifest.stability['rule']}." if manifest.stability else ""), ""]
    lines += section_lines(manifest)
    if plot:
        lines += ["", f"![latency vs accuracy]({plot})"]
    return "\n".join(lines) + "\n"


def section_lines(manifest: TuneManifest) -> list[str]:
    """The Markdown table, the choice and every candidate not chosen with its reason (deploy's report too)."""
    header, rows = _rows(manifest)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    lines += ["", f"**{_verdict(manifest)}**", ""]
    unstable = [c for c in manifest.candidates if c.unstable]
    if unstable:
        lines += ["Unstable speed on this machine (the median alone would record whichever moment it caught):", ""]
        lines += [f"- `{c.name}` {'in throughput mode' if which == 'throughput' else f'at batch {which}'}: {why}"
                  for c in unstable for which, why in c.unstable.items()]
        lines += [""]
    decision = (manifest.stability or {}).get("decision")
    if decision:
        lines += [f"Stability decision: {decision['why']}.", ""]
    lines += output_lines(manifest)
    left = [c for c in manifest.candidates if c.status != "ok"]
    if left:
        lines += ["Not chosen, and why:", ""]
        lines += [f"- `{c.name}` ({c.status}): {c.reason}" for c in left]
    return lines


def output_lines(manifest: TuneManifest) -> list[str]:
    """Per candidate and output, the figures of the output's kind, the thresholds and the verdict (only for
    artifacts with more than one output or a primary output other than logits; empty otherwise)."""
    measured = [(c.name, c.accuracy) for c in manifest.candidates if c.accuracy and c.accuracy.get("outputs")]
    if manifest.peer is not None and (manifest.peer.get("accuracy") or {}).get("outputs"):
        measured.append((manifest.peer["name"], manifest.peer["accuracy"]))
    if not any(len(a["outputs"]) > 1 or a.get("primary") != "logits" for _, a in measured):
        return []
    lines = ["Accuracy per output (each judged by its kind: logits by row cosine and top-1 agreement, vectors by "
             "row cosine, token outputs per token):", "",
             "| candidate | output | kind | figures | gate | result |", "|---|---|---|---|---|---|"]
    for name, accuracy in measured:
        for output, entry in accuracy["outputs"].items():
            gate = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in (entry.get("gate") or {}).items())
            result = output_verdict(output, entry)
            lines.append(f"| {name} | {output} | {entry['kind']} | {output_figures_text(entry)} | {gate or '-'} | "
                         f"{result.replace('|', '/')} |")
    return [*lines, ""]


# 1 - cosine of a candidate that matches eager fp32 to float rounding (fp32 graphs) is 0, or a few 1e-8, which a
# log axis cannot show as it is: such points are drawn at this floor, and their legend entry says so.
COSINE_FLOOR = 1e-7


def latency_vs_accuracy(manifest: TuneManifest, path: Path) -> Path | None:
    """A scatter of each timed candidate: p50 at the smallest batch (log) against its accuracy figure
    (labelled top-1 drop, or 1 - worst cosine, log); the gate as a line; the choice ringed; a legend names
    every point (beside the axes, so no label covers another or leaves the figure)."""
    from vitdeploy.benchmarks.plots import _finish, _labelled_log_axis, _pyplot

    batch = str(min(manifest.batches))
    timed = [c for c in manifest.candidates if c.latency_ms.get(batch) and c.accuracy]
    if not timed:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.6), layout="constrained")
    labelled = timed[0].accuracy["kind"] == "labelled"

    def error(accuracy: dict[str, Any]) -> float:
        return accuracy["top1_drop_points"] if labelled else max(1.0 - worst_similarity(accuracy), COSINE_FLOOR)

    for c in timed:
        floored = not labelled and 1.0 - worst_similarity(c.accuracy) < COSINE_FLOOR
        label = c.name + (" (dropped)" if c.status != "ok" else "") + (
            f" (1 - cosine < {COSINE_FLOOR:g}: drawn at {COSINE_FLOOR:g})" if floored else "")
        ax.scatter(c.latency_ms[batch], error(c.accuracy), marker="x" if c.status != "ok" else "v" if floored else "o",
                   s=40, label=label)
    if manifest.chosen:
        chosen = next(c for c in timed if c.name == manifest.chosen.name)
        ax.scatter(chosen.latency_ms[batch], error(chosen.accuracy), s=220, facecolors="none", edgecolors="green",
                   linewidths=1.5, label=f"chosen: {chosen.name}")
    gate = manifest.gate["max_drop_points"] if labelled else 1.0 - manifest.gate["min_cosine"]
    ax.axhline(gate, color="red", linestyle="--", linewidth=1, label="accuracy gate")
    ax.set_xscale("log")
    if not labelled:
        ax.set_yscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
    ax.set_ylabel("top-1 drop (points)" if labelled else "1 - worst cosine (rows; tokens: worst token) vs reference")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    ax.autoscale_view()
    _labelled_log_axis(ax.xaxis)
    return _finish(fig, [ax], 1, f"vitdeploy tune: latency vs accuracy ({manifest.cpu['model']})", path)
