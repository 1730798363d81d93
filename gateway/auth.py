"""API keys: `Authorization: Bearer <key>` on every endpoint but the open ones, and the tenant
each key belongs to (gateway.tenants.tenant).

Keys come from GATEWAY_API_KEYS, GATEWAY_API_KEYS_FILE (the tenant `default`) and the SHA-256
digests of GATEWAY_TENANTS_FILE, read once when the app is built. The comparison takes the same
time whichever key (if any) matches and however long the candidate is: both sides are SHA-256
digests compared with `hmac.compare_digest`, every key each time. With no key configured every
request passes as the tenant `anonymous`, and the gateway says so at start.
"""

from __future__ import annotations

import logging

from flask import Flask, g, request

from gateway.errors import Unauthorized
from gateway.settings import PREFIX
from gateway.tenants.tenant import Tenant, Tenants

log = logging.getLogger(__name__)

# Probes and scrapes carry no key; the API description and its page hold nothing secret.
OPEN_ENDPOINTS = frozenset(
    {"gateway.healthz", "gateway.readyz", "gateway.metrics", "gateway.openapi", "docs.page",
     "docs.page_with_slash", "docs.asset"}
)
_REQUIRED = "a valid API key is required: Authorization: Bearer <key>"


def require_api_key(app: Flask, tenants: Tenants) -> None:
    if not tenants.keyed:
        log.warning(
            "NO API KEYS CONFIGURED: anyone who can reach this gateway can generate images and "
            "make it upload; set %sAPI_KEYS, %sAPI_KEYS_FILE or %sTENANTS_FILE",
            PREFIX,
            PREFIX,
            PREFIX,
        )

    @app.before_request
    def _authenticate() -> None:
        # Without keys every caller is a client (the anonymous tenant), as for /generate itself.
        found = tenants.identify(request.headers.get("Authorization"))
        g.api_client = found is not None
        g.api_tenant, g.api_owner = found if found is not None else (None, None)
        # Unknown paths too (endpoint None): an anonymous client learns nothing about routes.
        if g.api_client or request.endpoint in OPEN_ENDPOINTS:
            return
        raise Unauthorized(_REQUIRED)


def is_api_client() -> bool:
    """Whether this request carries a valid API key (always, with no key configured): what the
    open endpoints show only to clients depends on it."""
    return bool(g.get("api_client", False))


def api_owner() -> str:
    """The owner of this (authenticated) request's jobs and idempotency keys: its key's hex
    SHA-256, which stays in the store (never in a log or a metric)."""
    owner = g.get("api_owner")
    if owner is None:
        raise Unauthorized(_REQUIRED)
    return str(owner)


def api_tenant() -> Tenant:
    """The tenant of this (authenticated) request: its name goes into logs, metrics and jobs."""
    tenant = g.get("api_tenant")
    if tenant is None:
        raise Unauthorized(_REQUIRED)
    return tenant
