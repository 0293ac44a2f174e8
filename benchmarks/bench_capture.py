"""Capture overhead on full-size SD1.5- and SDXL-shaped UNets with random weights (compute cost
does not depend on weight values).

Prints, from one run and per size: the plain UNet forward (diffusers' default SDPA attention),
the DiffSeg capture pass (every self-attention layer folded into the aggregate), the previous
capture formulation (all heads of a query chunk, then a head-sum pass) for comparison, their
ratios to the plain forward, the peak extra memory of the capture, and the machine load. With
``--profile`` it also breaks the capture's extra time down by attention resolution: the host's
fused attention, the explicit attention with the head mean, and the fold of coarse levels.

    python benchmarks/bench_capture.py --model sd15 --variant capture     # 11 pairs at 512 px
    python benchmarks/bench_capture.py --model sdxl --variant capture     # 3 pairs at 1024 px
    python benchmarks/bench_capture.py --model sdxl --repeats 1 --profile
"""
from __future__ import annotations

import argparse
import os
import resource
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from emergent_seg.core import capture as capture_module
from emergent_seg.core.attention import explicit_attention, merge_heads, split_heads
from emergent_seg.core.backend import Conditioning, PassHooks
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.capture import capture_attention

SD15_UNET = Path(__file__).resolve().parents[1] / "core" / "configs" / "sd15" / "unet"
# SDXL base UNet: no attention at 128x128, 2 transformer layers per block at 64x64, 10 at 32x32.
SDXL_OVERRIDES = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)


def build_backend(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32
                  ) -> tuple[DiffusersBackend, Conditioning]:
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(str(SD15_UNET)))
    g = torch.Generator().manual_seed(1)
    if model == "sdxl":
        config.update(SDXL_OVERRIDES)
        cond = Conditioning(torch.randn(1, 77, 2048, generator=g), extra={"text_embeds": torch.randn(1, 1280, generator=g)})
    else:
        cond = Conditioning(torch.randn(1, 77, 768, generator=g))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval().to(device, dtype)
    cond = Conditioning(cond.context.to(device, dtype), extra={k: v.to(device, dtype) for k, v in cond.extra.items()})
    backend = DiffusersBackend(unet, encode_prompt=lambda p: cond)
    backend.latent_scale = 8  # SD's VAE factor; the benchmark feeds latents directly
    return backend, cond


def previous_head_mean(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, target: torch.Tensor,
                       weight: float = 1.0, budget_bytes: int = capture_module.DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """The capture's attention before the per-head formulation: every head of a query chunk at
    once (``budget_bytes`` for all of them), summed over heads into a scratch, then added."""
    def fold(start: int, probs: torch.Tensor) -> None:
        target[:, start:start + probs.shape[2]].add_(probs.sum(dim=1), alpha=weight / heads)
    return explicit_attention(q, k, v, heads, on_chunk=fold, budget_bytes=budget_bytes)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds spent per (label, stride), summed over a pass."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[tuple[str, int], list[float]] = {}
        self.device = device

    def wrap(self, label: str, fn: Callable, stride_of: Callable) -> Callable:
        def timed(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(self.device)
            self.seconds.setdefault((label, stride_of(*args)), []).append(time.perf_counter() - start)
            return out
        return timed


def sdpa(site, q, k, v):
    h = site.heads
    return merge_heads(F.scaled_dot_product_attention(split_heads(q, h), split_heads(k, h), split_heads(v, h)))


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 2 ms from /proc (large
    tensors are mmap-backed, so memory freed by an earlier pass does not hide a later peak).
    On a GPU: the peak of allocated GPU memory above the level at entry."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_size(backend: DiffusersBackend, cond: Conditioning, size: int, repeats: int, profile: bool,
             variant: str = "both") -> None:
    device, dtype = backend.device, backend.dtype
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = torch.tensor([300], device=device)
    self_sites = [s for s in backend.sites() if s.kind == "self"]
    backend.predict_noise(latent, t, cond)  # warm-up
    rss_plain = max_rss_mb()
    current = capture_module.attention_with_head_mean
    times: dict[str, list[float]] = {"plain": [], "capture": [], "previous": []}
    peaks: dict[str, float] = {"plain": 0.0, "capture": 0.0, "previous": 0.0}

    def timed(label: str, fn: Callable[[], object]) -> None:
        with PeakMemory(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            times[label].append(time.perf_counter() - start)
            del result
        peaks[label] = max(peaks[label], memory.extra_mb)

    for _ in range(repeats):
        timed("plain", lambda: backend.predict_noise(latent, t, cond))
        if variant in ("both", "capture"):
            timed("capture", lambda: capture_attention(backend, latent, cond))
        if variant in ("both", "previous"):
            capture_module.attention_with_head_mean = previous_head_mean
            try:
                timed("previous", lambda: capture_attention(backend, latent, cond))
            finally:
                capture_module.attention_with_head_mean = current
    if repeats > 1:
        # plain and capture alternate, so each pair shares the machine's state of the moment
        ratios = sorted(c / p for c, p in zip(times["capture" if variant != "previous" else "previous"],
                                               times["plain"]))
        print(f"{size}px: per-repeat ratios {', '.join(f'{r:.3f}' for r in ratios)}; median "
              f"{ratios[len(ratios) // 2]:.3f}x", flush=True)
    label = "previous" if variant == "previous" else "capture"
    print(f"{size}px: per image, median of {repeats}: plain forward {1000 * sorted(times['plain'])[repeats // 2]:.1f} ms, "
          f"{label} {1000 * sorted(times[label])[repeats // 2]:.1f} ms", flush=True)
    if variant != "both":
        # one capture variant per process: the process's own peak is a clean measure of its memory
        above = (max_rss_mb() - rss_plain if device.type != "cuda" else (peaks[label] - peaks["plain"]))
        print(f"{size}px: plain forward {min(times['plain']):.2f}s | {label} {min(times[label]):.2f}s = "
              f"{min(times[label]) / min(times['plain']):.3f}x | {'process' if device.type != 'cuda' else 'GPU'} "
              f"peak above the plain forward's: {above:.0f} MB", flush=True)
        return
    plain, captured, previous = (min(times[k]) for k in ("plain", "capture", "previous"))
    top_h, top_w = min(self_sites, key=lambda s: s.stride).grid(tuple(latent.shape[-2:]))
    agg_mb = (top_h * top_w) ** 2 * 4 / 2**20
    print(f"{size}px: plain forward {plain:.2f}s | capture {captured:.2f}s = {captured / plain:.3f}x | "
          f"previous capture {previous:.2f}s = {previous / plain:.3f}x", flush=True)
    print(f"  peak memory above the start of the pass: plain {peaks['plain']:.0f} MB, capture "
          f"{peaks['capture']:.0f} MB, previous capture {peaks['previous']:.0f} MB (the returned "
          f"aggregate is {agg_mb:.0f} MB)", flush=True)
    if profile:
        print_profile(backend, cond, latent, t, self_sites, current)


def print_profile(backend, cond, latent, t, self_sites, current) -> None:
    """Per resolution: the host's attention, the capture's attention (current and previous), the
    coarse-level fold; each summed over the layers of that resolution in one pass."""
    timer = Timer(latent.device)
    backend.predict_noise(latent, t, cond, PassHooks({s.key: timer.wrap("sdpa", sdpa, lambda site, *a: site.stride)
                                                      for s in self_sites}))
    stride_of_hw = {}
    for s in self_sites:
        stride_of_hw[s.grid(tuple(latent.shape[-2:]))[0] * s.grid(tuple(latent.shape[-2:]))[1]] = s.stride
    fold = capture_module._fold_level
    try:
        for label, fn in (("capture", current), ("previous", previous_head_mean)):
            capture_module.attention_with_head_mean = timer.wrap(label, fn, lambda q, *a: stride_of_hw.get(q.shape[1], 0))
            capture_module._fold_level = timer.wrap(f"fold ({label})", fold, lambda *a: 0)
            capture_attention(backend, latent, cond)
    finally:
        capture_module.attention_with_head_mean, capture_module._fold_level = current, fold
    grids = {s.stride: s.grid(tuple(latent.shape[-2:])) for s in self_sites}
    for stride in sorted(grids):
        host = sum(timer.seconds.get(("sdpa", stride), [0.0]))
        n = len(timer.seconds.get(("sdpa", stride), []))
        cur = sum(timer.seconds.get(("capture", stride), [0.0]))
        prev = sum(timer.seconds.get(("previous", stride), [0.0]))
        gh, gw = grids[stride]
        print(f"  {gh}x{gw} ({gh * gw} tokens) x{n} layers: host SDPA {host:.2f}s, capture attention "
              f"{cur:.2f}s (+{cur - host:.2f}s), previous {prev:.2f}s (+{prev - host:.2f}s)")
    for label in ("capture", "previous"):
        print(f"  fold of coarse levels into the aggregate ({label}): "
              f"{sum(timer.seconds.get((f'fold ({label})', 0), [0.0])):.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15",
                        help="UNet shape: SD1.5 (860 M parameters) or SDXL base (2.57 B)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="image sides in pixels (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed plain/capture pairs per size (default 11 for sd15, 3 for sdxl); the median "
                             "of the per-pair ratios is the figure to quote, the minimum times are printed too")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="UNet weights and activations (the capture computes probabilities in float32)")
    parser.add_argument("--profile", action="store_true", help="also print the per-resolution breakdown")
    parser.add_argument("--variant", choices=["both", "capture", "previous"], default="both",
                        help="run one capture formulation only, and report this process's peak memory above "
                             "the plain forward's (run once per variant for a clean memory comparison)")
    args = parser.parse_args()
    sizes = args.sizes or ([1024] if args.model == "sdxl" else [512])
    repeats = args.repeats or (3 if args.model == "sdxl" else 11)
    backend, cond = build_backend(args.model, args.device, getattr(torch, args.dtype))
    where = (torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {args.model} UNet "
          f"{sum(p.numel() for p in backend.unet.parameters()) / 1e6:.0f} M parameters (random weights), "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    for size in sizes:
        run_size(backend, cond, size, repeats, args.profile and args.variant == "both", args.variant)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
