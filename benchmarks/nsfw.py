"""NSFW step: the served ONNX variants inside Triton against transformers' pipeline.

    python -m benchmarks.nsfw [--runs 30] [--smoke]

The classifier has Falconsai/nsfw_image_detection's exact shape (ViT-B/16, 224x224, labels
normal/nsfw) with random weights, since the real ones cannot be fetched here; --smoke uses the
small demo classifier instead. It is exported by export.nsfw (fp32 + int8, parity printed),
served by a real Triton, and each variant's per-request compute is read from Triton's own
statistics (compute_input + compute_infer + compute_output of one request at a time). The
reference, `pipeline("image-classification")` on the same weights, runs interleaved with the
Triton requests so that machine noise falls on both sides alike. Before them, benchmarks.ceiling
measures this CPU's best matrix-product rate and the floor it puts under any variant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import ceiling
from benchmarks.report import Timings, print_summary, print_table
from embedded.triton import DEFAULT_REPOSITORY, PROJECT_ROOT, TritonServer
from export.demo_models import DEMO_DIR, build_vit_classifier
from export.nsfw import export, sample_images

BENCH_DIR = PROJECT_ROOT / "models" / "bench"
IMAGE_SIZE = (1024, 512)  # height, width: the spec's default request


def prepare(smoke: bool) -> tuple[Path, Path]:
    """The classifier folder and its exported ONNX folder (built once, then reused)."""
    if smoke:
        source = DEMO_DIR / "nsfw"
    else:
        source = BENCH_DIR / "vit-b16"
        if not source.exists():
            build_vit_classifier(source, shape="vit-b16")
    onnx_dir = BENCH_DIR / f"{source.name}-onnx"
    if not (onnx_dir / "nsfw.json").exists():
        # Parity on a varied set: square and not, smooth and noisy, several seeds.
        images = sample_images(seed=21) + sample_images(seed=22)
        export(str(source), onnx_dir, int8=True, images=images)
    return source, onnx_dir


def served_file(onnx_dir: Path) -> Path:
    """The variant the exporter chose to serve (nsfw.json "serve")."""
    return onnx_dir / json.loads((onnx_dir / "nsfw.json").read_text())["serve"]


def repository(onnx_dir: Path, workdir: Path) -> Path:
    """A repository with one nsfw model per exported file, each pinned to that file."""
    repo = workdir / "repository"
    variants = json.loads((onnx_dir / "nsfw.json").read_text())["variants"]
    for file, info in variants.items():
        name = f"nsfw_{info['precision']}"
        shutil.copytree(DEFAULT_REPOSITORY / "nsfw", repo / name)
        config = (repo / name / "config.pbtxt").read_text()
        config = config.replace('name: "nsfw"', f'name: "{name}"')
        config = config.replace('string_value: "auto"', f'string_value: "{onnx_dir / file}"')
        (repo / name / "config.pbtxt").write_text(config)
    return repo


def compute_ns(client: Any, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    infer = stats["inference_stats"]
    return sum(int(infer[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output"))


def run(runs: int, smoke: bool) -> dict[str, float]:
    import tritonclient.grpc as grpcclient
    from PIL import Image
    from transformers import pipeline

    source, onnx_dir = prepare(smoke)
    # First, while no torch thread pool is awake in this process to compete for the cores.
    shape = ceiling.VitShape.from_config(source / "config.json")
    best = ceiling.measure(shape, runs=5 if smoke else 50)
    spec = json.loads((onnx_dir / "nsfw.json").read_text())
    served = spec["variants"][spec["serve"]]["precision"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    classifier = pipeline("image-classification", model=str(source), device=-1)
    pil = Image.fromarray(image)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repo = repository(onnx_dir, workdir)
        models = sorted(p.name for p in repo.iterdir())
        server = TritonServer.on_free_ports(repo, workdir / "triton")
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inputs = [grpcclient.InferInput("IMAGE", [1, *image.shape], "UINT8")]
            inputs[0].set_data_from_numpy(image[None])
            timings = {name: Timings() for name in ["pipeline", *models]}
            for model in models:  # warm-up: sessions allocate their arenas on first use
                client.infer(model, inputs)
            for _ in range(3):
                classifier(pil, top_k=None)
            for _ in range(runs):
                started = time.perf_counter()
                classifier(pil, top_k=None)
                timings["pipeline"].add(time.perf_counter() - started)
                for model in models:
                    before = compute_ns(client, model)
                    client.infer(model, inputs)
                    timings[model].add((compute_ns(client, model) - before) / 1e9)
            client.close()
        finally:
            server.stop()

    rows = [(name, t.p50_ms, t.p90_ms) for name, t in timings.items()]
    print(f"NSFW step, one {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} image, {runs} interleaved runs "
          f"({source.name}; Triton: per-request compute from its statistics)")
    print_table(["variant", "p50 ms", "p90 ms"], rows)
    for file, info in spec["variants"].items():
        print(f"parity {info['precision']} ({file}): max |Δ score| = {info['parity_max_abs_diff']:.3g}")
    print(f"served by default: {spec['serve']} ({served})")
    p50 = timings[f"nsfw_{served}"].p50_ms
    print(ceiling.describe(shape, best))
    print(f"served {served}: p50 {p50:.1f} ms, {p50 / best.int8_floor_ms:.2f}x the int8 floor")
    return {
        "nsfw_speedup_vs_pipeline": timings["pipeline"].p50_ms / p50,
        "nsfw_p50_ms": p50,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="the small demo classifier, 3 runs")
    args = parser.parse_args(argv)
    print_summary(run(3 if args.smoke else args.runs, args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
