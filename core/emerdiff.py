"""EmerDiff (Namekata et al., ICLR 2024): low-res k-means on UNet queries + the modulated denoising
mapper that turns any low-res label grid into an image-resolution segmentation.

No public code exists; this is a reconstruction from the paper. Every open choice is a
named parameter whose default is the paper's value where it is known, otherwise ours, with the
reason next to the constant.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from .attention import DEFAULT_CHUNK_BYTES, explicit_attention, query_chunk, split_heads
from .backend import Backend, Conditioning, OutputFn, PassHooks, Progress
from .errors import EmergentSegError, UnsupportedModelError
from .kmeans import kmeans
from .segmentation import Segmentation
from .sites import AttentionSite, select

__all__ = [
    "DifferenceMaps",
    "DifferenceMode",
    "InjectMode",
    "LowResFeatures",
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
    "QUALITY_PRESETS",
    "plan",
    "pool_labels",
    "preset",
    "reference_attention",
    "resolve_steps",
    "run_modulated",
    "smooth",
    "upsample_labels",
]

InjectMode = Literal["all", "self", "cross", "none"]
DifferenceMode = Literal["symmetric", "one_sided"]

# --- defaults and their provenance -----------------------------------------------------------
#: Token-grid side of the decoder block that gives features and takes the modulation. The paper
#: uses SD1.x's 16x16 block at 512 px [secondary], i.e. the grid at 1/32 of the image side. 0 (the
#: default) = that ratio at any size and model: the decoder grid nearest to image side / 32
#: (16x16 for SD1.x at 512 px, 32x32 for SDXL at 1024 px, 8x8 for the embedded 256 px model). A
#: positive value asks for the decoder grid nearest to that side instead.
DEFAULT_GRID = 0
#: The paper's feature grid as a fraction of the image side (16 / 512).
GRID_FRACTION = 1 / 32
#: Which spatial transformer of that grid's decoder blocks (0 = first). "First cross-attention
#: layer" for the features is [secondary]; the modulated layer is unknown (Fig. 14 compares the
#: three) [unverified] -- we use the same first layer.
DEFAULT_LAYER = 0
#: Transformer block inside that spatial transformer (SD1.x has depth 1; SDXL 2-10).
DEFAULT_DEPTH = 0
#: Feature timestep t_f = 1 (Table 6: larger t_f is worse) [secondary].
PAPER_T_F = 1
#: Modulation timestep t_m = 281 (Table 7: 281-481 work best) [secondary].
PAPER_T_M = 281
#: Modulation strength lambda = 10 (Table 8) [secondary].
PAPER_LAMBDA = 10.0
#: K is 10-40 in the paper with small changes (Table 4); the default is unknown -> 20.
DEFAULT_K = 20
#: Paper-faithful: the 50-step grid {981, ..., 21, 1} from t_m = 281 down: 281, 261, ..., 1 = 15
#: passes. We use deterministic DDIM (eta = 0) instead of the paper's DDPM [unverified] so the
#: "same noise for I+ and I-" requirement holds with no extra noise bookkeeping; the last step
#: returns the x0 prediction (alpha_prev = 1, as diffusers' DDPM scheduler's final step).
PAPER_STEPS = 15
#: Fast (project option, not a paper setting): one pass at t_m, decode its x0 prediction.
FAST_STEPS = 1
#: Named step settings accepted wherever ``steps`` is.
STEP_SETTINGS = {"paper": PAPER_STEPS, "fast": FAST_STEPS}
#: Named mapper settings (nodes' ``quality``, CLI ``--steps``): denoising passes and difference.
#: "fast" (project option): one pass at t_m, decode the x0 prediction, d = ||I+ - I_ref|| -> K+1
#: UNet evaluations per image at max_batch >= K+1 (K = 20: 21 vs the paper's 630, 30x fewer).
#: "faithful": the paper's 15 DDIM steps t_m = 281 -> 1 and d = ||I- - I+|| (2K+1 per step).
#: "fast-symmetric": one pass with the paper's symmetric difference (2K+1 evaluations).
QUALITY_PRESETS: dict[str, dict] = {
    "fast": {"steps": FAST_STEPS, "difference": "one_sided"},
    "faithful": {"steps": PAPER_STEPS, "difference": "symmetric"},
    "fast-symmetric": {"steps": FAST_STEPS, "difference": "symmetric"},
}


def preset(name: str) -> dict:
    """``{"steps", "difference"}`` of a :data:`QUALITY_PRESETS` entry (a copy), ready to pass on
    as keyword arguments to :func:`modulated_denoise_mapper` / :func:`emerdiff`."""
    if name not in QUALITY_PRESETS:
        raise EmergentSegError(f"unknown quality {name!r}; use one of: {', '.join(QUALITY_PRESETS)}")
    return dict(QUALITY_PRESETS[name])


#: Last timestep of the denoising grid (the 50-step grid ends at t = 1).
T_END = 1
#: Injection sites: the paper injects attention maps (Table 9: helps fine structure) but does not
#: say which layers/steps [unverified] -> all sites, all steps.
DEFAULT_INJECT: InjectMode = "all"
DEFAULT_INJECT_ALL_STEPS = True
#: Gaussian filter sigma in image pixels, applied to the difference maps d (not to M: blurring M
#: would change what is modulated, while the paper filters to suppress pixelated artefacts in the
#: result). The paper gives no sigma [unverified]; ours: 4 px, small next to the 32 px cells at
#: 512 px, so it smooths per-pixel decoder noise and cell-edge staircases, not the segments. 0 = off.
DEFAULT_SIGMA = 4.0
#: Batch members per UNet call including the reference: K = 20 -> 40 runs in 2 chunks (5 %
#: reference overhead). Lower it when a chunk does not fit in memory (benchmarks/bench_emerdiff.py
#: measures the working memory per batch size).
DEFAULT_MAX_BATCH = 21


# ---------------------------------------------------------------------------------------------
# Sites, noise, features
# ---------------------------------------------------------------------------------------------

def _as_grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def choose_site(backend: Backend | Sequence[AttentionSite], latent_hw: tuple[int, int],
                grid: int | tuple[int, int] = DEFAULT_GRID, layer: int = DEFAULT_LAYER,
                depth: int = DEFAULT_DEPTH) -> AttentionSite:
    """The decoder cross-attention site EmerDiff reads queries from and modulates.

    Among the sites with stage ``"up"`` and kind ``"cross"``, take the resolution whose token grid
    at ``latent_hw`` is nearest to ``grid`` (by log of the geometric-mean side; ties go to the
    coarser grid; ``grid = 0``: nearest to 1/32 of the image side, :data:`GRID_FRACTION`, with the
    image side = latent side x ``backend.latent_scale``, or x 8 when only sites are given), then the ``layer``-th spatial transformer of that resolution (in execution
    order) and its ``depth``-th transformer block. ``site.grid(latent_hw)`` tells which grid was
    used.

    Raises:
        UnsupportedModelError: the UNet has no decoder cross-attention.
        EmergentSegError: ``layer`` or ``depth`` do not exist at that resolution.
    """
    sites = backend.sites() if hasattr(backend, "sites") else list(backend)  # type: ignore[union-attr]
    up = [s for s in select(sites, kind="cross", stage="up")
          if s.grid(latent_hw)[0] > 0 and s.grid(latent_hw)[1] > 0]
    if not up:
        raise UnsupportedModelError(
            "this UNet has no cross-attention layers in its decoder, so EmerDiff has no layer to "
            "read queries from or to modulate; use an SD1.x/SD2.x/SDXL UNet")
    th, tw = _as_grid(grid)
    if th <= 0 or tw <= 0:  # auto: the paper's ratio of grid to image side
        scale = int(getattr(backend, "latent_scale", 8))
        th, tw = (max(1.0, side * scale * GRID_FRACTION) for side in latent_hw)
    target = math.log2(math.sqrt(th * tw))

    def distance(stride: int) -> tuple[float, int]:
        gh, gw = latent_hw[0] // stride, latent_hw[1] // stride
        return abs(math.log2(math.sqrt(gh * gw)) - target), -stride

    stride = min({s.stride for s in up}, key=distance)
    at = [s for s in up if s.stride == stride]
    blocks = sorted({s.block for s in at})
    if not 0 <= layer < len(blocks):
        g = at[0].grid(latent_hw)
        raise EmergentSegError(f"layer {layer} does not exist: the {g[0]}x{g[1]} decoder level has "
                               f"{len(blocks)} cross-attention transformers; use 0..{len(blocks) - 1}")
    in_block = [s for s in at if s.block == blocks[layer]]
    chosen = [s for s in in_block if s.depth == depth]
    if not chosen:
        raise EmergentSegError(f"depth {depth} does not exist in {in_block[0].key.rsplit('.', 3)[0]}; "
                               f"it has {len(in_block)} transformer blocks, use 0..{len(in_block) - 1}")
    return chosen[0]


def _check_latents(backend: Backend, latents: torch.Tensor) -> tuple[int, int]:
    if latents.ndim != 4:
        raise EmergentSegError(f"latents must be [B,C,h,w], got shape {tuple(latents.shape)}")
    sites = backend.sites()
    coarsest = max(s.stride for s in sites)
    h, w = int(latents.shape[-2]), int(latents.shape[-1])
    if h % coarsest or w % coarsest:
        m = coarsest * backend.latent_scale
        raise EmergentSegError(f"image size {w * backend.latent_scale}x{h * backend.latent_scale} is "
                               f"not a multiple of {m}; resize or crop it to a multiple of {m}")
    return h, w


def _check_timestep(backend: Backend, t: int, name: str, paper: int) -> None:
    n = len(backend.alphas_cumprod())
    if not 0 <= int(t) < n:
        raise EmergentSegError(f"{name} = {t} is outside the model's schedule (0..{n - 1}); "
                               f"EmerDiff uses {paper}")


def add_noise(backend: Backend, latents: torch.Tensor, timestep: int, seed: int = 0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """``sqrt(a_t)*x0 + sqrt(1-a_t)*eps`` in float32.

    ``eps`` is one fixed sample ``randn([C,h,w])`` from ``torch.Generator().manual_seed(seed)`` (CPU,
    so it is the same on every device), shared by every image of the batch -- an image's result is
    then the same whether it is run alone or in a batch. ``noise`` overrides it (``[C,h,w]`` or
    ``[B,C,h,w]``).
    """
    a = float(backend.alphas_cumprod()[int(timestep)])
    x0 = latents.float()
    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(tuple(x0.shape[1:]), generator=g)
    eps = noise.to(x0.device, torch.float32)
    if eps.ndim == 3:
        eps = eps.unsqueeze(0)
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * eps


@dataclass(frozen=True)
class LowResFeatures:
    """Queries of the feature site: ``features [B, h*w, heads*d]`` on ``grid`` (row-major)."""

    features: torch.Tensor
    grid: tuple[int, int]
    site: AttentionSite
    timestep: int
    evaluations: int


def extract_features(backend: Backend, latents: torch.Tensor, cond: Conditioning | None = None,
                     timestep: int = PAPER_T_F, seed: int = 0,
                     grid: int | tuple[int, int] = DEFAULT_GRID, layer: int = DEFAULT_LAYER,
                     depth: int = DEFAULT_DEPTH, site: AttentionSite | None = None,
                     budget_bytes: int = DEFAULT_CHUNK_BYTES,
                     progress: Progress | None = None) -> LowResFeatures:
    """One UNet pass on the latent noised to ``timestep`` (:func:`add_noise` with ``seed``); returns
    the ``q`` the chosen site's attention hook receives (``to_q(norm2(h))`` before head split).

    Args:
        backend: the model.
        latents: ``[B, C, h, w]`` scaled clean latents.
        cond: conditioning; ``None`` = the empty prompt (the paper's setting).
        timestep: t_f (paper: 1).
        seed: the noise sample.
        grid, layer, depth: site choice, see :func:`choose_site`; ``site`` overrides them.
        budget_bytes: memory for one query chunk of the site's attention.
        progress: one unit for the pass; polled for cancellation.
    """
    latent_hw = _check_latents(backend, latents)
    _check_timestep(backend, timestep, "t_f", PAPER_T_F)
    site = site or choose_site(backend, latent_hw, grid, layer, depth)
    b = latents.shape[0]
    n = site.grid(latent_hw)[0] * site.grid(latent_hw)[1]
    progress = progress or Progress()
    progress.grow(1)
    progress.check()
    captured: list[torch.Tensor] = []

    def hook(s: AttentionSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != b or q.shape[1] != n:
            raise EmergentSegError(f"attention at {s.key} has {q.shape[1]} queries for batch "
                                   f"{q.shape[0]}, expected {n} for {b}; the host split the batch")
        captured.append(q.detach().float().clone())
        return explicit_attention(q, k, v, s.heads, budget_bytes=budget_bytes)

    x_t = add_noise(backend, latents, timestep, seed).to(latents.dtype)
    cond = (cond or backend.empty_conditioning()).expand(b)
    t = torch.full((b,), int(timestep), dtype=torch.long, device=latents.device)
    with torch.no_grad():
        backend.predict_noise(x_t, t, cond, PassHooks({site.key: hook}))
    if len(captured) != 1:
        raise RuntimeError(f"the feature site {site.key} ran {len(captured)} times in one pass")
    progress.advance()
    return LowResFeatures(captured[0], site.grid(latent_hw), site, int(timestep), b)


def kmeans_labels(features: torch.Tensor, grid: tuple[int, int], k: int = DEFAULT_K, seed: int = 0,
                  iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Seeded k-means++ k-means of ``features [B, h*w, D]`` (batched over images, each image
    clustered as if alone) -> label grid ``[B, h, w]`` int64 in ``0..k-1``.

    Raises:
        EmergentSegError: ``k`` is larger than the number of cells.
    """
    if features.ndim == 2:
        features = features.unsqueeze(0)
    gh, gw = grid
    cells = gh * gw
    if features.shape[1] != cells:
        raise EmergentSegError(f"{features.shape[1]} feature vectors do not fill a {gh}x{gw} grid")
    if not 1 <= k <= cells:
        raise EmergentSegError(f"K = {k} segments requested but the {gh}x{gw} low-res grid has only "
                               f"{cells} cells; use 1 <= K <= {cells}")
    assign_, _ = kmeans(features.float(), k, seed=seed, iters=iters, tol=tol, init="k-means++")
    return assign_.view(-1, gh, gw)


def upsample_labels(grid_labels: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Upsample a label grid ``[B, h, w]`` to ``size = (H, W)``: ``"nearest"``, or ``"bilinear"``
    (each label's one-hot mask upsampled bilinearly, half-pixel centres, then the argmax: the
    paper's naive baseline, smooth boundaries instead of cell staircases)."""
    if mode == "nearest":
        up = F.interpolate(grid_labels.unsqueeze(1).float(), size=size, mode="nearest")
        return up.squeeze(1).round().to(torch.int64)
    if mode != "bilinear":
        raise EmergentSegError(f"unknown upsampling {mode!r}; use nearest or bilinear")
    ids = torch.unique(grid_labels)
    out = torch.empty((grid_labels.shape[0], *size), dtype=torch.int64, device=grid_labels.device)
    for b in range(grid_labels.shape[0]):
        onehot = (grid_labels[b].unsqueeze(0) == ids.view(-1, 1, 1)).to(torch.float32)
        soft = F.interpolate(onehot.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
        out[b] = ids[soft.argmax(0)]
    return out


def lowres_kmeans(backend: Backend, latents: torch.Tensor, k: int = DEFAULT_K,
                  cond: Conditioning | None = None, timestep: int = PAPER_T_F, seed: int = 0,
                  grid: int | tuple[int, int] = DEFAULT_GRID, layer: int = DEFAULT_LAYER,
                  depth: int = DEFAULT_DEPTH, iters: int = 100, tol: float = 1e-6,
                  image_size: tuple[int, int] | None = None,
                  budget_bytes: int = DEFAULT_CHUNK_BYTES,
                  progress: Progress | None = None) -> Segmentation:
    """EmerDiff's low-res segmentation: features (:func:`extract_features`) + k-means
    (:func:`kmeans_labels`, same ``seed``).

    Returns a :class:`Segmentation` whose ``lowres`` is the k-means grid and whose ``labels`` are
    that grid nearest-upsampled to the image (``image_size`` or latent size x ``latent_scale``).
    ``info``: grid, site, timestep, k, evaluations (UNet evaluations, one per image).
    """
    latent_hw = _check_latents(backend, latents)
    site = choose_site(backend, latent_hw, grid, layer, depth)
    g = site.grid(latent_hw)
    if not 1 <= k <= g[0] * g[1]:  # fail before the UNet pass
        raise EmergentSegError(f"K = {k} segments requested but the {g[0]}x{g[1]} low-res grid has "
                               f"only {g[0] * g[1]} cells; use 1 <= K <= {g[0] * g[1]}")
    feats = extract_features(backend, latents, cond, timestep, seed, site=site,
                             budget_bytes=budget_bytes, progress=progress)
    low = kmeans_labels(feats.features, feats.grid, k, seed, iters, tol)
    size = image_size or (latent_hw[0] * backend.latent_scale, latent_hw[1] * backend.latent_scale)
    info = {"grid": list(feats.grid), "grid_requested": list(_as_grid(grid)), "site": site.key,
            "timestep": int(timestep), "k": int(k), "seed": int(seed),
            "evaluations": feats.evaluations, "vae_decodes": 0}
    return Segmentation.from_labels(upsample_labels(low, size), method="emerdiff-kmeans",
                                    lowres=low, info=info)


# ---------------------------------------------------------------------------------------------
# Any low-res segmentation -> the mapper's input
# ---------------------------------------------------------------------------------------------

def pool_labels(labels: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """Majority vote of a full-resolution label map ``[B, H, W]`` (or ``[H, W]``) onto ``grid``.

    Pixel ``(y, x)`` belongs to cell ``(y*h // H, x*w // W)``, so sizes need not divide. Each cell
    takes its most frequent label; ties go to the lowest label id. Label ids are kept (no
    relabelling). A segment that wins no cell (smaller than about one cell) disappears from the
    grid: the mapper cannot modulate it, so it keeps no pixels in the mapper's output.
    """
    if labels.ndim == 2:
        labels = labels.unsqueeze(0)
    if labels.ndim != 3:
        raise EmergentSegError(f"labels must be [B,H,W], got shape {tuple(labels.shape)}")
    gh, gw = _as_grid(grid)
    b, hh, ww = labels.shape
    if gh > hh or gw > ww or gh < 1 or gw < 1:
        raise EmergentSegError(f"cannot pool {hh}x{ww} labels onto a {gh}x{gw} grid")
    values, ids = torch.unique(labels.to(torch.int64), return_inverse=True)  # sorted ids
    n_ids = int(values.numel())
    ys = torch.arange(hh, device=labels.device) * gh // hh
    xs = torch.arange(ww, device=labels.device) * gw // ww
    cell = ys.view(-1, 1) * gw + xs.view(1, -1)
    out = torch.empty(b, gh, gw, dtype=torch.int64, device=labels.device)
    for i in range(b):
        flat = (cell * n_ids + ids[i]).reshape(-1)
        counts = torch.bincount(flat, minlength=gh * gw * n_ids).view(gh * gw, n_ids)
        out[i] = values[counts.argmax(dim=1)].view(gh, gw)  # argmax: first maximum = lowest id
    return out


def lowres_from_segmentation(seg: Segmentation, grid: tuple[int, int]) -> torch.Tensor:
    """The ``[B, h, w]`` grid the mapper needs from any :class:`Segmentation`: its ``lowres`` when
    that already has shape ``grid``, otherwise :func:`pool_labels` of its full-resolution labels
    (e.g. a DiffSeg result)."""
    if seg.lowres is not None and tuple(seg.lowres.shape[-2:]) == tuple(grid):
        return seg.lowres
    return pool_labels(seg.labels, grid)


def label_masks(lowres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks of the labels present in one grid ``[h, w]``.

    Returns ``(ids [K], masks [K, h, w] float32)``, ids increasing; ``masks.sum(0) == 1`` in every
    cell (the masks partition the grid).
    """
    if lowres.ndim != 2:
        raise EmergentSegError(f"a low-res label grid must be [h, w], got shape {tuple(lowres.shape)}")
    ids = torch.unique(lowres)
    masks = (lowres.unsqueeze(0) == ids.view(-1, 1, 1)).float()
    return ids, masks


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------

def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        ref: int = 0, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Attention injection: member ``ref``'s probabilities applied to every member's V.

    Same result as ``explicit_attention(q, k, v, heads, replace_probs=lambda s, p:
    p[ref:ref+1].expand_as(p))`` up to float rounding (float32 probabilities), but only member
    ``ref``'s scores and softmax are computed, and every member's V is multiplied in one GEMM per
    head. No map outlives its query chunk.

    Returns ``[B, Nq, heads*d]`` in ``q``'s dtype, before ``to_out``.
    """
    qh = split_heads(q[ref:ref + 1], heads)[0]                     # [heads, Nq, d]
    kh = split_heads(k[ref:ref + 1], heads)[0]
    b, nq, nk = v.shape[0], q.shape[1], k.shape[1]
    dv = v.shape[-1] // heads
    # every member's V side by side: [heads, Nk, B*dv]; one GEMM per head applies the reference's
    # probabilities to all members (no expanded copy of the probabilities, no per-member bmm)
    vw = v.float().view(b, nk, heads, dv).permute(2, 1, 0, 3).reshape(heads, nk, b * dv)
    scale = qh.shape[-1] ** -0.5
    kt = kh.float().transpose(-1, -2)
    out = torch.empty(heads, nq, b * dv, dtype=torch.float32, device=q.device)
    step = query_chunk(1, heads, nq, nk, budget_bytes)
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        scores = torch.matmul(qh[:, start:stop].float(), kt)
        scores.mul_(scale)
        probs = scores.softmax(dim=-1)
        del scores
        torch.matmul(probs, vw, out=out[:, start:stop])
    return out.view(heads, nq, b, dv).permute(2, 1, 0, 3).reshape(b, nq, heads * dv).to(q.dtype)


def modulation_hook(site: AttentionSite, masks: torch.Tensor, coeffs: torch.Tensor) -> OutputFn:
    """Output hook adding ``c_j * M_j`` to member ``j``'s output of ``site`` (after ``to_out``).

    Args:
        site: the modulated site; on any other site the hook returns its input unchanged.
        masks: ``[Bc, N]`` (or ``[Bc, h, w]``, flattened row-major), one mask per batch member.
        coeffs: ``[Bc]``; 0 for the reference.
    """
    flat = masks.reshape(masks.shape[0], -1).float()
    scale = (coeffs.float().view(-1, 1) * flat).unsqueeze(-1)  # [Bc, N, 1], broadcast over C

    def hook(s: AttentionSite, hidden: torch.Tensor) -> torch.Tensor:
        if s.key != site.key:
            return hidden
        if hidden.shape[0] != scale.shape[0] or hidden.shape[1] != scale.shape[1]:
            raise EmergentSegError(f"modulation at {s.key}: output has batch {hidden.shape[0]} and "
                                   f"{hidden.shape[1]} tokens, masks have {scale.shape[0]} and "
                                   f"{scale.shape[1]}; the host split the batch or the grid differs")
        return hidden + scale.to(hidden.device, hidden.dtype)
    return hook


def injected_sites(sites: Sequence[AttentionSite], mode: InjectMode) -> list[AttentionSite]:
    """Sites whose attention probabilities come from the reference: all, self, cross or none."""
    if mode == "all":
        return list(sites)
    if mode in ("self", "cross"):
        return [s for s in sites if s.kind == mode]
    if mode == "none":
        return []
    raise EmergentSegError(f"unknown injection mode {mode!r}; use 'all', 'self', 'cross' or 'none'")


def injection_hooks(sites: Sequence[AttentionSite], ref: int = 0,
                    budget_bytes: int = DEFAULT_CHUNK_BYTES) -> PassHooks:
    """Attention hooks that inject member ``ref``'s probabilities at ``sites``."""
    def hook(s: AttentionSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return reference_attention(q, k, v, s.heads, ref, budget_bytes)
    return PassHooks({s.key: hook for s in sites})


# ---------------------------------------------------------------------------------------------
# Modulated denoising
# ---------------------------------------------------------------------------------------------

def resolve_steps(steps: int | str) -> int:
    """``"paper"`` -> 15, ``"fast"`` -> 1, an int >= 1 -> itself."""
    if isinstance(steps, str):
        if steps not in STEP_SETTINGS:
            raise EmergentSegError(f"unknown step setting {steps!r}; use 'paper', 'fast' or a number")
        return STEP_SETTINGS[steps]
    if int(steps) < 1:
        raise EmergentSegError(f"steps must be >= 1, got {steps}")
    return int(steps)


def denoise_timesteps(t_m: int = PAPER_T_M, steps: int | str = PAPER_STEPS,
                      t_end: int = T_END) -> list[int]:
    """``steps`` timesteps evenly spaced from ``t_m`` down to ``t_end`` (rounded).

    ``(281, 15)`` gives 281, 261, ..., 1 -- the 50-step grid's tail; ``steps = 1`` gives ``[t_m]``.
    """
    n = resolve_steps(steps)
    if n == 1:
        return [int(t_m)]
    if n > t_m - t_end + 1:
        raise EmergentSegError(f"{n} steps do not fit between t_m = {t_m} and t = {t_end}; "
                               f"use at most {t_m - t_end + 1}")
    return [round(t_m - i * (t_m - t_end) / (n - 1)) for i in range(n)]


def run_modulated(backend: Backend, x_t: torch.Tensor, site: AttentionSite, masks: torch.Tensor,
                  coeffs: torch.Tensor, timesteps: Sequence[int], cond: Conditioning | None = None,
                  inject: InjectMode = DEFAULT_INJECT,
                  inject_all_steps: bool = DEFAULT_INJECT_ALL_STEPS, reference: bool = True,
                  budget_bytes: int = DEFAULT_CHUNK_BYTES,
                  progress: Progress | None = None) -> torch.Tensor:
    """One chunk: denoise ``x_t`` (one image, ``[1, C, h, w]``, at ``timesteps[0]``) for every
    member in one batch and return the final x0 latents. The sampler runs in float32; each pass
    gets the latents in ``x_t``'s dtype.

    The batch is ``[reference] + members`` when ``reference`` (required for injection), else just
    the members. Member ``j`` adds ``coeffs[j] * masks[j]`` to ``site``'s output at the first step
    only. Injected sites (``inject``) use the reference's probabilities at the first step and, when
    ``inject_all_steps``, at every later step. Deterministic DDIM (eta = 0); the last step returns
    the x0 prediction.

    Args:
        masks: ``[M, gh, gw]`` low-res masks on ``site``'s grid.
        coeffs: ``[M]`` modulation coefficients (``+lam`` / ``-lam``).
        progress: one unit per UNet pass; polled for cancellation.

    Returns:
        ``[M(+1), C, h, w]`` float32 x0 latents, the reference first when included.
    """
    if inject != "none" and not reference:
        raise EmergentSegError("attention injection needs the reference run in the batch")
    m = masks.shape[0]
    if coeffs.shape != (m,):
        raise EmergentSegError(f"{coeffs.shape[0]} coefficients for {m} masks")
    device = x_t.device
    dtype = x_t.dtype
    lead = 1 if reference else 0
    bc = m + lead
    flat = masks.reshape(m, -1).to(device, torch.float32)
    c = coeffs.to(device, torch.float32)
    if reference:
        flat = torch.cat([torch.zeros_like(flat[:1]), flat])
        c = torch.cat([torch.zeros_like(c[:1]), c])
    mod = PassHooks(output={site.key: modulation_hook(site, flat, c)})
    inj = injection_hooks(injected_sites(backend.sites(), inject), 0, budget_bytes) if inject != "none" \
        else PassHooks()
    first = PassHooks(inj.attention, mod.output)
    alphas = backend.alphas_cumprod()
    cond = (cond or backend.empty_conditioning()).expand(1)
    x = x_t.float().expand(bc, -1, -1, -1).clone()
    progress = progress or Progress()
    for i, t in enumerate(timesteps):
        progress.check()
        hooks = first if i == 0 else (inj if inject_all_steps else PassHooks())
        tt = torch.full((bc,), int(t), dtype=torch.long, device=device)
        with torch.no_grad():
            eps = backend.predict_noise(x.to(dtype), tt, cond, hooks).float()
        a = float(alphas[int(t)])
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        if i + 1 < len(timesteps):
            a_prev = float(alphas[int(timesteps[i + 1])])
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        else:
            x = x0
        progress.advance()
    return x


@dataclass(frozen=True)
class DifferenceMaps:
    """Result of :func:`difference_maps` for one image.

    Attributes:
        maps: ``[K, H, W]`` float32, ``d_i`` per pixel (unsmoothed).
        evaluations: UNet evaluations, counted per batch member (a chunk of 11 at 15 steps = 165).
        unet_passes: UNet calls (chunks x steps).
        decodes: VAE decodes, per image decoded.
        chunks: how many UNet batches the runs were split into.
        timesteps: the denoising timesteps.
        site: the modulated site.
    """

    maps: torch.Tensor
    evaluations: int
    unet_passes: int
    decodes: int
    chunks: int
    timesteps: tuple[int, ...]
    site: AttentionSite


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan(k: int, steps: int | str = PAPER_STEPS, max_batch: int = DEFAULT_MAX_BATCH,
         inject: InjectMode = DEFAULT_INJECT, difference: DifferenceMode = "symmetric",
         features: bool = False) -> dict:
    """What :func:`difference_maps` will run for ``k`` masks on one image (for progress bars,
    UIs and the benchmark): ``chunk_sizes`` (UNet batch per chunk, reference included),
    ``unet_passes``, ``evaluations`` (UNet evaluations per batch member, + 1 for the feature
    pass when ``features``), ``decodes`` (VAE images) and ``decode_chunks``.

    Members are ``+lam`` for every mask then ``-lam`` for every mask (``one_sided``: ``+lam``
    only), split into the fewest chunks that fit ``max_batch`` with balanced sizes; the
    reference is member 0 of every chunk when injecting, of the first chunk only when
    ``one_sided`` needs its image, else absent.
    """
    n_steps = resolve_steps(steps)
    if difference not in ("symmetric", "one_sided"):
        raise EmergentSegError(f"unknown difference {difference!r}; use 'symmetric' or 'one_sided'")
    if inject not in ("all", "self", "cross", "none"):
        raise EmergentSegError(f"unknown injection mode {inject!r}; use 'all', 'self', 'cross' or 'none'")
    sides = 2 if difference == "symmetric" else 1
    members = sides * k
    ref_every = inject != "none"
    ref_first = difference == "one_sided"
    slots = max_batch - (1 if ref_every or ref_first else 0)
    if slots < 1:
        raise EmergentSegError(f"max_batch = {max_batch} leaves no room next to the reference; use >= 2")
    n_chunks = max(1, math.ceil(members / slots))
    sizes = [s + (1 if ref_every or (ref_first and i == 0) else 0)
             for i, s in enumerate(_split(members, n_chunks))]
    per_decode = max(1, max_batch // sides)
    decode_chunks = math.ceil(k / per_decode) + (1 if ref_first else 0)
    return {"chunk_sizes": sizes, "chunks": n_chunks, "steps": n_steps,
            "unet_passes": n_chunks * n_steps,
            "evaluations": sum(sizes) * n_steps + (1 if features else 0),
            "decodes": members + (1 if ref_first else 0), "decode_chunks": decode_chunks,
            "decode_batch": per_decode}


def difference_maps(backend: Backend, latent: torch.Tensor, masks: torch.Tensor,
                    lam: float = PAPER_LAMBDA, t_m: int = PAPER_T_M, steps: int | str = PAPER_STEPS,
                    cond: Conditioning | None = None, seed: int = 0,
                    noise: torch.Tensor | None = None,
                    grid: int | tuple[int, int] = DEFAULT_GRID, layer: int = DEFAULT_LAYER,
                    depth: int = DEFAULT_DEPTH, site: AttentionSite | None = None,
                    inject: InjectMode = DEFAULT_INJECT,
                    inject_all_steps: bool = DEFAULT_INJECT_ALL_STEPS,
                    difference: DifferenceMode = "symmetric",
                    max_batch: int = DEFAULT_MAX_BATCH, budget_bytes: int = DEFAULT_CHUNK_BYTES,
                    progress: Progress | None = None) -> DifferenceMaps:
    """EmerDiff's difference maps for one image and ``K`` low-res masks (any ``lam``, including 0,
    and empty masks, which give ``d = 0``: this is the diagnostic entry point; the mapper
    validates).

    Args:
        latent: ``[1, C, h, w]`` or ``[C, h, w]`` scaled clean latent.
        masks: ``[K, gh, gw]`` on ``site``'s grid (values are used as given; binary in EmerDiff).
        lam: modulation strength; members run ``+lam`` and ``-lam``.
        t_m: modulation timestep (paper 281).
        steps: denoising passes from ``t_m`` to 0: ``"paper"`` (15), ``"fast"`` (1) or a number.
        cond: conditioning (``None`` = empty prompt, the paper's setting).
        seed / noise: the one fixed noise sample (see :func:`add_noise`).
        grid, layer, depth / site: modulated site (see :func:`choose_site`).
        inject: sites whose probabilities come from the unmodulated reference.
        inject_all_steps: inject at every step (default) or only at the modulated ``t_m`` step.
        difference: ``"symmetric"`` (paper: ``||I- - I+||``, 2K runs) or ``"one_sided"``
            (``||I+ - I_ref||``, K runs; ≈ half the paper value while the response is linear in c).
        max_batch: batch members per UNet call, the reference included; chunk sizes are balanced.
        budget_bytes: memory for one query chunk of injected attention.
        progress: one unit per UNet pass and per decode chunk; polled for cancellation.
    """
    if latent.ndim == 3:
        latent = latent.unsqueeze(0)
    if latent.shape[0] != 1:
        raise EmergentSegError(f"difference_maps takes one image, got a batch of {latent.shape[0]}")
    latent_hw = _check_latents(backend, latent)
    _check_timestep(backend, t_m, "t_m", PAPER_T_M)
    if difference not in ("symmetric", "one_sided"):
        raise EmergentSegError(f"unknown difference {difference!r}; use 'symmetric' or 'one_sided'")
    injected_sites(backend.sites(), inject)  # validates the mode
    site = site or choose_site(backend, latent_hw, grid, layer, depth)
    g = site.grid(latent_hw)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != g:
        raise EmergentSegError(f"masks must be [K, {g[0]}, {g[1]}] for {site.key} at this image size, "
                               f"got shape {tuple(masks.shape)}")
    k = masks.shape[0]
    if k < 1:
        raise EmergentSegError("no masks to modulate; the low-res segmentation is empty")
    timesteps = denoise_timesteps(t_m, steps)
    x_t = add_noise(backend, latent, t_m, seed, noise)  # float32; the backend casts per pass
    cond = (cond or backend.empty_conditioning()).expand(1)
    progress = progress or Progress()

    signs = [1.0, -1.0] if difference == "symmetric" else [1.0]
    member_mask = [i for _ in signs for i in range(k)]               # [+0..+K-1, -0..-K-1]
    member_coef = [s * float(lam) for s in signs for _ in range(k)]
    ref_every = inject != "none"            # injection needs the reference in every chunk
    need_ref_image = difference == "one_sided"
    todo = plan(k, len(timesteps), max_batch, inject, difference)
    sizes = [s - (1 if ref_every or (need_ref_image and i == 0) else 0)
             for i, s in enumerate(todo["chunk_sizes"])]
    n_chunks = todo["chunks"]
    progress.grow(todo["unet_passes"] + todo["decode_chunks"])

    finals: list[torch.Tensor] = []
    ref_final: torch.Tensor | None = None
    evaluations = 0
    start = 0
    for ci, size in enumerate(sizes):
        progress.check()
        idx = list(range(start, start + size))
        start += size
        with_ref = ref_every or (need_ref_image and ci == 0)
        out = run_modulated(backend, x_t, site, masks[[member_mask[j] for j in idx]],
                            torch.tensor([member_coef[j] for j in idx]), timesteps, cond,
                            inject, inject_all_steps, with_ref, budget_bytes, progress)
        evaluations += out.shape[0] * len(timesteps)
        if with_ref:
            if ref_final is None:
                ref_final = out[:1]
            out = out[1:]
        finals.append(out)
    final = torch.cat(finals)                                         # [n_members, C, h, w]
    unet_passes = n_chunks * len(timesteps)
    assert evaluations == todo["evaluations"], (evaluations, todo)

    maps: list[torch.Tensor] = []
    decodes = 0
    per = todo["decode_batch"]
    ref_img = None
    if need_ref_image:
        assert ref_final is not None
        progress.check()
        ref_img = backend.decode(ref_final.to(latent.dtype)).float()
        decodes += 1
        progress.advance()
    for i0 in range(0, k, per):
        progress.check()
        i1 = min(k, i0 + per)
        if difference == "symmetric":
            batch = torch.cat([final[i0:i1], final[k + i0:k + i1]]).to(latent.dtype)
            imgs = backend.decode(batch).float()
            plus, minus = imgs[: i1 - i0], imgs[i1 - i0:]
            maps.append((minus - plus).pow(2).sum(dim=1).sqrt())
            decodes += 2 * (i1 - i0)
        else:
            plus = backend.decode(final[i0:i1].to(latent.dtype)).float()
            maps.append((plus - ref_img).pow(2).sum(dim=1).sqrt())
            decodes += i1 - i0
        progress.advance()
    return DifferenceMaps(torch.cat(maps), evaluations, unet_passes, decodes, n_chunks,
                          tuple(timesteps), site)


def smooth(d: torch.Tensor, sigma: float = DEFAULT_SIGMA) -> torch.Tensor:
    """Gaussian filter (kornia, kernel ``2*ceil(3 sigma)+1``, replicate border) of each map of
    ``d [K, H, W]``; ``sigma = 0`` returns ``d`` unchanged."""
    if sigma < 0:
        raise EmergentSegError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return d
    r = math.ceil(3 * sigma)
    return gaussian_blur2d(d.unsqueeze(1).float(), (2 * r + 1, 2 * r + 1), (float(sigma), float(sigma)),
                           border_type="replicate").squeeze(1)


def assign(d: torch.Tensor) -> torch.Tensor:
    """Per-pixel argmax over the maps ``[K, H, W]`` -> ``[H, W]`` int64; ties go to the lowest
    index (``torch.argmax`` returns the first maximum)."""
    return d.argmax(dim=0)


def modulated_denoise_mapper(backend: Backend, latents: torch.Tensor, lowres: torch.Tensor,
                             lam: float = PAPER_LAMBDA, t_m: int = PAPER_T_M,
                             steps: int | str = PAPER_STEPS, sigma: float = DEFAULT_SIGMA,
                             cond: Conditioning | None = None, seed: int = 0,
                             grid: int | tuple[int, int] = DEFAULT_GRID,
                             layer: int = DEFAULT_LAYER, depth: int = DEFAULT_DEPTH,
                             inject: InjectMode = DEFAULT_INJECT,
                             inject_all_steps: bool = DEFAULT_INJECT_ALL_STEPS,
                             difference: DifferenceMode = "symmetric",
                             max_batch: int = DEFAULT_MAX_BATCH,
                             image_size: tuple[int, int] | None = None, method: str = "emerdiff",
                             budget_bytes: int = DEFAULT_CHUNK_BYTES, extra_info: dict | None = None,
                             progress: Progress | None = None) -> Segmentation:
    """EmerDiff's modulated denoising mapper: any low-res label grid -> image-resolution labels.

    Every label present in ``lowres[b]`` is one mask; labels absent from the grid (e.g. a DiffSeg
    segment lost by :func:`pool_labels`) are not modulated and get no pixels. Per image:
    :func:`difference_maps` -> :func:`smooth` (``sigma``, on ``d``) -> :func:`assign`; output
    labels carry the grid's label ids, compacted by :meth:`Segmentation.from_labels`.

    Args:
        latents: ``[B, C, h, w]`` scaled clean latents.
        lowres: ``[B, gh, gw]`` (or ``[gh, gw]``) integer labels on the modulated site's grid.
        lam: modulation strength, non-zero (paper 10).
        image_size: ``(H, W)`` of the output; default the decoded size. Difference maps are
            resized bilinearly when it differs.
        method: stored in the result ("emerdiff", "diffseg+mapper", ...).
        extra_info: merged into ``info`` (e.g. the feature pass's evaluations).
        other arguments: see :func:`difference_maps`.

    Returns:
        :class:`Segmentation` with ``lowres`` = the input grid and ``info``: grid, site, steps,
        timesteps, evaluations (UNet evaluations per batch member, summed), unet_passes,
        vae_decodes, chunks, segments per image, and the settings.
    """
    if float(lam) == 0.0:
        raise EmergentSegError("lambda must be non-zero: with lambda = 0 the modulated runs equal the "
                               "reference and every difference map is zero; EmerDiff uses lambda = 10")
    latent_hw = _check_latents(backend, latents)
    site = choose_site(backend, latent_hw, grid, layer, depth)
    g = site.grid(latent_hw)
    if lowres.ndim == 2:
        lowres = lowres.unsqueeze(0)
    if lowres.ndim != 3 or tuple(lowres.shape[-2:]) != g:
        raise EmergentSegError(
            f"the low-res segmentation has grid {tuple(lowres.shape[-2:])} but the modulated layer "
            f"{site.key} works on a {g[0]}x{g[1]} grid at this image size; pool it with "
            f"pool_labels(labels, {g}) or compute it from the same image size")
    if lowres.shape[0] not in (1, latents.shape[0]):
        raise EmergentSegError(f"{lowres.shape[0]} low-res grids for {latents.shape[0]} images")
    if lowres.is_floating_point():
        raise EmergentSegError("the low-res segmentation must hold integer labels")
    b = latents.shape[0]
    lowres = lowres.expand(b, -1, -1)
    n = resolve_steps(steps)
    progress = progress or Progress()
    cond_b = (cond or backend.empty_conditioning()).expand(b)
    out: list[torch.Tensor] = []
    evaluations = unet_passes = decodes = chunks = 0
    segments = []
    timesteps: tuple[int, ...] = ()
    for i in range(b):
        progress.check()
        ids, masks = label_masks(lowres[i].to(latents.device))
        dm = difference_maps(backend, latents[i:i + 1], masks, lam, t_m, n, cond_b.select([i]), seed,
                             site=site, inject=inject, inject_all_steps=inject_all_steps,
                             difference=difference, max_batch=max_batch, budget_bytes=budget_bytes,
                             progress=progress)
        d = smooth(dm.maps, sigma)
        if image_size is not None and tuple(d.shape[-2:]) != tuple(image_size):
            d = F.interpolate(d.unsqueeze(0), size=image_size, mode="bilinear",
                              align_corners=False).squeeze(0)
        out.append(ids.to(d.device)[assign(d)])
        evaluations += dm.evaluations
        unet_passes += dm.unet_passes
        decodes += dm.decodes
        chunks += dm.chunks
        segments.append(int(ids.numel()))
        timesteps = dm.timesteps
    info = {"grid": list(g), "grid_requested": list(_as_grid(grid)), "site": site.key,
            "steps": n, "timesteps": list(timesteps), "t_m": int(t_m), "lambda": float(lam),
            "inject": inject, "inject_all_steps": bool(inject_all_steps), "difference": difference,
            "sigma": float(sigma), "seed": int(seed), "max_batch": int(max_batch),
            "segments": segments, "evaluations": evaluations, "unet_passes": unet_passes,
            "vae_decodes": decodes, "chunks": chunks}
    if extra_info:
        for key, value in extra_info.items():
            if key == "evaluations":
                info["mapper_evaluations"] = evaluations
                info["evaluations"] = evaluations + int(value)
            elif key not in info:
                info[key] = value
    return Segmentation.from_labels(torch.stack(out), method=method, lowres=lowres.clone(), info=info)


def emerdiff(backend: Backend, latents: torch.Tensor, k: int = DEFAULT_K, lam: float = PAPER_LAMBDA,
             t_f: int = PAPER_T_F, t_m: int = PAPER_T_M, steps: int | str = PAPER_STEPS,
             sigma: float = DEFAULT_SIGMA, cond: Conditioning | None = None, seed: int = 0,
             grid: int | tuple[int, int] = DEFAULT_GRID, layer: int = DEFAULT_LAYER,
             depth: int = DEFAULT_DEPTH, inject: InjectMode = DEFAULT_INJECT,
             inject_all_steps: bool = DEFAULT_INJECT_ALL_STEPS,
             difference: DifferenceMode = "symmetric", max_batch: int = DEFAULT_MAX_BATCH,
             image_size: tuple[int, int] | None = None, budget_bytes: int = DEFAULT_CHUNK_BYTES,
             progress: Progress | None = None) -> Segmentation:
    """The whole of EmerDiff: :func:`lowres_kmeans` then :func:`modulated_denoise_mapper`.

    ``info["evaluations"]`` counts the feature pass too (``feature_evaluations``); the paper
    setting at K = 20 with ``max_batch = 21`` needs ``1 + 15 * (40 + 2) = 631`` per image.
    """
    low = lowres_kmeans(backend, latents, k, cond, t_f, seed, grid, layer, depth,
                        budget_bytes=budget_bytes, progress=progress)
    extra = {"evaluations": low.info["evaluations"], "feature_evaluations": low.info["evaluations"],
             "k": int(k), "t_f": int(t_f)}
    raw_low = low.lowres
    assert raw_low is not None
    return modulated_denoise_mapper(backend, latents, raw_low, lam, t_m, steps, sigma, cond, seed,
                                    grid, layer, depth, inject, inject_all_steps, difference,
                                    max_batch, image_size, "emerdiff", budget_bytes, extra, progress)


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
