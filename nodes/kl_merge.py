"""KL Merge: DiffSeg's iterative attention merging -> one label map per image (+ word labels)."""
from __future__ import annotations


from ..core.capture import AttentionCapture
from ..core.diffseg import DEFAULT_TAU, MODES
from ..core.errors import EmergentSegError
from ..core.pipeline import DiffSegSettings, merge
from .types import (ATTENTION, BOOLEAN, COMBO, FLOAT, INT, SEGMENTATION, Input, NodeResult, NodeSpec,
                    Output, host_progress)

SPEC = NodeSpec(
    node_id="EmergentSegKLMerge",
    display_name="KL Merge",
    description=(
        "DiffSeg: starts from a grid of anchor points, merges attention maps whose symmetric KL "
        "distance is below tau, and gives every pixel the label of its strongest merged map. "
        "Each image gets its own number of segments. When the capture had a prompt, each segment "
        "is named after the prompt word whose cross-attention is strongest inside it."),
    inputs=(
        Input("attention", ATTENTION, "Output of Capture Attention."),
        Input("tau", FLOAT, "KL threshold for merging. Lower = more, smaller segments. The paper uses "
              "1.1 (COCO) and 0.9 (Cityscapes) for SD1.x; other models need their own (the embedded "
              "256 px test model was calibrated at 0.11).", default=DEFAULT_TAU, min=0.01, max=10.0, step=0.01),
        Input("anchors_per_side", INT, "Anchor points per side of the attention grid (16 = 256 "
              "anchors, the paper's setting). More anchors can find smaller objects.", default=16,
              min=1, max=64, step=1),
        Input("iterations", INT, "Merging rounds (the paper uses 3). Later rounds merge the "
              "proposals of the first.", default=3, min=1, max=10, step=1),
        Input("mode", COMBO, "fast: matrix-product KL in float32 (seconds on CPU); near-ties with "
              "tau are decided with the official float16 arithmetic, so it picks what parity picks "
              "except where a map holds an exact float16 zero (parity drops such maps). parity: the "
              "official float16 arithmetic, quirks included (slow; for reproducing the paper).",
              default="fast", options=MODES),
        Input("refine", BOOLEAN, "Refine the merged maps with k-means over all attention maps (the "
              "official demo's option; slower, smoother boundaries).", default=False),
        Input("tau_quantile", FLOAT, "Adaptive threshold: when above 0, tau is replaced per image by "
              "this quantile of the anchor-to-pixel KL distances (e.g. 0.2). Useful for models whose "
              "attention is flatter than SD's. 0 = use tau.", optional=True, default=0.0, min=0.0,
              max=0.99, step=0.01),
    ),
    outputs=(Output(SEGMENTATION, "segmentation", "Label map per image, for Mask Output."),),
)


def run(attention: AttentionCapture, tau: float = DEFAULT_TAU, anchors_per_side: int = 16,
        iterations: int = 3, mode: str = "fast", refine: bool = False,
        tau_quantile: float = 0.0) -> NodeResult:
    if not isinstance(attention, AttentionCapture):
        raise EmergentSegError("the attention input must come from Capture Attention")
    adaptive = float(tau_quantile) > 0
    settings = DiffSegSettings(tau=None if adaptive else float(tau),
                               tau_quantile=float(tau_quantile) if adaptive else None,
                               iterations=int(iterations), anchors_per_side=int(anchors_per_side),
                               mode=mode, refine=bool(refine))
    return NodeResult((merge(attention, settings, host_progress()),))
