"""Progress lines on stderr, shared by the library's long steps and the CLI (stdout stays for results).

Every line goes through :func:`progress`. On a terminal, a stage that stays silent for longer
than :attr:`ConsoleSettings.delay_s` gets a sign of life: an elapsed-time line with a spinner
under its last message (``  | 12s  trace ...``), rewritten in place every
:attr:`ConsoleSettings.interval_s` and erased when the next line comes or the command ends. It is
off when stderr is not a terminal (logs, pipes, CI stay plain lines) and with ``--quiet``, which
also drops the progress lines themselves but keeps warnings (lines starting ``warning:``).

Off a terminal, during a command (:func:`session`), a stage silent for
:attr:`ConsoleSettings.heartbeat_s` gets a plain line instead, ``[vitdeploy]   still running
(30s): trace ...``, and another every ``heartbeat_s`` while it lasts: a CI log or ``| tee`` shows
that work goes on, at one line per half minute at most.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

SPINNER = "|/-\\"
HEARTBEAT_S = 30.0  # off a terminal: a plain line after this many silent seconds of a command, and every as many


@dataclass
class ConsoleSettings:
    """How the elapsed-time line behaves; ``live=None`` means "when the stream is a terminal".
    ``heartbeat_s``: off a terminal, a plain "still running" line after that many silent seconds
    (and every that many after); ``None``: none."""

    quiet: bool = False
    live: bool | None = None
    delay_s: float = 3.0
    interval_s: float = 1.0
    heartbeat_s: float | None = HEARTBEAT_S


class Console:
    """Writes ``[vitdeploy] ...`` lines to ``stream`` (default: ``sys.stderr`` at the time of writing) and,
    on a terminal, keeps an elapsed-time line alive under the last one (see the module docstring)."""

    def __init__(self, settings: ConsoleSettings | None = None, stream: TextIO | None = None) -> None:
        self.settings = settings or ConsoleSettings()
        self._stream = stream
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ticker: threading.Thread | None = None
        self._message = ""
        self._since = 0.0
        self._beat = 0.0  # when the last line (message or heartbeat) was printed
        self._shown = False  # an elapsed-time line is on screen (cursor at its start)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def live(self) -> bool:
        """Whether the elapsed-time line is shown: a terminal (or ``live=True``) and not quiet."""
        if self.settings.quiet:
            return False
        if self.settings.live is not None:
            return self.settings.live
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def progress(self, message: str) -> None:
        """Print ``[vitdeploy] message`` (flushed); under ``quiet`` only warnings are printed."""
        if self.settings.quiet and not message.startswith("warning:"):
            return
        with self._lock:
            self._erase()
            print(f"[vitdeploy] {message}", file=self.stream, flush=True)
            self._message, self._since = message, time.monotonic()
            self._beat = self._since
        if self.live or (self.settings.heartbeat_s and not self.settings.quiet):
            self._start()

    def pause(self) -> None:
        """Stop the elapsed-time line until the next message (for code that draws its own live line)."""
        with self._lock:
            self._erase()
            self._message = ""

    def close(self) -> None:
        """Erase the elapsed-time line and stop its thread (at the end of a command)."""
        with self._lock:
            self._erase()
            self._message = ""
            ticker, self._ticker = self._ticker, None
        self._wake.set()
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout=2 * self.settings.interval_s + 1)
        self._wake.clear()

    # -- the elapsed-time line ------------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._ticker is not None:
                return
            self._ticker = threading.Thread(target=self._run, name="vitdeploy-progress", daemon=True)
            self._ticker.start()

    def _run(self) -> None:
        tick = 0
        while not self._wake.wait(self.settings.interval_s):
            with self._lock:
                if self._ticker is not threading.current_thread():
                    return
                now = time.monotonic()
                elapsed = now - self._since
                if not self._message:
                    continue
                if not self.live:
                    every = self.settings.heartbeat_s
                    if every and not self.settings.quiet and now - self._beat >= every:
                        print(f"[vitdeploy]   still running ({elapsed:.0f}s): {self._message}", file=self.stream,
                              flush=True)
                        self._beat = now
                    continue
                if elapsed < self.settings.delay_s:
                    continue
                width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
                line = f"  {SPINNER[tick % len(SPINNER)]} {elapsed:.0f}s  {self._message}"[:width]
                self.stream.write(f"\r\033[K{line}\r")  # the cursor stays at the start: other output overwrites it
                self.stream.flush()
                self._shown = True
                tick += 1

    def _erase(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


_console = Console(ConsoleSettings(heartbeat_s=None))  # heartbeats only inside a command's session()


def error_line(error: BaseException, limit: int | None = None) -> str:
    """``Type: message`` on one line (whitespace collapsed), cut to ``limit`` characters when given."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def progress(message: str) -> None:
    """Print ``[vitdeploy] message`` to stderr, flushed (with the elapsed-time line on a terminal)."""
    _console.progress(message)


def pause() -> None:
    """Hand the terminal line to another live display (the benchmark's) until the next progress line."""
    _console.pause()


@contextlib.contextmanager
def session(quiet: bool = False) -> Iterator[Console]:
    """Configure the shared console for one command (``--quiet``) and erase its elapsed-time line at the end."""
    previous = _console.settings
    _console.settings = ConsoleSettings(quiet=quiet, live=previous.live, delay_s=previous.delay_s,
                                        interval_s=previous.interval_s,
                                        heartbeat_s=previous.heartbeat_s if previous.heartbeat_s else HEARTBEAT_S)
    try:
        yield _console
    finally:
        _console.close()
        _console.settings = previous
