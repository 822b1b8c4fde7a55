"""Helpers shared by the CLI commands: errors, progress, JSON output, range parsing."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from vitdeploy.console import progress
from vitdeploy.files import atomic_write_text

__all__ = ["CLIError", "progress", "stage", "write_json", "parse_range", "parse_int_list", "parse_sizes", "command_line",
           "ArgumentParser", "positive_float", "positive_int", "add_pos_embed_resample"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vitdeploy <command>: error: ...`` and exit status 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Print ``name ...`` then ``name done in Xs`` around a long step."""
    progress(f"{name} ...")
    start = time.perf_counter()
    yield
    progress(f"{name} done in {time.perf_counter() - start:.1f}s")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def parse_range(text: str, what: str, parts: int = 2) -> tuple[int, ...]:
    """Parse ``MIN:MAX`` (or ``MIN:OPT:MAX`` with ``parts=3``; a single ``N`` means N for all)."""
    pieces = text.split(":")
    if len(pieces) == 1:
        pieces = pieces * parts
    if len(pieces) != parts:
        form = "MIN:MAX" if parts == 2 else "MIN:OPT:MAX"
        raise CLIError(f"--{what} {text!r} is not of the form {form}")
    try:
        values = tuple(int(p) for p in pieces)
    except ValueError:
        raise CLIError(f"--{what} {text!r} must contain integers") from None
    if any(v <= 0 for v in values) or list(values) != sorted(values):
        raise CLIError(f"--{what} {text!r} must be positive and non-decreasing")
    return values


def parse_int_list(text: str, what: str) -> list[int]:
    """Parse ``1,8,32`` into ``[1, 8, 32]``."""
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise CLIError(f"--{what} {text!r} must be comma-separated integers") from None
    if not values or any(v <= 0 for v in values):
        raise CLIError(f"--{what} {text!r} must list positive integers")
    return values


def command_line(subcommand: str, argv: list[str] | None = None) -> str:
    """The exact ``vitdeploy SUBCOMMAND ...`` command line when run from the console script, else ``""``."""
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).name in ("vitdeploy", "__main__.py") and subcommand in argv[1:2]:
        return shlex.join(["vitdeploy", *argv[1:]])
    return ""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``224,384`` or ``224x320`` → ``[(224, 224), (384, 384)]`` / ``[(224, 320)]``."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        parts = item.split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise CLIError(f"--resolution {text!r}: {item!r} is not N or HxW with integers") from None
        if len(values) not in (1, 2) or any(v <= 0 for v in values):
            raise CLIError(f"--resolution {text!r}: {item!r} must be a positive N or HxW")
        sizes.append((values[0], values[-1]))
    if not sizes:
        raise CLIError(f"--resolution {text!r} lists no size")
    return sizes


def add_pos_embed_resample(parser: argparse.ArgumentParser) -> None:
    """The ``--pos-embed-resample`` option of the commands that load a checkpoint for good (export, convert)."""
    from vitdeploy.pos_embed import RESAMPLE_METHODS

    parser.add_argument(
        "--pos-embed-resample", choices=list(RESAMPLE_METHODS),
        help="how position embeddings are resampled at other resolutions, so that they give the logits of the "
        "framework named: " + "; ".join(f"{m.name}: {m.summary}" for m in RESAMPLE_METHODS.values())
        + ". Default: the checkpoint's own (timm files and JAX .npz → timm, Hugging Face folders → huggingface, "
        "native files → what they were saved with)",
    )
