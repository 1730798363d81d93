"""`TritonGateway.generate_cancellable`, the jobs' way through Triton, against the session's real
Triton: the ensemble's steps called one by one give the ensemble's image and NSFW reading, the
classifier's fail-safe holds, and a cancel stops the generation inside Triton (the diffusion
model's own step counter says so) or before any call."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import urllib3

from embedded.triton import TritonServer
from gateway.errors import Canceled
from gateway.triton import contract
from gateway.triton.client import TritonGateway
from tests.gateway.jobs.helpers import TritonCounters, in_thread, poll
from tests.models.helpers import diffusion_held, diffusion_idle, diffusion_steps

DEADLINE_S = 120.0  # a guard: nothing here waits for it


def gateway_on(server: TritonServer, **models: str) -> TritonGateway:
    return TritonGateway(
        server.grpc_url,
        server.metrics_url,
        model=models.get("model", "txt2img"),
        nsfw_model=models.get("nsfw_model", "txt2img_nsfw"),
        classifier_model=models.get("classifier_model", "nsfw"),
        probe_timeout_s=5,
        retry_after_s=1,
        http=urllib3.PoolManager(),
    )


@pytest.fixture
def gateway(triton: TritonServer) -> Iterator[TritonGateway]:
    client = gateway_on(triton)
    yield client
    client.close()


def generation(scale: int = contract.NO_UPSCALE, seed: int = 21) -> contract.Generation:
    return contract.Generation(
        prompt="a lighthouse at dusk",
        width=64,
        height=64,
        steps=2,
        negative_prompt="",
        seed=seed,
        guidance_scale=contract.MODEL_DEFAULT_GUIDANCE,
        scale=scale,
    )


@pytest.mark.parametrize("scale", [contract.NO_UPSCALE, contract.UPSCALE_FACTOR])
@pytest.mark.parametrize("nsfw", [False, True])
def test_the_steps_one_by_one_give_the_ensembles_image_and_reading(
    gateway: TritonGateway, scale: int, nsfw: bool
) -> None:
    request = generation(scale)
    ensemble = gateway.generate(request, nsfw=nsfw, deadline_s=DEADLINE_S)
    stepwise = gateway.generate_cancellable(
        request, nsfw=nsfw, deadline_s=DEADLINE_S, cancel=threading.Event()
    )
    assert stepwise.image.shape == ensemble.image.shape == request.image_shape
    assert stepwise.image.dtype == ensemble.image.dtype == np.uint8
    assert np.array_equal(stepwise.image, ensemble.image)
    if nsfw:
        assert ensemble.nsfw is not None and stepwise.nsfw is not None
        assert stepwise.nsfw.status == ensemble.nsfw.status == contract.NsfwStatus.OK
        assert stepwise.nsfw.score == pytest.approx(ensemble.nsfw.score, abs=1e-6)
    else:
        assert stepwise.nsfw is None and ensemble.nsfw is None
    if scale == contract.NO_UPSCALE and not nsfw:  # once: the comparison could fail
        other = gateway.generate_cancellable(
            generation(scale, seed=22), nsfw=nsfw, deadline_s=DEADLINE_S, cancel=threading.Event()
        )
        assert not np.array_equal(other.image, stepwise.image)


@pytest.mark.parametrize(
    ("variant", "status"),
    [("broken", contract.NsfwStatus.ERROR), ("slow", contract.NsfwStatus.TIMEOUT)],
)
def test_a_classifier_that_fails_flags_the_image_as_the_ensemble_does(
    failing_nsfw_triton: TritonServer, variant: str, status: contract.NsfwStatus
) -> None:
    gateway = gateway_on(
        failing_nsfw_triton,
        nsfw_model=f"txt2img_nsfw_{variant}",
        classifier_model=f"nsfw_{variant}",
    )
    try:
        request = generation()
        ensemble = gateway.generate(request, nsfw=True, deadline_s=DEADLINE_S)
        stepwise = gateway.generate_cancellable(
            request, nsfw=True, deadline_s=DEADLINE_S, cancel=threading.Event()
        )
    finally:
        gateway.close()
    assert stepwise.nsfw == ensemble.nsfw == contract.NsfwReading(contract.FAIL_SAFE_SCORE, status)
    assert np.array_equal(stepwise.image, ensemble.image)


def test_a_classifier_call_that_fails_is_the_fail_safe_reading(
    failing_nsfw_triton: TritonServer,
) -> None:
    """Where the classifier cannot be called at all (here: no such model), the image is
    flagged with status error, as the spec's fail-safe says, and still made."""
    gateway = gateway_on(failing_nsfw_triton, classifier_model="no_such_classifier")
    try:
        request = generation()
        plain = gateway.generate(request, nsfw=False, deadline_s=DEADLINE_S)
        stepwise = gateway.generate_cancellable(
            request, nsfw=True, deadline_s=DEADLINE_S, cancel=threading.Event()
        )
    finally:
        gateway.close()
    assert stepwise.nsfw == contract.NsfwReading(contract.FAIL_SAFE_SCORE, contract.NsfwStatus.ERROR)
    assert np.array_equal(stepwise.image, plain.image)


def test_a_cancel_before_the_start_raises_canceled_without_a_triton_call(
    gateway: TritonGateway, triton: TritonServer
) -> None:
    counters = TritonCounters(triton)
    start = counters.requests()
    gateway.generate_cancellable(  # the ensemble's config is read once, before any cancel
        generation(), nsfw=False, deadline_s=DEADLINE_S, cancel=threading.Event()
    )
    before = counters.now(at_least_requests=start + 1)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Canceled):
        gateway.generate_cancellable(generation(), nsfw=True, deadline_s=DEADLINE_S, cancel=cancel)
    assert counters.now() == before


def test_a_cancel_stops_the_generation_inside_triton(
    gateway: TritonGateway, triton: TritonServer
) -> None:
    """The generation waits in the diffusion model's queue behind a held one; the cancel
    reaches Triton, so its steps never run once the model is free."""
    counters = TritonCounters(triton)
    cancel = threading.Event()
    with diffusion_held(triton):
        waiting = counters.in_queue()
        thread, out = in_thread(lambda: gateway.generate_cancellable(
            generation(), nsfw=False, deadline_s=DEADLINE_S, cancel=cancel
        ))
        poll(lambda: counters.in_queue() > waiting, "the generation waits in Triton")
        steps = diffusion_steps(triton)
        cancel.set()
        thread.join(DEADLINE_S)
        [raised] = out
        assert isinstance(raised, Canceled), raised
    diffusion_idle(triton)  # one step, run after anything still queued
    assert diffusion_steps(triton) == steps + 1
