"""High-level entry points shared by the CLI, the evaluation harness and the tests.

Each takes a :class:`Backend` and images ``[B,3,H,W]`` in [0,1] and returns a
:class:`Segmentation`; the ComfyUI nodes call the same pieces one step at a time.
"""
from __future__ import annotations

import torch

from .backend import Backend, Conditioning, Progress, check_size
from .capture import AttentionCapture, capture_attention
from .errors import EmergentSegError
from .segmentation import Segmentation
from .settings import DiffSegSettings, EmerDiffSettings


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
                    settings: DiffSegSettings = DiffSegSettings(), progress: Progress | None = None,
                    batch_size: int = 1) -> Segmentation:
    """DiffSeg end to end, ``batch_size`` images per UNet pass (the aggregate is 64 MiB per image
    at 512 px, so the default runs one image at a time; a batch of equal-size images shares one
    pass, which is what makes many-image runs fast on a GPU)."""
    check_images(backend, images)
    if batch_size < 1:
        raise EmergentSegError(f"batch size must be at least 1, got {batch_size}")
    n = images.shape[0]
    results = []
    for i in range(0, n, batch_size):
        j = min(n, i + batch_size)
        part = None if cond is None else cond.expand(n).select(list(range(i, j)))
        # with a prompt, cross-attention is kept too so segments are named after its words
        cap = capture(backend, images[i:j], part, settings, cross=bool(part and part.tokens), progress=progress)
        results.append(merge(cap, settings, progress=progress))
        del cap
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
                        words, lowres, parts[0].method, dict(parts[0].info),
                        parts[0].lowres_layer if lowres is not None else None)


def image_side(images: torch.Tensor) -> int:
    """The side of the square with the images' area (EmerDiff's sigma scales with it)."""
    return int(round((int(images.shape[-2]) * int(images.shape[-1])) ** 0.5))


def segment_emerdiff(backend: Backend, images: torch.Tensor, cond: Conditioning | None = None,
                     settings: EmerDiffSettings | None = None, *, seed: int = 0,
                     progress: Progress | None = None) -> Segmentation:
    """EmerDiff end to end: low-res k-means + the modulated denoising mapper, labels at the
    images' size. ``settings=None``: the model's defaults at this size (``core/settings.py``)."""
    from .emerdiff import emerdiff

    check_images(backend, images)
    settings = settings or EmerDiffSettings.for_model(backend, image_side(images))
    latents = backend.encode(images)
    return emerdiff(backend, latents, settings, cond=cond, seed=seed,
                    image_size=tuple(images.shape[-2:]), progress=progress)


def refine_with_mapper(backend: Backend, images: torch.Tensor, seg: Segmentation,
                       cond: Conditioning | None = None, settings: EmerDiffSettings | None = None, *,
                       seed: int = 0, progress: Progress | None = None) -> Segmentation:
    """Sharpen any segmentation of ``images`` with EmerDiff's mapper: its labels are pooled onto
    the mapper's grid by majority vote, modulated, and the segment words carried over."""
    from dataclasses import replace

    from .emerdiff import carry_words, choose_site, lowres_from_segmentation, modulated_denoise_mapper

    check_images(backend, images)
    settings = settings or EmerDiffSettings.for_model(backend, image_side(images))
    latents = backend.encode(images)
    latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
    grid = choose_site(backend, latent_hw, settings.grid, settings.layer, settings.depth).grid(latent_hw)
    low = lowres_from_segmentation(seg, grid)
    refined = modulated_denoise_mapper(
        backend, latents, low, replace(settings, grid=grid), cond=cond, seed=seed,
        image_size=tuple(images.shape[-2:]), method=f"{seg.method or 'segmentation'}+mapper",
        extra_info={"source": seg.method, seg.method or "source": dict(seg.info)}, progress=progress)
    return carry_words(seg, low, refined)
