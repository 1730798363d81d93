"""The pipeline under Ray Serve 2.60, batching as its docs show: an `async` method under
`@serve.batch(max_batch_size, batch_wait_timeout_s)`, `max_ongoing_requests` at least
`max_batch_size` (Serve's default of 5 would never let a batch of 8 form), and the replica given
the machine's CPUs (`num_cpus`, which also sets its torch threads). The pass runs in a thread so
that the replica's loop keeps queueing the next batch meanwhile.

    python -m benchmarks.peers.ray_app PORT
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any

import ray
from ray import serve
from starlette.requests import Request

from benchmarks.peers import pipeline

# Read from the environment, which Ray's workers inherit (their argv is Ray's own).
MAX_BATCH_SIZE = pipeline.max_batch_size()
BATCH_WAIT_TIMEOUT_S = pipeline.batch_timeout_s()
CPUS = os.cpu_count() or 1


@serve.deployment(max_ongoing_requests=2 * MAX_BATCH_SIZE, ray_actor_options={"num_cpus": CPUS})
class Diffusion:
    def __init__(self) -> None:
        self.pipe = pipeline.load()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, str]]:
        def work() -> list[dict[str, str]]:
            return [pipeline.answer(image) for image in pipeline.images(self.pipe, requests)]

        return await asyncio.to_thread(work)

    async def __call__(self, request: Request) -> dict[str, str]:
        return await self.generate(await request.json())


def main() -> None:
    port = int(sys.argv[1])
    # No dashboard: it would only add idle load on the other servers' turns.
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Diffusion.bind(), name="diffusion", route_prefix="/generate")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
