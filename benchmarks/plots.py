"""PNG plots with matplotlib (Agg): latency vs batch per runtime, throughput vs resolution per runtime."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int) -> tuple[int, int]:
    cols = min(count, 3)
    return math.ceil(count / cols), cols


def log_ticks(low: float, high: float) -> list[float]:
    """Round ticks for a log axis from ``low`` to ``high``: powers of ten, else 1-2-5, else every digit, the
    first of these that gives at least three (a span too short for any: a few evenly spaced round values)."""
    from matplotlib.ticker import MaxNLocator

    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in subs if low <= m * 10.0**e <= high]
        if len(ticks) >= 3:
            return ticks
    return [float(v) for v in MaxNLocator(4).tick_values(low, high) if low <= v <= high and v > 0]


def _labelled_log_axis(axis: Any) -> None:
    """Label a log axis at :func:`log_ticks` of its view (plain numbers), with unlabelled minor ticks: every
    label reads as a number, and no two crowd each other."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    low, high = sorted(axis.get_view_interval())
    axis.set_major_locator(FixedLocator(log_ticks(low, high)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _plain_ticks(ax: Any, xticks: list[int] | None = None) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    if xticks:
        ax.set_xticks(sorted(set(xticks)))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
    _labelled_log_axis(ax.yaxis)


def _log_panel(ax: Any, xticks: list[int], xlabel: str, ylabel: str, title: str) -> None:
    """A line panel's finish: log y axis, plain tick labels at ``xticks``, labels, grid and legend."""
    ax.set_yscale("log")
    _plain_ticks(ax, xticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _panels(count: int) -> tuple[Any, list[Any]]:
    """A figure with ``count`` panels laid out in rows of at most three; returns (figure, flat axes)."""
    plt = _pyplot()
    rows, cols = _grid(count)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    return fig, list(axes.flat)


def _finish(fig: Any, axes: list[Any], used: int, title: str, path: Path) -> Path:
    """Hide the unused panels, title the figure and write it atomically as PNG; always closes it."""
    import matplotlib.pyplot as plt

    for ax in axes[used:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        return path
    finally:
        plt.close(fig)


def _ok_records(document: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records that ran, and their runtimes in first-seen order (one line or bar each)."""
    ok = [r for r in document["records"] if r["status"] == "ok"]
    return ok, list(OrderedDict.fromkeys(r["runtime"] for r in ok))


def _size_panels(records: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """The distinct (model, height, width) of ``records`` in first-seen order: one panel each."""
    return list(OrderedDict.fromkeys((r["model"], r["height"], r["width"]) for r in records))


def latency_vs_batch(document: dict[str, Any], path: Path) -> Path | None:
    """One panel per (model, size): p50 latency (ms, log) against batch size, a line per runtime."""
    ok, runtimes = _ok_records(document)
    panels = _size_panels(ok)
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (model, height, width) in zip(axes, panels, strict=False):
        batches_here: list[int] = []
        for runtime in runtimes:
            points = sorted((r["batch"], r["latency_ms"]["p50"], r["latency_ms"]["p90"]) for r in ok
                            if r["runtime"] == runtime and (r["model"], r["height"], r["width"]) == (model, height, width))
            if points:
                batches, p50, p90 = zip(*points, strict=True)
                batches_here += batches
                line, = ax.plot(batches, p50, marker="o", label=runtime)
                ax.fill_between(batches, p50, p90, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        _log_panel(ax, batches_here, "batch size", "latency p50 ms (band to p90)", f"{model} {height}x{width}")
    return _finish(fig, axes, len(panels), "Latency vs batch size", path)


def throughput_vs_resolution(document: dict[str, Any], path: Path) -> Path | None:
    """One panel per model: images/s against input height at the largest batch run, a line per runtime.

    Written only when the run measured more than one resolution.
    """
    ok, runtimes = _ok_records(document)
    models = list(OrderedDict.fromkeys(r["model"] for r in ok))
    if not models or len({(r["height"], r["width"]) for r in ok}) < 2:
        return None
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=False):
        batch = max(r["batch"] for r in ok if r["model"] == model)
        sizes_here: list[int] = []
        for runtime in runtimes:
            points = sorted((r["height"], r["throughput_ips"]) for r in ok
                            if r["model"] == model and r["runtime"] == runtime and r["batch"] == batch)
            if points:
                sizes, ips = zip(*points, strict=True)
                sizes_here += sizes
                ax.plot(sizes, ips, marker="o", label=runtime)
        _log_panel(ax, sizes_here, "resolution (height)", "images / s", f"{model}, batch {batch}")
    return _finish(fig, axes, len(models), "Throughput vs resolution", path)


def throughput_by_batch(document: dict[str, Any], path: Path) -> Path | None:
    """One panel per (model, size): images/s as grouped bars, a group per batch size, a bar per runtime."""
    ok, runtimes = _ok_records(document)
    panels = _size_panels(ok)
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    width = 0.8 / max(len(runtimes), 1)
    for ax, (model, height, size_w) in zip(axes, panels, strict=False):
        here = [r for r in ok if (r["model"], r["height"], r["width"]) == (model, height, size_w)]
        batches = sorted({r["batch"] for r in here})
        for index, runtime in enumerate(runtimes):
            values = {r["batch"]: r["throughput_ips"] for r in here if r["runtime"] == runtime}
            xs = [i + (index - (len(runtimes) - 1) / 2) * width for i in range(len(batches))]
            ax.bar(xs, [values.get(b, 0.0) for b in batches], width=width, label=runtime)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(f"{model} {height}x{size_w}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)
    return _finish(fig, axes, len(panels), "Throughput per runtime", path)


PLOTS = (("latency_vs_batch", latency_vs_batch), ("throughput_vs_resolution", throughput_vs_resolution),
         ("throughput_by_batch", throughput_by_batch))


def write_plots(document: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write the plots that have data into ``output_dir``; returns ``{name: path}``.

    ``throughput_vs_resolution`` needs at least two resolutions in the run.
    """
    out = Path(output_dir)
    written: dict[str, Path] = {}
    for name, function in PLOTS:
        path = function(document, out / f"{name}.png")
        if path is not None:
            written[name] = path
    return written
