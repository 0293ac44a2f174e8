"""Attention sites: where a UNet computes attention, of which kind, and on which token grid.

A site is derived from the model's structure (never hard-coded to 512 px): ``stride`` is how many
latent cells one token covers on each axis, so the token grid for a latent of ``(h, w)`` is
``(h // stride, w // stride)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

SiteKind = Literal["self", "cross"]
Stage = Literal["down", "mid", "up"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a UNet.

    Attributes:
        key: backend-specific stable id (diffusers module path, or ComfyUI ``"output.3.0"``).
        kind: ``"self"`` (attn1) or ``"cross"`` (attn2, keys from the text context).
        stride: latent cells per token along each axis (1 = finest grid).
        heads: attention heads.
        order: position in the forward's execution order (0-based, over all sites).
        stage: ``"down"`` (encoder), ``"mid"`` or ``"up"`` (decoder).
        block: index of the spatial-transformer module within its stage, in execution order.
        depth: index of the transformer block inside that spatial transformer.
        host_block: host address, e.g. ComfyUI ``("output", 3, 0)``; ``None`` for diffusers.
    """

    key: str
    kind: SiteKind
    stride: int
    heads: int
    order: int
    stage: Stage
    block: int
    depth: int
    host_block: tuple[str, int, int] | None = None

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = latent_hw
        return h // self.stride, w // self.stride


def select(sites: Iterable[AttentionSite], kind: SiteKind | None = None, stage: Stage | None = None,
           strides: Iterable[int] | None = None) -> list[AttentionSite]:
    """Filter sites, keeping execution order."""
    wanted = None if strides is None else set(strides)
    return [s for s in sites
            if (kind is None or s.kind == kind)
            and (stage is None or s.stage == stage)
            and (wanted is None or s.stride in wanted)]


def strides_of(sites: Iterable[AttentionSite], kind: SiteKind = "self") -> list[int]:
    """Distinct strides (finest first) that carry attention of ``kind``."""
    return sorted({s.stride for s in sites if s.kind == kind})


def describe(sites: Iterable[AttentionSite], latent_hw: tuple[int, int]) -> str:
    """Human summary such as ``64x64: 5 self / 5 cross; 32x32: ...``."""
    rows: dict[int, list[int]] = {}
    for s in sites:
        counts = rows.setdefault(s.stride, [0, 0])
        counts[0 if s.kind == "self" else 1] += 1
    parts = []
    for stride in sorted(rows):
        h, w = latent_hw[0] // stride, latent_hw[1] // stride
        parts.append(f"{h}x{w}: {rows[stride][0]} self / {rows[stride][1]} cross")
    return "; ".join(parts)
