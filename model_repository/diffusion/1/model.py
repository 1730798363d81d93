"""Text-to-image with any diffusers pipeline, batched.

Triton's dynamic batcher hands `execute` several requests at once; those that can share a
denoising pass (same size, steps, guidance) run as one pipeline call with a prompt, negative
prompt and generator per image, the others in further calls one after the other.

Each request stops between denoising steps when it is cancelled (gRPC deadline or cancel on a
direct call) or when its `timeout_ms` request parameter has elapsed: Triton 2.51 does not pass a
cancellation on to the first model of an ensemble, but it does pass request parameters. A
stopped request is answered at once; its image stays in the pass (a batch cannot shrink
mid-loop) until every request of the pass has stopped, and then the pass stops.
"""

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from imagegen_contract import (
    DEFAULT_GUIDANCE_PARAMETER,
    DEMO_MARKER,
    GUIDANCE_SCALE,
    HEIGHT,
    IMAGE,
    MODEL_DEFAULT_GUIDANCE,
    NEGATIVE_PROMPT,
    NO_NEGATIVE_PROMPT,
    PROMPT,
    RANDOM_SEED,
    SEED,
    STEPS,
    TEST_HOLD,
    TEST_HOLD_ENV,
    TIMEOUT_MS,
    WIDTH,
    DiffusionParameter,
    ModelInfo,
    ModelStatus,
    demo_label,
    parameter,
)


class InvalidInput(ValueError):
    pass


class PassStopped(Exception):
    """Every request of a pass was cancelled or timed out: the pass ends early."""


class Job:
    """One request of a batch: its checked inputs and its one answer."""

    def __init__(self, request, arrived):
        self.request = request
        self.sender = request.get_response_sender()
        self.arrived = arrived
        self.inputs = None
        self.answered = False

    def stop_reason(self):
        if self.request.is_cancelled():
            return "cancelled"
        timeout_s = self.inputs["timeout_s"]
        # Counted from when the batch reached the model, so waiting for another pass counts too.
        if timeout_s is not None and time.monotonic() - self.arrived > timeout_s:
            return "timeout"
        return None

    def answer(self, response):
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.answered = True


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # The limits are config.pbtxt's alone (the gateway reads them there too): a config
        # without one fails the load here, before the pipeline is read.
        self.min_size = int(parameter(config, DiffusionParameter.MIN_SIZE))
        self.max_size = int(parameter(config, DiffusionParameter.MAX_SIZE))
        self.max_steps = int(parameter(config, DiffusionParameter.MAX_STEPS))
        self.max_guidance = float(parameter(config, DiffusionParameter.MAX_GUIDANCE_SCALE))
        self.default_guidance = float(parameter(config, DEFAULT_GUIDANCE_PARAMETER))

        import torch
        from diffusers import AutoPipelineForText2Image

        # Largest width x height x images of one pipeline call (0: no bound): a larger group of
        # requests runs as several passes, so a batch of big images cannot exhaust the memory.
        self.max_batch_pixels = int(params.get("max_batch_pixels", "0"))
        # A test hook (see _hold), off unless Triton starts with this variable set to 1.
        self.holds = os.environ.get(TEST_HOLD_ENV) == "1"
        if int(params.get("torch_threads", "0")) > 0:
            torch.set_num_threads(int(params["torch_threads"]))

        source = os.environ.get("IMAGEGEN_DIFFUSION_MODEL") or params["model"]
        source, local = self._resolve(source, Path(args["model_repository"]))
        gpu = args["model_instance_kind"] == "GPU"
        self.device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        dtype = torch.float16 if gpu else torch.float32
        self.pipe = AutoPipelineForText2Image.from_pretrained(
            str(local), torch_dtype=dtype, local_files_only=True
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and hasattr(vae, "enable_slicing"):
            # Decodes a batch one image at a time: the same work, without a batch-sized peak of
            # memory, and each image decoded exactly as it would be alone.
            vae.enable_slicing()
        # SDXL-family pipelines encode an absent negative prompt as zeros, unlike "": requests
        # with and without one then cannot share a pass.
        self.empty_negative_is_zeros = bool(
            getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
        )
        demo = (local / DEMO_MARKER).exists()

        self.info = ModelInfo(
            pb_utils,
            model=args["model_name"],
            kind=type(self.pipe).__name__,
            source=source,
            demo=demo_label(demo),
            status=ModelStatus.OK.value,
        )
        self.steps_family = pb_utils.MetricFamily(
            name="imagegen_diffusion_steps_total",
            description="Denoising steps run, per image (a pass of n images adds n a step)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.steps_counter = self.steps_family.Metric(labels={"model": args["model_name"]})
        # Images per pass (images / passes) is the batch the accelerator really ran: Triton's own
        # inference/execution counts do not see a batch split by shape or by max_batch_pixels.
        self.passes_family = pb_utils.MetricFamily(
            name="imagegen_diffusion_passes_total",
            description="Pipeline calls (denoising passes) started",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.passes = self.passes_family.Metric(labels={"model": args["model_name"]})
        self.images_family = pb_utils.MetricFamily(
            name="imagegen_diffusion_images_total",
            description="Images the denoising passes started with",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.images = self.images_family.Metric(labels={"model": args["model_name"]})
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
        """(what to report, the folder to load): a folder is reported as its absolute path, a
        hub id as itself, as the nsfw model reports its own."""
        path = Path(source)
        if not path.is_absolute():
            path = (model_dir / path).resolve()
        if path.is_dir():
            return str(path), path
        from huggingface_hub import snapshot_download

        # Real weights come from the Hugging Face cache; nothing is ever downloaded at load time.
        return source, Path(snapshot_download(source, local_files_only=True))

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

        prompt = text(PROMPT.name)
        negative = text(NEGATIVE_PROMPT.name, required=False)
        if negative == NO_NEGATIVE_PROMPT:
            negative = None
        width, height = int(scalar(WIDTH.name)), int(scalar(HEIGHT.name))
        for name, size in ((WIDTH.name, width), (HEIGHT.name, height)):
            if not self.min_size <= size <= self.max_size or size % 8:
                raise InvalidInput(
                    f"{name} must be a multiple of 8 in {self.min_size}..{self.max_size}, got {size}"
                )
        steps = int(scalar(STEPS.name))
        if not 1 <= steps <= self.max_steps:
            raise InvalidInput(f"{STEPS.name} must be in 1..{self.max_steps}, got {steps}")
        seed = scalar(SEED.name, required=False)
        seed = RANDOM_SEED if seed is None else int(seed)
        if seed < RANDOM_SEED:
            raise InvalidInput(
                f"{SEED.name} must be {RANDOM_SEED} (random) or a non-negative integer, got {seed}"
            )
        if seed == RANDOM_SEED:
            seed = random.SystemRandom().randrange(2**63)
        guidance = scalar(GUIDANCE_SCALE.name, required=False)
        guidance = MODEL_DEFAULT_GUIDANCE if guidance is None else float(guidance)
        if math.isnan(guidance) or guidance < 0:  # MODEL_DEFAULT_GUIDANCE, or any negative value
            guidance = self.default_guidance
        if not guidance <= self.max_guidance:
            raise InvalidInput(
                f"{GUIDANCE_SCALE.name} must be at most {self.max_guidance}, got {guidance}"
            )

        timeout_ms = json.loads(request.parameters() or "{}").get(TIMEOUT_MS)
        if timeout_ms is not None and (not isinstance(timeout_ms, int) or timeout_ms <= 0):
            raise InvalidInput(
                f"parameter {TIMEOUT_MS} must be a positive integer, got {timeout_ms!r}"
            )
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
        # Every request is answered through its own response sender (Triton 24.06+ allows it in
        # the default mode, with nothing returned), so a request that fails its checks or is
        # cancelled gets its answer at once instead of waiting for the passes of the others.
        arrived = time.monotonic()
        jobs = []
        for request in requests:
            job = Job(request, arrived)
            try:
                job.inputs = self.check_inputs(request)
            except InvalidInput as exc:
                job.answer(self._error(str(exc), pb_utils.TritonError.INVALID_ARG))
                continue
            jobs.append(job)
        try:
            for group in self._passes(jobs):
                self._run(group)
        finally:
            for job in jobs:  # exactly one answer per request, whatever happened above
                if not job.answered:
                    job.answer(self._error("generation failed", pb_utils.TritonError.INTERNAL))

    def _passes(self, jobs):
        """Jobs that can share one pipeline call, in arrival order, within the pixel budget."""
        groups = {}
        for job in jobs:
            inputs = job.inputs
            key = (
                inputs["width"],
                inputs["height"],
                inputs["num_inference_steps"],
                inputs["guidance_scale"],
                self.empty_negative_is_zeros and inputs["negative_prompt"] is None,
            )
            groups.setdefault(key, []).append(job)
        for group in groups.values():
            pixels = group[0].inputs["width"] * group[0].inputs["height"]
            size = max(1, self.max_batch_pixels // pixels) if self.max_batch_pixels else len(group)
            for start in range(0, len(group), size):
                yield group[start : start + size]

    def _hold(self, live):
        """The test hook: a request with the parameter `hold` true keeps its pass at the end of
        this step until it is cancelled or its timeout_ms has passed; the check that follows
        stops it as any other. So a test keeps the instance busy, or a pass running past a
        deadline, for as long as it needs on a machine of any speed (a one-step request is
        never held: the last step has no check)."""
        if not self.holds:
            return
        held = [job for job in live
                if json.loads(job.request.parameters() or "{}").get(TEST_HOLD) is True]
        while any(not job.answered and job.stop_reason() is None for job in held):
            time.sleep(0.01)

    def _stop(self, job, ran, steps):
        """Answers the job CANCELLED when its caller cancelled or its timeout passed."""
        reason = job.stop_reason()
        if reason is None:
            return False
        self.interrupted[reason].increment(1)
        message = f"generation {reason} after {ran} of {steps} steps"
        self.logger.log_info(f"diffusion: {message}")
        job.answer(self._error(message, pb_utils.TritonError.CANCELLED))
        return True

    def _run(self, group):
        import torch

        first = group[0].inputs
        steps = first["num_inference_steps"]
        live = [job for job in group if not self._stop(job, 0, steps)]
        if not live:
            return

        def on_step_end(pipe, step, timestep, callback_kwargs):
            ran = step + 1
            # Every image of the pass was computed, answered ones included.
            self.steps_counter.increment(len(live))
            if ran < steps:
                self._hold(live)
                for job in live:
                    if not job.answered:
                        self._stop(job, ran, steps)
                if all(job.answered for job in live):
                    raise PassStopped()
            return callback_kwargs

        negatives = [job.inputs["negative_prompt"] for job in live]
        # Ensemble callers send "" for "none"; where the pipeline reads an absent negative prompt
        # as "" (not SDXL's zeros), the two are the same and may share a pass.
        negative = None if all(n is None for n in negatives) else [n or "" for n in negatives]
        # One CPU generator per image: an image's starting noise depends on its seed alone, on
        # any device and whatever else shares its pass.
        generators = [torch.Generator("cpu").manual_seed(job.inputs["seed"]) for job in live]
        self.passes.increment(1)
        self.images.increment(len(live))
        try:
            with torch.inference_mode():
                result = self.pipe(
                    prompt=[job.inputs["prompt"] for job in live],
                    negative_prompt=negative,
                    width=first["width"],
                    height=first["height"],
                    num_inference_steps=steps,
                    guidance_scale=first["guidance_scale"],
                    generator=generators,
                    output_type="np",
                    callback_on_step_end=on_step_end,
                )
        except PassStopped:
            return
        except Exception as exc:  # noqa: BLE001 - answered per request; other passes go on
            self.logger.log_error(f"diffusion: {type(exc).__name__}: {exc}")
            for job in live:
                if not job.answered:
                    job.answer(self._error(f"generation failed: {exc}", pb_utils.TritonError.INTERNAL))
            return
        for job, image in zip(live, result.images):
            if not job.answered:
                job.answer(pb_utils.InferenceResponse([pb_utils.Tensor(IMAGE.name, _uint8(image)[None])]))

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.pipe = None


def _uint8(image):
    """(H, W, 3) floats in [0, 1] to uint8, rounding half to even as before. One contiguous copy
    (np.clip's), worked on in place: the chained expression made four full-size float arrays,
    40 ms an image at 512x1024 here against 11."""
    pixels = np.clip(image, 0, 1)
    np.multiply(pixels, 255, out=pixels)
    np.rint(pixels, out=pixels)
    return pixels.astype(np.uint8)
