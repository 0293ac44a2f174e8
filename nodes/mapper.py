"""Modulated Denoise Mapper: EmerDiff's second stage -- any low-res segmentation -> pixel-sharp labels."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core import emerdiff as E
from ..core.backend import check_size
from ..core.errors import EmergentSegError
from ..core.emerdiff import carry_words
from ..core.segmentation import Segmentation
from ..core.settings import INJECT_MODES, QUALITY_PRESETS, EmerDiffSettings
from .inputs import SEED_MAX, SEED_TOOLTIP, conditioning_from, latent_size, latents_from, make_backend, on_cpu, site_text
from .inputs import latent_hw as run_latent_hw
from .types import (CLIP, COMBO, CONDITIONING, FLOAT, IMAGE, INT, LATENT, MODEL, SEGMENTATION, STRING,
                    VAE, Input, NodeResult, NodeSpec, Output, host_progress)

QUALITIES = tuple(QUALITY_PRESETS)            # ("fast", "faithful", "fast-symmetric")

SPEC = NodeSpec(
    node_id="EmergentSegModulatedDenoiseMapper",
    display_name="Modulated Denoise Mapper",
    description=(
        "EmerDiff, stage 2: turns a coarse segmentation into pixel-sharp segments. For each low-res "
        "segment it nudges the output of the model's decoder cross-attention at 1/32 of the image side "
        "(16x16 for SD1.x at 512 px) inside the "
        "segment (strength lambda) while denoising the image from t_m, decodes the result with the "
        "VAE, and gives every pixel to the segment whose nudge changed it most. Takes Low-Res KMeans "
        "output, or any segmentation (e.g. KL Merge's), which is pooled to the block's grid "
        "automatically; segment words carry over. Cost per image: fast = K+1 UNet evaluations, "
        "faithful = about 30 (2K+1) as the paper. The model itself is not changed. Flux and "
        "SD3/SD3.5 (experimental): the nudge goes into the image rows of the middle joint block's "
        "attention output, on its full token grid."),
    inputs=(
        Input("model", MODEL, "The diffusion model (SD1.x, SD2.x or SDXL; Flux and SD3/SD3.5 "
              "experimentally); the same one that made the low-res segmentation works best."),
        Input("vae", VAE, "The checkpoint's VAE: decodes every modulated result (and encodes the image)."),
        Input("image", IMAGE, "The segmented images (the size and batch of the segmentation).",
              optional=True),
        Input("latent", LATENT, "An already encoded image, used instead of encoding the image.",
              optional=True),
        Input("segmentation", SEGMENTATION, "The coarse segmentation to sharpen: Low-Res KMeans output "
              "(its grid and layer are reused), or any segmentation of these images, pooled to the "
              "grid by majority vote (segments smaller than about one cell are dropped)."),
        Input("clip", CLIP, "The checkpoint's CLIP, for the prompt or the empty prompt EmerDiff uses. "
              "Needed unless conditioning is connected.", optional=True),
        Input("prompt", STRING, "Optional text for the denoising passes. Blank = the empty prompt "
              "(EmerDiff's setting).", optional=True, default="", multiline=True),
        Input("conditioning", CONDITIONING, "Use this conditioning instead of CLIP + prompt.",
              optional=True),
        Input("quality", COMBO, "fast: one denoising step, decode its prediction, difference to the "
              "unmodulated image (K+1 UNet evaluations, 20-30x cheaper than faithful). faithful: the "
              "paper's 15 steps from t_m, difference between -lambda and +lambda runs (2K+1 per step). "
              "fast-symmetric: one step with the paper's difference (2K+1). On the embedded 256 px test "
              "model fast-symmetric scored about 2 points above fast, and no setting beat plain "
              "upsampling there (see the README); on SD start with fast or fast-symmetric, and use "
              "faithful for the paper's setting.", default="fast",
              options=QUALITIES),
        Input("lam", FLOAT, "lambda, the modulation strength added inside each segment (the paper's "
              "10). Must not be 0; the sign does not matter.", default=E.PAPER_LAMBDA, min=-100.0,
              max=100.0, step=0.5, display_name="lambda"),
        Input("t_m", INT, "Timestep the image is noised to and modulated at (0-999). The paper uses "
              "281; 281-481 work best.", default=E.PAPER_T_M, min=1, max=999, step=1),
        Input("sigma", FLOAT, "Gaussian blur (pixels) of the difference maps before each pixel picks "
              "its segment; removes blocky cell edges. 0 = off. 4 px suits SD at 512 px; larger values "
              "trade boundary detail for less noise (the embedded test model needed 16 px at 256).", default=E.DEFAULT_SIGMA, min=0.0,
              max=64.0, step=0.5),
        Input("inject", COMBO, "Which attention maps of the modulated runs are replaced by the "
              "unmodulated run's (keeps fine structure): all (default), self, cross, or none.",
              default=E.DEFAULT_INJECT, options=INJECT_MODES),
        Input("max_batch", INT, "Runs per UNet call, the reference included. Lower it if memory runs "
              "out; the result does not depend on it (beyond rounding).", default=E.DEFAULT_MAX_BATCH,
              min=2, max=256, step=1),
        Input("rng_seed", INT, SEED_TOOLTIP.replace(" and of the k-means initialisation", ""),
              default=0, min=0, max=SEED_MAX, step=1, display_name="seed"),
    ),
    outputs=(
        # not "segmentation": V3 needs output ids distinct from input ids
        Output(SEGMENTATION, "refined", "Pixel-sharp segments per image, for Mask Output."),
        Output(STRING, "info", "Which block and grid were modulated, the settings and the cost."),
    ),
)


def run(model: Any, vae: Any, image: torch.Tensor | None = None, latent: dict | None = None,
        segmentation: Segmentation | None = None, clip: Any = None, prompt: str = "",
        conditioning: list | None = None, quality: str = "fast", lam: float = E.PAPER_LAMBDA,
        t_m: int = E.PAPER_T_M, sigma: float = E.DEFAULT_SIGMA, inject: str = E.DEFAULT_INJECT,
        max_batch: int = E.DEFAULT_MAX_BATCH, rng_seed: int = 0,
        backend_factory: Any = None) -> NodeResult:
    name = SPEC.display_name
    seg = segmentation
    if not isinstance(seg, Segmentation):
        raise EmergentSegError("the segmentation input must come from Low-Res KMeans, KL Merge or "
                               "another emergent-seg segmenter")
    settings = EmerDiffSettings(quality=quality, lam=float(lam), t_m=int(t_m), sigma=float(sigma),
                                inject=inject, max_batch=int(max_batch))
    progress = host_progress()
    backend = make_backend(model, vae, clip, progress, backend_factory, allow_dit=True)
    batch, height, width = latent_size(backend, image, latent, name)
    if latent is not None:  # an image of any size is fitted; a latent must fit as it is
        check_size(backend, height, width)
    if seg.size != (height, width):
        raise EmergentSegError(f"the segmentation is {seg.size[1]}x{seg.size[0]} but the image is "
                               f"{width}x{height}; connect the segmentation made from this image")
    if seg.batch_size not in (1, batch):
        raise EmergentSegError(f"the segmentation has {seg.batch_size} images but {batch} images were "
                               "connected; connect the image batch that was segmented")
    latent_hw = run_latent_hw(backend, height, width)
    # A Low-Res KMeans result is modulated where its features came from; anything else at the
    # paper's grid (1/32 of the image side).
    if seg.lowres is not None:
        requested: int | tuple[int, int] = tuple(int(v) for v in seg.lowres.shape[-2:])
        layer = E.DEFAULT_LAYER if seg.lowres_layer is None else int(seg.lowres_layer)
    else:
        requested, layer = E.DEFAULT_GRID, E.DEFAULT_LAYER
    site = E.choose_site(backend, latent_hw, requested, layer)
    g = site.grid(latent_hw)
    pooled = seg.lowres is None or tuple(seg.lowres.shape[-2:]) != g
    low = E.lowres_from_segmentation(seg, g)

    latents, image_size = latents_from(backend, image, latent, name)
    cond = conditioning_from(backend, clip, prompt, conditioning, name)
    method = "emerdiff" if seg.method.startswith("emerdiff") else f"{seg.method or 'segmentation'}+mapper"
    extra = {"quality": quality, "source": seg.method, "layer": layer,
             "lowres_from": "pooled labels" if pooled else "low-res grid"}
    out = E.modulated_denoise_mapper(
        backend, latents, low, replace(settings, grid=g, layer=layer), cond=cond, seed=int(rng_seed),
        image_size=image_size, method=method, extra_info=extra, progress=progress)
    out = carry_words(seg, low, out)
    info = out.info
    summary = (f"Modulated Denoise Mapper ({quality}: {info['steps']} step(s) from t_m = {int(t_m)}, "
               f"{settings.difference_mode.replace('_', '-')} difference, lambda {float(lam):g}, "
               f"inject {inject}) at {site_text(site, g, requested)}; low-res "
               f"{'pooled from the labels' if pooled else 'grid as given'}: "
               f"{', '.join(map(str, info['segments']))} segment(s) -> "
               f"{', '.join(map(str, out.counts))} per image; {info['evaluations']} UNet evaluations, "
               f"{info['vae_decodes']} VAE decodes")
    out = replace(on_cpu(out), info={**info, "summary": summary})
    return NodeResult((out, summary))


