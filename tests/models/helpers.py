"""Building Triton gRPC inputs and reading Triton's own counters, for the model tests."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

DTYPES = {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32",
          np.dtype(np.uint8): "UINT8", np.dtype(object): "BYTES"}


def tensors(**values: Any) -> list[grpcclient.InferInput]:
    """Name=array pairs -> InferInputs; arrays keep their shape and dtype."""
    inputs = []
    for name, value in values.items():
        array = np.asarray(value)
        infer_input = grpcclient.InferInput(name, list(array.shape), DTYPES[array.dtype])
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def generation(
    prompt: str = "a lighthouse at dusk",
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    seed: int = 0,
    negative: str = "",
    guidance: float = -1.0,
    scale: int | None = 1,
) -> dict[str, np.ndarray]:
    """The ensembles' inputs (shape [1, 1] each); scale=None leaves SCALE out (diffusion alone)."""
    values = {
        "PROMPT": np.array([[prompt.encode()]], dtype=object),
        "NEGATIVE_PROMPT": np.array([[negative.encode()]], dtype=object),
        "WIDTH": np.array([[width]], dtype=np.int32),
        "HEIGHT": np.array([[height]], dtype=np.int32),
        "STEPS": np.array([[steps]], dtype=np.int32),
        "SEED": np.array([[seed]], dtype=np.int64),
        "GUIDANCE_SCALE": np.array([[guidance]], dtype=np.float32),
    }
    if scale is not None:
        values["SCALE"] = np.array([[scale]], dtype=np.int32)
    return values


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
