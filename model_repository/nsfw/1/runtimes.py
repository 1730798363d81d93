"""The runtimes an exported NSFW variant runs on, behind one call with a deadline.

Kept beside model.py (the Python backend puts this folder on sys.path) and loaded by the
exporter too, so a variant's parity is measured with the code Triton runs. A file's suffix names
its runtime: `.onnx` runs on onnxruntime, `.xml` on OpenVINO (its weights in the `.bin` beside
it). Either way a run that outlives its deadline is stopped and raises Timeout.
"""

import threading
from dataclasses import dataclass
from pathlib import Path

INPUT = "pixel_values"
OUTPUT = "logits"
OPENVINO_SUFFIX = ".xml"


class Timeout(Exception):
    """The deadline passed before the logits were ready; the run was stopped."""


@dataclass(frozen=True)
class RuntimeOptions:
    """The knobs of config.pbtxt `parameters` that reach the runtime."""

    # 0: the runtime's own choice (one thread per core).
    threads: int = 0
    # onnxruntime: whether its threads spin-wait after a run (they then hold the cores).
    allow_spinning: bool = False
    # OpenVINO: whether its threads are pinned to cores (they then fight diffusion's for them).
    cpu_pinning: bool = False

    @classmethod
    def from_parameters(cls, params):
        flag = {"0": False, "1": True, "false": False, "true": True}
        options = cls(
            threads=int(params.get("intra_op_threads", "0")),
            allow_spinning=flag[params.get("allow_spinning", "0").lower()],
            cpu_pinning=flag[params.get("cpu_pinning", "0").lower()],
        )
        if options.threads < 0:
            raise ValueError(f"intra_op_threads must be 0 or more, got {options.threads}")
        return options


def runtime_of(path):
    return "openvino" if Path(path).suffix == OPENVINO_SUFFIX else "onnxruntime"


def open_runner(path, options=RuntimeOptions(), inference_precision=None, gpu_device=None):
    """A callable (pixels, timeout_s) -> logits for the file at `path`.

    inference_precision: OpenVINO's precision for what the file leaves in floating point
    ("bf16" or "f32"), as the exporter measured it; None keeps OpenVINO's default for the CPU.
    gpu_device: a CUDA device id for onnxruntime, None for the CPU.
    """
    if runtime_of(path) == "openvino":
        return OpenVinoRunner(path, options, inference_precision)
    return OnnxRuntimeRunner(path, options, gpu_device)


class OnnxRuntimeRunner:
    def __init__(self, path, options, gpu_device=None):
        import onnxruntime as ort

        self._ort = ort
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        providers = ["CPUExecutionProvider"]
        if gpu_device is not None:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(gpu_device)}))
        self.session = self._ort.InferenceSession(
            str(path), sess_options=session_options, providers=providers
        )

    def __call__(self, pixels, timeout_s):
        if timeout_s <= 0:
            raise Timeout
        run_options = self._ort.RunOptions()
        # onnxruntime checks `terminate` between nodes: the run stops soon after the deadline.
        watchdog = threading.Timer(timeout_s, setattr, (run_options, "terminate", True))
        watchdog.start()
        try:
            (logits,) = self.session.run([OUTPUT], {INPUT: pixels}, run_options)
        except Exception:
            if run_options.terminate:
                raise Timeout from None
            raise
        finally:
            watchdog.cancel()
        return logits


class OpenVinoRunner:
    def __init__(self, path, options, inference_precision=None):
        import openvino as ov

        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": options.threads,
            "ENABLE_CPU_PINNING": options.cpu_pinning,
        }
        if inference_precision is not None:
            config["INFERENCE_PRECISION_HINT"] = inference_precision
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        # One request per model instance: Triton calls execute() of an instance one at a time.
        self.request = self.compiled.create_infer_request()

    def __call__(self, pixels, timeout_s):
        if timeout_s <= 0:
            raise Timeout
        self.request.start_async({0: pixels})
        # wait_for takes whole milliseconds; 0 would only poll.
        if not self.request.wait_for(max(1, int(timeout_s * 1000))):
            # Cancelling stops the run between nodes; wait() then reports the cancellation.
            self.request.cancel()
            try:
                self.request.wait()
            except RuntimeError:
                pass
            raise Timeout
        return self.request.get_output_tensor(0).data.copy()
