"""Suite definitions (``benchmarks/suites/*.json``): named sweeps run by ``vitdeploy bench --suite NAME``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUITES_DIR = Path(__file__).with_name("suites")


@dataclass
class Suite:
    """A sweep: models x runtimes x resolutions x batch sizes, and how long to time each point."""

    name: str
    models: list[str]
    runtimes: list[str]
    batch: list[int]
    resolution: list[int]
    device: str = "cpu"
    description: str = ""
    warmup: int = 5
    iterations: int | None = None
    time_budget_s: float | None = 5.0
    min_iterations: int = 5
    max_iterations: int = 10_000
    threads: int | None = None
    overhead: bool | dict[str, Any] = False
    compile_mode: str | None = None
    expected_minutes: float | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"suite {self.name!r}: device {self.device!r} is not 'cpu' or 'cuda'")
        for key in ("models", "runtimes", "batch", "resolution"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value:
                raise ValueError(f"suite {self.name!r}: {key!r} must be a non-empty list, got {value!r}")
        if isinstance(self.overhead, dict):
            unknown = sorted(set(self.overhead) - {"models", "runtimes", "iterations", "rounds"})
            if unknown:
                raise ValueError(f"suite {self.name!r}: unknown overhead keys {unknown}; "
                                 "expected models, runtimes, iterations, rounds")
        for key in ("batch", "resolution"):
            bad = [v for v in getattr(self, key) if not isinstance(v, int) or isinstance(v, bool) or v < 1]
            if bad:
                raise ValueError(f"suite {self.name!r}: {key!r} must hold positive integers, got {bad}")


def overhead_settings(suite: Suite) -> dict[str, Any]:
    """The suite's ``overhead`` entry as BenchPlan fields (``overhead``, ``overhead_models`` ...)."""
    if isinstance(suite.overhead, bool):
        return {"overhead": suite.overhead}
    settings: dict[str, Any] = {"overhead": True}
    for key in ("models", "runtimes", "iterations", "rounds"):
        if key in suite.overhead:
            settings[f"overhead_{key}"] = suite.overhead[key]
    return settings


def available_suites() -> list[str]:
    """Names of the suites shipped in ``benchmarks/suites``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name (``cpu``, ``gpu``) or a suite JSON file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and (SUITES_DIR / f"{text}.json").is_file():
        path = SUITES_DIR / f"{text}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"suite {text!r} is neither a shipped suite ({', '.join(available_suites())}) nor a suite JSON file"
        )
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"suite file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"suite file {path} must hold a JSON object")
    known = {f.name for f in fields(Suite)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"suite file {path}: unknown keys {unknown}; expected some of {sorted(known)}")
    data.setdefault("name", path.stem)
    missing = [key for key in ("models", "runtimes", "batch", "resolution") if key not in data]
    if missing:
        raise ValueError(f"suite file {path}: missing keys {missing}")
    return Suite(**data)
