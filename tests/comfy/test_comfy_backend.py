"""ComfyBackend and the nodes on tiny UNets built from ComfyUI's own model classes (fast).

Gated on COMFYUI_PATH. Covers: site keys and strides for the SD1.x and SDXL layouts, the
sigma/epsilon plumbing against a direct UNet call, captured probabilities against a softmax
computed independently from the module weights, the user's model left untouched (patches and a
KSampler run bit for bit), Cancel mid-forward, progress, and bad-input messages.
"""
import copy
import re

import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402

from emergent_seg.core.backend import PassHooks  # noqa: E402
from emergent_seg.core.capture import capture_attention  # noqa: E402
from emergent_seg.core.errors import EmergentSegError, UnsupportedModelError  # noqa: E402
from emergent_seg.nodes import capture as capture_node  # noqa: E402
from emergent_seg.nodes import kl_merge as kl_node  # noqa: E402
from emergent_seg.nodes import mask_output as mask_node  # noqa: E402
from emergent_seg.nodes.comfy_backend import ComfyBackend  # noqa: E402

CTX = 32  # tiny SD1 context width


@pytest.fixture(scope="module")
def sd1():
    return cs.tiny_sd15_model(seed=0, context_dim=CTX)


@pytest.fixture(scope="module")
def sdxl():
    return cs.tiny_sdxl_model(seed=0)


def sd1_conditioning(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, CTX, generator=g), {"pooled_output": torch.randn(batch, CTX, generator=g)}]]


def sdxl_conditioning(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and 0 < len(msg) < 400 and not re.search(r"[.!?]\s+[A-Z]", msg)


# ------------------------------------------------------------------------------------ sites


def test_sd1_sites_follow_the_block_layout(sd1):
    b = ComfyBackend(sd1)
    sites = b.sites()
    assert len(sites) == 32 and b.size_multiple() == 64
    self_keys = [s.key for s in sites if s.kind == "self"]
    assert self_keys == [f"input.{i}.0.attn1" for i in (1, 2, 4, 5, 7, 8)] + ["middle.0.0.attn1"] + \
        [f"output.{i}.0.attn1" for i in range(3, 12)]
    by_key = {s.key: s for s in sites}
    assert by_key["output.9.0.attn1"].host_block == ("output", 9, 0)
    # 256 px -> latent 32: grids 32/16/8/4 (half of SD1.5's 64/32/16/8 at 512 px).
    grids = {k: by_key[k].grid((32, 32)) for k in ("input.1.0.attn1", "input.4.0.attn1",
                                                    "input.7.0.attn1", "middle.0.0.attn1",
                                                    "output.3.0.attn1", "output.6.0.attn2",
                                                    "output.11.0.attn1")}
    assert grids == {"input.1.0.attn1": (32, 32), "input.4.0.attn1": (16, 16), "input.7.0.attn1": (8, 8),
                     "middle.0.0.attn1": (4, 4), "output.3.0.attn1": (8, 8), "output.6.0.attn2": (16, 16),
                     "output.11.0.attn1": (32, 32)}
    assert [s.order for s in sites] == list(range(32))
    assert {s.heads for s in sites} == {8}


def test_sdxl_block_keys_and_resolution_bookkeeping(sdxl):
    b = ComfyBackend(sdxl)
    assert b.size_multiple() == 32                       # 8 (VAE) x 2 downsamplings
    self_sites = [s for s in b.sites() if s.kind == "self"]
    blocks = sorted({s.host_block[:2] for s in self_sites})
    assert ("input", 1) not in blocks and ("output", 6) not in blocks   # no top-level attention
    assert {(s.host_block, s.stride) for s in self_sites if s.host_block[:2] == ("input", 4)} == \
        {(("input", 4, 0), 2), (("input", 4, 1), 2)}
    assert [s.depth for s in self_sites if s.host_block[:2] == ("middle", 0)] == [0, 1, 2]
    assert len(self_sites) == 2 * 2 + 3 * 2 + 3 + 3 * 3 + 2 * 3
    # 1024 px (latent 128): 64x64 and 32x32 grids; 512 px: 32x32 and 16x16.
    assert sorted({s.grid((128, 128)) for s in self_sites}) == [(32, 32), (64, 64)]
    assert sorted({s.grid((64, 64)) for s in self_sites}) == [(16, 16), (32, 32)]
    assert capture_node.parse_levels("all", b.sites(), (128, 128)) is None
    assert capture_node.parse_levels("64", b.sites(), (128, 128)) == [2]
    with pytest.raises(EmergentSegError, match="64x64, 32x32"):
        capture_node.parse_levels("16", b.sites(), (128, 128))


def test_sdxl_capture_uses_y_and_finest_grid(sdxl):
    b = ComfyBackend(sdxl)
    cond = b.from_conditioning(sdxl_conditioning())
    cap = capture_attention(b, torch.randn(1, 4, 16, 16), cond)
    assert cap.grid == (8, 8) and cap.image_size == (128, 128)
    assert [lvl.layers for lvl in cap.levels] == [10, 18]
    torch.testing.assert_close(cap.self_attention.sum(-1), torch.ones(1, 64))


# ----------------------------------------------------------------------- forward plumbing


def test_predict_noise_equals_a_direct_unet_call(sd1):
    b = ComfyBackend(sd1)
    cond = b.from_conditioning(sd1_conditioning(batch=2))
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([300, 41])
    eps = b.predict_noise(x_t, t, cond)
    with torch.no_grad():
        direct = sd1.model.diffusion_model(x_t, t.float(), context=cond.context, transformer_options={})
    torch.testing.assert_close(eps, direct, atol=2e-5, rtol=1e-4)
    # Explicit-softmax hooks on every site give the same prediction (to about 2e-6).
    from emergent_seg.core.attention import explicit_attention
    hooks = PassHooks({s.key: (lambda site, q, k, v: explicit_attention(q, k, v, site.heads)) for s in b.sites()})
    torch.testing.assert_close(b.predict_noise(x_t, t, cond, hooks), direct, atol=1e-4, rtol=1e-4)
    alphas = b.alphas_cumprod()
    assert alphas.shape == (1000,) and alphas.dtype == torch.float64
    sigma300 = ((1 - alphas[300]) / alphas[300]).sqrt()
    assert abs(float(sigma300) - 0.8328) < 1e-3         # SD1.x: sqrt((1 - acp) / acp) at t = 300


def test_output_hooks_fire_only_at_their_site(sd1):
    """EmerDiff's route: an output hook sees [B, Nq, C] after to_out at exactly its block; adding
    zero is bit-identical to no hook, adding something changes the prediction."""
    b = ComfyBackend(sd1)
    cond = b.from_conditioning(sd1_conditioning())
    x_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([281])
    plain = b.predict_noise(x_t, t, cond)
    seen = []

    def add(delta):
        def hook(site, hidden):
            seen.append((site.key, tuple(hidden.shape)))
            return hidden + delta
        return hook

    zero = b.predict_noise(x_t, t, cond, PassHooks(output={"output.3.0.attn2": add(0.0)}))
    assert torch.equal(zero, plain)
    assert seen == [("output.3.0.attn2", (1, 16, 128))]      # 16x16 latent, stride 4
    moved = b.predict_noise(x_t, t, cond, PassHooks(output={"output.3.0.attn2": add(1.0),
                                                             "input.1.0.attn1": add(0.0)}))
    assert not torch.equal(moved, plain)
    assert sorted(k for k, _ in seen[1:]) == ["input.1.0.attn1", "output.3.0.attn2"]


def test_v_prediction_model_returns_epsilon():
    """SD2.x v-prediction: eps = sqrt(a)*v + sqrt(1-a)*x_t, with v the raw UNet output on x_t."""
    m = cs.tiny_sd2_vpred_model()
    b = ComfyBackend(m)
    assert {s.heads for s in b.sites() if s.stride == 1} == {2}      # 32 channels / 16-dim heads
    cond = b.from_conditioning(sd1_conditioning())
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500])
    with torch.no_grad():
        v = m.model.diffusion_model(x_t, t.float(), context=cond.context, transformer_options={})
    a = b.alphas_cumprod()[500].float()
    torch.testing.assert_close(b.predict_noise(x_t, t, cond), a.sqrt() * v + (1 - a).sqrt() * x_t,
                               atol=5e-5, rtol=1e-4)


def test_sdxl_size_options_of_the_conditioning_reach_y(sdxl):
    b = ComfyBackend(sdxl)
    ctx, opts = sdxl_conditioning()[0]
    x = torch.zeros(1, 4, 16, 16)
    plain = b._model_kwargs(sdxl, b.from_conditioning([[ctx, opts]]), x, torch.device("cpu"))["y"]
    sized = b._model_kwargs(sdxl, b.from_conditioning([[ctx, dict(opts, width=1024, height=768)]]), x,
                            torch.device("cpu"))["y"]
    expected = sdxl.model.encode_adm(pooled_output=opts["pooled_output"], width=1024, height=768)
    default = sdxl.model.encode_adm(pooled_output=opts["pooled_output"], width=128, height=128)
    torch.testing.assert_close(sized, expected)
    torch.testing.assert_close(plain, default)          # default: the latent's pixel size


def test_captured_probabilities_equal_an_independent_softmax(sd1):
    b = ComfyBackend(sd1)
    cond = b.from_conditioning(sd1_conditioning())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cap = capture_attention(b, latents, cond, timestep=300, strides=[1])
    assert cap.grid == (16, 16) and [lvl.layers for lvl in cap.levels] == [5]
    expected = cs.independent_top_level_mean(sd1, latents, cond.context, 300)
    torch.testing.assert_close(cap.self_attention.double(), expected, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------- user's model untouched


def _sample(model, positive, negative, latent, seed=7):
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", positive, negative, latent,
                               denoise=1.0, seed=seed, disable_pbar=True)


def test_nodes_leave_the_model_bit_identical(sd1):
    pos, neg = sd1_conditioning(seed=1), sd1_conditioning(seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    options_before = copy.deepcopy(sd1.model_options)
    patches_before = {k: list(v) for k, v in sd1.patches.items()}
    before = _sample(sd1, pos, neg, latent)
    cap = capture_node.run(sd1, latent={"samples": torch.randn(1, 4, 8, 8)}, conditioning=pos).outputs[0]
    seg = kl_node.run(cap, anchors_per_side=4).outputs[0]
    mask_node.run(seg, "all")
    after = _sample(sd1, pos, neg, latent)
    assert torch.equal(before, after)
    assert sd1.model_options == options_before
    assert "patches_replace" not in sd1.model_options.get("transformer_options", {})
    assert {k: list(v) for k, v in sd1.patches.items()} == patches_before


def test_cancel_stops_mid_forward_and_leaves_no_patch(sd1):
    calls = []
    b = ComfyBackend(sd1)
    cond = b.from_conditioning(sd1_conditioning())

    def hook(site, q, k, v):
        calls.append(site.key)
        if len(calls) == 3:
            mm.interrupt_current_processing(True)
        from emergent_seg.core.attention import explicit_attention
        return explicit_attention(q, k, v, site.heads)

    hooks = PassHooks({s.key: hook for s in b.sites() if s.kind == "self"})
    try:
        with pytest.raises(mm.InterruptProcessingException):
            b.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond, hooks)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 3                                # stopped at the 4th hooked layer
    assert "patches_replace" not in sd1.model_options.get("transformer_options", {})
    b.predict_noise(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond)   # still usable


def test_progress_bar_gets_one_update_per_layer(sd1):
    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: events.append((value, total)))
    try:
        capture_node.run(sd1, latent={"samples": torch.randn(1, 4, 8, 8)}, conditioning=sd1_conditioning())
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(events) == 16 and events[-1] == (16, 16)


# ------------------------------------------------------------------------- node chain + batch


def test_node_chain_on_a_batch(sd1):
    latent = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    cap = capture_node.run(sd1, latent=latent, conditioning=sd1_conditioning(), levels="8, 4").outputs[0]
    assert cap.self_attention.shape == (3, 64, 64) and cap.image_size == (64, 64)
    assert [lvl.grid for lvl in cap.levels] == [(8, 8), (4, 4)]
    seg = kl_node.run(cap, tau=0.5, anchors_per_side=4).outputs[0]
    assert seg.labels.shape == (3, 64, 64) and len(seg.counts) == 3
    res = mask_node.run(seg, "0", image=torch.rand(3, 64, 64, 3), save_preview=lambda im: ["saved"])
    union, per_segment, overlay = res.outputs
    assert union.shape == (3, 64, 64) and union.dtype == torch.float32
    assert per_segment.shape == (sum(seg.counts), 64, 64)
    assert overlay.shape == (3, 64, 64, 3)
    assert res.ui["images"] == ["saved"] and len(res.ui["emergent_seg"]) == 3


# ------------------------------------------------------------------------------ bad inputs


def tiny_flux_model():
    import comfy.supported_models
    config = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
              "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2,
              "qkv_bias": True, "guidance_embed": False}
    base = comfy.supported_models.Flux(config).get_model({})
    return cs.patcher_for(base)


def test_a_dit_that_is_neither_flux_nor_sd3_is_refused_in_one_sentence():
    """Flux and SD3 have their own backend now; any other transformer gets one sentence naming
    what is supported, and the MODEL is untouched."""
    import types

    flux = tiny_flux_model()
    other = flux.clone()
    other.model = types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))
    before = copy.deepcopy(flux.model_options)
    with pytest.raises(UnsupportedModelError) as err:
        capture_node.run(other, latent={"samples": torch.zeros(1, 16, 8, 8)}, conditioning=sd1_conditioning())
    msg = str(err.value)
    assert "SD1.x/SD2.x/SDXL UNet" in msg and "Flux or SD3" in msg and one_sentence(msg), msg
    assert flux.model_options == before


def test_bad_sizes_are_refused_in_one_sentence(sd1):
    with pytest.raises(EmergentSegError) as err:
        capture_node.run(sd1, image=[torch.rand(1, 64, 64, 3), torch.rand(1, 128, 64, 3)],
                         conditioning=sd1_conditioning())
    assert "different sizes" in str(err.value) and one_sentence(str(err.value))
    with pytest.raises(EmergentSegError) as err:
        capture_node.run(sd1, latent={"samples": torch.zeros(1, 4, 9, 8)}, conditioning=sd1_conditioning())
    assert "64x64" in str(err.value) and one_sentence(str(err.value)), str(err.value)


def test_missing_inputs_are_explained(sd1):
    with pytest.raises(EmergentSegError, match="CLIP"):
        capture_node.run(sd1, latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(EmergentSegError, match="image"):
        capture_node.run(sd1, conditioning=sd1_conditioning())
    with pytest.raises(EmergentSegError, match="VAE"):
        capture_node.run(sd1, image=torch.rand(1, 64, 64, 3), conditioning=sd1_conditioning())
