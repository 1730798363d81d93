"""The tensor contract in one place: the models' half (imagegen_contract.py) against each
config.pbtxt, the gateway's half (gateway/triton/contract.py) against both, and no model
spelling a name of the contract as a string literal of its own."""

from __future__ import annotations

import ast
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2

import imagegen_contract
from embedded.triton import DEFAULT_REPOSITORY, TritonServer, TritonStartError
from gateway.triton import contract
from tests.models.helpers import model_config, model_limits, repository_variant

ENSEMBLES = (contract.Model.TXT2IMG, contract.Model.TXT2IMG_NSFW)
MODEL_SOURCES = sorted(DEFAULT_REPOSITORY.glob("*/1/*.py"))

# What a model must take from imagegen_contract rather than spell: the tensor names and every
# other name the gateway or the operators read (limit keys, the request parameter, the gauge,
# the demo marker). Status words and "ok" are common words, left to review.
CONTRACT_STRINGS = frozenset(
    {tensor.name for tensor in imagegen_contract.TENSORS}
    | {key.value for key in imagegen_contract.DiffusionParameter}
    | {
        imagegen_contract.DEFAULT_GUIDANCE_PARAMETER,
        imagegen_contract.TIMEOUT_MS,
        imagegen_contract.MODEL_INFO,
        imagegen_contract.DEMO_MARKER,
    }
)


def config(model: contract.Model) -> model_config_pb2.ModelConfig:
    return model_config(model.value)


def declared(tensors: object) -> dict[str, str]:
    """Tensor name -> Triton datatype without its TYPE_ prefix (TYPE_STRING is BYTES)."""
    names = {}
    for tensor in tensors:  # type: ignore[attr-defined]
        kind = model_config_pb2.DataType.Name(tensor.data_type).removeprefix("TYPE_")
        names[tensor.name] = "BYTES" if kind == "STRING" else kind
    return names


def spelled_contract_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string or bytes literal in `source` that is a name of the contract,
    f-string parts included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if text in CONTRACT_STRINGS:
                found.append((node.lineno, text))
    return sorted(found)


@pytest.mark.parametrize("model", list(contract.Model))
def test_every_declared_tensor_is_a_contract_tensor_of_its_datatype(model: contract.Model) -> None:
    shared = {tensor.name: tensor.datatype for tensor in imagegen_contract.TENSORS}
    declares = config(model)
    for name, datatype in {**declared(declares.input), **declared(declares.output)}.items():
        assert shared.get(name) == datatype, (model.value, name)


def test_every_contract_tensor_is_declared_by_a_model() -> None:
    used = set()
    for model in contract.Model:
        used |= set(declared(config(model).input)) | set(declared(config(model).output))
    assert {tensor.name for tensor in imagegen_contract.TENSORS} == used


def test_the_gateway_s_tensors_are_the_models() -> None:
    gateway = {
        name: value for name, value in vars(contract).items() if isinstance(value, contract.Tensor)
    }
    assert {(t.name, t.datatype) for t in gateway.values()} == set(imagegen_contract.TENSORS)
    assert all(name == tensor.name for name, tensor in gateway.items())


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


def test_the_diffusion_config_holds_every_limit() -> None:
    parameters = set(config(contract.Model.DIFFUSION).parameters)
    keys = {key.value for key in contract.DiffusionParameter}
    assert keys | {imagegen_contract.DEFAULT_GUIDANCE_PARAMETER} <= parameters
    limits = model_limits()  # as the gateway reads them from Triton
    assert None not in (
        limits.min_size, limits.max_size, limits.max_steps, limits.max_guidance_scale
    )


def test_a_missing_parameter_is_named() -> None:
    diffusion = {"name": "diffusion", "parameters": {"min_size": {"string_value": "64"}}}
    assert imagegen_contract.parameter(diffusion, contract.DiffusionParameter.MIN_SIZE) == "64"
    with pytest.raises(ValueError, match="diffusion: config.pbtxt has no parameter 'max_steps'"):
        imagegen_contract.parameter(diffusion, contract.DiffusionParameter.MAX_STEPS)


def test_the_model_info_gauge_takes_exactly_its_labels() -> None:
    set_to: list[float] = []

    class Metric:
        def __init__(self, labels: dict[str, str]) -> None:
            self.labels = labels

        def set(self, value: float) -> None:
            set_to.append(value)

    class MetricFamily:  # pb_utils.MetricFamily, as far as ModelInfo uses it
        GAUGE = "gauge"

        def __init__(self, name: str, description: str, kind: str) -> None:
            self.name, self.kind = name, kind
            self.Metric = Metric

    pb_utils = types.SimpleNamespace(MetricFamily=MetricFamily)
    labels = {"model": "m", "kind": "k", "source": "", "demo": "false", "status": "ok"}
    info = imagegen_contract.ModelInfo(pb_utils, **labels)
    assert (info.family.name, info.family.kind) == (contract.MODEL_INFO, MetricFamily.GAUGE)
    assert info.metric.labels == labels and set_to == [1]
    with pytest.raises(ValueError, match="takes the labels model, kind, source, demo, status"):
        imagegen_contract.ModelInfo(pb_utils, **{**labels, "extra": "x"})


def test_the_checker_finds_a_spelled_name() -> None:
    planted = textwrap.dedent("""\
        from imagegen_contract import PROMPT
        a = get(request, PROMPT.name)  # taken from the contract: fine
        b = "PROMPT must be UTF-8"  # prose that mentions a name: fine
        c = get(request, "PROMPT")
        d = Tensor(f"NSFW_SCORE", x)
        e = params[b"max_steps"]
    """)
    assert spelled_contract_strings(planted) == [(4, "PROMPT"), (5, "NSFW_SCORE"), (6, "max_steps")]


@pytest.mark.parametrize("path", MODEL_SOURCES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_no_model_spells_a_name_of_the_contract(path: Path) -> None:
    assert spelled_contract_strings(path.read_text()) == []


def test_the_check_sees_every_python_model() -> None:
    python_models = {
        path.parent.name for path in DEFAULT_REPOSITORY.glob("*/config.pbtxt")
        if model_config(path.parent.name).backend == "python"
    }
    checked = {path.parent.parent.name for path in MODEL_SOURCES if path.name == "model.py"}
    assert python_models and python_models == checked


def test_a_diffusion_config_without_a_limit_fails_to_load(tmp_path: Path) -> None:
    limit = '{ key: "max_steps" value: { string_value: "'
    text = (DEFAULT_REPOSITORY / "diffusion" / "config.pbtxt").read_text()
    [line] = [line for line in text.splitlines() if line.strip().startswith(limit)]
    repository = tmp_path / "repository"
    repository_variant(repository, "diffusion", "diffusion_unlimited", {line + "\n": ""})
    with pytest.raises(TritonStartError):
        TritonServer.on_free_ports(repository, tmp_path / "triton")
    log = (tmp_path / "triton" / "triton.log").read_text()
    assert "diffusion_unlimited: config.pbtxt has no parameter 'max_steps'" in log
