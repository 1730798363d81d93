"""NSFW score of each image: softmax probability of the label named "nsfw" in the exported map.

The exporter's nsfw.json says which file `model_file: auto` serves and how; runtimes.py runs it
(onnxruntime for .onnx, OpenVINO for .xml). The budget is enforced here, not trusted to callers:
each runtime stops a run at the deadline, and anything slower than the budget or failing scores
1.0 (the spec's fail-safe) with NSFW_STATUS "timeout" or "error".
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from preprocess import Preprocessor, softmax
from runtimes import RuntimeOptions, Timeout, open_runner

from imagegen_contract import (
    FAIL_SAFE_SCORE,
    IMAGE,
    NSFW_SCORE,
    NSFW_STATUS,
    ModelInfo,
    ModelStatus,
    NsfwStatus,
    demo_label,
    parameter,
)

REFERENCE_FILE = "model.onnx"


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.budget_s = float(parameter(config, "budget_ms")) / 1000
        version_dir = Path(args["model_repository"]) / args["model_version"]
        gpu = args["model_instance_kind"] == "GPU"
        path = self._model_path(
            os.environ.get("IMAGEGEN_NSFW_ONNX") or params.get("model_file", "auto"), version_dir, gpu
        )

        self.runner = None
        self.load_error = None
        kind, source, demo, status = "unknown", str(path), None, ModelStatus.OK
        try:
            spec = json.loads((path.parent / "nsfw.json").read_text())
            variant = spec.get("variants", {}).get(path.name, {})
            # nsfw.json before format 2 named only the precision, and only ONNX files.
            kind = variant.get("kind") or f"onnx-{variant.get('precision', 'unknown')}"
            source = spec.get("source", str(path))
            demo = bool(spec.get("demo"))
            self.preprocess = Preprocessor(spec)
            self.nsfw_index = int(spec["nsfw_index"])
            self.runner = open_runner(
                path,
                RuntimeOptions.from_parameters(params),
                inference_precision=variant.get("inference_precision"),
                gpu_device=args["model_instance_device_id"] if gpu else None,
            )
            # The first run allocates and specialises the graph; let no request pay for it.
            height, width = spec["image_size"]
            self.runner(np.zeros((1, 3, height, width), dtype=np.float32), timeout_s=60.0)
        except Exception as exc:  # noqa: BLE001
            # Serve anyway: every request then gets the fail-safe score with status "error",
            # so generation and upload go on (the spec) while the metric and log raise the alarm.
            self.runner = None
            self.load_error = f"{type(exc).__name__}: {exc}"
            status = ModelStatus.ERROR
            self.logger.log_error(f"nsfw: cannot load {path}: {self.load_error}")

        self.info = ModelInfo(
            pb_utils, model=args["model_name"], kind=kind, source=source,
            demo=demo_label(demo), status=status.value,
        )
        demo_note = " (DEMO: random weights, scores mean nothing)" if demo else ""
        self.logger.log_info(
            f"nsfw: {kind} from {source} ({path.name}), budget {self.budget_s:g}s, "
            f"status {status.value}{demo_note}"
        )

    @staticmethod
    def _model_path(name, version_dir, gpu):
        """The file to serve. `name` is "auto" (the exporter's choice in this version folder), a
        folder (the exporter's choice in that folder: what deployments mount), or a file."""
        folder = version_dir
        if name != "auto":
            path = Path(name)
            path = path if path.is_absolute() else version_dir / path
            if not path.is_dir():
                return path
            folder = path
        # The variants are CPU choices (int8, OpenVINO); a GPU runs the reference file on CUDA.
        if gpu:
            return folder / REFERENCE_FILE
        # The exporter recorded which file to serve: the fastest whose parity held. A folder
        # filled with the reference file alone (the variants not copied) serves that file.
        try:
            chosen = json.loads((folder / "nsfw.json").read_text()).get("serve", REFERENCE_FILE)
        except (OSError, ValueError):
            chosen = REFERENCE_FILE
        return folder / (chosen if (folder / chosen).exists() else REFERENCE_FILE)

    def execute(self, requests):
        started = time.monotonic()
        responses = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            batch = pb_utils.get_input_tensor_by_name(request, IMAGE.name).as_numpy()
            if batch.ndim != 4 or batch.shape[-1] != 3 or 0 in batch.shape:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"{IMAGE.name} must be [batch, height, width, 3] uint8, "
                        f"got {list(batch.shape)}",
                        pb_utils.TritonError.INVALID_ARG,
                    )
                )
                continue
            images.extend(batch)
            owners.append((i, len(batch)))

        scores, status = self._score(images, started)
        offset = 0
        for i, count in owners:
            responses[i] = self._response(scores[offset : offset + count], status[offset : offset + count])
            offset += count
        return responses

    def _score(self, images, started):
        """Scores and statuses for all images of this batch, never raising."""
        count = len(images)
        fail = np.full(count, FAIL_SAFE_SCORE, dtype=np.float32)
        if count == 0:
            return fail, []
        if self.runner is None:
            return fail, [NsfwStatus.ERROR] * count
        try:
            pixels = self.preprocess(images)
            logits = self.runner(pixels, self.budget_s - (time.monotonic() - started))
        except Timeout:
            return fail, [NsfwStatus.TIMEOUT] * count
        except Exception as exc:  # noqa: BLE001 - the fail-safe covers every failure
            self.logger.log_error(f"nsfw: scoring failed: {type(exc).__name__}: {exc}")
            return fail, [NsfwStatus.ERROR] * count
        # A run that finished just past the budget is still too late to be trusted (the spec).
        if time.monotonic() - started > self.budget_s:
            return fail, [NsfwStatus.TIMEOUT] * count
        probabilities = softmax(logits.astype(np.float64))[:, self.nsfw_index]
        return probabilities.astype(np.float32), [NsfwStatus.OK] * count

    @staticmethod
    def _response(scores, statuses):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(
                    NSFW_SCORE.name, np.asarray(scores, dtype=np.float32).reshape(-1, 1)
                ),
                pb_utils.Tensor(
                    NSFW_STATUS.name,
                    np.array([[s.value.encode()] for s in statuses], dtype=np.object_),
                ),
            ]
        )

    def finalize(self):
        self.runner = None
