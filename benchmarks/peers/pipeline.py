"""What every peer serves, the same way: the pipeline our diffusion model loads, one denoising
pass for requests of one shape (one CPU generator per image, as ours), and each image answered
as our gateway answers `response_format: b64_json`: a JPEG at the gateway's quality, base64 in
JSON, with the MD5 of its bytes.

Runs in the peers' virtualenv (benchmarks/peers/env.py); the driver passes the pipeline's folder
and the JPEG quality in PEERS_PIPELINE and PEERS_JPEG_QUALITY, and the batching our diffusion
model has (its max_batch_size and max_queue_delay) in PEERS_MAX_BATCH_SIZE and
PEERS_BATCH_TIMEOUT_S.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any

PIPELINE_ENV = "PEERS_PIPELINE"
QUALITY_ENV = "PEERS_JPEG_QUALITY"
MAX_BATCH_SIZE_ENV = "PEERS_MAX_BATCH_SIZE"
BATCH_TIMEOUT_ENV = "PEERS_BATCH_TIMEOUT_S"
# The diffusion model's default_guidance_scale (model_repository/diffusion/config.pbtxt), which
# the gateway's requests get when they give none, as the driver's do.
GUIDANCE = 7.5


def max_batch_size() -> int:
    return int(os.environ.get(MAX_BATCH_SIZE_ENV, "8"))


def batch_timeout_s() -> float:
    return float(os.environ.get(BATCH_TIMEOUT_ENV, "0.005"))


def load() -> Any:
    import torch
    from diffusers import AutoPipelineForText2Image

    if os.environ.get("OMP_NUM_THREADS"):  # the driver's --torch-threads, whatever else set it
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    pipe = AutoPipelineForText2Image.from_pretrained(
        os.environ[PIPELINE_ENV], torch_dtype=torch.float32, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    print(f"peer pipeline: {type(pipe).__name__} from {os.environ[PIPELINE_ENV]}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    return pipe


def images(pipe: Any, requests: Sequence[dict[str, Any]]) -> list[Any]:
    """One PIL image per request, in order; a pass per shape."""
    import torch

    out: list[Any] = [None] * len(requests)
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for index, request in enumerate(requests):
        key = (int(request["width"]), int(request["height"]), int(request["num_inference_steps"]))
        shapes.setdefault(key, []).append(index)
    for (width, height, steps), indices in shapes.items():
        with torch.inference_mode():
            result = pipe(
                prompt=[str(requests[i]["prompt"]) for i in indices],
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE,
                generator=[torch.Generator("cpu").manual_seed(int(requests[i]["seed"]))
                           for i in indices],
            )
        for index, image in zip(indices, result.images):
            out[index] = image
    return out


def answer(image: Any) -> dict[str, str]:
    """The JPEG of one image, base64, and its MD5: the fields our b64_json answer has."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(os.environ.get(QUALITY_ENV, "90")))
    data = buffer.getvalue()
    return {
        "b64_json": base64.b64encode(data).decode("ascii"),
        "image_hash": hashlib.md5(data, usedforsecurity=False).hexdigest(),
    }
