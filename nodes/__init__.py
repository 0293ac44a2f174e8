"""ComfyUI nodes of emergent-seg: thin wrappers over ``core`` (registration only lives here).

Each node module holds a :class:`~.types.NodeSpec` and a ``run`` function. :func:`v3_nodes` turns
them into ``comfy_api.latest`` nodes; :func:`v1_mappings` into classic classes for ComfyUI builds
without the V3 API. ``comfy_api`` is imported only inside those functions, so the node modules
import (and are testable) without ComfyUI.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from . import capture, kl_merge, lowres_kmeans, mapper, mask_output, segs
from .types import COMBO, WIDGETS, Input, NodeResult, NodeSpec

#: (spec, run) of every node, in menu order. Node ids are stable forever (docs/CONTRACTS.md).
NODES: tuple[tuple[NodeSpec, Callable[..., NodeResult]], ...] = (
    (capture.SPEC, capture.run),
    (kl_merge.SPEC, kl_merge.run),
    (mask_output.SPEC, mask_output.run),
    (lowres_kmeans.SPEC, lowres_kmeans.run),
    (mapper.SPEC, mapper.run),
    (segs.SPEC, segs.run),
)
#: Optional pre-run checks, ``validate(**some_inputs) -> error sentence | None``; ComfyUI passes
#: only the inputs named in the signature (and then skips its own min/max check for those).
VALIDATORS: dict[str, Callable[..., str | None]] = {mask_output.SPEC.node_id: mask_output.validate}


def _validator(check: Callable[..., str | None], first: str) -> Callable:
    """A ``validate_inputs``/``VALIDATE_INPUTS`` function with ``check``'s parameters (ComfyUI
    reads the signature to decide which inputs to pass) that returns True or the sentence."""
    def validate(_cls_or_self: Any, **inputs: Any) -> bool | str:
        error = check(**inputs)
        return True if error is None else error
    params = [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for p in inspect.signature(check).parameters.values()]
    validate.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return validate


def _takes_preview(run: Callable) -> bool:
    return "save_preview" in inspect.signature(run).parameters


# ------------------------------------------------------------------------------------------- V3


def _v3_input(io: Any, spec: Input) -> Any:
    common = dict(tooltip=spec.tooltip, optional=spec.optional, display_name=spec.display_name)
    numeric = dict(default=spec.default, min=spec.min, max=spec.max, step=spec.step)
    if spec.type == "INT":
        return io.Int.Input(spec.id, **common, **numeric)
    if spec.type == "FLOAT":
        return io.Float.Input(spec.id, **common, **numeric)
    if spec.type == "STRING":
        return io.String.Input(spec.id, **common, default=spec.default, multiline=spec.multiline)
    if spec.type == "BOOLEAN":
        return io.Boolean.Input(spec.id, **common, default=spec.default)
    if spec.type == COMBO:
        return io.Combo.Input(spec.id, **common, options=list(spec.options), default=spec.default)
    builtin = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "CONDITIONING": io.Conditioning,
               "IMAGE": io.Image, "LATENT": io.Latent, "MASK": io.Mask}
    return (builtin.get(spec.type) or io.Custom(spec.type)).Input(spec.id, **common)


def _v3_output_type(io: Any, type_: str) -> Any:
    return {"IMAGE": io.Image, "MASK": io.Mask, "LATENT": io.Latent}.get(type_) or io.Custom(type_)


def v3_node(spec: NodeSpec, run: Callable[..., NodeResult]) -> type:
    """A ``comfy_api.latest`` node class for ``spec`` that calls ``run``."""
    from comfy_api.latest import io, ui

    preview = _takes_preview(run)

    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id=spec.node_id, display_name=spec.display_name, category=spec.category,
                description=spec.description, is_output_node=spec.output_node,
                inputs=[_v3_input(io, i) for i in spec.inputs],
                outputs=[_v3_output_type(io, o.type).Output(o.name, display_name=o.name, tooltip=o.tooltip)
                         for o in spec.outputs])

        @classmethod
        def execute(cls, **inputs: Any) -> Any:
            if preview:
                inputs["save_preview"] = lambda images: ui.PreviewImage(images, cls=cls).as_dict()["images"]
            result = run(**inputs)
            return io.NodeOutput(*result.outputs, ui=result.ui)

    check = VALIDATORS.get(spec.node_id)
    if check is not None:
        Node.validate_inputs = classmethod(_validator(check, "cls"))
    Node.__name__ = Node.__qualname__ = spec.node_id
    return Node


def v3_nodes() -> list[type]:
    return [v3_node(spec, run) for spec, run in NODES]


async def comfy_entrypoint() -> Any:
    """ComfyUI V3 entry point (``custom_nodes/<pack>/__init__.py`` re-exports it)."""
    from comfy_api.latest import ComfyExtension

    class EmergentSegExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return v3_nodes()

    return EmergentSegExtension()


# ------------------------------------------------------------------------------------------- V1


def _v1_input(spec: Input) -> tuple:
    opts: dict[str, Any] = {"tooltip": spec.tooltip}
    for key in ("default", "min", "max", "step"):
        value = getattr(spec, key)
        if value is not None:
            opts[key] = value
    if spec.multiline:
        opts["multiline"] = True
    if spec.type == COMBO:
        return (list(spec.options), opts)
    if spec.type not in WIDGETS:
        opts = {"tooltip": spec.tooltip}
    return (spec.type, opts)


def v1_node(spec: NodeSpec, run: Callable[..., NodeResult]) -> type:
    """A classic (V1) node class for ``spec`` that calls ``run``."""
    preview = _takes_preview(run)

    def input_types(cls: type) -> dict:
        return {"required": {i.id: _v1_input(i) for i in spec.inputs if not i.optional},
                "optional": {i.id: _v1_input(i) for i in spec.inputs if i.optional}}

    def execute(self: Any, **inputs: Any) -> dict:
        if preview:
            def save(images: Any) -> list:
                import nodes as comfy_nodes  # ComfyUI's top-level nodes.py
                return comfy_nodes.PreviewImage().save_images(images)["ui"]["images"]
            inputs["save_preview"] = save
        result = run(**inputs)
        out: dict = {"result": tuple(result.outputs)}
        if result.ui is not None:
            out["ui"] = result.ui
        return out

    extra: dict[str, Any] = {}
    check = VALIDATORS.get(spec.node_id)
    if check is not None:
        extra["VALIDATE_INPUTS"] = classmethod(_validator(check, "cls"))
    return type(spec.node_id, (), {
        **extra,
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o.type for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs),
        "FUNCTION": "execute",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "execute": execute,
    })


def v1_mappings() -> tuple[dict[str, type], dict[str, str]]:
    """``(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)`` for hosts without ``comfy_api``."""
    classes = {spec.node_id: v1_node(spec, run) for spec, run in NODES}
    names = {spec.node_id: spec.display_name for spec, _ in NODES}
    return classes, names
