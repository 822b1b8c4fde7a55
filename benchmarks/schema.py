"""The results schema (``benchmarks/schema.json``) and a small validator for the JSON Schema subset it uses.

The validator knows ``type``, ``enum``, ``properties``, ``required``, ``additionalProperties``
(boolean), ``items``, ``minimum``, ``exclusiveMinimum``, ``oneOf`` and local ``$ref``; it refuses
any other keyword, so the schema cannot silently use one it does not check. ``jsonschema``, if
installed, validates the same files (the tests check both agree).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema.json")
SCHEMA_VERSION = 1

_ANNOTATIONS = {"$schema", "$id", "title", "description", "$defs"}
_KEYWORDS = {"type", "enum", "properties", "required", "additionalProperties", "items", "minimum",
             "exclusiveMinimum", "oneOf", "$ref"} | _ANNOTATIONS
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaError(ValueError):
    """The document does not match the schema; the message names the JSON path and the problem."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The results schema as a dict."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"only local $ref are supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str) -> list[str]:
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise SchemaError(f"schema at {path} uses unsupported keywords {sorted(unknown)}")
    if "$ref" in schema:
        return _errors(value, _resolve(root, schema["$ref"]), root, path)
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not _errors(value, s, root, path)]
        if len(matches) != 1:
            return [f"{path}: matches {len(matches)} of the oneOf alternatives, expected exactly 1"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    numeric = _TYPES["number"](value)
    if numeric and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if numeric and "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{path}: {value} must be greater than {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required key {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors.extend(_errors(item, properties[key], root, f"{path}.{key}"))
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors.extend(_errors(item, schema["items"], root, f"{path}[{index}]"))
    return errors


def validation_errors(document: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every mismatch between ``document`` and the schema (empty when it is valid)."""
    schema = schema or load_schema()
    return _errors(document, schema, schema, "$")


def validate(document: Any, schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`SchemaError` naming the first few mismatches, if any."""
    errors = validation_errors(document, schema)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise SchemaError("; ".join(errors[:3]) + more)
