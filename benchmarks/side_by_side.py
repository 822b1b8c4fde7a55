"""What the side-by-side benchmarks share (``ort_overheads``, ``pos_embed_cost``, ``cpu_int8``).

Each times its contenders in one process, in interleaved rounds whose order reverses every round,
so drift and other processes' load hit every contender alike; each reports the median of the
per-round p50 latencies. They take the same run arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


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


def time_rounds(runners: dict[str, Callable[[], Any]], rounds: int, iterations: int,
                warmup: int, on_round: Callable[[int, dict[str, list[float]]], None] | None = None
                ) -> dict[str, list[float]]:
    """p50 latency (ms) of each runner per round; runners alternate, order reversed every round.
    ``on_round(index, p50s)`` is called after each round (progress lines).

    Each block is timed by the bench harness's :func:`~vitdeploy.benchmarks.timing.measure`
    (garbage collector paused) after one untimed call: the first call after another runtime
    pays for cold caches.
    """
    from vitdeploy.benchmarks.timing import TimingConfig, measure

    for run in runners.values():
        for _ in range(warmup):
            run()
    block = TimingConfig(warmup=1, iterations=iterations, time_budget_s=None, min_iterations=1)
    p50s: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(runners)[::-1]
        for name in order:
            p50s[name].append(float(np.median(measure(runners[name], block).samples_ms)))
        if on_round is not None:
            on_round(index, p50s)
    return p50s
