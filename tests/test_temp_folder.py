"""A test session leaves nothing in the temp folder: tests/temp_folder.py's check, run on small sessions of its own
(one that cleans up, one that leaks a file) in a temp folder this test owns."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from temp_folder import FOLDER_ENV

TESTS = Path(__file__).resolve().parent

SESSION = '''
import tempfile
from pathlib import Path


def test_with_tmp_path(tmp_path, tmp_path_factory):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path_factory.mktemp("module") / "b.txt").write_text("b")


def test_that_may_leak():
    if LEAK:
        Path(tempfile.gettempdir(), "leaked.txt").write_text("forgotten")
'''


def run_session(tmp_path: Path, leak: bool) -> tuple[subprocess.CompletedProcess, Path]:
    system = tmp_path / "system-temp"
    system.mkdir()
    (tmp_path / "test_inner.py").write_text(f"LEAK = {leak}\n{SESSION}")
    env = {k: v for k, v in os.environ.items() if k not in (FOLDER_ENV, "PYTEST_ADDOPTS")}
    env.update(TMPDIR=str(system), PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "temp_folder", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-o", "addopts=", "-o", "tmp_path_retention_policy=failed",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    return done, system


def test_a_clean_session_leaves_an_empty_temp_folder(tmp_path):
    done, system = run_session(tmp_path, leak=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    left = [p.name for p in system.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []


def test_a_session_that_leaks_a_file_fails_and_names_it(tmp_path):
    done, system = run_session(tmp_path, leak=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 passed" in done.stdout
    assert "the session left 1 thing(s) in its temp folder" in done.stdout and "leaked.txt" in done.stdout
    left = [p.name for p in system.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []  # reported, then removed with the session's folder


def test_this_session_writes_its_temporaries_in_its_own_folder():
    folder = Path(os.environ[FOLDER_ENV])
    assert folder.name.startswith("vitdeploy-tests-") and Path(tempfile.gettempdir()) == folder
