"""The pipeline under BentoML 1.4, with its adaptive batching: a `batchable` API taking a list
(one item per request; clients send a one-item list, which the dispatcher joins with others),
`max_batch_size` and `max_latency_ms`, and the service given the machine's CPUs.

    bentoml serve benchmarks.peers.bentoml_app:Diffusion --port PORT

`max_latency_ms` is a budget, not a wait: past it BentoML answers 503, so it is set above the
longest batch the driver sends (8 images of 512x1024 take about a minute on two cores).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml

from benchmarks.peers import pipeline

MAX_BATCH_SIZE = pipeline.max_batch_size()
MAX_LATENCY_MS = int(os.environ.get("PEERS_MAX_LATENCY_MS", "600000"))


@bentoml.service(resources={"cpu": str(os.cpu_count() or 1)}, traffic={"timeout": 600}, workers=1)
class Diffusion:
    def __init__(self) -> None:
        self.pipe = pipeline.load()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, str]]:
        return [pipeline.answer(image) for image in pipeline.images(self.pipe, requests)]
