"""What a Speculator's schema cannot refuse, checked before anything is applied: each
error names the field, the value and the fix. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from aurora.operator.names import GPU_RESOURCE
from aurora.operator.spec import MAX_NAME_LENGTH, Resources, SpeculatorSpec

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    "": Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2**10), "Mi": Decimal(2**20),
    "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}  # fmt: skip


def parse_quantity(value: int | str) -> Decimal:
    """A Kubernetes quantity as a number ("500m" -> 0.5, "2Gi" -> 2147483648)."""
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        if suffix[:1] in ("e", "E"):
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX[suffix]
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from None


def _location(loc: Sequence[int | str]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _resource_errors(section: str, resources: Resources) -> list[str]:
    errors = []
    for kind in ("requests", "limits"):
        if GPU_RESOURCE in getattr(resources, kind):
            errors.append(
                f"spec.{section}.resources.{kind}: do not set {GPU_RESOURCE} here; set "
                f"spec.{section}.gpus, which also picks the device the command line uses"
            )
    for resource, request in resources.requests.items():
        limit = resources.limits.get(resource)
        if limit is not None and parse_quantity(request) > parse_quantity(limit):
            errors.append(
                f"spec.{section}.resources: requests.{resource} {request} exceeds "
                f"limits.{resource} {limit}; raise the limit or lower the request"
            )
    return errors


def validate_semantics(body: Mapping[str, Any]) -> list[str]:
    """Every error in a Speculator that the API server's schema did not (or could not)
    refuse, each naming the field, the value and the fix; empty when the spec is good.
    Runs the pydantic models too, so CEL rules hold even where no API server ran them."""
    return checked_spec(body)[1]


def checked_spec(body: Mapping[str, Any]) -> tuple[SpeculatorSpec | None, list[str]]:
    """The parsed spec (None when the models refuse it) and `validate_semantics`' errors."""
    name = str(body.get("metadata", {}).get("name", ""))
    errors = []
    if len(name) > MAX_NAME_LENGTH:
        errors.append(
            f"metadata.name {name!r} has {len(name)} characters; at most {MAX_NAME_LENGTH} fit "
            "the child names (<name>-server-canary): choose a shorter name"
        )
    try:
        spec = SpeculatorSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        for item in error.errors():
            message = str(item["msg"]).removeprefix("Value error, ")
            errors.append(f"{_location(item['loc'])}: {message}")
        return None, errors
    errors += _resource_errors("engine", spec.engine.resources)
    errors += _resource_errors("training", spec.training.resources)
    url = spec.traces.redis_url
    if re.match(r"^rediss?://[^/@]*:[^/@]+@", url):
        errors.append(
            "spec.traces.redisUrl carries a password, which would show in every pod spec: "
            "remove it from the URL and reference a Secret with spec.traces.passwordSecretRef"
        )
    return spec, errors
