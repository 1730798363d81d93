"""Export an NSFW image classifier (Falconsai/nsfw_image_detection or any ViT-style
AutoModelForImageClassification) to ONNX for `model_repository/nsfw`, and prove parity.

    python -m export.nsfw --model Falconsai/nsfw_image_detection [--int8]

Writes into the version folder (default model_repository/nsfw/1):
  model.onnx        fp32, opset 17, dynamic batch, fixed input size
  model.int8.onnx   with --int8: dynamic int8 quantization of model.onnx
  nsfw.json         label map, preprocessing and the measured parity of each file

Parity is the max |score difference| against transformers.pipeline("image-classification") on
the same weights, scored with the served preprocessing (nsfw/1/preprocess.py). The export fails
when fp32 differs by more than --tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("export.nsfw")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = PROJECT_ROOT / "model_repository" / "nsfw" / "1"
DEMO_MARKER = "imagegen_demo.json"
OPSET = 17
FP32_TOLERANCE = 1e-4
# A faster variant is served by default only within this much of the reference score.
FAST_TOLERANCE = 0.02
PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


class ExportError(RuntimeError):
    """The source model cannot be exported faithfully."""


@dataclass(frozen=True)
class ParityReport:
    file: str
    precision: str
    max_abs_diff: float
    images: int


def load_preprocess_module(version_dir: Path = DEFAULT_OUTPUT) -> ModuleType:
    """The served preprocessing, loaded from the repository so parity checks what Triton runs."""
    path = version_dir / "preprocess.py"
    if not path.exists():
        path = DEFAULT_OUTPUT / "preprocess.py"
    spec = importlib.util.spec_from_file_location("nsfw_preprocess", path)
    assert spec is not None and spec.loader is not None
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
    Gemm is tiny."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    # Both narrate every node and tensor on the root logger at INFO.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    fused = target.with_suffix(".fused.onnx")
    try:
        optimized = optimizer.optimize_model(
            str(source), model_type="vit", num_heads=num_heads, hidden_size=hidden_size
        )
        optimized.save_model_to_file(str(fused))
        quantize_dynamic(
            str(fused),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            # Fused ops come from the com.microsoft domain, where shape inference cannot type
            # every tensor; all of them are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
        fused.unlink(missing_ok=True)


def reference_scores(model_dir: str, images: Sequence[np.ndarray], label: str) -> np.ndarray:
    from PIL import Image
    from transformers import pipeline

    classifier = pipeline("image-classification", model=model_dir, device=-1)
    scores = []
    for image in images:
        results = classifier(Image.fromarray(image), top_k=None)
        scores.append(next(r["score"] for r in results if r["label"] == label))
    return np.asarray(scores, dtype=np.float64)


def onnx_scores(
    path: Path, spec: dict[str, Any], images: Sequence[np.ndarray], preprocess: ModuleType
) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = preprocess.Preprocessor(spec)(list(images))
    (logits,) = session.run(["logits"], {"pixel_values": batch})
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


def export(
    model: str,
    output: Path = DEFAULT_OUTPUT,
    *,
    int8: bool = False,
    images: Sequence[np.ndarray] | None = None,
    tolerance: float = FP32_TOLERANCE,
    label: str = "nsfw",
) -> list[ParityReport]:
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
        source=model,
        demo=demo,
        labels=[id2label[i] for i in range(len(id2label))],
        nsfw_label=label,
        nsfw_index=matches[0],
        opset=OPSET,
    )
    output = Path(output)
    fp32 = output / "model.onnx"
    export_onnx(classifier, spec, fp32)
    files = [(fp32, "fp32")]
    if int8:
        config = classifier.config
        quantize_int8(
            fp32, output / "model.int8.onnx", config.num_attention_heads, config.hidden_size
        )
        files.append((output / "model.int8.onnx", "int8"))

    images = list(images) if images is not None else sample_images()
    preprocess = load_preprocess_module(output)
    reference = reference_scores(model_dir, images, id2label[matches[0]])
    reports = []
    for path, precision in files:
        diff = float(np.abs(onnx_scores(path, spec, images, preprocess) - reference).max())
        reports.append(ParityReport(path.name, precision, diff, len(images)))
        print(f"parity {precision} {path.name}: max |Δ score| = {diff:.3g} over {len(images)} images")
    spec["variants"] = {
        r.file: {"precision": r.precision, "parity_max_abs_diff": r.max_abs_diff} for r in reports
    }
    # What `onnx_file: auto` serves: the fastest file whose scores stay close enough.
    faithful = [r for r in reports[1:] if r.max_abs_diff <= FAST_TOLERANCE]
    spec["serve"] = faithful[0].file if faithful else reports[0].file
    print(f"serving {spec['serve']} by default")
    (output / "nsfw.json").write_text(json.dumps(spec, indent=2) + "\n")
    if reports[0].max_abs_diff > tolerance:
        raise ExportError(
            f"fp32 parity {reports[0].max_abs_diff:.3g} exceeds the tolerance {tolerance:g}"
        )
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export an NSFW classifier to ONNX.")
    parser.add_argument("--model", required=True, help="hub id (from the HF cache) or a directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--int8", action="store_true", help="also write dynamic int8 model")
    parser.add_argument("--images", type=Path, help="folder of .jpg/.png for the parity check")
    parser.add_argument("--tolerance", type=float, default=FP32_TOLERANCE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export(
            args.model,
            args.output,
            int8=args.int8,
            images=load_images(args.images) if args.images else None,
            tolerance=args.tolerance,
        )
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
