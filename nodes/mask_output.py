"""Mask Output: choose segments -> MASK (union), MASK (one per segment), overlay IMAGE + preview."""
from __future__ import annotations

from typing import Callable

import torch

from ..core import masks
from ..core.errors import EmergentSegError
from ..core.segmentation import Segmentation
from .types import (BOOLEAN, IMAGE, INT, MASK, SEGMENTATION, STRING, Input, NodeResult, NodeSpec,
                    Output)

SPEC = NodeSpec(
    node_id="EmergentSegMaskOutput",
    display_name="Mask Output",
    description=(
        "Turns a segmentation into masks: the union of the selected segments (for inpainting or "
        "detailers), every segment as its own mask, and an overlay with each segment's number (and "
        "word, when the capture had a prompt). Click segments in the preview to edit the "
        "selection."),
    inputs=(
        Input("segmentation", SEGMENTATION, "Output of KL Merge (or another emergent-seg segmenter)."),
        Input("selection", STRING, masks.SELECTION_TOOLTIP, default="all"),
        Input("invert", BOOLEAN, "Invert the union mask (select everything except the chosen "
              "segments).", default=False),
        Input("grow", INT, "Grow the union mask by this many pixels; negative values shrink it. "
              "Applied after invert.", default=0, min=-256, max=256, step=1),
        Input("feather", INT, "Soften the union mask's edge with a blur of this radius in pixels. "
              "Applied last.", default=0, min=0, max=256, step=1),
        Input("image", IMAGE, "The segmented images, to draw the overlay on (grey when not "
              "connected).", optional=True),
    ),
    outputs=(
        Output(MASK, "mask", "Union of the selected segments, one mask per image [B,H,W]."),
        Output(MASK, "segments", "Every segment as its own mask: image 0's segments in index order, "
               "then image 1's, and so on [N,H,W]."),
        Output(IMAGE, "overlay", "Coloured segments with their numbers over the image."),
    ),
    output_node=True,
)

SavePreview = Callable[[torch.Tensor], list]


def validate(selection: str = "all") -> str | None:
    """Syntax check of the selection before the graph runs (indices and words are checked at run
    time, when the segments are known)."""
    if not isinstance(selection, str):   # linked from another node: checked at run time
        return None
    return masks.selection_syntax_error(selection)


def run(segmentation: Segmentation, selection: str = "all", invert: bool = False, grow: int = 0,
        feather: int = 0, image: torch.Tensor | None = None,
        save_preview: SavePreview | None = None) -> NodeResult:
    seg = segmentation
    if not isinstance(seg, Segmentation):
        raise EmergentSegError("the segmentation input must come from KL Merge, Low-Res KMeans or Modulated Denoise Mapper")
    selected = masks.resolve_selection(seg, selection)
    union = masks.refine_mask(masks.selection_mask(seg, selected), bool(invert), int(grow), int(feather))
    per_segment, _ = masks.segment_masks(seg)
    base = None
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise EmergentSegError("the image input must be an IMAGE [B,H,W,C]")
        if image.shape[0] not in (1, seg.batch_size):
            raise EmergentSegError(f"{image.shape[0]} images were connected for a segmentation of "
                                   f"{seg.batch_size}; connect the image batch that was segmented")
        base = image[..., :3].movedim(-1, 1).to(seg.labels.device, torch.float32)
    overlay = masks.render_overlay(base, seg, selected=selected).movedim(1, -1).contiguous()
    ui = {"emergent_seg": masks.ui_payload(seg)}
    if save_preview is not None:
        ui["images"] = list(save_preview(overlay))
    return NodeResult((union, per_segment, overlay), ui)
