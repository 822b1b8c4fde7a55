"""``vitdeploy bench compare A.json B.json``: the ratio per point of two runs (or two machines)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitdeploy.benchmarks.schema import SchemaError, validate
from vitdeploy.files import read_json

Key = tuple[str, str, int, int, int]


@dataclass(frozen=True)
class PointRatio:
    """One point present and ok in both runs. ``speedup`` > 1 means B is faster than A."""

    model: str
    runtime: str
    batch: int
    height: int
    width: int
    a_p50_ms: float
    b_p50_ms: float
    a_ips: float
    b_ips: float

    @property
    def latency_ratio(self) -> float:
        """B p50 / A p50 (below 1: B has the lower latency)."""
        return self.b_p50_ms / self.a_p50_ms

    @property
    def speedup(self) -> float:
        """A p50 / B p50."""
        return self.a_p50_ms / self.b_p50_ms

    @property
    def throughput_ratio(self) -> float:
        return self.b_ips / self.a_ips

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "runtime": self.runtime, "batch": self.batch, "height": self.height,
                "width": self.width, "a_p50_ms": self.a_p50_ms, "b_p50_ms": self.b_p50_ms,
                "latency_ratio": self.latency_ratio, "speedup": self.speedup,
                "a_throughput_ips": self.a_ips, "b_throughput_ips": self.b_ips, "throughput_ratio": self.throughput_ratio}


@dataclass
class Comparison:
    """Two results files side by side: the points both measured, and those only one of them has."""

    a_path: str
    b_path: str
    a: dict[str, Any]
    b: dict[str, Any]
    points: list[PointRatio]
    only_a: list[Key]
    only_b: list[Key]


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``results.json``; errors name the file and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist")
    document = read_json(path)
    try:
        validate(document)
    except SchemaError as error:
        raise ValueError(f"{path} is not a vitdeploy benchmark results file: {error}") from None
    return document


def _index(document: dict[str, Any]) -> dict[Key, dict[str, Any]]:
    return {(r["model"], r["runtime"], r["batch"], r["height"], r["width"]): r
            for r in document["records"] if r["status"] == "ok"}


def compare(a_path: str | Path, b_path: str | Path) -> Comparison:
    """Match the ok points of two result files by (model, runtime, batch, height, width)."""
    a, b = load_results(a_path), load_results(b_path)
    ia, ib = _index(a), _index(b)
    points = []
    for key, ra in ia.items():
        rb = ib.get(key)
        if rb is not None:
            points.append(PointRatio(*key, ra["latency_ms"]["p50"], rb["latency_ms"]["p50"],
                                     ra["throughput_ips"], rb["throughput_ips"]))
    return Comparison(str(a_path), str(b_path), a, b, points,
                      [k for k in ia if k not in ib], [k for k in ib if k not in ia])


def _machine(document: dict[str, Any]) -> str:
    env = document["environment"]
    gpu = env.get("gpu")
    text = f"{env['cpu']['model']} x{env['cpu']['threads']} threads"
    if gpu:
        text += f", {gpu['name']}"
    versions = env.get("versions", {})
    return text + ", " + ", ".join(f"{k} {versions.get(k)}" for k in ("torch", "onnxruntime", "tensorrt") if versions.get(k))


def _table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["model", "runtime", "batch", "size", "A p50 ms", "B p50 ms", "B/A latency", "speedup", "B/A img/s"]
    rows = [[p.model, p.runtime, str(p.batch), f"{p.height}x{p.width}", f"{p.a_p50_ms:.3f}", f"{p.b_p50_ms:.3f}",
             f"{p.latency_ratio:.3f}", f"{p.speedup:.2f}x", f"{p.throughput_ratio:.3f}"] for p in comparison.points]
    return header, rows


def render_text(comparison: Comparison) -> str:
    """The comparison as a terminal table, with both machines and the unmatched points."""
    lines = [f"A: {comparison.a_path}  ({_machine(comparison.a)})", f"   {comparison.a['command']}",
             f"B: {comparison.b_path}  ({_machine(comparison.b)})", f"   {comparison.b['command']}", ""]
    header, rows = _table(comparison)
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        lines.append("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
        lines.append("  ".join("-" * w for w in widths))
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if len(rows) > 1:
            import statistics

            geo = statistics.geometric_mean(p.speedup for p in comparison.points)
            lines.append(f"geometric mean speedup of B over A: {geo:.3f}x over {len(rows)} points")
    else:
        lines.append("no point was measured (status ok) in both files")
    for name, keys in (("only in A", comparison.only_a), ("only in B", comparison.only_b)):
        if keys:
            lines.append(f"{name}: " + ", ".join(f"{m} {rt} b{b} {h}x{w}" for m, rt, b, h, w in keys))
    return "\n".join(lines)


def render_markdown(comparison: Comparison) -> str:
    header, rows = _table(comparison)
    lines = ["# vitdeploy benchmark comparison", "",
             f"- A: `{comparison.a_path}` — {_machine(comparison.a)} — `{comparison.a['command']}`",
             f"- B: `{comparison.b_path}` — {_machine(comparison.b)} — `{comparison.b['command']}`", "",
             "speedup = A p50 / B p50 (above 1: B is faster).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    return {"a": comparison.a_path, "b": comparison.b_path, "points": [p.to_dict() for p in comparison.points],
            "only_a": [list(k) for k in comparison.only_a], "only_b": [list(k) for k in comparison.only_b]}
