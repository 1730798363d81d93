"""NSFW score of each image: softmax probability of the label named "nsfw" in the exported map.

The budget is enforced here, not trusted to callers: a watchdog sets onnxruntime's
RunOptions.terminate when it runs out, and anything slower than the budget or failing scores
1.0 (the spec's fail-safe) with NSFW_STATUS "timeout" or "error".
"""

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from preprocess import Preprocessor, softmax

FAIL_SAFE_SCORE = 1.0


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.budget_s = float(params.get("budget_ms", "5000")) / 1000
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = self._onnx_path(
            os.environ.get("IMAGEGEN_NSFW_ONNX") or params.get("onnx_file", "auto"), version_dir
        )
        gpu = args["model_instance_kind"] == "GPU"

        self.session = None
        self.load_error = None
        info = {"kind": "onnx", "source": str(onnx_path), "demo": "unknown", "status": "ok"}
        try:
            spec = json.loads((onnx_path.parent / "nsfw.json").read_text())
            self.session = self._session(onnx_path, gpu, args["model_instance_device_id"], params)
            self.preprocess = Preprocessor(spec)
            self.nsfw_index = int(spec["nsfw_index"])
            variant = spec.get("variants", {}).get(onnx_path.name, {})
            info.update(
                kind="onnx-" + variant.get("precision", "unknown"),
                source=spec.get("source", str(onnx_path)),
                demo="true" if spec.get("demo") else "false",
            )
        except Exception as exc:  # noqa: BLE001
            # Serve anyway: every request then gets the fail-safe score with status "error",
            # so generation and upload go on (the spec) while the metric and log raise the alarm.
            self.load_error = f"{type(exc).__name__}: {exc}"
            info["status"] = "error"
            self.logger.log_error(f"nsfw: cannot load {onnx_path}: {self.load_error}")

        self.info_family = pb_utils.MetricFamily(
            name="imagegen_model_info",
            description="Which weights each imagegen model serves (demo=true: random weights)",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.info = self.info_family.Metric(labels={"model": args["model_name"], **info})
        self.info.set(1)
        demo_note = " (DEMO: random weights, scores mean nothing)" if info["demo"] == "true" else ""
        self.logger.log_info(
            f"nsfw: {info['kind']} from {info['source']}, budget {self.budget_s:g}s, "
            f"status {info['status']}{demo_note}"
        )

    @staticmethod
    def _onnx_path(name, version_dir):
        if name != "auto":
            path = Path(name)
            return path if path.is_absolute() else version_dir / path
        # The exporter recorded which file to serve: int8 when its parity held, else fp32.
        try:
            chosen = json.loads((version_dir / "nsfw.json").read_text()).get("serve", "model.onnx")
        except (OSError, ValueError):
            chosen = "model.onnx"
        return version_dir / chosen

    @staticmethod
    def _session(path, gpu, device_id, params):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", params.get("allow_spinning", "0")
        )
        providers = ["CPUExecutionProvider"]
        if gpu:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device_id)}))
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)

    def execute(self, requests):
        started = time.monotonic()
        responses = [None] * len(requests)
        images, owners = [], []
        for i, request in enumerate(requests):
            batch = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            if batch.ndim != 4 or batch.shape[-1] != 3 or 0 in batch.shape:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"IMAGE must be [batch, height, width, 3] uint8, got {list(batch.shape)}",
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
        if self.session is None:
            return fail, ["error"] * count
        import onnxruntime as ort

        run_options = ort.RunOptions()
        watchdog = None
        try:
            pixels = self.preprocess(images)
            remaining = self.budget_s - (time.monotonic() - started)
            if remaining <= 0:
                return fail, ["timeout"] * count
            watchdog = threading.Timer(remaining, setattr, (run_options, "terminate", True))
            watchdog.start()
            (logits,) = self.session.run(["logits"], {"pixel_values": pixels}, run_options)
        except Exception as exc:  # noqa: BLE001 - the fail-safe covers every failure
            if run_options.terminate:
                return fail, ["timeout"] * count
            self.logger.log_error(f"nsfw: scoring failed: {type(exc).__name__}: {exc}")
            return fail, ["error"] * count
        finally:
            if watchdog is not None:
                watchdog.cancel()
        # A run that finished just past the budget is still too late to be trusted (the spec).
        if time.monotonic() - started > self.budget_s:
            return fail, ["timeout"] * count
        probabilities = softmax(logits.astype(np.float64))[:, self.nsfw_index]
        return probabilities.astype(np.float32), ["ok"] * count

    @staticmethod
    def _response(scores, statuses):
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("NSFW_SCORE", np.asarray(scores, dtype=np.float32).reshape(-1, 1)),
                pb_utils.Tensor(
                    "NSFW_STATUS", np.array([[s.encode()] for s in statuses], dtype=np.object_)
                ),
            ]
        )

    def finalize(self):
        self.session = None
