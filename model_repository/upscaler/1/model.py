"""2x upscaling: Lanczos, or a learned super-resolution model loaded with spandrel."""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

from imagegen_contract import (
    IMAGE,
    NO_UPSCALE,
    SCALE,
    SCALES,
    UPSCALE_FACTOR,
    ModelInfo,
    ModelStatus,
    demo_label,
    parameter,
)


class InvalidInput(ValueError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.max_output_pixels = int(parameter(config, "max_output_pixels"))
        weights = os.environ.get("IMAGEGEN_UPSCALER_WEIGHTS") or params.get("weights", "")
        self.net = None
        kind, source = "lanczos", ""
        if weights:
            path = Path(weights)
            if not path.is_absolute():
                path = Path(args["model_repository"]) / path
            gpu = args["model_instance_kind"] == "GPU"
            self.device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
            self.net = self._load(path)
            kind = f"spandrel-{self.net.architecture.id}-x{self.net.scale}"
            source = str(path)

        self.info = ModelInfo(
            pb_utils, model=args["model_name"], kind=kind, source=source,
            demo=demo_label(False), status=ModelStatus.OK.value,
        )
        self.logger.log_info(f"upscaler: {kind}" + (f" from {source}" if source else ""))

    def _load(self, path):
        # A weights file that is configured but cannot be loaded fails the model: silently
        # falling back to Lanczos would hide a broken deployment.
        import spandrel

        descriptor = spandrel.ModelLoader(device=self.device).load_from_file(str(path))
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise pb_utils.TritonModelException(f"{path} is not a single-image super-resolution model")
        return descriptor.eval()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images, scales = self._inputs(request)
                if all(scale == NO_UPSCALE for scale in scales):
                    # The pass-through (upscale false): the input tensor goes back as it came,
                    # under the same name, without a stack of numpy copies into a new tensor.
                    output = pb_utils.get_input_tensor_by_name(request, IMAGE.name)
                else:
                    out = [self._upscale(image, scale) for image, scale in zip(images, scales)]
                    output = pb_utils.Tensor(IMAGE.name, np.stack(out))
                responses.append(pb_utils.InferenceResponse([output]))
            except InvalidInput as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                    )
                )
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail the batch
                self.logger.log_error(f"upscaler: {type(exc).__name__}: {exc}")
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"upscaling failed: {exc}", pb_utils.TritonError.INTERNAL)
                    )
                )
        return responses

    def _inputs(self, request):
        images = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
        scales = pb_utils.get_input_tensor_by_name(request, SCALE.name).as_numpy().reshape(-1)
        if images.ndim != 4 or 0 in images.shape:
            raise InvalidInput(
                f"{IMAGE.name} must be [batch, height, width, 3], got {list(images.shape)}"
            )
        if len(scales) != len(images):
            raise InvalidInput(
                f"{SCALE.name} needs one value per image, got {len(scales)} for {len(images)}"
            )
        for scale in scales:
            if int(scale) not in SCALES:
                allowed = " or ".join(str(s) for s in SCALES)
                raise InvalidInput(f"{SCALE.name} must be {allowed}, got {int(scale)}")
        height, width = images.shape[1:3]
        if int(scales.max()) ** 2 * height * width > self.max_output_pixels:
            raise InvalidInput(f"output would exceed {self.max_output_pixels} pixels")
        return images, [int(s) for s in scales]

    def _upscale(self, image, scale):
        if scale == NO_UPSCALE:
            return image
        height, width = (n * UPSCALE_FACTOR for n in image.shape[:2])
        # Lanczos alone, or after a learned model of another native scale.
        out = image if self.net is None else self._learned(image)
        if out.shape[:2] != (height, width):
            out = np.asarray(Image.fromarray(out).resize((width, height), Image.LANCZOS))
        return out

    def _learned(self, image):
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255
            out = self.net(tensor).clamp_(0, 1).mul_(255).round_()
        return out[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()
