"""Limits from one source: the gateway reads the generation model's limits from Triton and
validates with the tighter of its setting and the model's (docs/security.md, "Limits from the model")."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import Settings
from gateway.limits import GenerationLimits, LimitsSource
from gateway.triton.contract import ModelLimits
from tests.models.helpers import executions, model_limits

BODY = {"prompt": "p", "width": 64, "height": 64, "upscale": False, "response_format": "b64_json",
        "enable_nsfw_check": False}


def steps_schema(document: dict[str, Any]) -> dict[str, Any]:
    props = document["components"]["schemas"]["GenerateRequest"]["properties"]
    return next(v for v in props["num_inference_steps"]["anyOf"] if v.get("type") == "integer")


def test_a_larger_gateway_limit_gives_way_to_the_models(
    make_app: Any, triton_settings: Settings, triton: Any
) -> None:
    import tritonclient.grpc as grpcclient

    model = model_limits()  # the diffusion model's config.pbtxt, the only place they are written
    app = make_app(triton_settings.replace(max_steps=500, max_guidance_scale=100.0))
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json
    limits = ready.json["limits"]
    assert (limits["max_steps"], limits["max_guidance_scale"]) == (
        model.max_steps, model.max_guidance_scale
    )
    assert (
        f"GATEWAY_MAX_STEPS is 500, the model's max_steps is {model.max_steps}" in limits["adopted"]
    )
    assert steps_schema(client.get("/openapi.json").json)["maximum"] == model.max_steps

    triton_client = grpcclient.InferenceServerClient(triton.grpc_url)
    before = executions(triton_client, "diffusion")
    refused = client.post("/generate", json={**BODY, "num_inference_steps": model.max_steps + 1})
    assert refused.status_code == 400
    assert refused.json["error"]["field"] == "num_inference_steps"
    # Not "the model refused": the gateway's own message, with the model's limit.
    assert f"between 1 and {model.max_steps}" in refused.json["error"]["message"]
    too_much = model.max_guidance_scale + 1
    refused = client.post("/generate", json={**BODY, "guidance_scale": too_much})
    assert refused.json["error"]["field"] == "guidance_scale"
    assert executions(triton_client, "diffusion") == before  # nothing reached the model


def test_a_stricter_gateway_limit_stays(make_app: Any, triton_settings: Settings) -> None:
    client = make_app(triton_settings.replace(max_steps=20)).test_client()
    assert client.get("/readyz").json["limits"]["max_steps"] == 20
    assert client.get("/readyz").json["limits"]["adopted"] == []
    response = client.post("/generate", json={**BODY, "num_inference_steps": 21})
    assert response.status_code == 400 and "between 1 and 20" in response.json["error"]["message"]
    assert steps_schema(client.get("/openapi.json").json)["maximum"] == 20


def test_limits_no_request_could_pass_are_not_ready(
    make_app: Any, triton_settings: Settings
) -> None:
    # The gateway's smallest size is larger than the largest the model takes (2048).
    settings = triton_settings.replace(min_size=2056, max_size=4096, max_pixels=2056 * 2056)
    response = make_app(settings).test_client().get("/readyz")
    assert response.status_code == 503
    assert any("smallest size allowed (2056) is above the largest (2048)" in p
               for p in response.json["problems"])


def test_the_model_limits_read_from_triton(triton_settings: Settings, make_app: Any) -> None:
    services = make_app(triton_settings).extensions["gateway"]
    assert services.triton.model_limits() == ModelLimits(64, 2048, 100, 30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_limits_are_read_again_on_schedule_and_kept_while_triton_cannot_answer() -> None:
    answers: list[ModelLimits | Exception] = [
        ModelLimits(max_steps=50), RuntimeError("down"), ModelLimits(max_steps=40)
    ]
    reads: list[int] = []

    def read() -> ModelLimits:
        reads.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    source = LimitsSource(Settings(), read, refresh_s=30, retry_s=5, clock=clock)
    assert source.current().max_steps == 50 and len(reads) == 1
    clock.now = 29
    assert source.current().max_steps == 50 and len(reads) == 1  # not due yet
    clock.now = 30
    assert source.current().max_steps == 50 and len(reads) == 2  # Triton down: the last ones
    assert source.problem is not None and "down" in source.problem
    clock.now = 34
    assert source.current().max_steps == 50 and len(reads) == 2  # retried after retry_s
    clock.now = 35
    assert source.current().max_steps == 40 and source.problem is None


def test_the_tighter_of_each_limit_with_a_note_naming_both_values() -> None:
    own = GenerationLimits.from_settings(Settings(max_steps=500, min_size=64))
    limits = own.within(ModelLimits(min_size=128, max_size=4096, max_steps=100))
    assert (limits.min_size, limits.max_size, limits.max_steps) == (128, 2048, 100)
    assert limits.adopted == (
        "GATEWAY_MIN_SIZE is 64, the model's min_size is 128",
        "GATEWAY_MAX_STEPS is 500, the model's max_steps is 100",
    )
    assert own.within(ModelLimits()) == own  # a model that declares nothing changes nothing


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"max_steps": {"string_value": "40"}}, ModelLimits(max_steps=40)),
        ({"max_guidance_scale": {"string_value": "12.5"}}, ModelLimits(max_guidance_scale=12.5)),
        ({"model": {"string_value": "x"}}, ModelLimits()),
    ],
)
def test_model_limits_from_a_config(parameters: dict[str, Any], expected: ModelLimits) -> None:
    assert ModelLimits.from_config({"parameters": parameters}) == expected


def test_a_model_limit_that_is_not_a_number_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        ModelLimits.from_config({"parameters": {"max_steps": {"string_value": "many"}}})
