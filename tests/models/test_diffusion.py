"""The diffusion model: sizes, seeds, input checks, cancellation and the timeout parameter."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from embedded.triton import TritonServer
from gateway.triton.contract import TIMEOUT_MS
from tests.models.helpers import (
    HOLD,
    HOLD_LIMIT_MS,
    diffusion_idle,
    diffusion_interrupted,
    diffusion_steps,
    generation,
    tensors,
    wait_until,
)


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.grpc_url)


def generate(client: grpcclient.InferenceServerClient, **kwargs: object) -> np.ndarray:
    result = client.infer("diffusion", tensors(**generation(scale=None, **kwargs)))  # type: ignore[arg-type]
    return result.as_numpy("IMAGE")


def test_image_has_the_requested_size(client: grpcclient.InferenceServerClient) -> None:
    image = generate(client, width=96, height=64)
    assert image.shape == (1, 64, 96, 3)
    assert image.dtype == np.uint8


def test_same_seed_same_bytes_other_seed_other_image(client: grpcclient.InferenceServerClient) -> None:
    first = generate(client, seed=1234)
    again = generate(client, seed=1234)
    other = generate(client, seed=1235)
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)


def test_optional_inputs_may_be_left_out(client: grpcclient.InferenceServerClient) -> None:
    values = generation(scale=None)
    for optional in ("NEGATIVE_PROMPT", "SEED", "GUIDANCE_SCALE"):
        del values[optional]
    assert client.infer("diffusion", tensors(**values)).as_numpy("IMAGE").shape == (1, 64, 64, 3)


def test_negative_prompt_and_guidance_change_the_image(client: grpcclient.InferenceServerClient) -> None:
    plain = generate(client, seed=7)
    assert not np.array_equal(plain, generate(client, seed=7, negative="blurry"))
    assert not np.array_equal(plain, generate(client, seed=7, guidance=1.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 65}, "WIDTH must be a multiple of 8"),
        ({"height": 4096}, "HEIGHT must be a multiple of 8"),
        ({"width": 0}, "WIDTH must be a multiple of 8"),
        ({"steps": 0}, "STEPS must be in 1..100"),
        ({"steps": 101}, "STEPS must be in 1..100"),
        ({"seed": -5}, "SEED must be -1"),
        ({"guidance": 1000.0}, "GUIDANCE_SCALE must be at most"),
    ],
)
def test_bad_inputs_are_invalid_arg_and_the_model_keeps_serving(
    client: grpcclient.InferenceServerClient, change: dict[str, object], message: str
) -> None:
    with pytest.raises(InferenceServerException) as error:
        generate(client, **change)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in error.value.message()
    assert generate(client).shape == (1, 64, 64, 3)


def test_prompt_that_is_not_utf8_is_invalid_arg(client: grpcclient.InferenceServerClient) -> None:
    values = generation(scale=None)
    values["PROMPT"] = np.array([[b"\xff\xfe bad"]], dtype=object)
    with pytest.raises(InferenceServerException, match="PROMPT must be UTF-8"):
        client.infer("diffusion", tensors(**values))


def test_bad_timeout_parameter_is_invalid_arg(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="timeout_ms must be a positive integer"):
        client.infer("diffusion", tensors(**generation(scale=None)), parameters={"timeout_ms": -3})


def test_grpc_deadline_cancels_a_direct_generation(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    # An idle instance takes the request at once: one the deadline found still queued would be
    # dropped there, never reaching the model.
    diffusion_idle(triton)
    steps_before = diffusion_steps(triton)
    cancelled_before = diffusion_interrupted(triton, "cancelled")
    # Held at the end of its first step (the model's test hook) until the deadline cancels it:
    # still running at the deadline, however fast the machine.
    with pytest.raises(InferenceServerException) as error:
        client.infer(
            "diffusion", tensors(**generation(steps=100, scale=None)),
            parameters={HOLD: True, TIMEOUT_MS: HOLD_LIMIT_MS}, client_timeout=3.0,
        )
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(lambda: diffusion_interrupted(triton, "cancelled") > cancelled_before,
               "diffusion reported a cancelled interruption")
    # The step it was held at (none if the deadline passed before it), and not one more.
    ran = diffusion_steps(triton) - steps_before
    assert ran <= 1, f"ran {ran:.0f} of 100 steps after the deadline"


def test_timeout_parameter_stops_generation_inside_the_ensemble(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    # A gRPC deadline does not reach diffusion inside an ensemble (Triton 2.51); the parameter does.
    steps_before = diffusion_steps(triton)
    timeouts_before = diffusion_interrupted(triton, "timeout")
    values = generation(steps=100)
    with pytest.raises(InferenceServerException, match=r"generation timeout after \d+ of 100 steps"):
        # Held until its timeout has passed: the parameter reaches diffusion, the hold with it.
        client.infer("txt2img", tensors(**values), parameters={HOLD: True, TIMEOUT_MS: 1000},
                     client_timeout=60)
    wait_until(lambda: diffusion_interrupted(triton, "timeout") > timeouts_before,
               "diffusion reported a timeout interruption")
    ran = diffusion_steps(triton) - steps_before
    assert ran <= 1, f"ran {ran:.0f} of 100 steps after the timeout"
