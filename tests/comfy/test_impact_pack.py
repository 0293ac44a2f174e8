"""Segments to SEGS against Impact Pack's own nodes, on a real ComfyUI with Impact Pack loaded.

Gated on COMFYUI_PATH and IMPACT_PACK_PATH (a ComfyUI-Impact-Pack checkout whose Python
requirements are installed). One server for the module with both packs, the cached random-weight
SD1.5 checkpoint and ComfyUI's ``input/example.png``. Checks:

- the pinned Impact Pack node types (tests/workflow_tools.py ``IMPACT``) are the live ones;
- docs/workflows/segments_to_detailer.json runs: Segments to SEGS feeds Impact
  Pack's Detailer (SEGS), SEGSPreview and SEGS to MASK (combined);
- Impact Pack reads our SEGS exactly: its combined mask equals Mask Output's mask for the same
  selection, pixel for pixel, and its SEGS-to-mask-list gives one mask per selected segment.

Random weights test plumbing, never segmentation quality. For CPU time the workflow runs at
256 px with a 1-step detailer at guide size 256.
"""
import json
import os

import comfy_support as cs

cs.require_comfy()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_workflows_real import SIZE, fast_settings, serving  # noqa: E402
from workflow_tools import CORE, IMPACT, node_types_from_object_info, problems, ui_to_api  # noqa: E402


IMPACT_PACK_PATH = os.environ.get("IMPACT_PACK_PATH", "")
if not IMPACT_PACK_PATH or not os.path.isfile(os.path.join(IMPACT_PACK_PATH, "modules", "impact", "core.py")):
    pytest.skip("IMPACT_PACK_PATH is not set to a ComfyUI-Impact-Pack checkout (with its requirements "
                "installed); set it to run the SEGS checks against Impact Pack's own nodes",
                allow_module_level=True)

WORKFLOW = os.path.join(cs.REPO_ROOT, "docs", "workflows", "segments_to_detailer.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("comfy_impact"), {"ComfyUI-Impact-Pack": IMPACT_PACK_PATH})


@pytest.fixture(scope="module")
def live_types(server):
    info = server.get("/object_info")
    missing = [n for n in IMPACT if n not in info]
    assert not missing, f"Impact Pack did not load ({missing} missing):\n{server.tail()}"
    return {**node_types_from_object_info(info), **{k: v for k, v in CORE.items() if v.ui_only}}


def test_pinned_impact_types_match_the_server(live_types):
    for name, pinned in IMPACT.items():
        live = live_types[name]
        assert [(s.name, s.type, s.widget, s.optional, s.extra) for s in live.inputs] == \
            [(s.name, s.type, s.widget, s.optional, s.extra) for s in pinned.inputs], name
        for a, b in zip(live.inputs, pinned.inputs):
            if b.widget and b.type in ("INT", "FLOAT"):
                assert (a.min, a.max, a.default) == (b.min, b.max, b.default), (name, a.name)
        assert live.outputs == pinned.outputs and live.output_node == pinned.output_node, name


def test_example_workflow_feeds_the_detailer(server, live_types):
    with open(WORKFLOW, encoding="utf-8") as f:
        wf = json.load(f)
    assert problems(wf, live_types, check_core_widgets=False) == []
    prompt = fast_settings(ui_to_api(wf, live_types))
    for node in prompt.values():
        if node["class_type"] == "DetailerForEach":
            node["inputs"].update(steps=1, guide_size=SIZE, max_size=SIZE)
            # Impact Pack <= 7.10 calls DifferentialDiffusion().apply(), which ComfyUI >= 0.3.5x
            # renamed; a feather of 0 skips that call (newer Impact Pack releases fixed it).
            node["inputs"]["noise_mask_feather"] = 0
    hist = server.run(prompt, timeout=1800)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:4000] + server.tail()
    out = hist["outputs"]
    by_type = {n["class_type"]: k for k, n in prompt.items()}
    detailed = out[by_type["PreviewImage"]]["images"]
    assert len(detailed) == 1 and server.image(detailed[0]).size == (SIZE, SIZE)
    crops = out[by_type["SEGSPreview"]]["images"]
    assert 1 <= len(crops) <= 3  # selection largest:3
    assert server.image(out[by_type["MaskPreview"]]["images"][0]).size == (SIZE, SIZE)


def _mask_png(server, out, node_id) -> np.ndarray:
    [ref] = out[node_id]["images"]
    return np.asarray(server.image(ref).convert("L"))


def test_impact_reads_our_segs_exactly(server, live_types):
    """Impact Pack's SEGS-to-mask nodes rebuild Mask Output's masks from our SEGS."""
    selection = "0, 2-3"
    with open(os.path.join(cs.REPO_ROOT, "example_workflows", "diffseg_segment.json"), encoding="utf-8") as f:
        prompt = fast_settings(ui_to_api(json.load(f), live_types))
    ids = {n["class_type"]: k for k, n in prompt.items()}
    merge, mask_out, image = ids["EmergentSegKLMerge"], ids["EmergentSegMaskOutput"], ids["ImageScale"]
    # random weights give near-uniform attention (one segment at tau 1.1): an adaptive tau, the
    # 5 % quantile of the anchors' KL distances, splits it into several
    prompt[merge]["inputs"]["tau_quantile"] = 0.05
    prompt[mask_out]["inputs"]["selection"] = selection
    prompt.update({
        "segs": {"class_type": "EmergentSegToSEGS",
                 "inputs": {"segmentation": [merge, 0], "selection": selection, "crop_factor": 2.0,
                            "drop_size": 1, "image_index": 0, "image": [image, 0]}},
        "combined": {"class_type": "SegsToCombinedMask", "inputs": {"segs": ["segs", 0]}},
        "list": {"class_type": "ImpactSEGSToMaskList", "inputs": {"segs": ["segs", 0]}},
    })
    for name, source in (("ours", [mask_out, 0]), ("impact", ["combined", 0]), ("each", [mask_out, 1]),
                         ("listed", ["list", 0])):
        prompt[f"{name}_img"] = {"class_type": "MaskToImage", "inputs": {"mask": source}}
        prompt[f"{name}_save"] = {"class_type": "SaveImage",
                                  "inputs": {"images": [f"{name}_img", 0], "filename_prefix": f"segs_{name}"}}
    hist = server.run(prompt, timeout=1800)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:4000] + server.tail()
    out = hist["outputs"]
    ours, theirs = _mask_png(server, out, "ours_save"), _mask_png(server, out, "impact_save")
    assert ours.shape == (SIZE, SIZE) and 0 < (ours > 127).sum() < SIZE * SIZE
    assert np.array_equal(ours > 127, theirs > 127)
    each = [np.asarray(server.image(r).convert("L")) > 127 for r in out["each_save"]["images"]]
    listed = [np.asarray(server.image(r).convert("L")) > 127 for r in out["listed_save"]["images"]]
    assert len(each) >= 4, "the random-weight model gave too few segments for this check"
    wanted = [each[i] for i in (0, 2, 3)]
    assert len(listed) == len(wanted)
    for a in listed:  # one Impact mask per selected segment, each equal to that segment's mask
        assert any(np.array_equal(a, b) for b in wanted)
