"""The diffusion model's two priority levels on the session's real Triton: the config declares a
level per `Priority` with a queue policy each, an INTERACTIVE call to either ensemble reaches the
model's queue at its level (Triton 2.51 hands an ensemble request's priority to its first model)
and runs in the next pass ahead of batch work queued before it, a call that names no priority
waits behind that work, and a full batch queue refuses batch work only."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from embedded.triton import TritonServer
from gateway.triton.contract import Model, Priority
from tests.models.helpers import (
    DIFFUSION,
    diffusion_held,
    diffusion_idle,
    diffusion_pending,
    generation,
    model_config,
    tensors,
    wait_until,
)
from tests.models.priorities import (
    HOLD_PARAMETERS,
    STEPS,
    Answer,
    Cancellable,
    queue_policy,
    ran_ahead,
    waited_behind,
)

# Longer than the test: requests that fill a queue never expire in it.
FILL_QUEUE_TIMEOUT_US = 600_000_000


def test_the_config_has_a_queue_policy_per_priority_level() -> None:
    batcher = model_config(DIFFUSION).dynamic_batching
    assert batcher.priority_levels == len(Priority) == max(Priority)
    # A call that names no priority is batch work: only a caller that asks goes ahead.
    assert batcher.default_priority_level == Priority.BATCH
    assert set(batcher.priority_queue_policy) == set(Priority)
    # Every level has its own policy, so the default one would be a second, unused copy.
    assert not batcher.HasField("default_queue_policy")
    for level in Priority:
        policy = queue_policy(level)
        assert policy.max_queue_size > 0, level
        assert policy.default_timeout_microseconds > 0, level
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT, level
        assert policy.allow_timeout_override, level


@pytest.mark.parametrize("ensemble", [Model.TXT2IMG.value, Model.TXT2IMG_NSFW.value])
def test_an_interactive_call_to_an_ensemble_runs_ahead_of_queued_batch_work(
    triton: TritonServer, ensemble: str
) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:

        def send(answer: Answer) -> None:
            client.async_infer(
                ensemble, tensors(**generation(steps=STEPS, seed=7)), callback=answer,
                priority=int(Priority.INTERACTIVE),
            )

        ran_ahead(triton, send)


def test_a_call_that_names_no_priority_waits_behind_queued_batch_work(triton: TritonServer) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:

        def send(answer: Answer) -> Cancellable:
            return client.async_infer(
                DIFFUSION, tensors(**generation(steps=STEPS, seed=7, scale=None)),
                callback=answer, parameters=HOLD_PARAMETERS,
            )

        waited_behind(triton, send)


def test_a_full_batch_queue_refuses_batch_work_and_takes_interactive_calls(
    triton: TritonServer,
) -> None:
    size = queue_policy(Priority.BATCH).max_queue_size
    refused: list[InferenceServerException] = []
    with diffusion_held(triton), grpcclient.InferenceServerClient(triton.grpc_url) as client:

        def queue(seed: int, level: Priority) -> Cancellable:
            return client.async_infer(
                DIFFUSION, tensors(**generation(steps=1, seed=seed, scale=None)),
                callback=lambda result, error: refused.append(error) if error else None,
                priority=int(level), timeout=FILL_QUEUE_TIMEOUT_US,
            )

        calls = [queue(i, Priority.BATCH) for i in range(size)]
        wait_until(lambda: diffusion_pending(triton) == size, f"{size} batch requests wait")
        with pytest.raises(InferenceServerException, match="Exceeds maximum queue size"):
            client.infer(
                DIFFUSION, tensors(**generation(steps=1, seed=size, scale=None)),
                priority=int(Priority.BATCH),
            )
        calls.append(queue(size + 1, Priority.INTERACTIVE))
        wait_until(lambda: diffusion_pending(triton) == size + 1, "the interactive call waits")
        assert refused == []
        for call in calls:
            call.cancel()
    diffusion_idle(triton)
