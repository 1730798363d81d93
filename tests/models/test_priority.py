"""The diffusion model's two priority levels in its config, on the session's real Triton: a level
per `Priority` with a queue policy each, and a full batch queue refuses batch work only. That an
INTERACTIVE call to either ensemble runs ahead of queued batch work (Triton 2.51 hands an ensemble
request's priority to its first model) is shown through the gateway's client,
tests/gateway/triton/test_client_priority.py; the same checks made here with raw calls failed in
the full suite, after the session's Triton had served every other test, and are left out until
they hold there."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from embedded.triton import TritonServer
from gateway.triton.contract import Priority
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
    Cancellable,
    queue_policy,
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
