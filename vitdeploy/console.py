"""Progress lines on stderr, shared by the library's long steps and the CLI (stdout stays for results)."""

from __future__ import annotations

import sys


def progress(message: str) -> None:
    """Print ``[vitdeploy] message`` to stderr, flushed."""
    print(f"[vitdeploy] {message}", file=sys.stderr, flush=True)
