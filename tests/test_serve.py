"""`vitdeploy triton model.onnx -o repo && vitdeploy serve repo` with a real Triton server on 127.0.0.1.

The server runs from the torch-free serve venv (Debian's python3.11 + ``.[cpu,serve]``, built by
``.ci/run``): the tritonserver bundled with nvidia-pytriton, Python backend only. Requests go from
this process through ``vitdeploy.serving.client`` over HTTP and gRPC and are compared with the
direct onnxruntime runtime on the same files. Ports are picked free at run time; every request
loop is bounded; the module's last test stops the server with SIGTERM and checks that no process
of it is left.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from serving_artifacts import LABELS, SERVE_VENV_REASON, free_ports, serve_python, tiny_served_onnx

from vitdeploy.preprocessing import bundled_images, preprocess_batch
from vitdeploy.runtimes import OrtRuntime

pytest.importorskip("tritonclient.http", reason="tritonclient[grpc,http] (dev extra)")
from vitdeploy.serving.client import TritonClient, batch_sizes  # noqa: E402

pytestmark = pytest.mark.skipif(bool(SERVE_VENV_REASON), reason=SERVE_VENV_REASON)
MODEL = "tiny_python"
# Every shape is within the tiny model's validated range (batch 1..8, sides 16..64, stride 8).
SHAPES = [(1, 3, 32, 32), (3, 3, 32, 48), (2, 3, 64, 16), (8, 3, 16, 24)]


def vitdeploy_command(*args: str) -> list[str]:
    return [str(serve_python().parent / "vitdeploy"), *args]


def run_vitdeploy(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    # cwd outside the checkout: the serve venv must import its installed vitdeploy, not ./vitdeploy.
    return subprocess.run(vitdeploy_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def process_group_members(group: int) -> list[int]:
    """Pids (from /proc) whose process group is ``group``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry.name))
    return members


class Served:
    """A running `vitdeploy serve` subprocess and what it reported."""

    def __init__(self, folder: Path, repository: Path) -> None:
        self.ports = free_ports(3)
        status_path = folder / "status.json"
        self.process = subprocess.Popen(
            vitdeploy_command("serve", str(repository), "--http-port", str(self.ports[0]),
                              "--grpc-port", str(self.ports[1]), "--metrics-port", str(self.ports[2]),
                              "--exit-timeout", "3", "--json", str(status_path)),
            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not status_path.is_file():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                out, err = self.process.communicate()
                pytest.fail(f"vitdeploy serve did not come up (exit {self.process.returncode}): {err}{out}")
            time.sleep(0.1)
        self.status = json.loads(status_path.read_text())
        self.http = self.status["http"]
        self.grpc = self.status["grpc"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return tiny_served_onnx()


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_path):
    folder = tmp_path_factory.mktemp("serve")
    written = run_vitdeploy("triton", str(onnx_path), "-o", str(folder / "repo"), "--max-queue-delay-us", "20000",
                            cwd=folder)
    assert written.returncode == 0, written.stderr
    server = Served(folder, folder / "repo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(onnx_path):
    with OrtRuntime(onnx_path) as runtime:
        yield runtime


def test_python_model_is_ready_and_the_onnx_model_is_skipped_with_its_reason(served) -> None:
    status = served.status
    assert status["ready"] == [MODEL]
    assert status["origin"] == "nvidia-pytriton" and status["server_version"].startswith("2.")
    assert "tiny_onnxruntime" in status["skipped"]
    assert "onnxruntime backend" in status["skipped"]["tiny_onnxruntime"]
    with TritonClient(served.http, MODEL) as client:
        assert client.ready()
        assert client.served.labels == LABELS and client.served.max_batch_size == 8


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_http_and_grpc_answers_equal_the_direct_runtime(served, direct, protocol) -> None:
    assert direct.graph_path.name == "tiny.cpu.onnx"  # the server's python model runs the same variant
    rng = np.random.default_rng(0)
    with TritonClient(getattr(served, protocol), MODEL) as client:
        for shape in SHAPES:
            pixels = rng.standard_normal(shape).astype(np.float32)
            served_logits = client.logits(pixels)
            assert served_logits.shape == (shape[0], 10)
            np.testing.assert_allclose(served_logits, direct(pixels), rtol=1e-5, atol=1e-5)
        photos = preprocess_batch(bundled_images(), direct.metadata.preprocessing)
        np.testing.assert_allclose(client.logits(photos), direct(photos), rtol=1e-5, atol=1e-5)


def test_eight_concurrent_clients_get_correct_answers_and_the_server_batches(served, direct) -> None:
    rng = np.random.default_rng(1)
    requests = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(8 * 6)]
    with TritonClient(served.http, MODEL) as client:
        before = batch_sizes(client.statistics())

    def one_client(worker: int) -> list[tuple[int, np.ndarray]]:
        with TritonClient(served.grpc if worker % 2 else served.http, MODEL) as client:
            return [(index, client.logits(requests[index])) for index in range(worker, len(requests), 8)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [answer for chunk in pool.map(one_client, range(8)) for answer in chunk]
    assert len(answers) == len(requests)
    for index, logits in answers:
        np.testing.assert_allclose(logits, direct(requests[index]), rtol=1e-5, atol=1e-5)
    with TritonClient(served.http, MODEL) as client:
        after = batch_sizes(client.statistics())
    executed = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert sum(size * count for size, count in executed.items()) == len(requests)
    assert max(size for size, count in executed.items() if count) > 1, executed


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_errors_and_the_server_stays_up(served, direct, protocol) -> None:
    rng = np.random.default_rng(2)
    bad = {
        "channels": (rng.standard_normal((1, 4, 32, 32)).astype(np.float32), "unexpected shape"),
        "patch": (rng.standard_normal((1, 3, 30, 32)).astype(np.float32), "height 30 is not a multiple of the patch"),
        "dtype": (rng.standard_normal((1, 3, 32, 32)), "data-type is 'FP64'"),
        "range": (rng.standard_normal((1, 3, 72, 32)).astype(np.float32), "outside the validated range"),
        "batch": (rng.standard_normal((9, 3, 32, 32)).astype(np.float32), "batch-size must be <= 8"),
    }
    with TritonClient(getattr(served, protocol), MODEL) as client:
        for what, (pixels, message) in bad.items():
            with pytest.raises(ValueError, match=message):
                client.logits(pixels)
            assert served.process.poll() is None, f"the server died on a request with a bad {what}"
        good = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
        np.testing.assert_allclose(client.logits(good), direct(good), rtol=1e-5, atol=1e-5)


def test_predict_server_round_trip_prints_labels_and_matches(served, direct, tmp_path) -> None:
    images = [str(p) for p in bundled_images()[:2]]
    logits = direct(preprocess_batch(images, direct.metadata.preprocessing)).astype(np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for url in (served.http, served.grpc):
        report = tmp_path / "predictions.json"
        result = run_vitdeploy("predict", "--server", url, MODEL, *images, "--top-k", "3", "--json", str(report),
                               cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == images[0]
        for row, prediction in enumerate(json.loads(report.read_text())["predictions"]):
            best = np.argsort(-probabilities[row])[:3]
            assert [entry["label"] for entry in prediction["top_k"]] == [LABELS[i] for i in best]
            np.testing.assert_allclose([e["probability"] for e in prediction["top_k"]], probabilities[row, best],
                                       rtol=1e-4)
    missing = run_vitdeploy("predict", "--server", served.http, "no_such_model", images[0], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith("vitdeploy predict: error: ") and missing.stderr.count("\n") == 1


def test_sigterm_stops_the_server_within_seconds_and_leaves_no_process(served) -> None:
    server_pid = served.status["pid"]
    assert process_group_members(server_pid), "the tritonserver process group should be alive while serving"
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(20)
    elapsed = time.monotonic() - started
    assert served.process.returncode == 0, served.process.stderr.read()
    assert elapsed < 10, f"stopping took {elapsed:.1f} s"
    assert process_group_members(server_pid) == []  # tritonserver and its Python stubs
    assert process_group_members(served.process.pid) == []
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", served.ports[0])) != 0  # nothing listens any more


def test_port_in_use_is_one_line_and_exit_2(tmp_path, onnx_path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_vitdeploy("serve", str(onnx_path), "--http-port", str(port), cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines == [f"vitdeploy serve: error: port {port} on 127.0.0.1 is already in use; pick another with "
                     "--http-port"]


def test_a_model_that_fails_to_load_is_one_line_and_exit_1(tmp_path, onnx_path) -> None:
    repository = tmp_path / "repo"
    written = run_vitdeploy("triton", str(onnx_path), "-o", str(repository), "--kinds", "python", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    (repository / MODEL / "1" / "tiny.onnx").unlink()  # the artifact the model would open
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen(
        vitdeploy_command("serve", str(repository), "--http-port", str(http), "--grpc-port", str(grpc),
                          "--metrics-port", str(metrics)),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert errors[0].startswith("vitdeploy serve: error: tritonserver exited")
    assert "load failed for model 'tiny_python'" in errors[0] and "tiny.onnx" in errors[0]
    assert process_group_members(process.pid) == []
