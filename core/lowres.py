"""EmerDiff, stage 1 and the mapper's input: attention sites at the paper's grid, noising, the
low-res query features, k-means on them, and pooling any segmentation onto that grid."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import DEFAULT_CHUNK_BYTES, explicit_attention
from .backend import Backend, Conditioning, PassHooks, Progress
from .errors import EmergentSegError, UnsupportedModelError
from .kmeans import kmeans
from .segmentation import Segmentation
from .settings import (DEFAULT_DEPTH, DEFAULT_GRID, DEFAULT_K,
                       DEFAULT_LAYER, GRID_FRACTION, PAPER_T_F)
from .sites import AttentionSite, select


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

    A backend without a UNet decoder (a DiT) names its own site with ``emerdiff_site``.

    Raises:
        UnsupportedModelError: the UNet has no decoder cross-attention.
        EmergentSegError: ``layer`` or ``depth`` do not exist at that resolution.
    """
    if hasattr(backend, "emerdiff_site"):
        return backend.emerdiff_site(latent_hw, grid, layer, depth)  # type: ignore[union-attr]
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


def lowres_kmeans(backend: Backend, latents: torch.Tensor, k: int = DEFAULT_K, *,
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
            "layer": int(layer), "timestep": int(timestep), "k": int(k), "seed": int(seed),
            "evaluations": feats.evaluations, "vae_decodes": 0}
    return Segmentation.from_labels(upsample_labels(low, size), method="emerdiff-kmeans",
                                    lowres=low, lowres_layer=int(layer), info=info)


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
