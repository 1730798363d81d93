"""The whole repository loads on the embedded Triton and says what it serves."""

from __future__ import annotations

import tritonclient.grpc as grpcclient

from embedded.triton import TritonServer
from gateway.triton import contract
from tests.models.helpers import metric

MODELS = ["diffusion", "upscaler", "nsfw", "txt2img", "txt2img_nsfw"]


def test_every_model_and_ensemble_is_ready(triton: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_server_ready()
    # Asked model by model: the repository index answers only the drain supervisor's key
    # (embedded/drain.py).
    assert {name: client.is_model_ready(name) for name in MODELS} == {name: True for name in MODELS}


def test_models_report_their_weights_and_demo_status(triton: TritonServer) -> None:
    info = contract.MODEL_INFO
    assert metric(triton.metrics_url, info, model="diffusion", demo="true", status="ok") == 1
    assert metric(triton.metrics_url, info, model="nsfw", kind="onnx-fp32", demo="true") == 1
    assert metric(triton.metrics_url, info, model="upscaler", kind="lanczos", demo="false") == 1


def test_nsfw_batches_dynamically(triton: TritonServer) -> None:
    config = grpcclient.InferenceServerClient(triton.grpc_url).get_model_config("nsfw", as_json=True)
    assert config["config"]["max_batch_size"] == 8
    assert "dynamic_batching" in config["config"]
