"""Building Triton gRPC inputs and reading Triton's own counters, for the model tests."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from gateway.triton import contract


def tensors(**values: Any) -> list[grpcclient.InferInput]:
    """Name=array pairs -> InferInputs; arrays keep their shape and dtype."""
    return contract.tensors({name: np.asarray(value) for name, value in values.items()})


def generation(
    prompt: str = "a lighthouse at dusk",
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    seed: int = 0,
    negative: str = "",
    guidance: float = contract.MODEL_DEFAULT_GUIDANCE,
    scale: int | None = 1,
) -> dict[str, np.ndarray]:
    """The ensembles' inputs (shape [1, 1] each); scale=None leaves SCALE out (diffusion alone).

    Values go in as given (a negative guidance, seed -1), so tests can send what the gateway
    never would."""
    request = contract.Generation(
        prompt=prompt,
        width=width,
        height=height,
        steps=steps,
        negative_prompt=negative,
        seed=seed,
        guidance_scale=guidance,
        scale=1 if scale is None else scale,
    )
    return request.arrays(upscaler=scale is not None)


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include `labels`."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def executions(client: grpcclient.InferenceServerClient, model: str, quiet_s: float = 0.5) -> int:
    """A model's execution count once it has stopped moving for `quiet_s`.

    Triton records statistics after it sends the response, and the session's server is shared,
    so a count read straight after another request can still move.
    """

    def read() -> int:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0))

    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        latest = read()
        if latest != value:
            value, since = latest, time.monotonic()
    return value
