"""emergent-seg: unsupervised segmentation (DiffSeg, EmerDiff) from the loaded SD model.

As a ComfyUI custom node pack this module only registers the nodes (no model work at import).
Imported outside ComfyUI it exposes nothing ComfyUI-specific: ``emergent_seg.segment(image)`` (the
one-call API, ``api.py``, loaded on first use), ``emergent_seg.core`` and the CLI.
"""
import importlib.util

WEB_DIRECTORY = "./web"


def _in_comfyui() -> bool:
    try:
        return importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


def _has_v3() -> bool:
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None
    except (ImportError, ValueError):
        return False


if _in_comfyui():
    if _has_v3():
        # ComfyUI picks V1 when NODE_CLASS_MAPPINGS exists, so the V3 path must not define it.
        from .nodes import comfy_entrypoint  # noqa: F401
    else:
        from .nodes import v1_mappings as _v1_mappings
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _v1_mappings()


def __getattr__(name: str):
    # lazy, so importing the package (e.g. ComfyUI scanning custom nodes) loads no torch code
    if name in ("segment", "SegmentResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
