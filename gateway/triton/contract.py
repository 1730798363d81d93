"""The Triton tensor contract: model names, tensor names and datatypes, "not given" sentinels.

Everything that talks to the imagegen models (the gateway, the benchmarks, the tests) builds its
requests and reads its answers through this module. The names and values come from the models'
own half of the contract (imagegen_contract.py), which the models import too;
the models declare the same tensors in their `config.pbtxt`, and tests/models/test_contract.py
checks that the three agree.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

import imagegen_contract

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient


class Model(str, enum.Enum):
    DIFFUSION = "diffusion"
    UPSCALER = "upscaler"
    CLASSIFIER = "nsfw"
    # Ensembles: a fixed graph each, so the NSFW check on or off is a choice of ensemble.
    TXT2IMG = "txt2img"  # diffusion -> upscaler
    TXT2IMG_NSFW = "txt2img_nsfw"  # diffusion -> upscaler, and diffusion -> nsfw beside it


class Priority(enum.IntEnum):
    """The diffusion model's priority levels (its config.pbtxt `dynamic_batching`, one queue
    policy each): a pass takes every waiting INTERACTIVE request before any BATCH one. A call
    that names none is BATCH (`default_priority_level`). The ensembles hand the caller's
    priority to the model."""

    INTERACTIVE = 1  # a caller waiting on the answer (synchronous /generate)
    BATCH = 2  # work nobody waits on in person (jobs)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # Triton's name: BYTES, INT32, INT64, FP32, UINT8

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(triton_to_np_dtype(self.datatype))

    def input(self, value: object) -> grpcclient.InferInput:
        """An InferInput holding `value`, converted to this tensor's datatype."""
        import tritonclient.grpc as grpcclient  # gunicorn's master reads the model names only

        array = np.asarray(value, dtype=self.dtype)
        item = grpcclient.InferInput(self.name, list(array.shape), self.datatype)
        item.set_data_from_numpy(array)
        return item


PROMPT = Tensor(*imagegen_contract.PROMPT)  # UTF-8
NEGATIVE_PROMPT = Tensor(*imagegen_contract.NEGATIVE_PROMPT)
WIDTH = Tensor(*imagegen_contract.WIDTH)
HEIGHT = Tensor(*imagegen_contract.HEIGHT)
STEPS = Tensor(*imagegen_contract.STEPS)
SEED = Tensor(*imagegen_contract.SEED)
GUIDANCE_SCALE = Tensor(*imagegen_contract.GUIDANCE_SCALE)
SCALE = Tensor(*imagegen_contract.SCALE)  # the upscaler's factor: NO_UPSCALE or UPSCALE_FACTOR
IMAGE = Tensor(*imagegen_contract.IMAGE)  # [batch, height, width, 3] RGB
NSFW_SCORE = Tensor(*imagegen_contract.NSFW_SCORE)
NSFW_STATUS = Tensor(*imagegen_contract.NSFW_STATUS)

# "Not given" on the ensembles (they cannot have optional inputs); on `diffusion` alone the
# three inputs may also be left out.
NO_NEGATIVE_PROMPT = imagegen_contract.NO_NEGATIVE_PROMPT
RANDOM_SEED = imagegen_contract.RANDOM_SEED
MODEL_DEFAULT_GUIDANCE = imagegen_contract.MODEL_DEFAULT_GUIDANCE  # default_guidance_scale

# The request parameter that bounds a generation in the diffusion model (milliseconds).
TIMEOUT_MS = imagegen_contract.TIMEOUT_MS

NO_UPSCALE = imagegen_contract.NO_UPSCALE
UPSCALE_FACTOR = imagegen_contract.UPSCALE_FACTOR

NsfwStatus = imagegen_contract.NsfwStatus
FAIL_SAFE_SCORE = imagegen_contract.FAIL_SAFE_SCORE

DiffusionParameter = imagegen_contract.DiffusionParameter

# The gauge each model reports what it serves with, on Triton's /metrics.
MODEL_INFO = imagegen_contract.MODEL_INFO


@dataclass(frozen=True)
class Generation:
    """One text-to-image request in the models' terms; None means "not given"."""

    prompt: str
    width: int
    height: int
    steps: int
    negative_prompt: str = NO_NEGATIVE_PROMPT
    seed: int | None = None
    guidance_scale: float | None = None
    scale: int = NO_UPSCALE

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """The IMAGE an ensemble returns for this request (batch of one)."""
        return (1, self.height * self.scale, self.width * self.scale, 3)

    def arrays(self, *, upscaler: bool = True) -> dict[str, np.ndarray]:
        """Tensor name -> a [1, 1] array, sentinels filled in; `upscaler=False` for `diffusion`
        alone, which takes no SCALE."""
        values: dict[Tensor, object] = {
            PROMPT: self.prompt.encode("utf-8"),
            NEGATIVE_PROMPT: self.negative_prompt.encode("utf-8"),
            WIDTH: self.width,
            HEIGHT: self.height,
            STEPS: self.steps,
            SEED: RANDOM_SEED if self.seed is None else self.seed,
            GUIDANCE_SCALE: (
                MODEL_DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale
            ),
        }
        if upscaler:
            values[SCALE] = self.scale
        return {t.name: np.array([[v]], dtype=t.dtype) for t, v in values.items()}

    def inputs(self, *, upscaler: bool = True) -> list[grpcclient.InferInput]:
        return tensors(self.arrays(upscaler=upscaler))


def tensors(arrays: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Name -> array pairs as InferInputs, each keeping its array's shape and datatype."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in arrays.items():
        array = np.asarray(value)
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def outputs(model: Model) -> tuple[Tensor, ...]:
    """What each model answers with."""
    if model is Model.CLASSIFIER:
        return (NSFW_SCORE, NSFW_STATUS)
    if model is Model.TXT2IMG_NSFW:
        return (IMAGE, NSFW_SCORE, NSFW_STATUS)
    return (IMAGE,)


def classify_inputs(pixels: np.ndarray) -> list[grpcclient.InferInput]:
    """The classifier's input for one (H, W, 3) uint8 RGB image."""
    return [IMAGE.input(np.ascontiguousarray(pixels)[None])]


@dataclass(frozen=True)
class NsfwReading:
    score: float
    status: NsfwStatus

    def flagged(self, threshold: float) -> bool:
        """The spec's `nsfw` true/false: at or above the threshold, or no real score (fail-safe)."""
        return self.status is not NsfwStatus.OK or self.score >= threshold


def read_nsfw(result: grpcclient.InferResult) -> NsfwReading:
    """The score, or the fail-safe 1.0 when the classifier timed out, failed or said nothing."""
    scores = result.as_numpy(NSFW_SCORE.name)
    statuses = result.as_numpy(NSFW_STATUS.name)
    status = NsfwStatus.ERROR
    if statuses is not None and statuses.size:
        raw = statuses.reshape(-1)[0]
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        status = NsfwStatus(text) if text in NsfwStatus._value2member_map_ else NsfwStatus.ERROR
    score: float | None = None
    if scores is not None and scores.size:
        score = float(scores.reshape(-1)[0])
    if status is not NsfwStatus.OK:
        return NsfwReading(FAIL_SAFE_SCORE, status)
    if score is None or not 0.0 <= score <= 1.0:
        return NsfwReading(FAIL_SAFE_SCORE, NsfwStatus.ERROR)
    return NsfwReading(score, status)


@dataclass(frozen=True)
class ModelLimits:
    """The limits a generation model declares in its config.pbtxt `parameters` (keys from
    `DiffusionParameter`); None where it declares none."""

    min_size: int | None = None
    max_size: int | None = None
    max_steps: int | None = None
    max_guidance_scale: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelLimits:
        """From a model config as Triton serves it (`get_model_config(as_json=True)["config"]`);
        raises ValueError on a value that is not a number."""
        raw = {
            key: value.get("string_value", "")
            for key, value in config.get("parameters", {}).items()
        }

        def number(key: DiffusionParameter, kind: type[int | float]) -> Any:
            text = raw.get(key.value, "").strip()
            if not text:
                return None
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"parameter {key.value}={text!r} is not a number") from None

        return cls(
            min_size=number(DiffusionParameter.MIN_SIZE, int),
            max_size=number(DiffusionParameter.MAX_SIZE, int),
            max_steps=number(DiffusionParameter.MAX_STEPS, int),
            max_guidance_scale=number(DiffusionParameter.MAX_GUIDANCE_SCALE, float),
        )

    def tighter(self, other: ModelLimits) -> ModelLimits:
        """What both models accept (two ensembles may run different generation models)."""

        def pick(a: Any, b: Any, choose: Any) -> Any:
            return a if b is None else b if a is None else choose(a, b)

        return ModelLimits(
            min_size=pick(self.min_size, other.min_size, max),
            max_size=pick(self.max_size, other.max_size, min),
            max_steps=pick(self.max_steps, other.max_steps, min),
            max_guidance_scale=pick(self.max_guidance_scale, other.max_guidance_scale, min),
        )


def upscaler_model(ensemble_config: Mapping[str, Any]) -> str | None:
    """The model an ensemble hands the SCALE to (its upscaler step), from its config."""
    for step in ensemble_config.get("ensemble_scheduling", {}).get("step", []):
        if SCALE.name in step.get("input_map", {}):
            return str(step["model_name"])
    return None


def generation_model(ensemble_config: Mapping[str, Any]) -> str | None:
    """The model an ensemble hands the PROMPT to (its diffusion step), from its config."""
    for step in ensemble_config.get("ensemble_scheduling", {}).get("step", []):
        if PROMPT.name in step.get("input_map", {}):
            return str(step["model_name"])
    return None
