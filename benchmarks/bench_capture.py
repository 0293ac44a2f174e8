"""Capture overhead on a full-size SD1.5-shaped UNet with random weights (compute cost does not
depend on weight values).

Prints, from one run: plain UNet forward time (diffusers' default SDPA attention), the same forward
with DiffSeg capture on all 16 self-attention layers, their ratio, and the peak extra memory of
the capture over the plain forward (process max-RSS delta; the plain forward runs first so its
own peak is already counted).

    python benchmarks/bench_capture.py --sizes 256 512 --repeats 2
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from emergent_seg.core.backend import Conditioning
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.capture import capture_attention


def sd15_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(
        str(Path(__file__).resolve().parents[1] / "core" / "configs" / "sd15" / "unet"))
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).eval()


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    unet = sd15_unet()
    cond = Conditioning(torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)))
    backend = DiffusersBackend(unet, encode_prompt=lambda p: cond)
    backend.latent_scale = 8  # SD's VAE factor; the benchmark feeds latents directly
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, UNet "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters (random weights)")
    for size in args.sizes:
        latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300])
        plain_times, capture_times = [], []
        backend.predict_noise(latent, t, cond)  # warm-up
        rss_plain = max_rss_mb()
        for _ in range(args.repeats):
            start = time.perf_counter()
            backend.predict_noise(latent, t, cond)
            plain_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            cap = capture_attention(backend, latent, cond)
            capture_times.append(time.perf_counter() - start)
            del cap
        rss_capture = max_rss_mb()
        plain, captured = min(plain_times), min(capture_times)
        agg_mb = (size // 8) ** 4 * 4 / 2**20
        print(f"{size}px: plain forward {plain:.2f}s, capture forward {captured:.2f}s, "
              f"overhead ratio {captured / plain:.3f}x; peak extra memory {rss_capture - rss_plain:.0f} MB "
              f"(of which the returned aggregate {agg_mb:.0f} MB)")


if __name__ == "__main__":
    main()
