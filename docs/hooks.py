"""MkDocs hooks (mkdocs.yml `hooks:`): the parts of the site that the code already states.

A page asks for a generated block with a marker line, `<!-- generated: NAME -->`:

- `settings`: every `GATEWAY_*` variable, its default and meaning (`gateway.settings`);
- `front-door-settings`: every `FRONT_*` variable of the front door (`embedded.front_door`);
- `endpoints`: each path and method of the OpenAPI document with its summary and statuses;
- `generate-fields`, `moderate-fields`: the request fields with their defaults and ranges.

The site also gets `openapi.json`: the document a gateway with the default settings serves.
Everything comes from `gateway.openapi.build_openapi` and `gateway.settings`, so building the
site needs no Triton and reads no environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from embedded.front_door import settings_table as front_door_settings_table
from gateway.openapi import build_openapi
from gateway.settings import Settings, settings_table

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)
OPENAPI_FILE = "openapi.json"
# Any well-formed key: the document marks the operations that need one only when keys are set.
_EXAMPLE_KEY = "docs-example-key-0000"


def openapi_document(*, with_keys: bool = False) -> dict[str, Any]:
    env = {"GATEWAY_API_KEYS": _EXAMPLE_KEY} if with_keys else {}
    return build_openapi(Settings.from_env(env))


def settings_markdown() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for variable, default, meaning in settings_table():
        shown = f"`{default}`" if default else "(empty)"
        lines.append(f"| `{variable}` | {shown} | {meaning} |")
    return "\n".join(lines)


def front_door_settings_markdown() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for variable, default, meaning in front_door_settings_table():
        lines.append(f"| `{variable}` | `{default}` | {meaning} |")
    return "\n".join(lines)


def endpoints_markdown() -> str:
    keyed = openapi_document(with_keys=True)["paths"]
    lines = ["| Method | Path | What it does | API key | Statuses |", "|---|---|---|---|---|"]
    for path, operations in keyed.items():
        for method, operation in operations.items():
            key = "when configured" if operation.get("security") else "never"
            statuses = ", ".join(operation["responses"])
            lines.append(
                f"| `{method.upper()}` | `{path}` | {operation['summary']} | {key} | {statuses} |"
            )
    return "\n".join(lines)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _accepted(branch: dict[str, Any]) -> str:
    if "enum" in branch:
        return ", ".join(f"`{json.dumps(value)}`" for value in branch["enum"])
    kind = branch["type"]
    if kind == "boolean":
        return "`true`, `false`"
    if kind == "string":
        low, high = branch.get("minLength"), branch.get("maxLength")
        if low and high:
            return f"{low}..{high} characters"
        return f"at most {high} characters" if high else "any"
    text = f"{_number(branch['minimum'])}..{_number(branch['maximum'])}"
    if "multipleOf" in branch:
        text += f", a multiple of {_number(branch['multipleOf'])}"
    return text


def fields_markdown(schema: dict[str, Any]) -> str:
    lines = ["| Field | Type | Default | Accepted | Meaning |", "|---|---|---|---|---|"]
    for name, field in schema["properties"].items():
        branch = field.get("anyOf", [field])[0]
        if name in schema.get("required", ()):
            default = "required"
        elif "default" in field:
            default = f"`{json.dumps(field['default'])}`"
        else:
            default = "—"
        lines.append(
            f"| `{name}` | {branch['type']} | {default} | {_accepted(branch)} "
            f"| {field['description']} |"
        )
    return "\n".join(lines)


def _request_fields(name: str) -> Callable[[], str]:
    return lambda: fields_markdown(openapi_document()["components"]["schemas"][name])


GENERATED: dict[str, Callable[[], str]] = {
    "settings": settings_markdown,
    "front-door-settings": front_door_settings_markdown,
    "endpoints": endpoints_markdown,
    "generate-fields": _request_fields("GenerateRequest"),
    "moderate-fields": _request_fields("ModerateRequest"),
}


def render(markdown: str, where: str = "a page") -> str:
    """The page with each marker line replaced by its generated block."""

    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATED:
            raise PluginError(f"{where}: no generated block named {name!r} ({sorted(GENERATED)})")
        return GENERATED[name]()

    return MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    return render(markdown, page.file.src_uri)


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    # A file of the site, so that pages can link to it and links are checked.
    files.append(
        File.generated(config, OPENAPI_FILE, content=json.dumps(openapi_document(), indent=2))
    )
    return files
