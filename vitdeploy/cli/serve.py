"""`vitdeploy serve`: run Triton Inference Server on a model repository (or on an artifact)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from vitdeploy.cli.common import CLIError, output_file, positive_float, positive_int, progress, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run Triton Inference Server on a model repository (or an artifact) until SIGINT/SIGTERM",
        description="Start tritonserver on REPO (a folder written by `vitdeploy triton`), or on a repository "
        "written first into a temporary folder when given an .onnx file or engine. Uses a tritonserver on PATH "
        "if there is one, else the one bundled with nvidia-pytriton (Python backend only: models that need "
        "another backend are skipped, and the command says so). Prints the endpoints and the READY models, "
        "serves until SIGINT or SIGTERM, then stops the server and every process it started. A port in use is "
        "an error (exit 2); a model that fails to load is one line with Triton's reason (exit 1).",
    )
    parser.add_argument("target", metavar="ARTIFACT_OR_REPO", help="a model repository folder, or an .onnx/engine file")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--http-port", type=positive_int, default=8000, metavar="PORT", help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=positive_int, default=8001, metavar="PORT", help="gRPC port (default 8001)")
    parser.add_argument("--metrics-port", type=positive_int, default=8002, metavar="PORT",
                        help="Prometheus metrics port (default 8002)")
    parser.add_argument("--startup-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the models to become READY (default 120)")
    parser.add_argument("--exit-timeout", type=positive_int, default=10, metavar="SECONDS",
                        help="how long the server waits for in-flight requests when stopping (default 10)")
    parser.add_argument("--tritonserver", metavar="PATH", help="the tritonserver binary to run (default: PATH, "
                        "else nvidia-pytriton's)")
    parser.add_argument("--server-log", type=output_file, metavar="PATH",
                        help="write tritonserver's own log to PATH")
    parser.add_argument("--json", type=output_file, metavar="PATH",
                        help="write the endpoints and models as JSON to PATH once READY")
    parser.set_defaults(func=run)


def _repository(target: Path, workdir: Path) -> Path:
    if target.is_dir():
        return target
    if not target.exists():
        raise CLIError(f"{str(target)!r} is neither a model repository folder nor an artifact file")
    from vitdeploy.serving.repository import write_repository

    repository = workdir / "repository"
    for entry in write_repository([target], repository):
        for warning in entry.warnings:
            progress(f"warning: {entry.name}: {warning}")
    progress(f"wrote a model repository for {target.name} in {repository}")
    return repository


def run(args: argparse.Namespace) -> int:
    from vitdeploy.serving.server import ModelLoadError, ServeOptions, TritonServer

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    options = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, startup_timeout=args.startup_timeout,
                           exit_timeout=args.exit_timeout, log_file=args.server_log, tritonserver=args.tritonserver)
    with tempfile.TemporaryDirectory(prefix="vitdeploy-serve-repo-") as workdir:
        server = TritonServer(_repository(Path(args.target), Path(workdir)), options)
        try:
            progress(f"starting tritonserver on {server.repository} ...")
            try:
                status = server.start()
            except ModelLoadError as error:
                print(f"vitdeploy serve: error: {error}", file=sys.stderr)
                return 1
            print(f"tritonserver {status.server_version} ({status.origin}), pid {status.pid}")
            print(f"  HTTP     {status.http}")
            print(f"  gRPC     {status.grpc}")
            print(f"  metrics  {status.metrics}")
            for name in status.ready:
                print(f"  READY    {name}")
            for name, reason in status.skipped.items():
                print(f"  skipped  {name}: {reason}")
            sys.stdout.flush()
            if args.json:
                write_json(args.json, status.to_dict())
            while not stop.wait(0.25):
                if not server.running():
                    code = server.process.returncode
                    print(f"vitdeploy serve: error: tritonserver stopped unexpectedly (exit {code})",
                          file=sys.stderr)
                    return 1
            progress("stopping tritonserver ...")
        finally:
            code = server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        progress(f"tritonserver stopped (exit {code})")
    return 0
