"""The one result type every producer in the pack returns (KL Merge, Low-Res KMeans, the mapper)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class Segmentation:
    """Per-image label maps at image resolution.

    Attributes:
        labels: ``[B, H, W]`` int64; image ``b`` uses labels ``0..counts[b]-1`` with no gaps.
        counts: number of segments per image (images may differ).
        words: per image, one entry per segment: the prompt word the segment's cross-attention
            voted for, or ``None``. Empty tuple when the producer had no prompt.
        lowres: optional ``[B, h, w]`` int64 label grid the result was built from (e.g. the 16x16
            k-means grid), with the same label ids as ``labels``.
        method: which producer made it ("diffseg", "emerdiff", "diffseg+mapper", ...).
        info: free-form, JSON-friendly facts for display (chosen block, threshold used, ...);
            nothing downstream reads it to decide what to do.
        lowres_layer: which transformer of the grid's decoder block ``lowres`` came from (Low-Res
            KMeans' ``layer``); the mapper modulates that same layer. ``None`` = not from features.
    """

    labels: torch.Tensor
    counts: tuple[int, ...]
    words: tuple[tuple[str | None, ...], ...] = ()
    lowres: torch.Tensor | None = None
    method: str = ""
    info: dict = field(default_factory=dict)
    lowres_layer: int | None = None

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            raise ValueError(f"labels must be [B,H,W], got shape {tuple(self.labels.shape)}")
        if len(self.counts) != self.labels.shape[0]:
            raise ValueError(f"{len(self.counts)} counts for a batch of {self.labels.shape[0]}")
        if self.words and len(self.words) != len(self.counts):
            raise ValueError("words must have one entry per image")

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.labels.shape[1]), int(self.labels.shape[2])

    def word(self, image: int, segment: int) -> str | None:
        if not self.words:
            return None
        return self.words[image][segment]

    def select(self, index: int) -> "Segmentation":
        """Image ``index`` alone, as a batch of one."""
        return replace(self, labels=self.labels[index:index + 1], counts=self.counts[index:index + 1],
                       words=self.words[index:index + 1] if self.words else (),
                       lowres=None if self.lowres is None else self.lowres[index:index + 1])

    def with_words(self, words: list[list[str | None]]) -> "Segmentation":
        return replace(self, words=tuple(tuple(w) for w in words))

    @staticmethod
    def from_labels(labels: torch.Tensor, method: str = "", lowres: torch.Tensor | None = None,
                    info: dict | None = None, lowres_layer: int | None = None) -> "Segmentation":
        """Build from raw labels that may have gaps (e.g. DiffSeg's argmax ids): each image is
        relabelled to ``0..n-1`` in increasing order of the raw id, so the order is stable."""
        if labels.ndim == 2:
            labels = labels.unsqueeze(0)
        compact = torch.empty_like(labels, dtype=torch.int64)
        counts = []
        low = None if lowres is None else torch.empty_like(lowres, dtype=torch.int64)
        for b in range(labels.shape[0]):
            ids, inverse = torch.unique(labels[b], return_inverse=True)
            compact[b] = inverse
            counts.append(int(ids.numel()))
            if lowres is not None:
                # Low-res cells whose id vanished at full resolution map to the nearest kept id.
                lut = torch.searchsorted(ids, lowres[b].reshape(-1).to(ids.dtype)).clamp(max=ids.numel() - 1)
                low[b] = lut.reshape(lowres[b].shape)
        return Segmentation(compact, tuple(counts), lowres=low, method=method, info=dict(info or {}),
                            lowres_layer=lowres_layer if lowres is not None else None)
