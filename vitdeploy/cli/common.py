"""Helpers shared by the CLI commands: errors, progress, JSON output, range parsing."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vitdeploy.atomic import atomic_write_text


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def progress(message: str) -> None:
    """Print a progress line to stderr (stdout stays clean for results)."""
    print(f"[vitdeploy] {message}", file=sys.stderr, flush=True)


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
