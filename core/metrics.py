"""Hungarian-matched segmentation metrics (mIoU, pixel accuracy) for unsupervised segments.

Three protocols, never comparable with each other (always report which one produced a number):

``"per_image"`` -- DiffSeg's protocol (google/diffseg ``utils.hungarian_matching``). For each
    image, a confusion histogram ``num_classes x max(num_classes, pred.max()+1)`` over labelled
    pixels is matched one-to-one (Hungarian, maximise overlap); TP/FP/FN are accumulated per class
    over the dataset:
    ``TP_c = hist[c, m(c)]``, ``FN_c = (pixels of class c) - TP_c``,
    ``FP_c = (pixels of cluster m(c)) - TP_c``.
    Every class row gets a column (columns are padded with empty clusters up to ``num_classes``),
    so a cluster left over after the present classes are matched may be matched to a class that
    is absent from the image and then counts as FP of that class. Clusters left unmatched
    (only possible when an image has more than ``num_classes`` clusters) count as FN only.

``"dataset"`` -- the "traditional" protocol of PiCIE/STEGO (EmerDiff Table 1): one confusion
    histogram accumulated over the whole dataset and ONE matching at the end, same formulas.
    Only meaningful when prediction ids mean the same thing in every image (e.g. cluster ids of
    a k-means fitted over the whole dataset); per-image cluster ids give arbitrary numbers.

``score_instances`` -- for instance ground truth whose ids have no meaning across images (the
    synthetic fixture scenes): each image is matched independently between the ids present in its
    ground truth and its predicted segments; per-image mIoU is the mean IoU over the present ground
    truth ids (an unmatched ground-truth id scores 0; pixels of unmatched predicted segments count
    as FN of their ground-truth id only), and the result is the mean over images.

In all protocols ``ACC = sum(TP) / #labelled pixels`` and ``mIoU = nanmean_c TP/(TP+FP+FN)``
(classes with no pixels and no predictions are NaN and skipped). Ground-truth values outside
``[0, num_classes)`` (e.g. -1 or 255) are ignored. Pure numpy/torch; no scipy.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
Protocol = Literal["per_image", "dataset"]

__all__ = ["hungarian", "confusion", "match_scores", "per_image_scores", "SegmentationScorer",
           "score_instances", "instance_scores"]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def hungarian(weights: ArrayLike, maximize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment for a (possibly rectangular) ``[n, m]`` weight matrix.

    Returns ``(rows, cols)`` like ``scipy.optimize.linear_sum_assignment``: ``min(n, m)`` pairs,
    ``rows`` ascending. Maximises ``sum(weights[rows, cols])`` by default. Shortest augmenting
    paths with potentials (Kuhn-Munkres / Jonker-Volgenant), O(n^2 m). With ties, the chosen pairs
    may differ from scipy's; the optimal total is the same.
    """
    w = _np(weights).astype(np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weights must be finite")
    n, m = w.shape
    if n == 0 or m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    transposed = n > m
    cost = (-w if maximize else w)
    if transposed:
        cost = cost.T
        n, m = m, n

    inf = np.inf
    u = np.zeros(n + 1)          # row potentials (1-based; index 0 is a virtual row)
    v = np.zeros(m + 1)          # column potentials
    match = np.zeros(m + 1, dtype=np.int64)  # match[j] = row assigned to column j (0 = none)
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = np.full(m + 1, inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            # Relax all unused columns from row i0 at once.
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1

    cols_of_row = np.full(n, -1, dtype=np.int64)
    for j in range(1, m + 1):
        if match[j]:
            cols_of_row[match[j] - 1] = j - 1
    rows = np.arange(n, dtype=np.int64)
    cols = cols_of_row
    if transposed:
        rows, cols = cols, rows
        order = np.argsort(rows)
        rows, cols = rows[order], cols[order]
    return rows, cols


def confusion(gt: ArrayLike, pred: ArrayLike, num_classes: int, num_pred: int | None = None) -> np.ndarray:
    """``_fast_hist``: int64 ``[num_classes, P]`` counts of (gt class, predicted id) over labelled
    pixels, ``P = max(num_classes, pred.max() + 1, num_pred or 0)``. Ground truth outside
    ``[0, num_classes)`` is ignored; predicted ids must be >= 0."""
    g = _np(gt).reshape(-1).astype(np.int64)
    p = _np(pred).reshape(-1).astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred differ in size: {g.size} vs {p.size}")
    if p.size and p.min() < 0:
        raise ValueError("predicted ids must be >= 0")
    cols = max(num_classes, int(p.max()) + 1 if p.size else 0, num_pred or 0)
    keep = (g >= 0) & (g < num_classes)
    hist = np.bincount(cols * g[keep] + p[keep], minlength=num_classes * cols)
    return hist.reshape(num_classes, cols)


def match_scores(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian-match a ``[C, P]`` histogram (``P >= C``, maximise overlap) and return per-class
    ``(tp, fp, fn)``; see the module docstring for the formulas."""
    hist = np.asarray(hist)
    if hist.shape[1] < hist.shape[0]:
        hist = np.pad(hist, ((0, 0), (0, hist.shape[0] - hist.shape[1])))
    rows, cols = hungarian(hist, maximize=True)
    tp = hist[rows, cols].astype(np.float64)
    fn = hist.sum(1)[rows] - tp
    fp = hist.sum(0)[cols] - tp
    return tp, fp, fn


def per_image_scores(pred: ArrayLike, gt: ArrayLike, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DiffSeg per-image matching for one image (``[H,W]`` each): per-class ``(tp, fp, fn)``."""
    return match_scores(confusion(gt, pred, num_classes))


def _summary(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, labelled: float) -> dict:
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    acc = float(tp.sum() / labelled) if labelled else float("nan")
    return {"miou": miou, "acc": acc, "iou": iou.tolist(), "tp": tp.tolist(), "fp": fp.tolist(),
            "fn": fn.tolist()}


class SegmentationScorer:
    """Accumulates Hungarian-matched scores over a dataset.

    Example::

        scorer = SegmentationScorer(27, protocol="per_image")
        for pred, gt in batches:              # [B,H,W] or [H,W] integer maps
            scorer.update(pred, gt)
        scorer.compute()   # {"miou", "acc", "iou", "tp", "fp", "fn", "protocol", "images", "pixels"}

    Args:
        num_classes: ground-truth classes ``0..num_classes-1``; other values are ignored.
        protocol: ``"per_image"`` (DiffSeg) or ``"dataset"`` (one global matching); see module doc.
    """

    def __init__(self, num_classes: int, protocol: Protocol = "per_image") -> None:
        if protocol not in ("per_image", "dataset"):
            raise ValueError(f"protocol must be 'per_image' or 'dataset', got {protocol!r}")
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.protocol: Protocol = protocol
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.tp, self.fp, self.fn = np.zeros(c), np.zeros(c), np.zeros(c)
        self.hist = np.zeros((c, c), dtype=np.int64)
        self.images = 0
        self.pixels = 0

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        p, g = _np(pred), _np(gt)
        if p.shape != g.shape:
            raise ValueError(f"pred {p.shape} and gt {g.shape} differ")
        if p.ndim == 2:
            p, g = p[None], g[None]
        for pi, gi in zip(p, g):
            hist = confusion(gi, pi, self.num_classes)
            self.images += 1
            self.pixels += int(hist.sum())
            if self.protocol == "per_image":
                tp, fp, fn = match_scores(hist)
                self.tp += tp
                self.fp += fp
                self.fn += fn
            else:
                if hist.shape[1] > self.hist.shape[1]:
                    self.hist = np.pad(self.hist, ((0, 0), (0, hist.shape[1] - self.hist.shape[1])))
                self.hist[:, : hist.shape[1]] += hist

    def compute(self) -> dict:
        if self.protocol == "per_image":
            tp, fp, fn = self.tp, self.fp, self.fn
        else:
            tp, fp, fn = match_scores(self.hist)
        out = _summary(tp, fp, fn, self.pixels)
        out.update(protocol=self.protocol, images=self.images, pixels=self.pixels)
        return out


def instance_scores(pred: ArrayLike, gt: ArrayLike, ignore: Sequence[int] = (-1, 255)) -> dict:
    """Scores of one image ``[H,W]`` against instance ground truth (ids need not be contiguous).

    Returns ``{"miou", "acc", "iou": {gt_id: IoU}}`` over the ground-truth ids present in the
    labelled pixels (values in ``ignore`` are unlabelled)."""
    g = _np(gt).reshape(-1).astype(np.int64)
    p = _np(pred).reshape(-1).astype(np.int64)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred differ in size: {g.size} vs {p.size}")
    keep = ~np.isin(g, np.asarray(ignore, dtype=np.int64))
    g, p = g[keep], p[keep]
    if g.size == 0:
        return {"miou": float("nan"), "acc": float("nan"), "iou": {}}
    gt_ids, g_idx = np.unique(g, return_inverse=True)
    _, p_idx = np.unique(p, return_inverse=True)
    n_pred = int(p_idx.max()) + 1
    hist = np.bincount(g_idx * n_pred + p_idx, minlength=len(gt_ids) * n_pred).reshape(len(gt_ids), n_pred)
    rows, cols = hungarian(hist, maximize=True)
    tp = np.zeros(len(gt_ids))
    fp = np.zeros(len(gt_ids))
    tp[rows] = hist[rows, cols]
    fp[rows] = hist.sum(0)[cols] - tp[rows]
    fn = hist.sum(1) - tp
    iou = tp / (tp + fp + fn)
    return {"miou": float(iou.mean()), "acc": float(tp.sum() / g.size),
            "iou": {int(k): float(v) for k, v in zip(gt_ids, iou)}}


def score_instances(preds: ArrayLike | Sequence[ArrayLike], gts: ArrayLike | Sequence[ArrayLike],
                    ignore: Sequence[int] = (-1, 255)) -> dict:
    """Mean over images of ``instance_scores`` (each image matched on its own).

    ``preds``/``gts``: ``[B,H,W]`` arrays or sequences of ``[H,W]`` maps. Returns
    ``{"miou", "acc", "per_image_miou": [...], "images"}``; images with no labelled pixel are
    skipped."""
    per = [instance_scores(p, g, ignore) for p, g in zip(preds, gts)]
    per = [s for s in per if np.isfinite(s["miou"])]
    mious = [s["miou"] for s in per]
    return {"miou": float(np.mean(mious)) if per else float("nan"),
            "acc": float(np.mean([s["acc"] for s in per])) if per else float("nan"),
            "per_image_miou": mious, "images": len(per)}
