"""NSFW step: every exported variant inside Triton against transformers' pipeline and the floor.

    python -m benchmarks.nsfw [--runs 30] [--smoke]

The classifier has Falconsai/nsfw_image_detection's exact shape (ViT-B/16, 224x224, labels
normal/nsfw) with random weights, since the real ones cannot be fetched here; --smoke uses the
small demo classifier instead. It is exported by export.nsfw (fp32 and every faster variant,
parity measured on photographs), each variant is served by a real Triton as its own model, and
each one's per-request compute is read from Triton's own statistics (compute_input +
compute_infer + compute_output of one request at a time). The reference,
`pipeline("image-classification")` on the same weights, runs interleaved with the Triton
requests so that machine noise falls on all sides alike. Before them, benchmarks.ceiling
measures this CPU's best int8 matrix-product rate over the runtimes the variants use, and the
floor it puts under any variant; `nsfw_floor_ratio` is the served variant's p50 over that floor.
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
from export.nsfw import FAST_TOLERANCE, FORMAT, export, variant_model_name
from export.quiet import quiet_libraries

BENCH_DIR = PROJECT_ROOT / "models" / "bench"
IMAGE_SIZE = (1024, 512)  # height, width: the spec's default request


def prepare(smoke: bool) -> tuple[Path, Path]:
    """The classifier folder and its exported folder (built once, then reused)."""
    if smoke:
        source = DEMO_DIR / "nsfw"
    else:
        source = BENCH_DIR / "vit-b16"
        if not source.exists():
            build_vit_classifier(source, shape="vit-b16")
    exported = BENCH_DIR / f"{source.name}-onnx"
    spec_file = exported / "nsfw.json"
    if not spec_file.exists() or json.loads(spec_file.read_text()).get("format") != FORMAT:
        export(str(source), exported, int8=True)
    return source, exported


def served_file(exported: Path) -> Path:
    """The variant the exporter chose to serve (nsfw.json "serve"); benchmarks.service runs it."""
    return exported / json.loads((exported / "nsfw.json").read_text())["serve"]


def repository(exported: Path, workdir: Path) -> Path:
    """A repository with one nsfw model per exported variant, each pinned to its file."""
    repo = workdir / "repository"
    variants = json.loads((exported / "nsfw.json").read_text())["variants"]
    for file, info in variants.items():
        name = variant_model_name(info["kind"])
        shutil.copytree(DEFAULT_REPOSITORY / "nsfw", repo / name)
        config = (repo / name / "config.pbtxt").read_text()
        config = config.replace('name: "nsfw"', f'name: "{name}"')
        config = config.replace('string_value: "auto"', f'string_value: "{exported / file}"')
        (repo / name / "config.pbtxt").write_text(config)
    return repo


def compute_stats(client: Any, model: str) -> tuple[int, int]:
    """(requests recorded, their compute ns) from Triton's statistics of `model`."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    infer = stats["inference_stats"]
    compute = sum(
        int(infer[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output")
    )
    return int(infer["success"].get("count", 0)), compute


def compute_seconds(client: Any, model: str, inputs: list[Any]) -> float:
    """One request's compute time. Triton records statistics after it answers, so the reading
    waits until this request is counted; an early read would give 0 and the next one twice."""
    count, before = compute_stats(client, model)
    status = client.infer(model, inputs).as_numpy("NSFW_STATUS")[0, 0].decode()
    if status != "ok":  # a fail-safe answer's time is not the model's
        raise RuntimeError(f"{model} answered {status}; see Triton's log")
    deadline = time.monotonic() + 10
    while (latest := compute_stats(client, model))[0] <= count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Triton never counted the request to {model}")
        time.sleep(0.001)
    return (latest[1] - before) / 1e9


@quiet_libraries()
def run(runs: int, smoke: bool) -> dict[str, float]:
    import tritonclient.grpc as grpcclient
    from PIL import Image
    from transformers import pipeline

    source, exported = prepare(smoke)
    # First, while no torch thread pool is awake in this process to compete for the cores.
    shape = ceiling.VitShape.from_config(source / "config.json")
    # Many runs: the best one is the rate, and on a shared machine a quiet moment must come.
    best = ceiling.measure(shape, runs=5 if smoke else 200)
    spec = json.loads((exported / "nsfw.json").read_text())
    served = spec["variants"][spec["serve"]]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    classifier = pipeline("image-classification", model=str(source), device=-1)
    pil = Image.fromarray(image)

    floor_runtime = best.best("int8").runtime
    with tempfile.TemporaryDirectory() as tmp, ceiling.int8_probe(shape, floor_runtime) as probe:
        workdir = Path(tmp)
        repo = repository(exported, workdir)
        models = sorted(p.name for p in repo.iterdir())
        server = TritonServer.on_free_ports(repo, workdir / "triton")
        try:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            inputs = [grpcclient.InferInput("IMAGE", [1, *image.shape], "UINT8")]
            inputs[0].set_data_from_numpy(image[None])
            timings = {name: Timings() for name in ["pipeline", *models]}
            # The floor again, once per round, under the same noise as the runs beside it.
            floor_samples = Timings()
            for model in models:  # warm-up
                compute_seconds(client, model, inputs)
            for _ in range(3):
                classifier(pil, top_k=None)
            for _ in range(runs):
                floor_samples.add(probe() / 1000)
                started = time.perf_counter()
                classifier(pil, top_k=None)
                timings["pipeline"].add(time.perf_counter() - started)
                for model in models:
                    timings[model].add(compute_seconds(client, model, inputs))
            client.close()
        finally:
            server.stop()

    # The floor is a best: of the runs before the rounds and of every round's burst.
    floor = min(best.int8_floor_ms, min(floor_samples.seconds) * 1000)

    def best_ms(name: str) -> float:
        return min(timings[name].seconds) * 1000

    rows = [("pipeline (transformers, fp32)", "", timings["pipeline"].p50_ms,
             timings["pipeline"].p90_ms, best_ms("pipeline"), "", "")]
    by_kind = {info["kind"]: (file, info) for file, info in spec["variants"].items()}
    for kind, (file, info) in sorted(by_kind.items(), key=lambda i: timings[variant_model_name(i[0])].p50_ms):
        t = timings[variant_model_name(kind)]
        mark = " (served)" if file == spec["serve"] else ""
        rows.append((kind + mark, info["runtime"], t.p50_ms, t.p90_ms, best_ms(variant_model_name(kind)),
                     f"{info['parity_max_abs_diff']:.3g}", f"{t.p50_ms / floor:.2f}"))
    print(f"NSFW step, one {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} image, {runs} interleaved runs "
          f"({source.name}; Triton: per-request compute from its statistics, preprocessing "
          f"included)")
    print_table(["variant", "runtime", "p50 ms", "p90 ms", "best ms", "parity", "p50/floor"], rows)
    counts = ", ".join(f"{count} {name}" for name, count in spec["parity_images"].items()
                       if isinstance(count, int))
    print(f"parity: max |Δ score| against the pipeline on {counts}")
    print(f"served by default: {spec['serve']} ({served['kind']}): {spec['serve_reason']}")
    faithful = [k for k, (_, info) in by_kind.items()
                if info["parity_max_abs_diff"] <= FAST_TOLERANCE or info["precision"] == "fp32"]
    fastest = min(faithful, key=lambda k: timings[variant_model_name(k)].p50_ms)
    print(f"fastest variant within parity in this run: {fastest}"
          + ("" if fastest == served["kind"] else f" (not the served {served['kind']})"))
    print(ceiling.describe(shape, best))
    p50 = timings[variant_model_name(served["kind"])].p50_ms
    print(f"the int8 MLP ({floor_runtime}) again every round beside the runs, best of a short "
          f"burst, as the model's floor: p50 {floor_samples.p50_ms:.3g} ms, "
          f"best {min(floor_samples.seconds) * 1000:.3g} ms")
    print(f"int8 floor: {floor:.3g} ms ({floor_runtime}), the best of all the floor's runs")
    print(f"served {served['kind']}: p50 {p50:.1f} ms, {p50 / floor:.2f}x the int8 floor; "
          f"its best run {best_ms(variant_model_name(served['kind'])) / floor:.2f}x; its p50 over the "
          f"floor's p50 beside it {p50 / floor_samples.p50_ms:.2f}x (both under the same noise)")
    return {
        "nsfw_speedup_vs_pipeline": timings["pipeline"].p50_ms / p50,
        "nsfw_p50_ms": p50,
        "nsfw_floor_ratio": p50 / floor,
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
