"""A progress display for TensorRT engine builds, fed by ``trt.IProgressMonitor`` callbacks (pure Python).

TensorRT reports nested *phases*, each with a number of *steps* (``phase_start(name, parent,
num_steps)``, ``step_complete(name, step)``, ``phase_finish(name)``; see the
``IProgressMonitor`` Python API and NVIDIA's ``samples/python/simple_progress_monitor``). The
callbacks come from TensorRT's own threads, so :class:`BuildProgress` locks around its state.
The adapter that subclasses ``trt.IProgressMonitor`` lives in
:mod:`vitdeploy.exporters.tensorrt_build`; this class only keeps state and draws it.

On a terminal one status line is redrawn in place (at most every ``min_interval`` seconds);
elsewhere (CI logs) only the start and end of top-level phases are printed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


def render_bar(steps: int, total: int, width: int = 20) -> str:
    """``[=====---------------]`` for ``steps`` of ``total``; clamps out-of-range values."""
    done = 0 if total <= 0 else int(width * min(max(steps, 0), total) / total)
    return "[" + "=" * done + "-" * (width - done) + "]"


@dataclass
class Phase:
    name: str
    parent: str | None
    steps: int
    done: int
    depth: int
    started: float


class BuildProgress:
    """State of TensorRT's builder phases, drawn to ``stream``."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.min_interval = min_interval
        self.clock = clock
        self.phases: dict[str, Phase] = {}
        self._lock = threading.Lock()
        self._last_draw = float("-inf")
        self._line_open = False

    def phase_start(self, name: str, parent: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self.phases[parent].depth + 1 if parent in self.phases else 0
            self.phases[name] = Phase(name, parent, int(num_steps), 0, depth, self.clock())
            if self.interactive:
                self._draw(force=True)
            elif depth == 0:
                self._print(f"[tensorrt] {name} ({num_steps} steps) ...")

    def step_complete(self, name: str, step: int) -> None:
        with self._lock:
            phase = self.phases.get(name)
            if phase is not None:
                phase.done = int(step) + 1  # steps are numbered from 0
            if self.interactive:
                self._draw()

    def phase_finish(self, name: str) -> None:
        with self._lock:
            phase = self.phases.pop(name, None)
            if phase is None:
                return
            if self.interactive:
                self._draw(force=True)
                if phase.depth == 0 and not self.phases:
                    self._end_line()
            elif phase.depth == 0:
                self._print(f"[tensorrt] {name} done in {self.clock() - phase.started:.1f}s")

    def status(self) -> str:
        """The current one-line summary: bar of the innermost phase, then the chain of phase names."""
        if not self.phases:
            return ""
        chain = []
        phase: Phase | None = max(self.phases.values(), key=lambda p: (p.depth, p.started))
        innermost = phase
        while phase is not None:
            chain.append(f"{phase.name} {phase.done}/{phase.steps}")
            phase = self.phases.get(phase.parent) if phase.parent else None
        assert innermost is not None
        return f"{render_bar(innermost.done, innermost.steps)} " + " < ".join(chain)

    def close(self) -> None:
        """End the status line (call once the build returned, also on failure or cancellation)."""
        with self._lock:
            self.phases.clear()
            self._end_line()

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + self.status()[:200])
        self.stream.flush()
        self._line_open = True

    def _end_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
