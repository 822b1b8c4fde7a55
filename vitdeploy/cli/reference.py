"""Each command's reference page, rendered from its argparse parser (so ``--help`` and the docs cannot drift)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Iterator

__all__ = ["PUBLIC_API", "api_page", "command_names", "command_page", "commands_index"]


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError(f"the parser {parser.prog!r} has no subcommands")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return dict(_subcommands(parser).choices)


def command_names(parser: argparse.ArgumentParser) -> list[str]:
    """The subcommands of ``parser`` (``vitdeploy.cli.build_parser()``) in help order."""
    return list(_subparsers(parser))


def _summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {choice.dest: choice.help or "" for choice in _subcommands(parser)._choices_actions}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    metavar = ""
    if action.nargs != 0:
        if action.metavar is not None:
            metavar = f" {action.metavar if isinstance(action.metavar, str) else ' '.join(action.metavar)}"
        elif action.choices is not None:
            metavar = " {" + ",".join(str(choice) for choice in action.choices) + "}"
        else:
            metavar = f" {action.dest.upper()}"
    return ", ".join(f"`{option}{metavar}`" for option in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        values = {**vars(action), "prog": "vitdeploy"}
        if action.choices is not None:
            values["choices"] = ", ".join(str(choice) for choice in action.choices)
        text = text % values
    if action.choices is not None and action.option_strings and "{" not in _flags(action):
        text += f" (one of: {', '.join(str(choice) for choice in action.choices)})"
    if action.required and action.option_strings:
        text = f"**required.** {text}"
    return _cell(text)


def command_page(parser: argparse.ArgumentParser, name: str) -> str:
    """The Markdown reference page of ``vitdeploy NAME`` from the top-level ``parser``: usage, description,
    every argument and the epilog."""
    summary = _summaries(parser).get(name, "")
    parsers = _subparsers(parser)
    if name not in parsers:
        raise ValueError(f"unknown command {name!r}: expected one of {', '.join(parsers)}")
    parser = parsers[name]
    with _columns(100):  # argparse wraps the usage to the terminal: the page must not depend on it
        usage = re.sub(r"^usage:\s*", "", parser.format_usage().strip())
    lines = [f"# vitdeploy {name}", "", summary, "", "```text", usage, "```", ""]
    if parser.description:
        raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter) and "\n" in parser.description
        lines += ["```text", parser.description.strip(), "```", ""] if raw else [parser.description, ""]
    positionals = [action for action in parser._actions if not action.option_strings]
    options = [action for action in parser._actions
               if action.option_strings and action.help is not argparse.SUPPRESS]
    if positionals:
        lines += ["## Arguments", "", "| argument | meaning |", "| --- | --- |"]
        lines += [f"| {_flags(action)} | {_help(action)} |" for action in positionals]
        lines.append("")
    if options:
        lines += ["## Options", "", "| option | meaning |", "| --- | --- |"]
        lines += [f"| {_flags(action)} | {_help(action)} |" for action in options]
        lines.append("")
    if parser.epilog:
        lines += ["## Notes", "", "```text", parser.epilog.strip(), "```", ""]
    lines += ["*This page is generated from the command's parser: it says what `vitdeploy "
              f"{name} --help` says.*", ""]
    return "\n".join(lines)


def commands_index(parser: argparse.ArgumentParser) -> str:
    """The Markdown index of every command of ``parser``, one line each with its summary."""
    summaries = _summaries(parser)
    lines = ["# Commands", "", "Every command has `--help`; these pages are generated from the same parsers.", "",
             "| command | what it does |", "| --- | --- |"]
    lines += [f"| [`{name}`]({name}.md) | {_cell(summaries.get(name, ''))} |" for name in command_names(parser)]
    return "\n".join(lines) + "\n"


# The public Python API, in the order the API page lists it: (module, names).
PUBLIC_API: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vitdeploy", ("load_model", "create_model", "save_model", "list_variants")),
    ("vitdeploy.runtimes", ("load", "Runtime", "InputSpec", "validate_input")),
    ("vitdeploy.pipeline", ("deploy",)),
)


def _signature(obj: object) -> str:
    import inspect

    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _markdown(docstring: str) -> str:
    """A docstring's reST roles (``:class:`X` ``) as Markdown code spans."""
    return re.sub(r":(?:class|func|mod|meth|attr|data|exc):`~?([^`]+)`", r"`\1`", docstring)


def api_page(api: tuple[tuple[str, tuple[str, ...]], ...] = PUBLIC_API) -> str:
    """The Markdown page of the public Python API: each object's signature and docstring (and a class's
    public methods), read from the objects themselves."""
    import inspect
    from importlib import import_module

    lines = ["# Python API", "", "Generated from the docstrings of the installed package.", ""]
    for module_name, names in api:
        module = import_module(module_name)
        lines += [f"## `{module_name}`", ""]
        if module.__doc__:
            lines += [inspect.cleandoc(module.__doc__).split("\n\n")[0], ""]
        for name in names:
            obj = getattr(module, name)
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{module_name}.{name}`", "", "```python", f"{kind} {name}{_signature(obj)}", "```", ""]
            lines += [_markdown(inspect.getdoc(obj) or "*(no docstring)*"), ""]
            if inspect.isclass(obj):
                for member_name, member in vars(obj).items():
                    if member_name.startswith("_") or not callable(member) or not member.__doc__:
                        continue
                    lines += [f"#### `{name}.{member_name}`", "", "```python",
                              f"def {member_name}{_signature(member)}", "```", "", _markdown(inspect.getdoc(member) or ""), ""]
    return "\n".join(lines)
