"""Example-workflow tooling (host-free, never shipped): node types, a UI-format builder, a checker
and the UI -> API conversion.

- :data:`NODE_TYPES`: every node type an example workflow may use. Ours are read from the
  NodeSpecs (so widget order cannot drift); core ComfyUI ones are pinned from ComfyUI 0.3.64's
  ``/object_info`` (frontend 1.27.10). ``tests/comfy/test_workflows_real.py`` compares the pinned
  table with a live server.
- :class:`Workflow`: writes what the frontend's Save/Export writes (``version`` 0.4): socket inputs
  first, then one input per widget, ``widgets_values`` in widget order (required inputs then
  optional ones, as ``input_order`` says; ``control_after_generate`` adds a value after a seed).
- :func:`problems`: everything wrong with a UI-format workflow (links, slots, types, widgets).
- :func:`ui_to_api`: the prompt the frontend would queue (widgets -> inputs by name, links ->
  ``[node_id, slot]``, UI-only nodes such as Note dropped).
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from emergent_seg.nodes import NODES, VALIDATORS
from emergent_seg.nodes.types import COMBO, WIDGETS

WIDGET_TYPES = frozenset(WIDGETS)
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


@dataclass(frozen=True)
class Slot:
    """One input of a node type. ``extra`` names a UI-only widget that follows this one in
    ``widgets_values`` (``control_after_generate`` after a seed, ``upload`` after Load Image's
    file) and ``extra_values`` its allowed values."""

    name: str
    type: str
    widget: bool = False
    optional: bool = False
    options: tuple | None = None       # COMBO choices; None = any (file lists vary per install)
    min: float | None = None
    max: float | None = None
    default: Any = None
    extra: str | None = None
    extra_values: tuple = ()


@dataclass(frozen=True)
class NodeType:
    name: str
    display_name: str
    inputs: tuple[Slot, ...]                 # input_order: required, then optional
    outputs: tuple[tuple[str, str], ...]     # (name, type)
    output_node: bool = False
    ui_only: bool = False                    # frontend-only (Note): never sent to the server
    ui_widgets: tuple[str, ...] = ()         # widgets of a ui_only node

    @property
    def widget_slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.inputs if s.widget)

    @property
    def socket_slots(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.inputs if not s.widget)

    def widget_layout(self) -> list[tuple[str, Slot | None]]:
        """``(widget name, slot)`` per ``widgets_values`` entry; slot None for UI-only extras."""
        if self.ui_only:
            return [(w, None) for w in self.ui_widgets]
        out: list[tuple[str, Slot | None]] = []
        for s in self.widget_slots:
            out.append((s.name, s))
            if s.extra:
                out.append((s.extra, None))
        return out

    def slot(self, name: str) -> Slot | None:
        return next((s for s in self.inputs if s.name == name), None)


def _ours() -> dict[str, NodeType]:
    types = {}
    for spec, _run in NODES:
        slots = [Slot(i.id, i.type, i.type in WIDGET_TYPES, i.optional,
                      tuple(i.options) if i.type == COMBO else None, i.min, i.max, i.default)
                 for i in spec.inputs]
        ordered = [s for s in slots if not s.optional] + [s for s in slots if s.optional]
        types[spec.node_id] = NodeType(spec.node_id, spec.display_name, tuple(ordered),
                                       tuple((o.name, o.type) for o in spec.outputs), spec.output_node)
    return types


def _w(name: str, type_: str, **kw: Any) -> Slot:
    return Slot(name, type_, widget=True, **kw)


SAMPLERS = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")
SEED_MAX = 0xFFFFFFFFFFFFFFFF

#: Core ComfyUI node types the example workflows use, pinned from ComfyUI 0.3.64 /object_info.
CORE: dict[str, NodeType] = {t.name: t for t in (
    NodeType("CheckpointLoaderSimple", "Load Checkpoint", (_w("ckpt_name", COMBO),),
             (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    NodeType("LoadImage", "Load Image", (_w("image", COMBO, extra="upload", extra_values=("image",)),),
             (("IMAGE", "IMAGE"), ("MASK", "MASK"))),
    NodeType("ImageScale", "Upscale Image", (
        Slot("image", "IMAGE"),
        _w("upscale_method", COMBO, options=("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
        _w("width", "INT", min=0, max=16384, default=512),
        _w("height", "INT", min=0, max=16384, default=512),
        _w("crop", COMBO, options=("disabled", "center"))), (("IMAGE", "IMAGE"),)),
    NodeType("PreviewImage", "Preview Image", (Slot("images", "IMAGE"),), (), output_node=True),
    NodeType("MaskPreview", "MaskPreview", (Slot("mask", "MASK"),), (), output_node=True),
    NodeType("MaskToImage", "Convert Mask to Image", (Slot("mask", "MASK"),), (("IMAGE", "IMAGE"),)),
    NodeType("CLIPTextEncode", "CLIP Text Encode (Prompt)", (_w("text", "STRING"), Slot("clip", "CLIP")),
             (("CONDITIONING", "CONDITIONING"),)),
    NodeType("VAEEncodeForInpaint", "VAE Encode (for Inpainting)", (
        Slot("pixels", "IMAGE"), Slot("vae", "VAE"), Slot("mask", "MASK"),
        _w("grow_mask_by", "INT", min=0, max=64, default=6)), (("LATENT", "LATENT"),)),
    NodeType("KSampler", "KSampler", (
        Slot("model", "MODEL"),
        _w("seed", "INT", min=0, max=SEED_MAX, default=0, extra="control_after_generate",
           extra_values=CONTROL_VALUES),
        _w("steps", "INT", min=1, max=10000, default=20),
        _w("cfg", "FLOAT", min=0.0, max=100.0, default=8.0),
        _w("sampler_name", COMBO, options=SAMPLERS),
        _w("scheduler", COMBO, options=SCHEDULERS),
        Slot("positive", "CONDITIONING"), Slot("negative", "CONDITIONING"), Slot("latent_image", "LATENT"),
        _w("denoise", "FLOAT", min=0.0, max=1.0, default=1.0)), (("LATENT", "LATENT"),)),
    NodeType("VAEDecode", "VAE Decode", (Slot("samples", "LATENT"), Slot("vae", "VAE")), (("IMAGE", "IMAGE"),)),
    NodeType("SaveImage", "Save Image", (Slot("images", "IMAGE"), _w("filename_prefix", "STRING",
                                                                     default="ComfyUI")), (), output_node=True),
    NodeType("ImageCompositeMasked", "ImageCompositeMasked", (
        Slot("destination", "IMAGE"), Slot("source", "IMAGE"),
        _w("x", "INT", min=0, max=16384, default=0), _w("y", "INT", min=0, max=16384, default=0),
        _w("resize_source", "BOOLEAN", default=False), Slot("mask", "MASK", optional=True)),
        (("IMAGE", "IMAGE"),)),
    NodeType("PreviewAny", "Preview Any", (Slot("source", "*"),), (), output_node=True),
    NodeType("Note", "Note", (), (), ui_only=True, ui_widgets=("text",)),
    NodeType("MarkdownNote", "Markdown Note", (), (), ui_only=True, ui_widgets=("text",)),
)}

NODE_TYPES: dict[str, NodeType] = {**CORE, **_ours()}
OURS = frozenset(spec.node_id for spec, _ in NODES)

#: Impact Pack node types used by docs/workflows/, pinned from ComfyUI Impact Pack
#: 7.10's ``/object_info``; ``tests/comfy/test_impact_pack.py`` compares them with a live server.
#: Sampler and scheduler lists vary with the installed versions, so they are not pinned.
IMPACT: dict[str, NodeType] = {t.name: t for t in (
    NodeType("DetailerForEach", "Detailer (SEGS)", (
        Slot("image", "IMAGE"), Slot("segs", "SEGS"), Slot("model", "MODEL"), Slot("clip", "CLIP"),
        Slot("vae", "VAE"),
        _w("guide_size", "FLOAT", min=64, max=16384, default=512),
        _w("guide_size_for", "BOOLEAN", default=True),
        _w("max_size", "FLOAT", min=64, max=16384, default=1024),
        _w("seed", "INT", min=0, max=SEED_MAX, default=0, extra="control_after_generate",
           extra_values=CONTROL_VALUES),
        _w("steps", "INT", min=1, max=10000, default=20),
        _w("cfg", "FLOAT", min=0.0, max=100.0, default=8.0),
        _w("sampler_name", COMBO), _w("scheduler", COMBO),
        Slot("positive", "CONDITIONING"), Slot("negative", "CONDITIONING"),
        _w("denoise", "FLOAT", min=0.0001, max=1.0, default=0.5),
        _w("feather", "INT", min=0, max=100, default=5),
        _w("noise_mask", "BOOLEAN", default=True),
        _w("force_inpaint", "BOOLEAN", default=True),
        _w("wildcard", "STRING"),
        _w("cycle", "INT", min=1, max=10, default=1),
        Slot("detailer_hook", "DETAILER_HOOK", optional=True),
        _w("inpaint_model", "BOOLEAN", optional=True, default=False),
        _w("noise_mask_feather", "INT", optional=True, min=0, max=100, default=20),
        Slot("scheduler_func_opt", "SCHEDULER_FUNC", optional=True)), (("IMAGE", "IMAGE"),)),
    NodeType("SEGSPreview", "SEGSPreview", (
        Slot("segs", "SEGS"), _w("alpha_mode", "BOOLEAN", default=True),
        _w("min_alpha", "FLOAT", min=0.0, max=1.0, default=0.2),
        Slot("fallback_image_opt", "IMAGE", optional=True)), (("IMAGE", "IMAGE"),), output_node=True),
    NodeType("SegsToCombinedMask", "SEGS to MASK (combined)", (Slot("segs", "SEGS"),), (("MASK", "MASK"),)),
)}


def node_types_from_object_info(info: dict) -> dict[str, NodeType]:
    """NodeTypes as a live server describes them (``GET /object_info``), for comparison with
    :data:`NODE_TYPES` and for converting workflows exactly as that server's frontend would."""
    out = {}
    for name, d in info.items():
        order = d.get("input_order") or {g: list(d["input"].get(g, {})) for g in ("required", "optional")}
        slots = []
        for group in ("required", "optional"):
            for iname in order.get(group, []):
                spec = d["input"].get(group, {}).get(iname)
                if spec is None:
                    continue
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if isinstance(spec[0], list) or spec[0] == COMBO:
                    options = tuple(spec[0]) if isinstance(spec[0], list) else tuple(opts.get("options", ()))
                    type_ = COMBO
                else:
                    options, type_ = None, spec[0]
                widget = type_ in WIDGET_TYPES and not opts.get("forceInput", False)
                extra, extra_values = None, ()
                if type_ == "INT" and (opts.get("control_after_generate")
                                       or iname in ("seed", "noise_seed")):
                    extra, extra_values = "control_after_generate", CONTROL_VALUES
                if opts.get("image_upload"):
                    extra, extra_values = "upload", ("image",)
                slots.append(Slot(iname, type_, widget, group == "optional", options, opts.get("min"),
                                  opts.get("max"), opts.get("default"), extra, extra_values))
        out[name] = NodeType(name, d.get("display_name") or name, tuple(slots),
                             tuple(zip(d.get("output_name", []), d.get("output", []))),
                             bool(d.get("output_node")))
    return out


# ---------------------------------------------------------------------------------------- builder


@dataclass
class Workflow:
    """Builds a UI-format workflow. Nodes get ids in creation order; links likewise."""

    name: str
    types: dict[str, NodeType] = field(default_factory=lambda: NODE_TYPES)
    nodes: list[dict] = field(default_factory=list)
    links: list[list] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)

    def node(self, type_: str, pos: tuple[float, float], widgets: dict[str, Any] | None = None,
             size: tuple[float, float] | None = None, title: str | None = None,
             properties: dict | None = None, color: str | None = None, bgcolor: str | None = None) -> int:
        nt = self.types[type_]
        widgets = dict(widgets or {})
        values = []
        for wname, slot in nt.widget_layout():
            if wname in widgets:
                values.append(widgets.pop(wname))
            elif slot is not None and slot.default is not None:
                values.append(slot.default)
            elif slot is None and nt.ui_only:
                values.append("")
            elif wname == "control_after_generate":
                values.append("fixed")
            elif wname == "upload":
                values.append("image")
            else:
                raise ValueError(f"{type_}.{wname} has no default; give a value")
        if widgets:
            raise ValueError(f"{type_} has no widgets {sorted(widgets)}")
        inputs = []
        for s in nt.socket_slots:
            entry = {"localized_name": s.name, "name": s.name, "type": s.type}
            if s.optional:
                entry["shape"] = 7
            inputs.append({**entry, "link": None})
        for s in nt.widget_slots:
            entry = {"localized_name": s.name, "name": s.name, "type": s.type}
            if s.optional:
                entry["shape"] = 7
            inputs.append({**entry, "widget": {"name": s.name}, "link": None})
            if s.extra == "upload":
                inputs.append({"localized_name": "choose file to upload", "name": "upload",
                               "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None})
        outputs = [{"localized_name": n, "name": n, "type": t, "links": None}
                   for n, t in nt.outputs]
        node_id = len(self.nodes) + 1
        props = {} if nt.ui_only else {"Node name for S&R": type_}
        props.update(properties or {})
        node: dict[str, Any] = {"id": node_id, "type": type_, "pos": [float(pos[0]), float(pos[1])],
                                "size": [float(v) for v in (size or (270, 100))], "flags": {}, "order": 0,
                                "mode": 0, "inputs": inputs, "outputs": outputs}
        if title:
            node["title"] = title
        if color:
            node["color"] = color
        if bgcolor:
            node["bgcolor"] = bgcolor
        node["properties"] = props
        node["widgets_values"] = values
        self.nodes.append(node)
        return node_id

    def link(self, src: int, output: str | int, dst: int, input_name: str) -> int:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = output if isinstance(output, int) else [o["name"] for o in s["outputs"]].index(output)
        target = [i["name"] for i in d["inputs"]].index(input_name)
        if d["inputs"][target]["link"] is not None:
            raise ValueError(f"{d['type']}.{input_name} is already linked")
        link_id = len(self.links) + 1
        type_ = s["outputs"][slot]["type"]
        self.links.append([link_id, src, slot, dst, target, type_])
        out = s["outputs"][slot]
        out["links"] = (out["links"] or []) + [link_id]
        out["slot_index"] = slot
        d["inputs"][target]["link"] = link_id
        return link_id

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [float(v) for v in bounding],
                            "color": color, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        order = execution_order(self.nodes, self.links)
        for node in self.nodes:
            node["order"] = order[node["id"]]
        # open zoomed out far enough to show the whole graph on a 1920x1080 screen
        x0 = min(n["pos"][0] for n in self.nodes)
        y0 = min(n["pos"][1] for n in self.nodes) - 30
        x1 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y1 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        scale = math.floor(min(1.0, 1700 / (x1 - x0), 880 / (y1 - y0)) * 20) / 20
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"emergent-seg/example_workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": scale, "offset": [40.0 - x0, 40.0 - y0]}, "frontendVersion": "1.27.10"},
            "version": 0.4,
        }


def execution_order(nodes: Iterable[dict], links: Iterable[list]) -> dict[int, int]:
    """Topological order (sources first, ties by id), as the frontend numbers ``order``.
    Raises ValueError on a cycle."""
    nodes = list(nodes)
    deps: dict[int, set[int]] = {n["id"]: set() for n in nodes}
    for link in links:
        if link[3] in deps and link[1] in deps:
            deps[link[3]].add(link[1])
    order: dict[int, int] = {}
    while len(order) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in order and d <= set(order))
        if not ready:
            raise ValueError("the graph has a cycle")
        for i in ready:
            order[i] = len(order)
    return order


# ---------------------------------------------------------------------------------------- checker


def _type_ok(value: Any, slot: Slot) -> str | None:
    t = slot.type
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{value!r} is not an INT"
    elif t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{value!r} is not a FLOAT"
    elif t == "STRING":
        if not isinstance(value, str):
            return f"{value!r} is not a STRING"
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{value!r} is not a BOOLEAN"
    elif t == COMBO:
        if not isinstance(value, str):
            return f"{value!r} is not a combo choice"
        if slot.options is not None and value not in slot.options:
            return f"{value!r} is not one of {list(slot.options)}"
    if t in ("INT", "FLOAT"):
        if slot.min is not None and value < slot.min:
            return f"{value!r} is below the minimum {slot.min}"
        if slot.max is not None and value > slot.max:
            return f"{value!r} is above the maximum {slot.max}"
    return None


def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def problems(wf: Any, types: dict[str, NodeType] = NODE_TYPES, check_core_widgets: bool = True) -> list[str]:
    """Everything wrong with a UI-format workflow, one sentence each (empty = fine)."""
    out: list[str] = []
    if not isinstance(wf, dict):
        return ["the workflow is not a JSON object"]
    for key in ("nodes", "links", "last_node_id", "last_link_id", "version"):
        if key not in wf:
            out.append(f"missing top-level {key!r}")
    if out:
        return out
    nodes = {}
    for n in wf["nodes"]:
        if not isinstance(n, dict) or not isinstance(n.get("id"), int):
            out.append(f"node without an integer id: {str(n)[:80]}")
            continue
        if n["id"] in nodes:
            out.append(f"node id {n['id']} is used twice")
        nodes[n["id"]] = n
        for key in ("type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"):
            if key not in n:
                out.append(f"node {n['id']} has no {key!r}")
    if nodes and max(nodes) > wf["last_node_id"]:
        out.append(f"last_node_id {wf['last_node_id']} < node id {max(nodes)}")
    links = {}
    for link in wf["links"]:
        if not (isinstance(link, list) and len(link) == 6):
            out.append(f"link is not [id, origin, slot, target, slot, type]: {link}")
            continue
        if link[0] in links:
            out.append(f"link id {link[0]} is used twice")
        links[link[0]] = link
    if links and max(links) > wf["last_link_id"]:
        out.append(f"last_link_id {wf['last_link_id']} < link id {max(links)}")
    if out:
        return out

    for nid, n in nodes.items():
        where = f"node {nid} ({n['type']})"
        nt = types.get(n["type"])
        if nt is None:
            out.append(f"{where}: unknown node type")
            continue
        # inputs: names, types, slots agree with the node type; links agree with the table
        names = [i.get("name") for i in n["inputs"]]
        if len(set(names)) != len(names):
            out.append(f"{where}: duplicate input names {names}")
        for s in nt.socket_slots:
            if s.name not in names:
                out.append(f"{where}: input {s.name!r} is missing")
        for idx, inp in enumerate(n["inputs"]):
            slot = nt.slot(inp.get("name"))
            if slot is None:
                if not (inp.get("name") == "upload" and nt.slot("image") and nt.slot("image").extra == "upload"):
                    out.append(f"{where}: input {inp.get('name')!r} does not exist")
                continue
            if inp.get("type") != slot.type and not _types_match(inp.get("type", ""), slot.type):
                out.append(f"{where}: input {slot.name!r} has type {inp.get('type')} but should be {slot.type}")
            if slot.widget != ("widget" in inp):
                out.append(f"{where}: input {slot.name!r} {'needs' if slot.widget else 'must not have'} "
                           "a 'widget' entry")
            lid = inp.get("link")
            if lid is None:
                if not slot.widget and not slot.optional and not nt.ui_only:
                    out.append(f"{where}: required input {slot.name!r} is not connected")
                continue
            link = links.get(lid)
            if link is None:
                out.append(f"{where}: input {slot.name!r} names link {lid}, which does not exist")
            elif link[3] != nid or link[4] != idx:
                out.append(f"{where}: input {slot.name!r} (slot {idx}) names link {lid}, which targets "
                           f"node {link[3]} slot {link[4]}")
        # outputs
        if [(o.get("name"), o.get("type")) for o in n["outputs"]] != list(nt.outputs):
            out.append(f"{where}: outputs {[(o.get('name'), o.get('type')) for o in n['outputs']]} "
                       f"should be {list(nt.outputs)}")
        for slot_idx, o in enumerate(n["outputs"]):
            for lid in o.get("links") or []:
                link = links.get(lid)
                if link is None:
                    out.append(f"{where}: output {slot_idx} names link {lid}, which does not exist")
                elif link[1] != nid or link[2] != slot_idx:
                    out.append(f"{where}: output {slot_idx} names link {lid}, which starts at node "
                               f"{link[1]} slot {link[2]}")
        # widgets
        if nt.name in OURS or check_core_widgets:
            out += [f"{where}: {p}" for p in widget_problems(n, nt)]

    for lid, (_, src, sslot, dst, dslot, ltype) in links.items():
        where = f"link {lid}"
        if src not in nodes or dst not in nodes:
            out.append(f"{where}: joins missing node {src if src not in nodes else dst}")
            continue
        s, d = nodes[src], nodes[dst]
        if not (0 <= sslot < len(s["outputs"])):
            out.append(f"{where}: node {src} has no output slot {sslot}")
            continue
        if not (0 <= dslot < len(d["inputs"])):
            out.append(f"{where}: node {dst} has no input slot {dslot}")
            continue
        if lid not in (s["outputs"][sslot].get("links") or []):
            out.append(f"{where}: not listed on node {src} output {sslot}")
        if d["inputs"][dslot].get("link") != lid:
            out.append(f"{where}: node {dst} input {dslot} does not name it")
        otype = s["outputs"][sslot].get("type", "")
        itype = d["inputs"][dslot].get("type", "")
        if ltype != otype:
            out.append(f"{where}: type {ltype} differs from its origin's {otype}")
        if not _types_match(otype, itype):
            out.append(f"{where}: {s['type']} output {otype} cannot feed {d['type']} input "
                       f"{d['inputs'][dslot].get('name')} ({itype})")
    try:
        execution_order(nodes.values(), links.values())
    except ValueError as e:
        out.append(str(e))
    if not any(types.get(n["type"]) and types[n["type"]].output_node for n in nodes.values()):
        out.append("no output node: nothing would run")
    return out


def widget_problems(node: dict, nt: NodeType) -> list[str]:
    values = node.get("widgets_values")
    layout = nt.widget_layout()
    if not isinstance(values, list):
        return [f"widgets_values is {type(values).__name__}, not a list"]
    if len(values) != len(layout):
        return [f"{len(values)} widget values for {len(layout)} widgets {[w for w, _ in layout]}"]
    out = []
    named = {}
    for (wname, slot), value in zip(layout, values):
        if slot is None:
            if nt.ui_only:
                if not isinstance(value, str):
                    out.append(f"{wname} = {value!r} is not text")
                continue
            owner = next(s for s in nt.widget_slots if s.extra == wname)
            if value not in owner.extra_values:
                out.append(f"{wname} = {value!r} is not one of {list(owner.extra_values)}")
            continue
        error = _type_ok(value, slot)
        if error:
            out.append(f"{wname}: {error}")
        named[wname] = value
    check = VALIDATORS.get(nt.name)
    if check is not None and not out:
        import inspect
        params = inspect.signature(check).parameters
        error = check(**{k: v for k, v in named.items() if k in params})
        if error:
            out.append(f"refused by the node's own validation: {error}")
    return out


# ------------------------------------------------------------------------------------- UI -> API


def ui_to_api(wf: dict, types: dict[str, NodeType] = NODE_TYPES) -> dict:
    """The API-format prompt for a UI-format workflow: widget values become inputs by name, links
    become ``[origin id, origin slot]``; UI-only, muted (mode 2) and bypassed (mode 4) nodes are
    left out (the example workflows have no bypassed node inside a chain)."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        nt = types[node["type"]]
        if nt.ui_only or node.get("mode", 0) in (2, 4):
            continue
        inputs: dict[str, Any] = {}
        for (wname, slot), value in zip(nt.widget_layout(), node.get("widgets_values") or []):
            if slot is not None:
                inputs[wname] = value
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or nt.display_name}}
    return prompt
