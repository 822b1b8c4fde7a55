"""What the side-by-side benchmarks share (``ort_overheads``, ``pos_embed_cost``, ``cpu_int8``).

Each times its contenders in one process with :func:`vitdeploy.benchmarks.timing.time_rounds`
(interleaved rounds whose order reverses every round) and reports the median of the per-round p50
latencies. They take the same run arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_run_arguments(parser: argparse.ArgumentParser, *, rounds: int, iterations: int, warmup: int,
                      default_output: Path, iterations_help: str, model: bool = True) -> None:
    """``--model`` (unless ``model=False``: a benchmark of several models names its own option),
    ``--depth``, ``--threads``, ``--rounds``, ``--iterations``, ``--warmup`` and ``--output``."""
    if model:
        parser.add_argument("--model", default="vit_small_patch16_224", help="variant name (random weights, seed 0)")
    parser.add_argument("--depth", type=int, default=None,
                        help="keep only the first N blocks (a quick check of this script; not for measurements)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    parser.add_argument("--iterations", type=int, default=iterations, help=f"{iterations_help} (default {iterations})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed calls per contender first (default {warmup})")
    parser.add_argument("--output", type=Path, default=default_output, help=f"JSON report (default {default_output})")


def check_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse (one argparse error line) a run argument, or one of ``names``, below 1."""
    for name in ("threads", "rounds", "iterations", *names, *(("depth",) if args.depth is not None else ())):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``create_model`` overrides the run arguments ask for (``--depth``)."""
    return {"depth": args.depth} if args.depth is not None else {}
