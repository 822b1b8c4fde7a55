"""Run Triton Inference Server on a model repository: find the binary, start it, wait, stop it.

``tritonserver`` is taken from ``PATH`` (NVIDIA's containers) or else from the
``nvidia-pytriton`` wheel, which bundles the server with only the Python backend. The bare
bundled binary needs the wheel's libraries on ``LD_LIBRARY_PATH``, a backend folder holding
the Python backend with the stub built for this Python's minor version, and this
interpreter's ``bin`` first on ``PATH`` so that the stub's embedded Python finds this venv's
packages (vitdeploy, onnxruntime). The stub links the system ``libpython3.X``; it must be the
library of the Python running this venv (a pyenv build of the same minor version fails in the
stub with ``_recursion_count``), which :func:`check_stub` verifies before starting.

The server runs in its own process group and gets SIGTERM if this process dies
(``PR_SET_PDEATHSIG``), so stopping it never leaves a stub process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Triton platform names -> the backend that serves them.
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
                     "tensorflow_graphdef": "tensorflow", "tensorflow_savedmodel": "tensorflow"}
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"
_PR_SET_PDEATHSIG = 1


class ServeError(ValueError):
    """The server cannot be started as asked (no tritonserver, a port in use, a bad repository)."""


class ModelLoadError(RuntimeError):
    """A model in the repository failed to load; the message is Triton's reason."""


@dataclass
class TritonInstall:
    """A ``tritonserver`` binary and what it needs to run."""

    binary: Path
    origin: str  # "PATH" or "nvidia-pytriton"
    backend_dir: Path | None = None  # None: the binary's own default (/opt/tritonserver/backends)
    library_dirs: list[Path] = field(default_factory=list)
    python_backend: Path | None = None  # the bundled python backend folder (nvidia-pytriton)
    stub: Path | None = None

    def backends(self) -> set[str] | None:
        """Names of the backends this install has (``None`` when its folder is unknown)."""
        folder = self.backend_dir
        if self.python_backend is not None:
            return {"python"}
        if folder is None or not folder.is_dir():
            return None
        return {entry.name for entry in folder.iterdir() if entry.is_dir()}


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> TritonInstall:
    """``binary``, else ``tritonserver`` on ``PATH``, else the one bundled with ``nvidia-pytriton``."""
    if binary is not None or shutil.which("tritonserver"):
        path = Path(binary) if binary is not None else Path(shutil.which("tritonserver") or "")
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ServeError(f"tritonserver {str(path)!r} is not an executable file")
        backends = path.resolve().parent.parent / "backends"
        return TritonInstall(path, "PATH", backends if backends.is_dir() else None)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("no tritonserver on PATH and nvidia-pytriton is not installed: "
                         "pip install 'vitdeploy[cpu,serve]' (or run inside NVIDIA's Triton container)")
    package = Path(next(iter(spec.submodule_search_locations)))
    bundle = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / STUB
    install = TritonInstall(bundle / "bin" / "tritonserver", "nvidia-pytriton", None,
                            [package.parent / "nvidia_pytriton.libs"], bundle / "backends" / "python", stub)
    missing = [str(p) for p in (install.binary, stub, *install.library_dirs) if not p.exists()]
    if missing:
        raise ServeError(f"the nvidia-pytriton install is incomplete (missing {missing}); it bundles Python "
                         f"backend stubs for some Python versions only, this is Python {version}")
    return install


def linked_libpython(stub: Path, library_dirs: list[Path]) -> Path | None:
    """The ``libpython`` the stub loads (from ``ldd``), or ``None`` when ``ldd`` cannot tell."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(str(d) for d in library_dirs))
    result = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env, check=False)
    for line in result.stdout.splitlines():
        name, _, target = line.strip().partition(" => ")
        if name.startswith("libpython"):
            target = target.split(" (")[0].strip()
            if target == "not found":
                raise ServeError(f"the Triton Python backend stub needs {name}, which is not installed "
                                 "(on Debian/Ubuntu: apt-get install libpython3-dev, or the libpython3.X package)")
            return Path(target)
    return None


def check_stub(install: TritonInstall) -> None:
    """Refuse a stub whose ``libpython`` belongs to another Python than this one (one clear line)."""
    if install.stub is None:
        return
    library = linked_libpython(install.stub, install.library_dirs)
    if library is None:
        return
    owner = Path(sys.base_prefix).resolve()
    if owner not in library.resolve().parents:
        raise ServeError(
            f"the Triton Python backend stub loads {library}, which is not the library of this Python "
            f"({sys.base_prefix}, {sys.version.split()[0]}); create the venv from the Python that owns it "
            f"(e.g. /usr/bin/python3.{sys.version_info.minor} -m venv .venv-serve) and install "
            "vitdeploy[cpu,serve] there"
        )


def repository_models(repository: Path) -> dict[str, str]:
    """``{model name: backend}`` for every model folder with a ``config.pbtxt`` (read with a regex, no protobuf)."""
    if not repository.is_dir():
        raise ServeError(f"model repository {str(repository)!r} is not a folder")
    models = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        if config.parent.name.startswith("."):
            continue
        text = config.read_text(encoding="utf-8")
        backend = re.search(r'^\s*backend\s*:\s*"([^"]+)"', text, re.MULTILINE)
        platform = re.search(r'^\s*platform\s*:\s*"([^"]+)"', text, re.MULTILINE)
        if backend:
            models[config.parent.name] = backend.group(1)
        elif platform:
            models[config.parent.name] = PLATFORM_BACKENDS.get(platform.group(1), platform.group(1))
        else:
            raise ServeError(f"{config} names neither a backend nor a platform")
    if not models:
        raise ServeError(f"model repository {str(repository)!r} holds no model (no <model>/config.pbtxt); "
                         "write one with `vitdeploy triton ARTIFACT -o REPO`")
    return models


def check_port_free(host: str, port: int, flag: str) -> None:
    """``ServeError`` naming the port and the flag that sets it when something already listens there."""
    if not 0 < int(port) < 65536:
        raise ServeError(f"{flag} {port} is not a TCP port (1..65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, int(port)))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is already in use; pick another with {flag}") from None
            raise ServeError(f"cannot listen on {host}:{port} ({error.strerror}); check --host and {flag}") from None


def failure_reason(log: str) -> str:
    """The one line of a tritonserver log that says why it stopped."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in ("error: creating server:", "failed to start", "failed to load", "already in use"):
        for line in lines:
            if marker in line:
                return re.sub(r'^[EW]\d{4} [\d:.]+ \d+ \S+\] "?', "", line).rstrip('" ')
    errors = [line for line in lines if re.match(r"^E\d{4} ", line)]
    return errors[-1] if errors else (lines[-1] if lines else "tritonserver exited without a message")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so no server is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a URL we built, loopback
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as error:
        return error.code, None


@dataclass
class ServeOptions:
    """Where the server listens and how long to wait for it."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout: float = 120.0
    exit_timeout: int = 10
    log_file: str | None = None
    tritonserver: str | None = None
    log_verbose: int = 0


@dataclass
class ServerStatus:
    """What a started server offers."""

    pid: int
    server_version: str
    origin: str
    http: str
    grpc: str
    metrics: str
    ready: list[str]
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TritonServer:
    """One ``tritonserver`` process serving ``repository``; use as a context manager or call start/stop."""

    def __init__(self, repository: str | os.PathLike[str], options: ServeOptions | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.options = options or ServeOptions()
        self.process: subprocess.Popen[bytes] | None = None
        self.status: ServerStatus | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    # -- setup ------------------------------------------------------------------------------

    def _backend_dir(self, install: TritonInstall) -> Path | None:
        """For the bundle: a folder with the Python backend and this Python's stub (symlinks)."""
        if install.python_backend is None:
            return install.backend_dir
        folder = self._workdir / "backends" / "python"
        folder.mkdir(parents=True)
        for name in PYTHON_BACKEND_FILES:
            (folder / name).symlink_to(install.python_backend / name)
        (folder / STUB).symlink_to(install.stub)
        return folder.parent

    def _environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libraries = [str(d) for d in install.library_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        if libraries:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
        return env

    def _command(self, install: TritonInstall, backend_dir: Path | None, models: list[str]) -> list[str]:
        o = self.options
        command = [
            str(install.binary), f"--model-repository={self.repository}", "--model-control-mode=explicit",
            *[f"--load-model={name}" for name in models],
            f"--http-address={o.host}", f"--http-port={o.http_port}",
            f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
            "--allow-gpu-metrics=false", f"--exit-timeout-secs={int(o.exit_timeout)}", "--strict-readiness=true",
            "--exit-on-error=true", f"--log-verbose={int(o.log_verbose)}",
        ]
        if backend_dir is not None:
            command.append(f"--backend-directory={backend_dir}")
        return command

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> ServerStatus:
        """Start the server, wait until every loadable model is READY, and return what it serves.

        Raises :class:`ServeError` for a bad setup (no binary, a port in use, no loadable model)
        and :class:`ModelLoadError` when a model fails to load or the server dies starting.
        """
        o = self.options
        models = repository_models(self.repository)
        install = find_tritonserver(o.tritonserver)
        check_stub(install)
        available = install.backends()
        skipped = {name: f"needs Triton's {backend} backend, which this tritonserver ({install.origin}) lacks"
                   for name, backend in models.items() if available is not None and backend not in available}
        loadable = [name for name in models if name not in skipped]
        if not loadable:
            raise ServeError(f"no model in {self.repository} can run on this tritonserver ({install.origin}, backends "
                             f"{sorted(available or [])}): " + "; ".join(f"{n} {why}" for n, why in skipped.items()))
        for flag, port in (("--http-port", o.http_port), ("--grpc-port", o.grpc_port),
                           ("--metrics-port", o.metrics_port)):
            check_port_free(o.host, port, flag)
        if len({o.http_port, o.grpc_port, o.metrics_port}) != 3:
            raise ServeError(f"HTTP, gRPC and metrics ports must differ, got {o.http_port}, {o.grpc_port}, "
                             f"{o.metrics_port}")

        self._workdir = Path(tempfile.mkdtemp(prefix="vitdeploy-serve-"))
        backend_dir = self._backend_dir(install)
        self._log_path = Path(o.log_file) if o.log_file else self._workdir / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self._log_path, "wb") as log:
                self.process = subprocess.Popen(  # noqa: S603 - our own command line
                    self._command(install, backend_dir, loadable), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env=self._environment(install), start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl
                )
            version = self._wait_ready(loadable)
        except OSError as error:
            self.stop()
            raise ServeError(f"cannot run {install.binary}: {error.strerror or error}") from None
        except BaseException:
            self.stop()
            raise
        local = "127.0.0.1" if o.host in ("0.0.0.0", "::") else o.host
        self.status = ServerStatus(
            pid=self.process.pid, server_version=version, origin=install.origin,
            http=f"http://{local}:{o.http_port}", grpc=f"grpc://{local}:{o.grpc_port}",
            metrics=f"http://{local}:{o.metrics_port}/metrics", ready=loadable, skipped=skipped,
        )
        return self.status

    def log_text(self) -> str:
        """What the server has logged so far."""
        if self._log_path is None or not self._log_path.is_file():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def _wait_ready(self, models: list[str]) -> str:
        o = self.options
        local = "127.0.0.1" if o.host in ("0.0.0.0", "::") else o.host
        base = f"http://{local}:{o.http_port}"
        deadline = time.monotonic() + o.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelLoadError(f"tritonserver exited ({self.process.returncode}) while starting: "
                                     f"{failure_reason(self.log_text())}")
            try:
                if _get_json(f"{base}/v2/health/ready")[0] == 200 and all(
                        _get_json(f"{base}/v2/models/{name}/ready")[0] == 200 for name in models):
                    return str(_get_json(f"{base}/v2")[1].get("version", "unknown"))
            except OSError:  # not listening yet (URLError, ConnectionError and timeouts are OSErrors)
                pass
            time.sleep(0.1)
        raise ModelLoadError(f"tritonserver did not report every model READY within {o.startup_timeout:.0f} s "
                             f"({failure_reason(self.log_text())}); raise --startup-timeout for large models")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the server's process group, wait (then SIGKILL it), remove the work folder; the exit code."""
        process, code = self.process, None
        if process is not None:
            timeout = float(self.options.exit_timeout + 5 if timeout is None else timeout)
            group = process.pid
            if process.poll() is None:
                _signal_group(group, signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                code = process.wait()
            # Python stubs are the server's children in its group: make sure none outlives it.
            deadline = time.monotonic() + 5.0
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(group):
                _signal_group(group, signal.SIGKILL)
            self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
