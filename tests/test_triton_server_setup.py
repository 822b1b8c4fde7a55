"""`vitdeploy serve` before any server runs: repository scan, ports, the stub's libpython, log reasons."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from serving_artifacts import SERVE_VENV_REASON, serve_python

from vitdeploy.serving.server import (
    STUB,
    ServeError,
    TritonInstall,
    check_port_free,
    check_stub,
    failure_reason,
    repository_models,
)

# Lines as tritonserver 2.51.0 (nvidia-pytriton 0.7.0) printed them here.
PORT_LOG = """I1201 17:20:24.230460 13541 http_server.cc:4713] "Started HTTPService at 127.0.0.1:18000"
E1201 17:20:24.276184 13541 main.cc:257] "failed to start HTTP service: Unavailable - Socket '127.0.0.1:18000' already in use "
"""
LOAD_LOG = """I1201 17:20:27.715870 13625 server.cc:345] "Timeout 5: Found 1 live models and 0 in-flight non-inference requests"
error: creating server: Invalid argument - load failed for model 'broken': version 1 is at UNAVAILABLE state: Internal: ValueError: boom
At:
  /tmp/repo/broken/1/model.py(3): initialize
"""


def test_failure_reason_picks_the_line_that_says_why() -> None:
    assert failure_reason(PORT_LOG) == ("failed to start HTTP service: Unavailable - Socket '127.0.0.1:18000' "
                                        "already in use")
    assert failure_reason(LOAD_LOG).startswith("error: creating server: Invalid argument - load failed for model "
                                               "'broken'")
    assert failure_reason("") == "tritonserver exited without a message"


def test_repository_models_reads_backend_and_platform(tmp_path) -> None:
    for name, line in (("a_python", 'backend: "python"'), ("b_onnx", 'platform: "onnxruntime_onnx"'),
                       ("c_plan", 'platform: "tensorrt_plan"')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n{line}\n')
    (tmp_path / ".a_python.staging").mkdir()
    (tmp_path / ".a_python.staging" / "config.pbtxt").write_text('backend: "python"\n')
    assert repository_models(tmp_path) == {"a_python": "python", "b_onnx": "onnxruntime", "c_plan": "tensorrt"}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.pbtxt").write_text('name: "d"\n')
    with pytest.raises(ServeError, match="names neither a backend nor a platform"):
        repository_models(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match="holds no model"):
        repository_models(tmp_path / "empty")
    with pytest.raises(ServeError, match="is not a folder"):
        repository_models(tmp_path / "missing")


def test_port_checks_name_the_flag() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expected = f"port {port} on 127.0.0.1 is already in use; pick another with --grpc-port"
        with pytest.raises(ServeError, match=expected):
            check_port_free("127.0.0.1", port, "--grpc-port")
    check_port_free("127.0.0.1", port, "--grpc-port")  # free again
    with pytest.raises(ServeError, match="--http-port 70000 is not a TCP port"):
        check_port_free("127.0.0.1", 70000, "--http-port")


@pytest.mark.skipif(bool(SERVE_VENV_REASON), reason=SERVE_VENV_REASON)
def test_stub_of_another_python_is_refused_before_starting() -> None:
    """The bundled stub links Debian's libpython3.11; this (pyenv or other) Python must not be paired with it."""
    venv = serve_python().parent.parent
    stubs = sorted(venv.glob(f"lib/python3.*/site-packages/pytriton/tritonserver/python_backend_stubs/3.11/{STUB}"))
    libs = sorted(venv.glob("lib/python3.*/site-packages/nvidia_pytriton.libs"))
    assert stubs and libs
    install = TritonInstall(Path("tritonserver"), "nvidia-pytriton", library_dirs=libs, stub=stubs[0])
    if Path(sys.base_prefix).resolve() == Path("/usr"):
        check_stub(install)  # Debian's own Python: the stub's libpython is ours
    else:
        with pytest.raises(ServeError, match=r"stub loads .*libpython3\.11.* which is not the library of this Python"):
            check_stub(install)
