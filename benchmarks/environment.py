"""What a benchmark ran on: CPU, GPU, library versions, load, and the exact command."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata as _metadata
from typing import Any

_PACKAGES = ("vitdeploy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx", "numpy", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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


def package_versions(names: tuple[str, ...] = _PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``None`` where not installed), without importing them."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = None
    if versions.get("tensorrt") is None:
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
        },
        "load_average_start": load_average(),
        "gpu": gpu_info(),
        "versions": package_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
    }
