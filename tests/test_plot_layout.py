"""The plots read well, drawn from the committed results: enough labelled ticks on each log axis, no tick
label overlapping another, every text inside the figure, and a point drawn at a floor says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from vitdeploy.benchmarks import plots  # noqa: E402
from vitdeploy.tune.report import COSINE_FLOOR, latency_vs_accuracy  # noqa: E402
from vitdeploy.tune_manifest import read_manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
TUNED = ["vit_small_patch16_224", "vit_base_patch16_224"]


def tick_labels(axis) -> list:
    """The tick labels drawn on ``axis``: visible, non-empty, at a tick inside the view."""
    low, high = sorted(axis.get_view_interval())
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    return [t.label1 for t in ticks if t.label1.get_visible() and t.label1.get_text() and low <= t.get_loc() <= high]


def layout_problems(fig) -> list[str]:
    """What makes ``fig`` hard to read: a text outside it, tick labels that overlap."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    frame = fig.bbox
    axes = [a for a in fig.axes if a.get_visible()]
    drawn_ticks = {id(label) for ax in axes for axis in (ax.xaxis, ax.yaxis) for label in tick_labels(axis)}
    every_tick = {id(t.label1) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                  for t in axis.get_major_ticks() + axis.get_minor_ticks()}
    for text in fig.findobj(Text):
        if not (text.get_visible() and text.get_text()) or (text.axes is not None and not text.axes.get_visible()):
            continue
        if id(text) in every_tick and id(text) not in drawn_ticks:
            continue  # a tick outside the view: matplotlib does not draw it
        box = text.get_window_extent(renderer)
        if box.x0 < frame.x0 - 1 or box.y0 < frame.y0 - 1 or box.x1 > frame.x1 + 1 or box.y1 > frame.y1 + 1:
            problems.append(f"{text.get_text()!r} leaves the figure")
    for ax in axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in tick_labels(axis)]
            for i, (text_a, a) in enumerate(boxes):
                for text_b, b in boxes[i + 1:]:
                    if a.overlaps(b):
                        problems.append(f"{ax.get_title()!r} {name} tick labels {text_a!r} and {text_b!r} overlap")
    return problems


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions finish, kept open for inspection (they are still written and closed)."""
    figures = []
    finish = plots._finish

    def keep(fig, axes, used, title, path):
        figures.append(fig)
        fig.suptitle(title, fontsize=11)
        problems = layout_problems(fig)  # measured before the real _finish closes the figure
        fig.vitdeploy_problems = problems
        fig.vitdeploy_ticks = {(ax.get_title(), name): [t.get_text() for t in tick_labels(axis)]
                               for ax in fig.axes if ax.get_visible()
                               for name, axis in (("x", ax.xaxis), ("y", ax.yaxis))}
        fig.vitdeploy_legend = [t.get_text() for legend in fig.legends + [a.get_legend() for a in fig.axes]
                                if legend is not None for t in legend.get_texts()]
        return finish(fig, axes, used, title, path)

    monkeypatch.setattr(plots, "_finish", keep)
    return figures


def test_latency_vs_batch_labels_its_log_axis_without_overlap(drawn, tmp_path):
    document = json.loads((RESULTS / "cpu" / "results.json").read_text())
    assert plots.latency_vs_batch(document, tmp_path / "latency_vs_batch.png").is_file()
    (fig,) = drawn
    assert fig.vitdeploy_problems == []
    panels = {title: labels for (title, name), labels in fig.vitdeploy_ticks.items() if name == "y"}
    assert len(panels) == 3
    for title, labels in panels.items():
        assert len(labels) >= 3, (title, labels)
        assert all(float(label) > 0 for label in labels)  # plain numbers, readable as milliseconds


@pytest.mark.parametrize("model", TUNED)
def test_tune_plot_has_a_readable_latency_axis_and_explains_its_floor(drawn, tmp_path, model):
    manifest = read_manifest(RESULTS / "tune" / model)
    assert latency_vs_accuracy(manifest, tmp_path / "tune.png").is_file()
    (fig,) = drawn
    assert fig.vitdeploy_problems == []
    x_labels = next(labels for (_, name), labels in fig.vitdeploy_ticks.items() if name == "x")
    assert len(x_labels) >= 3, x_labels
    # Every candidate is named in the legend; those at the floor say they are drawn there.
    legend = fig.vitdeploy_legend
    batch = str(min(manifest.batches))
    for candidate in (c for c in manifest.candidates if c.latency_ms.get(batch) and c.accuracy):
        (entry,) = [text for text in legend if text.split(" ")[0] == candidate.name]
        floored = 1.0 - candidate.accuracy["cosine"] < COSINE_FLOOR
        assert (f"drawn at {COSINE_FLOOR:g}" in entry) == floored, entry
    assert any(f"drawn at {COSINE_FLOOR:g}" in text for text in legend)  # the fp32 graphs are exact here


def test_log_ticks_give_three_round_values_whatever_the_span():
    assert plots.log_ticks(30, 2100) == [50, 100, 200, 500, 1000, 2000]
    assert plots.log_ticks(1e-7, 0.1) == pytest.approx([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    assert plots.log_ticks(45, 130) == [50, 60, 70, 80, 90, 100]
    assert plots.log_ticks(46, 66) == [50, 55, 60, 65]
