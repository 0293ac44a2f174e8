"""EmerDiff (Namekata et al., ICLR 2024): low-res k-means on UNet queries + the modulated denoising
mapper that turns any low-res label grid into an image-resolution segmentation.

No public code exists; this is a reconstruction from the paper. Every open choice is a
named parameter whose default is the paper's value where it is known, otherwise ours, with the
reason next to the constant.

The code lives in ``core/lowres.py`` (stage 1) and ``core/mapper.py`` (stage 2); this module is
the public face: :func:`emerdiff` runs both, and every name is importable from here.

Pipeline (one image; the mapper loops over images, k-means is batched):

1. **Low-res masks** (:func:`lowres_kmeans`): noise the clean latent to ``t_f = 1`` with one seeded
   noise sample, run one UNet pass and keep the queries ``Q = to_q(norm2(h))`` of the first
   cross-attention layer of the decoder's 16x16 block (exactly the ``q`` a :class:`PassHooks`
   attention hook receives, ``[B, N, heads*d]``); seeded k-means++ k-means gives ``K`` masks.
2. **Mapper** (:func:`modulated_denoise_mapper`): noise the latent to ``t_m = 281`` (one fixed
   noise sample shared by every run). For each low-res mask ``M_i`` run the UNet with
   ``to_out(attn) + c*M_i`` at the same 16x16 cross-attention layer, ``c = +lam`` and ``c = -lam``,
   with the attention probabilities of the unmodulated reference run injected into every modulated
   run; denoise to ``t = 0`` (deterministic DDIM), decode, ``d_i = ||I- - I+||_2`` over RGB,
   Gaussian-smooth ``d``, label = per-pixel argmax.

Batching: one UNet call runs ``[reference, member, member, ...]`` where a member is one
(mask, sign) run; members are split into chunks of at most ``max_batch`` and the reference is
member 0 of *every* chunk. Why not compute the reference once and cache its probabilities: at
SD1.5/512 px a single 64x64 self-attention layer's probabilities are 8 x 4096^2 float32 = 512 MiB,
times 16 layers times 15 steps ≈ 120 GiB, so caching is out; repeating the reference costs one
extra batch member per chunk (1/max_batch of the work, 5 % at the default).

Injection needs no stored maps: at every injected site the hook computes the reference member's
``softmax(QK^T/sqrt(d))`` one query chunk at a time and multiplies every member's V with it
(:func:`reference_attention`, equal to ``explicit_attention(..., replace_probs=...)`` taking
member 0's probabilities, without computing the other members' scores).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .attention import DEFAULT_CHUNK_BYTES
from .backend import Backend, Conditioning, Progress
from .lowres import (
    LowResFeatures,
    add_noise,
    choose_site,
    extract_features,
    kmeans_labels,
    label_masks,
    lowres_from_segmentation,
    lowres_kmeans,
    pool_labels,
    upsample_labels,
)
from .mapper import (
    T_END,
    DifferenceMaps,
    assign,
    denoise_timesteps,
    difference_maps,
    injected_sites,
    injection_hooks,
    modulated_denoise_mapper,
    modulation_hook,
    plan,
    reference_attention,
    resolve_steps,
    run_modulated,
    smooth,
)
from .segmentation import Segmentation
from .settings import (
    DEFAULT_DEPTH,
    DEFAULT_GRID,
    DEFAULT_INJECT,
    DEFAULT_INJECT_ALL_STEPS,
    DEFAULT_K,
    DEFAULT_LAYER,
    DEFAULT_MAX_BATCH,
    DEFAULT_SIGMA,
    FAST_STEPS,
    GRID_FRACTION,
    PAPER_LAMBDA,
    PAPER_STEPS,
    PAPER_T_F,
    PAPER_T_M,
    QUALITY_PRESETS,
    DifferenceMode,
    EmerDiffSettings,
    InjectMode,
    preset,
)

__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_GRID",
    "DEFAULT_INJECT",
    "DEFAULT_INJECT_ALL_STEPS",
    "DEFAULT_K",
    "DEFAULT_LAYER",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_SIGMA",
    "DifferenceMaps",
    "DifferenceMode",
    "EmerDiffSettings",
    "FAST_STEPS",
    "GRID_FRACTION",
    "InjectMode",
    "LowResFeatures",
    "PAPER_LAMBDA",
    "PAPER_STEPS",
    "PAPER_T_F",
    "PAPER_T_M",
    "QUALITY_PRESETS",
    "T_END",
    "add_noise",
    "assign",
    "carry_words",
    "choose_site",
    "denoise_timesteps",
    "difference_maps",
    "emerdiff",
    "extract_features",
    "injected_sites",
    "injection_hooks",
    "kmeans_labels",
    "label_masks",
    "lowres_from_segmentation",
    "lowres_kmeans",
    "modulated_denoise_mapper",
    "modulation_hook",
    "plan",
    "pool_labels",
    "preset",
    "reference_attention",
    "resolve_steps",
    "run_modulated",
    "smooth",
    "upsample_labels",
]


def emerdiff(backend: Backend, latents: torch.Tensor, settings: EmerDiffSettings = EmerDiffSettings(), *,
             cond: Conditioning | None = None, seed: int = 0, image_size: tuple[int, int] | None = None,
             budget_bytes: int = DEFAULT_CHUNK_BYTES, progress: Progress | None = None) -> Segmentation:
    """The whole of EmerDiff: :func:`lowres_kmeans` (``settings.clusters``, ``t_f``) then
    :func:`modulated_denoise_mapper`.

    ``info["evaluations"]`` counts the feature pass too (``feature_evaluations``); the paper
    setting (``quality="faithful"``) at K = 20 with ``max_batch = 21`` needs
    ``1 + 15 * (40 + 2) = 631`` per image.
    """
    s = settings
    low = lowres_kmeans(backend, latents, s.clusters, cond=cond, timestep=s.t_f, seed=seed, grid=s.grid,
                        layer=s.layer, depth=s.depth, budget_bytes=budget_bytes, progress=progress)
    extra = {"evaluations": low.info["evaluations"], "feature_evaluations": low.info["evaluations"],
             "k": int(s.clusters), "t_f": int(s.t_f)}
    raw_low = low.lowres
    assert raw_low is not None
    return modulated_denoise_mapper(backend, latents, raw_low, s, cond=cond, seed=seed, image_size=image_size,
                                    method="emerdiff", extra_info=extra, budget_bytes=budget_bytes,
                                    progress=progress)


def _source_ids(labels: torch.Tensor, count: int, grid: torch.Tensor, ids: torch.Tensor) -> list[int]:
    """The raw low-res id behind each of ``count`` output segments (compact ids keep the raw ids'
    order). Exact when every id kept pixels; otherwise the increasing assignment of ids to segments
    with the most overlap between each segment and its id's upsampled cells."""
    n_ids = int(ids.numel())
    if count == n_ids:
        return ids.tolist()
    up = upsample_labels(grid.unsqueeze(0), tuple(labels.shape))[0]
    pos = torch.searchsorted(ids, up.reshape(-1))
    overlap = torch.bincount(labels.reshape(-1) * n_ids + pos, minlength=count * n_ids)
    ov = overlap.view(count, n_ids).tolist()
    neg = float("-inf")
    # best[j][i]: most overlap placing segments < j on ids < i, strictly increasing
    best = [[0.0] * (n_ids + 1)] + [[neg] * (n_ids + 1) for _ in range(count)]
    for j in range(1, count + 1):
        for i in range(j, n_ids + 1):
            best[j][i] = max(best[j][i - 1], best[j - 1][i - 1] + ov[j - 1][i - 1])
    chosen, i = [], n_ids
    for j in range(count, 0, -1):
        while best[j][i] == best[j][i - 1] and i > j:
            i -= 1
        chosen.append(i - 1)
        i -= 1
    return [int(ids[c]) for c in reversed(chosen)]


def carry_words(source: Segmentation, lowres: torch.Tensor, result: Segmentation) -> Segmentation:
    """Give the mapper's segments the words of the ``source`` segments they came from.

    ``lowres`` is the ``[1 or B, h, w]`` grid of ``source``'s segment ids the mapper was given."""
    if not source.words:
        return result
    words = []
    for b in range(result.batch_size):
        src = b if source.batch_size > 1 else 0
        grid = lowres[b if lowres.shape[0] > 1 else 0].to(result.labels.device)
        ids = torch.unique(grid)
        raw = _source_ids(result.labels[b], result.counts[b], grid, ids)
        names = source.words[src]
        words.append([names[r] if 0 <= r < len(names) else None for r in raw])
    out = result.with_words(words)
    if "words" in source.info:
        out = replace(out, info={**out.info, "words": list(source.info["words"])})
    return out
