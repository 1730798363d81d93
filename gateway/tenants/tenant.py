"""A tenant: a named product team with its keys, quotas and Triton priority.

Tenants come from the TOML file named by GATEWAY_TENANTS_FILE, which holds no secret (the
SHA-256 of each key, never a key); the keys of GATEWAY_API_KEYS and GATEWAY_API_KEYS_FILE belong
to the tenant `default`, whose quotas are the GATEWAY_DEFAULT_* settings. The file is read once
when a process starts; its tenants bound every per-tenant metric label.

    [[tenant]]
    name = "storefront"                 # [a-z0-9-], unique
    key_sha256 = ["<64 hex digits>"]    # SHA-256 of each key; several allow rotation
    requests_per_minute = 120           # POST /generate and POST /jobs together; 0: no limit
    max_concurrent = 8                  # generations in flight, synchronous and jobs; 0: no limit
    priority = "interactive"            # or "batch": Triton's level for its /generate calls
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from gateway.settings import PREFIX, Settings, SettingsError, parse_api_keys, parse_priority
from gateway.triton.contract import Priority

DEFAULT = "default"  # the tenant of the keys in settings
ANONYMOUS = "anonymous"  # the tenant of every request when no key is configured (make serve)
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
_FIELDS = {"name", "key_sha256", "requests_per_minute", "max_concurrent", "priority"}
_SETTING = f"{PREFIX}TENANTS_FILE"


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: int = 0  # 0: no limit
    max_concurrent: int = 0  # 0: no limit
    priority: Priority = Priority.INTERACTIVE

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"tenant name {self.name!r} must be 1-40 of a-z 0-9 - (not first or last)"
            )
        if self.requests_per_minute < 0 or self.max_concurrent < 0:
            raise ValueError(f"tenant {self.name!r}: quotas must be >= 0 (0: no limit)")

    @classmethod
    def from_defaults(cls, name: str, settings: Settings) -> Tenant:
        """A tenant with the GATEWAY_DEFAULT_* quotas and priority (`default`, `anonymous`)."""
        return cls(
            name,
            requests_per_minute=settings.default_requests_per_minute,
            max_concurrent=settings.default_max_concurrent,
            priority=settings.default_priority,
        )


class Tenants:
    """Every tenant, and which one a key belongs to.

    A lookup compares the SHA-256 of the presented key with every known digest by
    `hmac.compare_digest`, with no early exit: how long it takes says nothing about which key
    (if any) matched."""

    def __init__(self, keyed: list[tuple[bytes, Tenant]], tenants: tuple[Tenant, ...]) -> None:
        self._keyed = tuple(keyed)
        self.all = tenants
        self.by_name = {t.name: t for t in tenants}

    @classmethod
    def from_settings(cls, settings: Settings) -> Tenants:
        default = Tenant.from_defaults(DEFAULT, settings)
        keyed = [(_digest(key), default) for key in _settings_keys(settings)]
        tenants = [default] if keyed else []
        if settings.tenants_file is not None:
            for tenant, digests in _read_file(Path(settings.tenants_file)):
                if tenant.name in {t.name for t in tenants} | {ANONYMOUS}:
                    raise SettingsError(f"{_SETTING}: tenant {tenant.name!r} is named twice "
                                        f"(or takes a reserved name)")
                tenants.append(tenant)
                keyed.extend((digest, tenant) for digest in digests)
        digests = [digest for digest, _ in keyed]
        if len(set(digests)) != len(digests):
            raise SettingsError(f"{_SETTING}: a key belongs to two tenants")
        if not keyed:
            # No key anywhere: everyone is one tenant (the local stack's anonymous access).
            return cls([], (Tenant.from_defaults(ANONYMOUS, settings),))
        return cls(keyed, tuple(tenants))

    @property
    def keyed(self) -> bool:
        """Whether any key is configured (else every request is the anonymous tenant's)."""
        return bool(self._keyed)

    def identify(self, authorization: str | None) -> tuple[Tenant, str] | None:
        """The tenant of this `Authorization` header and its key's owner id (the key's hex
        SHA-256, which scopes jobs and Idempotency-Key records), or None for no valid key."""
        if not self._keyed:
            return self.all[0], ANONYMOUS
        scheme, _, token = (authorization or "").strip().partition(" ")
        candidate = _digest(token.strip())
        found: Tenant | None = None
        for digest, tenant in self._keyed:
            if hmac.compare_digest(candidate, digest):
                found = tenant
        if found is None or scheme.lower() != "bearer":
            return None
        return found, candidate.hex()


def key_sha256(key: str) -> str:
    """What the tenants file holds for `key`: `printf %s KEY | sha256sum`."""
    return _digest(key).hex()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _settings_keys(settings: Settings) -> tuple[str, ...]:
    keys = settings.api_keys
    if settings.api_keys_file is not None:
        name = f"{PREFIX}API_KEYS_FILE"
        try:
            from_file = parse_api_keys(Path(settings.api_keys_file).read_text("utf-8"))
        except OSError as exc:
            raise SettingsError(f"{name}={settings.api_keys_file!r}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{name}={settings.api_keys_file!r}: {exc}") from None
        if not from_file:
            raise SettingsError(f"{name}={settings.api_keys_file!r} holds no key")
        keys = keys + from_file
    return keys


def _read_file(path: Path) -> list[tuple[Tenant, list[bytes]]]:
    where = f"{_SETTING}={str(path)!r}"
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise SettingsError(f"{where}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: not TOML: {exc}") from None
    unknown = sorted(set(document) - {"tenant"})
    if unknown:
        raise SettingsError(f"{where}: unknown table {unknown[0]!r} (expected [[tenant]])")
    entries = document.get("tenant", [])
    if not isinstance(entries, list) or not entries:
        raise SettingsError(f"{where}: no [[tenant]]")
    return [_entry(entry, f"{where}: [[tenant]] {i + 1}") for i, entry in enumerate(entries)]


def _entry(entry: dict[str, Any], where: str) -> tuple[Tenant, list[bytes]]:
    name = entry.get("name")
    if not isinstance(name, str):
        raise SettingsError(f"{where}: name must be a string")
    where = f"{where} ({name!r})"
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise SettingsError(f"{where}: unknown field {unknown[0]!r}")
    digests = entry.get("key_sha256")
    if not isinstance(digests, list) or not digests:
        raise SettingsError(f"{where}: key_sha256 must be a list of at least one digest")
    for digest in digests:
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise SettingsError(f"{where}: key_sha256 entries must be 64 lowercase hex digits")
    quotas: dict[str, int] = {}
    for field in ("requests_per_minute", "max_concurrent"):
        value = entry.get(field, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SettingsError(f"{where}: {field} must be an integer")
        quotas[field] = value
    try:
        priority = parse_priority(entry.get("priority", "interactive"))
        tenant = Tenant(name, priority=priority, **quotas)
    except (ValueError, AttributeError) as exc:
        raise SettingsError(f"{where}: {exc}") from None
    return tenant, [bytes.fromhex(d) for d in digests]
