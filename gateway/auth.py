"""Optional API keys: `Authorization: Bearer <key>` on every endpoint but the open ones.

Keys come from GATEWAY_API_KEYS and GATEWAY_API_KEYS_FILE, read once when the app is built.
The comparison takes the same time whichever key (if any) matches and however long the
candidate is: both sides are SHA-256 digests compared with `hmac.compare_digest`, every key each
time. With no key configured every request passes, and the gateway says so at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from flask import Flask, g, request

from gateway.errors import Unauthorized
from gateway.settings import PREFIX, Settings, SettingsError, parse_api_keys

log = logging.getLogger(__name__)

# The owner of every request when no key is configured (make serve's anonymous access).
ANONYMOUS = "anonymous"

# Probes and scrapes carry no key; the API description and its page hold nothing secret.
OPEN_ENDPOINTS = frozenset(
    {"gateway.healthz", "gateway.readyz", "gateway.metrics", "gateway.openapi", "docs.page",
     "docs.page_with_slash", "docs.asset"}
)


class ApiKeys:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self._digests = tuple(_digest(key) for key in keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
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
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def accepts(self, authorization: str | None) -> bool:
        return self.owner(authorization) is not None

    def owner(self, authorization: str | None) -> str | None:
        """Who sent this request: the hex SHA-256 of its key when the key is one of ours,
        else None. Jobs and Idempotency-Key records are scoped to it; it stays in the store
        (never in a log or a metric)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        candidate = _digest(token.strip())
        matched = False
        for digest in self._digests:  # no early exit: the time does not say which key matched
            matched |= hmac.compare_digest(candidate, digest)
        return candidate.hex() if matched and scheme.lower() == "bearer" else None


def require_api_key(app: Flask, keys: ApiKeys) -> None:
    if not keys.enabled:
        log.warning(
            "NO API KEYS CONFIGURED: anyone who can reach this gateway can generate images and "
            "make it upload; set %sAPI_KEYS or %sAPI_KEYS_FILE",
            PREFIX,
            PREFIX,
        )

    @app.before_request
    def _authenticate() -> None:
        # Without keys every caller is a client, as for /generate itself.
        owner = ANONYMOUS if not keys.enabled else keys.owner(request.headers.get("Authorization"))
        g.api_client = owner is not None
        g.api_owner = owner
        # Unknown paths too (endpoint None): an anonymous client learns nothing about routes.
        if g.api_client or request.endpoint in OPEN_ENDPOINTS:
            return
        raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")


def is_api_client() -> bool:
    """Whether this request carries a valid API key (always, with no key configured): what the
    open endpoints show only to clients depends on it."""
    return bool(g.get("api_client", False))


def api_owner() -> str:
    """The owner of this (authenticated) request's jobs and idempotency keys."""
    owner = g.get("api_owner")
    if owner is None:
        raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
    return str(owner)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
