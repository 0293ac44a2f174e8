"""Low-Res KMeans and Modulated Denoise Mapper on a real ComfyUI host (gated on COMFYUI_PATH).

Tiny UNets built from ComfyUI's own classes with a tiny ComfyUI VAE (comfy.sd.VAE around a
32-channel AutoencoderKL), and the full-size random SD1.5 checkpoint, all at 128 px with K <= 3
and quality "fast" (faithful only where a test needs many passes to cancel). Covers: both nodes
through ComfyBackend, the V3 schema with the host's comfy_api, the user's model bit-identical in a
KSampler run afterwards, Cancel in the middle of the mapper, the SDXL layout's grid report, a
KL Merge result pooled into the mapper with its prompt words, and bad-input sentences.
"""
import copy

import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402

from emergent_seg.core.errors import EmergentSegError  # noqa: E402
from emergent_seg.nodes import capture as capture_node  # noqa: E402
from emergent_seg.nodes import kl_merge as kl_node  # noqa: E402
from emergent_seg.nodes import lowres_kmeans as lk_node  # noqa: E402
from emergent_seg.nodes import mapper as map_node  # noqa: E402
from emergent_seg.nodes import mask_output as mask_node  # noqa: E402
from emergent_seg.nodes import v3_node  # noqa: E402
from test_comfy_backend import (_sample, one_sentence, sd1_conditioning,  # noqa: E402
                                sdxl_conditioning, tiny_flux_model)

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(seed: int = 3):
    """A real ``comfy.sd.VAE`` (8x, 4 latent channels) with 32-channel random weights."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
                "dropout": 0.0}
    sd = cs.reset_weights(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed).state_dict()
    return comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


@pytest.fixture(scope="module")
def sd1():
    return cs.tiny_sd15_model(seed=0)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def scene(batch: int = 1, size: int = SIZE) -> torch.Tensor:
    img = torch.zeros(batch, size, size, 3)
    img[:, :, : size // 2] = torch.tensor([0.9, 0.1, 0.1])
    img[:, :, size // 2:] = torch.tensor([0.1, 0.8, 0.2])
    img[:, size // 2:, size // 4: 3 * size // 4] = torch.tensor([0.1, 0.2, 0.9])
    if batch > 1:
        img[1] = img[1].flip(0)
    return img


def untouched(model):
    """Snapshot of what our nodes must never change on the user's ModelPatcher."""
    return copy.deepcopy(model.model_options), {k: list(v) for k, v in model.patches.items()}


def assert_untouched(model, before):
    options, patches = before
    assert model.model_options == options
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert {k: list(v) for k, v in model.patches.items()} == patches


# ------------------------------------------------------------------------------ tiny SD1


def test_v3_schema_with_the_hosts_comfy_api():
    from comfy_api.latest import io
    for spec, run in ((lk_node.SPEC, lk_node.run), (map_node.SPEC, map_node.run)):
        node = v3_node(spec, run)
        info = node.GET_NODE_INFO_V1()
        assert info["output"] == ["EMERGENT_SEG_SEGMENTATION", "STRING"]
        assert info["output_name"] == ["segmentation" if spec is lk_node.SPEC else "refined", "info"]
        assert info["category"] == "segmentation/emergent" and info["description"]
        required, optional = info["input"]["required"], info["input"].get("optional", {})
        for name, (_, opts) in {**required, **optional}.items():
            assert opts.get("tooltip"), name
        assert required["rng_seed"][1]["display_name"] == "seed"
        assert isinstance(node.GET_SCHEMA(), io.Schema)
    mapper_info = v3_node(map_node.SPEC, map_node.run).GET_NODE_INFO_V1()["input"]["required"]
    assert mapper_info["lam"][1]["display_name"] == "lambda" and mapper_info["lam"][1]["default"] == 10.0
    assert mapper_info["quality"][1]["default"] == "fast"


def test_both_nodes_on_a_tiny_sd1_unet(sd1, vae):
    image = scene(2)
    seg, info = lk_node.run(sd1, grid=16, image=image, vae=vae, conditioning=sd1_conditioning(), clusters=3).outputs
    assert seg.labels.shape == (2, SIZE, SIZE) and seg.lowres.shape == (2, 16, 16)
    assert all(1 <= c <= 3 for c in seg.counts)
    # 128 px = 16x16 latent: the decoder's 16x16 cross-attention is output 9 (ComfyUI's keys)
    assert seg.info["site"] == "output.9.0.attn2" and "output.9.0.attn2 (16x16 grid)" in info
    out, minfo = map_node.run(sd1, vae, image=image, segmentation=seg, conditioning=sd1_conditioning(),
                              quality="fast").outputs
    assert out.labels.shape == (2, SIZE, SIZE) and out.method == "emerdiff"
    assert out.info["site"] == "output.9.0.attn2" and out.info["steps"] == 1
    assert out.info["evaluations"] == sum(c + 1 for c in seg.counts)        # K+1 per image
    assert out.info["vae_decodes"] == sum(c + 1 for c in seg.counts)
    assert "output.9.0.attn2 (16x16 grid)" in minfo and "fast" in minfo
    union, per_segment, overlay = mask_node.run(out, "all", image=image).outputs
    assert union.shape == (2, SIZE, SIZE) and per_segment.shape == (sum(out.counts), SIZE, SIZE)
    assert overlay.shape == (2, SIZE, SIZE, 3)
    # the same segmentation from a LATENT (VAE Encode) instead of image + VAE
    latent = {"samples": vae.encode(image)}
    again, _ = lk_node.run(sd1, grid=16, latent=latent, conditioning=sd1_conditioning(), clusters=3).outputs
    assert torch.equal(again.labels, seg.labels)


def test_the_model_is_bit_identical_after_both_nodes(sd1, vae):
    pos, neg = sd1_conditioning(seed=1), sd1_conditioning(seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    before = untouched(sd1)
    sampled = _sample(sd1, pos, neg, latent)
    seg, _ = lk_node.run(sd1, grid=16, image=scene(), vae=vae, conditioning=pos, clusters=2).outputs
    map_node.run(sd1, vae, image=scene(), segmentation=seg, conditioning=pos, quality="fast-symmetric",
                 max_batch=3)
    assert torch.equal(sampled, _sample(sd1, pos, neg, latent))
    assert_untouched(sd1, before)


def test_cancel_in_the_middle_of_the_mapper_leaves_no_patch(sd1, vae):
    seg, _ = lk_node.run(sd1, grid=16, image=scene(), vae=vae, conditioning=sd1_conditioning(), clusters=2).outputs
    before = untouched(sd1)
    events = []

    def on_progress(value, total, preview, node_id=None):
        events.append((value, total))
        if len(events) == 3:                  # after the third of 2 chunks x 15 steps + 2 decodes
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(on_progress)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            map_node.run(sd1, vae, image=scene(), segmentation=seg, conditioning=sd1_conditioning(),
                         quality="faithful", max_batch=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    assert len(events) == 3 and events[-1][1] == 2 * 15 + 2
    assert_untouched(sd1, before)
    out, _ = map_node.run(sd1, vae, image=scene(), segmentation=seg, conditioning=sd1_conditioning()).outputs
    assert out.labels.shape == (1, SIZE, SIZE)                               # still usable


def test_progress_reaches_the_host_bar(sd1, vae):
    seg, _ = lk_node.run(sd1, grid=16, image=scene(), vae=vae, conditioning=sd1_conditioning(), clusters=2).outputs
    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    try:
        map_node.run(sd1, vae, image=scene(), segmentation=seg, conditioning=sd1_conditioning(), max_batch=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    # fast, K = 2, max_batch 2: chunks [ref, +M0], [ref, +M1] (2 passes) + decodes [ref], [M0, M1]
    assert events[-1] == (4, 4) and [v for v, _ in events] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- tiny SDXL


def test_sdxl_layout_reports_the_grid_it_used(vae):
    sdxl = cs.tiny_sdxl_model(seed=0)
    seg, info = lk_node.run(sdxl, grid=16, image=scene(), vae=vae, conditioning=sdxl_conditioning(),
                            clusters=2).outputs
    # SDXL has no 16x16 decoder cross-attention at 128 px (no attention at the top level): 8x8
    assert seg.info["grid"] == [8, 8] and seg.lowres.shape == (1, 8, 8)
    assert seg.info["site"] == "output.3.0.attn2"
    assert "output.3.0.attn2 (8x8 grid, nearest to the requested 16x16)" in info
    out, minfo = map_node.run(sdxl, vae, image=scene(), segmentation=seg,
                              conditioning=sdxl_conditioning()).outputs
    assert out.info["site"] == "output.3.0.attn2" and out.info["grid"] == [8, 8]
    assert "output.3.0.attn2 (8x8 grid)" in minfo and out.labels.shape == (1, SIZE, SIZE)


# ------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_in_one_sentence(sd1, vae):
    seg, _ = lk_node.run(sd1, grid=16, image=scene(), vae=vae, conditioning=sd1_conditioning(), clusters=2).outputs
    cases = [
        (lambda: lk_node.run(sd1, grid=16, image=scene(), vae=vae, conditioning=sd1_conditioning(), clusters=257),
         "only 256 cells"),
        (lambda: lk_node.run(sd1, grid=16, image=scene(), vae=vae), "CLIP"),
        (lambda: lk_node.run(sd1, grid=16, image=scene(), conditioning=sd1_conditioning()), "VAE"),
        (lambda: map_node.run(sd1, vae, image=scene(), segmentation=seg, conditioning=sd1_conditioning(),
                              lam=0.0), "lambda"),
        (lambda: map_node.run(sd1, vae, image=scene(size=64), segmentation=seg,
                              conditioning=sd1_conditioning()), "128x128 but the image is 64x64"),
        (lambda: map_node.run(sd1, vae, image=scene(1), segmentation=_batch(seg, 2),
                              conditioning=sd1_conditioning()), "2 images but 1"),
    ]
    before = untouched(sd1)
    for call, match in cases:
        with pytest.raises(EmergentSegError, match=match) as err:
            call()
        assert one_sentence(str(err.value)), str(err.value)
    flux = tiny_flux_model()                # Flux runs EmerDiff too (experimental); its errors are as clear
    with pytest.raises(EmergentSegError) as err:
        lk_node.run(flux, grid=16, latent={"samples": torch.zeros(1, 16, 8, 8)}, conditioning=sd1_conditioning())
    assert "only 16 cells" in str(err.value) and one_sentence(str(err.value))
    assert_untouched(sd1, before)


def _batch(seg, n):
    from dataclasses import replace
    return replace(seg, labels=seg.labels.expand(n, -1, -1).clone(), counts=seg.counts * n,
                   lowres=seg.lowres.expand(n, -1, -1).clone())


# ------------------------------------------------------------------- random SD1.5 checkpoint


@pytest.fixture(scope="module")
def checkpoint():
    return cs.load_sd15()


def test_sd15_checkpoint_kmeans_mapper_and_ksampler_unchanged(checkpoint):
    model, clip, vae = checkpoint
    sample = cs.ksampler_run(model, clip, SIZE)

    before_options = untouched(model)
    before = sample()
    image = scene()
    seg, info = lk_node.run(model, grid=16, image=image, vae=vae, clip=clip, prompt="", clusters=3).outputs
    assert seg.info["site"] == "output.9.0.attn2" and seg.lowres.shape == (1, 16, 16)
    assert "(16x16 grid)" in info and seg.labels.shape == (1, SIZE, SIZE)
    out, minfo = map_node.run(model, vae, image=image, segmentation=seg, clip=clip).outputs
    assert out.labels.shape == (1, SIZE, SIZE) and 1 <= out.counts[0] <= 3
    assert out.info["evaluations"] == seg.counts[0] + 1 and "fast" in minfo
    assert torch.equal(before, sample())
    assert_untouched(model, before_options)


def test_sd15_kl_merge_result_is_pooled_and_keeps_its_words(checkpoint):
    model, clip, vae = checkpoint
    image = scene()
    prompt = "a red skateboard, on green grass"
    cap = capture_node.run(model, image=image, vae=vae, clip=clip, prompt=prompt).outputs[0]
    seg = kl_node.run(cap, anchors_per_side=8).outputs[0]
    assert seg.words and len(seg.words[0]) == seg.counts[0]
    out, minfo = map_node.run(model, vae, image=image, segmentation=seg, clip=clip,
                              max_batch=32).outputs
    assert out.method == "diffseg+mapper" and out.info["lowres_from"] == "pooled labels"
    assert "pooled" in minfo and out.labels.shape == (1, SIZE, SIZE)
    assert len(out.words[0]) == out.counts[0]
    assert set(out.words[0]) <= set(seg.words[0])
