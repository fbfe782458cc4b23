"""What the Kubernetes API server does with a structural OpenAPI v3 schema, for the
parts unit tests check without a cluster: defaulting and value validation (type, enum,
pattern, ranges, lengths, required, unknown fields as `kubectl --validate=strict` sees
them). CEL rules are not evaluated here; the e2e tests run them in a real API server.
"""

from __future__ import annotations

import copy
import re
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill absent fields that have a `default`, outside in, as the API server does."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key in value:
            value[key] = apply_defaults(schema["additionalProperties"], value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: problem' strings (empty when valid)."""
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, int | str) or isinstance(value, bool):
            return [f"{path}: {value!r} is neither an integer nor a string"]
    elif "type" in schema:
        kinds = _TYPES[schema["type"]]
        if not isinstance(value, kinds) or (
            isinstance(value, bool) and schema["type"] != "boolean"
        ):
            return [f"{path}: {value!r} is not of type {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
    if isinstance(value, int | float) and not isinstance(value, bool) and "type" in schema:
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += validate(schema.get("items", {}), item, f"{path}[{i}]")
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        errors += [
            f"{path}.{name}: required" for name in schema.get("required", []) if name not in value
        ]
        for key, item in value.items():
            if key in properties:
                errors += validate(properties[key], item, f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += validate(extra, item, f"{path}.{key}")
            elif properties:  # an object without properties (metadata) is not checked here
                errors.append(f"{path}.{key}: unknown field")
    return errors


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, the root first."""
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            nodes += walk(schema[key], f"{path}[]")
    return nodes
