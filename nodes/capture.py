"""Capture Attention: one UNet pass of the connected model -> DiffSeg's aggregated self-attention."""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..core.capture import capture_attention
from ..core.errors import EmergentSegError
from ..core.joint_attention import parse_blocks
from ..core.settings import DIFFSEG_TIMESTEP, dit_preset
from ..core.sites import AttentionSite
from ..core.words import is_label_word, label_words, prompt_words
from .inputs import (
    IMAGE_SOURCE_INPUTS,
    conditioning_from,
    is_dit,
    latents_from,
    make_backend,
    stack_images,  # noqa: F401  (re-exported)
)
from .types import (
    ATTENTION,
    CLIP,
    CONDITIONING,
    FLOAT,
    INT,
    MODEL,
    STRING,
    Input,
    NodeResult,
    NodeSpec,
    Output,
    host_progress,
)

SPEC = NodeSpec(
    node_id="EmergentSegCaptureAttention",
    display_name="Capture Attention",
    description=(
        "Runs the connected model once on the image and records its self-attention, averaged over "
        "heads and layers, for KL Merge. SD1.x/SD2.x/SDXL: no noise, at one timestep, as DiffSeg "
        "does; with CLIP and a prompt it also records cross-attention so segments can be named "
        "after prompt words. Flux and SD3/SD3.5: the image->image part of the joint attention of "
        "chosen blocks, at noise level sigma (provisional presets, see the README). The model itself "
        "is not changed. Any image size works: the pass runs at the nearest multiple of 64 (32 for "
        "SDXL, 16 for Flux/SD3) and the segments come back at the image's own size."),
    inputs=(
        Input("model", MODEL, "The diffusion model to read attention from (SD1.x, SD2.x, SDXL, Flux, "
              "SD3 or SD3.5)."),
        *IMAGE_SOURCE_INPUTS,
        Input("clip", CLIP, "The checkpoint's CLIP. Encodes the prompt, or the empty prompt DiffSeg "
              "uses when the prompt is blank. Needed unless conditioning is connected.", optional=True),
        Input("prompt", STRING, "Optional text for the pass, e.g. a caption of the image. Words of it "
              "(minus stopwords) become segment labels in KL Merge (on Flux/SD3 each word also runs "
              "as its own concept token, ConceptAttention's way). Blank = DiffSeg's unconditional "
              "pass.", optional=True, default="", multiline=True),
        Input("conditioning", CONDITIONING, "Use this conditioning instead of CLIP + prompt (no word "
              "labels then, since its text is unknown).", optional=True),
        Input("timestep", INT, "SD1.x/SD2.x/SDXL: diffusion timestep of the pass (0-999). No noise is "
              "added; it only sets the time embedding. DiffSeg uses 300. Flux/SD3 use sigma instead.",
              default=DIFFSEG_TIMESTEP, min=0, max=999, step=1),
        Input("levels", STRING, "UNets: which self-attention grids to aggregate: 'all', or grid sides "
              "such as '64, 32' (for a 512 px SD1.5 image the grids are 64, 32, 16 and 8). The finest "
              "grid sets the cost: 128x128 (SD1.5 at 1024 px) needs 1 GiB per image; leave it out "
              "there. Flux/SD3: 'all' = the family's default blocks (Flux: the later half of the double "
              "blocks; SD3: the middle half), 'every' = all blocks, or ranges such as 'double 9-18, "
              "single 0-4'.", default="all"),
        Input("sigma", FLOAT, "Flux/SD3 only: the noise level of the pass, 0-1. The image is mixed "
              "with seeded noise as sigma*noise + (1-sigma)*image, as the model's sampler does at that "
              "level (the model's shift maps steps to levels; here you pick the level itself). 0 = the "
              "family's preset (0.3). Ignored for SD1.x/SD2.x/SDXL, which use timestep.",
              optional=True, default=0.0, min=0.0, max=1.0, step=0.01),
    ),
    outputs=(Output(ATTENTION, "attention", "Aggregated attention for KL Merge."),),
)


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
        timestep: int = DIFFSEG_TIMESTEP, levels: str = "all", sigma: float = 0.0,
        backend_factory: Any = None) -> NodeResult:
    progress = host_progress()
    backend = make_backend(model, vae, clip, progress, backend_factory, allow_dit=True)
    if is_dit(backend):
        return run_dit(backend, image, latent, clip, prompt, conditioning, levels, sigma)
    latents, image_size = latents_from(backend, image, latent, SPEC.display_name)
    cond = conditioning_from(backend, clip, prompt, conditioning, SPEC.display_name)
    cross = bool(cond.tokens and cond.prompt and label_words(cond.tokens, cond.prompt))
    strides = parse_levels(levels, backend.sites(), (int(latents.shape[-2]), int(latents.shape[-1])))
    capture = capture_attention(backend, latents, cond, timestep=int(timestep), strides=strides,
                                cross=cross, image_size=image_size, progress=progress)
    return NodeResult((capture,))


def run_dit(backend: Any, image: torch.Tensor | None, latent: dict | None, clip: Any, prompt: str,
            conditioning: list | None, levels: str, sigma: float) -> NodeResult:
    """Capture Attention on a Flux or SD3/SD3.5 model: the joint attention of the chosen blocks."""
    if not 0.0 <= float(sigma) <= 1.0:
        raise EmergentSegError(f"sigma must be in 0..1 (0 = the preset), got {sigma}")
    blocks = parse_blocks(levels, backend.blocks, backend.default_blocks())
    latents, image_size = latents_from(backend, image, latent, SPEC.display_name)
    cond = conditioning_from(backend, clip, prompt, conditioning, SPEC.display_name)
    noise_level = float(sigma) if float(sigma) > 0 else dit_preset(backend.family).sigma
    words: list[str] = []
    if conditioning is None and clip is not None:     # words only when the pass's text is known
        words = list(dict.fromkeys(w for w in prompt_words(prompt or "") if is_label_word(w)))
    if not words:
        return NodeResult((backend.capture(latents, cond, noise_level, blocks, image_size),))
    from .dit_concepts import capture_with_words   # imports the host: loaded only inside it

    return NodeResult((capture_with_words(backend, latents, cond, noise_level, blocks, image_size, words),))
