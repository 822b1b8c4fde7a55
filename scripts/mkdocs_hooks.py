"""MkDocs hook: the command reference and the Python API pages, generated at build time from vitdeploy's
argparse parsers and docstrings (so `--help`, the docstrings and the site cannot drift)."""

from __future__ import annotations

from mkdocs.structure.files import File, Files

from vitdeploy.cli import build_parser
from vitdeploy.cli.reference import api_page, command_names, command_page, commands_index


def on_files(files: Files, config) -> Files:  # noqa: ANN001 (mkdocs' config type)
    parser = build_parser()
    files.append(File.generated(config, "commands/index.md", content=commands_index(parser)))
    for name in command_names(parser):
        files.append(File.generated(config, f"commands/{name}.md", content=command_page(parser, name)))
    files.append(File.generated(config, "api.md", content=api_page()))
    return files
