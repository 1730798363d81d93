"""Text-to-image with any diffusers pipeline.

Stops between denoising steps when the request is cancelled (gRPC deadline or cancel on a direct
call) or when its `timeout_ms` request parameter has elapsed: Triton 2.51 does not pass a
cancellation on to the first model of an ensemble, but it does pass request parameters.
"""

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

DEMO_MARKER = "imagegen_demo.json"


class InvalidInput(ValueError):
    pass


class Interrupted(Exception):
    def __init__(self, reason, steps_run, steps):
        super().__init__(f"generation {reason} after {steps_run} of {steps} steps")
        self.reason = reason


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from diffusers import AutoPipelineForText2Image

        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.min_size = int(params.get("min_size", "64"))
        self.max_size = int(params.get("max_size", "2048"))
        self.max_steps = int(params.get("max_steps", "100"))
        self.max_guidance = float(params.get("max_guidance_scale", "30"))
        self.default_guidance = float(params.get("default_guidance_scale", "7.5"))
        if int(params.get("torch_threads", "0")) > 0:
            torch.set_num_threads(int(params["torch_threads"]))

        source = os.environ.get("IMAGEGEN_DIFFUSION_MODEL") or params["model"]
        local = self._resolve(source, Path(args["model_repository"]))
        gpu = args["model_instance_kind"] == "GPU"
        self.device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        dtype = torch.float16 if gpu else torch.float32
        self.pipe = AutoPipelineForText2Image.from_pretrained(
            str(local), torch_dtype=dtype, local_files_only=True
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        demo = (local / DEMO_MARKER).exists()

        self.info_family = pb_utils.MetricFamily(
            name="imagegen_model_info",
            description="Which weights each imagegen model serves (demo=true: random weights)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.info = self.info_family.Metric(
            labels={
                "model": args["model_name"],
                "kind": type(self.pipe).__name__,
                "source": source,
                "demo": "true" if demo else "false",
                "status": "ok",
            }
        )
        self.info.set(1)
        self.steps_family = pb_utils.MetricFamily(
            name="imagegen_diffusion_steps_total",
            description="Denoising steps run",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.steps_counter = self.steps_family.Metric(labels={"model": args["model_name"]})
        self.interrupted_family = pb_utils.MetricFamily(
            name="imagegen_diffusion_interrupted_total",
            description="Generations stopped early, by reason (cancelled, timeout)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.interrupted = {
            reason: self.interrupted_family.Metric(labels={"model": args["model_name"], "reason": reason})
            for reason in ("cancelled", "timeout")
        }
        demo_note = " (DEMO: random weights, images are noise)" if demo else ""
        self.logger.log_info(
            f"diffusion: {type(self.pipe).__name__} from {source} on {self.device} "
            f"({str(dtype).replace('torch.', '')}){demo_note}"
        )

    @staticmethod
    def _resolve(source, model_dir):
        path = Path(source)
        if not path.is_absolute():
            path = (model_dir / path).resolve()
        if path.is_dir():
            return path
        from huggingface_hub import snapshot_download

        # Real weights come from the Hugging Face cache; nothing is ever downloaded at load time.
        return Path(snapshot_download(source, local_files_only=True))

    def check_inputs(self, request):
        def scalar(name, required=True):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if required:
                    raise InvalidInput(f"{name} is required")
                return None
            array = tensor.as_numpy()
            if array.size != 1:
                raise InvalidInput(f"{name} must hold one value, got shape {list(array.shape)}")
            return array.reshape(-1)[0]

        def text(name, required=True):
            value = scalar(name, required)
            if value is None:
                return None
            try:
                return value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                raise InvalidInput(f"{name} must be UTF-8") from None

        prompt = text("PROMPT")
        negative = text("NEGATIVE_PROMPT", required=False) or None
        width, height = int(scalar("WIDTH")), int(scalar("HEIGHT"))
        for name, size in (("WIDTH", width), ("HEIGHT", height)):
            if not self.min_size <= size <= self.max_size or size % 8:
                raise InvalidInput(
                    f"{name} must be a multiple of 8 in {self.min_size}..{self.max_size}, got {size}"
                )
        steps = int(scalar("STEPS"))
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(f"STEPS must be in 1..{self.max_steps}, got {steps}")
        seed = scalar("SEED", required=False)
        seed = -1 if seed is None else int(seed)
        if seed < -1:
            raise InvalidInput(f"SEED must be -1 (random) or a non-negative integer, got {seed}")
        if seed == -1:
            seed = random.SystemRandom().randrange(2**63)
        guidance = scalar("GUIDANCE_SCALE", required=False)
        guidance = -1.0 if guidance is None else float(guidance)
        if math.isnan(guidance) or guidance < 0:
            guidance = self.default_guidance
        if not guidance <= self.max_guidance:
            raise InvalidInput(f"GUIDANCE_SCALE must be at most {self.max_guidance}, got {guidance}")

        timeout_ms = json.loads(request.parameters() or "{}").get("timeout_ms")
        if timeout_ms is not None and (not isinstance(timeout_ms, int) or timeout_ms <= 0):
            raise InvalidInput(f"parameter timeout_ms must be a positive integer, got {timeout_ms!r}")
        return {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "timeout_s": None if timeout_ms is None else timeout_ms / 1000,
        }

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                image = self._generate(request, self.check_inputs(request))
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("IMAGE", image[None])]))
            except InvalidInput as exc:
                responses.append(self._error(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Interrupted as exc:
                self.interrupted[exc.reason].increment(1)
                self.logger.log_info(f"diffusion: {exc}")
                responses.append(self._error(str(exc), pb_utils.TritonError.CANCELLED))
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                self.logger.log_error(f"diffusion: {type(exc).__name__}: {exc}")
                responses.append(self._error(f"generation failed: {exc}", pb_utils.TritonError.INTERNAL))
        return responses

    def _generate(self, request, inputs):
        import torch

        started = time.monotonic()
        timeout_s = inputs.pop("timeout_s")
        steps = inputs["num_inference_steps"]
        ran = 0

        def stop_reason():
            if request.is_cancelled():
                return "cancelled"
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                return "timeout"
            return None

        def on_step_end(pipe, step, timestep, callback_kwargs):
            nonlocal ran
            ran = step + 1
            self.steps_counter.increment(1)
            reason = stop_reason()
            if reason and ran < steps:
                raise Interrupted(reason, ran, steps)
            return callback_kwargs

        reason = stop_reason()
        if reason:
            raise Interrupted(reason, 0, steps)
        # A CPU generator gives the same noise, hence the same image, for a seed on any device.
        generator = torch.Generator("cpu").manual_seed(inputs.pop("seed"))
        with torch.inference_mode():
            result = self.pipe(
                **inputs,
                generator=generator,
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        return (np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.pipe = None
