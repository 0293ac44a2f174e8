"""Input handling shared by the nodes that run the connected model (Capture Attention, Low-Res
KMeans, Modulated Denoise Mapper): IMAGE/VAE/LATENT -> scaled latents, CLIP + prompt /
CONDITIONING -> a core :class:`Conditioning`, and the backend over the MODEL.

Nothing here imports ComfyUI; ``backend_factory`` defaults to :class:`.comfy_backend.ComfyBackend`,
imported only when a node runs inside the host.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import torch

from ..core.backend import Conditioning, Progress, check_size, nearest_fit
from ..core.errors import EmergentSegError
from ..core.segmentation import Segmentation
from ..core.sites import AttentionSite
from .types import IMAGE, LATENT, VAE, Input

#: The image source of a node that encodes its own image (Capture Attention, Low-Res KMeans):
#: IMAGE + VAE, or an already encoded LATENT (see :func:`latents_from`).
IMAGE_SOURCE_INPUTS: tuple[Input, ...] = (
    Input("image", IMAGE, "Images to segment; needs the VAE. Any size: the model runs at the nearest "
          "multiple of 64 (32 for SDXL) and the segments come back at the image's own size. All "
          "images of a batch have one size.", optional=True),
    Input("vae", VAE, "The checkpoint's VAE, used to encode the image.", optional=True),
    Input("latent", LATENT, "An already encoded image (e.g. from VAE Encode), used instead of "
          "image + VAE.", optional=True),
)


def make_backend(model: Any, vae: Any = None, clip: Any = None, progress: Progress | None = None,
                 backend_factory: Callable[..., Any] | None = None, allow_dit: bool = False) -> Any:
    """The backend over the MODEL socket value: ComfyBackend for a UNet, ComfyDitBackend for a
    Flux/SD3 model when the node supports DiT hosts (``allow_dit``), unless a test substitutes
    ``backend_factory``."""
    if backend_factory is None:
        from .comfy_backend import ComfyBackend, ComfyDitBackend, dit_family

        backend_factory = ComfyDitBackend if allow_dit and dit_family(model) else ComfyBackend
    return backend_factory(model, vae=vae, clip=clip, progress=progress)


def is_dit(backend: Any) -> bool:
    """Whether a backend reads a DiT's joint-attention blocks (ComfyDitBackend) rather than a
    UNet's attention sites."""
    return callable(getattr(backend, "default_blocks", None))


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


def processing_size(backend: Any, height: int, width: int) -> tuple[int, int]:
    """The size an image is run at: its own when both sides are multiples of the model's size
    step (64 for SD1.x/SD2.x), else the nearest multiples (each side rounded, at least one step).
    Results always come back at the image's own size. An image so large that DiffSeg's attention
    would pass ``core.images.DEFAULT_MEMORY_BUDGET`` runs smaller, with a warning in the log."""
    from ..core.images import DEFAULT_MEMORY_BUDGET, fit_memory

    h, w = nearest_fit(height, width, backend.size_multiple())
    fh, fw = fit_memory(backend, h, w)
    if (fh, fw) != (h, w):
        logging.getLogger("emergent_seg").warning(
            "emergent-seg: a %dx%d image is run at %dx%d: its attention would need more than %d GB; "
            "the segments still come back at the image's size", width, height, fw, fh,
            DEFAULT_MEMORY_BUDGET // 1024 ** 3)
    return fh, fw


def latent_hw(backend: Any, height: int, width: int) -> tuple[int, int]:
    """Latent ``(h, w)`` the model runs on for an image of ``height x width``."""
    ph, pw = processing_size(backend, height, width)
    return ph // backend.latent_scale, pw // backend.latent_scale


def latent_size(backend: Any, image: Any, latent: dict | None, node: str) -> tuple[int, int, int]:
    """``(batch, H, W)`` in pixels of the image :func:`latents_from` would encode (its own size,
    before any fitting), without encoding (for checks that should fail before any model work)."""
    if latent is not None:
        samples = _samples(latent)
        s = backend.latent_scale
        return int(samples.shape[0]), int(samples.shape[-2]) * s, int(samples.shape[-1]) * s
    if image is None:
        raise EmergentSegError(f"connect an image (with the VAE) or a latent to {node}")
    images = stack_images(image)
    return int(images.shape[0]), int(images.shape[1]), int(images.shape[2])


def _samples(latent: Any) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise EmergentSegError("the latent input must be an image LATENT [B,C,h,w] (video and "
                               "audio latents are not supported)")
    return samples


def latents_from(backend: Any, image: Any, latent: dict | None,
                 node: str = "Capture Attention") -> tuple[torch.Tensor, tuple[int, int]]:
    """Scaled latents ``[B,C,h,w]`` and the image size ``(H, W)`` from a LATENT (preferred) or an
    IMAGE encoded with the backend's VAE. When both are connected they must have one size."""
    scale = backend.latent_scale
    if latent is not None:
        samples = _samples(latent)
        size = (int(samples.shape[-2]) * scale, int(samples.shape[-1]) * scale)
        check_size(backend, *size)
        if image is not None:
            images = stack_images(image)
            if tuple(images.shape[1:3]) != size:
                raise EmergentSegError(f"the image is {images.shape[2]}x{images.shape[1]} but the latent "
                                       f"is {size[1]}x{size[0]}; connect only one of them")
        return backend.latent_in(samples), size
    if image is None:
        raise EmergentSegError(f"connect an image (with the VAE) or a latent to {node}")
    images = stack_images(image)
    height, width = int(images.shape[1]), int(images.shape[2])
    core_images = images[..., :3].movedim(-1, 1).float()
    ph, pw = processing_size(backend, height, width)
    if (ph, pw) != (height, width):  # any size: run at the nearest fitting size, answer at the own
        core_images = torch.nn.functional.interpolate(core_images, size=(ph, pw), mode="bilinear",
                                                      align_corners=False,
                                                      antialias=ph < height or pw < width).clamp(0, 1)
    return backend.encode(core_images), (height, width)


def conditioning_from(backend: Any, clip: Any, prompt: str | None, conditioning: list | None,
                      node: str) -> Conditioning:
    """CONDITIONING if connected, else CLIP + prompt (blank = the empty prompt, EmerDiff's and
    DiffSeg's setting); neither -> one sentence naming ``node``."""
    if conditioning is not None:
        return backend.from_conditioning(conditioning)
    if clip is None:
        raise EmergentSegError(f"{node} needs the text conditioning of the pass: connect the "
                               "checkpoint's CLIP (the empty prompt is used when the prompt is blank) "
                               "or a CONDITIONING from CLIP Text Encode")
    prompt = (prompt or "").strip()
    return backend.encode_prompt(prompt) if prompt else backend.empty_conditioning()


SEED_MAX = 0xFFFFFFFFFFFFFFFF
# Not named "seed": the frontend gives INT inputs named seed/noise_seed a "control after generate"
# widget that randomizes by default, which would re-run (and change) the segmentation every queue.
SEED_TOOLTIP = ("Seed of the noise sample and of the k-means initialisation. The same seed gives the "
                "same segments (it is not randomized after each run).")


def site_text(site: AttentionSite, grid: tuple[int, int], requested: int | tuple[int, int]) -> str:
    """``"output.3.0.attn2 (16x16 grid)"``, noting when the requested grid was not available."""
    req = requested if isinstance(requested, tuple) else (requested, requested)
    if min(req) <= 0:
        note = ", auto: 1/32 of the image side"
    else:
        note = "" if tuple(req) == tuple(grid) else f", nearest to the requested {req[0]}x{req[1]}"
    return f"{site.key} ({grid[0]}x{grid[1]} grid{note})"


def on_cpu(seg: Segmentation) -> Segmentation:
    """The segmentation with its label tensors on the CPU, as KL Merge returns them (small, and
    what Mask Output and previews expect; the k-means ran wherever the features were)."""
    lowres = None if seg.lowres is None else seg.lowres.cpu()
    return replace(seg, labels=seg.labels.cpu(), lowres=lowres)
