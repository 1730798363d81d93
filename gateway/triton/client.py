"""The gateway's Triton client: the one call per request, its deadline, the mapping of gRPC
failures to HTTP, readiness, and the generation model's limits.

NSFW off calls the `txt2img` ensemble, so the classifier never runs; NSFW on calls
`txt2img_nsfw`, where the classifier runs beside the upscaler and enforces its own 5 s budget.
`/moderate` calls the classifier (`nsfw`) alone, with the client's image. Tensor names and
sentinels come from `gateway.triton.contract`.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tritonclient.grpc as grpcclient
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    QueueTimeout,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.triton import contract

if TYPE_CHECKING:  # metrics imports this module for its label words
    from gateway.metrics import Metrics

log = logging.getLogger(__name__)

# gRPC retries a lost connection with exponential backoff up to 2 minutes by default; a short
# cap lets the gateway see a restarted Triton within seconds.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Calls take turns over every address the target resolves to (`dns:///triton:8001` in
    # front of several Triton replicas); gRPC's default sends them all to the first.
    ("grpc.lb_policy_name", "round_robin"),
]


class TritonOutcome(str, enum.Enum):
    """How one Triton call ended (the label of gateway_triton_requests_total)."""

    OK = "ok"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"  # the queue is full: Triton does not count it as a failure
    QUEUE_TIMEOUT = "queue_timeout"
    DEADLINE = "deadline"
    INVALID = "invalid"
    ERROR = "error"


@dataclass(frozen=True)
class Generated:
    image: np.ndarray  # (1, H, W, 3) uint8 RGB, as Triton sent it
    nsfw: contract.NsfwReading | None = None  # None when the ensemble ran no classifier


@dataclass(frozen=True)
class TritonHealth:
    live: bool
    ready: bool
    models: dict[str, bool]  # ensemble -> ready
    problem: str | None = None  # why Triton could not be asked

    @property
    def all_ready(self) -> bool:
        return self.live and self.ready and bool(self.models) and all(self.models.values())


class TritonGateway:
    def __init__(
        self,
        url: str,
        metrics_url: str,
        *,
        model: str,
        nsfw_model: str,
        probe_timeout_s: float,
        retry_after_s: int,
        http: urllib3.PoolManager,
        metrics: Metrics | None = None,
        classifier_model: str = "nsfw",
        queue_timeout_s: float | None = None,
    ) -> None:
        self.url = url
        self.metrics_url = metrics_url
        self.model = model
        self.nsfw_model = nsfw_model
        self.classifier_model = classifier_model
        self.probe_timeout_s = probe_timeout_s
        self.retry_after_s = retry_after_s
        self.http = http
        self.metrics = metrics
        # Triton's queue-policy timeout, in microseconds; None leaves the model's default.
        self.queue_timeout_us = (
            None if queue_timeout_s is None else max(1, int(queue_timeout_s * 1_000_000))
        )
        # The channel connects lazily: building the gateway never fails because Triton is down.
        self.client = grpcclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    def close(self) -> None:
        self.client.close()

    def generate(
        self, generation: contract.Generation, *, nsfw: bool, deadline_s: float
    ) -> Generated:
        """One image, through `txt2img_nsfw` when `nsfw` else `txt2img`."""
        kind = contract.Model.TXT2IMG_NSFW if nsfw else contract.Model.TXT2IMG
        model = self.nsfw_model if nsfw else self.model
        result = self._infer(
            model,
            generation.inputs(),
            contract.outputs(kind),
            deadline_s,
            # Triton 2.51 drops the gRPC deadline at the ensemble's first step; the
            # diffusion model reads this parameter instead and stops between steps.
            parameters={contract.TIMEOUT_MS: max(1, int(deadline_s * 1000))},
            # How long it may wait in the diffusion model's queue (the ensemble passes it on).
            queue_timeout_us=self.queue_timeout_us,
        )
        image = result.as_numpy(contract.IMAGE.name)
        expected = generation.image_shape
        if image is None or image.shape != expected or image.dtype != contract.IMAGE.dtype:
            shape = None if image is None else image.shape
            raise UpstreamError(f"{model} returned an image of shape {shape}, expected {expected}")
        return Generated(image, contract.read_nsfw(result) if nsfw else None)

    def classify(self, pixels: np.ndarray, deadline_s: float) -> contract.NsfwReading:
        """NSFW score and status of one (H, W, 3) uint8 RGB image, with the same fail-safe as
        in the ensemble (1.0 unless the status is `ok`)."""
        result = self._infer(
            self.classifier_model,
            contract.classify_inputs(pixels),
            contract.outputs(contract.Model.CLASSIFIER),
            deadline_s,
        )
        return contract.read_nsfw(result)

    def model_limits(self) -> contract.ModelLimits:
        """The limits of the generation model behind each ensemble the gateway calls, from
        Triton's own copy of their configs; raises when Triton cannot say."""
        timeout = self.probe_timeout_s
        limits = contract.ModelLimits()
        for ensemble in (self.model, self.nsfw_model):
            config = self.client.get_model_config(ensemble, as_json=True, client_timeout=timeout)
            name = contract.generation_model(config["config"])
            if name is None:
                raise ValueError(f"{ensemble} has no step that takes {contract.PROMPT.name}")
            model = self.client.get_model_config(name, as_json=True, client_timeout=timeout)
            limits = limits.tighter(contract.ModelLimits.from_config(model["config"]))
        return limits

    def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: tuple[contract.Tensor, ...],
        deadline_s: float,
        parameters: dict[str, Any] | None = None,
        queue_timeout_us: int | None = None,
    ) -> grpcclient.InferResult:
        started = time.monotonic()
        try:
            result = self.client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(t.name) for t in outputs],
                client_timeout=deadline_s,
                parameters=parameters,
                timeout=queue_timeout_us,
            )
        except InferenceServerException as exc:
            error = self._map_error(exc, model, time.monotonic() - started, deadline_s)
            self._count(model, _outcome(error))
            raise error from None
        self._count(model, TritonOutcome.OK)
        return result

    def _count(self, model: str, outcome: TritonOutcome) -> None:
        if self.metrics:
            self.metrics.triton_requests.labels(model, outcome.value).inc()

    def _map_error(
        self, exc: InferenceServerException, model: str, elapsed: float, deadline_s: float
    ) -> GatewayError:
        status = str(exc.status() or "")
        message = str(exc.message() or "")
        log.warning("triton %s failed after %.2fs: %s %s", model, elapsed, status, message)
        # Triton rejects a full queue with UNAVAILABLE too; its message tells the two apart.
        if "RESOURCE_EXHAUSTED" in status or "Exceeds maximum queue size" in message:
            return Overloaded(
                "the inference server is at capacity; retry later", retry_after=self.retry_after_s
            )
        if "Request timeout expired" in message:
            # The queue policy's REJECT: the request waited past its queue timeout, never ran.
            return QueueTimeout(
                "the request waited too long in the inference queue; retry later",
                retry_after=self.retry_after_s,
            )
        if "UNAVAILABLE" in status or not status and "connect" in message.lower():
            return Unavailable(
                "the inference server is unavailable; retry later", retry_after=self.retry_after_s
            )
        if "DEADLINE_EXCEEDED" in status or (
            # The diffusion model's own stop on `timeout_ms` comes back as CANCELLED.
            "CANCELLED" in status and "timeout" in message
        ):
            return UpstreamTimeout(f"generation did not finish within {deadline_s:g}s")
        if "INVALID_ARGUMENT" in status:
            return InvalidRequest(f"the model refused the request: {message}")
        if "NOT_FOUND" in status or "is not ready" in message or "unknown model" in message:
            return Unavailable(
                f"model {model} is not available; retry later", retry_after=self.retry_after_s
            )
        return UpstreamError(f"inference failed ({status or 'error'})")

    def probe(self) -> TritonHealth:
        """Is Triton live and ready, and is each ensemble the gateway calls ready?"""
        timeout = self.probe_timeout_s
        live = ready = False
        models: dict[str, bool] = {}
        problem = None
        try:
            live = bool(self.client.is_server_live(client_timeout=timeout))
            ready = bool(self.client.is_server_ready(client_timeout=timeout))
            for name in (self.model, self.nsfw_model):
                models[name] = bool(self.client.is_model_ready(name, client_timeout=timeout))
        except InferenceServerException as exc:
            problem = f"triton at {self.url}: {exc.status() or ''} {exc.message()}".strip()
        return TritonHealth(live, ready, models, problem)

    def model_info(self) -> dict[str, dict[str, str]]:
        response = self.http.request(
            "GET", self.metrics_url, timeout=self.probe_timeout_s, retries=False
        )
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        loaded: dict[str, dict[str, str]] = {}
        for family in text_string_to_metric_families(response.data.decode("utf-8", "replace")):
            if family.name != "imagegen_model_info":
                continue
            for sample in family.samples:
                labels = dict(sample.labels)
                name = labels.pop("model", None)
                if name and sample.value:
                    loaded[name] = labels
        return loaded


def _outcome(error: GatewayError) -> TritonOutcome:
    return {
        Unavailable: TritonOutcome.UNAVAILABLE,
        QueueTimeout: TritonOutcome.QUEUE_TIMEOUT,
        Overloaded: TritonOutcome.OVERLOADED,
        UpstreamTimeout: TritonOutcome.DEADLINE,
        InvalidRequest: TritonOutcome.INVALID,
    }.get(type(error), TritonOutcome.ERROR)
