"""Low-Res KMeans: EmerDiff's first stage -- k-means on the UNet queries of a ~16x16 decoder block."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..core import emerdiff as E
from ..core.backend import check_size
from ..core.errors import EmergentSegError
from .inputs import (IMAGE_SOURCE_INPUTS, SEED_MAX, SEED_TOOLTIP, conditioning_from, latent_size, latents_from,
                     is_dit, make_backend, on_cpu, site_text)
from .inputs import latent_hw as run_latent_hw
from .types import (CLIP, CONDITIONING, INT, MODEL, SEGMENTATION, STRING, Input, NodeResult, NodeSpec,
                    Output, host_progress)

SPEC = NodeSpec(
    node_id="EmergentSegLowResKMeans",
    display_name="Low-Res KMeans",
    description=(
        "EmerDiff, stage 1: adds a little noise (timestep 1) to the image's latent, runs the "
        "connected SD1.x/SD2.x/SDXL model once and clusters the queries of the first "
        "cross-attention layer of its decoder block at 1/32 of the image side (16x16 for SD1.x at 512 px) into K segments. The result is coarse "
        "(one label per token cell, shown upsampled); feed it to Modulated Denoise Mapper for "
        "pixel-sharp masks. The info output names the block and grid actually used. The model "
        "itself is not changed. Any image size works: the model runs at the nearest multiple of 64 "
        "(32 for SDXL) and the segments come back at the image's own size. Flux and SD3/SD3.5 "
        "(experimental): the image tokens entering the middle joint block, averaged onto the grid "
        "at 1/32 of the image side."),
    inputs=(
        Input("model", MODEL, "The diffusion model to read features from (SD1.x, SD2.x or SDXL; Flux and "
              "SD3/SD3.5 experimentally)."),
        *IMAGE_SOURCE_INPUTS,
        Input("clip", CLIP, "The checkpoint's CLIP. Encodes the prompt, or the empty prompt EmerDiff "
              "uses when the prompt is blank. Needed unless conditioning is connected.", optional=True),
        Input("prompt", STRING, "Optional text for the pass. Blank = the empty prompt (EmerDiff's "
              "setting); segments are not named after words.", optional=True, default="",
              multiline=True),
        Input("conditioning", CONDITIONING, "Use this conditioning instead of CLIP + prompt.",
              optional=True),
        Input("clusters", INT, "K, the number of k-means segments per image. The paper finds 10-40 "
              "work about equally well on SD; at most the number of cells of the grid (256 for "
              "16x16). Small grids need small K (the embedded model's 8x8 grid was calibrated at 4).",
              default=E.DEFAULT_K, min=2, max=4096, step=1),
        Input("timestep", INT, "t_f, the noise level of the feature pass (0-999). EmerDiff uses 1; "
              "larger values give worse segments.", default=E.PAPER_T_F, min=0, max=999, step=1),
        Input("rng_seed", INT, SEED_TOOLTIP, default=0, min=0, max=SEED_MAX, step=1,
              display_name="seed"),
        Input("grid", INT, "Token-grid side of the decoder block to read. 0 = auto: the grid at 1/32 "
              "of the image side, the paper's ratio (16x16 for SD1.x at 512 px, 32x32 for SDXL at "
              "1024 px). A positive value picks the decoder grid nearest to it. The block used is "
              "reported in info. Flux/SD3: the side of the grid the image tokens are averaged onto.",
              default=E.DEFAULT_GRID, min=0, max=256, step=1),
        Input("layer", INT, "Which cross-attention transformer of that decoder block to read (0 = "
              "the first, the paper's choice; SD1.x has 3 per block). Ignored for Flux/SD3, which use "
              "the middle joint block.", default=E.DEFAULT_LAYER,
              min=0, max=9, step=1),
    ),
    outputs=(
        Output(SEGMENTATION, "segmentation", "K coarse segments per image (the k-means grid "
               "upsampled to the image), for Modulated Denoise Mapper or Mask Output."),
        Output(STRING, "info", "Which block and token grid were used, and the cost."),
    ),
)


def run(model: Any, image: torch.Tensor | None = None, vae: Any = None, latent: dict | None = None,
        clip: Any = None, prompt: str = "", conditioning: list | None = None,
        clusters: int = E.DEFAULT_K, timestep: int = E.PAPER_T_F, rng_seed: int = 0,
        grid: int = E.DEFAULT_GRID, layer: int = E.DEFAULT_LAYER,
        backend_factory: Any = None) -> NodeResult:
    name = SPEC.display_name
    progress = host_progress()
    backend = make_backend(model, vae, clip, progress, backend_factory, allow_dit=True)
    if is_dit(backend):
        return run_dit(backend, image, latent, clip, prompt, conditioning, int(clusters), int(timestep),
                       int(rng_seed), int(grid))
    # Check what can be checked before the VAE and the UNet run.
    _, height, width = latent_size(backend, image, latent, name)
    if latent is not None:  # an image of any size is fitted; a latent must fit as it is
        check_size(backend, height, width)
    latent_hw = run_latent_hw(backend, height, width)
    site = E.choose_site(backend, latent_hw, int(grid), int(layer))
    g = site.grid(latent_hw)
    if int(clusters) > g[0] * g[1]:
        raise EmergentSegError(f"clusters = {clusters} but the {g[0]}x{g[1]} grid of {site.key} has "
                               f"only {g[0] * g[1]} cells at {width}x{height}; use at most "
                               f"{g[0] * g[1]} clusters or a larger image")
    latents, image_size = latents_from(backend, image, latent, name)
    cond = conditioning_from(backend, clip, prompt, conditioning, name)
    seg = E.lowres_kmeans(backend, latents, int(clusters), cond=cond, timestep=int(timestep), seed=int(rng_seed),
                          grid=int(grid), layer=int(layer), image_size=image_size, progress=progress)
    where = site_text(site, g, int(grid))
    summary = (f"Low-Res KMeans: K = {int(clusters)} on {where}, t_f = {int(timestep)}, "
               f"seed {int(rng_seed)}; segments per image: {', '.join(map(str, seg.counts))}; "
               f"{seg.info['evaluations']} UNet evaluation(s)")
    seg = replace(on_cpu(seg), info={**seg.info, "summary": summary})
    return NodeResult((seg, summary))


def run_dit(backend: Any, image: torch.Tensor | None, latent: dict | None, clip: Any, prompt: str,
            conditioning: list | None, clusters: int, timestep: int, rng_seed: int, grid: int) -> NodeResult:
    """Low-Res KMeans on a Flux or SD3/SD3.5 model (experimental)."""
    latents, image_size = latents_from(backend, image, latent, SPEC.display_name)
    cond = conditioning_from(backend, clip, prompt, conditioning, SPEC.display_name)
    seg = backend.lowres_kmeans(latents, cond, clusters, timestep, rng_seed, grid, image_size)
    g = seg.info["grid"]
    summary = (f"Low-Res KMeans (experimental on {backend.family.upper()}): K = {clusters} on the image "
               f"tokens entering {seg.info['site']}, averaged onto {g[0]}x{g[1]}, t_f = {timestep}, seed "
               f"{rng_seed}; segments per image: {', '.join(map(str, seg.counts))}; "
               f"{seg.info['evaluations']} model evaluation(s)")
    seg = replace(on_cpu(seg), info={**seg.info, "summary": summary})
    return NodeResult((seg, summary))
