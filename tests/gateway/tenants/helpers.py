"""Writing tenants files for the tests."""

from __future__ import annotations

import json

from gateway.tenants.tenant import key_sha256


def tenant_entry(name: str, *keys: str, extra: str = "", **fields: int | str) -> str:
    """One `[[tenant]]` of a tenants file: the SHA-256 of each of `keys`, `fields` as TOML values
    (quotas, priority), then `extra` lines exactly as given (for values a test means to be wrong)."""
    digests = ", ".join(f'"{key_sha256(key)}"' for key in keys)
    lines = [f'name = "{name}"', f"key_sha256 = [{digests}]"]
    lines += [f"{field} = {json.dumps(value)}" for field, value in fields.items()]
    if extra:
        lines.append(extra)
    return "[[tenant]]\n" + "\n".join(lines) + "\n\n"
