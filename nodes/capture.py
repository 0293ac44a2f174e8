"""Capture Attention: one UNet pass of the connected model -> DiffSeg's aggregated self-attention."""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..core.capture import capture_attention
from ..core.errors import EmergentSegError
from ..core.settings import DIFFSEG_TIMESTEP
from ..core.sites import AttentionSite
from ..core.words import label_words
from .inputs import (
    IMAGE_SOURCE_INPUTS,
    conditioning_from,
    latents_from,
    make_backend,
    stack_images,  # noqa: F401  (re-exported)
)
from .types import (
    ATTENTION,
    CLIP,
    CONDITIONING,
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
        "Runs the connected SD1.x/SD2.x/SDXL model once on the image (no noise, at one timestep, "
        "as DiffSeg does) and records its self-attention, averaged over heads and layers, for KL "
        "Merge. With CLIP and a prompt it also records cross-attention so segments can be named "
        "after prompt words. The model itself is not changed. Any image size works: the pass runs at "
        "the nearest multiple of 64 (32 for SDXL) and the segments come back at the image's own "
        "size."),
    inputs=(
        Input("model", MODEL, "The diffusion model to read attention from (SD1.x, SD2.x or SDXL)."),
        *IMAGE_SOURCE_INPUTS,
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
    progress = host_progress()
    backend = make_backend(model, vae, clip, progress, backend_factory)
    latents, image_size = latents_from(backend, image, latent, SPEC.display_name)
    cond = conditioning_from(backend, clip, prompt, conditioning, SPEC.display_name)
    cross = bool(cond.tokens and cond.prompt and label_words(cond.tokens, cond.prompt))
    strides = parse_levels(levels, backend.sites(), (int(latents.shape[-2]), int(latents.shape[-1])))
    capture = capture_attention(backend, latents, cond, timestep=int(timestep), strides=strides,
                                cross=cross, image_size=image_size, progress=progress)
    return NodeResult((capture,))
