"""Artifacts for the serving tests: the tiny ViT exported once, with labels and its CPU variant.

The portable graph comes from the real exporter (``trt_artifacts.tiny_onnx``, exporter validation
skipped: the exporter's own tests cover it, and a validated export costs most of a minute on 2
cores). The onnxruntime-CPU variant is then written beside it the way ``export_onnx`` does
(``ort_fusion.cpu_variant`` + the sha256 in the portable file's ``variants``), so the python-backend
model ships and runs it exactly as it would a validated export. Serving tests compare the server's
answers with the direct runtime on these same files.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import onnx

LABELS = [f"class_{index}" for index in range(10)]
REPO_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def tiny_served_onnx() -> Path:
    """``tiny.onnx`` (labels in its metadata) and ``tiny.cpu.onnx`` in a fresh folder; built once per session."""
    from conftest import session_folder
    from trt_artifacts import tiny_onnx

    from vitdeploy.exporters.graph import set_metadata
    from vitdeploy.exporters.ort_fusion import cpu_variant
    from vitdeploy.metadata import CPU_VARIANT, read_onnx_metadata

    folder = session_folder("serving")
    target = folder / "tiny.onnx"
    shutil.copy(tiny_onnx(), target)
    metadata = read_onnx_metadata(target)
    metadata.labels = list(LABELS)
    proto = onnx.load(str(target))
    fused, fused_metadata = cpu_variant(proto, metadata)
    set_metadata(fused, fused_metadata.to_props())
    variant_bytes = fused.SerializeToString()
    (folder / "tiny.cpu.onnx").write_bytes(variant_bytes)
    metadata.variants = {CPU_VARIANT: {"file": "tiny.cpu.onnx", "sha256": hashlib.sha256(variant_bytes).hexdigest()}}
    set_metadata(proto, metadata.to_props())
    target.write_bytes(proto.SerializeToString())
    return target


# The torch-free serve venv: `pip install '.[cpu,serve]'` (not editable) into a venv of Debian's python3.11, whose
# libpython the bundled Triton's Python-backend stub links. $VITDEPLOY_SERVE_PYTHON names one; otherwise the tests
# build it once under ~/.cache/vitdeploy (about a minute), keyed by pyproject.toml's hash and the checkout (so two
# checkouts never reinstall each other's vitdeploy), and reinstall only vitdeploy itself (seconds) when its
# files change.
SERVE_PYTHON_ENV = "VITDEPLOY_SERVE_PYTHON"
DEBIAN_PYTHON = Path("/usr/bin/python3.11")
SERVE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitdeploy"
PACKAGE_FOLDERS = ("vitdeploy", "runtimes", "exporters", "benchmarks")  # pyproject's package-dir


def _our_pip() -> list[str] | None:
    """This interpreter's pip, when it can install into another Python (pip >= 22.3's ``--python``)."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return [sys.executable, "-m", "pip"] if (major, minor) >= (22, 3) else None


OUR_PIP = _our_pip()


def serve_venv_missing() -> str | None:
    """Why this machine cannot have the serve venv, as a hint that works; ``None`` when it can."""
    configured = os.environ.get(SERVE_PYTHON_ENV)
    if configured:
        return None if Path(configured).is_file() else (
            f"{SERVE_PYTHON_ENV}={configured} is not a file: unset it (the tests then build the serve venv) or point "
            "it at the python of a venv with '.[cpu,serve]' installed")
    if not DEBIAN_PYTHON.is_file():
        return (f"no {DEBIAN_PYTHON} (the Triton Python-backend stub links Debian's libpython3.11): apt-get install "
                "python3.11 python3.11-venv, and the tests build the serve venv themselves")
    return None


SERVE_VENV_REASON = serve_venv_missing() or ""


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _package_files() -> list[Path]:
    results = REPO_ROOT / "benchmarks" / "results"
    return sorted(path for folder in PACKAGE_FOLDERS for path in (REPO_ROOT / folder).rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and results not in path.parents)


def _pip(venv: Path, *args: str) -> None:
    """``pip install ARGS`` into ``venv`` from the checkout; the ``build/`` folder setuptools leaves in the
    checkout goes again unless it was there before."""
    had_build = (REPO_ROOT / "build").exists()
    try:
        _run_pip(venv, *args)
    finally:
        if not had_build:
            shutil.rmtree(REPO_ROOT / "build", ignore_errors=True)


def _run_pip(venv: Path, *args: str) -> None:
    # --no-compile: Python compiles what the tests import when they import it, not all 450 MB (pip takes a quarter less)
    python = venv / "bin" / "python"
    own = (venv / "bin" / "pip").exists() or OUR_PIP is None
    pip = [str(python), "-m", "pip"] if own else [*OUR_PIP, "--python", str(python)]
    done = subprocess.run([*pip, "install", "-q", "--no-compile", "--disable-pip-version-check", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode:
        raise RuntimeError(f"building the serve venv {venv} failed: pip install {' '.join(args)}:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-4000:]}")


def _remove_stale_venvs(current: Path) -> None:
    """Remove the serve venvs (about 500 MB each) of this checkout's earlier pyproject.toml versions and of
    checkouts that are gone, unless a session is building one."""
    for other in SERVE_CACHE.glob("serve-venv-py311-*"):
        if other == current or not other.is_dir():
            continue
        checkout = other / ".vitdeploy-checkout"
        owner = Path(checkout.read_text()) if checkout.is_file() else None
        if owner is not None and owner != REPO_ROOT and (owner / "pyproject.toml").is_file():
            continue  # another checkout's, still there
        lock_path = other.with_name(f"{other.name}.lock")
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(other, ignore_errors=True)
        lock_path.unlink(missing_ok=True)


@functools.cache
def serve_python() -> Path:
    """The serve venv's Python: ``$VITDEPLOY_SERVE_PYTHON``, or this checkout's cached venv (built, or brought
    up to date with vitdeploy's files, here; a lock keeps two test workers from building it at once)."""
    configured = os.environ.get(SERVE_PYTHON_ENV)
    if configured:
        return Path(configured)
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:8]
    venv = SERVE_CACHE / f"serve-venv-py311-{_digest([REPO_ROOT / 'pyproject.toml'])[:16]}-{checkout}"
    SERVE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(SERVE_CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete, stamp = venv / ".vitdeploy-complete", venv / ".vitdeploy-sources"
        sources = _digest(_package_files())
        if not complete.is_file():
            shutil.rmtree(venv, ignore_errors=True)
            # Without a pip of its own when the suite's pip can install into it (ensurepip takes about 4 s).
            without_pip = ["--without-pip"] if OUR_PIP else []
            subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", *without_pip, str(venv)], check=True,
                           capture_output=True, timeout=300)
            _pip(venv, ".[cpu,serve]")
            (venv / ".vitdeploy-checkout").write_text(str(REPO_ROOT))
            complete.write_text("built from pyproject.toml by tests/serving_artifacts.py\n")
            _remove_stale_venvs(venv)
        elif not (stamp.is_file() and stamp.read_text() == sources):  # vitdeploy's own files changed
            _pip(venv, "--no-deps", "--force-reinstall", ".")
        stamp.write_text(sources)
    return venv / "bin" / "python"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
            ports.append(probe.getsockname()[1])
    finally:
        for probe in sockets:
            probe.close()
    return ports
