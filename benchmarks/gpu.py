"""What batching buys on a GPU: Stable Diffusion 1.5's UNet and ViT-B/16 in fp16, random weights.

    python benchmarks/gpu.py [--device cuda] [--runs 20]
    python benchmarks/gpu.py --device cpu      # tiny shapes, fp32: proves the script runs

Self-contained, for a GPU machine with torch (CUDA) and transformers but no network, no Triton
and none of this project installed: it needs only torch, transformers and diffusers. Carry
diffusers' wheel (pure Python) and install it with `pip install --no-deps`; diffusers also
imports `requests` (with urllib3, idna, certifi, charset-normalizer) and Pillow, so carry the
wheels of whichever of those the machine lacks (checked in a virtualenv holding only torch,
transformers and these).

- UNet: diffusers' UNet2DConditionModel with SD 1.5's config values (860M parameters), one
  denoising step at 512x1024 (a 64x128 latent) for 1, 2, 4 and 8 images, each image twice
  (classifier-free guidance: the UNet sees 2, 4, 8, 16); the time per step and per image-step.
- ViT-B/16 (Falconsai/nsfw_image_detection's shape, 224x224, two labels): time per image at
  batch 1 and 8.

Times are CUDA-event medians after warm-up. The last lines are `name: value` summary lines.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json); the values
# diffusers' UNet2DConditionModel defaults to are repeated so that the shape reads in one place.
# benchmarks.batching builds its SD-shaped pipeline from this too.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
             "norm_num_groups": 8, "cross_attention_dim": 32}
VIT_B16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "image_size": 224, "patch_size": 16}
TINY_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 16}
BATCHES = (1, 2, 4, 8)
TOKENS = 77  # CLIP's prompt length


def timed_ms(step: Callable[[], object], device: torch.device, runs: int, warmup: int = 3) -> float:
    """Median milliseconds of `step`, with CUDA events on a GPU and a wall clock otherwise."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


def unet_steps(device: torch.device, dtype: torch.dtype, tiny: bool, width: int, height: int,
               runs: int) -> dict[int, float]:
    """Milliseconds of one UNet step for each number of images (guidance doubles the batch)."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise SystemExit(
            f"cannot import diffusers ({exc}): carry its wheel and those of requests, urllib3, "
            "idna, certifi, charset-normalizer and Pillow the machine lacks, and install them "
            "with `pip install --no-deps`"
        ) from exc

    config = TINY_UNET if tiny else SD15_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    print(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, "
          f"{width}x{height} ({width // 8}x{height // 8} latent), {dtype}", flush=True)
    times = {}
    for images in BATCHES:
        latents = torch.randn(2 * images, 4, height // 8, width // 8, device=device, dtype=dtype)
        text = torch.randn(2 * images, TOKENS, config["cross_attention_dim"], device=device,
                           dtype=dtype)
        timestep = torch.tensor(500, device=device)
        with torch.inference_mode():
            times[images] = timed_ms(functools.partial(unet, latents, timestep, text), device, runs)
        print(f"  {images} image(s): {times[images]:.1f} ms a step, "
              f"{times[images] / images:.1f} ms an image-step", flush=True)
    return times


def vit_per_image(device: torch.device, dtype: torch.dtype, tiny: bool, runs: int) -> dict[int, float]:
    from transformers import ViTConfig, ViTForImageClassification

    shape = TINY_VIT if tiny else VIT_B16
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**shape, num_labels=2)).to(device=device, dtype=dtype)
    model.eval()
    times = {}
    for batch in (1, 8):
        pixels = torch.randn(batch, 3, shape["image_size"], shape["image_size"], device=device,
                             dtype=dtype)
        with torch.inference_mode():
            step = functools.partial(model, pixel_values=pixels)
            times[batch] = timed_ms(step, device, runs) / batch
        print(f"ViT {shape['hidden_size']}x{shape['num_hidden_layers']}, batch {batch}: "
              f"{times[batch]:.2f} ms an image", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (fp16, full shapes) or cpu (tiny)")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = device.type == "cpu"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")
    else:
        print("CPU tiny mode (fp32, narrow shapes): checks the script, measures nothing useful")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    width, height = (64, 128) if tiny else (512, 1024)
    runs = min(args.runs, 3) if tiny else args.runs
    unet = unet_steps(device, dtype, tiny, width, height, runs)
    vit = vit_per_image(device, dtype, tiny, runs)
    print()
    summary = {f"gpu_unet_step_ms_b{images}": ms for images, ms in unet.items()}
    summary["gpu_unet_batch8_speedup"] = 8 * unet[1] / unet[8]
    summary["gpu_vit_ms_per_image_b1"] = vit[1]
    summary["gpu_vit_ms_per_image_b8"] = vit[8]
    for name, value in summary.items():
        print(f"{name}: {value:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
