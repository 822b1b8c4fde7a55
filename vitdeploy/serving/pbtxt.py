"""Protobuf text format (``config.pbtxt``) from plain Python values, without protobuf.

The repository writer describes a Triton ``ModelConfig`` as nested dicts and lists; this
module prints them the way ``google.protobuf.text_format`` reads them. Enum values are
:class:`Enum` so they are written bare (``TYPE_FP32``), strings are quoted and escaped,
a list of scalars is ``field: [a, b]``, a list of dicts is one ``field { ... }`` block per
item (repeated messages and map entries alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

INDENT = "  "


@dataclass(frozen=True)
class Enum:
    """A protobuf enum value, written without quotes."""

    name: str

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").isalnum() or not self.name[:1].isalpha():
            raise ValueError(f"enum value {self.name!r} is not an identifier")


def quote(text: str) -> str:
    """``text`` as a text-format string literal (UTF-8 kept, quotes/backslashes/control bytes escaped)."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def scalar(value: Any) -> str:
    """One scalar field value in text format."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a protobuf scalar")


def _lines(message: Mapping[str, Any], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_lines(value, depth + 1), f"{pad}}}"]
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if value and all(isinstance(item, Mapping) for item in value):
                for item in value:
                    lines += [f"{pad}{key} {{", *_lines(item, depth + 1), f"{pad}}}"]
            elif value:
                lines.append(f"{pad}{key}: [ {', '.join(scalar(item) for item in value)} ]")
        else:
            lines.append(f"{pad}{key}: {scalar(value)}")
    return lines


def to_text(message: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """The text-format rendering of ``message``, after ``# ``-comment lines from ``header``."""
    comments = [f"# {line}".rstrip() for text in header for line in text.splitlines()]
    return "\n".join([*comments, *_lines(message, 0)]) + "\n"
