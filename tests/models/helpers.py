"""Building Triton gRPC inputs and reading Triton's own counters, for the model tests."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from embedded.triton import DEFAULT_REPOSITORY
from export.nsfw import VARIANTS
from gateway.triton import contract

T = TypeVar("T")


def model_config(model: str) -> model_config_pb2.ModelConfig:
    """The real repository's config.pbtxt of `model`, parsed."""
    text = (DEFAULT_REPOSITORY / model / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def model_limits(model: str = contract.Model.DIFFUSION.value) -> contract.ModelLimits:
    """The limits `model`'s config.pbtxt declares, read as the gateway reads them from Triton."""
    config = json_format.MessageToDict(model_config(model), preserving_proto_field_name=True)
    return contract.ModelLimits.from_config(config)


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


def settled(read: Callable[[], T], quiet_s: float = 0.5) -> T:
    """What `read` returns once it has stopped changing for `quiet_s`.

    Triton records statistics after it sends the response, and the session's server is shared,
    so a figure read straight after another request can still move.
    """
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        latest = read()
        if latest != value:
            value, since = latest, time.monotonic()
    return value


def executions(client: grpcclient.InferenceServerClient, model: str, quiet_s: float = 0.5) -> int:
    """A model's execution count once it has stopped moving for `quiet_s`."""

    def read() -> int:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0))

    return settled(read, quiet_s)


def repository_variant(
    repository: Path, source: str, name: str, replace: dict[str, str] | None = None
) -> Path:
    """A copy of model `source` of the real repository, served as `name`, its config.pbtxt
    edited (`old: new` text replacements, each of which must apply)."""
    config = (DEFAULT_REPOSITORY / source / "config.pbtxt").read_text()
    for old, new in {f'name: "{source}"': f'name: "{name}"', **(replace or {})}.items():
        if old not in config:
            raise ValueError(f"{old!r} is not in {source}'s config.pbtxt")
        config = config.replace(old, new)
    target = repository / name
    if (DEFAULT_REPOSITORY / source / "1").exists():
        shutil.copytree(DEFAULT_REPOSITORY / source / "1", target / "1")
    (target / "1").mkdir(parents=True, exist_ok=True)
    (target / "config.pbtxt").write_text(config)
    return target


# The OpenVINO int8 file of an export (export.demo_models builds it for the demo classifier).
OPENVINO_FILE = next(v.file for v in VARIANTS if v.kind == "openvino-int8")
# The variants of failing_nsfw_repository and the status each answers with.
FAILING_NSFW = {"slow": "timeout", "broken": "error",
                "slow_openvino": "timeout", "broken_openvino": "error"}


def failing_nsfw_repository(repository: Path) -> Path:
    """The real repository plus NSFW classifiers that fail safe: `nsfw_slow` (a budget nothing
    meets: status timeout) and `nsfw_broken` (an ONNX file that cannot load: status error), the
    same two with OpenVINO serving (`nsfw_slow_openvino`, `nsfw_broken_openvino`), each also
    behind its own `txt2img_nsfw_<variant>` ensemble."""
    for model in ("diffusion", "upscaler", "nsfw", "txt2img", "txt2img_nsfw"):
        shutil.copytree(DEFAULT_REPOSITORY / model, repository / model)
    budget = '"budget_ms"\n    value: { string_value: "5000" }'
    slow = {budget: budget.replace("5000", "0.001")}
    repository_variant(repository, "nsfw", "nsfw_slow", slow)
    broken = repository_variant(repository, "nsfw", "nsfw_broken")
    served = json.loads((broken / "1" / "nsfw.json").read_text())["serve"]
    (broken / "1" / served).write_bytes(b"this is not an ONNX protobuf" * 10)
    openvino = {'string_value: "auto"': f'string_value: "{OPENVINO_FILE}"'}
    repository_variant(repository, "nsfw", "nsfw_slow_openvino", {**slow, **openvino})
    broken = repository_variant(repository, "nsfw", "nsfw_broken_openvino", openvino)
    (broken / "1" / OPENVINO_FILE).write_bytes(b"<net>not an OpenVINO model</net>")
    for variant in FAILING_NSFW:
        repository_variant(
            repository,
            "txt2img_nsfw",
            f"txt2img_nsfw_{variant}",
            {'model_name: "nsfw"': f'model_name: "nsfw_{variant}"'},
        )
    return repository
