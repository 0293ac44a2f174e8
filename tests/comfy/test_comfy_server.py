"""The pack inside a real ComfyUI server, driven through its HTTP API.

Gated on COMFYUI_PATH. The test starts ``main.py --cpu`` on 127.0.0.1 (a free port) with a
temporary ``--base-directory`` whose ``custom_nodes/emergent_seg`` links to this repository and
whose ``models/checkpoints`` holds the cached random SD1.5 checkpoint, then queues
Load Checkpoint -> Load Image -> Capture Attention -> KL Merge -> Mask Output -> Preview Image.
Also checks, in a fresh interpreter, that loading the pack registers its nodes cheaply.
"""
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

NODE_IDS = ("EmergentSegCaptureAttention", "EmergentSegKLMerge", "EmergentSegMaskOutput",
            "EmergentSegLowResKMeans", "EmergentSegModulatedDenoiseMapper", "EmergentSegToSEGS")
SIZE = 256


def test_pack_loads_and_registers_without_heavy_work(tmp_path):
    """ComfyUI's own loader (nodes.load_custom_node) in a fresh interpreter: the three ids are
    registered through the V3 entry point, no model is loaded, and import is quick."""
    link = tmp_path / "emergent_seg"
    link.symlink_to(cs.REPO_ROOT, target_is_directory=True)
    script = f"""
import asyncio, json, sys, time
sys.path.insert(0, {cs.COMFYUI_PATH!r})
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.model_management as mm, nodes
before = set(sys.modules)
t0 = time.time()
ok = asyncio.run(nodes.load_custom_node({str(link)!r}))
elapsed = time.time() - t0
mod = sys.modules[{str(link)!r}]
ids = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("EmergentSeg"))
info = {{k: nodes.NODE_CLASS_MAPPINGS[k].INPUT_TYPES() for k in ids}}
tooltips = all("tooltip" in opts[1] for k in ids for group in info[k].values() if isinstance(group, dict)
               for name, opts in group.items() if isinstance(opts, tuple) and len(opts) > 1)
cats = {{nodes.NODE_CLASS_MAPPINGS[k].CATEGORY for k in ids}}
descs = all(nodes.NODE_CLASS_MAPPINGS[k].DESCRIPTION for k in ids)
print(json.dumps({{"ok": ok, "ids": ids, "elapsed": elapsed, "loaded_models": len(mm.current_loaded_models),
    "v1": hasattr(mod, "NODE_CLASS_MAPPINGS"), "v3": hasattr(mod, "comfy_entrypoint"),
    "web": nodes.EXTENSION_WEB_DIRS.get("emergent_seg", ""), "tooltips": tooltips, "categories": sorted(cats),
    "descriptions": descs, "diffusers": "diffusers" in set(sys.modules) - before}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=cs.COMFYUI_PATH)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["ids"] == sorted(NODE_IDS)
    assert res["v3"] and not res["v1"]
    assert res["web"].endswith("web")
    assert res["tooltips"] and res["descriptions"] and res["categories"] == ["segmentation/emergent"]
    assert res["loaded_models"] == 0 and not res["diffusers"]
    assert res["elapsed"] < 10, res


# ------------------------------------------------------------------------------ HTTP server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, port: int, log_path: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", base, "--database-url", "sqlite:///:memory:",
             "--use-pytorch-cross-attention", "--disable-auto-launch"],
            cwd=cs.COMFYUI_PATH, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
            return json.loads(data) if r.headers.get_content_type() == "application/json" else data

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in {timeout} s:\n{self.tail()}")

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "emergent-seg-test"})["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            try:
                hist = self.get(f"/history/{pid}")
            except (urllib.error.URLError, TimeoutError, OSError):
                # a CPU-bound server can answer a poll late; only the overall timeout counts
                time.sleep(2)
                continue
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None \
                    and (hist[pid]["status"]["completed"] or hist[pid]["status"].get("status_str") == "error"):
                return hist[pid]
            time.sleep(2)
        raise RuntimeError(f"prompt did not finish in {timeout} s:\n{self.tail()}")

    def image(self, ref: dict) -> Image.Image:
        q = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref["subfolder"], "type": ref["type"]})
        return Image.open(io.BytesIO(self.get(f"/view?{q}")))

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "emergent_seg").symlink_to(cs.REPO_ROOT, target_is_directory=True)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "sd15_random.safetensors").symlink_to(cs.build_random_sd15())
    (base / "input").mkdir()
    img = Image.new("RGB", (SIZE, SIZE), (30, 160, 40))
    img.paste((220, 30, 30), (64, 64, 192, 192))
    img.save(base / "input" / "scene.png")
    Image.new("RGB", (200, 200), (90, 90, 90)).save(base / "input" / "odd.png")
    srv = Server(str(base), _free_port(), str(base / "server.log"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def graph(image: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "EmergentSegCaptureAttention",
              "inputs": {"model": ["1", 0], "image": ["2", 0], "vae": ["1", 2], "clip": ["1", 1],
                         "prompt": "a red square on grass", "timestep": 300, "levels": "all"}},
        "4": {"class_type": "EmergentSegKLMerge",
              "inputs": {"attention": ["3", 0], "tau": 1.1, "anchors_per_side": 16, "iterations": 3,
                         "mode": "fast", "refine": False}},
        "5": {"class_type": "EmergentSegMaskOutput",
              "inputs": {"segmentation": ["4", 0], "selection": "all", "invert": False, "grow": 4,
                         "feather": 2, "image": ["2", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
        "7": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "9": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 1]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }


def test_object_info_lists_the_nodes(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert info[node_id]["category"] == "segmentation/emergent"
    assert info["EmergentSegMaskOutput"]["output_node"] is True
    mode = info["EmergentSegKLMerge"]["input"]["required"]["mode"]
    assert mode[0] == ["fast", "parity"] or mode[1].get("options") == ["fast", "parity"]   # V1 | V3 form
    assert info["EmergentSegCaptureAttention"]["output"] == ["EMERGENT_SEG_ATTENTION"]


def test_workflow_runs_through_the_http_api(server):
    hist = server.run(graph("scene.png"))
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    out = hist["outputs"]
    payload = out["5"]["emergent_seg"]
    assert len(payload) == 1 and payload[0]["width"] == SIZE and payload[0]["height"] == SIZE
    n_segments = len(payload[0]["segments"])
    assert n_segments >= 1
    assert {s["word"] for s in payload[0]["segments"]} <= {"red", "square", "grass"}
    overlay = server.image(out["5"]["images"][0])
    assert overlay.size == (SIZE, SIZE)
    union = out["8"]["images"]
    assert len(union) == 1 and server.image(union[0]).size == (SIZE, SIZE)
    per_segment = out["10"]["images"]
    assert len(per_segment) == n_segments
    assert {server.image(r).size for r in per_segment} == {(SIZE, SIZE)}


def test_bad_selection_is_refused_before_anything_runs(server):
    prompt = graph("scene.png")
    prompt["5"]["inputs"]["selection"] = "1, !"
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post("/prompt", {"prompt": prompt})
    body = json.loads(err.value.read())
    details = [e["details"] for e in body["node_errors"]["5"]["errors"]]
    assert any("'!' must be followed by a segment" in d for d in details), body


def test_any_image_size_runs_and_answers_at_its_own_size(server):
    """200x200 is not a multiple of 64: the pass runs at 192x192 and every output is 200x200."""
    hist = server.run(graph("odd.png"))
    assert hist["status"]["status_str"] == "success", hist["status"]
    out = hist["outputs"]
    assert server.image(out["6"]["images"][0]).size == (200, 200)
    assert {server.image(r).size for r in out["10"]["images"]} == {(200, 200)}


def test_a_run_time_error_reaches_the_user_as_one_sentence(server):
    prompt = graph("odd.png")
    prompt["5"]["inputs"]["selection"] = "zebra"  # a word the prompt does not have
    hist = server.run(prompt)
    assert hist["status"]["status_str"] == "error"
    errors = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "EmergentSegMaskOutput"
    msg = errors[0]["exception_message"].strip()
    assert "zebra" in msg and "\n" not in msg, msg