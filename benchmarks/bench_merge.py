"""Benchmark the DiffSeg merge: fast (matmul KL) vs parity (official fp16) vs a naive fp32 broadcast.

Run from the repository root:  python -m benchmarks.bench_merge --size 64

Defaults are the official ones: a 64x64 token grid (4096x4096 aggregate), tau 1.1, 16 anchors per
side (256), 3 iterations, labels at 8x the grid (512x512). The aggregate is synthetic with planted
regions (tests/synthetic.py), float64 like the official aggregate.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from emergent_seg.core import diffseg
from emergent_seg.core.diffseg import anchor_grid, kl_merge, symmetric_kl
from emergent_seg.fixture.planted import planted_aggregate, voronoi_regions


def broadcast_merge(a: torch.Tensor, grid: tuple[int, int], tau: float, iterations: int,
                    per_side: int) -> torch.Tensor:
    """Straightforward fp32 re-statement: the official broadcasting (16 anchors per chunk, logs
    recomputed per chunk) without the fp16 cast; greedy later iterations; NaN rows dropped."""
    x = a.float()
    anchors = anchor_grid(grid[0], grid[1], per_side)
    bins = []
    for s in range(0, anchors.numel(), 16):
        bins.append(symmetric_kl(x[anchors[s:s + 16]].unsqueeze(1), x.unsqueeze(0)) < tau)
    binf = torch.cat(bins).float()
    p = (binf @ x) / binf.sum(1, keepdim=True)
    p = p[~torch.isnan(p).any(1)]
    for _ in range(1, iterations):
        matched, out = set(), []
        for i in range(p.shape[0]):
            if i in matched:
                continue
            matched.add(i)
            sel = symmetric_kl(p[i], p) < tau
            if bool(sel.any()):
                matched.update(torch.nonzero(sel).flatten().tolist())
                out.append(p[sel].mean(0))
        p = torch.stack(out)
    return p


def broadcast_pipeline(a: torch.Tensor, grid: tuple[int, int], out: tuple[int, int], tau: float,
                       iterations: int, per_side: int) -> torch.Tensor:
    p = broadcast_merge(a, grid, tau, iterations, per_side)
    up = F.interpolate(p.reshape(1, -1, *grid), size=out, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def timed(fn: Callable[[], torch.Tensor], repeats: int = 1) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="token grid side (64 = SD1.5 at 512 px)")
    ap.add_argument("--regions", type=int, default=6, help="planted regions")
    ap.add_argument("--tau", type=float, default=1.1)
    ap.add_argument("--tau-quantile", type=float, default=None,
                    help="use this quantile of the iteration-0 KL as tau instead (0.5 puts many pairs next to it)")
    ap.add_argument("--jitter", type=float, default=0.5, help="per-entry floor variation of the planted aggregate")
    ap.add_argument("--anchors", type=int, default=16, help="anchors per side")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="best-of repeats for the fast mode")
    ap.add_argument("--skip-slow", action="store_true", help="only time the fast mode")
    args = ap.parse_args()

    g = (args.size, args.size)
    out = (8 * args.size, 8 * args.size)
    regions = voronoi_regions(*g, args.regions, seed=args.seed)
    a = planted_aggregate(regions, seed=args.seed, jitter=args.jitter)
    common = {"tau": None if args.tau_quantile else args.tau, "tau_quantile": args.tau_quantile,
              "iterations": args.iterations, "anchors_per_side": args.anchors}
    print(f"aggregate {tuple(a.shape)} {a.dtype}, {args.regions} planted regions, tau {args.tau}, "
          f"{args.anchors}x{args.anchors} anchors, {args.iterations} iterations, labels {out[0]}x{out[1]}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")

    kl_merge(a, g, out, **common)  # warm-up
    t_fast, (l_fast, p_fast) = timed(lambda: kl_merge(a, g, out, **common), args.repeats)
    print(f"fast       {t_fast:8.3f} s   {p_fast[0].shape[0]} segments   (best of {args.repeats})")
    band, recomputed = diffseg._official_decisions_near_tau, []
    diffseg._official_decisions_near_tau = lambda *a: recomputed.append(band(*a)) or recomputed[-1]
    kl_merge(a, g, out, **common)
    diffseg._official_decisions_near_tau = lambda *a: 0
    try:
        t_plain, _ = timed(lambda: kl_merge(a, g, out, **common), args.repeats)
    finally:
        diffseg._official_decisions_near_tau = band
    pairs = anchor_grid(*g, args.anchors).numel() * args.size ** 2
    print(f"  near-tie band: {recomputed[0]} of {pairs} iteration-0 pairs recomputed in float16; fast without "
          f"it {t_plain:.3f} s, so the band costs {t_fast / t_plain:.3f}x")
    if args.skip_slow:
        return
    t_par, (l_par, p_par) = timed(lambda: kl_merge(a, g, out, mode="parity", **common))
    print(f"parity     {t_par:8.3f} s   {p_par[0].shape[0]} segments")
    tau = args.tau if args.tau_quantile is None else diffseg.threshold_from_quantile(a, g, args.tau_quantile,
                                                                                      args.anchors)
    t_bc, l_bc = timed(lambda: broadcast_pipeline(a, g, out, tau, args.iterations, args.anchors))
    print(f"broadcast  {t_bc:8.3f} s   {int(l_bc.max()) + 1} max label id  (naive fp32)")
    print(f"broadcast / fast = {t_bc / t_fast:7.1f}x")
    print(f"parity / fast    = {t_par / t_fast:7.1f}x")
    print(f"pixel agreement fast vs parity    = {float((l_fast[0] == l_par[0]).double().mean()):.6f}")
    print(f"pixel agreement fast vs broadcast = {float((l_fast[0] == l_bc).double().mean()):.6f}")


if __name__ == "__main__":
    main()
