"""Building Triton gRPC inputs, reading Triton's own counters and holding the diffusion model,
for the model tests (and the gateway tests that need Triton busy)."""

from __future__ import annotations

import json
import queue
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

import imagegen_contract
from embedded.triton import DEFAULT_REPOSITORY, TritonServer
from export.nsfw import VARIANTS
from gateway.triton import contract

T = TypeVar("T")

DIFFUSION = contract.Model.DIFFUSION.value
# The largest difference a seed's image may show between running alone and sharing a pass:
# batched matrix products round differently (1/255 measured; docs/models.md, "Batching").
BATCH_PIXEL_TOLERANCE = 2
# The diffusion model's test hook (imagegen_contract.TEST_HOLD): the suite's Triton has it on.
HOLD_ENV = imagegen_contract.TEST_HOLD_ENV
HOLD = imagegen_contract.TEST_HOLD
# A held generation's own timeout: a test that never releases its hold frees the model after it.
HOLD_LIMIT_MS = 600_000


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


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 120) -> None:
    """Polls `condition` until it holds. `timeout_s` only stops a test that would hang: nothing
    waited for here depends on the machine's speed to come."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def settled(
    read: Callable[[], T], quiet_s: float = 0.5, ready: Callable[[T], bool] = lambda _: True
) -> T:
    """What `read` returns once `ready` holds for it and it has then stopped changing for
    `quiet_s`.

    Triton records statistics after it sends the response, however late a busy machine makes
    that: `ready` says what must have been recorded already (an execution the caller has seen
    answered), the quiet time catches what may still follow (the session's server is shared).
    """
    wait_until(lambda: ready(read()), "the statistics recorded what was answered")
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        latest = read()
        if latest != value:
            value, since = latest, time.monotonic()
    return value


def executions(
    client: grpcclient.InferenceServerClient, model: str, quiet_s: float = 0.5, at_least: int = 0
) -> int:
    """A model's execution count once it is `at_least` and has stopped moving for `quiet_s`."""

    def read() -> int:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0))

    return settled(read, quiet_s, lambda count: count >= at_least)


def diffusion_steps(triton: TritonServer) -> float:
    return metric(triton.metrics_url, "imagegen_diffusion_steps_total")


def diffusion_interrupted(triton: TritonServer, reason: str) -> float:
    return metric(triton.metrics_url, "imagegen_diffusion_interrupted_total", reason=reason)


def diffusion_pending(triton: TritonServer) -> float:
    return metric(triton.metrics_url, "nv_inference_pending_request_count", model=DIFFUSION)


@contextmanager
def diffusion_held(triton: TritonServer) -> Iterator[None]:
    """The single diffusion instance kept busy by a held generation (HOLD) for the duration of
    the block, however fast the machine; cancelled at its end. Returns once the model has
    stopped it: what was queued meanwhile then leaves the queue together, as one batch."""
    steps, cancelled = diffusion_steps(triton), diffusion_interrupted(triton, "cancelled")
    done: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        hold = client.async_infer(
            DIFFUSION,
            tensors(**generation(steps=2, seed=1, scale=None)),
            callback=lambda result, error: done.put(error),
            parameters={HOLD: True, contract.TIMEOUT_MS: HOLD_LIMIT_MS},
        )
        try:
            wait_until(lambda: diffusion_steps(triton) > steps or not done.empty(),
                       "the held generation ran its first step")
            assert done.empty(), f"the held generation ended unreleased: {done.get()}"
            yield
            assert done.empty(), f"the held generation ended unreleased: {done.get()}"
        finally:
            hold.cancel()
    wait_until(lambda: diffusion_interrupted(triton, "cancelled") > cancelled,
               "the model stopped the held generation")


def diffusion_idle(triton: TritonServer) -> None:
    """Returns once whatever diffusion had queued or running is done: a one-step generation sent
    now runs after it (one instance; a batch runs its passes in arrival order)."""
    wait_until(lambda: diffusion_pending(triton) == 0, "nothing waits in the diffusion queue")
    with grpcclient.InferenceServerClient(triton.grpc_url) as client:
        client.infer(DIFFUSION, tensors(**generation(steps=1, seed=2, scale=None)))


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
FAILING_NSFW = {"slow": "timeout", "broken": "error", "held": "timeout",
                "slow_openvino": "timeout", "broken_openvino": "error"}
HELD_CLASSIFIER = "held.onnx"
# The spec: an NSFW check that takes longer scores 1.0 (the classifier's budget_ms).
NSFW_BUDGET_MS = 5000


def held_classifier() -> bytes:
    """An ONNX classifier (the exported one's input and output) that runs until it is stopped:
    a loop of about 1e15 turns for any image, of none for all-zero pixels (the model's warm-up
    at load), so only the runtime's deadline ends a real request."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["go"], ["go_on"]),
         helper.make_node("Add", ["turns", "one"], ["turns_after"])],
        "turn",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("go", TensorProto.BOOL, []),
         helper.make_tensor_value_info("turns", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("go_on", TensorProto.BOOL, []),
         helper.make_tensor_value_info("turns_after", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    nodes = [
        helper.make_node("Abs", ["pixel_values"], ["magnitudes"]),
        helper.make_node("ReduceMax", ["magnitudes"], ["peak"], keepdims=0),
        helper.make_node("Mul", ["peak", "many"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["trip_count"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trip_count", "true", "zero"], ["turned"], body=body),
        helper.make_node("ReduceMean", ["pixel_values"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "weights"], ["scores"]),
        helper.make_node("Mul", ["turned", "zero"], ["nothing"]),
        helper.make_node("Add", ["scores", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "held",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor("many", TensorProto.FLOAT, [], [1e15]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("weights", TensorProto.FLOAT, [3, 2], [1, -1, 0.5, 0.5, -1, 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def failing_nsfw_repository(repository: Path) -> Path:
    """The real repository plus NSFW classifiers that fail safe: `nsfw_slow` (a budget nothing
    meets: status timeout), `nsfw_broken` (an ONNX file that cannot load: status error) and
    `nsfw_held` (the config's own budget, the spec's 5 s, and a classifier that runs until the
    budget stops it: status timeout), the first two also with OpenVINO serving
    (`nsfw_slow_openvino`, `nsfw_broken_openvino`), each behind its own `txt2img_nsfw_<variant>`
    ensemble."""
    for model in ("diffusion", "upscaler", "nsfw", "txt2img", "txt2img_nsfw"):
        shutil.copytree(DEFAULT_REPOSITORY / model, repository / model)
    budget = f'"budget_ms"\n    value: {{ string_value: "{NSFW_BUDGET_MS}" }}'
    slow = {budget: budget.replace(str(NSFW_BUDGET_MS), "0.001")}
    repository_variant(repository, "nsfw", "nsfw_slow", slow)
    broken = repository_variant(repository, "nsfw", "nsfw_broken")
    served = json.loads((broken / "1" / "nsfw.json").read_text())["serve"]
    (broken / "1" / served).write_bytes(b"this is not an ONNX protobuf" * 10)
    held = repository_variant(repository, "nsfw", "nsfw_held",
                              {'string_value: "auto"': f'string_value: "{HELD_CLASSIFIER}"'})
    (held / "1" / HELD_CLASSIFIER).write_bytes(held_classifier())
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
