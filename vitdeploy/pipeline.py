"""The whole pipeline as a library: a checkpoint to verified artifacts, a TensorRT engine (or the
command to build one), this machine's benchmark and a report (``vitdeploy deploy`` calls it).

``deploy(DeployOptions(source, output))`` runs, in order: load → export fp32, fp16 and int8
(each validated against the eager model, the fp32 one with its onnxruntime-CPU variant, the int8
one a calibrated Q/DQ graph with its TensorRT pre-flight) → TensorRT
pre-flight of the fp16 graph → engine build where TensorRT and a GPU exist (else
``build_engine.sh`` with the equivalent ``trtexec`` command) → engine parity → benchmark →
on a machine without a GPU, ``tune`` (the fastest accurate CPU path, recorded in ``tune.json``) →
``report.md`` and ``report.json``. Each stage records its status, time and a one-line detail.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vitdeploy.console import error_line, progress
from vitdeploy.constants import DEFAULT_FP32_OPS
from vitdeploy.files import atomic_write_json, atomic_write_text, sha256_file

DEFAULT_SOURCE = "vit_small_patch16_224"
# Per-point timing budget when neither a per-point nor a total budget is given.
DEFAULT_POINT_BUDGET_S = {"cpu": 3.0, "cuda": 1.0}
# Benchmark runtime label -> the tune candidate that runs the same graph with the same backend and precision.
BENCH_TO_TUNE = {"ort-cpu-fp32": "ort-fp32", "ort-cpu-int8": "ort-int8", "openvino-cpu-fp32": "openvino-fp32",
                 "openvino-cpu-bf16": "openvino-bf16", "openvino-cpu-int8": "openvino-int8"}


DEFAULT_BENCH_BATCHES = (1, 8)  # benchmarked (and tuned) unless told


@dataclass
class DeployOptions:
    """What ``deploy`` does. Ranges are inclusive ``(min, max)``; ``resolution`` ``None`` means the
    model's default (half to twice native).

    Timing: ``point_budget_s`` seconds per benchmark point, or ``bench_budget_s`` for the whole
    benchmark (split evenly over its points); ``bench=False`` skips it. ``peaks`` (GFLOP/s by
    precision, ``"*"`` for all) replaces the matmul peaks the benchmark would otherwise measure.
    """

    source: str = DEFAULT_SOURCE
    output: Path = Path("deploy-out")
    batch: tuple[int, int] = (1, 8)  # all of it validated (validation_max_batch): what the engine may be built for
    resolution: tuple[int, int] | None = None
    bench: bool = True
    bench_batches: tuple[int, ...] = DEFAULT_BENCH_BATCHES
    point_budget_s: float | None = None
    bench_budget_s: float | None = None
    threads: int | None = None
    peaks: dict[str, float] | None = None
    validation_max_batch: int = 8
    int8: bool = True  # also export the calibrated int8 Q/DQ graph
    calibration: str | None = None  # calibration images for int8 (None: bundled photos + synthetic crops)
    outputs: tuple[str, ...] | None = None  # the graphs' outputs (vitdeploy.outputs; None: the model's default)
    model: str | None = None  # a registry variant whose architecture the checkpoint is loaded with (resolve_source)
    tune: bool = True  # on a machine without a GPU: vitdeploy tune on the exports (few rounds)
    tune_rounds: int = 3
    source_check: bool = True  # also check each export against the checkpoint's own library (timm, transformers)
    command: str = ""
    log: Callable[[str], None] = progress

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        self.batch = (int(self.batch[0]), int(self.batch[1]))
        if not 0 < self.batch[0] <= self.batch[1]:
            raise ValueError(f"batch range {self.batch[0]}:{self.batch[1]} must be positive and ordered")
        self.bench_batches = tuple(int(b) for b in self.bench_batches)
        if not self.bench_batches or any(not self.batch[0] <= b <= self.batch[1] for b in self.bench_batches):
            raise ValueError(f"benchmark batch sizes {list(self.bench_batches)} must lie inside the batch range "
                             f"{self.batch[0]}:{self.batch[1]}")
        if self.validation_max_batch < 1:
            raise ValueError(f"validation_max_batch must be >= 1, got {self.validation_max_batch}")
        if self.tune_rounds < 1:
            raise ValueError(f"tune_rounds must be >= 1, got {self.tune_rounds}")
        for name in ("point_budget_s", "bench_budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if self.point_budget_s is not None and self.bench_budget_s is not None:
            raise ValueError("give a per-point timing budget or a total benchmark budget, not both")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"output {str(self.output)!r} exists and is not a folder")
        if not self.command:
            self.command = shlex.join(["vitdeploy", "deploy", str(self.source), "-o", str(self.output)])


def deploy(options: DeployOptions) -> DeployResult:
    """Run the whole pipeline (see the module docstring); the report is written even when a stage fails."""
    return Pipeline(options).run()



@dataclass
class Stage:
    name: str
    status: str = "ok"  # ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2), "detail": self.detail}


@dataclass
class Artifact:
    path: Path
    kind: str  # onnx | engine | trtexec-command
    precision: str
    parity: dict[str, Any] | None = None
    passed: bool | None = None
    notes: list[str] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # the graph's outputs: name and shape

    def to_dict(self, root: Path) -> dict[str, Any]:
        data: dict[str, Any] = {"path": _relative(self.path, root), "kind": self.kind, "precision": self.precision,
                                "passed": self.passed, "parity": self.parity, "notes": self.notes,
                                "outputs": self.outputs}
        if self.path.is_file() and self.kind != "trtexec-command":
            files = [self.path, *(p for p in [self.path.with_name(self.path.name + ".data")] if p.is_file())]
            data["bytes"] = sum(p.stat().st_size for p in files)
            data["sha256"] = sha256_file(self.path)
        return data


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


@dataclass
class DeployResult:
    """What ``deploy`` produced: the report's data, where it was written, and the exit status.

    ``status`` is 0 when every artifact written passed parity and 1 when one failed its check.
    """

    report: dict[str, Any]
    report_path: Path
    status: int


class Pipeline:
    """The deploy stages, in order; each records its status, time and a one-line detail."""

    def __init__(self, options: DeployOptions) -> None:
        self.options = options
        self.log = options.log
        self.out = options.output
        self.command = options.command
        self.stages: list[Stage] = []
        self.artifacts: list[Artifact] = []
        self.preflight: dict[str, Any] | None = None
        self.tensorrt: dict[str, Any] = {"built": False}
        self.bench: dict[str, Any] | None = None
        self.tuned: Any = None  # the TuneResult
        self.resolved: Any = None
        self.source_plan: Any = None  # what the exports are checked against (exporters/source_check.py)
        self.plan: Any = None  # the exports' ArtifactSetPlan (exporters/artifact_set.py)
        self.name = ""

    def skip(self, name: str, reason: str) -> None:
        """Record a stage that did not run, and why (the report lists it with the others)."""
        self.stages.append(Stage(name, "skipped", 0.0, reason))
        self.log(f"{name}: skipped ({reason})")

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        record = Stage(name)
        self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield record
        except BaseException as error:  # the run stops here; the stage's line says so
            record.status, record.detail = "failed", error_line(error)
            raise
        finally:
            record.seconds = time.perf_counter() - start
            self.stages.append(record)
            self.log(f"{name}: {record.status} in {record.seconds:.1f}s" + (f" ({record.detail})" if record.detail else ""))

    # -- stages -----------------------------------------------------------------------------

    def load(self) -> None:
        from vitdeploy.checkpoints import resolve_source
        from vitdeploy.files import slug

        with self.stage("load") as stage:
            self.resolved = resolve_source(self.options.source, log=self.log, model=self.options.model)
            from vitdeploy.exporters.source_check import plan_source_check

            self.source_plan = plan_source_check(
                self.resolved.source, self.resolved.format, model=self.options.model,
                image_size=self.resolved.model.config.image_size,
                variant=self.resolved.model.config.provenance.name, enabled=self.options.source_check)
            self.name = slug(str(self.options.source))
            config = self.resolved.model.config
            stage.detail = (f"{config.provenance.name}: {self.resolved.format}"
                            + (", random weights" if self.resolved.random_weights else ""))

    def artifact_plan(self) -> Any:
        """The exports' artifact set: fp32, fp16 and (unless ``--no-int8``) int8, each traced and checked
        against the eager model and the source library, the int8 one with its TensorRT pre-flight."""
        from vitdeploy.exporters.artifact_set import ArtifactSetPlan

        options = self.options
        return ArtifactSetPlan(
            self.name, graphs=("fp32", "fp16", "int8") if options.int8 else ("fp32", "fp16"), batch=options.batch,
            height=options.resolution, width=options.resolution, validation_max_batch=options.validation_max_batch,
            preflight=("int8",), calibration=options.calibration, source=str(self.resolved.source),
            source_sha256=self.resolved.sha256, source_format=self.resolved.format, outputs=options.outputs,
            source_check=self.source_plan)

    def export(self, precision: str) -> Artifact | None:
        from vitdeploy.exporters.artifact_set import build_artifact
        from vitdeploy.exporters.onnx_export import ExportValidationError
        from vitdeploy.exporters.quantize import QuantizationTargetError

        path = self.plan.path(self.out, precision)
        with self.stage(f"export {precision}") as stage:
            try:
                result = build_artifact(self.resolved.model, self.plan, precision, self.out, progress=progress)
            except ExportValidationError as error:
                check = getattr(error, "result", None)  # a SourceCheckError: the artifact disagrees with the source
                what = f"disagrees with {check.reference}" if check is not None else "parity check failed"
                stage.status, stage.detail = "failed", f"{what}; {path.name} was not written"
                print(error.report.format_table())
                self.artifacts.append(Artifact(path, "onnx", precision, error.report.summary(), False,
                                               ["not written: failed its parity check"]))
                return None
            except QuantizationTargetError as error:  # the keep-in-float search could not reach the gate
                stage.status, stage.detail = "failed", f"quantization missed its gate; {path.name} was not written"
                self.artifacts.append(Artifact(path, "onnx", precision, None, False, [f"not written: {error}"]))
                return None
            report = result.report
            artifact = Artifact(path, "onnx", precision, report.summary() if report else None,
                                report.passed if report else None, list(report.notes) if report else [],
                                [{"name": t.name, "shape": list(t.shape)} for t in result.metadata.outputs])
            artifact.notes.insert(0, result.metadata.range_text())
            if result.source_check is not None:
                artifact.notes.append(result.source_check.summary_line())
            if result.quantization is not None:
                record = result.quantization
                artifact.notes.append(
                    f"{record['quantizer']} Q/DQ: {sum(record['quantized_nodes'].values())} quantized nodes, "
                    f"calibrated on {record['calibration']['count']} images ({record['calibration']['source']}), "
                    f"{record['smoothing']['layer_norms']} LayerNorms smoothed")
            if result.preflight is not None:
                artifact.notes.append(f"TensorRT pre-flight: {len(result.preflight.errors)} error(s), "
                                      f"{len(result.preflight.warnings)} warning(s)")
            stage.detail = f"{path.name}, parity {'passed' if artifact.passed else 'not checked'}"
            self.artifacts.append(artifact)
            return artifact

    def preflight_check(self, onnx_path: Path) -> bool:
        from vitdeploy.exporters.trt_support import check_onnx

        with self.stage("TensorRT pre-flight") as stage:
            report = check_onnx(onnx_path)
            self.preflight = {**report.to_dict(), "text": report.format_text()}
            stage.detail = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            if not report.ok:
                stage.status = "failed"
            return bool(report.ok)

    def build(self, onnx_path: Path, preflight_ok: bool) -> Artifact | None:
        from vitdeploy.exporters import tensorrt_build
        from vitdeploy.exporters.trt_plan import format_command, plan_build, trtexec_command

        engine_path = self.out / f"{self.name}-fp16.engine"
        with self.stage("TensorRT build") as stage:
            plan = plan_build(onnx_path, engine_path)
            # The script runs from OUT/, so it names the files without their folder.
            command = format_command(trtexec_command(replace(plan, engine_path=Path(engine_path.name)), onnx_path.name))
            self.tensorrt.update(trtexec=command, engine=str(engine_path),
                                 profiles=[p.describe() for p in plan.profiles])
            if not preflight_ok:
                stage.status, stage.detail = "skipped", "the pre-flight found graph errors TensorRT's parser would reject"
                self.tensorrt["reason"] = stage.detail
                return None
            try:
                tensorrt_build.check_build_environment()
            except tensorrt_build.TensorRTUnavailable as error:
                script = self.out / "build_engine.sh"
                atomic_write_text(script, "#!/bin/sh\n# Build the TensorRT engine on a machine with TensorRT and an NVIDIA GPU\n"
                                          f"# (or, with vitdeploy there: vitdeploy build {shlex.quote(onnx_path.name)} "
                                          f"-o {shlex.quote(engine_path.name)}, which also writes the manifest)\n"
                                          "# Profiles span the range the export validated: "
                                          f"{'; '.join(p.describe() for p in plan.profiles)}\n"
                                          'cd "$(dirname "$0")"\n'
                                          f"{command}\n")
                script.chmod(0o755)
                reason = " ".join(str(error).split())
                stage.status, stage.detail = "skipped", f"no TensorRT/GPU here; wrote {script.name} (trtexec command)"
                self.tensorrt.update(reason=reason, script=str(script))
                artifact = Artifact(script, "trtexec-command", "fp16", None, None,
                                    [f"engine not built here: {reason}", command])
                self.artifacts.append(artifact)
                return None
            try:
                manifest = tensorrt_build.run_build(plan, show_progress=False, log=progress)
            except Exception as error:  # a build failure is reported; the rest of the pipeline goes on
                stage.status, stage.detail = "failed", error_line(error)
                self.tensorrt["reason"] = stage.detail
                return None
            self.tensorrt.update(built=True, tensorrt_version=manifest.tensorrt_version,
                                 gpu=manifest.gpu.name, build_seconds=manifest.build_seconds)
            stage.detail = f"{engine_path.name} built in {manifest.build_seconds:.0f}s"
            artifact = Artifact(engine_path, "engine", "fp16", notes=[f"TensorRT {manifest.tensorrt_version} on {manifest.gpu.name}"])
            self.artifacts.append(artifact)
            return artifact

    def verify_engine(self, artifact: Artifact) -> None:
        from vitdeploy.metadata import ShapeRange
        from vitdeploy.parity import InputFactory, verify
        from vitdeploy.runtimes.tensorrt import TensorRTRuntime
        from vitdeploy.runtimes.torch import eager_references

        with self.stage("verify engine") as stage:
            runtime = TensorRTRuntime(artifact.path)
            try:
                metadata = runtime.metadata
                spec = runtime.input_spec
                native = int(self.resolved.model.config.image_size)
                size = min(max(native, spec.height[0]), spec.height[1])
                shapes = [(b, size, size) for b in sorted({spec.batch[0], min(4, spec.batch[1])})]
                bounds = ShapeRange(batch=(1, max(b for b, _, _ in shapes)), height=(size, size), width=(size, size))
                references = eager_references(self.resolved.model, "fp16", metadata.fp32_ops if metadata else
                                              DEFAULT_FP32_OPS, shape_range=bounds, device="cuda")
                preprocessing = metadata.preprocessing if metadata else None
                report = verify(runtime, references, shapes, InputFactory(preprocessing),
                                candidate_name=f"{artifact.path.name} (TensorRT)")
            finally:
                runtime.close()
            print(report.format_table())
            artifact.parity, artifact.passed = report.summary(), report.passed
            stage.status = "ok" if report.passed else "failed"
            stage.detail = "parity passed" if report.passed else f"{len(report.failures)} parity violation(s)"

    def benchmark(self, onnx: dict[str, Path], engine: Path | None) -> None:
        from vitdeploy.benchmarks.harness import BenchPlan, Display, Harness
        from vitdeploy.benchmarks.models import BenchModel
        from vitdeploy.benchmarks.report import terminal_table, write_outputs
        from vitdeploy.benchmarks.specs import parse_runtimes
        from vitdeploy.benchmarks.timing import TimingConfig

        with self.stage("benchmark") as stage:
            device = "cuda" if _cuda_available() else "cpu"
            labels = ["torch-eager-fp32"]
            if device == "cuda":
                labels += ["torch-eager-fp16"] + [f"ort-cuda-{p}" for p in ("fp16",) if p in onnx]
                labels += ["tensorrt-fp16"] if engine is not None else []
            else:
                labels += [f"ort-cpu-{p}" for p in ("fp32", "fp16", "int8") if p in onnx]
                if _openvino_available():
                    from vitdeploy.cpu_features import has_bf16

                    labels += [f"openvino-cpu-{p}" for p in ("fp32", "int8") if p in onnx]
                    labels += ["openvino-cpu-bf16"] if "fp32" in onnx and has_bf16() else []
            points = len(labels) * len(self.options.bench_batches)
            budget = self.options.point_budget_s or DEFAULT_POINT_BUDGET_S[device]
            if self.options.bench_budget_s is not None:
                budget = self.options.bench_budget_s / points
            source = str(self.options.source)
            model = BenchModel.from_model(
                self.name, source, self.resolved.model, self.out / "bench" / "artifacts",
                bool(self.resolved.random_weights), onnx=onnx, engines={"fp16": engine} if engine else None,
            )
            plan = BenchPlan(
                models=[source], runtimes=parse_runtimes(labels, device), batches=list(self.options.bench_batches),
                timing=TimingConfig(warmup=2 if device == "cpu" else 10, time_budget_s=budget, min_iterations=3),
                cache_dir=self.out / "bench" / "artifacts", threads=self.options.threads, peaks=self.options.peaks,
                command=self.command, suite="deploy",
            )
            document = Harness(plan, Display(), prepared={source: model}).run()
            write_outputs(document, self.out / "bench", title=f"vitdeploy deploy — benchmark of {self.name}")
            print(terminal_table(document))
            self.bench = document
            ok = [r for r in document["records"] if r["status"] == "ok"]
            stage.detail = f"{len(ok)}/{len(document['records'])} points on {device}"
            if not ok:
                stage.status = "failed"

    def tune(self) -> None:
        from vitdeploy.tune import TunePlan, tune
        from vitdeploy.tune.report import terminal_table

        with self.stage("tune") as stage:
            plan = TunePlan(folder=self.out, batches=self.options.bench_batches, rounds=self.options.tune_rounds,
                            iterations=5, warmup=1, threads=self.options.threads, calibration=self.options.calibration,
                            throughput_rounds=1, throughput_calls=1,
                            # --no-int8: no int8 files here, and tune makes none either.
                            only=None if self.options.int8 else ("ort-fp32", "openvino-fp32", "openvino-bf16"),
                            command=f"vitdeploy tune {shlex.quote(str(self.out))} --rounds {self.options.tune_rounds} "
                                    f"--batch {','.join(map(str, self.options.bench_batches))}")
            try:
                self.tuned = tune(plan, reference_model=self.resolved.model, log=self.log)
            except Exception as error:  # tune failing leaves the exports and the rest of the report standing
                stage.status, stage.detail = "failed", error_line(error)
                return
            print(terminal_table(self.tuned.manifest))
            chosen = self.tuned.manifest.chosen
            stage.detail = f"chose {chosen.name}" if chosen else "no candidate passed the accuracy gate"
            if chosen is None:
                stage.status = "failed"

    # -- everything -------------------------------------------------------------------------

    def run(self) -> DeployResult:
        options = self.options
        started = time.perf_counter()
        self.load()
        config = self.resolved.model.config
        stride = config.stride
        if options.resolution is not None and any(v % stride for v in options.resolution):
            raise ValueError(f"resolution range {options.resolution[0]}:{options.resolution[1]} must be multiples "
                             f"of the model's patch stride {stride}")
        if options.outputs is not None:
            from vitdeploy.outputs import check_outputs

            check_outputs(options.outputs, config)  # before OUT/ is made: the model cannot give what was asked
        self.out.mkdir(parents=True, exist_ok=True)
        self.plan = self.artifact_plan()
        onnx: dict[str, Path] = {}
        for precision in ("fp32", "fp16", "int8"):
            if precision not in self.plan.graphs:
                self.skip(f"export {precision}", "--no-int8")
                continue
            artifact = self.export(precision)
            if artifact is not None:
                onnx[precision] = artifact.path
        engine = None
        if "fp16" in onnx:
            ok = self.preflight_check(onnx["fp16"])
            built = self.build(onnx["fp16"], ok)
            if built is not None:
                self.verify_engine(built)
                engine = built.path
        if not options.bench:
            self.skip("benchmark", "--no-bench")
        elif not onnx:
            self.skip("benchmark", "no graph to time (every export failed)")
        else:
            self.benchmark(onnx, engine)
        if not options.tune:
            self.skip("tune", "--no-tune")
        elif "fp32" not in onnx:
            self.skip("tune", "no fp32 graph to tune from (its export failed)")
        elif _cuda_available():
            self.skip("tune", "a GPU is here: tune chooses among CPU paths, and the GPU path is the TensorRT engine")
        else:
            self.tune()
        self.seconds = time.perf_counter() - started
        report = self.write_report()
        failed = [a for a in self.artifacts if a.passed is False]
        return DeployResult(report, self.out / "report.md", 1 if failed else 0)

    # -- report -----------------------------------------------------------------------------

    def report_dict(self) -> dict[str, Any]:
        from vitdeploy.benchmarks.environment import capture_environment
        from vitdeploy.benchmarks.report import busy_note, evaluate_targets

        resolved = self.resolved
        bench = None
        if self.bench is not None:
            rows = []
            for r in self.bench["records"]:
                lat = r["latency_ms"] or {}
                rows.append({"runtime": r["runtime"], "batch": r["batch"], "height": r["height"], "width": r["width"],
                             "status": r["status"], "reason": r["reason"], "p50_ms": lat.get("p50"),
                             "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"), "throughput_ips": r["throughput_ips"],
                             "speedup_vs_baseline": r["speedup_vs_baseline"], "peak_fraction": r["peak_fraction"],
                             "other_cpu_load": r.get("other_cpu_load")})
            bench = {"results": "bench/results.json", "report": "bench/report.md", "baseline": self.bench["baseline"],
                     "points": rows, "targets": evaluate_targets(self.bench), "busy": busy_note(self.bench),
                     "plots": sorted(p.name for p in (self.out / "bench").glob("*.png")),
                     "measured": {"started": self.bench["environment"].get("timestamp"),
                                  "seconds": self.bench.get("duration_s"), "timing": self.bench.get("timing")}}
            if self.tuned is not None:
                bench["same_graph"] = same_graph_figures(self.bench, self.tuned.manifest)
        return {
            "kind": "vitdeploy-deploy",
            "version": 1,
            "command": self.command,
            "source": {"source": str(resolved.source), "format": resolved.format, "sha256": resolved.sha256,
                       "random_weights": bool(resolved.random_weights), "model": resolved.model.config.provenance.name},
            "seconds": round(self.seconds, 1),
            "stages": [s.to_dict() for s in self.stages],
            "artifacts": [a.to_dict(self.out) for a in self.artifacts],
            "artifact_set": self.plan.record() if self.plan is not None else None,  # graphs, names, int8 policy
            "tensorrt_preflight": self.preflight,
            "tensorrt": self.tensorrt,
            "benchmark": bench,
            "tune": None if self.tuned is None else {
                "manifest": self.tuned.manifest_path.name, "report": self.tuned.report_path.name,
                "plot": self.tuned.plot_path.name if self.tuned.plot_path else None,
                "document": self.tuned.manifest.to_dict()},
            "environment": self.bench["environment"] if self.bench else capture_environment(self.command),
        }

    def write_report(self) -> dict[str, Any]:
        data = self.report_dict()
        atomic_write_json(self.out / "report.json", data)
        atomic_write_text(self.out / "report.md", render_markdown(data))
        self.log(f"wrote {self.out / 'report.md'} and {self.out / 'report.json'}")
        return data


def _artifact_key(path: str | None) -> str | None:
    """A graph file's name with the onnxruntime-CPU variant's ``.cpu`` dropped (the variant runs the same graph)."""
    return None if not path else Path(path).name.replace(".cpu.onnx", ".onnx")


def same_graph_figures(bench: dict[str, Any], manifest: Any) -> list[dict[str, Any]]:
    """Each graph that both the benchmark and tune timed (same backend, file and precision, same batch): both
    p50s and their ratio, so the report can put the two measurements side by side and say why they differ."""
    candidates = {c.name: c for c in manifest.candidates}
    pairs = []
    for record in bench["records"]:
        candidate = candidates.get(BENCH_TO_TUNE.get(record["runtime"], ""))
        if record["status"] != "ok" or candidate is None or not record.get("latency_ms"):
            continue
        tune_ms = candidate.latency_ms.get(str(record["batch"]))
        if tune_ms is None or _artifact_key(record.get("artifact")) != _artifact_key(candidate.artifact):
            continue
        bench_ms = record["latency_ms"]["p50"]
        pairs.append({"bench_runtime": record["runtime"], "tune_candidate": candidate.name,
                      "description": candidate.description, "graph": Path(record["artifact"]).name,
                      "batch": record["batch"], "size": f"{record['height']}x{record['width']}", "bench_p50_ms": bench_ms,
                      "tune_p50_ms": tune_ms, "ratio": bench_ms / tune_ms,
                      "bench_other_cpus": record.get("other_cpu_load")})
    return pairs


def _same_graph_lines(data: dict[str, Any], manifest: Any) -> list[str]:
    """Why one graph has two figures in this report: two measurements, made differently and at different times."""
    pairs = (data.get("benchmark") or {}).get("same_graph") or []
    if not pairs:
        return []
    measured = data["benchmark"].get("measured") or {}
    tune_load = (manifest.load or {}).get("other_processes_cpus")
    lines = ["### One graph, two figures", "",
             "These graphs were timed twice, by two separate measurements, so their numbers differ:", ""]
    for pair in pairs:
        lines.append(f"- {pair['description']} (`{pair['graph']}`), batch {pair['batch']}, {pair['size']}: p50 "
                     f"{pair['bench_p50_ms']:.3f} ms in the benchmark (`{pair['bench_runtime']}`), "
                     f"{pair['tune_p50_ms']:.3f} ms in tune (`{pair['tune_candidate']}`); benchmark/tune "
                     f"{pair['ratio']:.2f}x")
    bench_busy = max((p["bench_other_cpus"] or 0.0 for p in pairs), default=0.0)
    lines += ["", f"The benchmark (started {measured.get('started') or '?'}) times each runtime alone, one after "
              f"another, for its time budget; tune (recorded {manifest.created or '?'}, after the benchmark) "
              f"alternates the candidates in {manifest.rounds} short interleaved round(s) and reports the median of "
              "the rounds' p50s. Other processes used up to "
              f"{bench_busy:.2f} CPUs during those benchmark points and "
              + (f"{tune_load:.2f}" if tune_load is not None else "an unrecorded share of")
              + " CPUs during tune; caches, clocks and thread placement also differ between the runs. Compare "
              "runtimes within one table, not across the tables; tune's choice rests on its own interleaved figures.",
              ""]
    return lines


def _parity_text(artifact: dict[str, Any], random_weights: bool = False) -> str:
    """The parity cell of an artifact's row; with random weights a top-1 below 1 gets the reason it means little."""
    parity = artifact.get("parity")
    if not parity:
        return "-"
    parts = []
    tie = False
    for reference, worst in parity.get("references", {}).items():
        bits = [f"rel-max {worst['rel_max_error']:.2e}", f"cosine {worst['min_cosine']:.6f}"]
        if "min_top1_agreement" in worst:
            bits.append(f"top-1 {worst['min_top1_agreement']:.3f}")
            tie = tie or worst["min_top1_agreement"] < 1.0
        parts.append(f"vs {reference}: " + ", ".join(bits))
    verdict = "passed" if parity.get("passed") else "**FAILED**"
    text = f"{verdict} ({'; '.join(parts)})"
    if random_weights and tie:
        text += ("; random weights leave the top classes near a tie, so top-1 agreement says little here "
                 "(cosine and rel-max are the measure)")
    return text


def _outputs_text(outputs: list[dict[str, Any]] | None) -> str:
    """``pooler_output [batch, 384], patch_tokens [batch, patches, 384]`` (``-`` for no graph)."""
    if not outputs:
        return "-"
    return ", ".join(f"`{o['name']}` [{', '.join(str(d) for d in o['shape'])}]" for o in outputs)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(data: dict[str, Any]) -> str:
    """The deploy report: what was produced, parity, pre-flight, TensorRT, speed, stages, environment."""
    source = data["source"]
    lines = [f"# vitdeploy deploy — {source['model']}", "", "Command:", "", "```", data["command"], "```", ""]
    origin = f"`{source['source']}` ({source['format']}"
    origin += ", **random weights**: parity and speed are meaningful, accuracy is not)" if source["random_weights"] else ")"
    lines += [f"Source: {origin}, sha256 `{source['sha256'][:16]}…`. Total time {data['seconds']:.0f} s.", ""]

    lines += ["## What was produced", "",
              "| file | kind | precision | outputs | size | parity | notes |", "|---|---|---|---|---|---|---|"]
    for artifact in data["artifacts"]:
        size = f"{artifact['bytes'] / 2**20:.1f} MiB" if artifact.get("bytes") else "-"
        notes = "; ".join(n for n in artifact["notes"] if n and not n.startswith("trtexec"))
        lines.append(f"| `{artifact['path']}` | {artifact['kind']} | {artifact['precision']} | "
                     f"{_outputs_text(artifact.get('outputs'))} | {size} | "
                     f"{_parity_text(artifact, source['random_weights'])} | {notes.replace('|', '/')} |")
    lines.append("")

    trt = data["tensorrt"]
    lines += ["## TensorRT", ""]
    preflight = data.get("tensorrt_preflight")
    if preflight:
        lines.append(f"Pre-flight of the fp16 graph: {'**ok**' if preflight['ok'] else '**errors**'} "
                     f"({preflight['errors']} error(s), {preflight['warnings']} warning(s)).")
        findings = [f for f in preflight["findings"]]
        lines += [f"- {f['severity']}: {f.get('op') or ''} {f.get('message', '')}".rstrip() for f in findings[:20]]
        lines.append("")
    if trt.get("built"):
        lines.append(f"Engine built with TensorRT {trt.get('tensorrt_version')} on {trt.get('gpu')} "
                     f"in {trt.get('build_seconds', 0):.0f} s; profiles: {'; '.join(trt.get('profiles', []))}.")
    elif trt.get("trtexec"):
        lines.append(f"Engine **not built here**: {trt.get('reason', 'see the stages')}. "
                     "Build it on a machine with TensorRT and an NVIDIA GPU with `build_engine.sh`:")
        lines += ["", "```", trt["trtexec"], "```"]
    lines.append("")

    bench = data.get("benchmark")
    if bench:
        measured = bench.get("measured") or {}
        timing = measured.get("timing") or {}
        how = (f"Measured by the benchmark stage (started {measured.get('started') or '?'}): each runtime on its own, "
               f"one after another, {timing.get('warmup', '?')} warm-up call(s) then calls for "
               f"{_fmt(timing.get('time_budget_s'), 'g')} s per point; p50/p90/p99 of those calls. ")
        lines += ["## Speed on this machine", "",
                  how + f"Latency per call (ms) and images/s; speedup against {bench['baseline']} (p50). "
                  f"Full results: `{bench['report']}`, `{bench['results']}`.", "",
                  "| runtime | batch | size | p50 ms | p90 ms | p99 ms | img/s | speedup | % peak |", "|---|---|---|---|---|---|---|---|---|"]
        for row in bench["points"]:
            if row["status"] != "ok":
                lines.append(f"| {row['runtime']} | {row['batch']} | {row['height']}x{row['width']} | "
                             f"{row['status']}: {row['reason']} | | | | | |")
                continue
            peak = None if row["peak_fraction"] is None else 100 * row["peak_fraction"]
            lines.append(f"| {row['runtime']} | {row['batch']} | {row['height']}x{row['width']} | {row['p50_ms']:.3f} | "
                         f"{row['p90_ms']:.3f} | {row['p99_ms']:.3f} | {row['throughput_ips']:.1f} | "
                         f"{_fmt(row['speedup_vs_baseline'], '.2f')}x | {_fmt(peak, '.1f')} |")
        lines.append("")
        if bench.get("busy"):
            lines += [f"**Note:** {bench['busy']}.", ""]
        lines += [f"![{name}](bench/{name})" for name in bench["plots"]] + [""]

    tuned = data.get("tune")
    if tuned:
        from vitdeploy.tune.report import section_lines
        from vitdeploy.tune_manifest import TuneManifest

        manifest = TuneManifest.from_dict(tuned["document"])
        lines += ["## Fastest accurate CPU path (tune)", "",
                  f"Measured by the tune stage (recorded {manifest.created or '?'}, after the benchmark, in a separate "
                  f"run): every CPU candidate timed side by side ({manifest.rounds} interleaved rounds, the median of "
                  f"the rounds' p50s; `--rounds` of `vitdeploy tune` for more), accuracy on {manifest.gate['accuracy_on']} against "
                  f"{manifest.reference}, gate: {manifest.gate['rule']}. The choice is recorded in "
                  f"`{tuned['manifest']}`: `vitdeploy predict OUT IMAGE` and "
                  "`vitdeploy.runtimes.load(OUT)` run it. CPU flags: "
                  f"{', '.join(manifest.cpu['flags']) or 'none'}.", ""]
        lines += section_lines(manifest)
        lines += [""] + ([f"![latency vs accuracy]({tuned['plot']})", ""] if tuned.get("plot") else [])
        lines += _same_graph_lines(data, manifest)

    lines += ["## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['detail'].replace('|', '/')} |" for s in data["stages"]]
    env = data["environment"]
    gpu = env.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines += ["", "## Environment", "",
              f"- CPU: {env['cpu']['model']} ({env['cpu']['usable_cpus']} usable CPUs); "
              f"load average at start {env.get('load_average_start')}",
              f"- GPU: {'none' if not gpu else gpu['name'] + ' (driver ' + str(gpu.get('driver')) + ', CUDA ' + str(gpu.get('cuda_runtime')) + ')'}",
              f"- {versions}", ""]
    return "\n".join(lines)


def _openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
