"""What a benchmark ran on: CPU, GPU, library versions, load, and the exact command."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata as _metadata
from typing import Any

from vitdeploy.cpu_features import arithmetic_flags, cpu_model, usable_cpus

_PACKAGES = ("vitdeploy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx", "numpy", "matplotlib")


def host_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (others using the CPUs while we measure)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class OtherCpuLoad:
    """CPUs used by *other* processes between :meth:`start` and :meth:`stop` (Linux ``/proc/stat``).

    Machine-wide busy time minus this process's own CPU time, divided by the wall time: 0 on a
    quiet machine, 1.0 when another process kept one core busy throughout. The load average
    counts the benchmark itself, so it cannot tell that apart.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, float] | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        steal_guest = sum(fields[7:]) if len(fields) > 7 else 0  # steal, guest: not ours or theirs here
        return (sum(fields) - idle - steal_guest) / os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        busy = self._busy_seconds()
        self._start = None if busy is None else (busy, time.process_time(), time.perf_counter())

    def stop(self) -> float | None:
        if self._start is None:
            return None
        busy = self._busy_seconds()
        if busy is None:
            return None
        busy0, own0, wall0 = self._start
        wall = time.perf_counter() - wall0
        if wall <= 0.05:  # /proc/stat ticks at 100 Hz: too short to say
            return None
        others = (busy - busy0) - (time.process_time() - own0)
        return round(max(others, 0.0) / wall, 2)



@dataclass
class MachineLoad:
    """How busy the machine was around a measurement: load averages before and after, and the CPUs
    other processes used meanwhile (:class:`OtherCpuLoad`); filled in by :func:`recording_load`."""

    before: list[float] | None = None
    after: list[float] | None = None
    other_cpus: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report fields ``load_average`` and ``other_processes_cpus``."""
        return {"load_average": {"before": self.before, "after": self.after}, "other_processes_cpus": self.other_cpus}

    def describe(self) -> str:
        return f"load {self.before} -> {self.after}, other processes {self.other_cpus} CPUs"


@contextmanager
def recording_load() -> Iterator[MachineLoad]:
    """Record :class:`MachineLoad` around the block it wraps (the timed part of a side-by-side run)."""
    load = MachineLoad(before=load_average())
    others = OtherCpuLoad()
    others.start()
    try:
        yield load
    finally:
        load.other_cpus = others.stop()
        load.after = load_average()

def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``None`` where not installed), without importing them."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = None
    if "tensorrt" in versions and versions["tensorrt"] is None:
        # TensorRT's wheel may be installed as tensorrt-cuXX; the module knows its version.
        versions["tensorrt"] = _module_version("tensorrt")
    return versions


def _module_version(module: str) -> str | None:
    if module not in sys.modules:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return None
    try:
        imported = __import__(module)
    except Exception:  # a broken install (e.g. TensorRT stub wheel) reports as absent
        return None
    return str(getattr(imported, "__version__", "unknown"))


def _nvidia_smi() -> list[dict[str, str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            rows.append({"name": parts[0], "driver": parts[1], "memory": parts[2], "max_sm_clock": parts[3]})
    return rows


def gpu_info() -> dict[str, Any] | None:
    """The first CUDA device as torch sees it, plus the driver from ``nvidia-smi``; ``None`` without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    smi = _nvidia_smi()
    info: dict[str, Any] = {
        "name": props.name,
        "count": torch.cuda.device_count(),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": smi[index]["driver"] if index < len(smi) else None,
        "max_sm_clock": smi[index]["max_sm_clock"] if index < len(smi) else None,
    }
    return info


def onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return list(onnxruntime.get_available_providers())


def capture_environment(command: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Everything needed to interpret (and repeat) a benchmark, as a JSON-ready dict."""
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": usable_cpus(),
            "threads": threads,
            "memory_gib": host_memory_gib(),
            "arithmetic_flags": arithmetic_flags(),
        },
        "load_average_start": load_average(),
        "gpu": gpu_info(),
        "versions": package_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
    }
