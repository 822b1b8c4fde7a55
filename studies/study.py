"""What the studies share: their command line, one way to write their results, and the run arguments
of the side-by-side ones.

A study is a script run from the repository (``python studies/NAME.py ...``), not part of the
installed package: it imports ``vitdeploy`` like any user code. Each writes one JSON document
(:func:`write_results`) that starts with the command that made it and the machine it ran on, by
default into ``benchmarks/results/`` beside the command outputs the docs link. The side-by-side
studies (``ort_overheads``, ``pos_embed_cost``, ``cpu_int8``, ``families``) time their contenders with
:func:`vitdeploy.benchmarks.timing.time_rounds` (interleaved rounds whose order reverses every round)
and take the same run arguments.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def command_line(study: str, argv: Sequence[str] | None) -> str:
    """How this study was run, as one shell line (``python studies/NAME.py ARGS``)."""
    return shlex.join(["python", f"studies/{study}.py", *(sys.argv[1:] if argv is None else argv)])


def write_results(path: Path, command: str, results: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Write ``{"command", "environment", **results}`` to ``path`` atomically (folders made), say so
    on stderr, and return the document."""
    from vitdeploy.benchmarks.environment import capture_environment
    from vitdeploy.files import atomic_write_json

    document = {"command": command, "environment": capture_environment(command, threads=threads), **results}
    atomic_write_json(path, document, parents=True)
    print(f"wrote {path}", file=sys.stderr)
    return document


def finish(args: argparse.Namespace, command: str, report: dict[str, Any]) -> int:
    """Write a side-by-side study's report to ``--output`` (:func:`write_results`, with its ``--threads``);
    the study's exit status."""
    write_results(args.output, command, report, threads=args.threads)
    return 0


def run_line(args: argparse.Namespace, size: int, load: Any) -> str:
    """What a single-batch side-by-side study ran, in the line above its table (model, batch, size, threads,
    rounds, calls and the other processes' load)."""
    return (f"{args.model}, batch {args.batch}, {size}x{size}, {args.threads} threads, {args.rounds} rounds x "
            f"{args.iterations} calls; {load.describe()}")


def error_cell(error: float | None) -> str:
    """A relative error in a printed table: blank where none was measured."""
    return "" if error is None else f"{error:9.1e}"


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


def random_model(args: argparse.Namespace) -> Any:
    """``--model`` with random weights (seed 0; ``--depth`` blocks), torch on ``--threads`` threads."""
    import torch

    import vitdeploy

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    return vitdeploy.create_model(args.model, **model_overrides(args)).eval()
