"""GET /readyz: is this gateway ready to serve /generate, and with what.

Ready means some Triton replica is live and ready with both ensembles the gateway calls ready,
and the limits in use let some request through. Each replica's own state is listed too. The answer also says which weights each model serves
(Triton's `imagegen_model_info` gauge) and the limits /generate validates with.

Asking costs a round of gRPC calls to every replica and a scrape of Triton's metrics, and the
endpoint is open: `ReadinessCache` answers every caller of one process from one such round for
GATEWAY_READY_CACHE_S. Addresses and weight paths are for API clients only (`PublicReadiness`
is what the rest see).
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any

import urllib3

from gateway.limits import GenerationLimits
from gateway.schema import described
from gateway.services import Services


class ReadinessStatus(str, enum.Enum):
    READY = "ready"
    NOT_READY = "not_ready"


class StoreStatus(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    NONE = "none"  # no GATEWAY_REDIS_URL


_STORE = (
    "The job store (Redis): up, down, or none configured. It does not decide readiness: "
    "/generate without Idempotency-Key needs no store, so a gateway whose store is down stays "
    "in rotation for it while /jobs and Idempotency-Key answer 503."
)


@dataclass(frozen=True)
class ReplicaReadiness:
    address: str = described("The replica's address, as GATEWAY_TRITON_URL resolves now.")
    live: bool = described("It answers.")
    ready: bool = described("It says it is ready (false while it drains).")
    models_ready: bool = described("Both ensembles are ready there.")
    problem: str | None = described("Why it could not be asked.", omit_none=True)


@dataclass(frozen=True)
class TritonState:
    url: str = described("GATEWAY_TRITON_URL.")
    live: bool = described("Some replica answers.")
    ready: bool = described("Some replica says it is ready.")
    replicas: list[ReplicaReadiness] = described(
        "Every replica behind GATEWAY_TRITON_URL; calls go to the ready ones."
    )


@dataclass(frozen=True)
class ModelState:
    ready: bool = described("Triton says the model is ready.")


@dataclass(frozen=True)
class Readiness:
    """Whether this gateway can serve /generate, and with what."""

    status: ReadinessStatus = described("ready: 200; not_ready: 503.")
    triton: TritonState = described("The Triton server behind GATEWAY_TRITON_URL.")
    models: dict[str, ModelState] = described("Ensembles and whether each is ready.")
    loaded: dict[str, dict[str, str]] = described(
        "Per model: kind, source, demo (\"true\": random demo weights), from Triton's "
        "imagegen_model_info gauge."
    )
    demo: bool | None = described(
        "True when any model runs random demo weights (images are noise); null if unknown."
    )
    limits: GenerationLimits = described(
        "What /generate accepts now: the GATEWAY_* limits tightened by the generation model's."
    )
    problems: list[str] = described("Why not ready, and what could not be read.")
    store: StoreStatus = described(_STORE)

    @property
    def ready(self) -> bool:
        return self.status is ReadinessStatus.READY


def check_readiness(services: Services) -> Readiness:
    triton = services.triton
    health = triton.probe()
    problems = [health.problem] if health.problem else []
    problems += [f"model {name} is not ready" for name, ok in health.models.items() if not ok]
    limits = services.limits.refresh()
    if services.limits.problem and health.all_ready:
        problems.append(services.limits.problem)
    if limits.conflict:
        problems.append(f"no request can pass the limits: {limits.conflict}")
    loaded: dict[str, dict[str, Any]] = {}
    try:
        loaded = triton.model_info()
    except (urllib3.exceptions.HTTPError, ValueError, OSError) as exc:
        # Informational only: readiness is Triton's own answer, not this scrape.
        problems.append(f"cannot read model info from {triton.metrics_url}: {type(exc).__name__}")
    ready = health.all_ready and limits.conflict is None
    store = StoreStatus.NONE
    if services.store is not None:
        store = StoreStatus.UP if services.store.jobs.ping() else StoreStatus.DOWN
        if store is StoreStatus.DOWN:
            problems.append("the job store does not answer: /jobs and Idempotency-Key get 503")
    return Readiness(
        status=ReadinessStatus.READY if ready else ReadinessStatus.NOT_READY,
        triton=TritonState(
            url=services.settings.triton_url,
            live=health.live,
            ready=health.ready,
            replicas=[
                ReplicaReadiness(r.address, r.live, r.ready, r.all_ready, r.problem)
                for r in health.replicas
            ],
        ),
        models={name: ModelState(ok) for name, ok in health.models.items()},
        loaded=loaded,
        demo=any(info.get("demo") == "true" for info in loaded.values()) if loaded else None,
        limits=limits,
        problems=problems,
        store=store,
    )


@dataclass(frozen=True)
class PublicReadiness:
    """Whether this gateway can serve /generate, for a caller without an API key: no address,
    no weight path, no problem text (which may name either)."""

    status: ReadinessStatus = described("ready: 200; not_ready: 503.")
    models: dict[str, ModelState] = described("Ensembles and whether each is ready.")
    demo: bool | None = described(
        "True when any model runs random demo weights (images are noise); null if unknown."
    )
    store: StoreStatus = described(_STORE)

    @classmethod
    def of(cls, state: Readiness) -> PublicReadiness:
        return cls(status=state.status, models=state.models, demo=state.demo, store=state.store)


class ReadinessCache:
    """One readiness check shared by every caller of this process for `max_age_s`: callers that
    arrive while it runs wait for its answer rather than starting their own."""

    def __init__(self, services: Services, max_age_s: float) -> None:
        self._services = services
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._state: Readiness | None = None
        self._checked = 0.0

    def current(self) -> Readiness:
        with self._lock:
            if self._state is None or time.monotonic() - self._checked >= self._max_age_s:
                self._state = check_readiness(self._services)
                self._checked = time.monotonic()
            return self._state
