"""What the app factory builds once per process and the use cases share."""

from __future__ import annotations

import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import urllib3

from gateway.errors import Unavailable
from gateway.idempotency import IdempotencyStore
from gateway.jobs.queue import JobQueue
from gateway.jobs.store import JobStore, connect
from gateway.limits import LimitsSource
from gateway.metrics import Metrics
from gateway.nvidia.deepfake import DeepfakeClient, deepfake_unavailable
from gateway.retry import RetryPolicy
from gateway.settings import PREFIX, Settings
from gateway.tenants.quotas import Quotas
from gateway.triton.client import TritonGateway
from gateway.upload.uploader import Uploader


@dataclass(frozen=True)
class Store:
    """Redis, shared by every gateway and worker: jobs, their queue, Idempotency-Key records,
    the tenants' quotas."""

    jobs: JobStore
    idempotency: IdempotencyStore
    queue: JobQueue
    quotas: Quotas

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, *, connections: int
    ) -> Store | None:
        if settings.redis_url is None:
            return None
        client = connect(settings.redis_url, settings.redis_timeout_s, max_connections=connections)
        retry_after = settings.retry_after_s
        return cls(
            jobs=JobStore(
                client,
                ttl_s=settings.job_ttl_s,
                retry_after_s=retry_after,
                failed=metrics.store_failed,
            ),
            idempotency=IdempotencyStore(
                client,
                ttl_s=settings.idempotency_ttl_s,
                in_flight_s=settings.longest_request_s,
                retry_after_s=retry_after,
                failed=metrics.store_failed,
            ),
            queue=JobQueue(
                # The broker's own client: its consumers block on Redis, which must not take
                # the connections the requests need.
                connect(settings.redis_url, settings.redis_timeout_s),
                requeue_s=settings.worker_requeue_s,
                retry_after_s=retry_after,
                failed=metrics.store_failed,
            ),
            quotas=Quotas(client, settings.redis_url),
        )


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    http: urllib3.PoolManager
    triton: TritonGateway
    limits: LimitsSource
    uploader: Uploader
    deepfake: DeepfakeClient | None = None  # None without GATEWAY_NVIDIA_API_KEY
    store: Store | None = None  # None without GATEWAY_REDIS_URL

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics) -> Services:
        """The clients, once per process (a gateway worker or a job worker)."""
        # A gateway process runs THREADS requests at once, a job worker WORKER_THREADS jobs.
        concurrency = max(settings.threads, settings.worker_threads)
        http = urllib3.PoolManager(num_pools=4, maxsize=concurrency, retries=False)
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
        return cls(
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
                ssl_context=ssl_context(settings.upload_ca_bundle),
                metrics=metrics,
            ),
            deepfake=_deepfake_client(settings, metrics, concurrency),
            store=Store.from_settings(settings, metrics, connections=concurrency + 4),
        )

    def require_deepfake(self) -> DeepfakeClient:
        """The deepfake client, or the 400 a request asking for the check gets without one."""
        if self.deepfake is None:
            raise deepfake_unavailable()
        return self.deepfake

    def require_store(self) -> Store:
        """The store, or the 503 of a gateway that has none."""
        if self.store is None:
            raise Unavailable(f"jobs and Idempotency-Key need a store: {PREFIX}REDIS_URL is unset")
        return self.store

    def close(self) -> None:
        self.triton.close()
        if self.deepfake is not None:
            self.deepfake.close()


def _deepfake_client(
    settings: Settings, metrics: Metrics, concurrency: int
) -> DeepfakeClient | None:
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
            num_pools=1, maxsize=concurrency, retries=False, ssl_context=ssl_context(None)
        ),
        # One check per request (or job) in flight at most: as many workers as their threads.
        executor=ThreadPoolExecutor(concurrency, thread_name_prefix="deepfake"),
        metrics=metrics,
    )


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    if ca_bundle is None:
        try:
            import certifi

            ca_bundle = certifi.where()
        except ImportError:
            return ssl.create_default_context()
    return ssl.create_default_context(cafile=ca_bundle)
