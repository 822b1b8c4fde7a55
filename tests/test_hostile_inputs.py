"""Hostile input against every command: one line, the documented exit code, within seconds, nothing left.

Each case runs the real entry point (``vitdeploy.cli.main``) in-process — a traceback would fail the
test as an exception — and asserts: the exit status, exactly one ``vitdeploy <command>: error: ...``
line on stderr naming what is wrong (besides ``[vitdeploy]`` progress lines), nothing on stdout, and no file or temporary left where the
command would have written. Everything here is refused before any export or model load starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, tiny_config
from onnx_artifacts import attach_metadata, export_onnx, make_metadata

from vitdeploy.cli import main
from vitdeploy.files import TMP_MARK
from vitdeploy.preprocessing import bundled_images

IMAGE = str(bundled_images()[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Real inputs (a model, an ONNX file, an engine with its manifest) and hostile ones."""
    from vitdeploy.checkpoints import save_model

    root = tmp_path_factory.mktemp("hostile")
    config = tiny_config()
    model = make_model(config)
    paths = {"root": root}
    paths["checkpoint"] = save_model(model, root / "tiny.safetensors")
    paths["onnx"] = export_onnx(model, root / "tiny.onnx", make_metadata(config))
    (root / "a_file.txt").write_text("not a folder")
    paths["file"] = root / "a_file.txt"
    paths["empty"] = root / "empty.onnx"
    paths["empty"].write_bytes(b"")
    paths["truncated"] = root / "truncated.onnx"
    paths["truncated"].write_bytes(paths["onnx"].read_bytes()[:777])
    paths["random"] = root / "random.onnx"
    paths["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    paths["folder_onnx"] = root / "folder.onnx"
    paths["folder_onnx"].mkdir()
    # A foreign graph (3 classes) carrying copied vitdeploy metadata that says 10 classes.
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
         onnx.helper.make_node("Identity", ["pooled"], ["logits"])], "foreign",
        [onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 3])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    paths["foreign"] = root / "foreign.onnx"
    onnx.save(foreign, str(paths["foreign"]))
    attach_metadata(paths["foreign"], make_metadata(config))
    # Engines with manifests as `vitdeploy build` writes them (through the TensorRT double), one tampered.
    _write_manifests(paths)
    return paths


def _write_manifests(paths: dict) -> None:
    """Engines and manifests as ``vitdeploy build`` writes them, built by the TensorRT TEST DOUBLE
    (then uninstalled: the commands under test run on this machine, which has no TensorRT)."""
    from trt_artifacts import tiny_onnx
    from trt_double import Doubles

    from vitdeploy.exporters import tensorrt_build
    from vitdeploy.exporters.trt_plan import plan_build

    source = tiny_onnx()
    with pytest.MonkeyPatch.context() as patch:
        Doubles().install(patch)
        for name in ("matching", "stale"):
            paths[name] = paths["root"] / f"{name}.engine"
            tensorrt_build.run_build(plan_build(source, paths[name]), show_progress=False)
    paths["stale"].write_bytes(paths["stale"].read_bytes() + b"tampered")


def run(capsys, *argv: object) -> tuple[int, str, str]:
    start = time.perf_counter()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert time.perf_counter() - start < 30, f"{argv} took {time.perf_counter() - start:.0f} s to refuse"
    return status, out, err


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_MARK in p.name or p.name.endswith(".tmp")]


# (id, argv built from the paths, exit status, what the one line must say, paths that must not appear)
CASES = [
    ("export -o under a file", lambda p: ["export", p["checkpoint"], "-o", p["file"] / "t.onnx"], 2,
     "is a file, not a folder", lambda p: [p["file"] / "t.onnx"]),
    ("export -o a folder", lambda p: ["export", p["checkpoint"], "-o", p["folder_onnx"]], 2, "is a folder", lambda p: []),
    ("export -o not .onnx", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "m.txt"], 2, "must end in .onnx",
     lambda p: [p["root"] / "m.txt"]),
    ("export --json under a file", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "j.onnx", "--json",
                                               p["file"] / "r.json"], 2, "is a file, not a folder",
     lambda p: [p["root"] / "j.onnx"]),
    ("export --opset 99", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "o.onnx", "--opset", "99"], 2,
     "opset 99 is outside 17..", lambda p: [p["root"] / "o.onnx"]),
    ("export --opset 16", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "o.onnx", "--opset", "16"], 2,
     "opset 16 is outside 17..", lambda p: [p["root"] / "o.onnx"]),
    ("export --batch 0:4", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "b.onnx", "--batch", "0:4"], 2,
     "argument --batch: '0:4' must be positive", lambda p: [p["root"] / "b.onnx"]),
    ("export --batch 8:1", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "b.onnx", "--batch", "8:1"], 2,
     "non-decreasing", lambda p: [p["root"] / "b.onnx"]),
    ("export --validation-max-batch 0", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "v.onnx",
                                                    "--validation-max-batch", "0"], 2, "must be an integer >= 1",
     lambda p: [p["root"] / "v.onnx"]),
    ("convert -o an existing file", lambda p: ["convert", p["checkpoint"], "-o", p["file"]], 2, "existing file",
     lambda p: []),
    ("convert -o under a file", lambda p: ["convert", p["checkpoint"], "-o", p["file"] / "out"], 2,
     "is a file, not a folder", lambda p: []),
    ("verify --json under a file", lambda p: ["verify", p["onnx"], "--reference", p["checkpoint"], "--json",
                                               p["file"] / "v.json"], 2, "is a file, not a folder", lambda p: []),
    ("verify --min-cosine 2", lambda p: ["verify", p["onnx"], "--reference", p["checkpoint"], "--min-cosine", "2"], 2,
     "in (0, 1]", lambda p: []),
    ("verify --min-cosine 0", lambda p: ["verify", p["onnx"], "--reference", p["checkpoint"], "--min-cosine", "0"], 2,
     "in (0, 1]", lambda p: []),
    ("verify --max-rel-error -1", lambda p: ["verify", p["onnx"], "--reference", p["checkpoint"], "--max-rel-error",
                                              "-1"], 2, "must be a number > 0", lambda p: []),
    ("predict --json under a file", lambda p: ["predict", p["onnx"], IMAGE, "--json", p["file"] / "p.json"], 2,
     "is a file, not a folder", lambda p: []),
    ("predict --top-k 0", lambda p: ["predict", p["onnx"], IMAGE, "--top-k", "0"], 2, "must be an integer >= 1",
     lambda p: []),
    ("predict a foreign graph with copied metadata", lambda p: ["predict", p["foreign"], IMAGE], 2,
     "inconsistent with its own vitdeploy metadata: its logits output has 3 classes, the metadata says 10",
     lambda p: []),
    ("check --json under a file", lambda p: ["check", p["onnx"], "--json", p["file"] / "c.json"], 2,
     "is a file, not a folder", lambda p: []),
    ("check an empty file", lambda p: ["check", p["empty"]], 2, "is empty, not an ONNX file", lambda p: []),
    ("predict an empty file", lambda p: ["predict", p["empty"], IMAGE], 2, "is empty, not an ONNX file", lambda p: []),
    ("predict a folder as an image", lambda p: ["predict", p["onnx"], p["folder_onnx"]], 2,
     "is a folder, not an image file", lambda p: []),
    ("export --bogus", lambda p: ["export", p["checkpoint"], "-o", p["root"] / "u.onnx", "--bogus"], 2,
     "unrecognized arguments: --bogus", lambda p: [p["root"] / "u.onnx"]),
    ("deploy --precision fp64", lambda p: ["deploy", "-o", p["root"] / "d", "--precision", "fp64"], 2,
     "unrecognized arguments: --precision (--precision is an option of export", lambda p: [p["root"] / "d"]),
    ("check a truncated file", lambda p: ["check", p["truncated"]], 2, "is not an ONNX file", lambda p: []),
    ("check random bytes", lambda p: ["check", p["random"]], 2, "not an ONNX", lambda p: []),
    ("check a folder", lambda p: ["check", p["folder_onnx"]], 2, "is a folder, not an ONNX file", lambda p: []),
    ("check a missing file", lambda p: ["check", p["root"] / "nothing.onnx"], 2, "does not exist", lambda p: []),
    ("bench -o a file", lambda p: ["bench", p["checkpoint"], "-o", p["file"]], 2, "exists and is not a folder",
     lambda p: []),
    ("bench --time-budget 0", lambda p: ["bench", p["checkpoint"], "--time-budget", "0"], 2, "must be a number > 0",
     lambda p: []),
    ("deploy -o a file", lambda p: ["deploy", p["checkpoint"], "-o", p["file"]], 2, "exists and is not a folder",
     lambda p: []),
    ("deploy -o under a file", lambda p: ["deploy", p["checkpoint"], "-o", p["file"] / "out"], 2,
     "is a file, not a folder", lambda p: []),
    ("build -o under a file", lambda p: ["build", p["onnx"], "-o", p["file"] / "m.engine"], 2, "is a file, not a folder",
     lambda p: []),
    ("inspect --json under a file", lambda p: ["inspect", "vit_tiny_patch16_224", "--json", p["file"] / "i.json"], 2,
     "is a file, not a folder", lambda p: []),
    ("predict an engine without TensorRT", lambda p: ["predict", p["matching"], IMAGE], 2, "TensorRT is not installed",
     lambda p: []),
    ("verify an engine without TensorRT", lambda p: ["verify", p["matching"], "--reference", p["checkpoint"]], 2,
     "TensorRT is not installed", lambda p: []),
    ("predict a foreign engine", lambda p: ["predict", p["stale"], IMAGE], 2, "does not match", lambda p: []),
]


@pytest.mark.parametrize("argv, status, message, absent", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_with_its_exit_code(world, capsys, argv, status, message, absent):
    before = set(world["root"].rglob("*"))
    got, out, err = run(capsys, *argv(world))
    lines = [line for line in err.strip().splitlines() if not line.startswith("[vitdeploy] ")]  # progress lines
    command = str(argv(world)[0])
    assert got == status, err
    assert len(lines) == 1 and lines[0].startswith(f"vitdeploy {command}: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert not any(path.exists() for path in absent(world))
    assert set(world["root"].rglob("*")) <= before, "the command left files behind"
    assert not leftovers(world["root"])


def test_unwritable_folder_is_refused_before_any_work(world, capsys):
    """A folder that refuses writes (sysfs, even for root) is found by writing a probe, not by trusting os.access."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel on this machine")
    status, _, err = run(capsys, "export", world["checkpoint"], "-o", "/sys/kernel/vitdeploy-test.onnx")
    assert status == 2 and "cannot write in /sys/kernel" in err and len(err.strip().splitlines()) == 1


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next_one(world, capsys):
    """SIGKILL cannot be caught: what a killed run leaves is found (its process is gone) and removed."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = world["root"] / "report.json"
    stale_folder = world["root"] / f".{target.name}.{pid}{TMP_MARK}"
    stale_folder.mkdir()
    (stale_folder / "partial.onnx").write_bytes(b"half")
    stale_file = world["root"] / f".{target.name}.{pid}{TMP_MARK}.json"
    stale_file.write_text("{")
    live = world["root"] / f".{target.name}.{os.getppid()}{TMP_MARK}"  # a running process's: left alone
    live.mkdir()
    status, out, err = run(capsys, "check", world["onnx"], "--json", target)
    assert status == 0 and target.is_file()
    assert not stale_folder.exists() and not stale_file.exists() and live.is_dir()
    assert "left by an interrupted run" in err
    live.rmdir()
    target.unlink()


def test_sigterm_during_export_leaves_nothing_behind(world, tmp_path):
    """SIGTERM is handled like Ctrl-C: the export stops, exit status 143, no target, no temporary."""
    target = tmp_path / "killed.onnx"
    process = subprocess.Popen(
        [sys.executable, "-m", "vitdeploy", "export", str(world["checkpoint"]), "-o", str(target), "--batch", "1:2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def export_temporaries() -> list[Path]:  # not the output path's write probe, made while parsing
        return [path for path in leftovers(tmp_path) if path.name.startswith(f".{target.name}.")]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not export_temporaries() and process.poll() is None:
        time.sleep(0.05)  # wait until the export writes its temporaries (after tracing)
    assert process.poll() is None, process.communicate()
    assert export_temporaries(), "the export never started writing"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "vitdeploy export: terminated"
    assert "Traceback" not in err
    assert not target.exists() and not leftovers(tmp_path)
    assert list(tmp_path.iterdir()) == []


# Sends a signal (argv[1]) to itself right after the output path's write probe is written, while arguments are parsed.
SIGNALLED_AFTER_THE_WRITE_PROBE = """
import os, pathlib, signal, sys
from vitdeploy.cli import main
write_bytes = pathlib.Path.write_bytes
def write_then_signal(path, data):
    written = write_bytes(path, data)
    if "write-probe" in path.name:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return written
pathlib.Path.write_bytes = write_then_signal
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("signal_name", "status", "word"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_while_arguments_are_parsed_unwinds_and_removes_the_write_probe(world, tmp_path, signal_name, status,
                                                                                 word):
    """Parsing already writes (a probe that the output folder takes files): SIGTERM or Ctrl-C there unwinds too."""
    target = tmp_path / "never.onnx"
    done = subprocess.run([sys.executable, "-c", SIGNALLED_AFTER_THE_WRITE_PROBE, signal_name, "export",
                           str(world["checkpoint"]), "-o", str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [f"vitdeploy export: {word}"]
    assert list(tmp_path.iterdir()) == []


def test_vitdeploys_own_warnings_are_one_line_and_others_keep_their_source():
    import warnings

    import vitdeploy.runtimes.openvino as ours
    from vitdeploy.cli import _one_line_warnings

    with _one_line_warnings("bench"):  # what Python's warning display calls to format a warning
        own = warnings.formatwarning("full-range int8\n  on this CPU", RuntimeWarning, ours.__file__, 1)
        other = warnings.formatwarning("from elsewhere", FutureWarning, "/elsewhere/lib.py", 7, "")
    after = warnings.formatwarning("after the command", RuntimeWarning, ours.__file__, 1, "")
    assert own == "vitdeploy bench: warning: full-range int8 on this CPU\n"
    assert other == "/elsewhere/lib.py:7: FutureWarning: from elsewhere\n"
    assert after.endswith("RuntimeWarning: after the command\n")  # the formatter is restored
