"""The gateway's Triton client: the one call per request, its deadline, failover, readiness,
and the generation model's limits.

NSFW off calls the `txt2img` ensemble, so the classifier never runs; NSFW on calls
`txt2img_nsfw`, where the classifier runs beside the upscaler and enforces its own 5 s budget.
`/moderate` calls the classifier (`nsfw`) alone, with the client's image. Tensor names and
sentinels come from `gateway.triton.contract`; which replica takes a call, from
`gateway.triton.replicas`; what a failure means, from `gateway.triton.failures`.

Failover: a call whose failure fails over (a replica that never worked on it, or went away while
it did) is retried once on another ready replica while the deadline leaves at least
`_MIN_RETRY_S`. The NSFW fail-safe is an answer, not a failure: never retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gateway.errors import Canceled, GatewayError, Unavailable, UpstreamError
from gateway.metrics import NULL_METRICS, Recorder
from gateway.triton import contract
from gateway.triton.failures import classify
from gateway.triton.replicas import NoReplica, Replica, ReplicaSet
from gateway.triton.target import parse_target
from gateway.vocabulary import TritonOutcome

log = logging.getLogger(__name__)

# gRPC retries a lost connection with exponential backoff up to 2 minutes by default; a short
# cap lets the gateway see a restarted Triton within seconds. Each channel has one address
# (gateway.triton.replicas), so no load-balancing policy is needed.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# How often a cancellable call looks at its cancel event: a canceled job stops within this
# much of the next denoising step.
_CANCEL_POLL_S = 0.1
# The classifier enforces the spec's 5 s itself (status "timeout"); this covers its queue and
# the transfer, after which the gateway applies the same fail-safe.
_CLASSIFIER_DEADLINE_S = 6.0
# A retry needs at least this much of the deadline left: less cannot make an image, and the
# honest answer is then the 503 of the failure rather than a 504 after a doomed try.
_MIN_RETRY_S = 1.0


@dataclass(frozen=True)
class Generated:
    image: np.ndarray  # (1, H, W, 3) uint8 RGB, as Triton sent it
    nsfw: contract.NsfwReading | None = None  # None when the ensemble ran no classifier


@dataclass(frozen=True)
class ReplicaHealth:
    address: str
    live: bool
    ready: bool
    models: dict[str, bool]  # ensemble -> ready
    problem: str | None = None  # why this replica could not be asked

    @property
    def all_ready(self) -> bool:
        return self.live and self.ready and bool(self.models) and all(self.models.values())


@dataclass(frozen=True)
class TritonHealth:
    """What /readyz reports: the replicas together (one replica with everything ready is
    enough to serve) and each on its own."""

    live: bool  # some replica is live
    ready: bool  # some replica is ready
    models: dict[str, bool]  # ensemble -> ready on some replica
    problem: str | None = None  # why no replica can serve, when none can
    replicas: tuple[ReplicaHealth, ...] = ()

    @property
    def all_ready(self) -> bool:
        return any(replica.all_ready for replica in self.replicas)

    @classmethod
    def of(cls, replicas: list[ReplicaHealth], names: tuple[str, ...], problem: str | None) -> TritonHealth:
        serving = any(replica.all_ready for replica in replicas)
        problems = [r.problem for r in replicas if r.problem]
        if problem is None and not serving and problems:
            problem = "; ".join(problems)
        return cls(
            live=any(r.live for r in replicas),
            ready=any(r.ready for r in replicas),
            models={name: any(r.models.get(name, False) for r in replicas) for name in names},
            problem=None if serving else problem,
            replicas=tuple(replicas),
        )


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
        metrics: Recorder = NULL_METRICS,
        classifier_model: str = "nsfw",
        queue_timeout_s: float | None = None,
        refresh_s: float = 5.0,
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
        # ensemble -> (diffusion, upscaler): the steps generate_cancellable calls itself.
        self._steps: dict[str, tuple[str, str]] = {}
        # Nothing connects or resolves before the first use: building the gateway never fails
        # because Triton is down, and the refresher starts in the process that serves.
        self.replicas = ReplicaSet(
            parse_target(url),
            refresh_s=refresh_s,
            probe_timeout_s=probe_timeout_s,
            channel_args=_CHANNEL_ARGS,
            metrics=metrics,
        )

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        """The client of the replica the next call would go to, for a one-off call; inference
        goes through `_infer` (failover), the model's limits through `_leased`."""
        replica = self._acquire()
        self.replicas.release(replica)
        return replica.client

    @contextmanager
    def _leased(self) -> Iterator[grpcclient.InferenceServerClient]:
        """A replica's client held for a few calls: counted in flight, so a replica leaving
        the name keeps its channel open until they are done."""
        replica = self._acquire()
        try:
            yield replica.client
        finally:
            self.replicas.release(replica)

    def close(self) -> None:
        self.replicas.close()

    def generate(
        self,
        generation: contract.Generation,
        *,
        nsfw: bool,
        deadline_s: float,
        cancel: threading.Event | None = None,
        priority: contract.Priority | None = None,
    ) -> Generated:
        """One image, through `txt2img_nsfw` when `nsfw` else `txt2img`; with `cancel`, step by
        step instead (`generate_cancellable`). `priority`: the diffusion model's queue level
        (None: the model's default, BATCH)."""
        if cancel is not None:
            return self.generate_cancellable(
                generation, nsfw=nsfw, deadline_s=deadline_s, cancel=cancel, priority=priority
            )
        kind = contract.Model.TXT2IMG_NSFW if nsfw else contract.Model.TXT2IMG
        model = self.nsfw_model if nsfw else self.model
        result = self._infer(
            model,
            generation.inputs(),
            contract.outputs(kind),
            deadline_s,
            # Triton 2.51 drops the gRPC deadline at the ensemble's first step; the
            # diffusion model reads this parameter instead and stops between steps.
            parameters=lambda left_s: {contract.TIMEOUT_MS: max(1, int(left_s * 1000))},
            # How long it may wait in the diffusion model's queue, and at which level (the
            # ensemble passes both on).
            queue_timeout_us=self.queue_timeout_us,
            priority=priority,
        )
        image = result.as_numpy(contract.IMAGE.name)
        expected = generation.image_shape
        if image is None or image.shape != expected or image.dtype != contract.IMAGE.dtype:
            shape = None if image is None else image.shape
            raise UpstreamError(f"{model} returned an image of shape {shape}, expected {expected}")
        return Generated(image, contract.read_nsfw(result) if nsfw else None)

    def generate_cancellable(
        self,
        generation: contract.Generation,
        *,
        nsfw: bool,
        deadline_s: float,
        cancel: threading.Event,
        priority: contract.Priority | None = None,
    ) -> Generated:
        """One image whose generation stops in Triton when `cancel` is set (raises `Canceled`).

        Triton 2.51 does not pass a cancellation on to the first model of an ensemble, so this
        calls the ensemble's steps one by one, as the ensemble would: the diffusion model (a
        cancel reaches its loop between steps), then the upscaler and the classifier on the
        generated image, with the same NSFW fail-safe."""
        started = time.monotonic()
        diffusion, upscaler = self._step_models(self.nsfw_model if nsfw else self.model)
        result = self._infer(
            diffusion,
            generation.inputs(upscaler=False),
            (contract.IMAGE,),
            deadline_s,
            parameters=lambda left_s: {contract.TIMEOUT_MS: max(1, int(left_s * 1000))},
            queue_timeout_us=self.queue_timeout_us,
            cancel=cancel,
            priority=priority,
        )
        image = result.as_numpy(contract.IMAGE.name)
        expected = (1, generation.height, generation.width, 3)
        if image is None or image.shape != expected or image.dtype != contract.IMAGE.dtype:
            shape = None if image is None else image.shape
            raise UpstreamError(f"{diffusion} returned an image of shape {shape}, expected {expected}")
        reading = self._classify_fail_safe(image[0], priority) if nsfw else None
        if generation.scale != contract.NO_UPSCALE:
            left_s = deadline_s - (time.monotonic() - started)
            upscaled = self._infer(
                upscaler,
                contract.tensors(
                    {
                        contract.IMAGE.name: image,
                        contract.SCALE.name: np.array([[generation.scale]], contract.SCALE.dtype),
                    }
                ),
                (contract.IMAGE,),
                left_s,
                cancel=cancel,
                priority=priority,
            ).as_numpy(contract.IMAGE.name)
            if upscaled is None or upscaled.shape != generation.image_shape:
                shape = None if upscaled is None else upscaled.shape
                raise UpstreamError(
                    f"{upscaler} returned an image of shape {shape}, "
                    f"expected {generation.image_shape}"
                )
            image = upscaled
        return Generated(image, reading)

    def _classify_fail_safe(
        self, pixels: np.ndarray, priority: contract.Priority | None = None
    ) -> contract.NsfwReading:
        # The spec's fail-safe: an error or a timeout scores 1.0 and the upload goes on.
        try:
            return self.classify(pixels, _CLASSIFIER_DEADLINE_S, priority=priority)
        except GatewayError as exc:
            timed_out = exc.status == 504
            status = contract.NsfwStatus.TIMEOUT if timed_out else contract.NsfwStatus.ERROR
            return contract.NsfwReading(contract.FAIL_SAFE_SCORE, status)

    def _step_models(self, ensemble: str) -> tuple[str, str]:
        """(diffusion, upscaler) behind an ensemble, from Triton's copy of its config."""
        cached = self._steps.get(ensemble)
        if cached is not None:
            return cached
        try:
            with self._leased() as client:
                config = client.get_model_config(
                    ensemble, as_json=True, client_timeout=self.probe_timeout_s
                )["config"]
        except InferenceServerException as exc:
            raise Unavailable(
                f"Triton cannot say what {ensemble} runs: {exc.status() or exc.message()}",
                retry_after=self.retry_after_s,
            ) from None
        diffusion, upscaler = contract.generation_model(config), contract.upscaler_model(config)
        if diffusion is None or upscaler is None:
            raise UpstreamError(f"{ensemble} has no diffusion or no upscaler step")
        self._steps[ensemble] = (diffusion, upscaler)
        return diffusion, upscaler

    def classify(
        self, pixels: np.ndarray, deadline_s: float, *, priority: contract.Priority | None = None
    ) -> contract.NsfwReading:
        """NSFW score and status of one (H, W, 3) uint8 RGB image, with the same fail-safe as
        in the ensemble (1.0 unless the status is `ok`)."""
        result = self._infer(
            self.classifier_model,
            contract.classify_inputs(pixels),
            contract.outputs(contract.Model.CLASSIFIER),
            deadline_s,
            priority=priority,
        )
        return contract.read_nsfw(result)

    def model_limits(self) -> contract.ModelLimits:
        """The limits of the generation model behind each ensemble the gateway calls, from
        Triton's own copy of their configs; raises when Triton cannot say."""
        timeout = self.probe_timeout_s
        limits = contract.ModelLimits()
        with self._leased() as client:
            for ensemble in (self.model, self.nsfw_model):
                config = client.get_model_config(ensemble, as_json=True, client_timeout=timeout)
                name = contract.generation_model(config["config"])
                if name is None:
                    raise ValueError(f"{ensemble} has no step that takes {contract.PROMPT.name}")
                model = client.get_model_config(name, as_json=True, client_timeout=timeout)
                limits = limits.tighter(contract.ModelLimits.from_config(model["config"]))
        return limits

    def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: tuple[contract.Tensor, ...],
        deadline_s: float,
        parameters: Callable[[float], dict[str, Any]] | None = None,
        queue_timeout_us: int | None = None,
        cancel: threading.Event | None = None,
        priority: contract.Priority | None = None,
    ) -> grpcclient.InferResult:
        """One call on one replica, and at most one retry on another (module docstring).
        `parameters` gives the request parameters for the time left; `priority` the queue level
        (a model without levels, and 0 for None, take the model's default)."""
        started = time.monotonic()
        replica = self._acquire(model)
        retried = False
        while True:
            left_s = deadline_s - (time.monotonic() - started)
            call = replica.client.infer if cancel is None else _unless(cancel, replica.client)
            try:
                result = call(
                    model,
                    inputs,
                    outputs=[grpcclient.InferRequestedOutput(t.name) for t in outputs],
                    client_timeout=left_s,
                    parameters=parameters(left_s) if parameters else None,
                    timeout=queue_timeout_us,
                    priority=0 if priority is None else int(priority),
                )
            except InferenceServerException as exc:
                failed = exc
            else:
                failed = None
            finally:
                self.replicas.release(replica)
            if failed is None:
                self.metrics.triton_address_called(replica.address, TritonOutcome.OK)
                self.metrics.triton_called(model, TritonOutcome.OK)
                return result
            elapsed = time.monotonic() - started
            log.warning(
                "triton %s failed after %.2fs: %s %s",
                model,
                elapsed,
                str(failed.status() or ""),
                str(failed.message() or ""),
            )
            failure = classify(failed)
            self.metrics.triton_address_called(replica.address, failure.outcome)
            reason = failure.failover
            if reason is not None:
                self.replicas.not_serving(replica)
            other = None
            if reason is not None and not retried and deadline_s - elapsed >= _MIN_RETRY_S:
                other = self._other_replica(replica)
            if other is None:
                self.metrics.triton_called(model, failure.outcome)
                raise failure.error(
                    failed, model=model, deadline_s=deadline_s, retry_after_s=self.retry_after_s
                ) from None
            log.warning(
                "retrying %s on %s: %s was %s", model, other.address, replica.address, reason.value
            )
            self.metrics.triton_retried(reason)
            replica, retried = other, True

    def _acquire(self, model: str | None = None) -> Replica:
        try:
            return self.replicas.acquire()
        except NoReplica as exc:
            if model is not None:
                self.metrics.triton_called(model, TritonOutcome.UNAVAILABLE)
            raise Unavailable(
                f"the inference server is unavailable ({exc}); retry later",
                retry_after=self.retry_after_s,
            ) from None

    def _other_replica(self, failed: Replica) -> Replica | None:
        try:
            return self.replicas.acquire(exclude=[failed], ready_only=True)
        except NoReplica:
            return None

    def probe(self) -> TritonHealth:
        """Is each replica live and ready, and is each ensemble the gateway calls ready there?
        Asks them all at once; what they answer also steers the next calls."""
        replicas = self.replicas.replicas()
        healths = self.replicas.map(self._probe_replica, replicas)
        names = (self.model, self.nsfw_model)
        problem = self.replicas.problem
        if not replicas and problem is None:
            problem = "the Triton target has no address"
        if problem is not None:
            problem = f"triton at {self.url}: {problem}"
        return TritonHealth.of(healths, names, problem)

    def _probe_replica(self, replica: Replica) -> ReplicaHealth:
        timeout = self.probe_timeout_s
        client = replica.client
        live = ready = False
        models: dict[str, bool] = {}
        problem = None
        try:
            live = bool(client.is_server_live(client_timeout=timeout))
            ready = bool(client.is_server_ready(client_timeout=timeout))
            for name in (self.model, self.nsfw_model):
                models[name] = bool(client.is_model_ready(name, client_timeout=timeout))
        except InferenceServerException as exc:
            problem = f"triton at {replica.address}: {exc.status() or ''} {exc.message()}".strip()
        except ValueError:  # its channel closed since the list was taken: it left the name
            problem = f"triton at {replica.address}: no longer behind {self.url}"
        self.replicas.set_ready(replica, live and ready)
        return ReplicaHealth(replica.address, live, ready, models, problem)

    def model_info(self) -> dict[str, dict[str, str]]:
        response = self.http.request(
            "GET", self.metrics_url, timeout=self.probe_timeout_s, retries=False
        )
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        loaded: dict[str, dict[str, str]] = {}
        for family in text_string_to_metric_families(response.data.decode("utf-8", "replace")):
            if family.name != contract.MODEL_INFO:
                continue
            for sample in family.samples:
                labels = dict(sample.labels)
                name = labels.pop("model", None)
                if name and sample.value:
                    loaded[name] = labels
        return loaded


def _unless(
    cancel: threading.Event, client: grpcclient.InferenceServerClient
) -> Callable[..., grpcclient.InferResult]:
    """`client.infer`, but one that cancels the gRPC call (which Triton passes on to the
    model) as soon as `cancel` is set, and then raises `Canceled`."""

    def infer(model: str, inputs: list[grpcclient.InferInput], **kwargs: Any) -> grpcclient.InferResult:
        done = threading.Event()
        answer: list[tuple[Any, Any]] = []

        def finished(result: Any, error: Any) -> None:
            answer.append((result, error))
            done.set()

        if cancel.is_set():
            raise Canceled("the job was canceled")
        call = client.async_infer(model, inputs, finished, **kwargs)
        while not done.wait(_CANCEL_POLL_S):
            if cancel.is_set():
                call.cancel()
                raise Canceled("the job was canceled")
        result, error = answer[0]
        if error is not None:
            raise error
        return result

    return infer
