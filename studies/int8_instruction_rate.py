"""The int8 ceiling of this CPU: the VNNI dot-product instruction's own rate beside the int8 GEMM
libraries' best (the peak the profiles and benchmarks compare with).

The library peak (:func:`vitdeploy.benchmarks.peaks.measure_int8_peak`) is what onnxruntime's and
OpenVINO's int8 kernels reach on large square matrices; no kernel passes the rate at which the
CPU issues its int8 dot product. This compiles ``int8_instruction_rate.c`` (VPDPBUSD on
independent register accumulators, no memory traffic) with the system C compiler, runs it on
``--threads`` threads, measures the library peak on the same threads right after, and writes both
with the library's fraction of the instruction rate. A floor computed at the instruction rate is
one no software can beat; one at the library peak is one today's kernels cannot.

    python studies/int8_instruction_rate.py [--threads 2] [--output PATH]

Needs a CPU with ``avx512_vnni`` and a C compiler (``$CC``, else ``gcc``); says so and exits 2
without them.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from study import RESULTS, command_line, write_results

SOURCE = Path(__file__).with_suffix(".c")
DEFAULT_OUTPUT = RESULTS / "int8_instruction_rate.json"
COMPILE_FLAGS = ("-O2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-pthread")
_RATE_LINE = re.compile(r"^VPDPBUSD (zmm|ymm), (\d+) threads: ([0-9.]+) GOP/s$")


class StudyError(Exception):
    """What stops the study, in one line."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python studies/int8_instruction_rate.py",
        description="Time the CPU's int8 dot-product instruction (VPDPBUSD) and the int8 GEMM libraries' best "
                    "rate on the same threads.")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--million-rounds", type=int, default=300,
                        help="millions of 12-instruction rounds per thread and run, best of 3 runs (default 300: "
                             "about a second per run at 3.5 GHz)")
    parser.add_argument("--peak-seconds", type=float, default=1.0,
                        help="seconds per matrix size for the library peak (default 1.0)")
    parser.add_argument("--no-library-peak", action="store_true", help="time the instruction only")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON report (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    for name in ("threads", "million_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.peak_seconds <= 0:
        parser.error(f"--peak-seconds must be > 0, got {args.peak_seconds}")
    return args


def c_compiler() -> str:
    """The C compiler the study builds with: ``$CC``, else ``gcc``."""
    return os.environ.get("CC", "gcc")


def compile_rate_program(folder: Path) -> Path:
    """``int8_instruction_rate.c`` built in ``folder``; :class:`StudyError` without a compiler or where it fails."""
    compiler = c_compiler()
    if shutil.which(compiler) is None:
        raise StudyError(f"no C compiler {compiler!r} on PATH (set CC to one); the instruction rate needs one")
    program = folder / "int8_instruction_rate"
    built = subprocess.run([compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(program)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        last = (built.stderr.strip().splitlines() or ["no message"])[-1]
        raise StudyError(f"{compiler} could not build {SOURCE.name} (exit {built.returncode}): {last}")
    return program


def parse_rates(output: str, threads: int) -> dict[str, float]:
    """GOP/s by register width (``zmm``, ``ymm``) from the program's output for ``threads`` threads."""
    rates = {}
    for line in output.splitlines():
        match = _RATE_LINE.match(line.strip())
        if match and int(match.group(2)) == threads:
            rates[match.group(1)] = float(match.group(3))
    if set(rates) != {"zmm", "ymm"}:
        raise StudyError(f"expected a zmm and a ymm rate for {threads} threads, got: {output.strip()!r}")
    return rates


def instruction_rates(threads: int, million_rounds: int) -> dict[str, float]:
    """VPDPBUSD GOP/s by register width on ``threads`` threads (best of 3 runs each)."""
    from vitdeploy.cpu_features import cpu_flags

    if "avx512_vnni" not in cpu_flags():
        raise StudyError("this CPU has no avx512_vnni (see lscpu); the study times the VPDPBUSD instruction")
    with tempfile.TemporaryDirectory(prefix="vitdeploy-int8-rate.") as folder:
        program = compile_rate_program(Path(folder))
        ran = subprocess.run([str(program), str(threads), str(million_rounds)], capture_output=True, text=True)
    if ran.returncode != 0:
        raise StudyError(f"{SOURCE.stem} exited {ran.returncode}: {ran.stderr.strip()}")
    return parse_rates(ran.stdout, threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The instruction rate and (unless ``--no-library-peak``) the library peak, as the report holds them."""
    from vitdeploy.cpu_features import arithmetic_flags, cpu_model

    print(f"[int8-rate] timing VPDPBUSD on {args.threads} threads", file=sys.stderr, flush=True)
    rates = instruction_rates(args.threads, args.million_rounds)
    ceiling = max(rates.values())
    report: dict[str, Any] = {
        "cpu": {"model": cpu_model(), "arithmetic_flags": arithmetic_flags()},
        "threads": args.threads,
        "instruction_gops": rates,
        "instruction_ceiling_gops": ceiling,
    }
    if not args.no_library_peak:
        from vitdeploy.benchmarks.peaks import measure_int8_peak

        print("[int8-rate] measuring the int8 GEMM libraries' peak", file=sys.stderr, flush=True)
        peak = measure_int8_peak(threads=args.threads, seconds=args.peak_seconds)
        report["library_peak"] = {"gops": peak.gflops, "method": peak.method,
                                  "fraction_of_instruction": peak.gflops / ceiling}
    return report


def summary(report: dict[str, Any]) -> str:
    """The report in two lines."""
    rates = report["instruction_gops"]
    lines = [f"VPDPBUSD on {report['threads']} threads: {rates['zmm']:.1f} GOP/s (zmm), {rates['ymm']:.1f} (ymm)"]
    if "library_peak" in report:
        peak = report["library_peak"]
        lines.append(f"int8 GEMM libraries' best: {peak['gops']:.1f} GOP/s = "
                     f"{100 * peak['fraction_of_instruction']:.1f} % of the instruction rate")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except StudyError as error:
        print(f"int8_instruction_rate: {error}", file=sys.stderr)
        return 2
    write_results(args.output, command_line("int8_instruction_rate", argv), report, threads=args.threads)
    print(summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
