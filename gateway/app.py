"""The app factory: settings in, a Flask app with its clients built and attached out."""

from __future__ import annotations

import logging
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import urllib3
from flask import Flask, Response, g, request

from gateway import docs, views
from gateway.auth import ApiKeys, require_api_key
from gateway.backpressure import limit_in_flight, limit_moderations
from gateway.errors import register_error_handlers
from gateway.forwarded import ClientAddress
from gateway.limits import LimitsSource
from gateway.logs import track_request_ids
from gateway.metrics import Metrics
from gateway.nvidia.deepfake import DeepfakeClient
from gateway.readiness import ReadinessCache
from gateway.retry import RetryPolicy
from gateway.services import Services
from gateway.settings import Settings, SettingsError
from gateway.triton.client import TritonGateway
from gateway.upload.uploader import Uploader


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
    http = urllib3.PoolManager(num_pools=4, maxsize=settings.threads, retries=False)
    triton = TritonGateway(
        settings.triton_url,
        settings.triton_metrics_url,
        model=settings.triton_model,
        nsfw_model=settings.triton_nsfw_model,
        probe_timeout_s=settings.probe_timeout_s,
        retry_after_s=settings.retry_after_s,
        http=http,
        metrics=metrics,
        queue_timeout_s=settings.triton_queue_timeout_s,
        classifier_model=settings.triton_classifier_model,
        refresh_s=settings.triton_refresh_s,
    )
    app.extensions["gateway"] = Services(
        settings=settings,
        metrics=metrics,
        http=http,
        triton=triton,
        limits=LimitsSource(settings, triton.model_limits),
        uploader=Uploader(
            policy=RetryPolicy(backoff=settings.upload_backoff),
            timeout_s=settings.upload_timeout_s,
            budget_s=settings.upload_budget_s,
            headers=settings.upload_headers,
            ssl_context=_ssl_context(settings.upload_ca_bundle),
            metrics=metrics,
        ),
        deepfake=_deepfake_client(settings, metrics),
    )
    app.extensions["gateway_readiness"] = ReadinessCache(
        app.extensions["gateway"], settings.ready_cache_s
    )
    register_error_handlers(app)
    # In this order: a refused request still gets its request id, and an anonymous one never
    # takes an in-flight slot.
    track_request_ids(app)
    require_api_key(app, ApiKeys.from_settings(settings))
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
    app.register_blueprint(docs.bp)
    _count_requests(app, metrics)
    # Outermost: everything after it, gunicorn's access line included, sees the client's address.
    app.wsgi_app = ClientAddress(app.wsgi_app, settings.trusted_proxies)  # type: ignore[method-assign]
    return app


def _deepfake_client(settings: Settings, metrics: Metrics) -> DeepfakeClient | None:
    if settings.nvidia_api_key is None:
        return None
    return DeepfakeClient(
        url=settings.nvidia_api_url,
        api_key=settings.nvidia_api_key,
        budget_s=settings.deepfake_budget_s,
        max_image_bytes=settings.deepfake_max_image_bytes,
        assets_url=settings.nvidia_assets_url,
        inline_max_bytes=settings.deepfake_inline_max_bytes,
        http=urllib3.PoolManager(
            num_pools=1, maxsize=settings.threads, retries=False, ssl_context=_ssl_context(None)
        ),
        # One check per request in flight at most: as many workers as request threads.
        executor=ThreadPoolExecutor(settings.threads, thread_name_prefix="deepfake"),
        metrics=metrics,
    )


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    if ca_bundle is None:
        try:
            import certifi

            ca_bundle = certifi.where()
        except ImportError:
            return ssl.create_default_context()
    return ssl.create_default_context(cafile=ca_bundle)


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
