"""Socket types and a host-neutral description of each node.

A node module declares a :class:`NodeSpec` (inputs, outputs, tooltips) and a plain ``run``
function; ``nodes/__init__.py`` turns the pair into a ComfyUI V3 node (``comfy_api.latest``) or,
on older hosts, a V1 class. Nothing here imports ComfyUI, so node logic is testable without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.backend import Progress

#: core.capture.AttentionCapture
ATTENTION = "EMERGENT_SEG_ATTENTION"
#: core.segmentation.Segmentation
SEGMENTATION = "EMERGENT_SEG_SEGMENTATION"

CATEGORY = "segmentation/emergent"

# ComfyUI's built-in socket types used by the pack.
MODEL, CLIP, VAE, CONDITIONING = "MODEL", "CLIP", "VAE", "CONDITIONING"
IMAGE, LATENT, MASK = "IMAGE", "LATENT", "MASK"
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
WIDGETS = (INT, FLOAT, STRING, BOOLEAN, COMBO)


@dataclass(frozen=True)
class Input:
    """One node input. ``options`` makes a COMBO; ``min``/``max``/``step`` apply to INT/FLOAT."""

    id: str
    type: str
    tooltip: str
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] = ()
    multiline: bool = False
    display_name: str | None = None


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    output_node: bool = False
    category: str = CATEGORY


@dataclass
class NodeResult:
    """What ``run`` returns: the output values in :attr:`NodeSpec.outputs` order, and the ``ui``
    dict (every value a list, as ComfyUI merges them) for output nodes."""

    outputs: tuple
    ui: dict[str, list] | None = field(default=None)


def host_progress(total: int = 0) -> Progress:
    """ComfyUI's progress bar and Cancel when running inside ComfyUI; a silent one when ComfyUI is
    not importable (host-free tests). Any other import failure is a real error and propagates."""
    import importlib.util

    try:  # "comfy" alone could be any folder of that name on sys.path (tests/comfy is one)
        in_host = importlib.util.find_spec("comfy.model_management") is not None
    except ModuleNotFoundError:
        in_host = False
    if not in_host:
        return Progress(total=total)
    from .comfy_backend import comfy_progress

    return comfy_progress(total)
