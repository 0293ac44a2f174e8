"""DiT joint attention through the real host (groundwork for DiT support, no node yet): tiny
random-weight Flux and SD3 models built from ComfyUI's own classes, hooked only through ComfyUI's
DiT block patches and its attention override, on a clone of the user's model."""
from __future__ import annotations

import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
import torch  # noqa: E402

from emergent_seg.core.errors import EmergentSegError, UnsupportedModelError  # noqa: E402
from emergent_seg.core.joint_attention import image_head_mean  # noqa: E402
from emergent_seg.nodes.comfy_backend import capture_dit_attention, dit_blocks  # noqa: E402

TEXT = 5


@pytest.fixture(scope="module")
def models():
    return {"flux": cs.tiny_flux_model(seed=0), "sd3": cs.tiny_sd3_model(seed=0)}


def conditioning(family: str, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "flux":
        return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 16, generator=g),
                "guidance": torch.full((batch,), 3.5)}
    return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 32, generator=g)}


def heads_first(x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    if kwargs.get("skip_reshape"):
        return x
    b, n, c = x.shape
    return x.view(b, n, kwargs["heads"], c // kwargs["heads"]).transpose(1, 2)


def recorder(calls: list):
    """An override another pack could have installed: it records q/k and runs the attention."""
    def override(func, *args, **kwargs):
        calls.append((heads_first(args[0], kwargs).detach().clone(), heads_first(args[1], kwargs).detach().clone()))
        return func(*args, **kwargs)
    return override


def predict(model, x, sigma, kwargs):
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=dict(
            model.model_options.get("transformer_options", {})), **kwargs)


def test_blocks_are_named_in_execution_order(models):
    assert dit_blocks(models["flux"]) == ["double_block.0", "double_block.1", "single_block.0", "single_block.1"]
    assert dit_blocks(models["sd3"]) == ["double_block.0", "double_block.1"]
    with pytest.raises(UnsupportedModelError, match="not a Flux or SD3"):
        dit_blocks(cs.tiny_sd15_model())


# (family, latent size, Kontext reference latents, chosen blocks, which recorded calls they are,
#  attention calls per pass). SD3's block 1 also runs SD3.5's image-only attention: 3 calls.
CASES = [("flux", (6, 10), False, ["double_block.1", "single_block.0"], [1, 2], 4),
         ("flux", (8, 4), True, ["double_block.1", "single_block.0"], [1, 2], 4),
         ("sd3", (6, 10), False, ["double_block.0", "double_block.1"], [0, 1], 3)]


@pytest.mark.parametrize("family,latent_hw,reference,blocks,indices,calls_per_pass", CASES)
def test_every_chosen_block_once_with_the_image_tokens_after_the_text(models, family, latent_hw, reference,
                                                                       blocks, indices, calls_per_pass):
    """Odd grids (3x5), Kontext-style reference latents after the image, SD3.5's image-only
    attention: the aggregate equals the head mean computed independently from the q/k a
    pre-installed override saw."""
    user = models[family].clone()
    calls: list = []
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder(calls)
    latents = torch.randn(2, 16, *latent_hw, generator=torch.Generator().manual_seed(2))
    kwargs = conditioning(family, 2)
    if reference:
        kwargs["ref_latents"] = [torch.randn(2, 16, 4, 4)]
    cap = capture_dit_attention(user, latents, kwargs, 0.6, blocks, (latent_hw[0] * 8, latent_hw[1] * 8))
    grid = (latent_hw[0] // 2, latent_hw[1] // 2)
    n = grid[0] * grid[1]
    assert cap.grid == grid and cap.self_attention.shape == (2, n, n)
    assert len(calls) == calls_per_pass                     # the other pack's override ran for every call
    extra = 4 if reference else 0                           # reference tokens: (4/2) x (4/2)
    assert [q.shape[2] for q, _ in calls[:2]] == [TEXT + n + extra] * 2
    expected = torch.zeros(2, n, n)
    for i in indices:
        image_head_mean(calls[i][0], calls[i][1], slice(TEXT, TEXT + n), expected, 1.0 / len(indices))
    assert torch.allclose(cap.self_attention, expected, atol=1e-6)
    assert torch.allclose(cap.self_attention.sum(-1), torch.ones(2, n), atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_capture_leaves_the_prediction_and_the_users_model_unchanged(models, family):
    model = models[family]
    latents = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    kwargs = conditioning(family)
    x = torch.randn(1, 16, 6, 10)
    before = predict(model, x, 0.6, kwargs)
    options_before = repr(model.model_options)
    under_capture: list = []

    def keep(store):
        def override(func, *args, **kwargs):
            out = func(*args, **kwargs)
            store.append(out.clone())
            return out
        return override
    user = model.clone()
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = keep(under_capture)
    capture_dit_attention(user, latents, kwargs, 0.6, dit_blocks(model), (48, 80))
    # the same noisy input through the plain model: every attention output equal, bit for bit
    ms = model.get_model_object("model_sampling")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    x_noisy = ms.noise_scaling(torch.full((1, 1, 1, 1), 0.6), noise, latents)
    plain: list = []
    again = model.clone()
    again.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = keep(plain)
    predict(again, x_noisy, 0.6, kwargs)
    assert len(under_capture) == len(plain) >= 3
    assert all(torch.equal(a, b) for a, b in zip(under_capture, plain))
    assert repr(model.model_options) == options_before       # nothing of ours on the user's patcher
    assert torch.equal(predict(model, x, 0.6, kwargs), before)


def test_bad_requests_are_clear_errors(models):
    flux = models["flux"]
    latents = torch.randn(1, 16, 6, 10)
    with pytest.raises(EmergentSegError, match="not in this model"):
        capture_dit_attention(flux, latents, conditioning("flux"), 0.6, ["double_block.9"], (48, 80))
    with pytest.raises(EmergentSegError, match="sigma must be in"):
        capture_dit_attention(flux, latents, conditioning("flux"), 0.0, ["double_block.0"], (48, 80))
    with pytest.raises(EmergentSegError, match="not a multiple"):
        capture_dit_attention(flux, torch.randn(1, 16, 5, 10), conditioning("flux"), 0.6, ["double_block.0"],
                              (40, 80))


# --- the nodes on DiT models -------------------------------------------------------------------

def comfy_conditioning(family: str, **options) -> list:
    """A CONDITIONING as CLIP Text Encode (+ FluxGuidance) would give it for the tiny models."""
    kw = conditioning(family)
    extra = {"pooled_output": kw["y"], **options}
    if family == "flux":
        extra.setdefault("guidance", 3.5)
    return [[kw["c_crossattn"], extra]]


def sample_fn(model, family: str):
    """One fixed KSampler call (seed 7, 2 euler steps) on ``model``, as a user's graph would run it."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py

    pos, neg = comfy_conditioning(family), comfy_conditioning(family)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def sample() -> torch.Tensor:
        return comfy_nodes.common_ksampler(model, 7, 2, 2.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    return sample


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_capture_kl_merge_and_mask_output_nodes_run_on_dit_models(models, family):
    """Capture Attention -> KL Merge -> Mask Output on a DiT MODEL with a LATENT of odd size and a
    CONDITIONING; the capture equals the groundwork function on the same conditioning, the default
    blocks are the family preset, and a KSampler run on the user's MODEL is bit-identical after
    every node."""
    from emergent_seg.core.settings import dit_preset
    from emergent_seg.nodes import capture as capture_node
    from emergent_seg.nodes import kl_merge, mask_output
    from emergent_seg.nodes.comfy_backend import ComfyDitBackend

    model = models[family]
    sample = sample_fn(model, family)
    before = sample()
    samples = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(4))
    cond = comfy_conditioning(family)
    cap = capture_node.run(model, latent={"samples": samples}, conditioning=cond, levels="all").outputs[0]
    backend = ComfyDitBackend(model)
    assert backend.default_blocks() == dit_preset(family).blocks(2, 2 if family == "flux" else 0)
    assert [(level.grid, level.layers) for level in cap.levels] == [((3, 5), len(backend.default_blocks()))]
    assert cap.image_size == (48, 80) and cap.self_attention.shape == (2, 15, 15)
    assert torch.allclose(cap.self_attention.sum(-1), torch.ones(2, 15), atol=1e-5)

    x = backend.latent_in(samples)
    kwargs = backend._model_kwargs(model, backend.from_conditioning(cond), x, torch.device("cpu"))
    if family == "flux":
        assert torch.equal(kwargs["guidance"], torch.full((2,), 3.5))
    direct = capture_dit_attention(model, x, kwargs, dit_preset(family).sigma, backend.default_blocks(), (48, 80))
    assert torch.equal(cap.self_attention, direct.self_attention)

    every = capture_node.run(model, latent={"samples": samples}, conditioning=cond, levels="every",
                             sigma=0.5).outputs[0]
    assert every.levels[0].layers == len(dit_blocks(model)) and every.timestep == 500
    assert not torch.equal(every.self_attention, cap.self_attention)

    seg = kl_merge.run(cap, tau=0.5).outputs[0]
    assert seg.labels.shape == (2, 48, 80)
    masks = mask_output.run(seg, selection="all").outputs[0]
    assert masks.dtype == torch.float32 and masks.shape[-2:] == (48, 80)
    assert float(masks.min()) >= 0 and float(masks.max()) <= 1
    assert torch.equal(sample(), before)


def test_flux_guidance_and_reference_latents_reach_the_model(models):
    """FluxGuidance's scalar and Kontext's reference latents in a CONDITIONING change the pass."""
    from emergent_seg.nodes import capture as capture_node

    model = models["flux"]
    samples = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(5))
    plain = capture_node.run(model, latent={"samples": samples}, conditioning=comfy_conditioning("flux"),
                             levels="every").outputs[0].self_attention
    guided = capture_node.run(model, latent={"samples": samples}, levels="every",
                              conditioning=comfy_conditioning("flux", guidance=9.0)).outputs[0].self_attention
    reference = capture_node.run(
        model, latent={"samples": samples}, levels="every",
        conditioning=comfy_conditioning("flux", reference_latents=[torch.randn(1, 16, 4, 4)])).outputs[0]
    assert not torch.equal(plain, guided)
    assert not torch.equal(plain, reference.self_attention)
    assert torch.allclose(reference.self_attention.sum(-1), torch.ones(1, 15), atol=1e-5)


def test_dit_node_errors_are_clear(models):
    from emergent_seg.nodes import capture as capture_node

    model = models["sd3"]
    latent = {"samples": torch.randn(1, 16, 6, 10)}
    cond = comfy_conditioning("sd3")
    with pytest.raises(EmergentSegError, match="outside this model's blocks"):
        capture_node.run(model, latent=latent, conditioning=cond, levels="double 1-4")
    with pytest.raises(EmergentSegError, match="not a block range"):
        capture_node.run(model, latent=latent, conditioning=cond, levels="64, 32")
    with pytest.raises(EmergentSegError, match="sigma must be in"):
        capture_node.run(model, latent=latent, conditioning=cond, sigma=1.5)


# --- EmerDiff on DiT models (experimental) ---------------------------------------------------

class ToyVAE:
    """Stands in for a 16-channel VAE in the mapper's decodes (plumbing only)."""

    downscale_ratio = 8

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8).movedim(1, -1).sigmoid()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_predict_noise_is_the_flow_prediction_in_vp_form(models, family):
    """No hooks: epsilon from the plain rectified-flow prediction, x_flow = x_vp * sqrt((1-s)^2+s^2),
    eps = (x_flow - (1-s) x0) / s, and alphas_cumprod = (1-s)^2 / ((1-s)^2+s^2)."""
    from emergent_seg.nodes.comfy_backend import ComfyDitBackend

    model = models[family]
    backend = ComfyDitBackend(model)
    alphas = backend.alphas_cumprod()
    assert alphas.shape == (1000,) and bool((alphas[1:] < alphas[:-1]).all())
    ms = model.get_model_object("model_sampling")
    s = float(ms.percent_to_sigma(1.0 - 282 / 1000))
    assert abs(float(alphas[281]) - (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)) < 1e-9
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(6))
    cond = backend.from_conditioning(comfy_conditioning(family))
    eps = backend.predict_noise(x, torch.full((2,), 281), cond)
    flow = x * ((1 - s) ** 2 + s ** 2) ** 0.5
    kwargs = backend._model_kwargs(model, cond, flow, torch.device("cpu"))
    x0 = predict(model, flow, s, kwargs)
    assert torch.allclose(eps, (flow - (1 - s) * x0) / s, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_injection_with_zero_lambda_reproduces_the_unmodulated_pass(models, family):
    """The mapper's hooks on a DiT: every member replays the reference's q/k (only values differ),
    the modulation goes into the image rows of one block's attention output. lambda = 0 and the
    replay give the unmodulated prediction; lambda != 0 changes it; a pre-installed override runs."""
    from emergent_seg.core.backend import PassHooks
    from emergent_seg.core.mapper import injection_hooks, modulation_hook
    from emergent_seg.nodes.comfy_backend import ComfyDitBackend

    user = models[family].clone()
    calls: list = []
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder(calls)
    backend = ComfyDitBackend(user)
    site = backend.emerdiff_site((6, 10))
    cond = backend.from_conditioning(comfy_conditioning(family))
    x = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(7)).expand(3, -1, -1, -1)
    t = torch.full((3,), 281)
    plain = backend.predict_noise(x[:1], t[:1], cond)
    assert calls                                            # the other pack's override saw the plain pass
    masks = torch.zeros(3, 15)
    masks[:, :7] = 1.0
    inject = injection_hooks(backend.sites(), 0)
    zero = backend.predict_noise(x, t, cond, PassHooks(inject.attention, {
        site.key: modulation_hook(site, masks, torch.zeros(3))}))
    assert torch.allclose(zero, plain.expand(3, -1, -1, -1), atol=1e-4)
    moved = backend.predict_noise(x, t, cond, PassHooks(inject.attention, {
        site.key: modulation_hook(site, masks, torch.tensor([0.0, 10.0, -10.0]))}))
    assert torch.allclose(moved[0], plain[0], atol=1e-4)
    assert not torch.allclose(moved[1], plain[0], atol=1e-2) and not torch.allclose(moved[2], plain[0], atol=1e-2)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lowres_kmeans_and_mapper_nodes_run_on_dit_models(models, family):
    """Low-Res KMeans -> Modulated Denoise Mapper on a DiT MODEL: the k-means grid is 1/32 of the
    image side, the features are the image stream entering the middle joint block (a replace
    patch another pack put there still runs), and a KSampler run on the user's MODEL is
    bit-identical afterwards."""
    from emergent_seg.nodes import lowres_kmeans, mapper

    model = models[family]
    sample = sample_fn(model, family)
    before = sample()
    seen: list = []

    def other_pack(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)
    user = model.clone()
    user.set_model_patch_replace(other_pack, "dit", "double_block", 1)
    latent = {"samples": torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(8))}
    cond = comfy_conditioning(family)
    seg, info = lowres_kmeans.run(user, latent=latent, conditioning=cond, clusters=3).outputs
    assert seen == [(1, 24, seen[0][2])]                    # 4x6 image tokens entered block 1, once
    assert tuple(seg.lowres.shape) == (1, 2, 3) and seg.labels.shape == (1, 64, 96)
    assert seg.info["site"] == "double_block.1" and "experimental" in info
    out, summary = mapper.run(user, ToyVAE(), latent=latent, segmentation=seg, conditioning=cond,
                              sigma=0.0).outputs
    assert out.labels.shape == (1, 64, 96) and 1 <= out.counts[0] <= 3
    assert "double_block.1" in summary
    assert torch.equal(sample(), before)
    with pytest.raises(EmergentSegError, match="low-res grid"):
        lowres_kmeans.run(user, latent=latent, conditioning=cond, clusters=7)


# --- words on DiT models: concept tokens in the capture's pass ---------------------------------

class WordClip:
    """A CLIP stand-in with ComfyUI's interface for the tiny models: a prompt encodes to a fixed
    random context (+ pooled vector); a word alone tokenizes as ``l`` (start, word, end) and
    ``t5xxl`` (word, end, padding) and encodes to a seeded random row per word. ``family="sd3"``
    joins the CLIP and T5 sequences as SD3's encoder does."""

    def __init__(self, family: str):
        self.family = family

    def tokenize(self, text, return_word_ids=False):
        words = text.split() or [""]
        t5 = [(10 + i, 1.0, i + 1) for i in range(len(words))] + [(1, 1.0, 0)]
        t5 += [(0, 1.0, 0)] * (8 - len(t5))
        return {"l": [[(49406, 1.0, 0)] + [(5, 1.0, i + 1) for i in range(len(words))] + [(49407, 1.0, 0)]],
                "t5xxl": [t5], "text": text}

    def encode_from_tokens(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens["text"])) + 1)
        rows = len(tokens["t5xxl"][0]) + (len(tokens["l"][0]) if self.family == "sd3" else 0)
        return torch.randn(1, rows, 32, generator=g)

    def encode_from_tokens_scheduled(self, tokens):
        return comfy_conditioning(self.family)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_prompt_words_run_as_concept_tokens_in_the_capture_pass(models, family):
    """Capture Attention with CLIP and a prompt on a DiT: the label words run as concept tokens in
    the same pass. The aggregate is the one without words (the image never sees them), the maps
    equal the standalone concept pass, and KL Merge names segments after the words, selectable
    by word in Mask Output; the user's MODEL samples bit-identically afterwards."""
    from emergent_seg.core.settings import dit_preset
    from emergent_seg.nodes import capture as capture_node
    from emergent_seg.nodes import kl_merge, mask_output
    from emergent_seg.nodes.comfy_backend import ComfyDitBackend
    from emergent_seg.nodes.dit_concepts import clip_concept_embeddings, flux_concept_maps, mmdit_concept_maps

    model = models[family]
    sample = sample_fn(model, family)
    before = sample()
    clip = WordClip(family)
    samples = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(9))
    cap = capture_node.run(model, latent={"samples": samples}, clip=clip, prompt="a red dog on the grass",
                           levels="every").outputs[0]
    plain = capture_node.run(model, latent={"samples": samples}, conditioning=comfy_conditioning(family),
                             levels="every").outputs[0]
    assert cap.tokens == ("red", "dog", "grass") and plain.cross == ()
    assert torch.equal(cap.self_attention, plain.self_attention)
    maps = cap.cross[0].maps
    assert maps.shape == (2, 15, 3) and torch.allclose(maps.sum(-1), torch.ones(2, 15), atol=1e-5)

    backend = ComfyDitBackend(model)
    x = backend.latent_in(samples)
    kwargs = backend._model_kwargs(model, backend.from_conditioning(comfy_conditioning(family)), x,
                                   torch.device("cpu"))
    concepts = clip_concept_embeddings(clip, ["red", "dog", "grass"])
    standalone = (flux_concept_maps if family == "flux" else mmdit_concept_maps)(
        model, x, kwargs, dit_preset(family).sigma, concepts)
    assert torch.allclose(maps, standalone, atol=1e-5)

    seg = kl_merge.run(cap, tau=0.5).outputs[0]
    assert seg.words and all(w in ("red", "dog", "grass") for image in seg.words for w in image)
    word = seg.words[0][0]
    picked = mask_output.run(seg.select(0), selection=word).outputs[0]
    assert float(picked[0].sum()) > 0
    assert torch.equal(sample(), before)


def test_an_older_comfyui_without_the_attention_override_gets_a_clear_error(models, monkeypatch):
    """ComfyUI before 0.3.60 has no optimized_attention_override (its wrap_attn): Capture Attention
    on a DiT then names the version to update to instead of failing inside the model."""
    import comfy.ldm.modules.attention as host_attention

    from emergent_seg.nodes import capture as capture_node

    monkeypatch.delattr(host_attention, "wrap_attn")
    with pytest.raises(UnsupportedModelError, match="ComfyUI 0.3.60 or newer"):
        capture_node.run(models["flux"], latent={"samples": torch.randn(1, 16, 6, 10)},
                         conditioning=comfy_conditioning("flux"))
