"""ConceptAttention-style per-word maps for Flux (and SD3/MMDiT) through the real host (tiny
random-weight models built from ComfyUI's own classes): the prediction is untouched, the concept
stream matches the block's own text-stream computation with the concepts as extra text tokens masked
from the image, and the maps have the shape DiffSeg's word voting takes."""
# ruff: noqa: E402, RUF100
from __future__ import annotations

import comfy_support as cs

cs.require_comfy()

import pytest
import torch
from emergent_seg.core.capture import CrossAttentionLevel
from emergent_seg.core.errors import EmergentSegError, UnsupportedModelError
from emergent_seg.core.words import word_maps
from emergent_seg.nodes.dit_concepts import (
    FluxConceptStream,
    MMDiTConceptStream,
    clip_concept_embeddings,
    default_concept_blocks,
    flux_concept_maps,
    mmdit_concept_maps,
)

TEXT = 5
CONCEPTS = 3
BOTH = ["double_block.0", "double_block.1"]


@pytest.fixture(scope="module")
def flux():
    return cs.tiny_flux_model(seed=0)


def conditioning(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 16, generator=g),
            "guidance": torch.full((batch,), 3.5)}


def concept_embeddings(n: int = CONCEPTS) -> torch.Tensor:
    return torch.randn(1, n, 32, generator=torch.Generator().manual_seed(7))


def predict(model, x, sigma, kwargs):
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=dict(
            model.model_options.get("transformer_options", {})), **kwargs)


def recorder(store: dict, index: int):
    """A replace patch another pack could have installed: it keeps the block's inputs and runs it."""
    def patch(args, extra):
        store[index] = {"img": args["img"].clone(), "txt": args["txt"].clone(), "vec": args["vec"].clone(),
                        "pe": args["pe"].clone()}
        store.setdefault("calls", []).append(index)
        return extra["original_block"](args)
    return patch


def with_stream(model, x, kwargs, concepts, blocks, grid, pooled="zero"):
    stream = FluxConceptStream(model.model.diffusion_model, concepts, blocks, grid, y=kwargs.get("y"),
                               pooled=pooled)
    clone = model.clone()
    stream.install(clone)
    return stream, predict(clone, x, 0.6, kwargs)


def test_prediction_and_the_users_model_are_unchanged(flux):
    kwargs = conditioning(2)
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    before = predict(flux, x, 0.6, kwargs)
    options_before = repr(flux.model_options)
    stream, under = with_stream(flux, x, kwargs, concept_embeddings(), BOTH, (3, 5))
    assert torch.equal(under, before)                              # bit for bit
    assert stream.result().shape == (2, 15, CONCEPTS)
    maps = flux_concept_maps(flux, torch.randn(2, 16, 6, 10), kwargs, 0.6, concept_embeddings())
    assert maps.shape == (2, 15, CONCEPTS)
    assert repr(flux.model_options) == options_before             # nothing of ours on the user's patcher
    assert torch.equal(predict(flux, x, 0.6, kwargs), before)



def concept_mask(t: int, c: int, n_all: int, n_image: int | None = None) -> torch.Tensor:
    """Additive mask over [text t | concepts c | image (+ reference) n_all]: nothing attends the
    concepts, the concepts do not attend the text, nor (with ``n_image``) the reference tokens."""
    length = t + c + n_all
    concept = slice(t, t + c)
    mask = torch.zeros(1, 1, length, length)
    mask[..., :t, concept] = float("-inf")
    mask[..., t + c:, concept] = float("-inf")
    mask[..., concept, :t] = float("-inf")
    if n_image is not None:
        mask[..., concept, t + c + n_image:] = float("-inf")
    return mask

def reference_block(block, rec: dict, hidden: torch.Tensor, concept_vec: torch.Tensor, pe_concepts: torch.Tensor,
                    n_image: int):
    """The block's own forward, one image at a time, with the concepts appended to the text as extra
    tokens modulated by their own vector (``modulation_dims``), the image and text unable to attend
    them and they unable to attend the prompt or the reference latents. Returns (concepts after the
    block, the block's image output, this image's map)."""
    b_total, t, c, n_all = rec["img"].shape[0], rec["txt"].shape[1], hidden.shape[1], rec["img"].shape[1]
    concept = slice(t, t + c)
    mask = concept_mask(t, c, n_all, n_image)
    states, images, maps = [], [], []
    for b in range(b_total):
        outputs: list = []

        def keep(func, *args, outputs=outputs, **kwargs):
            out = func(*args, **kwargs)
            outputs.append(out.clone())
            return out
        pe = torch.cat((rec["pe"][b:b + 1, :, :t], pe_concepts, rec["pe"][b:b + 1, :, t:]), dim=2)
        with torch.no_grad():
            img, txt = block(img=rec["img"][b:b + 1].clone(), txt=torch.cat((rec["txt"][b:b + 1], hidden[b:b + 1]), 1),
                             vec=torch.stack((rec["vec"][b], concept_vec[b]))[None], pe=pe, attn_mask=mask,
                             modulation_dims_img=[(0, n_all, 0)], modulation_dims_txt=[(0, t, 0), (t, t + c, 1)],
                             transformer_options={"optimized_attention_override": keep})
        assert len(outputs) == 1
        attn = outputs[0]
        scores = attn[:, t + c:t + c + n_image] @ attn[:, concept].transpose(1, 2)
        states.append(txt[:, t:])
        images.append(img)
        maps.append(torch.softmax(scores, dim=-1))
    return torch.cat(states), torch.cat(images), torch.cat(maps)


# (latent size, Kontext reference latents, batch, pooled vector of the concepts, chosen blocks)
CASES = [((6, 10), False, 2, "zero", BOTH),
         ((8, 4), True, 1, "zero", BOTH),
         ((6, 10), False, 1, "prompt", ["double_block.1"])]


@pytest.mark.parametrize("latent_hw,reference,batch,pooled,blocks", CASES)
def test_the_concept_stream_is_the_blocks_own_text_stream(flux, latent_hw, reference, batch, pooled, blocks):
    """Odd token grid (3x5), reference latents after the image, batch 2, both pooled modes: every
    concept hidden state and the maps equal the independent computation above."""
    net = flux.model.diffusion_model
    kwargs = conditioning(batch)
    if reference:
        kwargs["ref_latents"] = [torch.randn(batch, 16, 4, 4, generator=torch.Generator().manual_seed(5))]
    x = torch.randn(batch, 16, *latent_hw, generator=torch.Generator().manual_seed(4))
    grid = (latent_hw[0] // 2, latent_hw[1] // 2)
    n = grid[0] * grid[1]
    user = flux.clone()
    records: dict = {}
    for i in range(2):
        user.set_model_patch_replace(recorder(records, i), "dit", "double_block", i)
    concepts = concept_embeddings()
    stream, _ = with_stream(user, x, kwargs, concepts, blocks, grid, pooled)
    assert records["calls"] == [0, 1]                              # the other pack's patches ran
    assert records[0]["img"].shape[1] == n + (4 if reference else 0)

    if pooled == "zero":                                           # ConceptAttention: pooled vector of zeros
        zeroed = flux.clone()
        plain: dict = {}
        zeroed.set_model_patch_replace(recorder(plain, 0), "dit", "double_block", 0)
        predict(zeroed, x, 0.6, dict(kwargs, y=torch.zeros_like(kwargs["y"])))
        concept_vec = plain[0]["vec"]
    else:
        concept_vec = records[0]["vec"]
    pe_concepts = net.pe_embedder(torch.zeros(1, CONCEPTS, 3))
    with torch.no_grad():
        hidden = net.txt_in(concepts.expand(batch, -1, -1))
    expected = torch.zeros(batch, n, CONCEPTS)
    for i in range(2):
        hidden, image, maps = reference_block(net.double_blocks[i], records[i], hidden, concept_vec, pe_concepts, n)
        assert torch.allclose(stream.states[i], hidden, atol=1e-5), i
        if i + 1 < 2:                                              # the image never saw the concepts
            assert torch.allclose(image, records[i + 1]["img"], atol=1e-5)
        if f"double_block.{i}" in blocks:
            expected += maps / len(blocks)
    got = stream.result()
    assert got.shape == (batch, n, CONCEPTS)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(batch, n), atol=1e-5)


def test_the_zero_pooled_vector_changes_the_concepts_only(flux):
    kwargs = conditioning()
    x = torch.randn(1, 16, 6, 10)
    zero, pred_zero = with_stream(flux, x, kwargs, concept_embeddings(), BOTH, (3, 5), "zero")
    prompt, pred_prompt = with_stream(flux, x, kwargs, concept_embeddings(), BOTH, (3, 5), "prompt")
    assert torch.equal(pred_zero, pred_prompt)
    assert not torch.allclose(zero.states[0], prompt.states[0])
    no_y, _ = with_stream(flux, x, {k: v for k, v in kwargs.items() if k != "y"}, concept_embeddings(), BOTH,
                          (3, 5), "zero")
    no_y_prompt, _ = with_stream(flux, x, {k: v for k, v in kwargs.items() if k != "y"}, concept_embeddings(),
                                 BOTH, (3, 5), "prompt")
    assert torch.equal(no_y.result(), no_y_prompt.result())       # no pooled vector: vec already has a zero one


def test_a_preinstalled_override_and_replace_patch_still_run(flux):
    kwargs = conditioning(2)
    latents = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(6))
    plain = flux_concept_maps(flux, latents, kwargs, 0.6, concept_embeddings(), BOTH, seed=3)
    user = flux.clone()
    calls: list = []

    def other(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    records: dict = {}
    user.set_model_patch_replace(recorder(records, 1), "dit", "double_block", 1)
    maps = flux_concept_maps(user, latents, kwargs, 0.6, concept_embeddings(), BOTH, seed=3)
    assert len(calls) == 4                                         # 2 double + 2 single blocks
    assert records["calls"] == [1]
    assert torch.equal(maps, plain)
    assert "optimized_attention_override" not in flux.model_options.get("transformer_options", {})


def test_maps_name_segments_like_cross_attention(flux):
    maps = flux_concept_maps(flux, torch.randn(1, 16, 6, 10), conditioning(), 0.6, concept_embeddings())
    level = CrossAttentionLevel((3, 5), 2, maps)
    out = word_maps([level], {"dog": [0], "grass": [1], "sky": [2]}, (48, 80))
    assert out.shape == (1, 3, 48, 80)
    assert torch.allclose(out.sum(1), torch.ones(1, 48, 80), atol=1e-4)


def test_defaults_and_bad_requests(flux):
    assert default_concept_blocks(19) == [f"double_block.{i}" for i in range(15, 19)]
    assert default_concept_blocks(2) == BOTH
    latents, kwargs = torch.randn(1, 16, 6, 10), conditioning()
    with pytest.raises(EmergentSegError, match="not one of this model's double blocks"):
        flux_concept_maps(flux, latents, kwargs, 0.6, concept_embeddings(), ["single_block.0"])
    with pytest.raises(EmergentSegError, match="not one of this model's double blocks"):
        flux_concept_maps(flux, latents, kwargs, 0.6, concept_embeddings(), [5])
    with pytest.raises(EmergentSegError, match="channels"):
        flux_concept_maps(flux, latents, kwargs, 0.6, torch.randn(1, 2, 16))
    with pytest.raises(EmergentSegError, match="sigma must be in"):
        flux_concept_maps(flux, latents, kwargs, 0.0, concept_embeddings())
    with pytest.raises(EmergentSegError, match="not a multiple"):
        flux_concept_maps(flux, torch.randn(1, 16, 5, 10), kwargs, 0.6, concept_embeddings())
    with pytest.raises(UnsupportedModelError, match="not a Flux"):
        flux_concept_maps(cs.tiny_sd3_model(), latents, kwargs, 0.6, concept_embeddings())


# --------------------------------------------------------------------------- SD3 / MMDiT


@pytest.fixture(scope="module")
def sd3():
    return cs.tiny_sd3_model(seed=0)


def sd3_conditioning(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 32, generator=g)}


def mmdit_recorder(store: dict, index: int):
    def patch(args, extra):
        store[index] = {"img": args["img"].clone(), "txt": args["txt"].clone(), "vec": args["vec"].clone()}
        return extra["original_block"](args)
    return patch


def reference_joint_block(block, rec: dict, hidden: torch.Tensor, n_image: int):
    """``_block_mixing`` written out with the concepts appended to the context and a mask (the image
    and the prompt cannot attend them; they attend only themselves and the image)."""
    from comfy.ldm.modules.attention import optimized_attention

    cb, xb = block.context_block, block.x_block
    t, c, n_all = rec["txt"].shape[1], hidden.shape[1], rec["img"].shape[1]
    concept = slice(t, t + c)
    mask = concept_mask(t, c, n_all)
    with torch.no_grad():
        c_qkv, c_inter = cb.pre_attention(torch.cat((rec["txt"], hidden), 1), rec["vec"])
        x_qkv = xb.pre_attention_x(rec["img"], rec["vec"])[0] if xb.x_block_self_attn else \
            xb.pre_attention(rec["img"], rec["vec"])[0]
        q, k, v = (torch.cat((c_qkv[j], x_qkv[j]), dim=1) for j in range(3))
        attn = optimized_attention(q, k, v, heads=xb.attn.num_heads, mask=mask)
        state = hidden if cb.pre_only else cb.post_attention(attn[:, :t + c], *c_inter)[:, t:]
    maps = torch.softmax(attn[:, t + c:t + c + n_image] @ attn[:, concept].transpose(1, 2), dim=-1)
    return state, maps


@pytest.mark.parametrize("batch,blocks", [(2, None), (1, ["double_block.1"])])
def test_mmdit_concept_stream_and_maps(sd3, batch, blocks):
    """SD3.5-style block 1 (extra image-only attention, ``pre_only`` context): prediction untouched,
    stream and maps equal to the written-out block, odd grid, default = every joint block."""
    net = sd3.model.diffusion_model
    kwargs = sd3_conditioning(batch)
    x = torch.randn(batch, 16, 6, 10, generator=torch.Generator().manual_seed(4))
    before = predict(sd3, x, 0.6, kwargs)
    user = sd3.clone()
    records: dict = {}
    for i in range(2):
        user.set_model_patch_replace(mmdit_recorder(records, i), "dit", "double_block", i)
    concepts = concept_embeddings()
    stream = MMDiTConceptStream(net, concepts, blocks, (3, 5))
    clone = user.clone()
    stream.install(clone)
    assert torch.equal(predict(clone, x, 0.6, kwargs), before)
    assert stream.chosen == ((0, 1) if blocks is None else (1,))
    with torch.no_grad():
        hidden = net.context_embedder(concepts.expand(batch, -1, -1))
    expected = torch.zeros(batch, 15, CONCEPTS)
    for i in range(2):
        hidden, maps = reference_joint_block(net.joint_blocks[i], records[i], hidden, 15)
        assert torch.allclose(stream.states[i], hidden, atol=1e-5), i
        if i in stream.chosen:
            expected += maps / len(stream.chosen)
    got = stream.result()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(batch, 15), atol=1e-5)
    maps = mmdit_concept_maps(sd3, torch.randn(batch, 16, 6, 10), kwargs, 0.6, concepts, blocks)
    assert maps.shape == (batch, 15, CONCEPTS)
    assert "patches_replace" not in sd3.model_options.get("transformer_options", {})
    with pytest.raises(UnsupportedModelError, match="not an SD3"):
        mmdit_concept_maps(cs.tiny_flux_model(), torch.randn(1, 16, 6, 10), conditioning(), 0.6, concepts)


class FakeClip:
    """Stands in for a ComfyUI CLIP of Flux: tokens as ``(id, weight, word_id)``, T5 without a start
    token and padded, the context row ``i`` filled with ``i`` (+ 100 per word seen)."""

    def __init__(self, pieces: dict[str, int], context: int = 32, length: int = 6):
        self.pieces, self.context, self.length, self.seen = pieces, context, length, 0

    def tokenize(self, text, return_word_ids=False):
        n = self.pieces[text]
        t5 = [(10 + j, 1.0, 1) for j in range(n)] + [(1, 1.0, 0)]
        t5 += [(0, 1.0, 0)] * (self.length - len(t5))
        return {"l": [[(49406, 1.0, 0), (5, 1.0, 1), (49407, 1.0, 0)]], "t5xxl": [t5]}

    def encode_from_tokens(self, tokens):
        self.seen += 1
        rows = torch.arange(len(tokens["t5xxl"][0]), dtype=torch.float32) + 100 * self.seen
        return rows.view(1, -1, 1).expand(1, -1, self.context).clone()


def test_clip_concept_embeddings_shapes_with_a_fake_clip():
    emb = clip_concept_embeddings(FakeClip({"dog": 1, "skateboard": 3}), ["dog", "skateboard"])
    assert emb.shape == (1, 2, 32)
    assert emb[0, :, 0].tolist() == [100.0, 200.0]                 # each word's first own token
    mean = clip_concept_embeddings(FakeClip({"skateboard": 3}), ["skateboard"], reduce="mean")
    assert mean[0, 0, 0].item() == pytest.approx(101.0)            # rows 0, 1, 2
    with pytest.raises(EmergentSegError, match="does not line up"):
        clip_concept_embeddings(FakeClip({"dog": 1}), ["dog"], key="l")
    with pytest.raises(EmergentSegError, match="at least one"):
        clip_concept_embeddings(FakeClip({}), [])
