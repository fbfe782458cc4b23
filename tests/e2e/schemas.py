"""TEST SCAFFOLDING: JSON schemas for kubeconform, generated from a real API server's
OpenAPI (GET /openapi/v2) instead of downloaded (GitHub is not reachable here). The API
server publishes every built-in kind and every installed CRD's schema there, so the
schemas match the Kubernetes version the e2e tests run.

One file per kind, at `<dest>/<group>/<kind>_<version>.json` (core kinds at
`<dest>/v1/<kind>_v1.json`: kubeconform's `.Group` of "v1" is "v1"), the layout kubeconform
reads with
`-schema-location '<dest>/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json'`.
Each holds the definitions its kind reaches. As in the upstream "standalone-strict"
schemas: objects refuse unknown fields (unless marked x-kubernetes-preserve-unknown-
fields), int-or-string and quantities take a string or a number.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_STRING_OR_INTEGER = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_STRING_OR_NUMBER = {"oneOf": [{"type": "string"}, {"type": "number"}]}


def _strict(schema: Any) -> Any:
    """A schema node rewritten for strict validation, recursing into its sub-schemas
    (not into `properties` maps, whose keys are field names such as "format")."""
    if not isinstance(schema, Mapping):
        return schema
    if schema.get("format") == "int-or-string" or schema.get("x-kubernetes-int-or-string") is True:
        return dict(_STRING_OR_INTEGER)
    out = dict(schema)
    if isinstance(schema.get("properties"), Mapping):
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), Mapping):
            out[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            out[key] = [_strict(sub) for sub in schema[key]]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"].rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _reachable(definitions: Mapping[str, Any], root: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen[name] = definitions[name]
        todo.extend(_refs(definitions[name]))
    return seen


def _converted(name: str, definition: Mapping[str, Any]) -> Any:
    if name.endswith("apimachinery.pkg.util.intstr.IntOrString"):
        return dict(_STRING_OR_INTEGER)
    if name.endswith("apimachinery.pkg.api.resource.Quantity"):
        return dict(_STRING_OR_NUMBER)
    return _strict(definition)


def write_schemas(openapi_v2: Mapping[str, Any], dest: Path) -> list[str]:
    """Write a schema per kind in `openapi_v2`; returns the `group/version/kind`s written."""
    definitions = openapi_v2["definitions"]
    written = []
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind") or []:
            group, version, kind = gvk.get("group", ""), gvk["version"], gvk["kind"]
            reach = _reachable(definitions, name)
            schema = copy.deepcopy(_converted(name, definition))
            schema["definitions"] = {n: _converted(n, d) for n, d in reach.items()}
            folder = dest / (group or version)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{kind.lower()}_{version}.json").write_text(json.dumps(schema))
            written.append(f"{group}/{version}/{kind}")
    return written


SCHEMA_LOCATION = "{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json"
