"""The README's "Two commands": what each installs is what the text says it installs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_second_command_installs_pytest_and_says_so() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    first, second = re.findall(r"```bash\n(.*?)\n```", section, re.S)[:2]
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.optional-dependencies]")[1]
    # name = ["req", ...] entries (tomllib is Python >= 3.11; the project supports 3.10)
    extras = {name: re.findall(r'"([^"]+)"', body)
              for name, body in re.findall(r"^(\w+) = \[(.*?)\]$", pyproject.split("\n[")[0], re.S | re.M)}

    def installed(command: str) -> set[str]:
        (spec,) = re.findall(r'pip install -e "\.\[([^\]]*)\]"', command)
        return {requirement.split(">")[0].split("=")[0] for extra in spec.split(",") for requirement in extras[extra]}

    assert "pytest" not in installed(first) and "python -m pytest" not in first
    assert "pytest" in installed(second) and "python -m pytest" in second
    between = " ".join(section.split(first, 1)[1].split(second, 1)[0].split())
    assert "pytest" in between and "the first command's venv does not have" in between, between
