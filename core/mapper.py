"""EmerDiff, stage 2: the modulated denoising mapper (see ``core/emerdiff.py`` for the method).

Hooks that add ``c * M`` to a cross-attention output and inject the reference run's attention,
the batched denoising runs, the difference maps, smoothing and the per-pixel assignment."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from .attention import DEFAULT_CHUNK_BYTES, query_chunk, split_heads
from .backend import Backend, Conditioning, OutputFn, PassHooks, Progress
from .errors import EmergentSegError
from .segmentation import Segmentation
from .settings import (DEFAULT_DEPTH, DEFAULT_GRID, DEFAULT_INJECT, DEFAULT_INJECT_ALL_STEPS, DEFAULT_LAYER, DEFAULT_MAX_BATCH, DEFAULT_SIGMA, PAPER_LAMBDA,
                       PAPER_STEPS, PAPER_T_M, DifferenceMode, EmerDiffSettings,
                       InjectMode)
from .sites import AttentionSite
from .lowres import _as_grid, _check_latents, _check_timestep, add_noise, choose_site, label_masks


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

def resolve_steps(steps: int) -> int:
    """A number of denoising steps, checked (>= 1). Named settings are the mapper presets
    (:data:`QUALITY_PRESETS`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EmergentSegError(f"steps must be a whole number >= 1, got {steps!r} (the mapper presets "
                               f"fast/faithful/fast-symmetric set it for you)")
    return int(steps)


#: Last timestep of the denoising grid (the 50-step grid ends at t = 1). We denoise with
#: deterministic DDIM (eta = 0) rather than the paper's DDPM sampler, so the "same noise for I+ and
#: I-" requirement holds with no extra noise bookkeeping; the last step returns the x0 prediction
#: (alpha_prev = 1, as diffusers' DDPM scheduler's final step).
T_END = 1


def denoise_timesteps(t_m: int = PAPER_T_M, steps: int = PAPER_STEPS,
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


def plan(k: int, steps: int = PAPER_STEPS, max_batch: int = DEFAULT_MAX_BATCH,
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


def difference_maps(backend: Backend, latent: torch.Tensor, masks: torch.Tensor, *,
                    lam: float = PAPER_LAMBDA, t_m: int = PAPER_T_M, steps: int = PAPER_STEPS,
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
        steps: denoising passes from ``t_m`` to 0 (the paper 15, the one-step presets 1).
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
    todo = plan(k, len(timesteps), max_batch, inject, difference)
    progress.grow(todo["unet_passes"] + todo["decode_chunks"])
    final, ref_final = _denoise_members(backend, x_t, site, masks, [s * float(lam) for s in signs], timesteps,
                                        cond, inject, inject_all_steps, difference, todo, budget_bytes, progress)
    maps, decodes = _decode_differences(backend, final, ref_final, k, difference, todo["decode_batch"],
                                        latent.dtype, progress)
    return DifferenceMaps(maps, todo["evaluations"], todo["chunks"] * len(timesteps), decodes, todo["chunks"],
                          tuple(timesteps), site)


def _denoise_members(backend: Backend, x_t: torch.Tensor, site: AttentionSite, masks: torch.Tensor,
                     coefficients: list[float], timesteps: list[int], cond: Conditioning, inject: InjectMode,
                     inject_all_steps: bool, difference: DifferenceMode, todo: dict, budget_bytes: int,
                     progress: Progress) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run every (mask, sign) member in the chunks :func:`plan` gave. Returns the members' final
    latents ``[n_members, C, h, w]`` (``+lam`` for every mask, then ``-lam``) and the reference's
    (``None`` when no chunk carried it)."""
    k = masks.shape[0]
    member_mask = [i for _ in coefficients for i in range(k)]               # [+0..+K-1, -0..-K-1]
    member_coef = [c for c in coefficients for _ in range(k)]
    ref_every = inject != "none"            # injection needs the reference in every chunk
    need_ref_image = difference == "one_sided"
    sizes = [s - (1 if ref_every or (need_ref_image and i == 0) else 0)
             for i, s in enumerate(todo["chunk_sizes"])]
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
    assert evaluations == todo["evaluations"], (evaluations, todo)
    return torch.cat(finals), ref_final


def _decode_differences(backend: Backend, final: torch.Tensor, ref_final: torch.Tensor | None, k: int,
                        difference: DifferenceMode, per: int, dtype: torch.dtype,
                        progress: Progress) -> tuple[torch.Tensor, int]:
    """Decode the members' final latents ``per`` masks at a time and return the difference maps
    ``[K, H, W]`` (symmetric: ``||I- - I+||``; one-sided: ``||I+ - I_ref||``) and the decodes."""
    maps: list[torch.Tensor] = []
    decodes = 0
    ref_img = None
    if difference == "one_sided":
        assert ref_final is not None
        progress.check()
        ref_img = backend.decode(ref_final.to(dtype)).float()
        decodes += 1
        progress.advance()
    for i0 in range(0, k, per):
        progress.check()
        i1 = min(k, i0 + per)
        if difference == "symmetric":
            batch = torch.cat([final[i0:i1], final[k + i0:k + i1]]).to(dtype)
            imgs = backend.decode(batch).float()
            plus, minus = imgs[: i1 - i0], imgs[i1 - i0:]
            maps.append((minus - plus).pow(2).sum(dim=1).sqrt())
            decodes += 2 * (i1 - i0)
        else:
            plus = backend.decode(final[i0:i1].to(dtype)).float()
            maps.append((plus - ref_img).pow(2).sum(dim=1).sqrt())
            decodes += i1 - i0
        progress.advance()
    return torch.cat(maps), decodes


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
                             settings: EmerDiffSettings = EmerDiffSettings(), *,
                             cond: Conditioning | None = None, seed: int = 0,
                             image_size: tuple[int, int] | None = None, method: str = "emerdiff",
                             extra_info: dict | None = None, budget_bytes: int = DEFAULT_CHUNK_BYTES,
                             progress: Progress | None = None) -> Segmentation:
    """EmerDiff's modulated denoising mapper: any low-res label grid -> image-resolution labels.

    Every label present in ``lowres[b]`` is one mask; labels absent from the grid (e.g. a DiffSeg
    segment lost by :func:`pool_labels`) are not modulated and get no pixels. Per image:
    :func:`difference_maps` -> :func:`smooth` (``settings.sigma``, on ``d``) -> :func:`assign`;
    output labels carry the grid's label ids, compacted by :meth:`Segmentation.from_labels`.

    Args:
        latents: ``[B, C, h, w]`` scaled clean latents.
        lowres: ``[B, gh, gw]`` (or ``[gh, gw]``) integer labels on the modulated site's grid
            (``settings.grid``/``layer``/``depth`` pick the site, see :func:`choose_site`).
        settings: the mapper's preset, lambda, t_m, sigma, injection and batching.
        image_size: ``(H, W)`` of the output; default the decoded size. Difference maps are
            resized bilinearly when it differs.
        method: stored in the result ("emerdiff", "diffseg+mapper", ...).
        extra_info: merged into ``info`` (e.g. the feature pass's evaluations).

    Returns:
        :class:`Segmentation` with ``lowres`` = the input grid and ``info``: grid, site, steps,
        timesteps, evaluations (UNet evaluations per batch member, summed), unet_passes,
        vae_decodes, chunks, segments per image, and the settings.
    """
    s = settings
    latent_hw = _check_latents(backend, latents)
    site = choose_site(backend, latent_hw, s.grid, s.layer, s.depth)
    lowres = _check_lowres(lowres, site, latent_hw, latents.shape[0])
    b = latents.shape[0]
    progress = progress or Progress()
    cond_b = (cond or backend.empty_conditioning()).expand(b)
    out: list[torch.Tensor] = []
    totals = dict.fromkeys(("evaluations", "unet_passes", "vae_decodes", "chunks"), 0)
    segments = []
    timesteps: tuple[int, ...] = ()
    for i in range(b):
        progress.check()
        ids, masks = label_masks(lowres[i].to(latents.device))
        dm = difference_maps(backend, latents[i:i + 1], masks, lam=s.lam, t_m=s.t_m, steps=s.denoise_steps,
                             cond=cond_b.select([i]), seed=seed, site=site, inject=s.inject,
                             inject_all_steps=s.inject_all_steps, difference=s.difference_mode,
                             max_batch=s.max_batch, budget_bytes=budget_bytes, progress=progress)
        d = smooth(dm.maps, s.sigma)
        if image_size is not None and tuple(d.shape[-2:]) != tuple(image_size):
            d = F.interpolate(d.unsqueeze(0), size=image_size, mode="bilinear",
                              align_corners=False).squeeze(0)
        out.append(ids.to(d.device)[assign(d)])
        for key, value in (("evaluations", dm.evaluations), ("unet_passes", dm.unet_passes),
                           ("vae_decodes", dm.decodes), ("chunks", dm.chunks)):
            totals[key] += value
        segments.append(int(ids.numel()))
        timesteps = dm.timesteps
    info = {"grid": list(site.grid(latent_hw)), "grid_requested": list(_as_grid(s.grid)), "site": site.key,
            "steps": s.denoise_steps, "timesteps": list(timesteps), "t_m": int(s.t_m), "lambda": float(s.lam),
            "inject": s.inject, "inject_all_steps": bool(s.inject_all_steps), "difference": s.difference_mode,
            "sigma": float(s.sigma), "seed": int(seed), "max_batch": int(s.max_batch), "quality": s.label,
            "segments": segments, **totals}
    for key, value in (extra_info or {}).items():
        if key == "evaluations":
            info["mapper_evaluations"] = totals["evaluations"]
            info["evaluations"] = totals["evaluations"] + int(value)
        elif key not in info:
            info[key] = value
    return Segmentation.from_labels(torch.stack(out), method=method, lowres=lowres.clone(),
                                    lowres_layer=int(s.layer), info=info)


def _check_lowres(lowres: torch.Tensor, site: AttentionSite, latent_hw: tuple[int, int],
                  batch: int) -> torch.Tensor:
    """``lowres`` as ``[batch, gh, gw]`` integer labels on ``site``'s grid, or a clear error."""
    g = site.grid(latent_hw)
    if lowres.ndim == 2:
        lowres = lowres.unsqueeze(0)
    if lowres.ndim != 3 or tuple(lowres.shape[-2:]) != g:
        raise EmergentSegError(
            f"the low-res segmentation has grid {tuple(lowres.shape[-2:])} but the modulated layer "
            f"{site.key} works on a {g[0]}x{g[1]} grid at this image size; pool it with "
            f"pool_labels(labels, {g}) or compute it from the same image size")
    if lowres.shape[0] not in (1, batch):
        raise EmergentSegError(f"{lowres.shape[0]} low-res grids for {batch} images")
    if lowres.is_floating_point():
        raise EmergentSegError("the low-res segmentation must hold integer labels")
    return lowres.expand(batch, -1, -1)
