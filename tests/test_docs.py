"""The documentation site: command pages generated from the parsers, and a strict build that fails on a
broken link or a missing page."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitdeploy.cli import COMMANDS, build_parser
from vitdeploy.cli.reference import api_page, command_page, commands_index

ROOT = Path(__file__).resolve().parents[1]


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("name", COMMANDS)
def test_command_page_names_every_argument_of_its_parser(name):
    parser = _command_parsers()[name]
    page = command_page(build_parser(), name)
    assert page.startswith(f"# vitdeploy {name}\n")
    for action in parser._actions:
        if action.help is argparse.SUPPRESS:
            continue
        for option in action.option_strings:
            assert f"`{option}" in page, f"{name}: {option} missing from its page"
        if not action.option_strings:
            assert f"`{action.metavar or action.dest}`" in page
        first_words = " ".join((action.help or "").split()[:4]).replace("|", "\\|")
        if first_words and "%(" not in first_words:
            assert first_words in page, f"{name}: the help of {action.dest} is missing from its page"


def test_command_page_refuses_an_unknown_command():
    with pytest.raises(ValueError, match="unknown command 'depoly'"):
        command_page(build_parser(), "depoly")


def test_nav_lists_every_command_page_and_the_index_links_them():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages: list[str] = []

    def walk(entries):
        for entry in entries:
            if isinstance(entry, str):
                pages.append(entry)
            else:
                for value in entry.values():
                    walk(value) if isinstance(value, list) else pages.append(value)

    walk(config["nav"])
    for name in COMMANDS:
        assert f"commands/{name}.md" in pages
        assert f"]({name}.md)" in commands_index(build_parser())
    assert "api.md" in pages


def test_api_page_shows_signatures_and_docstrings():
    page = api_page()
    assert "### `vitdeploy.runtimes.load`" in page
    assert "def load(path" in page
    assert ":class:" not in page and ":func:" not in page


def _build(folder: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(folder / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def docs_copy(tmp_path_factory) -> Path:
    """The site's sources (mkdocs.yml, docs/, the hook) in a folder of their own."""
    folder = tmp_path_factory.mktemp("docs")
    shutil.copy(ROOT / "mkdocs.yml", folder / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", folder / "docs")
    (folder / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "mkdocs_hooks.py", folder / "scripts" / "mkdocs_hooks.py")
    return folder


def test_site_builds_strictly_with_a_page_per_command(docs_copy, tmp_path):
    result = _build(docs_copy, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert (tmp_path / "site" / "commands" / name / "index.html").is_file()
    assert "vitdeploy verify" in (tmp_path / "site" / "commands" / "verify" / "index.html").read_text()


def test_a_broken_link_fails_the_strict_build(docs_copy, tmp_path):
    page = docs_copy / "docs" / "index.md"
    original = page.read_text()
    page.write_text(original + "\nSee [the missing page](no-such-page.md).\n")
    try:
        result = _build(docs_copy, tmp_path / "site")
    finally:
        page.write_text(original)
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr
