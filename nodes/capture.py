"""Capture Attention: one UNet pass of the connected model -> DiffSeg's aggregated self-attention."""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..core.backend import Conditioning, check_size
from ..core.capture import DIFFSEG_TIMESTEP, capture_attention
from ..core.errors import EmergentSegError
from ..core.sites import AttentionSite
from ..core.words import label_words
from .types import (ATTENTION, CLIP, CONDITIONING, IMAGE, INT, LATENT, MODEL, STRING, VAE, Input,
                    NodeResult, NodeSpec, Output, host_progress)

SPEC = NodeSpec(
    node_id="EmergentSegCaptureAttention",
    display_name="Capture Attention",
    description=(
        "Runs the connected SD1.x/SD2.x/SDXL model once on the image (no noise, at one timestep, "
        "as DiffSeg does) and records its self-attention, averaged over heads and layers, for KL "
        "Merge. With CLIP and a prompt it also records cross-attention so segments can be named "
        "after prompt words. The model itself is not changed. Image sides must be multiples of 64 "
        "(32 for SDXL)."),
    inputs=(
        Input("model", MODEL, "The diffusion model to read attention from (SD1.x, SD2.x or SDXL)."),
        Input("image", IMAGE, "Images to segment; needs the VAE. All images of a batch have one size.",
              optional=True),
        Input("vae", VAE, "The checkpoint's VAE, used to encode the image.", optional=True),
        Input("latent", LATENT, "An already encoded image (e.g. from VAE Encode), used instead of "
              "image + VAE.", optional=True),
        Input("clip", CLIP, "The checkpoint's CLIP. Encodes the prompt, or the empty prompt DiffSeg "
              "uses when the prompt is blank. Needed unless conditioning is connected.", optional=True),
        Input("prompt", STRING, "Optional text for the pass, e.g. a caption of the image. Words of it "
              "(minus stopwords) become segment labels in KL Merge. Blank = DiffSeg's unconditional "
              "pass.", optional=True, default="", multiline=True),
        Input("conditioning", CONDITIONING, "Use this conditioning instead of CLIP + prompt (no word "
              "labels then, since its text is unknown).", optional=True),
        Input("timestep", INT, "Diffusion timestep of the pass (0-999). No noise is added; it only "
              "sets the time embedding. DiffSeg uses 300.", default=DIFFSEG_TIMESTEP, min=0, max=999,
              step=1),
        Input("levels", STRING, "Which self-attention grids to aggregate: 'all', or grid sides such as "
              "'64, 32' (for a 512 px SD1.5 image the grids are 64, 32, 16 and 8). The finest grid "
              "sets the cost: 128x128 (SD1.5 at 1024 px) needs 1 GiB per image; leave it out there.",
              default="all"),
    ),
    outputs=(Output(ATTENTION, "attention", "Aggregated attention for KL Merge."),),
)


def stack_images(image: Any) -> torch.Tensor:
    """An IMAGE batch ``[B,H,W,C]`` (or a list of them) as one tensor; different sizes -> error."""
    if isinstance(image, (list, tuple)):
        sizes = sorted({(int(i.shape[-2]), int(i.shape[-3])) for i in image})
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h}" for w, h in sizes)
            raise EmergentSegError(f"the images have different sizes ({listed}); resize them to one "
                                   "size (e.g. with Upscale Image) before segmenting them as a batch")
        image = torch.cat([i.reshape(-1, *i.shape[-3:]) for i in image])
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise EmergentSegError("the image input must be an IMAGE [B,H,W,C]")
    return image.reshape(-1, *image.shape[-3:])


def parse_levels(text: str, sites: Sequence[AttentionSite], latent_hw: tuple[int, int]) -> list[int] | None:
    """``"all"`` -> ``None``; ``"64, 32"`` or ``"64x64"`` -> the strides of those self-attention
    grids at this latent size."""
    text = (text or "").strip().lower()
    grids: dict[tuple[int, int], int] = {}
    for s in sites:
        if s.kind == "self":
            grids[s.grid(latent_hw)] = s.stride
    names = ", ".join(f"{h}x{w}" for h, w in sorted(grids, reverse=True))
    if text in ("", "all", "*"):
        return None
    strides: list[int] = []
    for token in re.split(r"[\s,;]+", text):
        if not token:
            continue
        m = re.fullmatch(r"(\d+)(?:x(\d+))?", token)
        found = None
        if m:
            h = int(m.group(1))
            w = int(m.group(2)) if m.group(2) else None
            found = next((st for (gh, gw), st in grids.items() if gh == h and (w is None or gw == w)), None)
        if found is None:
            raise EmergentSegError(f"levels '{token}' is not a self-attention grid of this model at this "
                                   f"image size; use 'all' or some of: {names}")
        if found not in strides:
            strides.append(found)
    return strides or None


def run(model: Any, image: torch.Tensor | None = None, vae: Any = None, latent: dict | None = None,
        clip: Any = None, prompt: str = "", conditioning: list | None = None,
        timestep: int = DIFFSEG_TIMESTEP, levels: str = "all", backend_factory: Any = None) -> NodeResult:
    if backend_factory is None:
        from .comfy_backend import ComfyBackend as backend_factory
    progress = host_progress()
    backend = backend_factory(model, vae=vae, clip=clip, progress=progress)
    latents, image_size = _latents(backend, image, latent)
    prompt = (prompt or "").strip()
    cond: Conditioning
    if conditioning is not None:
        cond = backend.from_conditioning(conditioning)
    elif clip is not None and prompt:
        cond = backend.encode_prompt(prompt)
    else:
        cond = backend.empty_conditioning()
    cross = bool(cond.tokens and cond.prompt and label_words(cond.tokens, cond.prompt))
    strides = parse_levels(levels, backend.sites(), (int(latents.shape[-2]), int(latents.shape[-1])))
    capture = capture_attention(backend, latents, cond, timestep=int(timestep), strides=strides,
                                cross=cross, image_size=image_size, progress=progress)
    return NodeResult((capture,))


def _latents(backend: Any, image: Any, latent: dict | None) -> tuple[torch.Tensor, tuple[int, int]]:
    scale = backend.latent_scale
    if latent is not None:
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise EmergentSegError("the latent input must be an image LATENT [B,C,h,w] (video and "
                                   "audio latents are not supported)")
        size = (int(samples.shape[-2]) * scale, int(samples.shape[-1]) * scale)
        check_size(backend, *size)
        if image is not None:
            images = stack_images(image)
            if tuple(images.shape[1:3]) != size:
                raise EmergentSegError(f"the image is {images.shape[2]}x{images.shape[1]} but the latent "
                                       f"is {size[1]}x{size[0]}; connect only one of them")
        return backend.latent_in(samples), size
    if image is None:
        raise EmergentSegError("connect an image (with the VAE) or a latent to Capture Attention")
    images = stack_images(image)
    check_size(backend, int(images.shape[1]), int(images.shape[2]))
    core_images = images[..., :3].movedim(-1, 1).float()
    return backend.encode(core_images), (int(images.shape[1]), int(images.shape[2]))

