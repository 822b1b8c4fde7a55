"""A test session leaves nothing in the temp folder (a pytest plugin; tests/conftest.py loads its hooks).

The session's process, its xdist workers and every subprocess they start get one private temp folder
(``TMPDIR`` and ``tempfile.tempdir``), which pytest's basetemp lands in too. When the session ends,
after pytest has removed its basetemp (``tmp_path_retention_policy = "failed"`` in pyproject.toml: a
passing run keeps nothing), anything left in that folder is something a test or the code under test
forgot: it is listed and the run fails. Then the folder goes; only a failing run keeps it (with the
failed tests' ``tmp_path`` folders) and says where.
"""

from __future__ import annotations

import getpass
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set by the process that made the folder, so its workers (and any nested session) use it, not a new one.
FOLDER_ENV = "VITDEPLOY_TEST_TMPDIR"
_KEY = pytest.StashKey[Path]()
_BEFORE = pytest.StashKey["str | None"]()


# Files other libraries keep in the temp folder for themselves whatever runs them (one each, rewritten, not ours).
NOT_OURS = {".ses": "onnxruntime writes an id there when it is imported"}


def _pytest_folders(folder: Path) -> set[Path]:
    """pytest's own root in ``folder`` (``pytest-of-<user>``), which holds only the basetemp."""
    return {path for path in folder.glob("pytest-of-*") if path.is_dir()}


def leftovers(folder: Path) -> list[str]:
    """What is left in ``folder`` besides pytest's (empty) root, relative to it, at most two levels deep."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name in NOT_OURS:
            continue
        if entry in _pytest_folders(folder):
            found += [f"{entry.name}/{inner.name}" for inner in sorted(entry.iterdir())]
        else:
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(FOLDER_ENV) or hasattr(config, "workerinput"):
        return  # an xdist worker: the controller's folder is already TMPDIR
    # torch's compile cache stays where torch keeps it by default, across sessions: it is torch's, not ours.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
    folder = Path(tempfile.mkdtemp(prefix="vitdeploy-tests-"))
    config.stash[_KEY] = folder
    config.stash[_BEFORE] = os.environ.get("TMPDIR")
    os.environ[FOLDER_ENV] = os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)


@pytest.hookimpl(trylast=True)  # after pytest's own sessionfinish has removed the basetemp of a passing run
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    folder = session.config.stash.get(_KEY, None)
    if folder is None or exitstatus != 0:
        return
    left = leftovers(folder)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"the session left {len(left)} thing(s) in its temp folder {folder} (each test must clean up "
                   f"what it makes outside tmp_path): {', '.join(left[:20])}")
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_KEY, None)
    if folder is None:
        return
    os.environ.pop(FOLDER_ENV, None)
    before = config.stash.get(_BEFORE, None)
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
    if not folder.exists():
        return
    kept = any(next(path.iterdir(), None) for path in _pytest_folders(folder))  # a failing run's tmp_path folders
    if kept:
        print(f"test temp files kept for the failed tests in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
