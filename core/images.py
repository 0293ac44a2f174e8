"""Reading images and fitting them to a UNet's size grid (pure torch + PIL for file decoding)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EmergentSegError


def read_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to ``[3,H,W]`` float32 in [0,1] (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise EmergentSegError(f"image {path} does not exist; check the path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EmergentSegError(f"cannot read image {path} ({exc}); pass a PNG, JPEG or WebP file") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def parse_size(spec: str | int | None) -> tuple[str, tuple[int, int] | None]:
    """``"512"`` -> centre-crop square (the official preprocessing); ``"768x512"`` (W x H) ->
    centre-crop to that aspect and resize; ``"keep"`` -> keep the aspect, round to the grid."""
    if spec is None or str(spec).lower() == "keep":
        return "keep", None
    text = str(spec).lower().strip()
    try:
        if "x" in text:
            w, h = (int(p) for p in text.split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise EmergentSegError(f"size {spec!r} is not understood; use 512, 768x512 (width x height) or keep") from None
    if w <= 0 or h <= 0:
        raise EmergentSegError(f"size {spec!r} must be positive")
    return "fixed", (h, w)


def fit_image(image: torch.Tensor, size: str | int | None, multiple: int) -> torch.Tensor:
    """Centre-crop to the target aspect and resize bilinearly (half-pixel centres, no antialias,
    as ``tf.image.resize`` in the official code). ``image`` is ``[3,H,W]``."""
    mode, target = parse_size(size)
    h, w = image.shape[-2:]
    if mode == "keep":
        th = max(multiple, int(round(h / multiple)) * multiple)
        tw = max(multiple, int(round(w / multiple)) * multiple)
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


def save_png(array: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """Save ``[H,W]`` (grey/labels as uint8) or ``[H,W,3]`` float in [0,1] or uint8 as PNG."""
    from PIL import Image

    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            arr = arr.astype(np.uint16) if arr.max(initial=0) > 255 else arr.astype(np.uint8)
    Image.fromarray(arr).save(path)
