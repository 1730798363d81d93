"""Strict JSON request bodies checked against a table of fields.

Each endpoint declares its fields once (`FieldSpec`s: kind, default, range, description); the
same table validates the body here and describes it in the OpenAPI document. `check_fields`
either returns the coerced values or raises an `InvalidRequest` naming the first field at fault.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import InvalidRequest, UnsupportedMediaType

_NO_DEFAULT = object()
# Bounded before int() so a megabyte of digits costs nothing; 18 digits stay inside INT64.
_DIGITS = re.compile(r"[0-9]{1,18}", re.ASCII)
_DECIMAL = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?", re.ASCII)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Literal["string", "integer", "number", "boolean", "enum"]
    description: str
    default: Any = _NO_DEFAULT
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    enum: tuple[str, ...] = ()

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


def _variants(spec: FieldSpec) -> list[dict[str, Any]]:
    if spec.kind == "string":
        string: dict[str, Any] = {"type": "string"}
        if spec.max_length is not None:
            string["maxLength"] = spec.max_length
        if spec.required:
            string["minLength"] = 1
        return [string]
    if spec.kind == "enum":
        return [{"type": "string", "enum": list(spec.enum)}]
    if spec.kind == "boolean":
        return [
            {"type": "boolean"},
            {"type": "string", "pattern": "^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$"},
        ]
    number: dict[str, Any] = {"type": "integer" if spec.kind == "integer" else "number"}
    if spec.minimum is not None:
        number["minimum"] = spec.minimum
    if spec.maximum is not None:
        number["maximum"] = spec.maximum
    if spec.multiple_of:
        number["multipleOf"] = spec.multiple_of
    # Strings are range-checked too, after conversion; JSON Schema cannot say so.
    pattern = "^[0-9]{1,18}$" if spec.kind == "integer" else r"^[0-9]{1,6}(\.[0-9]{1,6})?$"
    return [number, {"type": "string", "pattern": pattern}]


def field_schema(spec: FieldSpec) -> dict[str, Any]:
    """The JSON Schema of what `check_fields` accepts for this field."""
    variants = _variants(spec)
    if not spec.required:
        variants.append({"type": "null"})  # null means "not given", like leaving it out
    schema: dict[str, Any] = {"anyOf": variants} if len(variants) > 1 else dict(variants[0])
    schema["description"] = spec.description
    if spec.has_default:
        schema["default"] = spec.default
    return schema


def object_schema(fields: Sequence[FieldSpec]) -> dict[str, Any]:
    """A JSON body of exactly these fields: unknown ones are refused, as the parsers do."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [f.name for f in fields if f.required],
        "properties": {f.name: field_schema(f) for f in fields},
    }


def parse_body(raw: bytes, content_type: str | None) -> Any:
    """Decode a JSON body strictly: UTF-8 only, no NaN/Infinity, no duplicate keys."""
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if mimetype != "application/json" and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        raise UnsupportedMediaType("the body must be JSON, sent with Content-Type: application/json")
    if not raw.strip():
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        # A leading BOM is allowed (RFC 8259 lets parsers ignore it); nothing else but UTF-8.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except _DuplicateKey as dup:
        raise InvalidRequest(f"field {dup.key!r} is given more than once", field=dup.key) from None
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError's message carries only a position, never request text.
        detail = f": {exc.msg} at position {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidRequest(f"the request body is not valid JSON{detail}") from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_fields(payload: Any, fields: tuple[FieldSpec, ...]) -> dict[str, Any]:
    """A JSON object checked against a field table: unknown fields refused, each value coerced,
    defaults filled in; raises `InvalidRequest` naming the first field at fault."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"the body must be a JSON object, not {_json_type(payload)}")
    by_name = {f.name: f for f in fields}
    unknown = [k for k in payload if k not in by_name]
    if unknown:
        first = unknown[0]
        hint = difflib.get_close_matches(first, by_name, n=1)
        message = f"unknown field {_show_key(first)}"
        if hint:
            message += f" (did you mean {hint[0]!r}?)"
        if len(unknown) > 1:
            message += f"; {len(unknown) - 1} more unknown field(s)"
        raise InvalidRequest(message, field=first[:100])

    values: dict[str, Any] = {}
    for spec in fields:
        raw = payload.get(spec.name)
        if raw is None:  # absent and null both mean "not given"
            if spec.required:
                raise InvalidRequest(f"{spec.name} is required", field=spec.name)
            values[spec.name] = spec.default if spec.has_default else None
            continue
        values[spec.name] = _COERCE[spec.kind](spec, raw)
    return values


def _coerce_string(spec: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str):
        raise _type_error(spec, raw, "a string")
    if spec.max_length is not None and len(raw) > spec.max_length:
        raise InvalidRequest(
            f"{spec.name} is {len(raw)} characters long; the limit is {spec.max_length}",
            field=spec.name,
        )
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise InvalidRequest(f"{spec.name} is not valid Unicode text", field=spec.name) from None
    return raw


def _coerce_integer(spec: FieldSpec, raw: Any) -> int:
    # bool is an int subclass in Python: true must not pass as 1.
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and _DIGITS.fullmatch(raw):
        value = int(raw)
    else:
        raise _type_error(spec, raw, "an integer (JSON number or digit string)")
    _check_range(spec, value)
    if spec.multiple_of and value % spec.multiple_of:
        raise InvalidRequest(
            f"{spec.name} must be a multiple of {spec.multiple_of} (got {value})", field=spec.name
        )
    return value


def _coerce_number(spec: FieldSpec, raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:  # an integer beyond float range
            value = math.inf
    elif isinstance(raw, str) and _DECIMAL.fullmatch(raw):
        value = float(raw)
    else:
        raise _type_error(spec, raw, "a number")
    if not math.isfinite(value):
        raise InvalidRequest(f"{spec.name} is out of range", field=spec.name)
    _check_range(spec, value)
    return value


def _coerce_boolean(spec: FieldSpec, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise _type_error(spec, raw, 'a boolean (true/false or "true"/"false")')


def _coerce_enum(spec: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str) or raw not in spec.enum:
        choices = ", ".join(f'"{c}"' for c in spec.enum)
        raise InvalidRequest(f"{spec.name} must be one of {choices}", field=spec.name)
    return raw


_COERCE: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "string": _coerce_string,
    "integer": _coerce_integer,
    "number": _coerce_number,
    "boolean": _coerce_boolean,
    "enum": _coerce_enum,
}


def _check_range(spec: FieldSpec, value: float) -> None:
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        shown = value if abs(value) < 1e12 else "a very large number"
        raise InvalidRequest(
            f"{spec.name} must be between {_num(spec.minimum)} and {_num(spec.maximum)} "
            f"(got {shown})",
            field=spec.name,
        )


def _type_error(spec: FieldSpec, raw: Any, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"{spec.name} must be {expected}, not {_json_type(raw)}", field=spec.name
    )


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "that string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _show_key(key: str) -> str:
    # Keys come from the client: bounded and repr-escaped so the message stays one safe line.
    return repr(key if len(key) <= 100 else key[:100] + "…")


def _num(value: float | None) -> str:
    if value is None:
        return "∞"
    return str(int(value)) if float(value).is_integer() else str(value)
