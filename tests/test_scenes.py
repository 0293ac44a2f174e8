"""The synthetic scene generator, the word tokenizer/text encoder and the fixture model files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emergent_seg.core.metrics import score_instances
from emergent_seg.fixture.scenes import (CAPTION_WORDS, EVAL_SEED, PALETTE, SHAPES, TEXTURES, make_scene,
                                         make_scenes, stack)
from emergent_seg.fixture.text import BOS, EOS, UNK, TinyTextEncoder, caption_tokenizer
from emergent_seg.core.backends.word_text import WordTokenizer


@pytest.fixture(scope="module")
def scenes() -> list:
    return make_scenes(100, EVAL_SEED)


def test_deterministic_per_seed() -> None:
    a, b = make_scene(1234), make_scene(1234)
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    assert (a.caption, a.words, a.textures, a.pairs) == (b.caption, b.words, b.textures, b.pairs)
    c = make_scene(1235)
    assert not torch.equal(a.image, c.image)


def test_make_scenes_is_consecutive_seeds() -> None:
    batch = make_scenes(3, seed=77, size=24)
    for i, s in enumerate(batch):
        ref = make_scene(77 + i, 24)
        assert s.seed == 77 + i and torch.equal(s.image, ref.image) and s.caption == ref.caption
    images, labels = stack(batch)
    assert images.shape == (3, 3, 24, 24) and labels.shape == (3, 24, 24)


def test_seed_out_of_range() -> None:
    with pytest.raises(ValueError):
        make_scene(-1)
    with pytest.raises(ValueError):
        make_scene(2**32)


@pytest.mark.parametrize("size", [32, 64, 17])
def test_shapes_dtypes_and_label_ids(size: int) -> None:
    for seed in range(20):
        s = make_scene(seed, size)
        assert s.image.shape == (3, size, size) and s.image.dtype == torch.float32
        assert float(s.image.min()) >= 0.0 and float(s.image.max()) <= 1.0
        assert s.labels.shape == (size, size) and s.labels.dtype == torch.int64
        n = s.num_instances
        assert 1 <= n <= 4
        assert len(s.words) == len(s.phrases) == len(s.textures) == len(s.pairs) == n + 1
        assert s.words[0] == "background"
        # ids 0..n with no gaps: every instance keeps visible pixels
        assert torch.unique(s.labels).tolist() == list(range(n + 1))


def test_layout_is_resolution_independent() -> None:
    for seed in range(10):
        small, large = make_scene(seed, 32), make_scene(seed, 128)
        assert small.caption == large.caption
        down = large.labels[2::4, 2::4]  # nearest samples at the 32-grid pixel centres
        assert (down == small.labels).float().mean() > 0.9


def test_captions_name_every_region(scenes: list) -> None:
    for s in scenes:
        for w in s.words[1:]:
            assert w in SHAPES and w in s.caption.split()
        for phrase in s.phrases[1:]:
            assert phrase in s.caption
        assert s.caption.endswith(f"on {s.phrases[0]}")
        assert s.caption.count(" and ") == s.num_instances - 1
        assert set(s.caption.split()) <= set(CAPTION_WORDS)
    s = make_scene(3)
    assert s.caption == " and ".join(s.phrases[1:]) + " on " + s.phrases[0]


def test_regions_have_distinct_textures(scenes: list) -> None:
    for s in scenes:
        assert len(set(s.textures)) == len(s.textures)
        assert set(s.textures) <= set(TEXTURES)


def test_variety(scenes: list) -> None:
    assert {n for s in scenes for n in [s.num_instances]} == {1, 2, 3, 4}
    assert {w for s in scenes for w in s.words[1:]} == set(SHAPES)
    assert {t for s in scenes for t in s.textures} == set(TEXTURES)
    assert {p for s in scenes for p in s.pairs} == set(range(len(PALETTE)))


def test_colour_pairs_are_shared_and_region_means_coincide(scenes: list) -> None:
    from emergent_seg.fixture.scenes import PHOTOS

    shared = [len(set(s.pairs)) < len(s.pairs) for s in scenes]
    assert np.mean(shared) > 0.8
    gaps = []
    for s in scenes:
        means = [s.image[:, s.labels == i].mean(1) for i in range(s.num_instances + 1)]
        for i in range(len(means)):
            for j in range(i + 1, len(means)):
                if s.pairs[i] == s.pairs[j] and s.textures[i] not in PHOTOS and s.textures[j] not in PHOTOS:
                    gaps.append(float((means[i] - means[j]).abs().max()))
    # Regions drawn with the same pair have (nearly) the same mean colour, while the two colours
    # of a pair are far apart.
    assert np.mean(gaps) < 0.08
    contrast = min(float(np.abs(np.subtract(a, b)).max()) for a, b in PALETTE)
    assert contrast > 0.5


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 3) -> np.ndarray:
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = x[rng.choice(len(x), size=k, replace=False)]
        for _ in range(50):
            labels = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        cost = ((x - centres[labels]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = labels, cost
    assert best is not None
    return best


def test_colour_kmeans_with_true_k_cannot_solve_the_task() -> None:
    rng = np.random.default_rng(0)
    scenes = make_scenes(50, EVAL_SEED)
    preds = []
    for s in scenes:
        pixels = s.image.reshape(3, -1).T.numpy().astype(np.float64)
        preds.append(_kmeans(pixels, s.num_instances + 1, rng).reshape(s.labels.shape))
    result = score_instances(preds, [s.labels for s in scenes])
    assert result["miou"] < 0.6  # measured about 0.23


# -- tokenizer and text encoder ------------------------------------------------------------------

def test_tokenizer_layout() -> None:
    tok = caption_tokenizer()
    ids, tokens = tok.tokenize("Dotted circle ON checkered background!")
    assert ids.dtype == torch.int64 and ids.shape == (tok.context_length,)
    assert tokens[:6] == [BOS, "dotted", "circle", "on", "checkered", "background"]
    assert tokens[6:] == [EOS] * (tok.context_length - 6)  # padded with EOS, as CLIP does
    assert [tok.vocab[i] for i in ids.tolist()] == tokens
    empty_ids, empty_tokens = tok.tokenize("")
    assert empty_tokens == [BOS] + [EOS] * (tok.context_length - 1)
    assert tok.tokenize("purple elephant")[1][1:3] == [UNK, UNK]
    long_tokens = tok.tokenize(" ".join(["circle"] * 100))[1]
    assert len(long_tokens) == tok.context_length and long_tokens[-1] == EOS
    assert tok(["circle", "square"]).shape == (2, tok.context_length)


def test_every_caption_fits_the_context(scenes: list) -> None:
    tok = caption_tokenizer()
    for s in scenes:
        tokens = tok.tokenize(s.caption)[1]
        assert UNK not in tokens
        assert tokens[1:1 + len(s.caption.split())] == s.caption.split()


def test_tokenizer_config_round_trip() -> None:
    tok = caption_tokenizer(context_length=20)
    again = WordTokenizer.from_config(json.loads(json.dumps(tok.to_config())))
    assert again.vocab == tok.vocab and again.context_length == 20


def test_text_encoder_shape_and_causality() -> None:
    tok = caption_tokenizer()
    torch.manual_seed(0)
    enc = TinyTextEncoder(tok.vocab_size, width=16, layers=1, heads=2, context_length=tok.context_length).eval()
    a = tok(["dotted circle on noisy background", "dotted square on noisy background"])
    with torch.no_grad():
        out = enc(a)
    assert out.shape == (2, tok.context_length, 16)
    # Causal like CLIP: positions before the first differing word ("circle"/"square") agree.
    torch.testing.assert_close(out[0, :2], out[1, :2])
    assert not torch.allclose(out[0, 2], out[1, 2])


# -- the miniature SD ------------------------------------------------------------------------------

def test_mini_sd_has_sd_layout_and_attention_at_32_16_8_and_mid() -> None:
    from emergent_seg.fixture.model import UNET_CONFIG, VAE_CONFIG, alphas_cumprod, build_unet

    assert UNET_CONFIG["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert UNET_CONFIG["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert VAE_CONFIG["latent_channels"] == 4 and len(VAE_CONFIG["block_out_channels"]) == 4  # f = 8
    torch.manual_seed(0)
    unet = build_unet().eval()
    grids: list[int] = []

    def hook(module, args, kwargs, out):  # noqa: ANN001
        grids.append(int((args[0] if args else kwargs["hidden_states"]).shape[1]))

    handles = [m.register_forward_hook(hook, with_kwargs=True)
               for name, m in unet.named_modules() if name.endswith("attn1")]
    try:
        with torch.no_grad():
            out = unet(torch.zeros(1, 4, 32, 32), 300, torch.zeros(1, 4, UNET_CONFIG["cross_attention_dim"])).sample
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (1, 4, 32, 32)
    assert set(grids) == {32 * 32, 16 * 16, 8 * 8, 4 * 4}
    acp = alphas_cumprod()
    assert acp.shape == (1000,)
    # SD1.x: sigma(300) = sqrt((1 - acp) / acp) ~ 0.8328
    assert float(((1 - acp[300]) / acp[300]).sqrt()) == pytest.approx(0.8328, abs=1e-3)


def test_shipped_model_loads_like_a_users_diffusers_folder() -> None:
    from emergent_seg.core.backends.loading import EMBEDDED_MODEL, load_backend, load_diffusers_folder
    from emergent_seg.core.emerdiff import choose_site

    if not (EMBEDDED_MODEL / "unet" / "diffusion_pytorch_model.safetensors").exists():
        pytest.fail("the embedded model is missing from fixture/weights")
    backend = load_backend(None)
    assert type(backend) is type(load_diffusers_folder(EMBEDDED_MODEL, torch.device("cpu"), torch.float32))
    assert backend.latent_scale == 8 and backend.vae is not None and backend.size_multiple() == 64
    assert backend.calibration["native_size"] == 256
    # EmerDiff's grid is 1/32 of the image: 8x8 at 256 px, as SD1.x's 16x16 at 512 px
    assert choose_site(backend, (32, 32)).grid((32, 32)) == (8, 8)
    scene = make_scene(EVAL_SEED, 256)
    latents = backend.encode(scene.image[None])
    assert latents.shape == (1, 4, 32, 32)
    # the stored scaling factor makes the latents about unit variance, as SD's 0.18215 does
    assert 0.5 < float(latents.std()) < 2.0
    eps = backend.predict_noise(latents, torch.tensor([300]), backend.empty_conditioning())
    assert eps.shape == (1, 4, 32, 32) and torch.isfinite(eps).all()
    decoded = backend.decode(latents)
    assert decoded.shape == (1, 3, 256, 256)
    psnr = 10 * torch.log10(1 / ((decoded - scene.image[None]) ** 2).mean())
    assert psnr > 16, f"autoencoder reconstruction PSNR {float(psnr):.1f} dB"
