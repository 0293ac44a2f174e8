"""DiffSeg merging: self-attention aggregate -> proposals -> label map.

Input is the aggregate ``A`` built by ``core.capture``: ``[Q, K]`` or ``[B, Q, K]`` with
``Q = K = h*w`` for the finest self-attention grid ``(h, w)``, rows indexed ``y*w + x`` (query
pixel), each row a distribution over key pixels. A *proposal* is one ``[h*w]`` key map.

Two implementations of the merge:

* ``merge_parity`` re-states the official ``google/diffseg`` code, quirks included: iteration-0
  KL in float16 by broadcasting, no epsilon (an exact zero makes a NaN that matches nothing),
  greedy later iterations that still average already-claimed proposals.
* ``merge_fast`` computes the same symmetric KL as a matmul,
  ``KL = ½[(Σ p log p)·1ᵀ − P·(log X)ᵀ − (log P)·Xᵀ + 1·(Σ x log x)ᵀ]``, in float32 (or float64)
  with logs clamped, so it never produces NaN. Where its float32 KL lies within float16's error
  of tau, iteration 0 recomputes the pair with the official float16 arithmetic, so both modes
  select the same maps (unless a map holds an exact float16 zero, which parity drops and fast
  keeps); a small fraction of parity's cost.

``kl_merge`` is the validated, batched entry point the nodes use.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import EmergentSegError, Interrupted
from .kmeans import kmeans
from .segmentation import Segmentation

__all__ = [
    "DEFAULT_TAU",
    "MIN_TAU",
    "MODES",
    "anchor_grid",
    "kl_matrix",
    "kl_merge",
    "labels_from_proposals",
    "merge_fast",
    "merge_parity",
    "refine_kmeans",
    "symmetric_kl",
    "threshold_from_quantile",
    "to_segmentation",
]

DEFAULT_TAU = 1.1  # COCO-Stuff-27 in the paper; Cityscapes uses 0.9
MODES = ("fast", "parity")
PARITY_ANCHOR_CHUNK = 16  # the official code splits the 256 anchors into 16 chunks of 16
MIN_TAU = 1e-6  # floor for quantile-derived thresholds
_TAU_HINT = "tau must be > 0 (the paper uses 1.1 for COCO, 0.9 for Cityscapes)"

Grid = tuple[int, int]
Tau = float | Sequence[float]
IterationCallback = Callable[[int], None]


# ----------------------------------------------------------------------------------- anchors


def _axis_coords(length: int, per_side: int) -> list[int]:
    """Official ``generate_sampling_grid`` along one side, with 63 replaced by ``length - 1``."""
    n = min(per_side, length)
    if n == 1:
        return [(length - 1) // 2]
    seg = (length - 1) // (n - 1)
    start = ((length - 1) - seg * (n - 1)) // 2
    return [start + seg * i for i in range(n)]


def anchor_grid(h: int, w: int, per_side: int = 16) -> torch.Tensor:
    """Flat query indices (``y*w + x``) of the anchor points, row-major.

    Generalises the official ``generate_sampling_grid``: per side of length ``L``,
    ``seg = (L-1)//(per_side-1)``, ``start = ((L-1) - seg*(per_side-1))//2``, coordinates
    ``start + seg*i``. On 64 with 16 per side this is {1, 5, ..., 61}. ``per_side`` is clamped to
    ``L`` (every cell is an anchor); ``per_side == 1`` gives the centre.

    Returns:
        ``[n]`` int64 with ``n = min(per_side, h) * min(per_side, w)``.
    """
    if h < 1 or w < 1:
        raise EmergentSegError(f"token grid must be at least 1x1, got {h}x{w}")
    if per_side < 1:
        raise EmergentSegError(f"anchors_per_side must be >= 1, got {per_side} (the paper uses 16)")
    ys = torch.tensor(_axis_coords(h, per_side), dtype=torch.long)
    xs = torch.tensor(_axis_coords(w, per_side), dtype=torch.long)
    return (ys[:, None] * w + xs[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------------- KL


def symmetric_kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Official symmetric KL, summed over the last axis, broadcasting ``x`` against ``y``:
    ``½Σ x(log x − log y) − ½Σ y(log x − log y)``.

    No epsilon and no upcast: computed in the operands' dtype, so a zero entry gives NaN
    (``0·(−inf)``), exactly like the official code.
    """
    quotient = torch.log(x) - torch.log(y)
    kl_1 = (x * quotient).sum(-1) / 2
    kl_2 = -(y * quotient).sum(-1) / 2
    return kl_1 + kl_2


def _log_clamped(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    floor = torch.finfo(x.dtype).tiny if eps is None else max(float(eps), torch.finfo(x.dtype).tiny)
    return x.clamp(min=floor).log_()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of ``[n, D]`` matrices without a ``[n, D]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(-1)


def _kl_from_parts(p: torch.Tensor, log_p: torch.Tensor, h_p: torch.Tensor,
                   x: torch.Tensor, log_x: torch.Tensor, h_x: torch.Tensor) -> torch.Tensor:
    """Matmul-form symmetric KL ``[n, m]`` from rows, their logs and ``Σ r log r``."""
    cross = p @ log_x.T
    cross.addmm_(log_p, x.T)
    return (h_p.unsqueeze(1) + h_x.unsqueeze(0) - cross).mul_(0.5)


def kl_matrix(p: torch.Tensor, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Symmetric KL between every row of ``p [n, D]`` and every row of ``x [m, D]``, matmul form.

    ``KL = ½[(Σ p log p)·1ᵀ − P·(log X)ᵀ − (log P)·Xᵀ + 1·(Σ x log x)ᵀ]``, computed in the
    inputs' dtype. Inside the logs, entries are clamped to ``eps`` (default: the dtype's smallest
    normal number, so only exact zeros/subnormals are affected); the result is never NaN.

    Returns:
        ``[n, m]``; mathematically equal to ``symmetric_kl(p[:, None], x[None])``.
    """
    log_p, log_x = _log_clamped(p, eps), _log_clamped(x, eps)
    return _kl_from_parts(p, log_p, _row_dot(p, log_p), x, log_x, _row_dot(x, log_x))


# ------------------------------------------------------------------------------- validation


def _check_grid(grid: Sequence[int]) -> Grid:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise EmergentSegError(f"grid must be the token grid (h, w), got {grid!r}") from None
    if h < 1 or w < 1:
        raise EmergentSegError(f"grid must be positive (h, w), got {grid!r}")
    return h, w


def _taus(tau: Tau, iterations: int) -> list[float]:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise EmergentSegError(f"iterations must be an integer >= 1, got {iterations!r} (the paper uses 3)")
    if isinstance(tau, torch.Tensor):
        tau = tau.tolist()
    if isinstance(tau, (int, float)) and not isinstance(tau, bool):
        taus = [float(tau)] * iterations
    else:
        try:
            taus = [float(t) for t in tau]  # type: ignore[union-attr]
        except TypeError:
            raise EmergentSegError(f"{_TAU_HINT}; got {tau!r}") from None
        if len(taus) != iterations:
            raise EmergentSegError(
                f"tau has {len(taus)} values but iterations={iterations}; give one tau per "
                f"iteration or a single number")
    for t in taus:
        if not (t > 0) or not math.isfinite(t):
            raise EmergentSegError(f"{_TAU_HINT}; got {t!r}")
    return taus


def _check_per_side(anchors_per_side: int) -> int:
    if isinstance(anchors_per_side, bool) or not isinstance(anchors_per_side, int) or anchors_per_side < 1:
        raise EmergentSegError(
            f"anchors_per_side must be an integer >= 1, got {anchors_per_side!r} (the paper uses 16)")
    return anchors_per_side


def _check_aggregate(a: torch.Tensor, grid: Grid, batched_ok: bool = True) -> torch.Tensor:
    """Shape/stochasticity checks; returns ``[B, Q, K]``."""
    h, w = grid
    if not isinstance(a, torch.Tensor):
        raise EmergentSegError(f"the aggregate must be a torch tensor, got {type(a).__name__}")
    if a.ndim == 2:
        a = a.unsqueeze(0)
    if a.ndim != 3 or not batched_ok and a.shape[0] != 1:
        want = "[Q, K]" if not batched_ok else "[Q, K] or [B, Q, K]"
        raise EmergentSegError(f"the aggregate must be {want}, got shape {tuple(a.shape)}")
    n = h * w
    if a.shape[1] != n or a.shape[2] != n:
        raise EmergentSegError(
            f"aggregate has {a.shape[1]} queries x {a.shape[2]} keys but the grid {h}x{w} needs "
            f"{n} x {n}; pass the token grid (h, w) the aggregate was captured on")
    if not a.is_floating_point():
        raise EmergentSegError(f"the aggregate must be a float tensor, got {a.dtype}")
    if n == 0 or a.shape[0] == 0:
        raise EmergentSegError("the aggregate is empty")
    af = a if a.dtype in (torch.float32, torch.float64) else a.float()
    row_sums = af.sum(-1)
    if not bool(torch.isfinite(row_sums).all()):  # any NaN/inf entry propagates to its row sum
        raise EmergentSegError("the aggregate contains NaN or inf; re-run the attention capture")
    if float(af.amin()) < 0:
        raise EmergentSegError(
            "the aggregate has negative entries; pass attention probabilities (after softmax), "
            "not scores")
    dev = float((row_sums - 1).abs().max())
    if dev > 1e-3:
        raise EmergentSegError(
            f"every aggregate row must sum to 1 (a distribution over key pixels), but a row is off "
            f"by {dev:.3g}; pass the normalised aggregate from the capture node, with queries on "
            f"axis -2 and keys on axis -1")
    return a


# ------------------------------------------------------------------------------ parity merge


def _notify(callback: IterationCallback | None, completed: int) -> None:
    if callback is not None:
        callback(completed)


def _float16_tau(tau: float) -> torch.Tensor:
    """TF converts the threshold to the tensor's dtype: the official comparison is against fp16(tau)."""
    return torch.tensor(tau, dtype=torch.float64).to(torch.float16)


def _official_kl(x: torch.Tensor, log_x: torch.Tensor, y: torch.Tensor, log_y: torch.Tensor,
                 quotient: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    """The official iteration-0 KL of maps ``x`` against maps ``y`` (float16, with their float16
    logs, broadcasting to the shape of the ``quotient``/``prod`` scratch buffers), summed over the
    last axis with every operation in float16 as in the official code."""
    torch.sub(log_x, log_y, out=quotient)
    kl = torch.mul(x, quotient, out=prod).sum(-1) / 2
    kl += -torch.mul(y, quotient, out=prod).sum(-1) / 2
    return kl


def _parity_iteration0(a64: torch.Tensor, anchors: torch.Tensor, tau: float,
                       callback: IterationCallback | None = None,
                       query_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Official iteration 0. ``a64``: ``[Q, K]`` float64.

    Returns ``(kl_bin [n, Q] bool, proposals [n, K] float64)``; a proposal whose anchor matched
    nothing (NaN KL) is a NaN row, as in the official code.
    """
    q = a64.shape[0]
    a16 = a64.to(torch.float16)
    log16 = torch.log(a16)  # what the official recomputes in every chunk; identical values
    tau16 = _float16_tau(tau)
    kl_bin = torch.zeros(anchors.numel(), q, dtype=torch.bool, device=a64.device)
    buffers: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for s in range(0, anchors.numel(), PARITY_ANCHOR_CHUNK):
        idx = anchors[s:s + PARITY_ANCHOR_CHUNK]
        x, log_x = a16[idx].unsqueeze(1), log16[idx].unsqueeze(1)  # [c, 1, K]
        # Splitting the query axis only bounds memory: each (anchor, query) sum is unchanged.
        for q0 in range(0, q, query_chunk):
            y, log_y = a16[q0:q0 + query_chunk].unsqueeze(0), log16[q0:q0 + query_chunk].unsqueeze(0)
            shape = (idx.numel(), y.shape[1], a16.shape[1])
            if shape not in buffers:  # reused: fresh 100 MB temporaries cost more than the math
                buffers[shape] = (torch.empty(shape, dtype=torch.float16, device=a16.device),
                                  torch.empty(shape, dtype=torch.float16, device=a16.device))
            kl = _official_kl(x, log_x, y, log_y, *buffers[shape])  # [c, qc]
            kl_bin[s:s + idx.numel(), q0:q0 + query_chunk] = kl < tau16  # NaN < tau is False
        _notify(callback, 0)
    binf = kl_bin.to(torch.float64)
    proposals = (binf @ a64) / binf.sum(1, keepdim=True)  # 0/0 -> NaN row, kept like the official
    return kl_bin, proposals


def _greedy_parity(p: torch.Tensor, tau: float) -> torch.Tensor:
    """Official iteration >= 1 on ``p [S, K]`` float64 (order dependent, no epsilon)."""
    log_p = torch.log(p)
    matched = [False] * p.shape[0]
    out = []
    for i in range(p.shape[0]):
        if matched[i]:
            continue
        matched[i] = True
        quotient = log_p[i] - log_p
        kl = (p[i] * quotient).sum(-1) / 2 - (p * quotient).sum(-1) / 2
        sel = kl < tau  # against ALL proposals, already claimed ones included
        if bool(sel.any()):  # a NaN anchor selects nothing and is silently dropped
            for j in torch.nonzero(sel).flatten().tolist():
                matched[j] = True
            out.append(p[sel].mean(0))
    return torch.stack(out) if out else p.new_zeros(0, p.shape[1])


def merge_parity(a: torch.Tensor, grid: Sequence[int], tau: Tau = DEFAULT_TAU, iterations: int = 3,
                 anchors_per_side: int = 16, *,
                 callback: IterationCallback | None = None) -> torch.Tensor:
    """Iterative attention merging exactly as the official ``google/diffseg`` code (parity mode).

    Iteration 0 computes the symmetric KL of every anchor against all query maps by broadcasting,
    16 anchors at a time, with both operands cast to float16; ``KL < fp16(tau)`` (NaN -> False)
    selects the query maps each anchor averages (float64). Iterations >= 1 merge greedily in
    float64, in order, comparing each unclaimed proposal with *all* proposals (claimed ones
    included) and appending only when something was selected, so NaN proposals vanish.

    ``iterations == 1`` returns the iteration-0 proposals minus NaN rows (the official code needs
    ``iterations >= 2``; with 1 it crashes on a shape error).

    Args:
        a: one image's aggregate ``[Q, K]`` (converted to float64, as the official aggregate is).
        grid: token grid ``(h, w)`` with ``h*w == Q == K``.
        tau: KL threshold, one number or one per iteration.
        iterations: number of merging iterations (paper: 3).
        anchors_per_side: anchor grid size per side (paper: 16).
        callback: called with the number of completed iterations, after each iteration and
            between iteration-0 chunks (for progress and cancellation).

    Returns:
        proposals ``[S, K]`` float64, possibly ``S == 0`` if every anchor map had an exact zero.
    """
    h, w = _check_grid(grid)
    taus = _taus(tau, iterations)
    a = _check_aggregate(a, (h, w), batched_ok=False)[0]
    return _merge_parity(a, (h, w), taus, _check_per_side(anchors_per_side), callback)


def _merge_parity(a: torch.Tensor, grid: Grid, taus: list[float], anchors_per_side: int,
                  callback: IterationCallback | None) -> torch.Tensor:
    iterations = len(taus)
    a64 = a.to(torch.float64)
    anchors = anchor_grid(grid[0], grid[1], anchors_per_side).to(a64.device)
    _, p = _parity_iteration0(a64, anchors, taus[0], callback)
    _notify(callback, 1)
    if iterations == 1:
        return p[~torch.isnan(p).any(1)]
    for it in range(1, iterations):
        p = _greedy_parity(p, taus[it])
        _notify(callback, it + 1)
    return p


# -------------------------------------------------------------------------------- fast merge


def _greedy_groups(selected: torch.Tensor) -> torch.Tensor:
    """Greedy grouping on a boolean ``[S, S]`` matrix (row i = what proposal i selects).

    Returns the selected rows of the anchors that started a group, in order: ``[S', S]`` bool.
    Same rule as the official loop: claimed proposals are skipped as anchors but can still be
    selected by later anchors; an anchor that selects nothing adds nothing.
    """
    rows = selected.tolist()
    matched = [False] * len(rows)
    keep = []
    for i, row in enumerate(rows):
        if matched[i]:
            continue
        matched[i] = True
        if any(row):
            for j, hit in enumerate(row):
                if hit:
                    matched[j] = True
            keep.append(i)
    return selected[keep]


def _group_means(groups: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    g = groups.to(p.dtype)
    return (g @ p) / g.sum(1, keepdim=True)


def merge_fast(a: torch.Tensor, grid: Sequence[int], tau: Tau = DEFAULT_TAU, iterations: int = 3,
               anchors_per_side: int = 16, eps: float | None = None, *,
               dtype: torch.dtype = torch.float32,
               callback: IterationCallback | None = None) -> torch.Tensor:
    """Iterative attention merging with the matmul-form KL (fast mode).

    Same algorithm as :func:`merge_parity` (anchor grid, ``KL < tau``, averaging of the selected
    maps, greedy order-dependent later iterations that still average claimed proposals), but
    every KL is computed as a matmul in ``dtype`` with logs clamped at ``eps``, so there is no
    float16 cast and no NaN. An anchor's KL with itself is set to exactly 0, so every anchor
    yields a proposal and every greedy anchor at least selects itself. Iteration-0 pairs whose
    KL is within float16's error of ``tau`` (a few percent of the pairs) are decided by the
    official float16 KL instead, so near-ties fall the way parity mode lets them fall; a pair
    whose float16 KL is NaN keeps the matmul decision.

    Args:
        a: one image's aggregate ``[Q, K]``.
        grid: token grid ``(h, w)`` with ``h*w == Q == K``.
        tau: KL threshold, one number or one per iteration.
        iterations: merging iterations (paper: 3). 1 returns the iteration-0 proposals.
        anchors_per_side: anchor grid size per side (paper: 16).
        eps: entries below ``eps`` count as ``eps`` inside the logs (default: smallest normal
            number of ``dtype``).
        dtype: float32 (default) or float64.
        callback: called with the number of completed iterations after each iteration.

    Returns:
        proposals ``[S, K]`` in ``dtype``, ``S >= 1``.
    """
    h, w = _check_grid(grid)
    taus = _taus(tau, iterations)
    if dtype not in (torch.float32, torch.float64):
        raise EmergentSegError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    a = _check_aggregate(a, (h, w), batched_ok=False)[0]
    return _merge_fast(a, (h, w), taus, _check_per_side(anchors_per_side), eps, dtype, callback)


def _iteration0_kl(x: torch.Tensor, grid: Grid, anchors_per_side: int, eps: float | None
                   ) -> torch.Tensor:
    """Matmul-form KL of every anchor map against every query map: ``[n_anchors, Q]``, with each
    anchor's self-KL set to exactly 0."""
    return _iteration0_parts(x, grid, anchors_per_side, eps)[1]


def _iteration0_parts(x: torch.Tensor, grid: Grid, anchors_per_side: int, eps: float | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(anchors [n], kl [n, Q], Σ x log x [Q])`` of :func:`_iteration0_kl`."""
    anchors = anchor_grid(grid[0], grid[1], anchors_per_side).to(x.device)
    log_x = _log_clamped(x, eps)
    h_x = _row_dot(x, log_x)
    kl = _kl_from_parts(x[anchors], log_x[anchors], h_x[anchors], x, log_x, h_x)
    kl[torch.arange(anchors.numel(), device=x.device), anchors] = 0.0
    return anchors, kl, h_x


# How far fast mode's KL can be from the official float16 KL, relative to the size of the terms
# the float16 arithmetic rounds, B = Σ(x+y)(|log x|+|log y|) = 2(KL - Σx log x - Σy log y).
# Measured on trained-model aggregates (32x32) and planted 64x64 ones: at most 1.24e-4·B;
# the band is four times that.
_FLOAT16_BAND = 2.0 ** -11
_FLOAT16_TAU_ULPS = 8


def _official_decisions_near_tau(selected: torch.Tensor, x: torch.Tensor, anchors: torch.Tensor,
                                 kl: torch.Tensor, h_x: torch.Tensor, tau: float,
                                 budget: int = 1 << 22) -> int:
    """Make iteration 0's ``selected = kl < tau`` [n, Q] what the official float16 arithmetic
    decides wherever the two could differ: pairs within the float16 error band of tau are
    recomputed the official way (``KL16 < fp16(tau)``), in place. A pair whose float16 KL is NaN
    (an entry that is 0 in float16) keeps fast mode's decision, since fast mode never drops a map.
    ``budget`` bounds each of the four float16 scratch buffers, in elements. Returns how many
    pairs were decided."""
    tau16 = _float16_tau(tau)
    ulp = float(torch.finfo(torch.float16).eps) * 2.0 ** math.floor(math.log2(tau))
    size = 2 * (kl - h_x[anchors].unsqueeze(1) - h_x.unsqueeze(0))
    near = (kl - tau).abs() <= size.clamp_(min=0) * _FLOAT16_BAND + _FLOAT16_TAU_ULPS * ulp
    near[torch.arange(anchors.numel(), device=x.device), anchors] = False  # self-pairs stay selected
    if not bool(near.any()):
        return 0
    a16 = x.to(torch.float16)
    log16 = torch.log(a16)
    step = max(1, min(budget // a16.shape[1], int(near.sum(1).max())))
    # gathered query maps, their logs, and the two scratch buffers, reused by every anchor
    y_buf, log_y_buf, quotient_buf, prod_buf = (
        torch.empty(step, a16.shape[1], dtype=torch.float16, device=x.device) for _ in range(4))
    for i, anchor in enumerate(anchors.tolist()):
        columns = torch.nonzero(near[i]).flatten()
        for c0 in range(0, columns.numel(), step):
            cols = columns[c0:c0 + step]
            y, log_y, quotient, prod = (t[:cols.numel()] for t in (y_buf, log_y_buf, quotient_buf, prod_buf))
            torch.index_select(a16, 0, cols, out=y)
            torch.index_select(log16, 0, cols, out=log_y)
            kl16 = _official_kl(a16[anchor], log16[anchor], y, log_y, quotient, prod)  # [m]
            finite = torch.isfinite(kl16)
            selected[i, cols[finite]] = kl16[finite] < tau16
    return int(near.sum())


def _merge_fast(a: torch.Tensor, grid: Grid, taus: list[float], anchors_per_side: int,
                eps: float | None, dtype: torch.dtype, callback: IterationCallback | None,
                tau_quantile: float | None = None) -> torch.Tensor:
    iterations = len(taus)
    x = a.to(dtype)
    anchors, kl, h_x = _iteration0_parts(x, grid, anchors_per_side, eps)
    if tau_quantile is not None:
        taus = [max(_quantile(kl, tau_quantile), MIN_TAU)] * iterations
    selected = kl < taus[0]
    _official_decisions_near_tau(selected, x, anchors, kl, h_x, taus[0])
    p = _group_means(selected, x)
    _notify(callback, 1)
    for it in range(1, iterations):
        kl = kl_matrix(p, p, eps)
        kl.fill_diagonal_(0.0)
        p = _group_means(_greedy_groups(kl < taus[it]), p)
        _notify(callback, it + 1)
    return p


# --------------------------------------------------------------------------------- refinement


def refine_kmeans(a: torch.Tensor, proposals: torch.Tensor, iters: int = 300, tol: float = 1e-4,
                  reseed_empty: bool = True) -> torch.Tensor:
    """Official optional refinement: k-means over the ``Q`` aggregated query maps (``K``-dim each),
    initialised with the merged proposals (scikit-learn ``KMeans(init=proposals, n_init=1)``
    defaults: 300 iterations, tol 1e-4); the new proposals are the cluster means.

    Clusters that end up empty are dropped (the official loop ``range(len(set(clusters)))``
    misindexes them instead); the remaining ones keep their order.

    Args:
        a: one image's aggregate ``[Q, K]``; computed in its dtype (float32/float64).
        proposals: ``[S, K]`` initial centroids.
        reseed_empty: relocate clusters that empty during the iterations (scikit-learn does).

    Returns:
        ``[S', K]`` with ``S' <= S``.
    """
    if a.ndim != 2 or proposals.ndim != 2 or proposals.shape[1] != a.shape[1]:
        raise EmergentSegError(
            f"refine_kmeans needs a [Q, K] aggregate and [S, K] proposals, got {tuple(a.shape)} "
            f"and {tuple(proposals.shape)}")
    if proposals.shape[0] == 0:
        return proposals
    x = a if a.dtype in (torch.float32, torch.float64) else a.float()
    labels, _ = kmeans(x, proposals.shape[0], iters=iters, tol=tol, init=proposals.to(x.dtype),
                       reseed_empty=reseed_empty)
    counts = torch.bincount(labels, minlength=proposals.shape[0])
    sums = torch.zeros(proposals.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, labels, x)
    keep = counts > 0
    return sums[keep] / counts[keep].unsqueeze(1).to(x.dtype)


# ------------------------------------------------------------------------------------ labels


def _tf_resize_weights(in_size: int, out_size: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TensorFlow ``ResizeBilinear`` (half-pixel centres) source indices and lerp, in float32."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    src = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5
    floor = torch.floor(src)
    lower = floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower.to(device), upper.to(device), (src - floor).to(device)


class _TFBilinear:
    """TF ``ResizeBilinear`` in float32 (the official Keras ``UpSampling2D`` casts to float32):
    ``top + (bottom − top)·y_lerp`` with ``top = tl + (tr − tl)·x_lerp``, evaluated for any range
    of output rows so callers can chunk."""

    def __init__(self, maps: torch.Tensor, out_size: Grid) -> None:
        _, h, w = maps.shape
        m = maps.to(torch.float32)
        xl, xu, xlerp = _tf_resize_weights(w, out_size[1], m.device)
        self.yl, self.yu, self.ylerp = _tf_resize_weights(h, out_size[0], m.device)
        left = m[:, :, xl]
        self.rows = left + (m[:, :, xu] - left) * xlerp  # [S, h, W]: x-interpolated input rows

    def __call__(self, r: slice) -> torch.Tensor:
        top, bottom = self.rows[:, self.yl[r]], self.rows[:, self.yu[r]]
        return top + (bottom - top) * self.ylerp[r].unsqueeze(1)


def _labels_tf(maps: torch.Tensor, out_size: Grid, budget: int) -> torch.Tensor:
    """Argmax over ``S`` of the TF-style float32 bilinear resize, in chunks of output rows."""
    s = maps.shape[0]
    resize = _TFBilinear(maps, out_size)
    labels = torch.empty(out_size, dtype=torch.long, device=maps.device)
    step = max(1, budget // max(1, s * out_size[1]))
    for r0 in range(0, out_size[0], step):
        labels[r0:r0 + step] = resize(slice(r0, r0 + step)).max(0).indices
    return labels


def labels_from_proposals(proposals: torch.Tensor, grid: Sequence[int], out_size: Sequence[int], *,
                          tf_bilinear: bool = False, budget: int = 1 << 25) -> torch.Tensor:
    """Per-pixel argmax of the bilinearly upsampled proposals.

    Args:
        proposals: ``[S, h*w]`` key maps (``S >= 1``, no NaN).
        grid: token grid ``(h, w)``.
        out_size: output ``(H, W)``.
        tf_bilinear: False (default): ``F.interpolate(bilinear, align_corners=False,
            antialias=False)`` in the proposals' dtype. True (parity mode): the same resampling
            with TensorFlow's float32 arithmetic, as the official Keras ``UpSampling2D``.
        budget: max elements of upsampled maps held at once; larger outputs are processed in
            chunks (exactly the same result).

    Returns:
        ``[H, W]`` int64 proposal indices; ties go to the lowest index.
    """
    h, w = _check_grid(grid)
    out_h, out_w = _check_grid(out_size)
    if proposals.ndim != 2 or proposals.shape[1] != h * w:
        raise EmergentSegError(
            f"proposals must be [S, {h * w}] for a {h}x{w} grid, got {tuple(proposals.shape)}")
    if proposals.shape[0] == 0:
        raise EmergentSegError("no proposals to label; the merge produced no segment")
    if bool(torch.isnan(proposals).any()):
        raise EmergentSegError("proposals contain NaN rows; drop them before labelling")
    s = proposals.shape[0]
    maps = proposals.reshape(s, h, w)
    if tf_bilinear:
        return _labels_tf(maps, (out_h, out_w), budget)
    if maps.dtype not in (torch.float32, torch.float64):
        maps = maps.float()
    chunk = max(1, budget // (out_h * out_w))
    best_val: torch.Tensor | None = None
    best_idx = torch.zeros(out_h, out_w, dtype=torch.long, device=maps.device)
    for s0 in range(0, s, chunk):
        up = F.interpolate(maps[None, s0:s0 + chunk], size=(out_h, out_w), mode="bilinear",
                           align_corners=False, antialias=False)[0]
        val, idx = up.max(0)  # first maximum on ties, like argmax (and faster over dim 0)
        if best_val is None:
            best_val, best_idx = val, idx + s0
        else:
            better = val > best_val  # strict: earlier chunks win ties
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + s0, best_idx)
    return best_idx


# ------------------------------------------------------------------------- adaptive threshold


def _quantile(v: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (``torch.quantile`` default) without its size limit."""
    v = v.reshape(-1)
    pos = q * (v.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = float(torch.kthvalue(v, lo + 1).values)
    v_hi = v_lo if hi == lo else float(torch.kthvalue(v, hi + 1).values)
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _check_quantile(quantile: float) -> float:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
        raise EmergentSegError(f"tau_quantile must be in (0, 1], got {quantile!r} (try 0.1-0.3)")
    return float(quantile)


def threshold_from_quantile(a: torch.Tensor, grid: Sequence[int], quantile: float,
                            anchors_per_side: int = 16, eps: float | None = None,
                            dtype: torch.dtype = torch.float32) -> float | list[float]:
    """Adaptive ``tau``: the ``quantile`` of the iteration-0 anchor-to-pixel symmetric KL values.

    Small models have flat attention, where a fixed ``tau = 1.1`` merges everything; a quantile
    adapts to the KL scale of each image. Computed with the matmul-form KL of :func:`merge_fast`
    (anchor self-pairs count, as zeros; ``eps``/``dtype`` as there). The result is clamped to at
    least ``MIN_TAU`` (1e-6) so it is a valid ``tau``.

    Args:
        a: ``[Q, K]`` or ``[B, Q, K]`` aggregate.
        grid: token grid ``(h, w)``.
        quantile: in ``(0, 1]``; higher merges more (fewer segments).
        anchors_per_side: as in the merge.

    Returns:
        a float for ``[Q, K]`` input, one float per image for ``[B, Q, K]``.
    """
    h, w = _check_grid(grid)
    quantile = _check_quantile(quantile)
    if dtype not in (torch.float32, torch.float64):
        raise EmergentSegError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    batch = _check_aggregate(a, (h, w))
    per_side = _check_per_side(anchors_per_side)
    taus = [max(_quantile(_iteration0_kl(batch[b].to(dtype), (h, w), per_side, eps), quantile),
                MIN_TAU) for b in range(batch.shape[0])]
    return taus[0] if a.ndim == 2 else taus


# -------------------------------------------------------------------------------- entry point


def _check_merge_args(a: torch.Tensor, grid: Sequence[int], out_size: Sequence[int], tau: Tau | None,
                      iterations: int, anchors_per_side: int, mode: str, tau_quantile: float | None,
                      dtype: torch.dtype) -> tuple:
    """:func:`kl_merge`'s arguments checked, each failure one clear line: ``((h, w), (H, W),
    anchors per side, taus per iteration, tau_quantile, aggregate [B, Q, K])``."""
    if mode not in MODES:
        raise EmergentSegError(
            f"unknown mode {mode!r}; use 'fast' (matmul KL, default) or 'parity' (reproduces the "
            f"official float16 code)")
    h, w = _check_grid(grid)
    out_hw = _check_grid(out_size)
    per_side = _check_per_side(anchors_per_side)
    if tau is not None and tau_quantile is not None:
        raise EmergentSegError("give either tau or tau_quantile, not both")
    taus = _taus(DEFAULT_TAU if tau is None else tau, iterations)
    if dtype not in (torch.float32, torch.float64):
        raise EmergentSegError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if tau_quantile is not None:
        tau_quantile = _check_quantile(tau_quantile)
    return (h, w), out_hw, per_side, taus, tau_quantile, _check_aggregate(a, (h, w))


def kl_merge(a: torch.Tensor, grid: Sequence[int], out_size: Sequence[int],
             tau: Tau | None = None, iterations: int = 3, anchors_per_side: int = 16,
             mode: str = "fast", refine: bool = False, *, tau_quantile: float | None = None,
             eps: float | None = None, dtype: torch.dtype = torch.float32,
             progress: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool | None] | None = None
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DiffSeg merge for a batch: aggregate -> proposals -> raw label maps.

    Args:
        a: aggregate ``[Q, K]`` or ``[B, Q, K]``, rows summing to 1, ``Q = K = h*w``.
        grid: token grid ``(h, w)`` of the aggregate.
        out_size: label resolution ``(H, W)`` (usually the image size).
        tau: KL threshold (one number or one per iteration). Defaults to ``DEFAULT_TAU`` (1.1)
            unless ``tau_quantile`` is given; passing both is an error.
        iterations: merging iterations (paper: 3).
        anchors_per_side: anchor grid per side (paper: 16).
        mode: ``"fast"`` (matmul KL, default) or ``"parity"`` (official float16 arithmetic).
        refine: run the official k-means refinement after merging.
        tau_quantile: adaptive threshold per image, see :func:`threshold_from_quantile`
            (used for every iteration).
        eps: fast mode's log clamp (see :func:`merge_fast`); ignored in parity mode.
        dtype: fast mode's float dtype (float32 or float64); parity is always float16/float64.
        progress: ``progress(done, total)`` after each merging iteration, refinement and
            labelling step.
        should_stop: called between steps; it may raise (e.g. ComfyUI's interrupt check) or
            return True, in which case :class:`~core.errors.Interrupted` is raised.

    Returns:
        ``(labels, proposals)``: ``labels [B, H, W]`` int64 raw proposal ids (gaps possible after
        the argmax; see :func:`to_segmentation`), and per image the proposals ``[S_b, h*w]``.
    """
    (h, w), (out_h, out_w), per_side, taus, tau_quantile, batch = _check_merge_args(
        a, grid, out_size, tau, iterations, anchors_per_side, mode, tau_quantile, dtype)

    steps = iterations + (1 if refine else 0) + 1
    total = batch.shape[0] * steps
    last = [-1]

    def tick(done: int) -> None:
        if should_stop is not None and should_stop():
            raise Interrupted("KL merge cancelled")
        if progress is not None and done != last[0]:
            last[0] = done
            progress(done, total)

    labels = torch.empty(batch.shape[0], out_h, out_w, dtype=torch.long, device=batch.device)
    proposals: list[torch.Tensor] = []
    for b in range(batch.shape[0]):
        base = b * steps
        tick(base)

        def on_iteration(completed: int, base: int = base) -> None:
            tick(base + completed)

        if mode == "parity":
            image_taus = taus
            if tau_quantile is not None:  # from the fast-form KL: parity's fp16 KL has NaNs
                t = threshold_from_quantile(batch[b], (h, w), tau_quantile, per_side, eps, dtype)
                image_taus = [t] * iterations  # type: ignore[list-item]
            p = _merge_parity(batch[b], (h, w), image_taus, per_side, on_iteration)
        else:
            p = _merge_fast(batch[b], (h, w), taus, per_side, eps, dtype, on_iteration, tau_quantile)
        if p.shape[0] == 0:
            raise EmergentSegError(
                "no segment survived the merge: every anchor's attention map has exact zeros after "
                "the official float16 cast; use mode='fast'")
        if refine:
            p = refine_kmeans(batch[b].to(p.dtype), p)
            tick(base + iterations + 1)
        labels[b] = labels_from_proposals(p, (h, w), (out_h, out_w), tf_bilinear=(mode == "parity"))
        proposals.append(p)
        tick(base + steps)
    return labels, proposals


def to_segmentation(labels: torch.Tensor, method: str = "diffseg", info: dict | None = None
                    ) -> Segmentation:
    """Wrap raw DiffSeg labels ``[B, H, W]`` (or ``[H, W]``) as a :class:`Segmentation`, relabelled
    to ``0..n-1`` per image in increasing raw-id order."""
    return Segmentation.from_labels(labels, method=method, info=info)
