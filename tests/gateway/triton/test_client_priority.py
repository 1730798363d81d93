"""`TritonGateway.generate(priority=...)` against the session's real Triton: an INTERACTIVE
generation, through the ensemble or step by step (`cancel`, the jobs' way), reaches the diffusion
model's queue at its level and runs in the next pass ahead of batch work queued before it
(tests/models/priorities.py holds the model and reads the order)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import urllib3

from embedded.triton import TritonServer
from gateway.triton import contract
from gateway.triton.client import TritonGateway
from tests.models.priorities import STEPS, Answer, ran_ahead

DEADLINE_S = 120.0  # a guard: nothing here waits for it


@pytest.fixture
def gateway(triton: TritonServer) -> Iterator[TritonGateway]:
    client = TritonGateway(
        triton.grpc_url,
        triton.metrics_url,
        model=contract.Model.TXT2IMG.value,
        nsfw_model=contract.Model.TXT2IMG_NSFW.value,
        probe_timeout_s=5,
        retry_after_s=1,
        http=urllib3.PoolManager(),
    )
    yield client
    client.close()


@pytest.mark.parametrize("cancellable", [False, True], ids=["ensemble", "step-by-step"])
@pytest.mark.parametrize("nsfw", [False, True], ids=["txt2img", "txt2img_nsfw"])
def test_an_interactive_generation_runs_ahead_of_queued_batch_work(
    triton: TritonServer, gateway: TritonGateway, nsfw: bool, cancellable: bool
) -> None:
    generation = contract.Generation(prompt="a lighthouse at dusk", width=64, height=64, steps=STEPS)
    cancel = threading.Event() if cancellable else None

    def send(answer: Answer) -> None:
        def run() -> None:
            try:
                gateway.generate(
                    generation, nsfw=nsfw, deadline_s=DEADLINE_S, cancel=cancel,
                    priority=contract.Priority.INTERACTIVE,
                )
            except Exception as exc:  # noqa: BLE001 - handed to the assertion on the answer
                answer(None, exc)
            else:
                answer(True, None)

        threading.Thread(target=run, daemon=True).start()

    ran_ahead(triton, send)
