"""The ``vitdeploy`` command line: one module per subcommand, each with ``register`` and ``run``."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from vitdeploy import __version__
from vitdeploy.cli.common import ArgumentParser, CLIError

# Subcommand modules in help order; each defines register(subparsers) that sets func=run.
COMMANDS = ["deploy", "inspect", "convert", "export", "verify", "predict", "check", "build", "bench", "triton",
            "serve"]


# Top-level modules a command may lack, and the extra that installs them.
EXTRAS = {"torch": "export", "safetensors": "export", "onnxscript": "export", "onnxruntime": "cpu",
          "matplotlib": "bench", "jsonschema": "bench", "onnxslim": "simplify", "tritonclient": "serve",
          "pytriton": "serve"}


def missing_extra(error: ModuleNotFoundError) -> str:
    """One line naming the missing package and the extra to install for it."""
    top = (error.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return f"a required package is not installed ({error})"
    return f"this command needs {top}, which is not installed: pip install 'vitdeploy[{extra}]'"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vitdeploy",
        description="Vision Transformer checkpoints to fast, verified ONNX / TensorRT / onnxruntime artifacts.",
    )
    parser.add_argument("--version", action="version", version=f"vitdeploy {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)
    for name in COMMANDS:
        import_module(f"vitdeploy.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vitdeploy`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a one-line argument error (status 2)
        return int(exit.code or 0)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
        if os.environ.get("VITDEPLOY_DEBUG"):  # show the traceback behind a one-line error
            raise
        print(f"vitdeploy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if os.environ.get("VITDEPLOY_DEBUG"):
            raise
        print(f"vitdeploy {args.command}: error: {missing_extra(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitdeploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
