"""Diffusion batching on the session's Triton: requests that queue while the single diffusion
instance is busy leave the queue together as one Triton batch, and Triton's own statistics say
so. Within it, each request keeps its own size, seed, input checks, cancellation and timeout."""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.utils import InferenceServerException

from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from gateway.triton import contract
from tests.models.helpers import (
    BATCH_PIXEL_TOLERANCE,
    DIFFUSION,
    HOLD,
    HOLD_LIMIT_MS,
    diffusion_held,
    diffusion_idle,
    diffusion_interrupted,
    diffusion_pending,
    diffusion_steps,
    generation,
    metric,
    model_config,
    settled,
    tensors,
    wait_until,
)


@pytest.fixture(scope="module")
def client(triton: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        yield client


@dataclass
class Call:
    """One request to send into a batch, and what came back."""

    model: str
    values: dict[str, np.ndarray]
    parameters: dict[str, Any] | None = None
    result: grpcclient.InferResult | None = None
    error: InferenceServerException | None = None
    answered_at: float = 0.0

    @property
    def image(self) -> np.ndarray:
        assert self.error is None and self.result is not None, self.error
        return self.result.as_numpy(contract.IMAGE.name)


def diffusion(**kwargs: Any) -> Call:
    parameters = kwargs.pop("parameters", None)
    return Call(DIFFUSION, generation(scale=None, **kwargs), parameters)


def batch_sizes(
    client: grpcclient.InferenceServerClient, at_least: int = 0, quiet_s: float = 0.5
) -> dict[int, int]:
    """Triton's count of diffusion executions by batch size, once they add up to `at_least` and
    have stopped moving for `quiet_s` (Triton records statistics after it sends the responses)."""

    def read() -> dict[int, int]:
        stats = client.get_inference_statistics(DIFFUSION, as_json=True)["model_stats"][0]
        return {
            int(entry["batch_size"]): int(entry["compute_infer"]["count"])
            for entry in stats.get("batch_stats", [])
        }

    return settled(read, quiet_s, lambda sizes: sum(sizes.values()) >= at_least)


def send_as_one_batch(
    triton: TritonServer, client: grpcclient.InferenceServerClient, calls: list[Call]
) -> dict[int, int]:
    """Queues `calls` behind a held generation, lets them go as one batch and waits for every
    answer; returns how many diffusion executions of each batch size this added."""
    answers: queue.Queue = queue.Queue()
    before = batch_sizes(client)
    with diffusion_held(triton):
        for index, call in enumerate(calls):
            client.async_infer(
                call.model,
                tensors(**call.values),
                callback=lambda result, error, index=index: answers.put(
                    (index, result, error, time.monotonic())
                ),
                parameters=call.parameters,
                client_timeout=600,
            )
        wait_until(lambda: diffusion_pending(triton) == len(calls),
                   f"{len(calls)} requests wait in the queue")
    for _ in calls:
        index, result, error, at = answers.get(timeout=600)
        calls[index].result, calls[index].error, calls[index].answered_at = result, error, at
    # At least the held generation's execution and the batch's: both were answered.
    after = batch_sizes(client, at_least=sum(before.values()) + 2)
    return {size: count - before.get(size, 0) for size, count in after.items()
            if count != before.get(size, 0)}


def counter(triton: TritonServer, name: str, **labels: str) -> float:
    return metric(triton.metrics_url, f"imagegen_diffusion_{name}_total", **labels)


def test_queued_requests_share_one_execution_and_each_gets_its_size(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    calls = [
        diffusion(width=64, height=96, seed=0),
        diffusion(width=64, height=96, seed=1),
        # The ensembles' diffusion step joins the same batch.
        Call(contract.Model.TXT2IMG.value, generation(width=64, height=96, seed=2, scale=2)),
        Call(contract.Model.TXT2IMG_NSFW.value, generation(width=96, height=64, seed=3, scale=1)),
        diffusion(width=128, height=64, steps=3, seed=4),
    ]
    passes, images = counter(triton, "passes"), counter(triton, "images")
    executions = send_as_one_batch(triton, client, calls)
    # The long generation was one execution of one; everything queued behind it, one of five.
    assert executions == {1: 1, 5: 1}
    shapes = [call.image.shape for call in calls]
    assert shapes == [(1, 96, 64, 3), (1, 96, 64, 3), (1, 192, 128, 3), (1, 64, 96, 3), (1, 64, 128, 3)]
    assert calls[3].result is not None
    assert calls[3].result.as_numpy(contract.NSFW_STATUS.name)[0, 0] == b"ok"
    # Three shapes: the 64x96 ones shared a pass, the others ran one after the other.
    assert counter(triton, "passes") - passes == 1 + 3  # the long generation's, and three
    assert counter(triton, "images") - images == 1 + 5


def test_a_seed_gives_the_same_image_alone_and_in_a_batch_within_rounding(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    seeds = [11, 12, 13, 14]
    alone = [client.infer(DIFFUSION, tensors(**generation(seed=s, steps=4, scale=None))) for s in seeds]
    calls = [diffusion(seed=s, steps=4) for s in seeds]
    assert send_as_one_batch(triton, client, calls) == {1: 1, 4: 1}
    again = [diffusion(seed=s, steps=4) for s in seeds]
    assert send_as_one_batch(triton, client, again) == {1: 1, 4: 1}
    for single, first, second in zip(alone, calls, again):
        # The same batch twice: the same bytes.
        assert first.image.tobytes() == second.image.tobytes()
        difference = np.abs(single.as_numpy("IMAGE").astype(int) - first.image.astype(int))
        assert difference.max() <= BATCH_PIXEL_TOLERANCE, difference.max()
    # Seeds still tell the images apart inside one pass.
    assert len({call.image.tobytes() for call in calls}) == len(seeds)


def test_identical_requests_one_after_another_give_identical_bytes(
    client: grpcclient.InferenceServerClient,
) -> None:
    values = generation(width=96, height=64, seed=77, steps=3, scale=2)
    first = client.infer(contract.Model.TXT2IMG_NSFW.value, tensors(**values))
    second = client.infer(contract.Model.TXT2IMG_NSFW.value, tensors(**values))
    assert first.as_numpy("IMAGE").shape == (1, 128, 192, 3)
    assert first.as_numpy("IMAGE").tobytes() == second.as_numpy("IMAGE").tobytes()
    assert first.as_numpy("NSFW_SCORE").tobytes() == second.as_numpy("NSFW_SCORE").tobytes()


def test_a_bad_request_in_a_batch_fails_alone(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    calls = [
        diffusion(seed=21),
        diffusion(width=65),
        diffusion(seed=22),
        diffusion(steps=0),
        diffusion(parameters={contract.TIMEOUT_MS: "soon"}),
    ]
    assert send_as_one_batch(triton, client, calls) == {1: 1, 5: 1}
    for bad, message in ((1, "WIDTH must be a multiple of 8"), (3, "STEPS must be in 1..100"),
                         (4, "timeout_ms must be a positive integer")):
        error = calls[bad].error
        assert error is not None and error.status() == "StatusCode.INVALID_ARGUMENT", error
        assert message in error.message()
    for good in (0, 2):
        assert calls[good].image.shape == (1, 64, 64, 3)


def test_a_timed_out_request_is_answered_at_once_and_its_batch_mates_finish(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    timeouts = counter(triton, "interrupted", reason="timeout")
    calls = [
        diffusion(steps=30, seed=31),
        # Held at the end of the pass's first step until its timeout has passed (the model's test
        # hook): the pass is still running then, however fast the machine.
        diffusion(steps=30, seed=32, parameters={contract.TIMEOUT_MS: 300, HOLD: True}),
        diffusion(steps=30, seed=33),
    ]
    assert send_as_one_batch(triton, client, calls) == {1: 1, 3: 1}
    error = calls[1].error
    assert error is not None and error.status() == "StatusCode.CANCELLED", error
    ran = re.search(r"generation timeout after (\d+) of 30 steps", error.message())
    assert ran and int(ran.group(1)) < 30, error.message()
    assert calls[0].image.shape == calls[2].image.shape == (1, 64, 64, 3)
    # Answered when it stopped, not when the pass it shared ended.
    assert calls[1].answered_at < min(calls[0].answered_at, calls[2].answered_at)
    assert counter(triton, "interrupted", reason="timeout") - timeouts == 1


def test_a_pass_whose_requests_are_all_cancelled_stops(
    triton: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    steps_before = diffusion_steps(triton)
    cancelled = lambda: diffusion_interrupted(triton, "cancelled")
    before_cancelled = cancelled()
    answers: queue.Queue = queue.Queue()
    # Three that share a pass, each held at the end of its first step until it is cancelled (the
    # model's test hook): the pass cannot end on its own, however fast the machine.
    values = [generation(steps=100, seed=40 + i, scale=None) for i in range(3)]
    with diffusion_held(triton):  # one step, then the hold's cancel
        contexts = [
            client.async_infer(
                DIFFUSION, tensors(**v), callback=lambda result, error: answers.put(error),
                parameters={HOLD: True, contract.TIMEOUT_MS: HOLD_LIMIT_MS}, client_timeout=600,
            )
            for v in values
        ]
        wait_until(lambda: diffusion_pending(triton) == 3, "3 requests wait in the queue")
    wait_until(lambda: diffusion_steps(triton) >= steps_before + 1 + 3,
               "the pass of three ran its first step")
    for context in contexts:
        context.cancel()
    for _ in contexts:
        assert answers.get(timeout=120) is not None  # cancelled on the client's side
    wait_until(lambda: cancelled() == before_cancelled + 4, "all three were answered CANCELLED")
    # The instance is free again (the pass has ended), and it ran no step past the cancel.
    diffusion_idle(triton)
    ran = diffusion_steps(triton) - steps_before - 1 - 1  # the hold's step and the idle check's
    assert ran == 3, f"the pass of three ran {ran / 3:.0f} steps, held at the first"


@pytest.fixture(scope="module")
def gathering(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A second Triton serving diffusion alone, from a copy of its config whose batcher waits
    for company until it has three requests (a minute at most, however slowly they come) and
    whose passes hold two 64x64 images at most."""
    repository = tmp_path_factory.mktemp("gathering-repository")
    source = DEFAULT_REPOSITORY / DIFFUSION
    config = model_config(DIFFUSION)
    config.dynamic_batching.max_queue_delay_microseconds = 60_000_000
    config.dynamic_batching.preferred_batch_size.append(3)
    config.parameters["max_batch_pixels"].string_value = str(2 * 64 * 64)
    (repository / DIFFUSION).mkdir()
    (repository / DIFFUSION / "config.pbtxt").write_text(text_format.MessageToString(config))
    (repository / DIFFUSION / "1").symlink_to(source / "1")
    server = TritonServer.on_free_ports(
        repository,
        tmp_path_factory.mktemp("gathering-triton"),
        env={"IMAGEGEN_DIFFUSION_MODEL": str(demo_models / "diffusion")},
    )
    yield server
    server.stop()


def test_the_queue_delay_gathers_a_batch_and_max_batch_pixels_splits_its_passes(
    gathering: TritonServer,
) -> None:
    answers: queue.Queue = queue.Queue()
    seeds = [61, 62, 63]
    with grpcclient.InferenceServerClient(gathering.grpc_url) as client:
        for seed in seeds:  # nothing runs before the last one arrives: the batcher waits
            client.async_infer(
                DIFFUSION,
                tensors(**generation(seed=seed, steps=2, scale=None)),
                callback=lambda result, error: answers.put((result, error)),
            )
        for _ in seeds:
            result, error = answers.get(timeout=300)
            assert error is None, error
            assert result.as_numpy("IMAGE").shape == (1, 64, 64, 3)
        assert batch_sizes(client, at_least=1) == {3: 1}
    # Two images a pass at most: the batch of three ran as two passes.
    assert metric(gathering.metrics_url, "imagegen_diffusion_passes_total") == 2
    assert metric(gathering.metrics_url, "imagegen_diffusion_images_total") == 3
