"""The benchmark harness: sweep models x runtimes x resolutions x batch sizes, one record per point.

A runtime that cannot run here (no GPU, TensorRT missing) is recorded as ``skipped`` with the
reason for each of its points, and one that errors as ``failed``; neither stops the others.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vitdeploy import console
from vitdeploy.benchmarks.backends import Session, Skip, open_session
from vitdeploy.benchmarks.environment import OtherCpuLoad, capture_environment, load_average
from vitdeploy.benchmarks.memory import DeviceMemory, peak_rss_bytes, reset_peak_rss
from vitdeploy.benchmarks.models import BenchModel, Sweep
from vitdeploy.benchmarks.peaks import PeakTable, compute_precision
from vitdeploy.benchmarks.schema import SCHEMA_VERSION
from vitdeploy.benchmarks.specs import BASELINE, RuntimeSpec
from vitdeploy.benchmarks.stats import achieved_gflops, summarize, throughput
from vitdeploy.benchmarks.timing import TimingConfig, measure, measure_overhead
from vitdeploy.cpu_features import cpu_flags, usable_cpus

MIB = 2**20


@dataclass
class BenchPlan:
    """Everything one ``vitdeploy bench`` run does."""

    models: list[str]
    runtimes: list[RuntimeSpec]
    batches: list[int]
    sizes: list[tuple[int, int]] | None = None  # None: each model's native size
    timing: TimingConfig = field(default_factory=TimingConfig)
    cache_dir: Path = Path("bench-artifacts")
    threads: int | None = None
    peaks: dict[str, float] | None = None
    measure_peaks: bool = True
    overhead: bool = False
    overhead_models: list[str] | None = None  # None: the first model
    overhead_runtimes: list[str] | None = None  # runtime labels; None: every runtime
    overhead_iterations: int = 50
    overhead_rounds: int = 5
    baseline: str = BASELINE
    command: str | None = None
    suite: str | None = None
    compile_mode: str | None = None
    model_override: str | None = None  # a registry variant whose architecture every checkpoint is loaded with
    # batches nobody chose (bench's defaults): one an artifact does not take is skipped, not failed
    default_batches: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no models to benchmark; give a variant name, checkpoint or artifact")
        if not self.runtimes:
            raise ValueError("no runtimes to benchmark")
        sizes = [s for hw in self.sizes for s in hw] if self.sizes is not None else [1]
        for name, values in (("batch", self.batches), ("resolution", sizes)):
            if not values or any(int(v) < 1 for v in values):
                raise ValueError(f"{name} values must be positive integers, got {values}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def sizes_for(self, image_size: int) -> list[tuple[int, int]]:
        return list(self.sizes) if self.sizes is not None else [(image_size, image_size)]

    def sweep_for(self, image_size: int) -> Sweep:
        return Sweep(tuple(self.batches), tuple(self.sizes_for(image_size)))

    @property
    def total_points(self) -> int:
        sizes = len(self.sizes) if self.sizes is not None else 1
        return len(self.models) * len(self.runtimes) * len(self.batches) * sizes


class Display:
    """Live progress on stderr: a line rewritten in place on a terminal, one line per point otherwise."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.quiet = quiet
        self.total = 0
        self.index = 0
        self.current = ""

    def message(self, text: str) -> None:
        console.pause()
        if not self.quiet:
            self._clear()
            print(f"[bench] {text}", file=self.stream, flush=True)

    def begin(self, total: int) -> None:
        self.total = total
        self.index = 0

    def point_start(self, description: str) -> None:
        console.pause()  # this display draws its own live line
        self.index += 1
        self.current = f"[{self.index}/{self.total}] {description}"
        if self.live and not self.quiet:
            self.stream.write("\r\033[K" + self.current + " warming up")
            self.stream.flush()

    def point_progress(self, done: int, elapsed: float) -> None:
        if self.live and not self.quiet:
            self.stream.write(f"\r\033[K{self.current} {done} iterations, {elapsed:.1f}s")
            self.stream.flush()

    def point_end(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        if record["status"] == "ok":
            lat = record["latency_ms"]
            outcome = (f"p50 {lat['p50']:.3f} ms  p99 {lat['p99']:.3f} ms  "
                       f"{record['throughput_ips']:.1f} img/s  (n={lat['n']}, {record['timer']})")
        else:
            outcome = f"{record['status']}: {record['reason']}"
        self._clear()
        print(f"{self.current}: {outcome}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")


def _base_record(name: str, random_weights: bool, spec: RuntimeSpec, batch: int, height: int,
                 width: int) -> dict[str, Any]:
    return {
        "model": name, "runtime": spec.label, "backend": spec.backend, "precision": spec.precision,
        "device": spec.device, "options": spec.options, "batch": batch, "height": height, "width": width,
        "status": "ok", "reason": None, "threads": None, "timer": None, "warmup": None,
        "latency_ms": None, "first_call_ms": None, "throughput_ips": None, "peak_rss_mib": None,
        "peak_device_mib": None, "flops_per_image": None, "gflops_per_s": None, "peak_gflops": None,
        "peak_fraction": None, "compute_precision": None, "peak_note": None, "speedup_vs_baseline": None,
        "artifact": None,
        "random_weights": random_weights, "load_average": None, "other_cpu_load": None,
    }


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if not isinstance(error, Skip) else text
    return text if len(text) <= 400 else text[:397] + "..."


def _flops(model: BenchModel, height: int, width: int, optimizations: tuple[str, ...] = ()) -> int | None:
    """FLOPs per image of what the runtime computes (an exported classifier's last block is smaller)."""
    from vitdeploy.flops import count_flops
    from vitdeploy.metadata import CLASS_TOKEN_LAST_BLOCK

    try:
        return int(count_flops(model.config, height, width, CLASS_TOKEN_LAST_BLOCK in optimizations))
    except ValueError:
        return None


class Harness:
    """Runs a :class:`BenchPlan`; :meth:`run` returns the results document (see ``schema.json``)."""

    def __init__(self, plan: BenchPlan, display: Display | None = None,
                 prepared: dict[str, BenchModel] | None = None) -> None:
        """``prepared`` maps a model source to a ready :class:`BenchModel` (with its artifacts) to use as is."""
        self.plan = plan
        self.prepared = dict(prepared or {})
        self.display = display or Display()
        self.threads = plan.threads or usable_cpus()
        self.peaks = PeakTable(plan.peaks, plan.measure_peaks, self.threads, self.display.message)
        self.cpu_flags = cpu_flags()
        self.records: list[dict[str, Any]] = []
        self.overheads: list[dict[str, Any]] = []

    def run(self) -> dict[str, Any]:
        plan = self.plan
        started = time.perf_counter()
        environment = capture_environment(plan.command, self.threads)
        self.display.begin(plan.total_points)
        for index, source in enumerate(plan.models):
            try:
                model = self.prepared.get(source) or BenchModel.open(source, plan.cache_dir,
                                                                      model_override=plan.model_override)
            except Exception as error:  # a bad model fails its points, not the run
                self._fill(source, plan.runtimes, "failed", _error_text(error))
                continue
            overhead_here = plan.overhead and (
                source in plan.overhead_models if plan.overhead_models is not None else index == 0)
            for spec in plan.runtimes:
                wanted = plan.overhead_runtimes is None or spec.label in plan.overhead_runtimes
                self._run_runtime(model, spec, overhead_here and wanted)
                gc.collect()
        add_speedups(self.records, plan.baseline)
        return {
            "schema_version": SCHEMA_VERSION,
            "suite": plan.suite,
            "command": environment["command"],
            "environment": environment,
            "timing": plan.timing.to_dict(),
            "baseline": plan.baseline,
            "peaks": self.peaks.to_list(),
            "harness_overhead": self.overheads,
            "duration_s": round(time.perf_counter() - started, 2),
            "load_average_end": load_average(),
            "records": self.records,
        }

    def _fill(self, source: str, specs: list[RuntimeSpec], status: str, reason: str,
              model: BenchModel | None = None) -> None:
        # A model that could not be opened has no known native size; its failure rows say 224.
        sizes = self.plan.sizes_for(model.config.image_size if model else 224)
        for spec in specs:
            for height, width in sizes:
                for batch in self.plan.batches:
                    name, random_weights = (model.name, model.random_weights) if model else _source_identity(source)
                    record = _base_record(name, random_weights, spec, batch, height, width)
                    record.update(status=status, reason=reason)
                    self.display.point_start(f"{record['model']} {spec.label} b{batch} {height}x{width}")
                    self.display.point_end(record)
                    self.records.append(record)

    def _run_runtime(self, model: BenchModel, spec: RuntimeSpec, overhead: bool) -> None:
        plan = self.plan
        device_memory = None
        try:
            if spec.device == "cuda":
                device_memory = _device_memory()
                if device_memory is not None:
                    device_memory.start_runtime()
            sweep = plan.sweep_for(model.config.image_size)
            session = open_session(spec, model, sweep, self.threads, self.display.message, plan.compile_mode)
        except Skip as skip:
            self._fill(model.source, [spec], "skipped", _error_text(skip), model)
            return
        except Exception as error:
            self._fill(model.source, [spec], "failed", _error_text(error), model)
            return
        try:
            for size_index, (height, width) in enumerate(sweep.sizes):
                for batch in plan.batches:
                    measure_overhead_here = overhead and size_index == 0 and batch == min(plan.batches)
                    self._run_point(model, spec, session, batch, height, width, device_memory, measure_overhead_here)
        finally:
            session.close()

    def _peak_fraction(self, record: dict[str, Any], spec: RuntimeSpec) -> None:
        """Fill the peak of the precision the backend computes in, and the achieved fraction of it.

        A fraction above 1 is impossible: it means the measured peak is no ceiling for this
        backend, so none is reported and ``peak_note`` says why.
        """
        precision = compute_precision(spec.backend, spec.device, spec.precision, self.cpu_flags)
        record["compute_precision"] = precision
        peak = self.peaks.get(spec.device, precision)
        if peak is None:
            return
        record["peak_gflops"] = peak.gflops
        fraction = record["gflops_per_s"] / peak.gflops
        if fraction > 1.0:
            record["peak_note"] = (f"{record['gflops_per_s']:.0f} GFLOP/s achieved is above the {precision} matmul "
                                   f"peak of {peak.gflops:.0f} GFLOP/s ({peak.method or peak.source}): that peak is "
                                   "no ceiling for this backend, so no fraction is reported")
        else:
            record["peak_fraction"] = fraction

    def _run_point(self, model: BenchModel, spec: RuntimeSpec, session: Session, batch: int, height: int,
                   width: int, device_memory: DeviceMemory | None, overhead: bool) -> None:
        record = _base_record(model.name, model.random_weights, spec, batch, height, width)
        record.update(threads=session.threads, timer=session.timer.name, warmup=self.plan.timing.warmup,
                      artifact=session.artifact)
        self.display.point_start(f"{model.name} {spec.label} b{batch} {height}x{width}")
        takes = getattr(getattr(getattr(session, "runtime", None), "input_spec", None), "batch", None)
        if self.plan.default_batches and takes and not takes[0] <= batch <= takes[1]:
            record.update(status="skipped", reason=f"batch {batch} is outside the artifact's batch range "
                                                   f"{takes[0]}..{takes[1]} (a default batch; --batch chooses)")
            self.display.point_end(record)
            self.records.append(record)
            return
        try:
            fn = session.bind(batch, height, width)
            reset_peak_rss()
            if device_memory is not None:
                device_memory.start_point()
            others = OtherCpuLoad()
            others.start()

            def progress(done: int, elapsed: float) -> None:
                if device_memory is not None:
                    device_memory.sample()
                self.display.point_progress(done, elapsed)

            measurement = measure(fn, self.plan.timing, session.timer, progress)
            record["other_cpu_load"] = others.stop()
            stats = summarize(measurement.samples_ms)
            record["peak_rss_mib"] = round(peak_rss_bytes() / MIB, 1)
            if device_memory is not None:
                record["peak_device_mib"] = round(device_memory.result()["peak_bytes"] / MIB, 1)
            record["latency_ms"] = stats.to_dict()
            record["first_call_ms"] = measurement.first_call_ms
            record["throughput_ips"] = throughput(batch, stats.mean)
            flops = _flops(model, height, width, session.optimizations)
            if flops is not None:
                record["flops_per_image"] = flops
                record["gflops_per_s"] = achieved_gflops(flops, batch, stats.mean)
                self._peak_fraction(record, spec)
            if overhead:
                self.display.message(f"measuring harness overhead against a bare loop for {spec.label} b{batch}")
                result = measure_overhead(fn, self.plan.overhead_iterations, self.plan.overhead_rounds, session.timer)
                self.overheads.append({"model": model.name, "runtime": spec.label, "batch": batch,
                                       "height": height, "width": width, "timer": session.timer.name,
                                       **result.to_dict()})
        except Exception as error:
            record.update(status="failed", reason=_error_text(error), latency_ms=None, throughput_ips=None,
                          first_call_ms=None, gflops_per_s=None, peak_gflops=None, peak_fraction=None, peak_note=None,
                          flops_per_image=None, peak_rss_mib=None, peak_device_mib=None)
            _free_cuda(spec)
        record["load_average"] = load_average()
        self.display.point_end(record)
        self.records.append(record)


def _source_identity(source: str) -> tuple[str, bool]:
    """Display name and whether weights are random, for a model that could not be opened."""
    from vitdeploy.files import slug
    from vitdeploy.variants import VARIANTS

    return (source, True) if source in VARIANTS else (slug(source), False)


def _device_memory() -> DeviceMemory | None:
    try:
        import torch

        if torch.cuda.is_available():
            return DeviceMemory(torch.cuda.current_device())
    except Exception:
        return None
    return None


def _free_cuda(spec: RuntimeSpec) -> None:
    if spec.device != "cuda":
        return
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def add_speedups(records: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Set ``speedup_vs_baseline`` = baseline p50 / p50 for every ok record with an ok baseline point."""
    base = {
        (r["model"], r["batch"], r["height"], r["width"]): r["latency_ms"]["p50"]
        for r in records if r["runtime"] == baseline and r["status"] == "ok"
    }
    for record in records:
        key = (record["model"], record["batch"], record["height"], record["width"])
        if record["status"] == "ok" and key in base and record["latency_ms"]["p50"] > 0:
            record["speedup_vs_baseline"] = base[key] / record["latency_ms"]["p50"]


def default_cache_dir(output_dir: str | os.PathLike[str] | None) -> Path:
    """Where exported ONNX files and engines go: ``OUT/artifacts`` (or ``./bench-artifacts``)."""
    return Path(output_dir) / "artifacts" if output_dir is not None else Path("bench-artifacts")
