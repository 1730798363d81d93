"""Response bodies as typed dataclasses: one declaration gives both the JSON the views send
(`to_json`) and the JSON Schema the OpenAPI document publishes (`schemas`), so a field added to a
response cannot be missing from the document.

Field metadata (`described`) holds the description and any JSON Schema keywords of that field;
`omit_none=True` leaves the field out of the JSON when it is None (and out of `required`),
otherwise None is sent as null.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Iterable
from typing import Any

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def described(description: str, *, omit_none: bool = False, **keywords: Any) -> Any:
    """A dataclass field of a response body (no default: every field is set when built)."""
    return dataclasses.field(
        metadata={"description": description, "omit_none": omit_none, "keywords": keywords}
    )


def to_json(body: Any) -> Any:
    """A response dataclass (or anything inside one) as plain JSON values, in field order."""
    if dataclasses.is_dataclass(body) and not isinstance(body, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = to_json(value)
        return out
    if isinstance(body, enum.Enum):
        return body.value
    if isinstance(body, dict):
        return {key: to_json(value) for key, value in body.items()}
    if isinstance(body, (list, tuple)):
        return [to_json(value) for value in body]
    return body


def schemas(*roots: type) -> dict[str, dict[str, Any]]:
    """JSON Schemas of these response types and of every dataclass they contain, by class name
    (for `components.schemas`; nested ones are `$ref`s)."""
    found: dict[str, dict[str, Any]] = {}
    pending = list(roots)
    while pending:
        cls = pending.pop()
        if cls.__name__ in found:
            continue
        schema, nested = _object_schema(cls)
        found[cls.__name__] = schema
        pending.extend(nested)
    return found


def ref(cls: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _object_schema(cls: type) -> tuple[dict[str, Any], list[type]]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    nested: list[type] = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        omit_none = bool(f.metadata.get("omit_none"))
        if omit_none:
            annotation = _without_none(annotation)
        else:
            required.append(f.name)
        prop = _type_schema(annotation, nested)
        prop.update(f.metadata.get("keywords", {}))
        if f.metadata.get("description"):
            prop["description"] = f.metadata["description"]
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # dataclass's own doc
        schema["description"] = " ".join(cls.__doc__.split())
    return schema, nested


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _is_union(annotation) and len(args) == 1:
        return args[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_schema(annotation: Any, nested: list[type]) -> dict[str, Any]:
    if annotation is Any:
        return {}
    if _is_union(annotation):
        variants = [_type_schema(a, nested) for a in typing.get_args(annotation)]
        simple = [v for v in variants if set(v) == {"type"}]
        if len(simple) == len(variants):  # e.g. ["number", "null"]
            return {"type": [v["type"] for v in variants]}
        return {"anyOf": variants}
    if annotation is type(None):
        return {"type": "null"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"type": "string", "enum": [member.value for member in annotation]}
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    if dataclasses.is_dataclass(annotation):
        nested.append(annotation)  # type: ignore[arg-type]
        return ref(annotation)  # type: ignore[arg-type]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) or origin is Iterable:
        return {"type": "array", "items": _type_schema(args[0], nested)}
    if origin is dict:
        values = _type_schema(args[1], nested)
        return {"type": "object", "additionalProperties": values} if values else {"type": "object"}
    raise TypeError(f"no JSON Schema for {annotation!r}")
