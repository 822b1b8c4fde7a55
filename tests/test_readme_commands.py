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


def _commands() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    first, second = re.findall(r"```bash\n(.*?)\n```", section, re.S)[:2]
    return first, second


def _extras() -> dict[str, list[str]]:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.optional-dependencies]")[1]
    return {name: re.findall(r'"([^"]+)"', body)
            for name, body in re.findall(r"^(\w+) = \[(.*?)\]$", pyproject.split("\n[")[0], re.S | re.M)}


def test_ci_runs_the_readme_test_command_literally() -> None:
    """What a newcomer runs is what CI runs: .ci/run executes the README's second command as written."""
    _, second = _commands()
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert second.strip() in lines
    assert sum("python -m pytest" in line for line in lines if not line.startswith("#")) == 1


def test_the_test_command_installs_the_timm_the_tests_import() -> None:
    """timm without torchvision (CUDA-only wheels here), at the version the skip hint names; it imports through
    vitdeploy.benchmarks.timm_import, so the hint works."""
    from timm_without_torchvision import TIMM_MISSING, TIMM_VERSION, import_timm

    _, second = _commands()
    install = f"pip install --no-deps timm=={TIMM_VERSION}"
    assert install in second and install in TIMM_MISSING
    assert second.index(install) < second.index("python -m pytest")
    timm = import_timm()
    assert timm is not None and timm.__version__ == TIMM_VERSION  # this venv follows the README too


def test_the_test_command_installs_the_open_clip_the_tests_import() -> None:
    """open_clip (the OpenCLIP source check's library) without torchvision, at the version the skip hint names."""
    from timm_without_torchvision import OPEN_CLIP_MISSING, OPEN_CLIP_VERSION, import_open_clip

    _, second = _commands()
    install = f"open_clip_torch=={OPEN_CLIP_VERSION}"
    assert re.search(rf"pip install --no-deps [^&]*{re.escape(install)}", second) and install in OPEN_CLIP_MISSING
    assert second.index(install) < second.index("python -m pytest")
    open_clip = import_open_clip()
    assert open_clip is not None and open_clip.__version__ == OPEN_CLIP_VERSION


def test_the_first_command_brings_openvino_for_tune() -> None:
    """tune's OpenVINO candidates need openvino: the first command's extras must install it."""
    first, _ = _commands()
    (spec,) = re.findall(r'pip install -e "\.\[([^\]]*)\]"', first)
    extras = _extras()
    installed = {requirement.split(">")[0].split("=")[0] for extra in spec.split(",") for requirement in extras[extra]}
    assert {"openvino", "nncf"} <= installed


# Import names the tests skip on (pytest.importorskip) -> the requirement that provides them.
PROVIDERS = {"google": "tritonclient", "matplotlib": "matplotlib", "nncf": "nncf", "openvino": "openvino",
             "sklearn": "scikit-learn", "transformers": "transformers", "tritonclient": "tritonclient",
             "vitdeploy": "vitdeploy"}


def test_the_test_command_installs_every_module_a_test_skips_without() -> None:
    """Only GPU/TensorRT tests may skip on the README's test command: each importorskip names a module that
    its extras install."""
    _, second = _commands()
    (spec,) = re.findall(r'pip install -e "\.\[([^\]]*)\]"', second)
    extras = _extras()
    installed = {requirement.split("[")[0].split(">")[0].split("=")[0] for extra in spec.split(",")
                 for requirement in extras[extra]} | {"vitdeploy"}
    skipped_on = {name.split(".")[0] for path in (ROOT / "tests").glob("*.py")
                  for name in re.findall(r'importorskip\(\s*"([\w.]+)"', path.read_text(encoding="utf-8"))}
    assert skipped_on, "no importorskip found: the pattern is stale"
    unknown = skipped_on - set(PROVIDERS)
    assert not unknown, f"add the requirement that provides {unknown} to PROVIDERS"
    assert {PROVIDERS[name] for name in skipped_on} <= installed, {PROVIDERS[n] for n in skipped_on} - installed


def test_the_tour_commands_parse_as_written(tmp_path, monkeypatch) -> None:
    """Every `vitdeploy ...` line of the README's tour is a command and options the CLI accepts."""
    import shlex

    from vitdeploy.cli import build_parser

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tour = readme.split("## A tour", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)\n```", tour, re.S)[0]
    commands = [part.strip() for line in block.splitlines() for part in line.split("#", 1)[0].split("&&")]
    commands = [command for command in commands if command.startswith("vitdeploy ")]
    assert len(commands) >= 8
    monkeypatch.chdir(tmp_path)  # output paths are checked while parsing: give them a writable folder
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert args.command == shlex.split(command)[1], command


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), target


def test_the_getting_started_page_gives_the_same_two_commands() -> None:
    def commands(text: str) -> list[str]:
        section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
        return re.findall(r"```bash\n(.*?)\n```", section, re.S)[:2]

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    assert commands(page) == commands(readme) and len(commands(readme)) == 2
