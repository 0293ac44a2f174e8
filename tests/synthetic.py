"""Synthetic self-attention aggregates with planted regions (shared test/benchmark helpers).

An aggregate row (query pixel q) mixes three distributions over key pixels:
``region_mass`` spread uniformly over q's planted region, ``local_mass`` in a Gaussian bump
around q (attention is also local), and the rest as a random positive floor over all pixels.
Rows are exact distributions (float64) with no zeros.
"""
from __future__ import annotations

import torch


def rect_regions(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """``[h, w]`` labels: 0 = background, box i (y0, x0, y1, x1; end-exclusive) = i+1, later
    boxes painted over earlier ones."""
    lab = torch.zeros(h, w, dtype=torch.long)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        lab[y0:y1, x0:x1] = i + 1
    return lab


def voronoi_regions(h: int, w: int, n: int, seed: int = 0) -> torch.Tensor:
    """``[h, w]`` labels 0..n-1 of an irregular partition: nearest of ``n`` random sites under
    a randomly stretched metric (deterministic for a seed)."""
    g = torch.Generator().manual_seed(seed)
    sites = torch.rand(n, 2, generator=g) * torch.tensor([h - 1.0, w - 1.0])
    stretch = 0.5 + torch.rand(n, 2, generator=g)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pts = torch.stack([ys, xs], -1).reshape(-1, 1, 2)
    d = (((pts - sites.double()) * stretch.double()) ** 2).sum(-1)
    return d.argmin(1).reshape(h, w)


def planted_aggregate(regions: torch.Tensor, region_mass: float = 0.85, local_mass: float = 0.05,
                      sigma: float = 1.0, seed: int = 0, jitter: float = 0.5) -> torch.Tensor:
    """Row-stochastic ``[h*w, h*w]`` float64 aggregate whose rows follow the planted ``regions``.

    The floor is ``uniform(1 - jitter, 1 + jitter)`` per entry, renormalised. A small
    ``region_mass`` with a small ``jitter`` imitates the flat attention of tiny models.
    """
    h, w = regions.shape
    n = h * w
    g = torch.Generator().manual_seed(seed)
    lab = regions.reshape(-1)
    same = (lab[:, None] == lab[None, :]).double()
    region = same / same.sum(1, keepdim=True)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1)
    local = torch.exp(-torch.cdist(pos, pos) ** 2 / (2 * sigma ** 2))
    local /= local.sum(1, keepdim=True)
    floor = 1 - jitter + 2 * jitter * torch.rand(n, n, generator=g, dtype=torch.float64)
    floor /= floor.sum(1, keepdim=True)
    a = region_mass * region + local_mass * local + (1 - region_mass - local_mass) * floor
    return a / a.sum(1, keepdim=True)


def random_aggregate(n: int, seed: int = 0, spread: float = 5.0) -> torch.Tensor:
    """``[n, n]`` float64 row-softmax of uniform logits in ``[-spread, spread]`` (no zeros)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1) * spread
    return torch.softmax(logits, dim=1)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if two label maps are the same partition up to relabelling."""
    a, b = a.reshape(-1), b.reshape(-1)
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == torch.unique(a).numel() == torch.unique(b).numel()
