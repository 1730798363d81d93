"""The app factory: settings in, a Flask app with its clients built and attached out."""

from __future__ import annotations

import logging
import os
import time

from flask import Flask, Response, g, request

from gateway import docs, views
from gateway.auth import require_api_key
from gateway.backpressure import limit_in_flight, limit_moderations
from gateway.errors import register_error_handlers
from gateway.forwarded import ClientAddress
from gateway.jobs import views as job_views
from gateway.jobs.store import QueueGauge
from gateway.logs import track_request_ids
from gateway.metrics import Metrics
from gateway.readiness import ReadinessCache
from gateway.services import Services
from gateway.settings import Settings, SettingsError
from gateway.tenants.admission import admit_tenants
from gateway.tenants.quotas import unenforceable
from gateway.tenants.tenant import Tenants


def create_app(config: Settings | None = None) -> Flask:
    """Build the gateway; without `config`, settings come from the `GATEWAY_*` environment."""
    settings = config if config is not None else Settings.from_env(os.environ)
    if config is None and (problem := settings.anonymous_problem()) is not None:
        raise SettingsError(problem)  # a real start (gunicorn's, any WSGI server's): no keys
    app = Flask(__name__)
    # Werkzeug enforces it while reading, chunked bodies included, and answers 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the spec's field order
    logging.getLogger("gateway").setLevel(settings.log_level)

    metrics = Metrics(settings.metrics_dir)
    tenants = app.extensions["gateway_tenants"] = Tenants.from_settings(settings)
    unenforceable(settings, tenants.all)
    metrics.tenants_known(tenant.name for tenant in tenants.all)
    app.extensions["gateway"] = Services.build(settings, metrics)
    app.extensions["gateway_readiness"] = ReadinessCache(
        app.extensions["gateway"], settings.ready_cache_s
    )
    store = app.extensions["gateway"].store
    if store is not None:
        tenant_names = [t.name for t in app.extensions["gateway_tenants"].all]
        app.extensions["gateway_queue_reading"] = QueueGauge(store.jobs, tenants=tenant_names)
    register_error_handlers(app)
    # In this order: a refused request still gets its request id, an anonymous one never counts
    # against a quota, and one over its tenant's quota never takes an in-flight slot.
    track_request_ids(app)
    require_api_key(app, tenants)
    admit_tenants(
        app,
        quotas=store.quotas if store is not None else None,
        metrics=metrics,
        lease_s=settings.longest_request_s,
        fail_open=settings.quota_fail_open,
        retry_after_s=settings.retry_after_s,
    )
    limit_in_flight(
        app, limit=settings.max_in_flight, retry_after_s=settings.retry_after_s, metrics=metrics
    )
    limit_moderations(
        app,
        limit=settings.moderate_max_in_flight,
        retry_after_s=settings.retry_after_s,
        metrics=metrics,
    )
    app.register_blueprint(views.bp)
    app.register_blueprint(job_views.bp)
    app.register_blueprint(docs.bp)
    _count_requests(app, metrics)
    # Outermost: everything after it, gunicorn's access line included, sees the client's address.
    app.wsgi_app = ClientAddress(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    return app


def _count_requests(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def _start() -> None:
        g.gateway_started = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        # The route pattern, never the raw path: unknown paths must not mint new series.
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        started = g.get("gateway_started")
        seconds = None if started is None else time.perf_counter() - started
        metrics.http_answered(endpoint, request.method, response.status_code, seconds)
        return response
