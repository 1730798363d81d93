"""The one Triton call per request, its deadline, and the mapping of gRPC failures to HTTP.

NSFW off calls the `txt2img` ensemble, so the classifier never runs; NSFW on calls
`txt2img_nsfw`, where the classifier runs beside the upscaler and enforces its own 5 s budget.
`/moderate` calls the classifier (`nsfw`) alone, with the client's image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

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
from gateway.metrics import Metrics
from gateway.request import GenerateRequest
from gateway.triton import contract

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


@dataclass(frozen=True)
class Generated:
    image: np.ndarray  # (1, H, W, 3) uint8 RGB, as Triton sent it
    nsfw_score: float | None = None
    nsfw_status: str | None = None


@dataclass
class Readiness:
    ready: bool
    live: bool = False
    server_ready: bool = False
    models: dict[str, bool] = field(default_factory=dict)
    loaded: dict[str, dict[str, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def body(self, triton_url: str) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not_ready",
            "triton": {"url": triton_url, "live": self.live, "ready": self.server_ready},
            "models": {name: {"ready": ok} for name, ok in self.models.items()},
            # Per model: kind, source, demo ("true": random demo weights), from Triton's
            # imagegen_model_info gauge.
            "loaded": self.loaded,
            # True when any model runs demo weights (images are noise); null when unknown.
            "demo": any(i.get("demo") == "true" for i in self.loaded.values()) if self.loaded else None,
            "problems": self.problems,
        }


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

    def generate(self, req: GenerateRequest, deadline_s: float) -> Generated:
        model = self.nsfw_model if req.enable_nsfw_check else self.model
        kind = contract.Model.TXT2IMG_NSFW if req.enable_nsfw_check else contract.Model.TXT2IMG
        generation = contract.Generation(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=req.width,
            height=req.height,
            steps=req.num_inference_steps,
            seed=req.seed,
            guidance_scale=req.guidance_scale,
            scale=req.scale,
        )
        result = self._infer(
            model,
            generation.inputs(),
            [t.name for t in contract.outputs(kind)],
            deadline_s,
            # Triton 2.51 drops the gRPC deadline at the ensemble's first step; the
            # diffusion model reads this parameter instead and stops between steps.
            parameters={contract.TIMEOUT_MS: max(1, int(deadline_s * 1000))},
            # How long it may wait in the diffusion model's queue (the ensemble passes it on).
            queue_timeout_us=self.queue_timeout_us,
        )
        image = result.as_numpy(contract.IMAGE.name)
        expected = generation.image_shape
        if image is None or image.shape != expected or image.dtype != np.uint8:
            shape = None if image is None else image.shape
            raise UpstreamError(f"{model} returned an image of shape {shape}, expected {expected}")
        if not req.enable_nsfw_check:
            return Generated(image)
        reading = contract.read_nsfw(result)
        return Generated(image, reading.score, reading.status.value)

    def classify(self, pixels: np.ndarray, deadline_s: float) -> tuple[float, str]:
        """NSFW score and status of one (H, W, 3) uint8 RGB image, with the same fail-safe as
        in the ensemble (1.0 unless the status is `ok`)."""
        result = self._infer(
            self.classifier_model,
            contract.classify_inputs(pixels),
            [t.name for t in contract.outputs(contract.Model.CLASSIFIER)],
            deadline_s,
        )
        reading = contract.read_nsfw(result)
        return reading.score, reading.status.value

    def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: list[str],
        deadline_s: float,
        parameters: dict[str, Any] | None = None,
        queue_timeout_us: int | None = None,
    ) -> grpcclient.InferResult:
        started = time.monotonic()
        try:
            result = self.client.infer(
                model,
                inputs,
                outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
                client_timeout=deadline_s,
                parameters=parameters,
                timeout=queue_timeout_us,
            )
        except InferenceServerException as exc:
            error = self._map_error(exc, model, time.monotonic() - started, deadline_s)
            self._count(model, _outcome(error))
            raise error from None
        self._count(model, "ok")
        return result

    def _count(self, model: str, outcome: str) -> None:
        if self.metrics:
            self.metrics.triton_requests.labels(model, outcome).inc()

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

    def readiness(self) -> Readiness:
        state = Readiness(ready=False)
        timeout = self.probe_timeout_s
        try:
            state.live = bool(self.client.is_server_live(client_timeout=timeout))
            state.server_ready = bool(self.client.is_server_ready(client_timeout=timeout))
            for name in (self.model, self.nsfw_model):
                state.models[name] = bool(self.client.is_model_ready(name, client_timeout=timeout))
        except InferenceServerException as exc:
            state.problems.append(f"triton at {self.url}: {exc.status() or ''} {exc.message()}".strip())
        state.ready = state.live and state.server_ready and all(state.models.values()) and bool(
            state.models
        )
        for name, ok in state.models.items():
            if not ok:
                state.problems.append(f"model {name} is not ready")
        try:
            state.loaded = self.model_info()
        except (urllib3.exceptions.HTTPError, ValueError, OSError) as exc:
            # Informational only: readiness is Triton's own answer, not this scrape.
            state.problems.append(f"cannot read model info from {self.metrics_url}: {type(exc).__name__}")
        return state

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


def _outcome(error: GatewayError) -> str:
    return {
        Unavailable: "unavailable",
        QueueTimeout: "queue_timeout",
        Overloaded: "overloaded",
        UpstreamTimeout: "deadline",
        InvalidRequest: "invalid",
    }.get(type(error), "error")
