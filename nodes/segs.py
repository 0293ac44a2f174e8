"""Segments to SEGS: selected segments as Impact Pack's SEGS (detailers, SEGS filters and pickers)."""
from __future__ import annotations

from collections import namedtuple

import torch

from ..core import masks
from ..core.errors import EmergentSegError
from ..core.segmentation import Segmentation
from .types import FLOAT, IMAGE, INT, SEGMENTATION, STRING, Input, NodeResult, NodeSpec, Output

#: Impact Pack's SEGS item, field for field (its nodes read these attributes). A SEGS value is
#: ``((height, width), [SEG, ...])`` for one image. Impact Pack is not needed to build it.
SEG = namedtuple("SEG", ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                         "control_net_wrapper"], defaults=[None])
SEGS_TYPE = "SEGS"

SPEC = NodeSpec(
    node_id="EmergentSegToSEGS",
    display_name="Segments to SEGS",
    description=(
        "Turns the selected segments into Impact Pack's SEGS: one item per segment with its tight "
        "box, a crop region around it, its mask inside that region and its label (the prompt word, "
        "else 'segment N'). Feed it to a detailer to redraw each segment, or to SEGS filters. One "
        "image per SEGS: pick one from a batch with image_index."),
    inputs=(
        Input("segmentation", SEGMENTATION, "Output of KL Merge, the mapper or Low-Res KMeans."),
        Input("selection", STRING, masks.SELECTION_TOOLTIP, default="all"),
        Input("crop_factor", FLOAT, "Crop region size as a multiple of each segment's box (3 = "
              "detailers' usual context; 1 = the tight box). Kept inside the image.", default=3.0,
              min=1.0, max=100.0, step=0.1),
        Input("drop_size", INT, "Leave out segments whose box is narrower or shorter than this many "
              "pixels.", default=10, min=1, max=8192, step=1),
        Input("image_index", INT, "Which image of the batch the SEGS describes (0 = the first).",
              default=0, min=0, max=4095, step=1),
        Input("image", IMAGE, "The segmented images; when connected each item also carries its "
              "cropped image.", optional=True),
    ),
    outputs=(Output(SEGS_TYPE, "segs", "Impact Pack SEGS of the chosen image: ((H, W), [SEG, ...])."),),
)


def run(segmentation: Segmentation, selection: str = "all", crop_factor: float = 3.0, drop_size: int = 10,
        image_index: int = 0, image: torch.Tensor | None = None) -> NodeResult:
    seg = segmentation
    if not isinstance(seg, Segmentation):
        raise EmergentSegError("the segmentation input must come from KL Merge, the mapper or Low-Res KMeans")
    if not 0 <= int(image_index) < seg.batch_size:
        raise EmergentSegError(f"image_index {image_index} is outside the batch of {seg.batch_size} "
                               f"image(s); use 0..{seg.batch_size - 1}")
    b = int(image_index)
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise EmergentSegError("the image input must be an IMAGE [B,H,W,C]")
        if image.shape[0] not in (1, seg.batch_size) or tuple(image.shape[1:3]) != seg.size:
            raise EmergentSegError(f"the image batch is {image.shape[0]}x{image.shape[2]}x{image.shape[1]} but "
                                   f"the segmentation is {seg.batch_size}x{seg.size[1]}x{seg.size[0]}; "
                                   "connect the images that were segmented")
    selected = masks.resolve_selection(seg, selection, allow_empty=True)[b]
    items = []
    for r in masks.segment_regions(seg, b, selected, float(crop_factor), int(drop_size)):
        x1, y1, x2, y2 = r["crop_region"]
        crop = None
        if image is not None:
            src = image[b if image.shape[0] > 1 else 0]
            crop = src[y1:y2, x1:x2, :3].unsqueeze(0).contiguous()
        label = r["word"] or f"segment {r['index']}"
        items.append(SEG(crop, r["mask"].numpy(), 1.0, list(r["crop_region"]), list(r["bbox"]), label, None))
    return NodeResult(((seg.size, items),))
