"""The models' half of the tensor contract: the names and values the three Python-backend models
and their callers (gateway/triton/contract.py, and through it the benchmarks and the tests) share.

Each config.pbtxt declares the same tensors; tests/models/test_contract.py checks that the two
agree, and that no model spells a name of this module as a string literal of its own.

Standard library only, and importable on Python 3.10 (the Triton image's). The models import it
from the Python environment the backend stub runs in, so it is installed there: by the project's
editable install here (pyproject.toml), and copied into the Triton and gateway images. It lies
beside model_repository/, not in it: Triton takes every folder of the repository for a model, and
importing a module from there would leave a `__pycache__` folder that stops Triton's start.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple


class TensorSpec(NamedTuple):
    name: str
    datatype: str  # Triton's name: BYTES, INT32, INT64, FP32, UINT8


PROMPT = TensorSpec("PROMPT", "BYTES")  # UTF-8
NEGATIVE_PROMPT = TensorSpec("NEGATIVE_PROMPT", "BYTES")
WIDTH = TensorSpec("WIDTH", "INT32")
HEIGHT = TensorSpec("HEIGHT", "INT32")
STEPS = TensorSpec("STEPS", "INT32")
SEED = TensorSpec("SEED", "INT64")
GUIDANCE_SCALE = TensorSpec("GUIDANCE_SCALE", "FP32")
SCALE = TensorSpec("SCALE", "INT32")  # the upscaler's factor, one of SCALES
IMAGE = TensorSpec("IMAGE", "UINT8")  # [batch, height, width, 3] RGB
NSFW_SCORE = TensorSpec("NSFW_SCORE", "FP32")
NSFW_STATUS = TensorSpec("NSFW_STATUS", "BYTES")

TENSORS = (
    PROMPT, NEGATIVE_PROMPT, WIDTH, HEIGHT, STEPS, SEED, GUIDANCE_SCALE, SCALE, IMAGE,
    NSFW_SCORE, NSFW_STATUS,
)

# Ensembles cannot have optional inputs, so these values stand for "not given" there; on
# `diffusion` alone the three inputs may also be left out.
NO_NEGATIVE_PROMPT = ""
RANDOM_SEED = -1
MODEL_DEFAULT_GUIDANCE = -1.0  # any negative value: the model's default_guidance_scale

# A request parameter the diffusion model reads (milliseconds, a positive integer): Triton 2.51
# does not pass a gRPC deadline on to the first model of an ensemble, but it passes request
# parameters.
TIMEOUT_MS = "timeout_ms"

# The diffusion model's test hook: on a Triton started with TEST_HOLD_ENV=1 (the test suite's,
# never a deployment's), a request whose parameter TEST_HOLD is true keeps its pass at the end of
# a step until it is cancelled or its timeout_ms has passed, so that tests hold the model with
# something they release instead of racing it.
TEST_HOLD_ENV = "IMAGEGEN_DIFFUSION_TEST_HOLD"
TEST_HOLD = "hold"

NO_UPSCALE = 1  # SCALE 1: the upscaler passes the image through
UPSCALE_FACTOR = 2
SCALES = (NO_UPSCALE, UPSCALE_FACTOR)


class NsfwStatus(str, enum.Enum):
    """What the classifier said of its own run (NSFW_STATUS); anything but OK scores 1.0."""

    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"


# The spec's fail-safe: the score of an image the classifier could not judge.
FAIL_SAFE_SCORE = 1.0


class DiffusionParameter(str, enum.Enum):
    """The diffusion model's limits, as `parameters` keys of its config.pbtxt (the only place
    that holds their values: the gateway reads them from Triton)."""

    MIN_SIZE = "min_size"
    MAX_SIZE = "max_size"
    MAX_STEPS = "max_steps"
    MAX_GUIDANCE_SCALE = "max_guidance_scale"


# The guidance a negative GUIDANCE_SCALE (MODEL_DEFAULT_GUIDANCE) stands for, also a key of the
# diffusion model's config.pbtxt `parameters`.
DEFAULT_GUIDANCE_PARAMETER = "default_guidance_scale"

# A file in a folder of weights that `make models` (export/demo_models.py) built with random
# weights; the models report `demo="true"` for it.
DEMO_MARKER = "imagegen_demo.json"

# The gauge each model sets to 1 at load, saying what it serves (the gateway's readiness reads
# it from Triton's /metrics; the Prometheus rules alert on it).
MODEL_INFO = "imagegen_model_info"
MODEL_INFO_HELP = "Which weights each imagegen model serves (demo=true: random weights)"
MODEL_INFO_LABELS = ("model", "kind", "source", "demo", "status")


class ModelStatus(str, enum.Enum):
    """The `status` label of MODEL_INFO: ERROR for a model that serves its fail-safe only."""

    OK = "ok"
    ERROR = "error"


def demo_label(demo: bool | None) -> str:
    """The `demo` label of MODEL_INFO; None when the model cannot tell."""
    return "unknown" if demo is None else "true" if demo else "false"


class ModelInfo:
    """A model's MODEL_INFO sample, declared through Triton's custom-metrics API and set to 1.

    `pb_utils` is triton_python_backend_utils, passed in so that this module imports only the
    standard library. The model keeps the object: Triton drops a family nobody holds."""

    def __init__(self, pb_utils: Any, **labels: str) -> None:
        if set(labels) != set(MODEL_INFO_LABELS):
            wanted, given = ", ".join(MODEL_INFO_LABELS), ", ".join(sorted(labels))
            raise ValueError(f"{MODEL_INFO} takes the labels {wanted}, not {given}")
        self.family = pb_utils.MetricFamily(
            name=MODEL_INFO, description=MODEL_INFO_HELP, kind=pb_utils.MetricFamily.GAUGE
        )
        self.metric = self.family.Metric(labels=labels)
        self.metric.set(1)


def parameter(model_config: Mapping[str, Any], key: str | enum.Enum) -> str:
    """A `parameters` value of a model's config (`args["model_config"]`, parsed). A model whose
    config lacks it fails to load saying which, rather than run on a value no config shows."""
    # An enum member hashes by its name, so it would not find its value among the keys.
    name = key.value if isinstance(key, enum.Enum) else key
    try:
        return str(model_config["parameters"][name]["string_value"])
    except KeyError:
        model = model_config.get("name", "the model")
        raise ValueError(f"{model}: config.pbtxt has no parameter {name!r}") from None
