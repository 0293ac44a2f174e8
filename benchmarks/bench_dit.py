"""Capture overhead on DiT hosts (Flux, SD3/SD3.5) through the real ComfyUI host: models built
from ComfyUI's own classes at full width with random weights (compute cost does not depend on
weight values), at reduced depth on CPU (full depth on CUDA, or with ``--full-depth``).

Prints, from one run and per size: the plain forward (``BaseModel.apply_model`` on the user's
unpatched ModelPatcher: ComfyUI's own attention, no hooks) and the DiffSeg capture pass
(``nodes.comfy_backend.capture_dit_attention``: the clone, the block tag patches, the attention
override, the aggregate), both on the same noisy latent, sigma and conditioning. Plain and
capture passes alternate (plain, capture, plain, capture, ...) so each pair shares the machine's
state of the moment; the per-repeat ratios and their median are printed, with the machine load
at start and end. Every block of the (reduced) model is captured unless ``--blocks`` says
otherwise: the worst case, since the node lets users pick fewer.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
the allocation at the start of the pass. On CPU a thread samples the process RSS
(/proc/self/statm) every 5 ms during the pass, after freed heap pages are handed back to the OS
(glibc ``malloc_trim``); the pass reports its peak minus the RSS just before it (VmHWM and
ru_maxrss cannot be reset between passes). The capture's extra memory is its peak minus the
plain forward's.

    PYTHONPATH=/path/to/ComfyUI python benchmarks/bench_dit.py --family flux --sizes 512 --repeats 1
    PYTHONPATH=/path/to/ComfyUI python benchmarks/bench_dit.py --family sd3 --sizes 512 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

# Full-size layouts as ComfyUI's model_detection reads them from the real checkpoints.
# Flux.1: hidden 3072, 24 heads, T5-XXL context 4096, CLIP-L pooled 768, 19 double + 38 single blocks.
FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "axes_dim": [16, 56, 56],
        "theta": 10000, "qkv_bias": True}
FLUX_DEPTH = (19, 38)
# SD3 medium: depth 24 -> hidden 64*24 = 1536, 24 heads; pooled CLIP-L+G 2048; T5/CLIP context 4096 -> 1536.
# SD3.5 medium adds RMS q/k norms, the extra image-only attention in blocks 0-12, and a 384x384 pos_embed.
SD3_DEPTH = 24
SD3 = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": SD3_DEPTH, "input_size": None,
       "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}}
SD3_VARIANTS = {"sd3": {"pos_embed_max_size": 192, "qk_norm": None, "x_block_self_attn_layers": []},
                "sd3.5-medium": {"pos_embed_max_size": 384, "qk_norm": "rms",
                                 "x_block_self_attn_layers": list(range(13))}}
# Text tokens of one prompt as ComfyUI's tokenizers pad it: Flux T5 min_length 256
# (comfy/text_encoders/flux.py), SD3 CLIP 77 + T5 77 concatenated.
TEXT_TOKENS = {"flux": 256, "flux-schnell": 256, "sd3": 154, "sd3.5-medium": 154}
REDUCED = {"double": 1, "single": 1, "depth": 2}
SIGMA = 0.6


def import_comfy(device: str) -> None:
    """Import the host (a ComfyUI checkout on ``PYTHONPATH``) and choose its device before
    ``comfy.model_management`` probes one."""
    import importlib.util

    try:
        found = importlib.util.find_spec("comfy.cli_args") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        sys.exit("ComfyUI is not importable; run with PYTHONPATH=/path/to/ComfyUI")
    import comfy.cli_args
    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management  # after args.cpu: no CUDA probe on CPU


def init_weights(net: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds with ``disable_weight_init`` ops (uninitialised memory): give every
    parameter and floating buffer finite values, normal(0, 0.02), norm scales 1, biases 0."""
    g = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if not p.is_floating_point():
                    continue
                if is_norm or name == "scale":      # Flux RMSNorm.scale, SD3 ln_q/ln_k RMSNorm.weight
                    p.fill_(1.0 if name in ("weight", "scale") else 0.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=g)


def build_model(family: str, double: int, single: int, depth: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[Any, str]:
    """A ModelPatcher around ComfyUI's Flux or SD3 BaseModel, weights built on ``device``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    if family.startswith("flux"):
        schnell = family == "flux-schnell"
        cls = comfy.supported_models.FluxSchnell if schnell else comfy.supported_models.Flux
        config = cls(dict(FLUX, guidance_embed=not schnell, depth=double, depth_single_blocks=single))
        shape = (f"{'Flux.1-schnell' if schnell else 'Flux.1-dev'} hidden 3072, 24 heads, "
                 f"{double}/{FLUX_DEPTH[0]} double + {single}/{FLUX_DEPTH[1]} single blocks")
    else:
        variant = SD3_VARIANTS[family]
        layers = [i for i in variant["x_block_self_attn_layers"] if i < depth]
        # num_blocks: fewer joint blocks at full width (hidden = 64 * depth stays 1536)
        config = comfy.supported_models.SD3({**SD3, **variant, "x_block_self_attn_layers": layers,
                                             "num_blocks": depth, "num_patches": variant["pos_embed_max_size"] ** 2})
        shape = (f"{'SD3.5-medium' if family == 'sd3.5-medium' else 'SD3-medium'} hidden 1536, 24 heads, "
                 f"{depth}/{SD3_DEPTH} joint blocks" + (f" ({len(layers)} with the image-only attention)"
                                                        if layers else ""))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    init_weights(base.diffusion_model, seed)
    base.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    return patcher, f"{shape}, {params / 1e6:.0f} M parameters (random weights)"


def conditioning(family: str, text: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    if family.startswith("flux"):
        kwargs = {"c_crossattn": torch.randn(1, text, 4096, generator=g), "y": torch.randn(1, 768, generator=g)}
        if family == "flux":
            kwargs["guidance"] = torch.full((1,), 3.5)
    else:
        kwargs = {"c_crossattn": torch.randn(1, text, 4096, generator=g), "y": torch.randn(1, 2048, generator=g)}
    return {k: v.to(device) for k, v in kwargs.items()}


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so a pass's RSS baseline
    does not include memory an earlier pass freed but kept resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a ``with`` block above the level at its start: CUDA allocator peak, or
    the process RSS sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = self.peak = 0

    def __enter__(self) -> PeakMemory:  # noqa: PYI034
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = self.peak = torch.cuda.memory_allocated()
            return self
        release_free_memory()
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_size(model: Any, family: str, blocks: list[str], size: int, text: int, repeats: int, warmup: int,
             budget_bytes: int | None, device: torch.device) -> None:
    import comfy.model_management as mm
    from emergent_seg.nodes.comfy_backend import capture_dit_attention

    latent_side = size // 8
    grid = latent_side // int(model.model.diffusion_model.patch_size)
    latents = torch.randn(1, 16, latent_side, latent_side, generator=torch.Generator().manual_seed(0))
    kwargs = conditioning(family, text, device)
    mm.load_models_gpu([model])
    # the capture's own input: the same noise (seed 0), sigma and model_sampling.noise_scaling
    s = torch.full((1,), SIGMA, device=device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device)
    x = model.get_model_object("model_sampling").noise_scaling(s.view(-1, 1, 1, 1), noise,
                                                               latents.to(device, torch.float32))
    finite: list[bool] = []

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return model.model.apply_model(x, s, transformer_options=dict(
                model.model_options.get("transformer_options", {})), **kwargs)

    def capture() -> Any:
        return capture_dit_attention(model, latents, kwargs, SIGMA, blocks, (size, size), seed=0,
                                     budget_bytes=budget_bytes)

    times: dict[str, list[float]] = {"plain": [], "capture": []}
    peaks: dict[str, list[float]] = {"plain": [], "capture": []}

    def timed(label: str, fn: Callable[[], Any]) -> None:
        with PeakMemory(device) as memory:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
            del result
        peaks[label].append(memory.extra_mb)

    for _ in range(warmup):
        finite.append(bool(torch.isfinite(plain()).all()))
        capture()
    for _ in range(repeats):
        timed("plain", plain)
        timed("capture", capture)
    if not finite:
        finite.append(bool(torch.isfinite(plain()).all()))

    n = grid * grid
    ratios = [c / p for c, p in zip(times["capture"], times["plain"], strict=True)]
    print(f"{size}px: latent {latent_side}x{latent_side}, {grid}x{grid} = {n} image tokens + {text} text tokens; "
          f"prediction finite: {'yes' if all(finite) else 'NO (random weights overflowed)'}", flush=True)
    pairs = zip(times["plain"], times["capture"], strict=True)
    print(f"  per-repeat (plain, capture) seconds: {', '.join(f'({p:.2f}, {c:.2f})' for p, c in pairs)}",
          flush=True)
    print(f"  per-repeat ratios {', '.join(f'{r:.3f}' for r in sorted(ratios))}; median "
          f"{statistics.median(ratios):.3f}x", flush=True)
    plain_s, capture_s = min(times["plain"]), min(times["capture"])
    print(f"  plain forward {plain_s:.2f}s | capture {capture_s:.2f}s = {capture_s / plain_s:.3f}x (fastest of "
          f"{repeats})", flush=True)
    p_mb, c_mb = max(peaks["plain"]), max(peaks["capture"])
    print(f"  peak memory above the start of the pass: plain {p_mb:.0f} MB, capture {c_mb:.0f} MB -> capture "
          f"extra {c_mb - p_mb:+.0f} MB (the returned aggregate is {n * n * 4 / 2**20:.1f} MB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(TEXT_TOKENS), default="flux",
                        help="host model: Flux.1-dev (guidance embedding), Flux.1-schnell, SD3-medium, SD3.5-medium")
    parser.add_argument("--sizes", "--size", type=int, nargs="+", default=[512, 1024],
                        help="image sides in pixels, multiples of 16 (default: 512 1024)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved (plain, capture) pairs per size (default 3; the median ratio is printed)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed (plain, capture) pairs per size first (default 1: first-call setup is not timed)")
    parser.add_argument("--double", type=int, default=None,
                        help=f"Flux double blocks (default: {REDUCED['double']} on CPU, {FLUX_DEPTH[0]} on CUDA)")
    parser.add_argument("--single", type=int, default=None,
                        help=f"Flux single blocks (default: {REDUCED['single']} on CPU, {FLUX_DEPTH[1]} on CUDA)")
    parser.add_argument("--depth", type=int, default=None,
                        help=f"SD3 joint blocks at full width (default: {REDUCED['depth']} on CPU, "
                             f"{SD3_DEPTH} on CUDA)")
    parser.add_argument("--full-depth", action="store_true", help="the real depth (Flux 19 + 38, SD3 24) anywhere")
    parser.add_argument("--blocks", nargs="+", default=["all"],
                        help="blocks to capture, names as dit_blocks gives them (double_block.0, single_block.3, "
                             "...), or 'all' (default: every block of the built model, the worst case)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text sequence length (default: ComfyUI's padding of a short prompt, Flux 256, SD3 154)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weight/compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--budget-mb", type=int, default=None,
                        help="the capture's chunk budget (default: the shipped DEFAULT_CHUNK_BYTES)")
    args = parser.parse_args()

    device_name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    import_comfy(device_name)
    from emergent_seg.nodes.comfy_backend import dit_blocks

    device = torch.device(device_name)
    full = args.full_depth or device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    double = args.double if args.double is not None else (FLUX_DEPTH[0] if full else REDUCED["double"])
    single = args.single if args.single is not None else (FLUX_DEPTH[1] if full else REDUCED["single"])
    depth = args.depth if args.depth is not None else (SD3_DEPTH if full else REDUCED["depth"])
    warmup = args.warmup if args.warmup is not None else 1
    text = args.text_tokens or TEXT_TOKENS[args.family]
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at start, {os.cpu_count()} cores",
          flush=True)
    started = time.perf_counter()
    model, shape = build_model(args.family, double, single, depth, dtype, device)
    available = dit_blocks(model)
    blocks = available if args.blocks == ["all"] else args.blocks
    device_text = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {device_text}, {str(dtype).replace('torch.', '')}; {shape}; built in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    print(f"capturing {len(blocks)} of {len(available)} blocks"
          f"{' (all: the worst case)' if blocks == available else ': ' + ' '.join(blocks)}; sigma {SIGMA}; "
          f"{args.repeats} interleaved (plain, capture) pairs per size after {warmup} untimed; peak memory: "
          + ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocation at the pass start"
             if device.type == "cuda" else
             "process RSS (/proc/self/statm) sampled every 5 ms after malloc_trim, minus the RSS at the pass start"),
          flush=True)
    budget = args.budget_mb * 2**20 if args.budget_mb else None
    for size in args.sizes:
        run_size(model, args.family, blocks, size, text, args.repeats, warmup, budget, device)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) at end; total "
          f"{time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
