"""Reading images and fitting them to a UNet's size grid (pure torch + PIL for file decoding)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backend import nearest_fit
from .errors import EmergentSegError


#: Largest image decoded (pixels): 64 megapixels is 768 MB as float32 RGB (8K video frames are 33).
MAX_PIXELS = 64_000_000


def check_readable(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` from the file header (nothing decoded); one-line errors for a missing,
    unreadable or oversized file."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a message that says what to do
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise EmergentSegError(f"image {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise EmergentSegError(f"{path} is a folder; pass image files") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EmergentSegError(f"cannot read image {path} ({exc}); pass a PNG, JPEG or WebP file") from None
    if w * h > MAX_PIXELS:
        raise EmergentSegError(f"image {path} is {w}x{h} ({w * h / 1e6:.0f} megapixels); the limit is "
                               f"{MAX_PIXELS // 1_000_000} megapixels, downscale it first")
    return h, w


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to ``[3,H,W]`` float32 in [0,1] (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    check_readable(path)
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise EmergentSegError(f"image {path} does not exist; check the path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EmergentSegError(f"cannot read image {path} ({exc}); pass a PNG, JPEG or WebP file") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def native_side(backend: object) -> int:
    """The square side a model was trained at: the stored default (``calibration["native_size"]``,
    the embedded model's 256), else the UNet's ``sample_size`` times the VAE factor (SD1.x 512,
    SD2.x-v 768, SDXL 1024), else 512."""
    from .settings import calibration_of

    calibration = calibration_of(backend)
    if calibration.get("native_size"):
        return int(calibration["native_size"])
    config = getattr(getattr(backend, "unet", None), "config", None)
    sample = getattr(config, "sample_size", None)
    if isinstance(sample, int) and sample > 0:
        return int(sample) * int(getattr(backend, "latent_scale", 8))
    return 512


def parse_size(spec: str | int | None) -> tuple[str, tuple[int, int] | None]:
    """``None``/``"auto"`` -> keep the aspect and scale to the model's native area (the default);
    ``"512"`` -> centre-crop square (the official preprocessing); ``"768x512"`` (W x H) ->
    centre-crop to that aspect and resize; ``"keep"`` -> keep the size, round to the grid."""
    if spec is None or str(spec).lower() == "auto":
        return "auto", None
    if str(spec).lower() == "keep":
        return "keep", None
    text = str(spec).lower().strip()
    try:
        if "x" in text:
            w, h = (int(p) for p in text.split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise EmergentSegError(f"size {spec!r} is not understood; use auto, 512, 768x512 (width x height) "
                               "or keep") from None
    if w <= 0 or h <= 0:
        raise EmergentSegError(f"size {spec!r} must be positive")
    return "fixed", (h, w)


def auto_size(h: int, w: int, native: int, multiple: int) -> tuple[int, int]:
    """``(th, tw)``: the aspect of ``h x w`` at about ``native**2`` pixels, each side a multiple of
    ``multiple`` (at least one multiple)."""
    scale = native / math.sqrt(h * w)
    return nearest_fit(h * scale, w * scale, multiple)


def fit_image(image: torch.Tensor, size: str | int | None, multiple: int, native: int = 512) -> torch.Tensor:
    """Fit ``image`` ``[3,H,W]`` to the model's size grid.

    ``auto`` (default): the whole image, aspect kept, scaled to about ``native**2`` pixels (area
    antialiasing when shrinking), sides rounded to ``multiple``; the caller maps the result back to
    the original size. Fixed sizes: centre-crop to the target aspect and resize bilinearly
    (half-pixel centres, no antialias, as ``tf.image.resize`` in the official code)."""
    mode, target = parse_size(size)
    h, w = image.shape[-2:]
    if mode == "auto":
        th, tw = auto_size(int(h), int(w), native, multiple)
        if (th, tw) == (h, w):
            return image.contiguous()
        return F.interpolate(image.unsqueeze(0), size=(th, tw), mode="bilinear", align_corners=False,
                             antialias=th < h or tw < w)[0].clamp(0, 1)
    if mode == "keep":
        th, tw = nearest_fit(int(h), int(w), multiple)
        if th * tw > 4 * native * native:
            raise EmergentSegError(f"--size keep would run the model at {tw}x{th}, more than 4x its native "
                                   f"{native}x{native} area (attention memory grows with its square); "
                                   "use --size auto (the default) or a fixed size")
    else:
        th, tw = target
        if th % multiple or tw % multiple:
            raise EmergentSegError(f"size {tw}x{th} is not a multiple of {multiple}; use "
                                   f"{max(multiple, round(tw / multiple) * multiple)}x"
                                   f"{max(multiple, round(th / multiple) * multiple)}")
    # centre-crop to the target aspect ratio
    if h * tw > w * th:
        ch, cw = max(1, round(w * th / tw)), w
    else:
        ch, cw = h, max(1, round(h * tw / th))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[..., top:top + ch, left:left + cw]
    if (ch, cw) == (th, tw):
        return crop.contiguous()
    return F.interpolate(crop.unsqueeze(0), size=(th, tw), mode="bilinear", align_corners=False,
                         antialias=False)[0]


#: Memory the DiffSeg aggregate may take by default (bytes; ``--max-memory`` in the CLI).
DEFAULT_MEMORY_BUDGET = 8 * 1024 ** 3
#: The aggregate is ``[N, N]`` for the N tokens of the finest self-attention grid; at its peak the
#: merge holds about this many buffers of that size (the aggregate, its log, one product).
AGGREGATE_BUFFERS = 3


def attention_bytes(backend: object, height: int, width: int, parity: bool = False) -> int:
    """Estimated peak bytes of DiffSeg's attention aggregate for an image run at ``height x width``:
    it grows with the square of the pixel count, so this is what runs out first."""
    sites = [s for s in backend.sites() if s.kind == "self"]  # type: ignore[attr-defined]
    cell = int(getattr(backend, "latent_scale", 8)) * (min(s.stride for s in sites) if sites else 1)
    tokens = max(1, height // cell) * max(1, width // cell)
    return AGGREGATE_BUFFERS * tokens * tokens * (8 if parity else 4)


def fit_memory(backend: object, height: int, width: int, budget: int = DEFAULT_MEMORY_BUDGET,
               parity: bool = False) -> tuple[int, int]:
    """``(height, width)`` when :func:`attention_bytes` fits ``budget``, else the largest size with
    the same aspect (sides multiples of the model's step) that does."""
    need = attention_bytes(backend, height, width, parity)
    if budget <= 0 or need <= budget:
        return height, width
    m = backend.size_multiple()  # type: ignore[attr-defined]
    scale = (budget / need) ** 0.25          # bytes grow with the fourth power of the side
    h, w = max(m, int(height * scale) // m * m), max(m, int(width * scale) // m * m)
    while (h > m or w > m) and attention_bytes(backend, h, w, parity) > budget:
        h, w = max(m, h - m), max(m, w - m)
    return h, w


def save_png(array: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """Save ``[H,W]`` (grey/labels as uint8) or ``[H,W,3]`` float in [0,1] or uint8 as PNG.

    Written to a temporary file beside ``path`` and renamed into place, so an interrupted run
    never leaves a truncated PNG under the final name."""
    import os

    from PIL import Image

    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            arr = arr.astype(np.uint16) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        Image.fromarray(arr).save(partial, format="PNG")
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
