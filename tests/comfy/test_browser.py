"""The pack in the real ComfyUI frontend, in a headless system Chromium.

Gated on COMFYUI_PATH, and skipped when Chromium (``/usr/bin/chromium`` or
``EMERGENT_SEG_CHROMIUM``), Node.js or ``tests/browser/node_modules/playwright-core``
(``cd tests/browser && npm ci``; the browser itself is never downloaded) is missing.

A ComfyUI server as in test_workflows_real.py serves the frontend from comfyui-frontend-package;
tests/browser/e2e.mjs drives it:

- every example workflow loads, re-saves and converts to a prompt in the frontend exactly as the
  files and tests/workflow_tools.py say (widget order, links, UI -> API conversion);
- diffseg_segment is loaded with ``app.loadGraphData``, queued with ``app.queuePrompt`` and run;
  the Mask Output overlay (our DOM canvas) and legend appear; a real mouse click on a pixel deep
  inside a segment (computed from the node's ui payload) removes that segment from the
  ``selection`` widget, the next prompt carries the new selection and the server runs it.
  For CPU time the image is 256 px (Upscale Image widgets) and KL Merge's tau_quantile is 0.05
  (random weights give one segment at tau 1.1; the adaptive threshold gives several).

Screenshots go to the test's tmp folder (path printed) and /tmp/emergent_seg_browser.png.
``EMERGENT_SEG_THUMBNAILS=1`` also renders example_workflows/*.jpg from real runs.
"""
import json
import os
import shutil
import subprocess

import comfy_support as cs

cs.require_comfy()

import make_workflows  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from test_workflows_real import start_server  # noqa: E402
from workflow_tools import ui_to_api  # noqa: E402

BROWSER_DIR = os.path.join(cs.REPO_ROOT, "tests", "browser")
SCRIPT = os.path.join(BROWSER_DIR, "e2e.mjs")
CHROMIUM = os.environ.get("EMERGENT_SEG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NODE = shutil.which("node")
WORKFLOW_DIR = os.path.join(cs.REPO_ROOT, "example_workflows")
NAMES = [b.__name__ for b in make_workflows.WORKFLOWS]
COPY_TO = "/tmp/emergent_seg_browser.png"

if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set EMERGENT_SEG_CHROMIUM)",
                allow_module_level=True)
if NODE is None:
    pytest.skip("Node.js is not installed", allow_module_level=True)
if not os.path.isdir(os.path.join(BROWSER_DIR, "node_modules", "playwright-core")):
    pytest.skip("playwright-core is not installed: cd tests/browser && npm ci", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_browser"))
    try:
        yield srv
    finally:
        srv.stop()


def drive(config: dict, out_dir, timeout: float = 1500) -> dict:
    """Run e2e.mjs with ``config`` and return what it reports (its stderr is the step log)."""
    os.makedirs(out_dir, exist_ok=True)
    config = {"chromium": CHROMIUM, "outDir": str(out_dir), "timeoutMs": int(timeout * 1000) - 60000, **config}
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    proc = subprocess.run([NODE, SCRIPT, cfg_path], cwd=BROWSER_DIR, capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"e2e.mjs failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert result["ok"], f"{result.get('error')}\nsteps: {result['steps']}\nscreenshot: {result.get('screenshot')}"
    assert result.get("dialogsOpen", 0) == 0, "a dialog covers the graph"
    ours = [e for e in result["pageErrors"] if "emergent_seg" in e or "overlay_logic" in e]
    assert ours == [], ours
    assert [r for r in result["failedRequests"] if "emergent_seg" in r] == []
    return result


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def test_workflows_round_trip_through_the_frontend(server, tmp_path):
    """The frontend re-saves each file unchanged (widget values, inputs, outputs, links) and
    queues the same prompt as tests/workflow_tools.ui_to_api, which test_workflows_real runs."""
    files = [os.path.join(WORKFLOW_DIR, n + ".json") for n in NAMES]
    result = drive({"url": server.url, "mode": "roundtrip", "workflows": files}, tmp_path)
    for name in NAMES:
        wf, seen = load(name), result["workflows"][name]
        saved = {n["id"]: n for n in seen["serialized"]["nodes"]}
        for node in wf["nodes"]:
            got = saved[node["id"]]
            for key in ("type", "widgets_values", "inputs", "title", "properties", "size"):
                assert got.get(key) == node.get(key), (name, node["id"], key, got.get(key), node.get(key))
            strip = [{k: v for k, v in o.items() if k != "slot_index"} for o in got["outputs"]]
            assert strip == [{k: v for k, v in o.items() if k != "slot_index"} for o in node["outputs"]]
        assert sorted(map(tuple, seen["serialized"]["links"])) == sorted(map(tuple, wf["links"]))
        mine = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ui_to_api(wf).items()}
        theirs = {k: {"class_type": v["class_type"],
                      "inputs": {i: x for i, x in v["inputs"].items()
                                 if not (v["class_type"] == "PreviewAny" and i == "preview")}}
                  for k, v in seen["prompt"].items()}
        assert theirs == mine, name
        mask_outputs = [n["id"] for n in wf["nodes"] if n["type"] == "EmergentSegMaskOutput"]
        for nid in mask_outputs:
            assert seen["widgets"][str(nid)] == ["selection", "invert", "grow", "feather", "emergent_seg_overlay"]


def test_overlay_click_to_pick(server, tmp_path):
    workflow = os.path.join(WORKFLOW_DIR, "diffseg_segment.json")
    result = drive({"url": server.url, "workflow": workflow, "mode": "overlay",
                    "overrides": {"ImageScale": {"width": 256, "height": 256},
                                  "EmergentSegKLMerge": {"tau_quantile": 0.05}}}, tmp_path)
    print("\n".join(result["steps"]))
    shutil.copy(result["screenshot"], COPY_TO)
    print(f"screenshot: {result['screenshot']} (copied to {COPY_TO}); node: {result['nodeScreenshot']}")

    loaded = result["loaded"]
    assert loaded["widgets"] == ["selection", "invert", "grow", "feather", "emergent_seg_overlay"]
    assert loaded["selection"] == "all"
    entry = result["payload"][0]
    n = len(entry["segments"])
    assert (entry["width"], entry["height"]) == (256, 256) and n >= 2

    before, after = result["before"], result["after"]
    # The overlay image fills its letterboxed rectangle on our canvas; one legend row per segment.
    rect_px = before["rect"]["w"] * before["rect"]["h"] * (before["canvasPx"]["w"] / before["canvasCss"]["w"]) ** 2
    assert before["painted"] >= 0.95 * rect_px and before["rect"]["w"] >= 200, before
    assert [row["text"].split()[0] for row in before["legend"]] == [str(i) for i in range(n)]
    assert all(row["weight"] == "bold" for row in before["legend"])        # "all" selected

    click = result["click"]
    target = click["segment"]
    assert click["elementAtPoint"] == "canvas" and click["depth"] >= 2
    hover = [row["outline"] for row in result["hoverLegend"]]             # hover follows the mouse
    assert "solid" in hover[target] and all(o in ("", "none") for i, o in enumerate(hover) if i != target), hover
    picked = [int(t) for t in after["selection"].replace(",", " ").split()]
    assert picked == [i for i in range(n) if i != target], after["selection"]
    assert after["legend"][target]["weight"] == "normal"
    assert all(row["weight"] == "bold" for i, row in enumerate(after["legend"]) if i != target)
    assert result["promptSelection"] == after["selection"]

    events = [e["type"] for e in result["requeue"]]
    assert events[-1] == "execution_success" and "execution_error" not in events
    assert result["afterRequeue"]["selection"] == after["selection"]
    rows = lambda state: [(row["text"], row["weight"]) for row in state["legend"]]  # noqa: E731
    assert rows(result["afterRequeue"]) == rows(after)


THUMBNAILS = {   # workflow -> (groups of node titles, one panel each; widget overrides for the 256 px run)
    "diffseg_segment": ([["Mask Output", "Preview Image (each segment)"]],
                        {"EmergentSegKLMerge": {"tau_quantile": 0.05}}),
    "emerdiff_segment": ([["Mask Output (low-res)", "Mask Output (pixel-sharp)"]],
                         {"EmergentSegLowResKMeans": {"clusters": 6}}),
    "inpaint_segment": ([["Mask Output"], ["Mask Preview (inpaint area)"], ["Save Image"]],
                        {"EmergentSegKLMerge": {"tau_quantile": 0.05}, "KSampler": {"steps": 2}}),
    "diffseg_refined_by_mapper": ([["Mask Output (DiffSeg)", "Mask Output (refined)"]],
                                  {"EmergentSegKLMerge": {"tau_quantile": 0.05}}),
    "dit_inpaint_segment": ([["Mask Output"], ["Mask Preview (inpaint area)"], ["Save Image"]],
                            {"EmergentSegKLMerge": {"tau_quantile": 0.05}, "KSampler": {"steps": 2}}),
}


def save_thumbnail(pngs: list, jpg: str, width: int = 640) -> None:
    """The panels side by side at one height, ``width`` wide, as a JPEG under 95 kB."""
    panels = [Image.open(p).convert("RGB") for p in pngs]
    height = min(p.height for p in panels)
    panels = [p.resize((round(p.width * height / p.height), height), Image.LANCZOS) for p in panels]
    gap = 8
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), height), (32, 32, 32))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + gap
    sheet = sheet.resize((width, round(sheet.height * width / sheet.width)), Image.LANCZOS)
    for quality in (85, 78, 70, 60, 50):
        sheet.save(jpg, "JPEG", quality=quality, optimize=True, progressive=True)
        if os.path.getsize(jpg) < 95_000:
            return
    raise AssertionError(f"{jpg} is still {os.path.getsize(jpg)} bytes")


@pytest.mark.skipif(not os.environ.get("EMERGENT_SEG_THUMBNAILS"),
                    reason="set EMERGENT_SEG_THUMBNAILS=1 to re-render example_workflows/*.jpg")
@pytest.mark.parametrize("name", NAMES)
def test_render_thumbnail(server, tmp_path, name):
    groups, overrides = THUMBNAILS[name]
    result = drive({"url": server.url, "workflow": os.path.join(WORKFLOW_DIR, name + ".json"),
                    "mode": "thumbnail", "overrides": {"ImageScale": {"width": 256, "height": 256}, **overrides},
                    "thumbnail": {"groups": groups, "png": str(tmp_path / f"{name}.png")}}, tmp_path, timeout=2400)
    save_thumbnail(result["thumbnails"], os.path.join(WORKFLOW_DIR, name + ".jpg"))
    print(f"{name}: {os.path.getsize(os.path.join(WORKFLOW_DIR, name + '.jpg'))} bytes")
