"""High-level entry points shared by the CLI, the evaluation harness and the tests.

Each takes a :class:`Backend` and images ``[B,3,H,W]`` in [0,1] and returns a
:class:`Segmentation`; the ComfyUI nodes call the same pieces one step at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend import Backend, Conditioning, Progress, check_size
from .capture import DIFFSEG_TIMESTEP, AttentionCapture, capture_attention
from .errors import EmergentSegError
from .segmentation import Segmentation


@dataclass(frozen=True)
class DiffSegSettings:
    """DiffSeg's knobs with the official defaults (COCO-Stuff-27 benchmark)."""

    timestep: int = DIFFSEG_TIMESTEP
    tau: float | None = 1.1
    tau_quantile: float | None = None
    iterations: int = 3
    anchors_per_side: int = 16
    mode: str = "fast"
    refine: bool = False
    strides: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, backend: Backend, **overrides: object) -> "DiffSegSettings":
        """The settings a model should run with: its stored defaults (``core/defaults.py``: the
        embedded model's calibrated tau and timestep), else the paper's; ``overrides`` win."""
        from .defaults import diffseg_threshold, diffseg_timestep

        tau, quantile = diffseg_threshold(backend)
        if "tau" in overrides or "tau_quantile" in overrides:
            tau, quantile = overrides.pop("tau", None), overrides.pop("tau_quantile", None)
        return cls(**{"timestep": diffseg_timestep(backend), "tau": tau, "tau_quantile": quantile,
                      **overrides})

    def __post_init__(self) -> None:
        """Bad values fail here, before any model work, with the same one-line messages the
        merge gives."""
        from .diffseg import _check_per_side, _taus

        if self.tau is None and self.tau_quantile is None:
            raise EmergentSegError("give tau or tau_quantile (DiffSeg's paper: tau = 1.1 on COCO)")
        if self.tau_quantile is not None and not 0.0 < float(self.tau_quantile) <= 1.0:
            raise EmergentSegError(f"tau_quantile must be in (0, 1], got {self.tau_quantile!r}")
        _taus(self.tau if self.tau is not None else 1.0, self.iterations)
        _check_per_side(self.anchors_per_side)
        if self.mode not in ("fast", "parity"):
            raise EmergentSegError(f"mode must be fast or parity, got {self.mode!r}")
        if not 0 <= int(self.timestep) <= 999:
            raise EmergentSegError(f"timestep must be in 0..999, got {self.timestep!r} (DiffSeg uses 300)")


def check_images(backend: Backend, images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise EmergentSegError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise EmergentSegError("no images were given")
    check_size(backend, int(images.shape[2]), int(images.shape[3]))


def capture(backend: Backend, images: torch.Tensor, cond: Conditioning | None = None,
            settings: DiffSegSettings = DiffSegSettings(), cross: bool = False,
            progress: Progress | None = None) -> AttentionCapture:
    """VAE-encode (posterior mean) and capture DiffSeg's aggregate in one pass."""
    check_images(backend, images)
    latents = backend.encode(images)
    dtype = torch.float64 if settings.mode == "parity" else torch.float32
    return capture_attention(backend, latents, cond, timestep=settings.timestep, strides=settings.strides,
                             cross=cross, aggregate_dtype=dtype, image_size=tuple(images.shape[-2:]),
                             progress=progress)


def merge(cap: AttentionCapture, settings: DiffSegSettings = DiffSegSettings(),
          progress: Progress | None = None) -> Segmentation:
    """KL-merge a capture into a :class:`Segmentation`, named by prompt words when the capture
    holds cross-attention and tokens. Labels are returned on the CPU."""
    from .diffseg import kl_merge

    progress = progress or Progress()
    start = progress.done

    def on_progress(done: int, total: int) -> None:
        progress.total = max(progress.total, start + total)
        progress.advance(start + done - progress.done)

    def should_stop() -> bool:
        progress.check()
        return False

    labels, _ = kl_merge(cap.self_attention, cap.grid, cap.image_size, tau=settings.tau,
                         tau_quantile=settings.tau_quantile, iterations=settings.iterations,
                         anchors_per_side=settings.anchors_per_side, mode=settings.mode,
                         refine=settings.refine, progress=on_progress, should_stop=should_stop)
    info = {"grid": list(cap.grid), "levels": cap.describe(), "mode": settings.mode,
            "tau": settings.tau, "tau_quantile": settings.tau_quantile,
            "iterations": settings.iterations, "timestep": cap.timestep}
    seg = Segmentation.from_labels(labels.cpu(), method="diffseg", info=info)
    return with_word_votes(seg, cap)


def with_word_votes(seg: Segmentation, cap: AttentionCapture) -> Segmentation:
    """Name segments after prompt words when the capture has cross-attention and tokens."""
    from .words import label_words, vote_words

    if not cap.cross or not cap.tokens:
        return seg
    words = label_words(cap.tokens, cap.prompt)
    if not words:
        return seg
    votes = vote_words(seg.labels.to(cap.cross[0].maps.device), seg.counts, cap.cross, words)
    out = seg.with_words(votes)
    out.info["words"] = list(words)
    return out


def segment_diffseg(backend: Backend, images: torch.Tensor, cond: Conditioning | None = None,
                    settings: DiffSegSettings = DiffSegSettings(),
                    progress: Progress | None = None) -> Segmentation:
    """DiffSeg end to end, one image at a time (the aggregate is 64 MiB per image at 512 px)."""
    check_images(backend, images)
    results = []
    for i in range(images.shape[0]):
        one_cond = None if cond is None else cond.expand(images.shape[0]).select([i])
        cap = capture(backend, images[i:i + 1], one_cond, settings, progress=progress)
        results.append(merge(cap, settings, progress=progress))
    return concat(results)


def concat(parts: list[Segmentation]) -> Segmentation:
    """Stack single-image segmentations of the same size into one batch."""
    if not parts:
        raise EmergentSegError("nothing to concatenate")
    sizes = {p.size for p in parts}
    if len(sizes) != 1:
        raise EmergentSegError(f"segmentations have different sizes {sorted(sizes)}")
    words = tuple(w for p in parts for w in p.words) if all(p.words for p in parts) else ()
    lowres = torch.cat([p.lowres for p in parts]) if all(p.lowres is not None for p in parts) else None
    return Segmentation(torch.cat([p.labels for p in parts]), tuple(c for p in parts for c in p.counts),
                        words, lowres, parts[0].method, dict(parts[0].info))
