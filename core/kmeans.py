"""Seeded, deterministic k-means (Lloyd) in pure torch.

Used by DiffSeg's optional refinement (``core.diffseg.refine_kmeans``) and by EmerDiff's low-res
clustering. Distances use the matmul form ``|x|² − 2x·c + |c|²``; ties go to the lowest cluster
index. Every call seeds its own ``torch.Generator``, so results never depend on global RNG state,
and each batch item is clustered exactly as it would be alone.
"""
from __future__ import annotations

import torch

from .errors import EmergentSegError

__all__ = ["kmeans", "kmeans_plus_plus", "pairwise_sq_dist"]


def pairwise_sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances ``[N, k]`` between rows of ``x [N, D]`` and ``c [k, D]``.

    Matmul form, clamped at 0 (rounding can make it slightly negative).
    """
    d = torch.addmm((c * c).sum(1).unsqueeze(0), x, c.T, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_(min=0.0)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of ``k`` centroids from the rows of ``x [N, D]`` (plain variant: one
    candidate per step, probability ∝ squared distance to the nearest chosen centroid).
    ``generator`` is a CPU generator whatever the device of ``x``.

    When every remaining point coincides with a chosen centroid (fewer distinct points than ``k``),
    the lowest-index point is taken, so the call never fails on duplicate data.
    """
    n = x.shape[0]
    # Sampling happens on the CPU generator, so a seed means the same picks on every device.
    first = int(torch.randint(n, (1,), generator=generator).item())
    centroids = [x[first]]
    closest = pairwise_sq_dist(x, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0 and torch.isfinite(closest).all():
            # multinomial wants float64/float32 weights; float64 keeps tiny distances non-zero.
            idx = int(torch.multinomial(closest.double().cpu(), 1, generator=generator).item())
        else:
            idx = 0
        centroids.append(x[idx])
        closest = torch.minimum(closest, pairwise_sq_dist(x, x[idx:idx + 1]).squeeze(1))
    return torch.stack(centroids)


def _reseed_empty(x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                  dist_to_own: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centroid onto a far point: the points farthest from their own
    centroid, in decreasing distance (ties -> lowest point index), one distinct point per empty
    cluster (the scikit-learn relocation rule)."""
    empty = torch.nonzero(counts == 0).flatten()
    if empty.numel() == 0:
        return centroids
    order = torch.sort(dist_to_own, descending=True, stable=True).indices
    centroids = centroids.clone()
    centroids[empty] = x[order[: empty.numel()]]
    return centroids


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int, tol: float,
           reseed_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations for one item; returns (assignments [N], centroids [k, D])."""
    k = centroids.shape[0]
    # scikit-learn's tolerance: tol times the mean per-feature variance of the data.
    tol_abs = tol * float(x.var(dim=0, unbiased=False).mean()) if x.shape[0] > 1 else 0.0
    prev: torch.Tensor | None = None
    assign = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for _ in range(max(iters, 1)):
        dist = pairwise_sq_dist(x, centroids)
        assign = dist.argmin(dim=1)
        if prev is not None and torch.equal(assign, prev):
            return assign, centroids  # centroids are already the means of this assignment
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        new = torch.where(counts.unsqueeze(1) > 0,
                          sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype), centroids)
        if reseed_empty:
            new = _reseed_empty(x, new, counts, dist.gather(1, assign.unsqueeze(1)).squeeze(1))
        shift = float(((new - centroids) ** 2).sum())
        centroids, prev = new, assign
        if shift <= tol_abs:
            break
    # Final E-step so the returned assignments are nearest to the returned centroids.
    return pairwise_sq_dist(x, centroids).argmin(dim=1), centroids


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, tol: float = 1e-6,
           init: str | torch.Tensor | None = None,
           reseed_empty: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (Lloyd's algorithm).

    Args:
        x: points ``[N, D]`` or a batch ``[B, N, D]`` (float32 or float64; computed in that dtype).
        k: number of clusters, ``1 <= k <= N``.
        seed: seeds a fresh CPU ``torch.Generator`` for every batch item (the same seed for each,
            so a batched call equals per-item calls, on any device).
        iters: maximum Lloyd iterations.
        tol: stop when the total squared centroid shift is ``<= tol *`` mean feature variance
            (scikit-learn's rule), or when assignments stop changing.
        init: ``None`` / ``"k-means++"`` (seeded k-means++), or explicit centroids ``[k, D]``
            (shared by all items) or ``[B, k, D]``.
        reseed_empty: move a cluster that lost all its points onto the point farthest from its own
            centroid (deterministic). With ``False`` its centroid stays where it was, and the
            cluster may be empty in the result.

    Returns:
        ``(assignments, centroids)``: ``[B, N]`` int64 and ``[B, k, D]`` for batched input,
        ``[N]`` and ``[k, D]`` for ``[N, D]`` input. Ties go to the lowest cluster index.
    """
    if x.ndim not in (2, 3):
        raise EmergentSegError(f"kmeans expects points [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    batched = x.ndim == 3
    xb = x if batched else x.unsqueeze(0)
    b, n, d = xb.shape
    if k < 1:
        raise EmergentSegError(f"k must be >= 1, got {k}")
    if k > n:
        raise EmergentSegError(f"k={k} clusters requested but there are only {n} points; use k <= {n}")

    if isinstance(init, torch.Tensor):
        init_t = init.to(device=xb.device, dtype=xb.dtype)
        if init_t.ndim == 2:
            init_t = init_t.unsqueeze(0).expand(b, -1, -1)
        if init_t.shape != (b, k, d):
            raise EmergentSegError(
                f"init centroids have shape {tuple(init.shape)}; expected [{k}, {d}] or [{b}, {k}, {d}]")
    elif init not in (None, "k-means++"):
        raise EmergentSegError(f"unknown init {init!r}; use 'k-means++' or a [k, D] tensor")
    else:
        init_t = None

    assignments = torch.empty(b, n, dtype=torch.long, device=xb.device)
    centroids = torch.empty(b, k, d, dtype=xb.dtype, device=xb.device)
    for i in range(b):
        if init_t is None:
            gen = torch.Generator().manual_seed(int(seed))
            c0 = kmeans_plus_plus(xb[i], k, gen)
        else:
            c0 = init_t[i].clone()
        assignments[i], centroids[i] = _lloyd(xb[i], c0, iters, tol, reseed_empty)
    if batched:
        return assignments, centroids
    return assignments[0], centroids[0]
