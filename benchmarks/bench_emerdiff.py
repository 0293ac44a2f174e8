"""EmerDiff cost on CPU: a full-size SD1.5-shaped UNet and a full-size SD VAE, both with random
weights (compute cost does not depend on weight values), one image at 256 px.

What is run for real (through core.emerdiff, so the hooks, chunking and counts are the shipped
ones), and what is extrapolated, is printed next to every number:

- features + k-means (K = 20): one real run.
- one-at-a-time: ``difference_maps`` with ``max_batch = 2`` -> UNet calls ``[reference, member]``.
- batched: ``run_modulated`` chunks of 5 and 11 members (reference included) -> a linear fit
  ``t(batch) = a + c * batch`` of one UNet call, used for the 21-member chunks of K = 20.
- VAE: one decode chunk, per image.
- Paper-faithful (15 steps) = 15 x the same UNet calls (steps after the first cost the same:
  injection hooks, no modulation) -- extrapolated, not run.
- Image size: one batch-2 UNet call (the one-at-a-time unit) and one VAE decode per size.

Peak memory: before each phase freed heap pages are returned to the OS (glibc malloc_trim), then a
background thread samples the process RSS (/proc/self/statm) every 2 ms; the phase reports its
peak minus the RSS just before it (model weights are already resident, so this is the phase's
working memory). tracemalloc cannot see torch's allocator, and ru_maxrss deltas only move when a
phase beats every earlier peak.

    python benchmarks/bench_emerdiff.py            # about 8-10 minutes on 2 busy cores
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import threading
import time
from pathlib import Path

import torch
from emergent_seg.core import emerdiff as E
from emergent_seg.core.backend import Progress
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.sites import AttentionSite

CONFIGS = Path(__file__).resolve().parents[1] / "core" / "configs" / "sd15"


def smoke_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Tiny stand-ins with the same block layout, to check this script in seconds (--smoke)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
    return unet.eval(), vae.eval()


def sd15_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random-weight UNet2DConditionModel and AutoencoderKL with SD1.5's configs
    (block_out_channels 320/640/1280/1280, cross_attention_dim 768, attention_head_dim 8)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    if (CONFIGS / "unet" / "config.json").exists():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "vae")))
    else:  # the same numbers, spelled out
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
    return unet.eval(), vae.eval()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the next phase's RSS
    baseline does not include memory an earlier phase freed but kept resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, minus the RSS at its start
    (after :func:`release_free_memory`)."""

    page = os.sysconf("SC_PAGE_SIZE")

    def __init__(self) -> None:
        self.peak = self.base = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        release_free_memory()
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class Stopwatch(Progress):
    """Progress that timestamps every unit (UNet call or decode chunk)."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps = [time.perf_counter()]
        self.on_update = lambda done, total: self.stamps.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def timed(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - start
    return out, secs, mem.mib


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=E.DEFAULT_MAX_BATCH)
    parser.add_argument("--fit-batches", type=int, nargs="+", default=[5, 11])
    parser.add_argument("--sizes", type=int, nargs="*", default=[384, 512],
                        help="extra image sizes for the growth table (one batch-2 call + 1 decode)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default="")
    parser.add_argument("--smoke", action="store_true", help="tiny models, to test the script")
    return parser.parse_args()


def _build_backend(smoke: bool) -> DiffusersBackend:
    """The random-weight models (timed), described on stdout."""
    (unet, vae), t_init, _ = timed(smoke_models if smoke else sd15_models)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; random-weight "
          f"{'TINY (smoke test)' if smoke else 'SD1.5'} UNet "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params + random SD VAE "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f} M params (built in {t_init:.0f} s); "
          f"empty prompt = zeros [1, 77, {unet.config.cross_attention_dim}]")
    return DiffusersBackend(unet, vae)


def _batched_calls(backend: DiffusersBackend, latent: torch.Tensor, site: AttentionSite, masks: torch.Tensor,
                   n_ids: int, fit_batches: list[int], t_b2: float) -> tuple[dict[int, float], dict[int, float]]:
    """Step 3: real UNet calls of batch b = reference + (b-1) members (no decode). Returns the
    measured seconds per batch (``{2: t_b2}`` from step 2 included) and the peak MiB per batch."""
    x_t = E.add_noise(backend, latent, E.PAPER_T_M).to(latent.dtype)
    fit = {2: t_b2}
    mem = {}
    for b in [2, *fit_batches]:
        members = b - 1
        mm = masks[[i % n_ids for i in range(members)]]
        coeffs = torch.tensor([E.PAPER_LAMBDA * (1 if i % 2 == 0 else -1) for i in range(members)])
        _, secs, mib = timed(lambda mm=mm, coeffs=coeffs: E.run_modulated(
            backend, x_t, site, mm, coeffs, [E.PAPER_T_M]))
        mem[b] = mib
        if b == 2:  # already timed inside difference_maps; this call only measures its memory
            print(f"one-at-a-time UNet call alone (real, batch 2): {secs:.1f} s, peak +{mib:.0f} MiB")
            continue
        fit[b] = secs
        print(f"batched chunk (real): 1 UNet call of batch {b}: {secs:.1f} s "
              f"({secs / members:.2f} s per member run), peak +{mib:.0f} MiB")
    return fit, mem


class _CostModel:
    """Per-image cost from the measured calls: one UNet call of batch b takes ``fit[b]`` when
    measured, else the linear fit ``icpt + slope * b``; decodes ``t_dec`` each, plus the encode.
    ``fit`` is the caller's dict, read at every call (the feature pass is added to it later)."""

    def __init__(self, fit: dict[int, float], t_dec: float, t_enc: float) -> None:
        self.fit, self.t_dec, self.t_enc = fit, t_dec, t_enc
        xs = torch.tensor(sorted(fit), dtype=torch.float64)
        ys = torch.tensor([fit[int(b)] for b in xs], dtype=torch.float64)
        self.slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        self.icpt = float(ys.mean() - self.slope * xs.mean())

    def t_call(self, b: int) -> float:
        return self.fit.get(b, self.icpt + self.slope * b)

    def totals(self, k_: int, steps: int, max_batch: int, difference: str = "symmetric") -> dict:
        p = E.plan(k_, steps, max_batch, difference=difference, features=True)
        unet_s = self.t_call(1) if 1 in self.fit else (self.icpt + self.slope)
        unet_s += sum(self.t_call(b) for b in p["chunk_sizes"]) * p["steps"]
        return {"evaluations": p["evaluations"], "decodes": p["decodes"], "chunks": p["chunks"],
                "unet_s": unet_s, "decode_s": p["decodes"] * self.t_dec,
                "total_s": unet_s + p["decodes"] * self.t_dec + self.t_enc}


def _per_image_table(cost: _CostModel, size: int, k: int, max_batch: int) -> dict[str, dict]:
    """Step 4: the per-image totals of each setting, printed; returns them by name."""
    print(f"\nper image at {size} px, K={k}, max_batch={max_batch} "
          f"(UNet time from the fit, decodes x {cost.t_dec:.1f} s, + VAE encode):")
    rows = {}
    for name, steps, mb, diff in [("paper-faithful (15 steps)", E.PAPER_STEPS, max_batch, "symmetric"),
                                  ("fast (1 step)", E.FAST_STEPS, max_batch, "symmetric"),
                                  ("fast one-sided (1 step, K runs)", E.FAST_STEPS, max_batch, "one_sided"),
                                  ("paper, one-at-a-time", E.PAPER_STEPS, 2, "symmetric"),
                                  ("fast, one-at-a-time", E.FAST_STEPS, 2, "symmetric")]:
        r = cost.totals(k, steps, mb, diff)
        rows[name] = r
        extrap = "extrapolated" if steps == E.PAPER_STEPS or mb > max(cost.fit) else "from measured calls"
        print(f"  {name:34s} UNet evaluations {r['evaluations']:4d} | decodes {r['decodes']:2d} | "
              f"UNet {r['unet_s']:7.0f} s + decode {r['decode_s']:4.0f} s = {r['total_s']:7.0f} s "
              f"per image ({extrap})")
    return rows


def _print_ratios(rows: dict[str, dict], cost: _CostModel, max_batch: int, m_feat: float,
                  mem: dict[int, float]) -> None:
    """Step 4, continued: paper vs fast, batched vs one-at-a-time, and the working memory."""
    p, f, f1 = (rows["paper-faithful (15 steps)"], rows["fast (1 step)"],
                rows["fast one-sided (1 step, K runs)"])
    print(f"  evaluations paper / fast = {p['evaluations'] / f['evaluations']:.1f}x "
          f"(aim >= 20x; symmetric 1-step is capped at ~15x = the 15 steps); "
          f"paper / fast one-sided = {p['evaluations'] / f1['evaluations']:.1f}x")
    print(f"  wall time paper / fast = {p['total_s'] / f['total_s']:.1f}x: VAE decodes are "
          f"{100 * f['decode_s'] / f['total_s']:.0f} % of the fast setting on this CPU")
    per_member_one = cost.t_call(2)
    per_member_batched = cost.t_call(max_batch) / (max_batch - 1)
    print(f"  batched vs one-at-a-time: one member run costs {per_member_one:.2f} s alone "
          f"([ref, member]) vs {per_member_batched:.2f} s in a chunk of {max_batch} -> "
          f"{per_member_one / per_member_batched:.2f}x faster batched (UNet only; "
          f"{rows['fast, one-at-a-time']['unet_s'] / f['unet_s']:.2f}x on the fast UNet total)")
    print(f"  peak working memory (RSS sampled): features +{m_feat:.0f} MiB; UNet call of "
          + ", ".join(f"batch {b} +{mem[b]:.0f} MiB" for b in sorted(mem))
          + f"; process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _growth_with_k(cost: _CostModel, max_batch: int) -> None:
    print("\ncost vs K at this size (chunks of <= max_batch, UNet time from the fit):")
    for kk in (5, 10, 20, 30, 40):
        a, b = cost.totals(kk, E.PAPER_STEPS, max_batch), cost.totals(kk, E.FAST_STEPS, max_batch)
        sizes = E.plan(kk, E.FAST_STEPS, max_batch)["chunk_sizes"]
        print(f"  K={kk:2d}: chunks {sizes}; paper {a['evaluations']:4d} eval ~{a['total_s']:6.0f} s; "
              f"fast {b['evaluations']:3d} eval ~{b['total_s']:5.0f} s")


def _growth_with_size(backend: DiffusersBackend, sizes: list[int], t_b2: float,
                      t_dec: float) -> dict[int, tuple[float, float]]:
    """Step 5, image size: one real batch-2 UNet call and one real decode per extra size;
    returns ``{size: (call s, decode s)}`` for the extra sizes."""
    growth = {}
    for s2 in sizes:
        lat2 = torch.randn(1, 4, s2 // 8, s2 // 8, generator=torch.Generator().manual_seed(1))
        hw2 = tuple(lat2.shape[-2:])
        site2 = E.choose_site(backend, hw2)
        x2 = E.add_noise(backend, lat2, E.PAPER_T_M)
        m2 = torch.zeros(1, *site2.grid(hw2))
        m2[:, : m2.shape[1] // 2] = 1
        _, tc, mib = timed(lambda x2=x2, site2=site2, m2=m2: E.run_modulated(
            backend, x2, site2, m2, torch.tensor([10.0]), [E.PAPER_T_M]))
        _, td, _ = timed(lambda lat2=lat2: backend.decode(lat2))
        growth[s2] = (tc, td)
        print(f"  {s2}px: call {tc:6.1f} s ({tc / t_b2:.1f}x), decode {td:5.1f} s ({td / t_dec:.1f}x), "
              f"peak +{mib:.0f} MiB (site {site2.key.split('.transformer')[0]}, grid {site2.grid(hw2)})")
    return growth


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    wall0 = time.perf_counter()

    backend = _build_backend(args.smoke)
    size, k = args.size, args.k
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, size // 16, size // 16, generator=g),
                                            size=(size, size), mode="bilinear", align_corners=False)
    latent, t_enc, _ = timed(lambda: backend.encode(image))
    hw = tuple(latent.shape[-2:])
    site = E.choose_site(backend, hw)
    print(f"\nimage {size}x{size} -> latent {hw[0]}x{hw[1]}; site {site.key} "
          f"(grid {site.grid(hw)[0]}x{site.grid(hw)[1]}); VAE encode {t_enc:.1f} s")

    # 1. features + k-means (real)
    low, t_feat, m_feat = timed(lambda: E.lowres_kmeans(backend, latent, k=k))
    ids, masks = E.label_masks(low.lowres[0])
    print(f"features (1 UNet evaluation) + k-means K={k}: {t_feat:.1f} s, peak +{m_feat:.0f} MiB; "
          f"{len(ids)} non-empty masks")

    # 2. one-at-a-time: [ref, +M0], [ref, -M0] -> 2 UNet calls of batch 2, 1 decode chunk of 2
    sw = Stopwatch()
    dm1, _, m_one = timed(lambda: E.difference_maps(backend, latent, masks[:1], steps=E.FAST_STEPS,
                                                        max_batch=2, progress=sw))
    d1 = sw.durations()
    t_b2 = sum(d1[:2]) / 2
    t_dec = d1[2] / 2
    print(f"one-at-a-time (real, K=1, fast): 2 UNet calls of batch 2: {d1[0]:.1f} s, {d1[1]:.1f} s; "
          f"decode 2 images: {d1[2]:.1f} s; evaluations {dm1.evaluations}; peak +{m_one:.0f} MiB "
          f"(UNet calls and decode)")

    # 3. batched chunks (real UNet calls, no decode): batch b = reference + (b-1) members
    fit, mem = _batched_calls(backend, latent, site, masks, len(ids), args.fit_batches, t_b2)
    cost = _CostModel(fit, t_dec, t_enc)
    print(f"fit of one UNet call: t(batch) = {cost.icpt:.2f} + {cost.slope:.2f} * batch s "
          f"(batch {sorted(fit)} measured; larger batches extrapolated)")

    # 4. decode cost per image (real, from step 2) and the per-image totals
    fit[1] = t_feat  # the feature pass is a batch-1 call (k-means is negligible next to it)
    rows = _per_image_table(cost, size, k, args.max_batch)
    _print_ratios(rows, cost, args.max_batch, m_feat, mem)

    # 5. growth with K (same fit) and with image size (one batch-2 call + one decode, real)
    _growth_with_k(cost, args.max_batch)
    print("cost vs image size (one UNet call of batch 2 = one member run one-at-a-time, real; "
          "one VAE decode, real):")
    print(f"  {size}px: call {t_b2:6.1f} s, decode {t_dec:5.1f} s, peak +{mem[2]:.0f} MiB "
          f"(site grid {site.grid(hw)})")
    growth = {size: (t_b2, t_dec), **_growth_with_size(backend, args.sizes, t_b2, t_dec)}
    print(f"\ntotal benchmark wall time {time.perf_counter() - wall0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"fit": fit, "rows": rows, "growth": growth}, indent=1))


if __name__ == "__main__":
    main()
