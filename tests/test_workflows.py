"""The example workflows (example_workflows/*.json) are valid UI-format ComfyUI workflows.

Host-free: node types are ours (read from the NodeSpecs) plus a pinned table of core ComfyUI
0.3.64 nodes (tests/workflow_tools.py; tests/comfy/test_workflows_real.py compares it with a live
server and runs every workflow there, tests/comfy/test_browser.py loads one in the real frontend).
"""
import copy
import glob
import json
import os

import make_workflows
import pytest
from PIL import Image
from workflow_tools import IMPACT, NODE_TYPES, OURS, Workflow, problems, ui_to_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(ROOT, "example_workflows")
NAMES = [b.__name__ for b in make_workflows.WORKFLOWS]
SD15_NAMES = [b.__name__ for b in make_workflows.WORKFLOWS if b not in make_workflows.DIT_WORKFLOWS]
FILES = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def test_the_folder_holds_exactly_the_generated_workflows():
    assert sorted(os.path.basename(f)[:-5] for f in FILES) == sorted(NAMES)
    stray = [f for f in os.listdir(WORKFLOW_DIR) if not f.endswith((".json", ".jpg"))]
    assert stray == []
    assert sorted(os.listdir(make_workflows.PACK_WORKFLOW_DIR)) == \
        sorted(b.__name__ + ".json" for b in make_workflows.PACK_WORKFLOWS)


@pytest.mark.parametrize("name", [b.__name__ for b in make_workflows.PACK_WORKFLOWS])
def test_pack_workflow_is_valid(name):
    """Workflows for other packs (docs/workflows/) check against that pack's pinned types."""
    with open(os.path.join(make_workflows.PACK_WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        wf = json.load(f)
    types = {**NODE_TYPES, **IMPACT}
    assert problems(wf, types) == []
    used = {n["type"] for n in wf["nodes"]}
    assert used & OURS and used & set(IMPACT) and used <= set(types)
    prompt = ui_to_api(wf, types)
    [segs] = [n for n in prompt.values() if n["class_type"] == "EmergentSegToSEGS"]
    consumers = [n for n in prompt.values() if any(v == [k, 0] for k in prompt if prompt[k] is segs
                                                   for v in n["inputs"].values())]
    assert {n["class_type"] for n in consumers} == set(IMPACT)


def test_files_are_what_the_node_specs_generate():
    """Regenerate with ``python tests/make_workflows.py`` after changing a node's inputs."""
    assert make_workflows.main(["--check"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_valid(name):
    wf = load(name)
    assert isinstance(wf.get("nodes"), list) and "class_type" not in json.dumps(wf), "UI format, not API"
    assert problems(wf) == []
    types = {n["type"] for n in wf["nodes"]}
    assert types & OURS, "uses none of our nodes"
    assert types <= set(NODE_TYPES)


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail(name):
    path = os.path.join(WORKFLOW_DIR, name + ".jpg")
    assert os.path.isfile(path), f"{name}.json needs a same-name .jpg thumbnail"
    assert os.path.getsize(path) < 100_000
    with Image.open(path) as im:
        assert im.format == "JPEG"
        assert 200 <= im.width <= 1200 and 150 <= im.height <= 1200


@pytest.mark.parametrize("name", SD15_NAMES)
def test_defaults_suit_sd15_at_512(name):
    wf = load(name)
    api = ui_to_api(wf)
    by_type = {}
    for node in api.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert [(i["width"], i["height"]) for i in by_type["ImageScale"]] == [(512, 512)]
    assert by_type["LoadImage"] == [{"image": "example.png"}]
    assert by_type["CheckpointLoaderSimple"] == [{"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}]
    for inputs in by_type.get("EmergentSegLowResKMeans", []):
        assert inputs["clusters"] <= 256 and inputs["grid"] == 0       # auto: 16x16 for SD1.5 at 512


@pytest.mark.parametrize("name", [b.__name__ for b in make_workflows.DIT_WORKFLOWS])
def test_dit_defaults_suit_sd35_at_1024(name):
    """DiT workflows load ComfyUI's SD3.5 template checkpoint at its native 1024 px and leave
    Capture Attention on the family's presets (levels 'all', sigma 0)."""
    by_type = {}
    for node in ui_to_api(load(name)).values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert [(i["width"], i["height"]) for i in by_type["ImageScale"]] == [(1024, 1024)]
    assert by_type["LoadImage"] == [{"image": "example.png"}]
    assert by_type["CheckpointLoaderSimple"] == [{"ckpt_name": make_workflows.DIT_CHECKPOINT}]
    [capture] = by_type["EmergentSegCaptureAttention"]
    assert capture["levels"] == "all" and capture.get("sigma", 0.0) == 0.0
    for sampler in by_type.get("KSampler", []):
        assert sampler["scheduler"] == "sgm_uniform" and sampler["denoise"] == 1.0


def test_frontend_widget_order():
    """widgets_values order as frontend 1.27.10 creates widgets (seen in a real browser): widget
    inputs in input_order, required before optional, control_after_generate after a seed."""
    layout = {t: [w for w, _ in NODE_TYPES[t].widget_layout()] for t in NODE_TYPES}
    assert layout["EmergentSegCaptureAttention"] == ["timestep", "levels", "prompt", "sigma"]
    assert layout["EmergentSegKLMerge"] == ["tau", "anchors_per_side", "iterations", "mode", "refine",
                                            "tau_quantile"]
    assert layout["EmergentSegMaskOutput"] == ["selection", "invert", "grow", "feather"]
    assert layout["EmergentSegLowResKMeans"] == ["clusters", "timestep", "rng_seed", "grid", "layer", "prompt"]
    assert layout["KSampler"] == ["seed", "control_after_generate", "steps", "cfg", "sampler_name",
                                  "scheduler", "denoise"]
    assert layout["LoadImage"] == ["image", "upload"]
    mapper = layout["EmergentSegModulatedDenoiseMapper"]
    assert mapper[-1] == "prompt" and "rng_seed" in mapper


def test_ui_to_api_conversion():
    wf = load("diffseg_segment")
    api = ui_to_api(wf)
    assert not any(n["class_type"] == "Note" for n in api.values())
    ids = {n["type"]: str(n["id"]) for n in wf["nodes"]}
    merge = api[ids["EmergentSegKLMerge"]]["inputs"]
    assert merge == {"tau": 1.1, "anchors_per_side": 16, "iterations": 3, "mode": "fast", "refine": False,
                     "tau_quantile": 0.0, "attention": [ids["EmergentSegCaptureAttention"], 0]}
    out = api[ids["EmergentSegMaskOutput"]]["inputs"]
    assert out["image"] == [ids["ImageScale"], 0] and out["selection"] == "all"
    capture = api[ids["EmergentSegCaptureAttention"]]["inputs"]
    ckpt = ids["CheckpointLoaderSimple"]
    assert (capture["model"], capture["clip"], capture["vae"]) == ([ckpt, 0], [ckpt, 1], [ckpt, 2])
    sampler = next(n["inputs"] for n in ui_to_api(load("inpaint_segment")).values()
                   if n["class_type"] == "KSampler")
    assert "control_after_generate" not in sampler and sampler["steps"] == 20 and sampler["seed"] == 42


# ------------------------------------------------------------------ the checker catches mistakes


def _mutated(change):
    wf = copy.deepcopy(load("diffseg_segment"))
    change(wf, {n["type"]: n for n in wf["nodes"]})
    return problems(wf)


def _set(node, index, value):
    node["widgets_values"][index] = value


@pytest.mark.parametrize("change, expect", [
    (lambda wf, n: n["EmergentSegKLMerge"]["widgets_values"].pop(), "5 widget values for 6 widgets"),
    (lambda wf, n: _set(n["EmergentSegKLMerge"], 0, 20.0), "above the maximum"),
    (lambda wf, n: _set(n["EmergentSegKLMerge"], 1, 1.5), "is not an INT"),
    (lambda wf, n: _set(n["EmergentSegKLMerge"], 3, "slow"), "is not one of"),
    (lambda wf, n: _set(n["EmergentSegKLMerge"], 4, 0), "is not a BOOLEAN"),
    (lambda wf, n: _set(n["EmergentSegMaskOutput"], 0, "1, !"), "refused by the node's own validation"),
    (lambda wf, n: _set(n["ImageScale"], 3, "middle"), "is not one of"),
    (lambda wf, n: n["EmergentSegKLMerge"].update(type="EmergentSegKLMerger"), "unknown node type"),
    (lambda wf, n: wf["links"][0].__setitem__(5, "LATENT"), "differs from its origin"),
    (lambda wf, n: wf["links"].pop(), "does not exist"),
    (lambda wf, n: wf["links"][0].__setitem__(3, 99), "joins missing node"),
    (lambda wf, n: wf["links"][1].__setitem__(4, 3), "does not name it"),
    (lambda wf, n: n["EmergentSegCaptureAttention"]["inputs"][0].update(link=None), "is not connected"),
    (lambda wf, n: n["EmergentSegMaskOutput"]["inputs"].reverse(), "targets node"),
    (lambda wf, n: n["EmergentSegKLMerge"]["outputs"][0].update(type="MASK"), "should be"),
    (lambda wf, n: wf.update(last_link_id=1), "last_link_id"),
    (lambda wf, n: wf["nodes"].append(copy.deepcopy(n["ImageScale"])), "used twice"),
])
def test_checker_catches(change, expect):
    found = _mutated(change)
    assert any(expect in p for p in found), found


def test_checker_catches_type_mismatch_and_cycles():
    wf = Workflow("t")
    ckpt = wf.node("CheckpointLoaderSimple", (0, 0), {"ckpt_name": "x.safetensors"})
    out = wf.node("EmergentSegMaskOutput", (0, 0))
    wf.link(ckpt, "MODEL", out, "segmentation")
    assert any("cannot feed" in p for p in problems(wf.to_json()))

    wf = Workflow("c")
    a = wf.node("MaskToImage", (0, 0))
    b = wf.node("EmergentSegMaskOutput", (0, 0))
    wf.link(b, "mask", a, "mask")
    wf.link(a, "IMAGE", b, "image")
    wf.nodes[1]["inputs"][0]["link"] = None
    with pytest.raises(ValueError, match="cycle"):
        wf.to_json()
