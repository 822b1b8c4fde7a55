"""Which Triton Inference Server release can load a TensorRT engine (data in ``triton_releases.json``).

A ``tensorrt_plan`` model loads only in a Triton whose TensorRT matches the one that built the
engine (server issues #3710, #7613). The table beside this module lists container releases and
the TensorRT each ships, with the source of every row; matching uses the same rule as the
TensorRT runtime (:func:`vitdeploy.engine_manifest.check_compatibility`), so a
version-compatible engine also matches newer releases of its major version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vitdeploy.engine_manifest import EngineManifest, Environment, check_compatibility, parse_version

TABLE = Path(__file__).resolve().parent / "triton_releases.json"
SUPPORT_MATRIX = "https://docs.nvidia.com/deeplearning/frameworks/support-matrix/index.html"


@dataclass(frozen=True)
class TritonRelease:
    """One Triton container and the TensorRT version inside it."""

    release: str
    container: str
    tensorrt: str
    source: str


@cache
def known_releases() -> tuple[TritonRelease, ...]:
    """Every row of the table, newest release first."""
    rows = json.loads(TABLE.read_text(encoding="utf-8"))["releases"]
    releases = [TritonRelease(**row) for row in rows]
    return tuple(sorted(releases, key=lambda r: (parse_version(r.release), r.container), reverse=True))


def matching_releases(manifest: EngineManifest) -> list[TritonRelease]:
    """The known releases whose TensorRT can deserialize ``manifest``'s engine, newest first."""
    matches = []
    for release in known_releases():
        environment = Environment(tensorrt_version=release.tensorrt, gpu=manifest.gpu)
        if not check_compatibility(manifest, environment):
            matches.append(release)
    return matches


def release_advice(manifest: EngineManifest) -> tuple[list[TritonRelease], str]:
    """The matching releases and one sentence for the user (a warning when none is known)."""
    matches = matching_releases(manifest)
    built = manifest.tensorrt_version
    if not matches:
        return matches, (
            f"no Triton release in vitdeploy's table ships TensorRT {built}, which built this engine; "
            f"look up the container with TensorRT {built} in NVIDIA's Frameworks Support Matrix ({SUPPORT_MATRIX}) "
            "or rebuild the engine inside the Triton container you will serve it with"
        )
    names = ", ".join(f"{r.container} (TensorRT {r.tensorrt})" for r in matches[:3])
    more = f" and {len(matches) - 3} more" if len(matches) > 3 else ""
    return matches, f"engine built with TensorRT {built} loads in {names}{more}"
