"""Peak memory of one benchmark point: host RSS (Linux ``VmHWM``) and CUDA device memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process; ``False`` where that is not possible.

    Linux resets ``VmHWM`` when ``5`` is written to ``/proc/self/clear_refs`` (kernel >= 4.0).
    Without it the reported peak is the process's lifetime peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class DeviceMemory:
    """Peak CUDA memory of one point.

    torch's caching allocator knows its own peak exactly (``max_memory_allocated``, reset per
    point, so it covers the weights plus that point's activations). onnxruntime and TensorRT
    allocate outside it, so the device-wide used memory (``cudaMemGetInfo``) is sampled and
    its increase over the level before the runtime was loaded (:meth:`start_runtime`) is
    recorded too; arena allocators keep what they grew to, so that is the peak so far.
    ``peak_bytes`` is the larger of the two.
    """

    def __init__(self, device: int = 0) -> None:
        import torch

        self._torch = torch
        self.device = device
        self._baseline = self._used()
        self._peak_used = self._baseline

    def _used(self) -> int:
        free, total = self._torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def start_runtime(self) -> None:
        """Call before loading a runtime: its weights and workspaces count from here."""
        self._torch.cuda.synchronize(self.device)
        self._baseline = self._used()
        self._peak_used = self._baseline

    def start_point(self) -> None:
        """Call before each point's warm-up."""
        self._torch.cuda.synchronize(self.device)
        self._torch.cuda.reset_peak_memory_stats(self.device)
        self._peak_used = self._used()

    def sample(self) -> None:
        self._peak_used = max(self._peak_used, self._used())

    def result(self) -> dict[str, Any]:
        self._torch.cuda.synchronize(self.device)
        self.sample()
        torch_peak = int(self._torch.cuda.max_memory_allocated(self.device))
        delta = max(self._peak_used - self._baseline, 0)
        return {"torch_allocator_peak_bytes": torch_peak, "device_used_increase_bytes": delta,
                "peak_bytes": max(torch_peak, delta)}
