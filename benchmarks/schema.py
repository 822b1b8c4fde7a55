"""The results schema (``benchmarks/schema.json``) and validation against it with ``jsonschema``.

``jsonschema`` is in the ``bench`` and ``dev`` extras; :func:`validate` raises
:class:`SchemaError` naming the JSON path of the first few mismatches.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema.json")
SCHEMA_VERSION = 1


class SchemaError(ValueError):
    """The document does not match the schema; the message names the JSON path and the problem."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The results schema as a dict."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validation_errors(document: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every mismatch between ``document`` and the schema as ``$.path: message`` (empty when valid)."""
    import jsonschema

    schema = schema or load_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{error.json_path}: {error.message}" for error in errors]


def validate(document: Any, schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`SchemaError` naming the first few mismatches, if any."""
    errors = validation_errors(document, schema)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise SchemaError("; ".join(errors[:3]) + more)
