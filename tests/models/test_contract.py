"""The tensor contract (gateway/triton/contract.py) against the models' own config.pbtxt files:
every name and datatype the clients send or read is what the models declare."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

from gateway.triton import contract
from tests.models.helpers import model_config

ENSEMBLES = (contract.Model.TXT2IMG, contract.Model.TXT2IMG_NSFW)


def config(model: contract.Model) -> model_config_pb2.ModelConfig:
    return model_config(model.value)


def declared(tensors: object) -> dict[str, str]:
    """Tensor name -> Triton datatype without its TYPE_ prefix (TYPE_STRING is BYTES)."""
    names = {}
    for tensor in tensors:  # type: ignore[attr-defined]
        kind = model_config_pb2.DataType.Name(tensor.data_type).removeprefix("TYPE_")
        names[tensor.name] = "BYTES" if kind == "STRING" else kind
    return names


@pytest.mark.parametrize("model", ENSEMBLES)
def test_ensemble_inputs_are_the_generation_inputs(model: contract.Model) -> None:
    sent = contract.Generation(prompt="p", width=64, height=64, steps=1).arrays()
    inputs = declared(config(model).input)
    assert set(inputs) == set(sent)
    for tensor in contract.tensors(sent):
        assert inputs[tensor.name()] == tensor.datatype(), tensor.name()


def test_diffusion_takes_the_generation_without_scale() -> None:
    sent = contract.Generation(prompt="p", width=64, height=64, steps=1).arrays(upscaler=False)
    diffusion = config(contract.Model.DIFFUSION)
    inputs = declared(diffusion.input)
    assert set(inputs) == set(sent)
    for tensor in contract.tensors(sent):
        assert inputs[tensor.name()] == tensor.datatype(), tensor.name()
    optional = {t.name for t in diffusion.input if t.optional}
    assert optional == {
        contract.NEGATIVE_PROMPT.name, contract.SEED.name, contract.GUIDANCE_SCALE.name
    }


@pytest.mark.parametrize("model", [*ENSEMBLES, contract.Model.CLASSIFIER])
def test_outputs_are_what_each_model_declares(model: contract.Model) -> None:
    outputs = declared(config(model).output)
    assert outputs == {t.name: t.datatype for t in contract.outputs(model)}


def test_classifier_input() -> None:
    (image,) = contract.classify_inputs(np.zeros((8, 8, 3), dtype=np.uint8))
    assert declared(config(contract.Model.CLASSIFIER).input) == {image.name(): image.datatype()}
    assert image.shape() == [1, 8, 8, 3]


def test_diffusion_parameters_name_the_limits() -> None:
    parameters = config(contract.Model.DIFFUSION).parameters
    for key in contract.DiffusionParameter:
        assert key.value in parameters, key
