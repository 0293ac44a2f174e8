"""The one-call Python API: ``emergent_seg.segment(image)`` -> labels, masks, words and an overlay
at the image's own size.

The CLI's ``segment`` command runs the same code (:func:`segment_image`), so both give the same
segments for the same image and options. Options left out take the model's defaults
(``core/settings.py``): the embedded model's measured values, or the papers' for your own model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core.backend import Backend, Conditioning, Progress
from .core.errors import EmergentSegError
from .core.segmentation import Segmentation
from .core.settings import DiffSegSettings, EmerDiffSettings

METHODS = ("diffseg", "emerdiff")
REFINEMENTS = ("none", "kmeans", "emerdiff")
_DIFFSEG_FIELDS = {f.name for f in fields(DiffSegSettings)} - {"extra", "refine"}
_EMERDIFF_FIELDS = {f.name for f in fields(EmerDiffSettings)}


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment` returns, everything at the input image's size ``H x W``.

    Attributes:
        labels: ``[H, W]`` int64, segment ids ``0..count-1``.
        masks: ``[count, H, W]`` float32 in {0, 1}, one per segment (``masks[i] == (labels == i)``).
        words: per segment, the prompt word it was named after, or ``None``.
        overlay: ``[H, W, 3]`` float32 in [0, 1]: the image with coloured, numbered segments.
        segmentation: the result at the size the model ran at (for ``core.masks`` functions).
    """

    labels: torch.Tensor
    masks: torch.Tensor
    words: tuple[str | None, ...]
    overlay: torch.Tensor
    segmentation: Segmentation

    @property
    def count(self) -> int:
        return int(self.masks.shape[0])


def as_image(image: Any) -> torch.Tensor:
    """A path, PIL image, ``[H,W,3]`` uint8/float array or ``[3,H,W]``/``[1,3,H,W]``/``[H,W,3]``
    tensor in [0,1] -> ``[3,H,W]`` float32 in [0,1]."""
    from .core.images import read_image

    if isinstance(image, (str, Path)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):        # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        image = torch.from_numpy(np.ascontiguousarray(array))
    if not isinstance(image, torch.Tensor):
        raise EmergentSegError(f"cannot read an image from {type(image).__name__}; pass a file path, a PIL "
                               "image, a numpy array or a tensor")
    t = image.detach().to("cpu", torch.float32)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] != 3 and t.shape[-1] in (3, 4):
        t = t[..., :3].permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] != 3 or min(t.shape[1:]) < 1:
        raise EmergentSegError(f"an image must be [3,H,W] or [H,W,3], got shape {tuple(image.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise EmergentSegError("image values must be finite and in [0, 1] (uint8 arrays are scaled for you)")
    return t.contiguous()


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options -> (DiffSeg overrides, EmerDiff overrides); an unknown name is an error."""
    unknown = sorted(set(options) - _DIFFSEG_FIELDS - _EMERDIFF_FIELDS)
    if unknown:
        raise EmergentSegError(f"unknown option {unknown[0]!r}; DiffSeg takes {', '.join(sorted(_DIFFSEG_FIELDS))}; "
                               f"EmerDiff takes {', '.join(sorted(_EMERDIFF_FIELDS))}")
    return ({k: v for k, v in options.items() if k in _DIFFSEG_FIELDS},
            {k: v for k, v in options.items() if k in _EMERDIFF_FIELDS})


def check_method(method: str, refine: str) -> None:
    if method not in METHODS:
        raise EmergentSegError(f"unknown method {method!r}; use one of: {', '.join(METHODS)}")
    if refine not in REFINEMENTS:
        raise EmergentSegError(f"unknown refine {refine!r}; use one of: {', '.join(REFINEMENTS)}")
    if method == "emerdiff" and refine == "kmeans":
        raise EmergentSegError("--refine kmeans is DiffSeg's refinement; EmerDiff's result is already "
                               "pixel-sharp, so drop --refine or use --method diffseg")


def segment_image(backend: Backend, image: torch.Tensor, cond: Conditioning | None, *, method: str = "diffseg",
                  refine: str = "none", diffseg: DiffSegSettings | None = None,
                  emerdiff: EmerDiffSettings | None = None, seed: int = 0,
                  progress: Progress | None = None) -> Segmentation:
    """Images ``[B,3,H,W]`` of one size (already fitted to the model's size grid) -> their
    segmentation. DiffSeg captures the whole batch in one UNet pass; the feature pass of EmerDiff
    is batched too, and the mapper runs its members batched, one image at a time.

    ``method="emerdiff"``: low-res k-means + the mapper. ``refine="kmeans"``: DiffSeg's k-means
    refinement; ``refine="emerdiff"``: DiffSeg, then the mapper on its labels.
    """
    from .core import pipeline

    check_method(method, refine)
    emerdiff = emerdiff or EmerDiffSettings.for_model(backend, pipeline.image_side(image))
    if method == "emerdiff":
        return pipeline.segment_emerdiff(backend, image, cond, emerdiff, seed=seed, progress=progress)
    from dataclasses import replace

    diffseg = replace(diffseg or DiffSegSettings.for_model(backend), refine=refine == "kmeans")
    seg = pipeline.segment_diffseg(backend, image, cond, diffseg, progress=progress, batch_size=int(image.shape[0]))
    if refine == "emerdiff":
        seg = pipeline.refine_with_mapper(backend, image, seg, cond, emerdiff, seed=seed, progress=progress)
    return seg


def fit_to_memory(backend: Backend, image: torch.Tensor, max_memory_gb: float,
                  parity: bool = False) -> tuple[torch.Tensor, str | None]:
    """``image`` ``[3,H,W]``, downscaled (aspect kept, sides on the model's grid) when DiffSeg's
    attention at its size would exceed ``max_memory_gb`` (0 = no limit); the second value is the
    warning to show, or ``None``."""
    from .core.images import attention_bytes, fit_memory

    if max_memory_gb < 0:
        raise EmergentSegError(f"max memory must be >= 0 GB (0 = no limit), got {max_memory_gb:g}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    h, w = fit_memory(backend, height, width, int(max_memory_gb * 1024 ** 3), parity)
    if (h, w) == (height, width):
        return image, None
    need = attention_bytes(backend, height, width, parity) / 1024 ** 3
    note = (f"running at {w}x{h} instead of {width}x{height}: the attention there would need about "
            f"{need:.3g} GB, over the {max_memory_gb:.3g} GB limit (--max-memory / max_memory_gb); "
            "results are still at the image's size")
    small = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                            antialias=True)[0].clamp(0, 1)
    return small, note


def labels_at(seg: Segmentation, height: int, width: int) -> torch.Tensor:
    """The first image's labels ``[H, W]`` int64, resized nearest when the model ran at another size."""
    labels = seg.labels[0]
    if tuple(labels.shape) == (height, width):
        return labels
    return torch.nn.functional.interpolate(labels[None, None].to(torch.float32), size=(height, width),
                                           mode="nearest-exact")[0, 0].to(torch.int64)


def segment(image: Any, model: str | Path | Backend | None = None, *, method: str = "diffseg",
            refine: str = "none", prompt: str = "", size: str | int = "auto", seed: int = 0,
            max_memory_gb: float = 8.0, device: str | None = None, progress: Progress | None = None,
            **options: Any) -> SegmentResult:
    """Segment one image with a diffusion model.

    Args:
        image: a file path, a PIL image, a numpy array or a tensor (see :func:`as_image`).
        model: ``None`` = the embedded miniature SD; a diffusers folder or SD1.x ``.safetensors``
            path; or a backend returned by ``core.backends.loading.load_backend`` (reuse it across
            calls to load the model once).
        method: ``"diffseg"`` or ``"emerdiff"``; ``refine``: ``"none"``, ``"kmeans"``, ``"emerdiff"``.
        prompt: words that name the segments (``""`` = the methods' empty prompt).
        size: ``"auto"`` (the whole image at the model's native area), ``"keep"``, a side such as
            ``512`` (centre-crop square) or ``"768x512"``; results are at the input's own size for
            ``auto``/``keep``, else at the cropped size.
        max_memory_gb: when DiffSeg's attention at the processing size would need more, the image
            is run smaller (with a warning) instead of exhausting memory; 0 = no limit.
        options: DiffSeg settings (``tau``, ``tau_quantile``, ``timestep``, ``iterations``,
            ``anchors_per_side``, ``mode``) and EmerDiff settings (``clusters``, ``quality``,
            ``sigma``, ``lam``, ``t_m``, ...); see ``core/settings.py``.

    Every bad value raises :class:`EmergentSegError` with one line, before the model runs.
    """
    from .core.backends.loading import load_backend
    from .core.images import fit_image, native_side, parse_size
    from .core.masks import render_overlay

    check_method(method, refine)
    diffseg_options, emerdiff_options = split_options(options)
    DiffSegSettings.for_model(None, **diffseg_options)            # check values before any model work
    EmerDiffSettings.for_model(None, **emerdiff_options)
    parse_size(size)
    picture = as_image(image)
    backend = model if model is not None and not isinstance(model, (str, Path)) else load_backend(
        None if model is None else str(model), device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fitted = fit_image(picture, size, backend.size_multiple(), native_side(backend))
    run_at, note = fit_to_memory(backend, fitted, max_memory_gb, diffseg_options.get("mode") == "parity")
    if note:
        warnings.warn(note, stacklevel=2)
    cond = backend.encode_prompt(prompt) if prompt else None
    from .core.pipeline import image_side

    seg = segment_image(backend, run_at.unsqueeze(0), cond, method=method, refine=refine,
                        diffseg=DiffSegSettings.for_model(backend, **diffseg_options),
                        emerdiff=EmerDiffSettings.for_model(backend, image_side(run_at), **emerdiff_options),
                        seed=seed, progress=progress)
    target = picture if str(size).lower() in ("auto", "keep") else fitted
    height, width = int(target.shape[-2]), int(target.shape[-1])
    labels = labels_at(seg, height, width)
    count = seg.counts[0]
    masks = torch.stack([(labels == i).to(torch.float32) for i in range(count)]) if count else \
        torch.zeros(0, height, width)
    full = Segmentation(labels[None], seg.counts[:1], seg.words[:1], None, seg.method, seg.info)
    overlay = render_overlay(target[None], full)[0].permute(1, 2, 0).contiguous()
    words = tuple(seg.words[0]) if seg.words else (None,) * count
    return SegmentResult(labels, masks, words, overlay, seg)
