"""Every example workflow, converted to API format, runs on a real ComfyUI.

Gated on COMFYUI_PATH. One ComfyUI server (``main.py --cpu`` on 127.0.0.1) for the module, with
this repository as ``custom_nodes/emergent_seg``, the cached random-weight SD1.5 checkpoint linked
under the name the workflows use (``v1-5-pruned-emaonly-fp16.safetensors``) and ComfyUI's own
``input/example.png``. For the DiT workflow (dit_inpaint_segment) a random-weight SD3.5 stand-in
(``comfy_support.build_random_sd35``: a 4-block MMDiT, CLIP-L as its only text encoder, the
full-size 16-channel VAE) is linked under the SD3.5 checkpoint name that workflow uses
(``sd3.5_large_fp8_scaled.safetensors``); Load Checkpoint detects it as SD3 like the real file.

Each workflow is converted exactly as the frontend would queue it (tests/workflow_tools.py
``ui_to_api``, with the widget order read from the live ``/object_info``), then, **for CPU time
only**, these values of the converted prompt are changed (the JSON files keep their 512 px
defaults):

- Upscale Image: 512x512 (1024x1024 in dit_inpaint_segment) -> 256x256
- KSampler: 20 steps -> 1
- Low-Res KMeans: 20 clusters -> 4
- KL Merge feeding the mapper (diffseg_refined_by_mapper): tau 1.1 -> 3.0, so the random-weight
  model gives a few segments (the mapper costs one UNet evaluation + one VAE decode per segment)

Random weights test plumbing, shapes and cost, never segmentation quality.
"""
import json
import os
import shutil
import time

import comfy_support as cs

cs.require_comfy()

import make_workflows  # noqa: E402
import pytest  # noqa: E402
from test_comfy_server import Server, _free_port  # noqa: E402
from workflow_tools import (  # noqa: E402
    CORE,
    NODE_TYPES,
    OURS,
    node_types_from_object_info,
    problems,
    ui_to_api,
)

SIZE = 256
WORKFLOW_DIR = os.path.join(cs.REPO_ROOT, "example_workflows")
NAMES = [b.__name__ for b in make_workflows.WORKFLOWS]


def start_server(base, log_name: str = "server.log", other_packs: dict[str, str] | None = None) -> Server:
    """A ComfyUI for the example workflows under ``base`` (a pathlib folder); caller stops it.
    ``other_packs``: more custom node folders to link in, by name."""
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "emergent_seg").symlink_to(cs.REPO_ROOT, target_is_directory=True)
    for name, path in (other_packs or {}).items():
        (base / "custom_nodes" / name).symlink_to(path, target_is_directory=True)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / make_workflows.CHECKPOINT).symlink_to(cs.build_random_sd15())
    (ckpt_dir / make_workflows.DIT_CHECKPOINT).symlink_to(cs.build_random_sd35())
    (base / "input").mkdir()
    shutil.copy(os.path.join(cs.COMFYUI_PATH, "input", make_workflows.IMAGE), base / "input")
    srv = Server(str(base), _free_port(), str(base / log_name))
    try:
        srv.wait_ready()
    except Exception:
        srv.stop()
        raise
    return srv


def serving(base, other_packs: dict[str, str] | None = None):
    """Generator for a module-scoped server fixture: starts under ``base``, stops afterwards."""
    srv = start_server(base, other_packs=other_packs)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("comfy_workflows"))


@pytest.fixture(scope="module")
def live_types(server):
    return node_types_from_object_info(server.get("/object_info"))


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def fast_settings(prompt: dict) -> dict:
    """The CPU-time overrides listed in the module docstring."""
    feeds_mapper = {inp["segmentation"][0] for n in prompt.values()
                    if n["class_type"] == "EmergentSegModulatedDenoiseMapper"
                    for inp in [n["inputs"]] if isinstance(inp.get("segmentation"), list)}
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        if node["class_type"] == "ImageScale":
            inputs["width"] = inputs["height"] = SIZE
        elif node["class_type"] == "KSampler":
            inputs["steps"] = 1
        elif node["class_type"] == "EmergentSegLowResKMeans":
            inputs["clusters"] = 4
        elif node["class_type"] == "EmergentSegKLMerge" and node_id in feeds_mapper:
            inputs["tau"] = 3.0
    return prompt


def test_pinned_node_types_match_the_server(live_types):
    """The CI validator's pinned core types and the NodeSpec-derived ones are what this ComfyUI
    (and so its frontend) sees: same inputs in the same order, widgets, combos, ranges, outputs."""
    for name, pinned in {**CORE, **{k: NODE_TYPES[k] for k in OURS}}.items():
        if pinned.ui_only:
            continue
        live = live_types[name]
        assert [(s.name, s.type, s.widget, s.optional, s.extra) for s in live.inputs] == \
            [(s.name, s.type, s.widget, s.optional, s.extra) for s in pinned.inputs], name
        for a, b in zip(live.inputs, pinned.inputs):
            if b.options is not None:
                assert tuple(a.options) == tuple(b.options), (name, a.name)
            if b.widget and b.type in ("INT", "FLOAT"):
                assert (a.min, a.max) == (b.min, b.max), (name, a.name)
            if name in OURS and b.widget:
                assert a.default == b.default, (name, a.name)
        assert live.outputs == pinned.outputs and live.output_node == pinned.output_node, name
    # and every example workflow checks clean against the live definitions too
    for wf_name in NAMES:
        assert problems(load(wf_name), {**live_types, **{k: v for k, v in CORE.items() if v.ui_only}},
                        check_core_widgets=False) == [], wf_name


def test_templates_are_served(server):
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get("emergent_seg", [])) == sorted(NAMES)
    for name in NAMES:
        served = server.get(f"/api/workflow_templates/emergent_seg/{name}.json")
        assert (served if isinstance(served, dict) else json.loads(served)) == load(name)
        thumb = server.get(f"/api/workflow_templates/emergent_seg/{name}.jpg")
        assert thumb[:3] == b"\xff\xd8\xff", name


def _run(server, live_types, name):
    wf = load(name)
    prompt = ui_to_api(wf, {**live_types, **{k: v for k, v in CORE.items() if v.ui_only}})
    assert prompt == ui_to_api(wf), "pinned and live node types convert differently"
    prompt = fast_settings(prompt)
    t0 = time.time()
    hist = server.run(prompt, timeout=1800)
    elapsed = time.time() - t0
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:4000] + server.tail()
    print(f"{name}: {elapsed:.0f} s")
    return prompt, hist["outputs"]


def _ids(prompt, class_type, title_part=""):
    return [k for k, n in prompt.items()
            if n["class_type"] == class_type and title_part in n["_meta"]["title"]]


def _check_mask_output(server, out, node_id, method_prefix=None):
    payload = out[node_id]["emergent_seg"]
    assert len(payload) == 1
    entry = payload[0]
    assert (entry["width"], entry["height"]) == (SIZE, SIZE)
    assert len(entry["segments"]) >= 1
    assert sum(entry["labels_rle"][1::2]) == entry["grid_w"] * entry["grid_h"]
    if method_prefix:
        assert entry["method"].startswith(method_prefix), entry["method"]
    assert server.image(out[node_id]["images"][0]).size == (SIZE, SIZE)
    return entry


def _check_image_outputs(server, out, node_id, count=1):
    images = out[node_id]["images"]
    assert len(images) == count
    assert {server.image(r).size for r in images} == {(SIZE, SIZE)}


def test_diffseg_segment(server, live_types):
    prompt, out = _run(server, live_types, "diffseg_segment")
    [mask_out] = _ids(prompt, "EmergentSegMaskOutput")
    entry = _check_mask_output(server, out, mask_out, "diffseg")
    overlay, segments = _ids(prompt, "PreviewImage", "overlay"), _ids(prompt, "PreviewImage", "segment")
    _check_image_outputs(server, out, overlay[0])
    _check_image_outputs(server, out, segments[0], count=len(entry["segments"]))
    _check_image_outputs(server, out, _ids(prompt, "MaskPreview")[0])


def test_inpaint_segment(server, live_types):
    prompt, out = _run(server, live_types, "inpaint_segment")
    [mask_out] = _ids(prompt, "EmergentSegMaskOutput")
    assert prompt[mask_out]["inputs"]["selection"] == "largest:1"
    _check_mask_output(server, out, mask_out, "diffseg")
    _check_image_outputs(server, out, _ids(prompt, "MaskPreview")[0])
    [save] = _ids(prompt, "SaveImage")
    saved = out[save]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output"
    assert saved[0]["subfolder"] == "emergent_seg"
    _check_image_outputs(server, out, save)


def test_emerdiff_segment(server, live_types):
    prompt, out = _run(server, live_types, "emerdiff_segment")
    coarse = _check_mask_output(server, out, _ids(prompt, "EmergentSegMaskOutput", "low-res")[0], "emerdiff")
    sharp = _check_mask_output(server, out, _ids(prompt, "EmergentSegMaskOutput", "pixel-sharp")[0], "emerdiff")
    assert 1 <= len(coarse["segments"]) <= 4 and 1 <= len(sharp["segments"]) <= 4
    _check_image_outputs(server, out, _ids(prompt, "MaskPreview")[0])
    low_info = " ".join(out[_ids(prompt, "PreviewAny", "Low-Res")[0]]["text"])
    map_info = " ".join(out[_ids(prompt, "PreviewAny", "Mapper")[0]]["text"])
    assert "Low-Res KMeans: K = 4" in low_info, low_info
    assert "Modulated Denoise Mapper (fast" in map_info, map_info


def test_diffseg_refined_by_mapper(server, live_types):
    prompt, out = _run(server, live_types, "diffseg_refined_by_mapper")
    before = _check_mask_output(server, out, _ids(prompt, "EmergentSegMaskOutput", "DiffSeg")[0], "diffseg")
    after = _check_mask_output(server, out, _ids(prompt, "EmergentSegMaskOutput", "refined")[0])
    assert after["method"].startswith("diffseg") and after["method"].endswith("+mapper"), after["method"]
    assert 1 <= len(after["segments"]) <= len(before["segments"])
    _check_image_outputs(server, out, _ids(prompt, "MaskPreview")[0])
    info = " ".join(out[_ids(prompt, "PreviewAny", "Mapper")[0]]["text"])
    assert "pooled from the labels" in info, info


def test_sd35_stand_in_loads_as_sd3():
    """What Load Checkpoint makes of the stand-in linked under DIT_CHECKPOINT: ComfyUI's SD3 model
    (MMDiT, rectified flow), SD3's text encoder with CLIP-L alone (context padded to 4096, pooled
    2048 wide) and a 16-channel VAE, so the workflow runs the DiT path of Capture Attention."""
    import comfy.ldm.modules.diffusionmodules.mmdit
    import comfy.model_base
    import comfy.sd
    import nodes as comfy_nodes  # ComfyUI's nodes.py
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(cs.build_random_sd35(), output_vae=True,
                                                                output_clip=True)
    assert isinstance(model.model, comfy.model_base.SD3)
    assert isinstance(model.model.diffusion_model, comfy.ldm.modules.diffusionmodules.mmdit.MMDiT)
    assert len(model.model.diffusion_model.joint_blocks) == 4
    te = clip.cond_stage_model
    assert te.clip_l is not None and te.clip_g is None and te.t5xxl is None
    [[context, extra]] = comfy_nodes.CLIPTextEncode().encode(clip, "a photo")[0]
    assert tuple(context.shape) == (1, 77, 4096) and tuple(extra["pooled_output"].shape) == (1, 2048)
    assert vae.latent_channels == 16


def test_dit_inpaint_segment(server, live_types):
    """The SD3.5 workflow: Capture Attention on the MMDiT's joint attention, then the same inpaint
    chain as inpaint_segment (VAE Encode for Inpainting -> KSampler -> VAE Decode -> blend)."""
    prompt, out = _run(server, live_types, "dit_inpaint_segment")
    [ckpt] = _ids(prompt, "CheckpointLoaderSimple")
    assert prompt[ckpt]["inputs"]["ckpt_name"] == make_workflows.DIT_CHECKPOINT
    [mask_out] = _ids(prompt, "EmergentSegMaskOutput")
    assert prompt[mask_out]["inputs"]["selection"] == "largest:1"
    _check_mask_output(server, out, mask_out, "diffseg")
    _check_image_outputs(server, out, _ids(prompt, "MaskPreview")[0])
    [save] = _ids(prompt, "SaveImage")
    saved = out[save]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output" and saved[0]["subfolder"] == "emergent_seg"
    _check_image_outputs(server, out, save)
