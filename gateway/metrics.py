"""The gateway's Prometheus metrics.

Labels hold only small fixed vocabularies (endpoint names, status codes, outcome words): never a
URL, a signature, a prompt or a key, which would both leak secrets and explode cardinality.
Each app owns a registry, so several apps (tests) can live in one process; under gunicorn with
several workers the counters go through prometheus_client's multi-process files instead.

Everything records through the typed methods below, never through a prometheus object. The
clients (Triton, storage, the deepfake API) take a `Recorder`: the app gives them its `Metrics`,
and one built without (a test, a tool) records into `NullMetrics`, which drops everything.
The label words come from `gateway.vocabulary`, below this module and the clients alike.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from gateway.triton.contract import NsfwStatus
from gateway.vocabulary import (
    HTTP_METHODS,
    OTHER_METHOD,
    ApiOutcome,
    AssetResult,
    DeepfakeStatus,
    FailoverReason,
    IdempotencyOutcome,
    JobStatus,
    ReplicaState,
    TritonOutcome,
    UploadOutcome,
    UploadVerdict,
    WebhookOutcome,
)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
# Encoding and hashing take milliseconds; the request buckets would put them all in the first.
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, *_LATENCY_BUCKETS)
_SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)

# The stages of /generate, the moderation signals waited for, and the endpoints that judge NSFW.
Stage = Literal["triton", "encode", "hash", "upload", "total"]
Signal = Literal["deepfake", "nsfw"]
NsfwEndpoint = Literal["generate", "moderate"]
# What a tenant's quotas did with a request to a limited endpoint (POST /generate, POST /jobs).
TenantOutcome = Literal["admitted", "rate_limited", "concurrency_limited"]

# The fixed vocabularies, created at zero so that the first failure after a restart is a visible
# increase (Prometheus cannot see the step to a series' first value) and ratios exist at once.
UPLOAD_OUTCOMES = tuple(outcome.value for outcome in UploadOutcome)
UPLOAD_RESULTS = (
    (UploadVerdict.SUCCESS.value, "2xx"),
    (UploadVerdict.FAILURE.value, "2xx"),  # an ETag that is not the MD5 of the bytes sent
    (UploadVerdict.FAILURE.value, "3xx"),
    (UploadVerdict.FAILURE.value, "4xx"),
    (UploadVerdict.FAILURE.value, "5xx"),
    # storage never answered: timeouts, refused connections, TLS errors
    (UploadVerdict.FAILURE.value, "none"),
)
NSFW_DISABLED = "disabled"  # the check was not asked for
NSFW_OUTCOMES = (*(status.value for status in NsfwStatus), NSFW_DISABLED)
NSFW_ENDPOINTS: tuple[NsfwEndpoint, ...] = get_args(NsfwEndpoint)
# Triton addresses a process labels its per-address series with; later ones share `other`.
# Addresses are few (the replicas of one service), and a single-process gateway drops the series
# of an address that left the name, but pods get new addresses at every rollout and the
# multi-process mode of prometheus_client cannot drop a series: the cap keeps a long-lived
# worker's series bounded all the same.
MAX_TRITON_ADDRESSES = 32
OTHER_ADDRESS = "other"


def _words(values: Iterable[str]) -> str:
    return ", ".join(value.value if isinstance(value, enum.Enum) else value for value in values)


class Recorder(Protocol):
    """What the clients record: `Metrics` counts it, `NullMetrics` drops it."""

    def triton_called(self, model: str, outcome: TritonOutcome) -> None: ...

    def triton_address_called(self, address: str, outcome: TritonOutcome) -> None: ...

    def triton_retried(self, reason: FailoverReason) -> None: ...

    def triton_addresses_found(self, states: Iterable[ReplicaState]) -> None: ...

    def forget_triton_address(self, address: str) -> None: ...

    def upload_attempted(self, outcome: UploadOutcome, *, retry: bool) -> None: ...

    def upload_finished(self, verdict: UploadVerdict, status_class: str) -> None: ...

    def deepfake_checked(self, status: DeepfakeStatus, seconds: float) -> None: ...

    def deepfake_api_called(self, outcome: ApiOutcome) -> None: ...

    def deepfake_asset_sent(self, result: AssetResult) -> None: ...

    def webhook_delivered(self, outcome: WebhookOutcome) -> None: ...


class NullMetrics:
    """A `Recorder` that records nothing: the clients' default."""

    def triton_called(self, model: str, outcome: TritonOutcome) -> None:
        pass

    def triton_address_called(self, address: str, outcome: TritonOutcome) -> None:
        pass

    def triton_retried(self, reason: FailoverReason) -> None:
        pass

    def triton_addresses_found(self, states: Iterable[ReplicaState]) -> None:
        pass

    def forget_triton_address(self, address: str) -> None:
        pass

    def upload_attempted(self, outcome: UploadOutcome, *, retry: bool) -> None:
        pass

    def upload_finished(self, verdict: UploadVerdict, status_class: str) -> None:
        pass

    def deepfake_checked(self, status: DeepfakeStatus, seconds: float) -> None:
        pass

    def deepfake_api_called(self, outcome: ApiOutcome) -> None:
        pass

    def deepfake_asset_sent(self, result: AssetResult) -> None:
        pass

    def webhook_delivered(self, outcome: WebhookOutcome) -> None:
        pass


NULL_METRICS: Recorder = NullMetrics()


class Metrics:
    """The app's metrics: a `Recorder` for the clients, and what the app and the use cases
    record themselves."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._multiprocess_dir = multiprocess_dir
        self._addresses: set[str] = set()
        self._addresses_lock = threading.Lock()
        self._http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by endpoint (the route pattern, or unmatched), method (HTTP's "
            f"own, or {OTHER_METHOD}) and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self._http_latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer an HTTP request, by endpoint.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stage_latency = Histogram(
            "gateway_generate_stage_duration_seconds",
            "Time spent in each stage of /generate (triton, encode, hash, upload) and in all of "
            "it after validation (total).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self._triton_requests = Counter(
            "gateway_triton_requests",
            f"Triton inference calls, by model and outcome ({_words(TritonOutcome)}).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self._triton_addresses = Gauge(
            "gateway_triton_addresses",
            f"Triton addresses GATEWAY_TRITON_URL resolves to now, by state ({_words(ReplicaState)}"
            "); only ready ones take calls.",
            ["state"],
            registry=self.registry,
            # Every worker resolves the same name: the largest count of the live workers.
            multiprocess_mode="livemax",
        )
        self._triton_address_calls = Counter(
            "gateway_triton_address_calls",
            f"Triton calls by the address that took them and outcome ({_words(TritonOutcome)}"
            f"); a retry is a second call. At most {MAX_TRITON_ADDRESSES} addresses per process, "
            f"then '{OTHER_ADDRESS}'.",
            ["address", "outcome"],
            registry=self.registry,
        )
        self._triton_retries = Counter(
            "gateway_triton_retries",
            f"Triton calls retried on another replica, by why ({_words(FailoverReason)}).",
            ["reason"],
            registry=self.registry,
        )
        self._upload_attempts = Counter(
            "gateway_upload_attempts",
            f"PUT attempts to storage, by outcome ({_words(UPLOAD_OUTCOMES)}).",
            ["outcome"],
            registry=self.registry,
        )
        self._upload_retries = Counter(
            "gateway_upload_retries",
            "PUT attempts that were retries of a failed attempt.",
            registry=self.registry,
        )
        self._uploads = Counter(
            "gateway_uploads",
            f"Uploads after all retries, by result ({_words(UploadVerdict)}) and the class of "
            "storage's last status (2xx..5xx, none): the upload failure rate.",
            ["result", "status_class"],
            registry=self.registry,
        )
        self._nsfw_checks = Counter(
            "gateway_nsfw_checks",
            f"NSFW checks, by status ({_words(NSFW_OUTCOMES)}); every status but ok and "
            f"{NSFW_DISABLED} reports score 1.0.",
            ["status"],
            registry=self.registry,
        )
        self._nsfw_score = Histogram(
            "gateway_nsfw_score",
            "NSFW scores the classifier gave (status ok; the fail-safe 1.0 is not observed).",
            buckets=_SCORE_BUCKETS,
            registry=self.registry,
        )
        self._nsfw_flagged = Counter(
            "gateway_nsfw_flagged",
            "Images whose `nsfw` verdict was true, by endpoint (generate, moderate): a score at or "
            "above GATEWAY_NSFW_THRESHOLD, or the fail-safe.",
            ["endpoint"],
            registry=self.registry,
        )
        self._generate_in_flight = Gauge(
            "gateway_generate_in_flight",
            "/generate requests this process is working on (bounded by GATEWAY_MAX_IN_FLIGHT).",
            registry=self.registry,
            # Summed over the live workers; a dead worker's file no longer counts.
            multiprocess_mode="livesum",
        )
        self._moderate_in_flight = Gauge(
            "gateway_moderate_in_flight",
            "/moderate requests this process is working on (bounded by "
            "GATEWAY_MODERATE_MAX_IN_FLIGHT).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # Per tenant: the label is a name from the tenants file (or default, anonymous), never
        # anything of the request, so the series are as many as the file's tenants.
        self._tenant_requests = Counter(
            "gateway_tenant_requests",
            "Requests to POST /generate and POST /jobs by tenant and what its quotas did with "
            f"them ({_words(get_args(TenantOutcome))}).",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self._tenant_in_flight = Gauge(
            "gateway_tenant_in_flight",
            "Synchronous generations (/generate) of each tenant this process is working on.",
            ["tenant"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._tenant_generation = Histogram(
            "gateway_tenant_generation_seconds",
            "Time to answer a tenant's successful synchronous generation (/generate, 200), from "
            "its admission.",
            ["tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._quota_unchecked = Counter(
            "gateway_quota_unchecked",
            "Requests admitted without their tenant's quotas checked: Redis did not answer and "
            "GATEWAY_QUOTA_FAIL_OPEN is true.",
            registry=self.registry,
        )
        self._deepfake_checks = Counter(
            "gateway_deepfake_checks",
            f"Deepfake checks, by status ({_words(DeepfakeStatus)}); every status but ok and "
            "no_face reports score 1.0.",
            ["status"],
            registry=self.registry,
        )
        self._deepfake_attempts = Counter(
            "gateway_deepfake_api_attempts",
            f"Calls to the deepfake API, by outcome ({_words(ApiOutcome)}).",
            ["outcome"],
            registry=self.registry,
        )
        self._deepfake_assets = Counter(
            "gateway_deepfake_assets",
            "Images sent to the deepfake API through NVCF's asset upload (over the inline limit), "
            f"by result ({_words(AssetResult)}).",
            ["result"],
            registry=self.registry,
        )
        self._moderation_latency = Histogram(
            "gateway_moderation_duration_seconds",
            "Time the gateway waited for each moderation signal (deepfake: /generate and "
            "/moderate; nsfw: /moderate, where the classifier runs alone).",
            ["signal"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._webhook_deliveries = Counter(
            "worker_webhook_deliveries",
            "Webhook delivery attempts of the job workers, each counted once by what it led to "
            f"({_words(WebhookOutcome)}): all but retry end a delivery.",
            ["outcome"],
            registry=self.registry,
        )
        self._jobs_created = Counter(
            "gateway_jobs_created", "Jobs accepted by POST /jobs.", registry=self.registry
        )
        self._idempotency = Counter(
            "gateway_idempotency",
            f"Requests with an Idempotency-Key, by outcome ({_words(IdempotencyOutcome)}).",
            ["outcome"],
            registry=self.registry,
        )
        self._store_errors = Counter(
            "gateway_store_errors",
            "Calls to the store (Redis) that failed or timed out.",
            registry=self.registry,
        )
        finished = [s for s in JobStatus if s.final]
        self._jobs_finished = Counter(
            "worker_jobs",
            f"Jobs a worker finished, by status ({_words(finished)}).",
            ["status"],
            registry=self.registry,
        )
        self._job_seconds = Histogram(
            "worker_job_duration_seconds",
            "Time from a worker's start of a job to its end, by status.",
            ["status"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self._jobs_running = Gauge(
            "worker_jobs_running",
            "Jobs this worker runs now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        for outcome in IdempotencyOutcome:
            self._idempotency.labels(outcome.value)
        for status in finished:
            self._jobs_finished.labels(status.value)
        for outcome in UPLOAD_OUTCOMES:
            self._upload_attempts.labels(outcome)
        for webhook_outcome in WebhookOutcome:
            self._webhook_deliveries.labels(webhook_outcome.value)
        for result, status_class in UPLOAD_RESULTS:
            self._uploads.labels(result, status_class)
        for status in NSFW_OUTCOMES:
            self._nsfw_checks.labels(status)
        for endpoint in NSFW_ENDPOINTS:
            self._nsfw_flagged.labels(endpoint)
        for state in ReplicaState:
            self._triton_addresses.labels(state.value)
        for reason in FailoverReason:
            self._triton_retries.labels(reason.value)

    # -- the app and the use cases ---------------------------------------------------------

    def http_answered(self, endpoint: str, method: str, status: int, seconds: float | None) -> None:
        """One HTTP answer; `endpoint` is the route pattern (never the raw path), `method` is
        counted as `other` unless HTTP defines it, and `seconds` is None when the request never
        reached the app's timer."""
        method = method if method in HTTP_METHODS else OTHER_METHOD
        self._http_requests.labels(endpoint, method, str(status)).inc()
        if seconds is not None:
            self._http_latency.labels(endpoint).observe(seconds)

    def generate_started(self) -> None:
        """A /generate request took an in-flight slot (gateway_generate_in_flight)."""
        self._generate_in_flight.inc()

    def generate_ended(self) -> None:
        self._generate_in_flight.dec()

    def moderation_started(self) -> None:
        """A /moderate request took one of its own slots (gateway_moderate_in_flight)."""
        self._moderate_in_flight.inc()

    def moderation_ended(self) -> None:
        self._moderate_in_flight.dec()

    def tenants_known(self, names: Iterable[str]) -> None:
        """Create every tenant's series at zero (the tenants file's names bound them)."""
        for name in names:
            for outcome in get_args(TenantOutcome):
                self._tenant_requests.labels(name, outcome)
            self._tenant_in_flight.labels(name)
            self._tenant_generation.labels(name)

    def tenant_request(self, tenant: str, outcome: TenantOutcome) -> None:
        """A request to a limited endpoint, by what the tenant's quotas did with it."""
        self._tenant_requests.labels(tenant, outcome).inc()

    def tenant_generation_started(self, tenant: str) -> None:
        self._tenant_in_flight.labels(tenant).inc()

    def tenant_generation_ended(self, tenant: str, seconds: float | None) -> None:
        """A synchronous generation left; `seconds` only for one that succeeded."""
        self._tenant_in_flight.labels(tenant).dec()
        if seconds is not None:
            self._tenant_generation.labels(tenant).observe(seconds)

    def quota_unchecked(self) -> None:
        """A request admitted with Redis away (gateway_quota_unchecked_total)."""
        self._quota_unchecked.inc()

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        """Time a stage of /generate (gateway_generate_stage_duration_seconds)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_took(name, time.perf_counter() - started)

    def stage_took(self, name: Stage, seconds: float) -> None:
        """A stage of /generate timed elsewhere (encoding and hashing time themselves)."""
        self._stage_latency.labels(name).observe(seconds)

    def nsfw_checked(self, status: NsfwStatus | str | None, score: float | None) -> None:
        """One NSFW outcome; `status` None means the check was not asked for, and a word the
        model should not have said counts as an error."""
        if status is None:
            self._nsfw_checks.labels(NSFW_DISABLED).inc()
            return
        try:
            known = NsfwStatus(status)
        except ValueError:
            known = NsfwStatus.ERROR
        self._nsfw_checks.labels(known.value).inc()
        if known is NsfwStatus.OK and score is not None:
            self._nsfw_score.observe(score)

    def nsfw_verdict(self, endpoint: NsfwEndpoint, flagged: bool | None) -> None:
        """Count an image flagged by the `nsfw` verdict (None: the check did not run)."""
        if flagged:
            self._nsfw_flagged.labels(endpoint).inc()

    def moderation_waited(self, signal: Signal, seconds: float) -> None:
        """How long a moderation signal kept the request (gateway_moderation_duration_seconds)."""
        self._moderation_latency.labels(signal).observe(seconds)

    # -- the clients (Recorder) ------------------------------------------------------------

    def triton_called(self, model: str, outcome: TritonOutcome) -> None:
        """One inference call of the gateway, retries included (gateway_triton_requests)."""
        self._triton_requests.labels(model, outcome.value).inc()

    def triton_address_called(self, address: str, outcome: TritonOutcome) -> None:
        """One call to one Triton address (gateway_triton_address_calls_total)."""
        with self._addresses_lock:
            if address not in self._addresses and len(self._addresses) < MAX_TRITON_ADDRESSES:
                self._addresses.add(address)
            label = address if address in self._addresses else OTHER_ADDRESS
        self._triton_address_calls.labels(label, outcome.value).inc()

    def triton_retried(self, reason: FailoverReason) -> None:
        self._triton_retries.labels(reason.value).inc()

    def triton_addresses_found(self, states: Iterable[ReplicaState]) -> None:
        """The states of every address the Triton target resolves to now."""
        counts = Tally(states)
        for state in ReplicaState:
            self._triton_addresses.labels(state.value).set(counts[state])

    def forget_triton_address(self, address: str) -> None:
        """An address left the name: drop its series and free its place under the cap. Not in
        multi-process mode, where prometheus_client cannot remove a series (the cap holds)."""
        if self._multiprocess_dir:
            return
        with self._addresses_lock:
            if address not in self._addresses:
                return
            self._addresses.discard(address)
            for outcome in TritonOutcome:
                self._triton_address_calls.remove(address, outcome.value)  # absent: a no-op

    def upload_attempted(self, outcome: UploadOutcome, *, retry: bool) -> None:
        """One PUT attempt; `retry` when an earlier attempt of the same upload failed."""
        self._upload_attempts.labels(outcome.value).inc()
        if retry:
            self._upload_retries.inc()

    def upload_finished(self, verdict: UploadVerdict, status_class: str) -> None:
        """An upload after all its attempts; `status_class` is 2xx..5xx or none."""
        self._uploads.labels(verdict.value, status_class).inc()

    def deepfake_checked(self, status: DeepfakeStatus, seconds: float) -> None:
        """A deepfake check the request waited `seconds` for."""
        self._deepfake_checks.labels(status.value).inc()
        self.moderation_waited("deepfake", seconds)

    def deepfake_api_called(self, outcome: ApiOutcome) -> None:
        self._deepfake_attempts.labels(outcome.value).inc()

    def deepfake_asset_sent(self, result: AssetResult) -> None:
        self._deepfake_assets.labels(result.value).inc()

    def webhook_delivered(self, outcome: WebhookOutcome) -> None:
        """One webhook delivery attempt, by what it led to (worker_webhook_deliveries_total)."""
        self._webhook_deliveries.labels(WebhookOutcome(outcome).value).inc()

    def job_created(self) -> None:
        self._jobs_created.inc()

    def idempotency(self, outcome: IdempotencyOutcome) -> None:
        self._idempotency.labels(outcome.value).inc()

    def store_failed(self) -> None:
        self._store_errors.inc()

    def job_started(self) -> None:
        self._jobs_running.inc()

    def job_ended(self) -> None:
        self._jobs_running.dec()

    def job_finished(self, status: JobStatus, seconds: float) -> None:
        self._jobs_finished.labels(status.value).inc()
        self._job_seconds.labels(status.value).observe(seconds)

    # -- the scrape ------------------------------------------------------------------------

    def render(self, queue: QueueReading | None = None) -> bytes:
        """The exposition; `queue`, when given, adds the job queue's gauges, read from the
        store at this scrape (every gateway reports the same global values)."""
        if self._multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
            text = generate_latest(registry)
        else:
            text = generate_latest(self.registry)
        if queue is None:
            return text
        extra = CollectorRegistry()
        extra.register(_QueueCollector(queue))
        return text + generate_latest(extra)

    # -- each tenant's jobs (a job worker) -------------------------------------------------

    # Made on first use, not in __init__: only a job worker, once it has read the tenants file.
    _tenant_jobs_lock = threading.Lock()

    def track_tenant_jobs(self, tenants: Iterable[str]) -> None:
        """Count jobs per tenant, labelled with `tenants` only (those of the tenants file, which
        bound the series): a worker calls it once it has read the file."""
        with self._tenant_jobs_lock:
            if not hasattr(self, "_tenant_jobs"):
                finished = [s.value for s in JobStatus if s.final]
                self._tenant_jobs = Counter(
                    "worker_tenant_jobs",
                    f"Jobs a worker finished, by tenant and status ({_words(finished)}).",
                    ["tenant", "status"],
                    registry=self.registry,
                )
                self._tenant_job_seconds = Histogram(
                    "worker_tenant_job_seconds",
                    "Time from a worker's start of a job to its end, by tenant.",
                    ["tenant"],
                    buckets=_STAGE_BUCKETS,
                    registry=self.registry,
                )
        for tenant in tenants:
            self._tenant_job_seconds.labels(tenant)
            for status in JobStatus:
                if status.final:
                    self._tenant_jobs.labels(tenant, status.value)

    def tenant_job_finished(self, tenant: str, status: JobStatus, seconds: float) -> None:
        """One job of `tenant` (a tracked name) ended."""
        self._tenant_jobs.labels(tenant, status.value).inc()
        self._tenant_job_seconds.labels(tenant).observe(seconds)


@dataclass(frozen=True)
class QueueReading:
    """The job queue at one scrape: None when the store did not answer."""

    queued: int | None
    oldest_age_s: float | None
    by_tenant: tuple[tuple[str, int], ...] = ()  # (tenant, jobs queued) of each tenant


class _QueueCollector:
    def __init__(self, reading: QueueReading) -> None:
        self.reading = reading

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "gateway_store_up", "1 when the store (Redis) answered this scrape, else 0."
        )
        up.add_metric([], 0 if self.reading.queued is None else 1)
        yield up
        if self.reading.queued is None:
            return
        queued = GaugeMetricFamily("gateway_jobs_queued", "Jobs queued now, all gateways'.")
        queued.add_metric([], self.reading.queued)
        yield queued
        oldest = GaugeMetricFamily(
            "gateway_jobs_oldest_queued_age_seconds",
            "Age of the oldest queued job (0 when none is queued).",
        )
        oldest.add_metric([], self.reading.oldest_age_s or 0.0)
        yield oldest
        if self.reading.by_tenant:
            by_tenant = GaugeMetricFamily(
                "gateway_tenant_jobs_queued",
                "Jobs queued now of each tenant (those of the tenants file), all gateways'.",
                labels=["tenant"],
            )
            for tenant, count in self.reading.by_tenant:
                by_tenant.add_metric([tenant], count)
            yield by_tenant
