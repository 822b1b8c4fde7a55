"""The ``vitdeploy`` command line: one module per subcommand, each with ``register`` and ``run``.

One error path for every command (:func:`main`): bad input, an unusable output path or a missing
backend ends in one line ``vitdeploy <command>: error: ...`` naming the value or path and the
cause, never a traceback (``VITDEPLOY_DEBUG=1`` shows it). Exit status: 0 success; 1 the artifact
failed its check (parity, pre-flight errors); 2 bad input or an unusable environment; 130
interrupted (Ctrl-C); 143 terminated (SIGTERM); 141 stdout closed early (``| head``), without a word. Interrupted or terminated work leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from importlib import import_module

from vitdeploy import __version__, console
from vitdeploy.cli.common import ArgumentParser, CLIError, CommandParser, write_json

# Subcommand modules in help order; each defines register(subparsers) that sets func=run.
COMMANDS = ["deploy", "tune", "inspect", "convert", "export", "quantize", "verify", "predict", "check", "build", "bench",
            "triton", "serve"]

EXIT_CODES = """\
exit status: 0 success; 1 the artifact failed its check (parity, pre-flight errors); 2 bad input or
an unusable environment (one line "vitdeploy COMMAND: error: ..."); 130 interrupted; 143 terminated;
141 stdout was closed early (e.g. "| head"), quietly. Set VITDEPLOY_DEBUG=1 to see the traceback and
full details behind an error line."""

# Top-level modules a command may lack, and the extra that installs them.
EXTRAS = {"torch": "export", "safetensors": "export", "onnxscript": "export", "onnxruntime": "cpu", "openvino": "openvino",
          "matplotlib": "bench", "jsonschema": "bench", "onnxslim": "simplify", "tritonclient": "serve",
          "pytriton": "serve"}


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C so every temporary is cleaned up on the way out."""


def missing_extra(error: ModuleNotFoundError) -> str:
    """One line naming the missing package and the extra to install for it."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return f"a required package is not installed ({error})"
    return f"this command needs {top}, which is not installed: pip install 'vitdeploy[{extra}]'"


def error_line(error: BaseException) -> str | None:
    """The one-line message for an error that is the user's input or environment, ``None`` for a bug."""
    from vitdeploy.tensorrt_env import TensorRTUnavailable

    if isinstance(error, ModuleNotFoundError):
        return missing_extra(error)
    if isinstance(error, OSError) and error.strerror and error.filename:
        target = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        return f"{target}: {error.strerror}"
    if isinstance(error, (CLIError, ValueError, OSError, TensorRTUnavailable)):
        return " ".join(str(error).split()) or type(error).__name__
    if type(error).__name__ == "DecodeError" and type(error).__module__.startswith("google.protobuf"):
        return f"a file is not a readable protobuf (ONNX) file: {error}"
    if type(error).__module__.startswith("onnxruntime"):
        return f"onnxruntime refused it: {' '.join(str(error).split())}"
    return None


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a command runs (main thread only)."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Print vitdeploy's own warnings as ``vitdeploy <command>: warning: ...`` (no source line);
    other libraries' warnings keep Python's form, which says where they come from."""
    from importlib.util import find_spec
    from pathlib import Path

    # The four folders the package maps (pyproject's package-dir), wherever they are installed.
    specs = [find_spec(name) for name in ("vitdeploy", "vitdeploy.runtimes", "vitdeploy.exporters", "vitdeploy.benchmarks")]
    ours = tuple(str(Path(folder).resolve()) + os.sep for spec in specs if spec is not None
                 for folder in spec.submodule_search_locations or [])
    default = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None):  # type: ignore[no-untyped-def]
        if str(Path(filename).resolve()).startswith(ours):
            return f"vitdeploy {command}: warning: {' '.join(str(message).split())}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = default


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vitdeploy",
        description="Vision Transformer checkpoints to fast, verified ONNX / TensorRT / onnxruntime artifacts.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitdeploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, prog="vitdeploy",
                                       parser_class=CommandParser)
    for name in COMMANDS:
        import_module(f"vitdeploy.cli.{name}").register(subparsers)
    owners: dict[str, list[str]] = {}
    for name, command in subparsers.choices.items():
        command.epilog = f"{command.epilog}\n\n{EXIT_CODES}" if command.epilog else EXIT_CODES
        if command.formatter_class is argparse.HelpFormatter:
            command.formatter_class = argparse.RawDescriptionHelpFormatter
        if "--quiet" not in command._option_string_actions:
            command.add_argument("-q", "--quiet", action="store_true",
                                 help="no progress lines or elapsed-time display on stderr (warnings and errors stay)")
        for option in command._option_string_actions:
            if option.startswith("--") and option not in ("--help", "--quiet"):
                owners.setdefault(option, []).append(name)
    for name, command in subparsers.choices.items():
        command.elsewhere = {option: [owner for owner in names if owner != name] for option, names in owners.items()
                             if name not in names}
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitdeploy`` console script; returns the exit status."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader that closed the pipe is found here, not in Python's flush at exit
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        return _stdout_closed()


def _main(argv: list[str] | None) -> int:
    given = sys.argv[1:] if argv is None else argv
    name = next((f"vitdeploy {word}" for word in given if word in COMMANDS), "vitdeploy")
    args = None
    try:
        # Parsing already writes (the output paths' write probes), so it is covered too.
        with _sigterm_unwinds():
            try:
                args = build_parser().parse_args(argv)
            except SystemExit as exit:  # --help, --version, or a one-line argument error (status 2)
                return int(exit.code or 0)
            name = f"vitdeploy {args.command}"
            with _one_line_warnings(args.command), console.session(quiet=getattr(args, "quiet", False)):
                return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{name}: terminated", file=sys.stderr)
        return 143
    except Exception as error:
        if isinstance(error, BrokenPipeError) and _stdout_reader_gone():
            raise
        line = error_line(error)
        details = getattr(error, "details", None)  # the full listing behind a short line
        if line is None or os.environ.get("VITDEPLOY_DEBUG"):  # a bug, or asked for the traceback
            if details:
                print(f"{name}: details: {details}", file=sys.stderr)
            raise
        if details and getattr(args, "json", None):
            with contextlib.suppress(OSError):
                write_json(args.json, {"passed": False, "error": line, "details": details})
        print(f"{name}: error: {line}", file=sys.stderr)
        return 2


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end), so a
    broken pipe elsewhere (a subprocess, a socket) stays an error."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): a normal end, as for POSIX tools (no message, status
    141 = 128 + SIGPIPE). stdout is pointed at /dev/null so Python's flush at exit has nowhere to fail."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
