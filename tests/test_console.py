"""The progress console: plain lines everywhere, an elapsed-time line only on a real terminal, nothing with --quiet."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import time

import pytest
import torch
from conftest import make_model, tiny_config

from vitdeploy import console
from vitdeploy.cli import main
from vitdeploy.console import Console, ConsoleSettings

FAST = dict(delay_s=0.05, interval_s=0.02)
TICK = re.compile(r"\r\033\[K  [|/\\-] \d+s  trace \.\.\.\r")


def read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal's other end was closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.fixture
def terminal():
    """A real pseudo-terminal: (the stream a program writes to, a function reading what the screen got)."""
    leader, follower = pty.openpty()
    stream = os.fdopen(follower, "w", buffering=1)
    assert stream.isatty()
    yield stream, lambda: read_all(leader)
    stream.close()
    os.close(leader)


def test_a_silent_stage_on_a_terminal_shows_elapsed_time_and_erases_it(terminal) -> None:
    stream, screen = terminal
    shown = Console(ConsoleSettings(**FAST), stream=stream)
    assert shown.live
    shown.progress("trace ...")
    time.sleep(0.4)
    shown.progress("trace done in 0.4s")
    shown.close()
    text = screen().replace("\r\n", "\n")  # the terminal's own newline translation
    assert text.startswith("[vitdeploy] trace ...\n")
    ticks = TICK.findall(text)
    assert len(ticks) >= 3, repr(text)
    # The elapsed-time line is erased before the next message, which then starts its own line.
    assert text.endswith("\r\033[K[vitdeploy] trace done in 0.4s\n"), repr(text[-80:])
    assert "trace done" not in "".join(ticks)


def test_no_elapsed_line_before_the_delay_nor_after_close(terminal) -> None:
    stream, screen = terminal
    shown = Console(ConsoleSettings(delay_s=5.0, interval_s=0.02), stream=stream)
    shown.progress("trace ...")
    time.sleep(0.2)
    shown.close()
    time.sleep(0.1)
    assert screen().replace("\r\n", "\n") == "[vitdeploy] trace ...\n"


def test_not_a_terminal_gets_plain_lines_only() -> None:
    stream = io.StringIO()
    plain = Console(ConsoleSettings(**FAST), stream=stream)
    assert not plain.live
    plain.progress("trace ...")
    time.sleep(0.2)
    plain.progress("trace done in 0.2s")
    plain.close()
    assert stream.getvalue() == "[vitdeploy] trace ...\n[vitdeploy] trace done in 0.2s\n"


def test_quiet_drops_progress_and_the_elapsed_line_but_keeps_warnings(terminal) -> None:
    stream, screen = terminal
    quiet = Console(ConsoleSettings(quiet=True, **FAST), stream=stream)
    assert not quiet.live
    quiet.progress("trace ...")
    time.sleep(0.2)
    quiet.progress("warning: random weights")
    quiet.close()
    assert screen().replace("\r\n", "\n") == "[vitdeploy] warning: random weights\n"


def test_every_command_takes_quiet(tmp_path, capsys) -> None:
    model = make_model(tiny_config(), seed=2)
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    assert main(["convert", str(path), "-o", str(tmp_path / "loud"), "--num-heads", "4"]) == 0
    assert "[vitdeploy] inferred a ViT from the tensor shapes" in capsys.readouterr().err
    assert main(["convert", str(path), "-o", str(tmp_path / "quiet"), "--num-heads", "4", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "wrote native checkpoint" in captured.out
    assert not console._console.settings.quiet  # the setting lasts one command


HEARTBEAT = re.compile(r"^\[vitdeploy\]   still running \(\d+s\): validate \.\.\.$")


def test_off_a_terminal_a_silent_stage_gets_plain_still_running_lines(tmp_path) -> None:
    """stderr redirected to a file (CI logs, `| tee`): a line every heartbeat_s while a stage is silent, none after."""
    log = tmp_path / "stderr.log"
    with open(log, "w") as stream:
        plain = Console(ConsoleSettings(heartbeat_s=0.1, interval_s=0.01), stream=stream)
        assert not plain.live
        plain.progress("validate ...")
        time.sleep(0.65)
        plain.progress("validate done in 0.6s")
        time.sleep(0.03)
        plain.close()
        time.sleep(0.2)
    lines = log.read_text().splitlines()
    assert lines[0] == "[vitdeploy] validate ..." and lines[-1] == "[vitdeploy] validate done in 0.6s"
    beats = lines[1:-1]
    assert 2 <= len(beats) <= 7 and all(HEARTBEAT.match(line) for line in beats), lines
    assert "\r" not in log.read_text() and "\033" not in log.read_text()  # plain lines, no terminal codes


def test_quiet_or_outside_a_command_no_heartbeat(tmp_path) -> None:
    stream = io.StringIO()
    quiet = Console(ConsoleSettings(quiet=True, heartbeat_s=0.05, interval_s=0.01), stream=stream)
    quiet.progress("validate ...")
    time.sleep(0.2)
    quiet.close()
    assert stream.getvalue() == ""
    # The shared console beats only inside a command's session (library code prints its lines only).
    assert console._console.settings.heartbeat_s is None
    with console.session():
        assert console._console.settings.heartbeat_s == console.HEARTBEAT_S == 30.0
    with console.session(quiet=True):
        console.progress("validate ...")
        assert console._console._ticker is None  # quiet: no heartbeat thread either
    assert console._console.settings.heartbeat_s is None


def test_a_command_off_a_terminal_reports_each_stage_and_shape(tmp_path, monkeypatch) -> None:
    """`vitdeploy quantize` with stderr a file: a line per stage (calibration, fallback search, validation) and
    per validated shape."""
    from onnx_artifacts import validated_tiny_export

    source = validated_tiny_export(tmp_path, batch=(1, 2), validation_max_batch=2)
    log = tmp_path / "stderr.log"
    with open(log, "w") as stream:
        monkeypatch.setattr("sys.stderr", stream)
        status = main(["quantize", str(source), "-o", str(tmp_path / "q.onnx"), "--validation-max-batch", "2",
                       "--no-cpu-variant"])
    text = log.read_text()
    assert status == 0, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("[vitdeploy] ")]
    for stage in ("[vitdeploy] calibrating ", "[vitdeploy]   every layer quantized: worst probe cosine ",
                  "[vitdeploy] validating against "):
        assert any(line.startswith(stage) for line in lines), (stage, lines)
    shapes = [line for line in lines if re.match(r"\[vitdeploy\]   \d+x3x\d+x\d+ \w+: cosine ", line)]
    assert len(shapes) >= 3, lines
    assert "\033" not in text
