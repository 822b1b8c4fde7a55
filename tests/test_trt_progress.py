"""The build progress display fed by IProgressMonitor callbacks (pure Python)."""

from __future__ import annotations

import io
import threading

from vitdeploy.exporters.trt_progress import BuildProgress, render_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_render_bar() -> None:
    assert render_bar(0, 4, width=8) == "[--------]"
    assert render_bar(2, 4, width=8) == "[====----]"
    assert render_bar(9, 4, width=8) == "[========]"
    assert render_bar(1, 0, width=4) == "[----]"


def test_status_shows_the_innermost_phase_and_its_parents() -> None:
    progress = BuildProgress(io.StringIO(), interactive=True)
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("Tactic selection", "Building engine", 10)
    progress.step_complete("Tactic selection", 4)  # steps count from 0: 5 done
    assert progress.status() == "[==========----------] Tactic selection 5/10 < Building engine 0/3"
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 0)
    assert progress.status().endswith("Building engine 1/3")


def test_terminal_output_redraws_one_line_and_throttles() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = BuildProgress(stream, interactive=True, min_interval=0.5, clock=clock)
    progress.phase_start("Building engine", None, 100)
    for step in range(50):
        progress.step_complete("Building engine", step)  # all within the same instant: throttled
    clock.now = 1.0
    progress.step_complete("Building engine", 50)
    progress.phase_finish("Building engine")
    text = stream.getvalue()
    assert text.count("\r\x1b[2K") == 3  # start, one throttled redraw, finish
    assert "Building engine 51/100" in text and text.endswith("\n")


def test_log_output_prints_top_level_phases_only() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = BuildProgress(stream, interactive=False, clock=clock)
    progress.phase_start("Building engine", None, 2)
    progress.phase_start("Tactic selection", "Building engine", 4)
    progress.step_complete("Tactic selection", 3)
    progress.phase_finish("Tactic selection")
    clock.now = 2.5
    progress.phase_finish("Building engine")
    progress.phase_finish("unknown phase")  # ignored
    assert stream.getvalue().splitlines() == [
        "[tensorrt] Building engine (2 steps) ...", "[tensorrt] Building engine done in 2.5s"]


def test_callbacks_from_several_threads() -> None:
    progress = BuildProgress(io.StringIO(), interactive=True, min_interval=0.0)
    progress.phase_start("root", None, 1)

    def phase(index: int) -> None:
        name = f"phase {index}"
        progress.phase_start(name, "root", 100)
        for step in range(100):
            progress.step_complete(name, step)
        progress.phase_finish(name)

    threads = [threading.Thread(target=phase, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert list(progress.phases) == ["root"]
    progress.close()
    assert progress.phases == {}
