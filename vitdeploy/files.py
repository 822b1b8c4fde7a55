"""Files: atomic writes (write beside the target under a temporary name, then rename) and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from vitdeploy.console import progress

# Temporaries live beside their target as ".<target name>.<pid>.vitdeploy-tmp[suffix]": one place per
# target, named by the process that owns it, so the next run can tell a leftover (its process is
# gone: killed by SIGKILL or a power cut) from the work of a run still going.
TMP_MARK = ".vitdeploy-tmp"


def slug(text: str) -> str:
    """A file-name-safe form of a model name or path (``deploy``, ``tune`` and ``bench`` name files with it)."""
    name = Path(text).name if ("/" in text or "\\" in text) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Temporaries of ``target`` whose owning process no longer runs."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = []
    prefix = f".{target.name}."
    for entry in target.parent.iterdir():
        name = entry.name
        if not name.startswith(prefix) or TMP_MARK not in name:
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            stale.append(entry)
    return sorted(stale)


def remove_stale_temporaries(target: str | os.PathLike[str], log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the leftovers :func:`stale_temporaries` finds, saying so through ``log``; returns them."""
    removed = []
    for entry in stale_temporaries(target):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        if log is not None:
            log(f"removed {entry}, left by an interrupted run")
    return removed


def _temporary_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}{TMP_MARK}{suffix}")


@contextlib.contextmanager
def temporary_folder(target: str | os.PathLike[str], log: Callable[[str], None] | None = progress) -> Iterator[Path]:
    """A scratch folder beside ``target`` for work that ends in ``target``, removed however the block
    ends (an exception, Ctrl-C or SIGTERM); leftovers of killed earlier runs are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, log)
    folder = _temporary_name(target, "")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "",
                log: Callable[[str], None] | None = progress) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``.

    On an exception the temporary file is removed and ``target`` is left untouched. ``suffix``
    keeps an extension that libraries look at (``.onnx``). Leftovers of killed earlier writes of
    the same target are removed first (and reported through ``log``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, log)
    tmp = _temporary_name(target, suffix)
    # A plain open() gives the permissions an artifact should have (the umask's).
    tmp.write_bytes(b"")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], data: Any, parents: bool = False) -> None:
    """Write ``data`` as indented JSON (what JSON cannot hold as ``str``) to ``target`` atomically;
    ``parents`` creates the missing folders above it first."""
    if parents:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Any:
    """The JSON document in ``path``; ``error`` naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not JSON ({problem})") from None


def sha256_files(paths: Iterable[str | os.PathLike[str]], chunk: int = 1 << 22) -> str:
    """Hex sha256 of the files' bytes read one after another (a sharded checkpoint hashes as one)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (a serialized engine held in memory)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file (engines and ONNX files can be GBs: read in chunks)."""
    return sha256_files([path])


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _probe_writable(folder: Path, what: str, path: Path) -> None:
    """Create and remove a file in ``folder``: the one reliable test that writing there works."""
    probe = folder / f".vitdeploy-write-probe.{os.getpid()}{TMP_MARK}"
    try:
        try:
            probe.write_bytes(b"")
        finally:  # also when Ctrl-C or SIGTERM lands between the write and the removal
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot write in {folder} ({error.strerror or error})") from None


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Raise ``ValueError`` naming ``path`` unless a file can be written there, before any long work.

    A folder where the file should go, a file where a folder should be above it, or a folder that
    refuses writes are refused; missing folders above it are fine (they are made when writing).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; expected a file name")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder")
    _probe_writable(existing, what, path)
    return path


def check_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Raise ``ValueError`` naming ``path`` unless files can be written in a folder there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} exists and is not a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a folder")
    _probe_writable(existing, what, path)
    return path
