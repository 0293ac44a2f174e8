"""Node-level tests without ComfyUI: specs, V1/V3 adapters (with a fake comfy_api), node logic on
a tiny diffusers backend and synthetic captures, and plain ``import emergent_seg``."""
import json
import os
import subprocess
import sys
import types
from unittest import mock

import pytest
import torch

from emergent_seg.core.backend import Conditioning
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.capture import AttentionCapture, CrossAttentionLevel, LevelInfo
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.segmentation import Segmentation
from emergent_seg.nodes import NODES, v1_mappings, v3_node
from emergent_seg.nodes import capture as capture_node
from emergent_seg.nodes import kl_merge as kl_node
from emergent_seg.nodes import mask_output as mask_node
from emergent_seg.nodes import types as T
from synthetic import planted_aggregate, rect_regions
from tiny_models import tiny_sd15_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ package import


def test_plain_import_exposes_nothing_comfy():
    """``pip install emergent-seg; import emergent_seg`` outside ComfyUI: no node registration,
    no node modules imported."""
    parent = os.path.dirname(ROOT)
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('emergent_seg', {os.path.join(ROOT, '__init__.py')!r},"
        f" submodule_search_locations=[{ROOT!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['emergent_seg'] = m; spec.loader.exec_module(m)\n"
        "print(json.dumps({'web': m.WEB_DIRECTORY, 'v1': hasattr(m, 'NODE_CLASS_MAPPINGS'),"
        " 'v3': hasattr(m, 'comfy_entrypoint'), 'nodes': 'emergent_seg.nodes' in sys.modules,"
        " 'comfy': any(k.split('.')[0] in ('comfy', 'comfy_api') for k in sys.modules)}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=parent,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"web": "./web", "v1": False, "v3": False, "nodes": False, "comfy": False}


# ------------------------------------------------------------------------------------- specs


def test_specs_follow_the_contract():
    ids = [spec.node_id for spec, _ in NODES]
    assert ids == ["EmergentSegCaptureAttention", "EmergentSegKLMerge", "EmergentSegMaskOutput",
                   "EmergentSegLowResKMeans", "EmergentSegModulatedDenoiseMapper", "EmergentSegToSEGS"]
    contracts = open(os.path.join(ROOT, "docs", "CONTRACTS.md")).read()
    for spec, run in NODES:
        assert f"| {spec.node_id} | {spec.display_name} |" in contracts
        assert spec.category == "segmentation/emergent" and len(spec.description) > 40
        for i in spec.inputs:
            assert i.tooltip and len(i.tooltip) > 15, (spec.node_id, i.id)
            if i.type in (T.INT, T.FLOAT):
                assert i.min <= i.default <= i.max, (spec.node_id, i.id)
        params = run.__code__.co_varnames[:run.__code__.co_argcount]
        assert [i.id for i in spec.inputs] == [p for p in params if p not in ("save_preview", "backend_factory")]
    assert capture_node.SPEC.outputs[0].type == "EMERGENT_SEG_ATTENTION"
    assert kl_node.SPEC.outputs[0].type == "EMERGENT_SEG_SEGMENTATION"
    assert [o.type for o in mask_node.SPEC.outputs] == ["MASK", "MASK", "IMAGE"]
    assert mask_node.SPEC.output_node and not kl_node.SPEC.output_node
    timestep = next(i for i in capture_node.SPEC.inputs if i.id == "timestep")
    assert (timestep.default, timestep.min, timestep.max) == (300, 0, 999)
    grow = next(i for i in mask_node.SPEC.inputs if i.id == "grow")
    assert (grow.min, grow.max) == (-256, 256)


def test_v1_adapter():
    classes, names = v1_mappings()
    assert names["EmergentSegKLMerge"] == "KL Merge"
    kl = classes["EmergentSegKLMerge"]
    types_ = kl.INPUT_TYPES()
    assert types_["required"]["mode"] == (["fast", "parity"], {"tooltip": mock.ANY, "default": "fast"})
    assert types_["required"]["tau"][1]["default"] == 1.1
    assert kl.RETURN_TYPES == ("EMERGENT_SEG_SEGMENTATION",) and kl.FUNCTION == "execute"
    cap = classes["EmergentSegCaptureAttention"].INPUT_TYPES()
    assert set(cap["required"]) == {"model", "timestep", "levels"}
    assert cap["optional"]["prompt"] == ("STRING", {"tooltip": mock.ANY, "default": "", "multiline": True})
    assert cap["optional"]["clip"] == ("CLIP", {"tooltip": mock.ANY})
    out_cls = classes["EmergentSegMaskOutput"]
    assert out_cls.OUTPUT_NODE is True
    fake_nodes = types.SimpleNamespace(PreviewImage=lambda: types.SimpleNamespace(
        save_images=lambda images: {"ui": {"images": [{"filename": "x.png", "n": len(images)}]}}))
    with mock.patch.dict(sys.modules, {"nodes": fake_nodes}):
        res = out_cls().execute(segmentation=_two_segment_seg(), selection="1")
    assert res["ui"]["images"] == [{"filename": "x.png", "n": 1}]
    assert len(res["result"]) == 3 and res["ui"]["emergent_seg"][0]["width"] == 16


class _FakeType:
    def __init__(self, name):
        self.name = name

    def Input(self, id, **kw):  # noqa: N802 - mirrors comfy_api
        return ("in", self.name, id, kw)

    def Output(self, id=None, **kw):  # noqa: N802
        return ("out", self.name, id, kw)


def _fake_comfy_api():
    io = types.SimpleNamespace(ComfyNode=type("ComfyNode", (), {}),
                               Schema=lambda **kw: kw,
                               NodeOutput=lambda *a, ui=None: {"result": a, "ui": ui},
                               Custom=_FakeType)
    for name in ("Int", "Float", "String", "Boolean", "Combo", "Model", "Clip", "Vae", "Conditioning",
                 "Image", "Latent", "Mask"):
        setattr(io, name, _FakeType(name.upper()))
    ui = types.SimpleNamespace(PreviewImage=lambda images, cls=None: types.SimpleNamespace(
        as_dict=lambda: {"images": [{"filename": "p.png", "node": cls.__name__}]}))
    latest = types.SimpleNamespace(io=io, ui=ui)
    return {"comfy_api": types.SimpleNamespace(latest=latest), "comfy_api.latest": latest}


def test_v3_adapter_with_a_fake_comfy_api():
    with mock.patch.dict(sys.modules, _fake_comfy_api()):
        node = v3_node(mask_node.SPEC, mask_node.run)
        schema = node.define_schema()
        out = node.execute(segmentation=_two_segment_seg(), selection="all")
    assert node.__name__ == "EmergentSegMaskOutput"
    assert schema["node_id"] == "EmergentSegMaskOutput" and schema["is_output_node"] is True
    kinds = {i[2]: (i[1], i[3]) for i in schema["inputs"]}
    assert kinds["segmentation"][0] == "EMERGENT_SEG_SEGMENTATION"
    assert kinds["grow"] == ("INT", {"tooltip": mock.ANY, "optional": False, "display_name": None,
                                     "default": 0, "min": -256, "max": 256, "step": 1})
    assert kinds["image"][1]["optional"] is True
    assert [o[1] for o in schema["outputs"]] == ["MASK", "MASK", "IMAGE"]
    assert out["ui"]["images"] == [{"filename": "p.png", "node": "EmergentSegMaskOutput"}]
    with mock.patch.dict(sys.modules, _fake_comfy_api()):
        combo = {i[2]: i for i in v3_node(kl_node.SPEC, kl_node.run).define_schema()["inputs"]}["mode"]
    assert combo[1] == "COMBO" and combo[3]["options"] == ["fast", "parity"]


# --------------------------------------------------------------------------- Capture Attention


class _FakeHostBackend(DiffusersBackend):
    """The diffusers backend dressed up as ComfyBackend (VAE stand-in: 8x average pooling)."""

    def __init__(self, model, vae=None, clip=None, progress=None):
        super().__init__(model)
        self.latent_scale = 8
        self.clip = clip
        g = torch.Generator().manual_seed(1)
        self._ctx = torch.randn(1, 77, 16, generator=g)

    def encode(self, images):
        pooled = torch.nn.functional.avg_pool2d(images * 2 - 1, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def latent_in(self, samples):
        return samples * 0.5

    def empty_conditioning(self):
        if self.clip is None:
            raise EmergentSegError("connect the checkpoint's CLIP")
        return Conditioning(self._ctx)

    def encode_prompt(self, prompt):
        words = prompt.lower().split()
        tokens = ["<|startoftext|>"] + [w + "</w>" for w in words] + ["<|endoftext|>"] * (76 - len(words))
        return Conditioning(self._ctx, tokens=tuple(tokens), prompt=prompt)

    def from_conditioning(self, conditioning):
        return Conditioning(conditioning[0][0])


def _capture(**kw):
    unet = tiny_sd15_unet()
    return capture_node.run(unet, backend_factory=_FakeHostBackend, **kw).outputs[0]


def test_capture_from_image_with_prompt_words():
    cap = _capture(image=torch.rand(2, 64, 64, 3), clip=object(), prompt="a cat on a mat")
    assert isinstance(cap, AttentionCapture)
    assert cap.self_attention.shape == (2, 64, 64) and cap.image_size == (64, 64)
    assert cap.tokens[1:6] == ("a</w>", "cat</w>", "on</w>", "a</w>", "mat</w>")
    assert [c.grid for c in cap.cross] == [(8, 8), (4, 4), (2, 2), (1, 1)]


def test_capture_without_prompt_or_with_conditioning_has_no_words():
    ctx = [[torch.randn(1, 77, 16), {}]]
    assert _capture(latent={"samples": torch.randn(1, 4, 8, 8)}, conditioning=ctx).cross == ()
    cap = _capture(latent={"samples": torch.randn(1, 4, 8, 8)}, clip=object(), prompt="  ", levels="8, 4")
    assert cap.cross == () and cap.tokens is None
    assert [lvl.grid for lvl in cap.levels] == [(8, 8), (4, 4)]


@pytest.mark.parametrize("kw, match", [
    (dict(latent={"samples": torch.zeros(1, 4, 8, 8)}), "CLIP"),
    (dict(clip=object()), "image"),
    (dict(latent={"samples": torch.zeros(1, 4, 12, 8)}, clip=object()), "64x128"),
    (dict(image=[torch.rand(1, 64, 64, 3), torch.rand(1, 128, 64, 3)], clip=object()), "different sizes"),
    (dict(image=torch.rand(1, 64, 64, 3), latent={"samples": torch.zeros(1, 4, 16, 16)}, clip=object()),
     "only one"),
    (dict(latent={"samples": torch.zeros(1, 4, 8, 8)}, clip=object(), levels="48"), "8x8, 4x4, 2x2, 1x1"),
    (dict(latent={"samples": torch.zeros(1, 4, 2, 8, 8)}, clip=object()), "image LATENT"),
])
def test_capture_bad_inputs_in_one_sentence(kw, match):
    with pytest.raises(EmergentSegError, match=match) as err:
        _capture(**kw)
    assert "\n" not in str(err.value)


def test_any_image_size_runs_at_the_nearest_fit_and_answers_at_its_own_size():
    from emergent_seg.nodes import kl_merge as kl_node

    cap = _capture(image=torch.rand(1, 100, 72, 3), clip=object())
    assert cap.image_size == (100, 72)  # the image's own size ...
    assert cap.grid == (16, 8)          # ... run at 128x64 (sides rounded to multiples of 64)
    seg = kl_node.run(cap, tau=0.5).outputs[0]
    assert seg.labels.shape == (1, 100, 72)


def test_stack_images():
    assert capture_node.stack_images(torch.rand(64, 64, 3)).shape == (1, 64, 64, 3)
    both = capture_node.stack_images([torch.rand(1, 64, 64, 3), torch.rand(2, 64, 64, 3)])
    assert both.shape == (3, 64, 64, 3)


# -------------------------------------------------------------------------------- KL Merge


def _synthetic_capture(batch=2, cross=True):
    regions = [rect_regions(8, 8, [(0, 0, 8, 4)]), rect_regions(8, 8, [(0, 0, 4, 8), (4, 4, 8, 8)])]
    agg = torch.stack([planted_aggregate(regions[b % 2], seed=b) for b in range(batch)]).float()
    levels = (LevelInfo(1, (8, 8), 1, 1.0),)
    tokens = ("<|startoftext|>", "a</w>", "cat</w>", "and</w>", "sky</w>") + ("<|endoftext|>",) * 72
    maps = torch.full((batch, 64, 77), 0.01)
    for b in range(batch):
        lab = regions[b % 2].reshape(-1)
        maps[b, :, 2] += (lab != 0).float()              # "cat" on the boxes
        maps[b, :, 4] += (lab == 0).float()              # "sky" on the background
    cross_levels = (CrossAttentionLevel((8, 8), 1, maps / maps.sum(-1, keepdim=True)),) if cross else ()
    return AttentionCapture(agg, (8, 8), (32, 32), levels, cross_levels,
                            tokens if cross else None, "a cat and sky" if cross else None, 300)


def test_kl_merge_node_gives_per_image_counts_and_words():
    seg = kl_node.run(_synthetic_capture(), tau=1.1, anchors_per_side=8).outputs[0]
    assert isinstance(seg, Segmentation) and seg.labels.shape == (2, 32, 32)
    assert seg.counts == (2, 3)
    assert seg.words[0][int(seg.labels[0, 0, 0])] == "cat" and seg.words[0][int(seg.labels[0, 0, 31])] == "sky"
    assert seg.info["words"] == ["cat", "sky"] and seg.method == "diffseg"
    plain = kl_node.run(_synthetic_capture(cross=False), anchors_per_side=8).outputs[0]
    assert plain.words == () and plain.counts == (2, 3)


def test_kl_merge_node_refuses_other_inputs():
    with pytest.raises(EmergentSegError, match="Capture Attention"):
        kl_node.run(torch.zeros(1, 64, 64))


# ------------------------------------------------------------------------------ Mask Output


def _two_segment_seg(batch=1):
    labels = torch.zeros(batch, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    return Segmentation(labels, (2,) * batch, words=(("cat", "sky"),) * batch, method="diffseg")


def test_mask_output_shapes_and_ui():
    seen = []
    res = mask_node.run(_two_segment_seg(2), "sky", grow=0, image=torch.rand(1, 16, 16, 3),
                        save_preview=lambda im: seen.append(im.shape) or ["ref"])
    union, per_segment, overlay = res.outputs
    assert union.shape == (2, 16, 16) and union[:, :, 8:].eq(1).all() and union[:, :, :8].eq(0).all()
    assert per_segment.shape == (4, 16, 16) and overlay.shape == (2, 16, 16, 3)
    assert seen == [torch.Size([2, 16, 16, 3])] and res.ui["images"] == ["ref"]
    assert [p["segments"][1]["word"] for p in res.ui["emergent_seg"]] == ["sky", "sky"]
    inv = mask_node.run(_two_segment_seg(), "0", invert=True).outputs[0]
    assert inv[:, :, 8:].eq(1).all() and inv[:, :, :8].eq(0).all()
    assert "images" not in mask_node.run(_two_segment_seg(), "all").ui       # no host: no preview


@pytest.mark.parametrize("selection, match", [("", "empty"), ("5", "5"), ("dog", "dog")])
def test_mask_output_bad_selection_in_one_sentence(selection, match):
    with pytest.raises(EmergentSegError, match=match) as err:
        mask_node.run(_two_segment_seg(), selection)
    assert "\n" not in str(err.value)


def test_mask_output_image_batch_must_match():
    with pytest.raises(EmergentSegError, match="3 images"):
        mask_node.run(_two_segment_seg(2), "all", image=torch.rand(3, 16, 16, 3))
