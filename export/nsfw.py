"""Export an NSFW image classifier (Falconsai/nsfw_image_detection or any ViT-style
AutoModelForImageClassification) for `model_repository/nsfw`, and prove parity.

    python -m export.nsfw --model Falconsai/nsfw_image_detection [--int8]

Writes into the version folder (default model_repository/nsfw/1):
  model.onnx        fp32, opset 17, dynamic batch, fixed input size (the reference variant)
  with --int8, the faster variants (VARIANTS below), each only when its tools and CPU allow:
    model.openvino-int8.xml/.bin  OpenVINO, static int8 from NNCF, calibrated on photographs
    model.openvino-bf16.xml/.bin  OpenVINO, run in bf16 (CPUs with bf16, e.g. AMX)
    model.int8.onnx               onnxruntime, dynamic int8 after LayerNorm/GELU fusion
    model.int8-qdq.onnx           onnxruntime, static int8 (QDQ), calibrated on photographs
    model.int8-qop.onnx           onnxruntime, static int8 (QOperator), calibrated likewise
  nsfw.json         label map, preprocessing, the measured parity of each file, and which one
                    `model_file: auto` serves and why

Parity is the max |score difference| against transformers.pipeline("image-classification") on
the same weights, scored with the served preprocessing and runtimes (nsfw/1/preprocess.py and
runtimes.py). It is measured on natural photographs (scikit-image's bundled ones) and built-in
synthetic samples; the calibration of the static int8 variants uses other photographs. The
export fails when fp32 differs by more than --tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from export.quiet import no_console_output, quiet_libraries, quiet_root_logger
from imagegen_contract import DEMO_MARKER

log = logging.getLogger("export.nsfw")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = PROJECT_ROOT / "model_repository" / "nsfw" / "1"
OPSET = 17
FP32_TOLERANCE = 1e-4
# A faster variant is served by default only within this much of the reference score.
FAST_TOLERANCE = 0.02
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# nsfw.json's layout; readers (benchmarks.nsfw) re-export when theirs is older.
FORMAT = 2

# scikit-image's bundled photographs (no download). The two sets share no scene, so parity is
# measured on images the calibration never saw. Grayscale ones are scored as RGB, as the
# pipeline does. `cat` is `chelsea` and the stereo pair is one scene: neither is split across.
CALIBRATION_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry",
    "camera", "moon", "grass", "gravel",
)
PARITY_PHOTOS = (
    "chelsea", "rocket", "retina", "stereo_motorcycle",
    "coins", "clock", "brick", "page", "text",
)


class ExportError(RuntimeError):
    """The source model cannot be exported faithfully."""


@dataclass(frozen=True)
class ParityReport:
    file: str
    precision: str
    max_abs_diff: float
    images: int


@dataclass(frozen=True)
class Source:
    """What every variant is built from."""

    classifier: Any  # the transformers model, eval mode
    fp32: Path  # the exported reference ONNX file
    calibration: np.ndarray  # preprocessed calibration images, NCHW float32
    num_heads: int
    hidden_size: int


@dataclass(frozen=True)
class Variant:
    kind: str  # also the `kind` label of imagegen_model_info
    file: str
    precision: str
    method: str
    build: Callable[[Source, Path], None] | None  # None: the reference, written first
    # OpenVINO's precision for what the file leaves in floating point; None: not OpenVINO.
    inference_precision: Callable[[], str] | None = None
    available: Callable[[], bool] = lambda: True


def load_served_module(name: str, version_dir: Path = DEFAULT_OUTPUT) -> ModuleType:
    """A module of the served model's folder (preprocess, runtimes), so parity checks what
    Triton runs."""
    path = version_dir / f"{name}.py"
    if not path.exists():
        path = DEFAULT_OUTPUT / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"nsfw_{name}", path)
    if spec is None or spec.loader is None:
        raise ExportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_images(seed: int = 0) -> list[np.ndarray]:
    """Deterministic, varied RGB images: square and not, smooth and noisy, small and large."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in [(1024, 512), (512, 1024), (224, 224), (300, 300), (64, 900), (777, 333)]:
        y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
        x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
        gradient = np.stack([y + 0 * x, x + 0 * y, (x * y)], axis=-1)
        noise = rng.random((height, width, 3), dtype=np.float32)
        mix = rng.random()
        images.append(((mix * gradient + (1 - mix) * noise) * 255).round().astype(np.uint8))
    blocks = (np.indices((256, 384)).sum(axis=0) // 32 % 2 * 255).astype(np.uint8)
    images.append(np.stack([blocks, 255 - blocks, blocks // 2], axis=-1))
    return images


def photos(names: Sequence[str]) -> list[np.ndarray]:
    """scikit-image's bundled photographs as HxWx3 uint8 (the left view of a stereo pair)."""
    from skimage import data

    images = []
    for name in names:
        image = getattr(data, name)()
        if isinstance(image, tuple):
            image = image[0]
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        images.append(np.ascontiguousarray(image[..., :3]))
    return images


def calibration_photos() -> list[np.ndarray]:
    """The calibration photographs and their mirror images."""
    originals = photos(CALIBRATION_PHOTOS)
    return originals + [np.ascontiguousarray(image[:, ::-1]) for image in originals]


def default_parity_sets() -> dict[str, list[np.ndarray]]:
    return {"photos": photos(PARITY_PHOTOS), "samples": sample_images()}


def load_images(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        raise ExportError(f"no .jpg/.png images in {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def preprocessing_spec(processor: Any) -> dict[str, Any]:
    """Read the processor's settings and refuse anything preprocess.py does not reproduce."""
    if getattr(processor, "do_center_crop", False):
        raise ExportError("center cropping is not supported by the served preprocessing")
    if not getattr(processor, "do_resize", True):
        raise ExportError("the processor does not resize; a fixed input size is required")
    size = processor.size
    if "height" not in size or "width" not in size:
        raise ExportError(f"only a fixed height/width resize is supported, got size={size}")
    resample = int(getattr(processor, "resample", 2))
    if resample not in PIL_RESAMPLE_NAMES:
        raise ExportError(f"unsupported resample {resample}")
    return {
        "image_size": [int(size["height"]), int(size["width"])],
        "resample": PIL_RESAMPLE_NAMES[resample],
        "rescale_factor": float(processor.rescale_factor) if processor.do_rescale else 1.0,
        "image_mean": [float(v) for v in processor.image_mean]
        if processor.do_normalize
        else [0.0, 0.0, 0.0],
        "image_std": [float(v) for v in processor.image_std]
        if processor.do_normalize
        else [1.0, 1.0, 1.0],
    }


def export_onnx(model: Any, spec: dict[str, Any], path: Path) -> None:
    import torch

    height, width = spec["image_size"]
    dummy = torch.zeros(1, 3, height, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter gives a single self-contained file with named dynamic axes; its
    # deprecation and tracer warnings (shape checks frozen for the fixed input size) are expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def quantize_int8(source: Path, target: Path, num_heads: int, hidden_size: int) -> None:
    """Fuse LayerNorm/GELU with onnxruntime's transformer optimizer, then quantize the MatMuls'
    weights to int8 (activations quantized per call): faster than quantizing the plain graph,
    and closer to fp32.

    Only MatMuls: the patch embedding's Conv as ConvInteger (raw pixels quantized per call) put
    ViT-B/16's scores 0.029 off the reference, against 0.009 with it left in fp32; the head's
    Gemm is tiny. The optimizer finds no attention to fuse in this export (neither SDPA nor
    eager attention, dynamic batch or fixed)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = target.with_suffix(".fused.onnx")
    try:
        with quiet_root_logger():
            optimized = optimizer.optimize_model(
                str(source), model_type="vit", num_heads=num_heads, hidden_size=hidden_size
            )
            optimized.save_model_to_file(str(fused))
            quantize_dynamic(
                str(fused),
                str(target),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                # Fused ops come from the com.microsoft domain, where shape inference cannot
                # type every tensor; all of them are float.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    finally:
        fused.unlink(missing_ok=True)


def quantize_static_onnx(source: Source, target: Path, quant_format: str) -> None:
    """Static int8 with onnxruntime: activation ranges calibrated on the photographs, weights
    per output channel, MatMuls only (as in quantize_int8).

    On the plain graph: onnxruntime fuses LayerNorm and GELU itself when it loads the file, while
    quantizing the optimizer's fused graph does not pay (QDQ around the fused ops ran 4x slower
    on ViT-B/16, unfolded; QOperator fails inside onnxruntime's quantizer)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"pixel_values": image[None]} for image in source.calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with quiet_root_logger():
        quantize_static(
            str(source.fp32),
            str(target),
            Reader(),
            quant_format=QuantFormat[quant_format],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def openvino_model(source: Source) -> Any:
    """The classifier converted from PyTorch, which keeps attention as one
    ScaledDotProductAttention op (OpenVINO runs it fused); the ONNX export spells it out."""
    import openvino as ov
    import torch

    height, width = source.calibration.shape[2:]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ov.convert_model(
            source.classifier,
            example_input=torch.zeros(1, 3, height, width),
            input=[("pixel_values", [-1, 3, height, width])],
        )


def quantize_openvino(source: Source, target: Path) -> None:
    """Static int8 with NNCF on the calibration photographs.

    Without SmoothQuant, and with the patch embedding (Conv) and the head left in floating
    point: on ViT-B/16 with the exporter's photographs, SmoothQuant put scores 0.038 off the
    reference and quantizing the Conv added to the error, for under 1 % of the work."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    nncf.set_log_level(logging.ERROR)
    with no_console_output():
        quantized = nncf.quantize(
            openvino_model(source),
            nncf.Dataset([image[None] for image in source.calibration]),
            subset_size=len(source.calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(
                types=["Convolution"], patterns=[".*classifier.*"], validate=False
            ),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)
            ),
        )
    ov.save_model(quantized, str(target), compress_to_fp16=False)


def save_openvino(source: Source, target: Path) -> None:
    import openvino as ov

    ov.save_model(openvino_model(source), str(target), compress_to_fp16=False)


def cpu_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_float_precision() -> str:
    """What an OpenVINO int8 file leaves in floating point runs in: bf16 where the CPU has it."""
    return "bf16" if cpu_has_bf16() else "f32"


REFERENCE = Variant(
    kind="onnx-fp32",
    file="model.onnx",
    precision="fp32",
    method="torch.onnx export, opset 17; onnxruntime",
    build=None,
)
# The order `model_file: auto` prefers among the variants whose parity holds: fastest first,
# as benchmarks.nsfw measured them side by side inside Triton (docs/benchmarks.md).
VARIANTS = (
    Variant(
        kind="openvino-int8",
        file="model.openvino-int8.xml",
        precision="int8",
        method="OpenVINO; NNCF static int8 (linear layers), calibrated on photographs",
        build=quantize_openvino,
        inference_precision=openvino_float_precision,
    ),
    Variant(
        kind="openvino-bf16",
        file="model.openvino-bf16.xml",
        precision="bf16",
        method="OpenVINO, inference precision bf16",
        build=save_openvino,
        inference_precision=lambda: "bf16",
        available=cpu_has_bf16,
    ),
    Variant(
        kind="onnx-int8",
        file="model.int8.onnx",
        precision="int8",
        method="onnxruntime; LayerNorm/GELU fused, dynamic int8 MatMuls",
        build=lambda source, target: quantize_int8(
            source.fp32, target, source.num_heads, source.hidden_size
        ),
    ),
    Variant(
        kind="onnx-int8-qdq",
        file="model.int8-qdq.onnx",
        precision="int8",
        method="onnxruntime; static int8 QDQ, per channel, calibrated on photographs",
        build=lambda source, target: quantize_static_onnx(source, target, "QDQ"),
    ),
    Variant(
        kind="onnx-int8-qop",
        file="model.int8-qop.onnx",
        precision="int8",
        method="onnxruntime; static int8 QOperator, per channel, calibrated on photographs",
        build=lambda source, target: quantize_static_onnx(source, target, "QOperator"),
    ),
)
FAST_KINDS = tuple(v.kind for v in VARIANTS)


def reference_scores(model_dir: str, images: Sequence[np.ndarray], label: str) -> np.ndarray:
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("image-classification", model=model_dir, device=-1)
    scores = []
    for image in images:
        results = classifier(Image.fromarray(image), top_k=None)
        scores.append(next(r["score"] for r in results if r["label"] == label))
    return np.asarray(scores, dtype=np.float64)


def served_scores(
    path: Path,
    spec: Mapping[str, Any],
    images: Sequence[np.ndarray],
    version_dir: Path = DEFAULT_OUTPUT,
    inference_precision: str | None = None,
) -> np.ndarray:
    """Scores as the served model computes them: its preprocessing, its runtime code, one image
    per run (as requests mostly come; dynamic int8 would otherwise share ranges across images)."""
    preprocess = load_served_module("preprocess", version_dir)
    runtimes = load_served_module("runtimes", version_dir)
    runner = runtimes.open_runner(path, inference_precision=inference_precision)
    to_pixels = preprocess.Preprocessor(spec)
    logits = np.concatenate([runner(to_pixels([image]), timeout_s=600.0) for image in images])
    return preprocess.softmax(logits.astype(np.float64))[:, spec["nsfw_index"]]


def resolve_source(model: str) -> tuple[str, bool]:
    """A local directory, or a hub id that must already be in the Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        return str(path.resolve()), (path / DEMO_MARKER).exists()
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(model, local_files_only=True)
    except Exception as exc:  # the hub is unreachable here; only the cache counts
        raise ExportError(f"{model!r} is neither a directory nor in the Hugging Face cache") from exc
    return local, (Path(local) / DEMO_MARKER).exists()


def variant_model_name(kind: str) -> str:
    """The Triton model name a variant is served under when each is a model of its own
    (benchmarks.nsfw, tests/models/test_nsfw.py): `onnx-int8` -> `nsfw_onnx_int8`."""
    return "nsfw_" + kind.replace("-", "_")


def choose_variants(int8: bool, kinds: Sequence[str] | None) -> list[Variant]:
    """The faster variants asked for (by default all that this machine can build), in
    VARIANTS' order."""
    if kinds is None:
        kinds = FAST_KINDS if int8 else ()
    unknown = set(kinds) - set(FAST_KINDS)
    if unknown:
        raise ExportError(f"unknown variants {sorted(unknown)}; known: {', '.join(FAST_KINDS)}")
    chosen = []
    for variant in VARIANTS:
        if variant.kind not in kinds:
            continue
        if variant.available():
            chosen.append(variant)
        else:
            print(f"skipping {variant.kind}: this CPU lacks what it needs")
    return chosen


def choose_served(results: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The file `model_file: auto` serves, and why: the first faster variant in VARIANTS' order
    whose parity holds; the reference when none does."""
    order = [v.kind for v in VARIANTS]
    faster = sorted(
        ((info["kind"], file, info["parity_max_abs_diff"]) for file, info in results.items()
         if info["kind"] in order),
        key=lambda item: order.index(item[0]),
    )
    too_far = []
    for kind, file, parity in faster:
        if parity <= FAST_TOLERANCE:
            why = (f"{kind} comes first in the speed order among the variants whose parity holds "
                   f"({parity:.3g} <= {FAST_TOLERANCE:g})")
            return file, why + (f"; parity too far: {', '.join(too_far)}" if too_far else "")
        too_far.append(f"{kind} {parity:.3g}")
    if not faster:
        return REFERENCE.file, "only the reference was exported"
    return REFERENCE.file, f"no faster variant held parity <= {FAST_TOLERANCE:g} ({', '.join(too_far)})"


def parity_verdict(variant: Variant, worst: float, tolerance: float) -> str:
    """What a parity figure means, printed beside it."""
    if variant is REFERENCE:
        if worst <= tolerance:
            return f"OK, the export reproduces the model (limit {tolerance:g})"
        return f"FAILED, over the limit {tolerance:g}: the export does not reproduce the model"
    if worst <= FAST_TOLERANCE:
        return f"within {FAST_TOLERANCE:g}, may be served"
    return f"over {FAST_TOLERANCE:g}, kept on disk but not served by default"


@quiet_libraries()
def export(
    model: str,
    output: Path = DEFAULT_OUTPUT,
    *,
    int8: bool = False,
    variants: Sequence[str] | None = None,
    images: Sequence[np.ndarray] | Mapping[str, Sequence[np.ndarray]] | None = None,
    calibration: Sequence[np.ndarray] | None = None,
    tolerance: float = FP32_TOLERANCE,
    label: str = "nsfw",
) -> list[ParityReport]:
    """images: the parity images, as one list or as named sets (default: photographs and
    synthetic samples); calibration: for the static int8 variants (default: other photographs).
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model_dir, demo = resolve_source(model)
    classifier = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    # The PIL processor: the one the served preprocessing (preprocess.py) reproduces.
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    id2label = {int(k): v for k, v in classifier.config.id2label.items()}
    matches = [i for i, name in id2label.items() if name.lower() == label]
    if len(matches) != 1:
        raise ExportError(f"the label map {id2label} has no single label named {label!r}")

    spec = preprocessing_spec(processor)
    spec.update(
        format=FORMAT,
        # As the diffusion model reports its own: an absolute folder, or the hub id.
        source=model_dir if Path(model).is_dir() else model,
        demo=demo,
        labels=[id2label[i] for i in range(len(id2label))],
        nsfw_label=label,
        nsfw_index=matches[0],
        opset=OPSET,
    )
    output = Path(output)
    chosen = choose_variants(int8, variants)
    if images is None:
        parity_sets = default_parity_sets()
    elif isinstance(images, Mapping):
        parity_sets = {name: list(group) for name, group in images.items()}
    else:
        parity_sets = {"images": list(images)}
    preprocess = load_served_module("preprocess", output)
    runtimes = load_served_module("runtimes", output)
    calibration_images = list(calibration) if calibration is not None else calibration_photos()
    source = Source(
        classifier=classifier,
        fp32=output / REFERENCE.file,
        calibration=preprocess.Preprocessor(spec)(calibration_images),
        num_heads=classifier.config.num_attention_heads,
        hidden_size=classifier.config.hidden_size,
    )
    export_onnx(classifier, spec, source.fp32)
    for variant in chosen:
        if variant.build is not None:
            log.info("building %s (%s)", variant.kind, variant.method)
            variant.build(source, output / variant.file)

    every_image = [image for group in parity_sets.values() for image in group]
    reference = reference_scores(model_dir, every_image, id2label[matches[0]])
    results: dict[str, dict[str, Any]] = {}
    reports = []
    for variant in [REFERENCE, *chosen]:
        precision = variant.inference_precision() if variant.inference_precision else None
        scores = served_scores(output / variant.file, spec, every_image, output, precision)
        differences = np.abs(scores - reference)
        per_set, start = {}, 0
        for name, group in parity_sets.items():
            per_set[name] = float(differences[start : start + len(group)].max())
            start += len(group)
        worst = float(differences.max())
        results[variant.file] = {
            "kind": variant.kind,
            "runtime": runtimes.runtime_of(variant.file),
            "precision": variant.precision,
            **({"inference_precision": precision} if precision else {}),
            "method": variant.method,
            "parity_max_abs_diff": worst,
            "parity_by_set": per_set,
        }
        reports.append(ParityReport(variant.file, variant.precision, worst, len(every_image)))
        sets = ", ".join(f"{v:.3g} on {len(parity_sets[k])} {k}" for k, v in per_set.items())
        print(f"parity {variant.kind} {variant.file}: max |Δ score| = {worst:.3g} ({sets}): "
              + parity_verdict(variant, worst, tolerance))
    spec["variants"] = results
    spec["calibration"] = (
        {"images": len(calibration_images), "photos": list(CALIBRATION_PHOTOS), "mirrored": True}
        if calibration is None
        else {"images": len(calibration_images)}
    )
    spec["parity_images"] = {name: len(group) for name, group in parity_sets.items()}
    if images is None:
        spec["parity_images"]["photo_names"] = list(PARITY_PHOTOS)
    spec["serve"], spec["serve_reason"] = choose_served(results)
    print(f"serving {spec['serve']} by default: {spec['serve_reason']}")
    if demo and spec["serve"] == REFERENCE.file and len(results) > 1:
        print("(a random-weight demo classifier: its faster variants missing "
              f"{FAST_TOLERANCE:g} is expected and harmless; it then serves fp32, and real "
              "weights are checked the same way)")
    (output / "nsfw.json").write_text(json.dumps(spec, indent=2) + "\n")
    if reports[0].max_abs_diff > tolerance:
        raise ExportError(
            f"fp32 parity {reports[0].max_abs_diff:.3g} exceeds the tolerance {tolerance:g}"
        )
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export an NSFW classifier to ONNX/OpenVINO.")
    parser.add_argument("--model", required=True, help="hub id (from the HF cache) or a directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--int8", action="store_true",
                        help="also write the faster variants (int8; bf16 on CPUs with it)")
    parser.add_argument("--variants", help=f"comma list of faster variants: {', '.join(FAST_KINDS)}")
    parser.add_argument("--images", type=Path, help="folder of .jpg/.png for the parity check")
    parser.add_argument("--calibration", type=Path,
                        help="folder of .jpg/.png to calibrate static int8 on")
    parser.add_argument("--tolerance", type=float, default=FP32_TOLERANCE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(
            args.model,
            args.output,
            int8=args.int8,
            variants=args.variants.split(",") if args.variants else None,
            images=load_images(args.images) if args.images else None,
            calibration=load_images(args.calibration) if args.calibration else None,
            tolerance=args.tolerance,
        )
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
