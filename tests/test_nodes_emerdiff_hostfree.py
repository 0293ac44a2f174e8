"""Low-Res KMeans and Modulated Denoise Mapper without ComfyUI: specs, V1/V3 adapters (fake
comfy_api), node logic on tiny diffusers UNets dressed up as the host backend, quality presets,
word carry-over, progress/cancel and bad-input sentences."""
import os
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from emergent_seg.core import emerdiff as E
from emergent_seg.core.backend import Conditioning, Progress
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.errors import EmergentSegError, Interrupted, UnsupportedModelError
from emergent_seg.core.segmentation import Segmentation
from emergent_seg.nodes import NODES, v1_mappings, v3_node
from emergent_seg.nodes import lowres_kmeans as lk_node
from emergent_seg.nodes import mapper as map_node
from emergent_seg.nodes import mask_output as mask_node
from emergent_seg.nodes import types as T
from test_nodes_hostfree import _fake_comfy_api
from tiny_models import random_conditioning, tiny_sd15_unet, tiny_sdxl_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128          # image px; latent 16x16 with the 8x stand-in VAE


pytestmark = pytest.mark.usefixtures("one_thread")


class HostBackend(DiffusersBackend):
    """A tiny diffusers UNet dressed up as ComfyBackend: 8x average-pool "VAE" (4 latent channels),
    nearest 8x upsampling decode, conditioning only through CLIP or CONDITIONING."""

    instances: list = []

    def __init__(self, model, vae=None, clip=None, progress=None):
        super().__init__(model)
        self.latent_scale = 8
        self.vae_in, self.clip, self.progress = vae, clip, progress
        self._cond = random_conditioning(model)
        HostBackend.instances.append(self)

    def encode(self, images):
        pooled = F.avg_pool2d(images * 2 - 1, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def decode(self, latents):
        x = ((latents[:, :3].float() + 1) / 2).clamp(0, 1)
        return F.interpolate(x, scale_factor=8, mode="nearest")

    def latent_in(self, samples):
        return samples * 0.5

    def empty_conditioning(self):
        if self.clip is None:
            raise AssertionError("the node must check for CLIP itself")
        return self._cond

    def encode_prompt(self, prompt):
        return Conditioning(self._cond.context, self._cond.extra, None, prompt)

    def from_conditioning(self, conditioning):
        return Conditioning(conditioning[0][0], self._cond.extra)


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15_unet()


@pytest.fixture(scope="module")
def image():
    img = torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 0.2
    img[0, :, SIZE // 2:] += 0.7
    img[1, SIZE // 2:] += 0.7
    return img


def kmeans(model, **kw):
    kw.setdefault("clip", object())
    # The tiny models run at 128 px, where the auto grid (1/32 of the side) is 4x4; these tests
    # were written around the 16x16 grid that SD1.x has at 512 px, so they ask for it.
    kw.setdefault("grid", 16)
    return lk_node.run(model, backend_factory=HostBackend, **kw).outputs


def mapper(model, segmentation, **kw):
    kw.setdefault("clip", object())
    return map_node.run(model, object(), segmentation=segmentation, backend_factory=HostBackend,
                        **kw).outputs


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and 0 < len(msg) < 400


# ------------------------------------------------------------------------------------- specs


def test_specs_ids_tooltips_and_defaults():
    ids = [spec.node_id for spec, _ in NODES]
    assert ids[3:5] == ["EmergentSegLowResKMeans", "EmergentSegModulatedDenoiseMapper"]
    contracts = open(os.path.join(ROOT, "docs", "CONTRACTS.md")).read()
    for spec, run in ((lk_node.SPEC, lk_node.run), (map_node.SPEC, map_node.run)):
        assert f"| {spec.node_id} | {spec.display_name} |" in contracts
        assert spec.category == "segmentation/emergent" and len(spec.description) > 100
        for i in spec.inputs:
            assert i.tooltip and len(i.tooltip) > 15, (spec.node_id, i.id)
            if i.type in (T.INT, T.FLOAT):
                assert i.min <= i.default <= i.max, (spec.node_id, i.id)
            if i.type == T.COMBO:
                assert i.default in i.options
            # the frontend randomizes INT widgets named seed/noise_seed after every run
            assert i.id not in ("seed", "noise_seed")
        params = run.__code__.co_varnames[:run.__code__.co_argcount]
        assert [i.id for i in spec.inputs] == [p for p in params if p != "backend_factory"]
        assert [o.type for o in spec.outputs] == ["EMERGENT_SEG_SEGMENTATION", "STRING"]
        # V3 needs output ids distinct from input ids
        assert not {o.name for o in spec.outputs} & {i.id for i in spec.inputs}
    lk = {i.id: i for i in lk_node.SPEC.inputs}
    assert [i.id for i in lk_node.SPEC.inputs] == ["model", "image", "vae", "latent", "clip", "prompt",
                                                   "conditioning", "clusters", "timestep", "rng_seed",
                                                   "grid", "layer"]
    assert (lk["clusters"].default, lk["clusters"].min) == (20, 2)
    # grid 0 = auto: the decoder grid at 1/32 of the image side (16x16 for SD1.x at 512 px)
    assert (lk["timestep"].default, lk["grid"].default, lk["layer"].default) == (1, 0, 0)
    assert lk["rng_seed"].display_name == "seed" and lk["prompt"].default == ""
    mp = {i.id: i for i in map_node.SPEC.inputs}
    assert [i.id for i in map_node.SPEC.inputs] == ["model", "vae", "image", "latent", "segmentation",
                                                    "clip", "prompt", "conditioning", "quality", "lam",
                                                    "t_m", "sigma", "inject", "max_batch", "rng_seed"]
    assert [i.id for i in map_node.SPEC.inputs if not i.optional] == ["model", "vae", "segmentation",
                                                                      "quality", "lam", "t_m", "sigma",
                                                                      "inject", "max_batch", "rng_seed"]
    assert mp["quality"].options == ("fast", "faithful", "fast-symmetric") and mp["quality"].default == "fast"
    assert mp["inject"].options == ("all", "self", "cross", "none") and mp["inject"].default == "all"
    assert (mp["lam"].default, mp["lam"].display_name) == (10.0, "lambda")
    assert (mp["t_m"].default, mp["sigma"].default, mp["max_batch"].default) == (281, 4.0, 21)


def test_v1_and_v3_adapters():
    classes, names = v1_mappings()
    assert names["EmergentSegLowResKMeans"] == "Low-Res KMeans"
    assert names["EmergentSegModulatedDenoiseMapper"] == "Modulated Denoise Mapper"
    m = classes["EmergentSegModulatedDenoiseMapper"]
    assert m.RETURN_TYPES == ("EMERGENT_SEG_SEGMENTATION", "STRING") and m.RETURN_NAMES == ("refined", "info")
    assert classes["EmergentSegLowResKMeans"].RETURN_NAMES == ("segmentation", "info")
    types_ = m.INPUT_TYPES()
    assert types_["required"]["quality"] == (["fast", "faithful", "fast-symmetric"],
                                             {"tooltip": mock.ANY, "default": "fast"})
    assert types_["required"]["segmentation"] == ("EMERGENT_SEG_SEGMENTATION", {"tooltip": mock.ANY})
    assert set(types_["optional"]) == {"image", "latent", "clip", "prompt", "conditioning"}
    with mock.patch.dict(sys.modules, _fake_comfy_api()):
        schema = v3_node(lk_node.SPEC, lk_node.run).define_schema()
    inputs = {i[2]: i for i in schema["inputs"]}
    assert inputs["rng_seed"][3]["display_name"] == "seed"
    assert [o[1] for o in schema["outputs"]] == ["EMERGENT_SEG_SEGMENTATION", "STRING"]


def test_quality_presets_live_in_core():
    assert E.preset("fast") == {"steps": 1, "difference": "one_sided"}
    assert E.preset("faithful") == {"steps": 15, "difference": "symmetric"}
    assert E.preset("fast-symmetric") == {"steps": 1, "difference": "symmetric"}
    p = E.preset("fast")
    p["steps"] = 99
    assert E.QUALITY_PRESETS["fast"]["steps"] == 1                  # a copy
    with pytest.raises(EmergentSegError, match="fast, faithful, fast-symmetric"):
        E.preset("slow")
    # K = 20 with the default max_batch: fast = K + 1 UNet evaluations, >= 20x fewer than faithful
    fast, faithful = E.plan(20, **E.preset("fast")), E.plan(20, **E.preset("faithful"))
    assert fast["evaluations"] == 21 and faithful["evaluations"] == 15 * 42
    assert faithful["evaluations"] / fast["evaluations"] >= 20


# ---------------------------------------------------------------------------- Low-Res KMeans


def test_lowres_kmeans_node(sd15, image):
    seg, info = kmeans(sd15, image=image, clusters=3, rng_seed=5)
    assert isinstance(seg, Segmentation) and seg.labels.shape == (2, SIZE, SIZE)
    assert seg.lowres.shape == (2, 16, 16) and all(1 <= c <= 3 for c in seg.counts)
    # 128 px -> 16x16 latent: the decoder cross-attention grids are 16/8/4
    assert seg.info["grid"] == [16, 16] and seg.info["site"].startswith("up_blocks.3.attentions.0.")
    site = seg.info["site"]
    assert site in info and f"{seg.info['grid'][0]}x{seg.info['grid'][1]} grid" in info
    assert seg.info["summary"] == info and seg.info["layer"] == 0 and seg.method == "emerdiff-kmeans"
    assert seg.lowres_layer == 0      # the typed field the mapper reads
    assert torch.equal(seg.labels, E.upsample_labels(seg.lowres, (SIZE, SIZE)))
    again, _ = kmeans(sd15, image=image, clusters=3, rng_seed=5)
    assert torch.equal(again.labels, seg.labels)
    # a LATENT instead of image + VAE; the CONDITIONING instead of CLIP
    ctx = [[torch.randn(1, 77, 16), {}]]
    lat, _ = kmeans(sd15, latent={"samples": torch.randn(1, 4, 16, 16)}, conditioning=ctx, clip=None,
                    clusters=2)
    assert lat.labels.shape == (1, SIZE, SIZE)
    # Mask Output works unchanged
    union, per_segment, overlay = mask_node.run(seg, "all", image=image).outputs
    assert union.shape == (2, SIZE, SIZE) and per_segment.shape[0] == sum(seg.counts)


def test_lowres_kmeans_grid_choice_is_reported(sd15, image):
    seg, info = kmeans(sd15, image=image, clusters=2, grid=16)
    assert seg.info["grid"] == [16, 16] and "nearest" not in info
    seg8, info8 = kmeans(sd15, image=image, clusters=2, grid=6)
    assert seg8.lowres.shape[-2:] == (8, 8) and "8x8 grid, nearest to the requested 6x6" in info8
    assert seg8.info["site"] != seg.info["site"]
    layer1, info1 = kmeans(sd15, image=image, clusters=2, layer=1)
    assert "attentions.1" in layer1.info["site"] and layer1.info["layer"] == 1 and layer1.lowres_layer == 1


def test_auto_grid_is_one_32nd_of_the_image_and_any_size_works(sd15):
    seg, info = kmeans(sd15, image=torch.rand(1, 256, 256, 3), clusters=2, grid=0)
    assert seg.info["grid"] == [8, 8] and "auto: 1/32 of the image side" in info
    odd, _ = kmeans(sd15, image=torch.rand(1, 100, 130, 3), clusters=2)  # run at 128x128
    assert odd.labels.shape == (1, 100, 130) and odd.lowres.shape == (1, 16, 16)
    out, _ = mapper(sd15, odd, image=torch.rand(1, 100, 130, 3))
    assert out.labels.shape == (1, 100, 130)


def test_sdxl_layout_reports_the_grid_it_used(image):
    unet = tiny_sdxl_unet()
    seg, info = kmeans(unet, image=image[:1], clusters=2)
    # SDXL layout: no attention at the top level, so 16x16 does not exist at 128 px; 8x8 is used
    assert seg.info["grid"] == [8, 8] and seg.lowres.shape == (1, 8, 8)
    assert "8x8 grid, nearest to the requested 16x16" in info and seg.info["site"].startswith("up_blocks.1.")
    out, minfo = mapper(unet, seg, image=image[:1])
    assert out.info["grid"] == [8, 8] and "8x8 grid, nearest to the requested" not in minfo
    assert seg.info["site"] == out.info["site"] and out.labels.shape == (1, SIZE, SIZE)


# ---------------------------------------------------------------------------------- mapper


@pytest.mark.parametrize("quality, steps, difference, evals, decodes", [
    ("fast", 1, "one_sided", 3 + 1, 3 + 1),
    ("fast-symmetric", 1, "symmetric", 2 * 3 + 2, 2 * 3),
    ("faithful", 15, "symmetric", 15 * (2 * 3 + 2), 2 * 3),
])
def test_mapper_presets(sd15, image, quality, steps, difference, evals, decodes):
    seg, _ = kmeans(sd15, image=image[:1], clusters=3)
    k = seg.counts[0]
    assert k == 3
    out, info = mapper(sd15, seg, image=image[:1], quality=quality, max_batch=4)
    assert out.info["steps"] == steps and out.info["difference"] == difference
    assert out.info["evaluations"] == evals and out.info["vae_decodes"] == decodes
    assert out.info["quality"] == quality and quality in info and f"{evals} UNet evaluations" in info
    assert out.labels.shape == (1, SIZE, SIZE) and 1 <= out.counts[0] <= 3
    assert out.method == "emerdiff" and out.info["lowres_from"] == "low-res grid"
    assert out.info["site"] == seg.info["site"]


def test_mapper_on_a_batch_is_pixel_sharp(sd15, image):
    seg, _ = kmeans(sd15, image=image, clusters=3)
    out, info = mapper(sd15, seg, image=image, sigma=1.0)
    assert out.labels.shape == (2, SIZE, SIZE) and len(out.counts) == 2
    assert out.info["segments"] == list(seg.counts) and out.info["evaluations"] == sum(c + 1 for c in seg.counts)
    # finer than the grid: some 8x8-pixel cell of the 16x16 grid holds two labels
    cells = out.labels.view(2, 16, 8, 16, 8).permute(0, 1, 3, 2, 4).reshape(2, 256, 64)
    assert bool((cells.max(-1).values != cells.min(-1).values).any())
    assert out.info["summary"] == info
    # a LATENT works too (the VAE still decodes)
    lat, _ = mapper(sd15, seg, latent={"samples": torch.randn(2, 4, 16, 16)})
    assert lat.labels.shape == (2, SIZE, SIZE)


def test_mapper_pools_a_full_res_segmentation_and_carries_words(sd15, image):
    labels = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
    labels[0, :, SIZE // 2:] = 1
    labels[0, :3, :3] = 2                                   # smaller than a cell: dropped by pooling
    diffseg = Segmentation(labels, (3,), words=(("grass", "sky", "bird"),), method="diffseg",
                           info={"words": ["grass", "sky", "bird"]})
    out, info = mapper(sd15, diffseg, image=image[1:])
    assert out.method == "diffseg+mapper" and out.info["lowres_from"] == "pooled labels"
    assert "pooled" in info and out.info["segments"] == [2]
    assert out.counts[0] in (1, 2) and set(out.words[0]) <= {"grass", "sky"}
    if out.counts[0] == 2:
        assert out.words[0] == ("grass", "sky")
    assert out.info["words"] == ["grass", "sky", "bird"]
    # a one-image segmentation applies to every image of the batch
    both, _ = mapper(sd15, diffseg, image=image)
    assert both.labels.shape == (2, SIZE, SIZE) and len(both.words) == 2
    # a grid that matches no block (e.g. another producer's 5x5) is pooled from the labels too
    odd = Segmentation.from_labels(labels, method="other", lowres=torch.zeros(1, 5, 5, dtype=torch.long))
    res, _ = mapper(sd15, odd, image=image[:1])
    assert res.info["lowres_from"] == "pooled labels" and res.method == "other+mapper"


def test_carry_words_when_segments_vanish():
    source = Segmentation(torch.zeros(1, 8, 8, dtype=torch.long), (3,), words=(("sky", "cat", "dog"),))
    grid = torch.tensor([[[0, 1], [2, 2]]])                  # cells: sky | cat / dog dog
    raw = torch.zeros(1, 8, 8, dtype=torch.long)
    raw[0, :4, 4:] = 2                                       # "cat" lost its pixels to "dog"
    raw[0, 4:] = 2
    out = map_node.carry_words(source, grid, Segmentation.from_labels(raw))
    assert out.counts == (2,) and out.words == (("sky", "dog"),)
    raw2 = torch.zeros(1, 8, 8, dtype=torch.long)            # the last id lost: ambiguous by order
    raw2[0, :4, 4:] = 1
    out2 = map_node.carry_words(source, grid, Segmentation.from_labels(raw2))
    assert out2.words == (("sky", "cat"),)
    full = raw2.clone()
    full[0, 4:] = 2
    assert map_node.carry_words(source, grid, Segmentation.from_labels(full)).words == (("sky", "cat", "dog"),)
    plain = Segmentation.from_labels(raw)
    assert map_node.carry_words(Segmentation.from_labels(raw), grid, plain) is plain   # no words


# ------------------------------------------------------------------------ progress and cancel


def test_mapper_progress_and_cancel_leave_the_unet_unchanged(sd15, image):
    seg, _ = kmeans(sd15, image=image[:1], clusters=2)
    updates = []
    with mock.patch.object(map_node, "host_progress",
                           lambda total=0: Progress(total, on_update=lambda d, t: updates.append((d, t)))):
        mapper(sd15, seg, image=image[:1], quality="fast-symmetric", max_batch=3)
    # 2 chunks [ref, +M0, +M1] [ref, -M0, -M1] at 1 step + 2 decode chunks
    assert updates[-1] == (4, 4)
    processors = {k: m.processor for k, m in HostBackend.instances[-1]._modules.items()}
    assert not any(type(p).__name__ == "_SiteProcessor" for p in processors.values())
    polls = []

    def cancelled():
        polls.append(1)
        return len(polls) >= 4
    with mock.patch.object(map_node, "host_progress", lambda total=0: Progress(total, is_cancelled=cancelled)):
        with pytest.raises(Interrupted):
            mapper(sd15, seg, image=image[:1], quality="faithful", max_batch=3)
    backend = HostBackend.instances[-1]
    assert len(polls) == 4
    assert all(m.processor is processors[k] for k, m in backend._modules.items())


# ------------------------------------------------------------------------------ bad inputs


def _no_decoder_cross_attention():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
        cross_attention_dim=16, attention_head_dim=4).eval()


def test_bad_inputs_in_one_sentence(sd15, image):
    seg, _ = kmeans(sd15, image=image, clusters=2)
    cases = [
        (lambda: kmeans(sd15, image=image, clusters=300), "300 but the 16x16 grid"),
        (lambda: kmeans(sd15, image=image, clusters=65, grid=8), "only 64 cells"),
        (lambda: kmeans(sd15, image=image, clip=None), "CLIP"),
        (lambda: kmeans(sd15), "connect an image"),
        (lambda: kmeans(sd15, latent={"samples": torch.zeros(1, 4, 12, 16)}), "multiple of 64"),
        (lambda: kmeans(sd15, image=image, layer=5), "layer 5 does not exist"),
        (lambda: kmeans(_no_decoder_cross_attention(), image=image, clusters=2),
         "no cross-attention layers in its decoder"),
        (lambda: mapper(sd15, seg, image=image, lam=0.0), "lambda must be non-zero"),
        (lambda: mapper(sd15, seg, image=image[:, :64]), "segmentation is 128x128 but the image is 128x64"),
        (lambda: mapper(sd15, seg, image=torch.cat([image, image[:1]])), "2 images but 3"),
        (lambda: mapper(sd15, torch.zeros(1, SIZE, SIZE)), "Low-Res KMeans"),
        (lambda: mapper(sd15, seg, image=image, quality="best"), "unknown quality"),
        (lambda: mapper(sd15, seg, image=image, inject="some"), "inject"),
        (lambda: mapper(sd15, seg, image=image, clip=None), "Modulated Denoise Mapper needs"),
        (lambda: mapper(sd15, seg), "connect an image"),
        (lambda: mapper(sd15, seg, image=image, t_m=1000), "t_m"),
    ]
    for call, match in cases:
        with pytest.raises(EmergentSegError, match=match) as err:
            call()
        assert one_sentence(str(err.value)), str(err.value)
    with pytest.raises(UnsupportedModelError):
        mapper(_no_decoder_cross_attention(), Segmentation.from_labels(seg.labels), image=image)
