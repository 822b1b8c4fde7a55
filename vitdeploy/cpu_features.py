"""The CPU this runs on: its model, usable CPUs and what it computes fast, read from ``/proc/cpuinfo``
flags (never assumed). The one home of the machine description that ``bench``, ``tune`` and the
runtimes record and check.

OpenVINO runs an fp32 graph in bf16 when asked only where the CPU has bf16 instructions, and
int8 matmuls are several times faster with VNNI/AMX dot products; benchmarks record both. On a
system without ``/proc/cpuinfo`` (not Linux) no flag is known and every check says no.
"""

from __future__ import annotations

import functools
import os
import platform

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Flags that decide what a CPU computes natively (recorded with every benchmark and tune manifest).
ARITHMETIC_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8",
                    "amx_fp16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX-512 BF16 or AMX-BF16)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def int8_dot_flags() -> list[str]:
    """The int8 dot-product instruction sets the CPU has (VNNI, AMX), e.g. ``["avx512_vnni"]``."""
    return [flag for flag in INT8_DOT_FLAGS if flag in cpu_flags()]


def arithmetic_flags() -> list[str]:
    """The :data:`ARITHMETIC_FLAGS` this CPU has, sorted."""
    return sorted(set(ARITHMETIC_FLAGS) & cpu_flags())


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
