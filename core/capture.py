"""Capture DiffSeg's aggregated self-attention (and optional cross-attention) in one UNet pass.

Memory plan (SD1.5 at 512 px): the result is the ``[B, 4096, 4096]`` aggregate (64 MiB per image
in float32). Finest-grid layers are folded straight into it as each query chunk is computed;
coarser levels keep a small running sum (4 MiB at 32x32) that is folded -- upsampled on the key
side, renormalised, repeated on the query side -- as soon as the level's last layer has run.
No per-head or per-layer map is ever held for more than one query chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from .attention import DEFAULT_CHUNK_BYTES, attention_with_head_mean
from .backend import Backend, Conditioning, PassHooks, Progress
from .errors import EmergentSegError, UnsupportedModelError
from .settings import DIFFSEG_TIMESTEP
from .sites import AttentionSite, select


@dataclass(frozen=True)
class LevelInfo:
    """One attention resolution that entered the aggregate."""

    stride: int
    grid: tuple[int, int]
    layers: int
    weight: float


@dataclass(frozen=True)
class CrossAttentionLevel:
    """Cross-attention of one resolution: mean over heads and layers, ``[B, h*w, T]``."""

    grid: tuple[int, int]
    layers: int
    maps: torch.Tensor


@dataclass(frozen=True)
class AttentionCapture:
    """What Capture Attention hands to KL Merge.

    Attributes:
        self_attention: ``[B, Q, K]`` aggregate on the finest captured grid (Q = K = h*w,
            row-major); axis 1 = query, axis 2 = key; each row sums to 1.
        grid: ``(h, w)`` of that grid.
        image_size: ``(H, W)`` of the images, for the final label maps.
        levels: the resolutions aggregated, with their layer counts and weights.
        cross: per resolution cross-attention (only when captured), finest first.
        tokens: the conditioning's token strings (for word labels), when known.
        timestep: the timestep of the pass.
    """

    self_attention: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    levels: tuple[LevelInfo, ...]
    cross: tuple[CrossAttentionLevel, ...] = ()
    tokens: tuple[str, ...] | None = None
    prompt: str | None = None
    timestep: int = DIFFSEG_TIMESTEP

    @property
    def batch_size(self) -> int:
        return int(self.self_attention.shape[0])

    def describe(self) -> str:
        parts = [f"{l.grid[0]}x{l.grid[1]} x{l.layers} (w={l.weight:.3f})" for l in self.levels]
        return "self-attention " + ", ".join(parts)


def proportional_weights(strides: Iterable[int]) -> dict[int, float]:
    """DiffSeg's default resolution weights: proportional to the grid side (64:32:16:8 at 512 px)."""
    inv = {s: 1.0 / s for s in strides}
    total = sum(inv.values())
    return {s: v / total for s, v in inv.items()}


def _fold_level(aggregate: torch.Tensor, level_mean: torch.Tensor, grid: tuple[int, int],
                top: tuple[int, int], weight: float, budget_bytes: int) -> None:
    """Add one coarse level to the aggregate the way the official code does:
    key maps bilinear-upsampled (align_corners=False) to the top grid and renormalised;
    query axis repeated nearest (``repeat_interleave``), done here as a broadcast add."""
    b = aggregate.shape[0]
    hl, wl = grid
    ht, wt = top
    fy, fx = ht // hl, wt // wl
    target = aggregate.view(b, hl, fy, wl, fx, ht * wt)
    rows_per_chunk = max(1, budget_bytes // max(1, b * wl * ht * wt * 4))
    maps = level_mean.view(b, hl, wl, hl, wl)
    for y0 in range(0, hl, rows_per_chunk):
        y1 = min(hl, y0 + rows_per_chunk)
        chunk = maps[:, y0:y1].reshape(-1, 1, hl, wl)
        up = F.interpolate(chunk, size=(ht, wt), mode="bilinear", align_corners=False)
        up = up.view(b, y1 - y0, wl, ht * wt)
        up = up / up.sum(dim=-1, keepdim=True)
        target[:, y0:y1] += (weight * up).to(aggregate.dtype).view(b, y1 - y0, 1, wl, 1, ht * wt)


def _check_request(backend: Backend, latents: torch.Tensor, timestep: int, strides: Iterable[int] | None,
                   cross: bool) -> tuple[list[AttentionSite], list[AttentionSite], tuple[int, int]]:
    """Validate a capture request; returns the self- and cross-attention sites to hook and the
    latent ``(h, w)``."""
    if latents.ndim != 4:
        raise EmergentSegError(f"latents must be [B,C,h,w], got shape {tuple(latents.shape)}")
    if not 0 <= int(timestep) < len(backend.alphas_cumprod()):
        raise EmergentSegError(f"timestep {timestep} is outside the model's schedule "
                               f"(0..{len(backend.alphas_cumprod()) - 1}); DiffSeg uses 300")
    all_sites = backend.sites()
    self_sites = select(all_sites, kind="self", strides=strides)
    if not self_sites:
        if not select(all_sites, kind="self"):
            raise UnsupportedModelError("this UNet has no self-attention layers; DiffSeg needs an "
                                        "SD-family UNet with transformer blocks")
        raise EmergentSegError(f"no self-attention layers at strides {sorted(set(strides or []))}; "
                               f"available: {sorted({s.stride for s in select(all_sites, kind='self')})}")
    cross_sites = select(all_sites, kind="cross", strides=strides) if cross else []
    if cross and not cross_sites:
        raise UnsupportedModelError("this UNet has no cross-attention layers, so prompt words "
                                    "cannot be located; capture without a prompt")

    latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    coarsest = max(s.stride for s in all_sites)
    if latent_hw[0] % coarsest or latent_hw[1] % coarsest:
        m = coarsest * backend.latent_scale
        raise EmergentSegError(f"image size {latent_hw[1] * backend.latent_scale}x"
                               f"{latent_hw[0] * backend.latent_scale} is not a multiple of {m}; "
                               f"resize or crop it to a multiple of {m}")
    return self_sites, cross_sites, latent_hw


def _level_plan(self_sites: list[AttentionSite], latent_hw: tuple[int, int], weights: dict[int, float] | None
                ) -> tuple[dict[int, int], int, tuple[int, int], dict[int, float]]:
    """Layers per stride, the finest stride and its grid (the aggregate's), and the per-stride weights."""
    counts: dict[int, int] = {}
    for s in self_sites:
        counts[s.stride] = counts.get(s.stride, 0) + 1
    top_stride = min(counts)
    top = self_sites[0].grid(latent_hw) if self_sites[0].stride == top_stride else \
        (latent_hw[0] // top_stride, latent_hw[1] // top_stride)
    level_weights = weights if weights is not None else proportional_weights(counts)
    missing = set(counts) - set(level_weights)
    if missing:
        raise EmergentSegError(f"no weight given for strides {sorted(missing)}")
    return counts, top_stride, top, level_weights


class _Accumulator:
    """The running sums of one capture pass and the attention hooks that fill them, one query
    chunk at a time (the module docstring's memory plan): the finest level straight into
    ``aggregate``, coarser levels into ``sums`` until their last layer, cross-attention into
    ``cross_sums``."""

    def __init__(self, b: int, latent_hw: tuple[int, int], counts: dict[int, int], top_stride: int,
                 top: tuple[int, int], level_weights: dict[int, float], aggregate_dtype: torch.dtype,
                 budget_bytes: int, device: torch.device, progress: Progress) -> None:
        self.b, self.latent_hw, self.counts, self.top_stride = b, latent_hw, counts, top_stride
        self.top, self.level_weights, self.budget_bytes = top, level_weights, budget_bytes
        self.device, self.progress = device, progress
        n_top = top[0] * top[1]
        self.aggregate = torch.zeros(b, n_top, n_top, dtype=aggregate_dtype, device=device)
        self.sums: dict[int, torch.Tensor] = {}
        self.seen: dict[int, int] = {}
        self.cross_sums: dict[int, torch.Tensor] = {}
        self.cross_seen: dict[int, int] = {}

    def self_hook(self, site: AttentionSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.progress.check()
        b, counts, top_stride = self.b, self.counts, self.top_stride
        grid = site.grid(self.latent_hw)
        n = grid[0] * grid[1]
        if q.shape[0] != b or q.shape[1] != n:
            raise EmergentSegError(f"attention at {site.key} has {q.shape[1]} queries for batch "
                                   f"{q.shape[0]}, expected {n} for {b}; the host split the batch")
        if site.stride == top_stride:
            target, scale = self.aggregate, self.level_weights[site.stride] / counts[site.stride]
        else:
            target = self.sums.setdefault(site.stride, torch.zeros(b, n, n, device=self.device))
            scale = 1.0
        out = attention_with_head_mean(q, k, v, site.heads, target, scale, self.budget_bytes)
        self.seen[site.stride] = self.seen.get(site.stride, 0) + 1
        if site.stride != top_stride and self.seen[site.stride] == counts[site.stride]:
            level = self.sums.pop(site.stride) / counts[site.stride]
            _fold_level(self.aggregate, level, grid, self.top, self.level_weights[site.stride], self.budget_bytes)
        self.progress.advance()
        return out

    def cross_hook(self, site: AttentionSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.progress.check()
        grid = site.grid(self.latent_hw)
        buf = self.cross_sums.setdefault(site.stride, torch.zeros(self.b, grid[0] * grid[1], k.shape[1],
                                                                  device=self.device))
        out = attention_with_head_mean(q, k, v, site.heads, buf, 1.0, self.budget_bytes)
        self.cross_seen[site.stride] = self.cross_seen.get(site.stride, 0) + 1
        self.progress.advance()
        return out


def capture_attention(backend: Backend, latents: torch.Tensor, cond: Conditioning | None = None,
                      timestep: int = DIFFSEG_TIMESTEP, strides: Iterable[int] | None = None,
                      cross: bool = False, weights: dict[int, float] | None = None,
                      aggregate_dtype: torch.dtype = torch.float32,
                      budget_bytes: int = DEFAULT_CHUNK_BYTES,
                      image_size: tuple[int, int] | None = None,
                      progress: Progress | None = None) -> AttentionCapture:
    """One UNet pass on the clean latent at ``timestep`` (no noise added, as the official code),
    folding every self-attention layer of the chosen resolutions into DiffSeg's aggregate.

    Args:
        backend: the model.
        latents: ``[B, C, h, w]`` scaled latents (the VAE posterior mean).
        cond: conditioning; ``None`` = the empty prompt (DiffSeg's default).
        timestep: DDPM timestep whose embedding is used (300 in the official code).
        strides: which resolutions to aggregate, as strides (1 = finest); ``None`` = all.
        cross: also capture cross-attention (for word labels).
        weights: per-stride weights; default proportional to the grid side.
        aggregate_dtype: float32, or float64 for bit-faithful parity runs.
        budget_bytes: memory for one query chunk of one layer's probabilities.
        image_size: ``(H, W)`` the labels should have; default latent size x latent_scale.
        progress: receives one unit per captured layer and is polled for cancellation.
    """
    self_sites, cross_sites, latent_hw = _check_request(backend, latents, timestep, strides, cross)
    if weights is not None:  # a zero-weight resolution adds nothing: run its layers unhooked
        self_sites = [s for s in self_sites if weights.get(s.stride, None) != 0]
        if not self_sites:
            raise EmergentSegError("every captured resolution has weight 0; give at least one a positive weight")
    b = latents.shape[0]
    counts, top_stride, top, level_weights = _level_plan(self_sites, latent_hw, weights)
    device = latents.device
    progress = progress or Progress()
    acc = _Accumulator(b, latent_hw, counts, top_stride, top, level_weights, aggregate_dtype, budget_bytes,
                       device, progress)
    progress.grow(len(self_sites) + len(cross_sites))

    hooks = PassHooks({s.key: acc.self_hook for s in self_sites})
    hooks = hooks.merged(PassHooks({s.key: acc.cross_hook for s in cross_sites}))
    cond = (cond or backend.empty_conditioning()).expand(b)
    t = torch.full((b,), int(timestep), dtype=torch.long, device=device)
    with torch.no_grad():
        backend.predict_noise(latents, t, cond, hooks)
    if acc.seen != counts:
        raise RuntimeError(f"expected self-attention layers {counts}, saw {acc.seen}")

    levels = tuple(LevelInfo(s, (latent_hw[0] // s, latent_hw[1] // s), counts[s], level_weights[s])
                   for s in sorted(counts))
    cross_levels = tuple(
        CrossAttentionLevel((latent_hw[0] // s, latent_hw[1] // s), acc.cross_seen[s],
                            acc.cross_sums[s] / acc.cross_seen[s])
        for s in sorted(acc.cross_sums))
    size = image_size or (latent_hw[0] * backend.latent_scale, latent_hw[1] * backend.latent_scale)
    return AttentionCapture(acc.aggregate, top, size, levels, cross_levels,
                            cond.tokens if cross else None, cond.prompt if cross else None, int(timestep))
