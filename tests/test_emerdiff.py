"""EmerDiff invariants on tiny random UNets with the SD1.x/SDXL layouts.

The tiny backends have no VAE (latent_scale 1, decode = clamp((x+1)/2)), 32x32 latents, so the
"16x16" decoder site is the stride-2 level. Everything runs 1-2 denoising steps and K <= 3.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from emergent_seg.core import emerdiff as E
from emergent_seg.core.attention import explicit_attention
from emergent_seg.core.backend import PassHooks, Progress
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.errors import (
    EmergentSegError,
    Interrupted,
    UnsupportedModelError,
)
from emergent_seg.core.segmentation import Segmentation
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_conditioning, tiny_backend

HW = (32, 32)
#: The mechanics tests below run the tiny pixel-space UNet on a 32x32 input and modulate its 16x16
#: decoder grid (the grid SD1.x has at 512 px); the default, auto grid is tested on its own.
GRID = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd15() -> DiffusersBackend:
    return tiny_backend("sd15")


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    # small values keep the identity decoder's clamp to [0, 1] mostly unsaturated
    return 0.5 * torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(0))


def _masks() -> torch.Tensor:
    """[top-left quadrant, an all-zero mask]."""
    m = torch.zeros(2, 16, 16)
    m[0, :8, :8] = 1
    return m


# Bit-exact invariants need every member's arithmetic to be independent of its batch position.
# On CPU that holds for the first 4 members only: the UNet's time-embedding GEMM has M = batch and
# MKL computes rows in blocks of 4, so a member at position >= 4 can differ by an ulp (measured:
# 1.3e-6 in eps). Exact tests therefore use chunks of <= 4 members; the chunking test shows the
# larger-batch difference stays at rounding level.
EXACT_BATCH = 3


@pytest.fixture(scope="module")
def fast_maps(sd15, latent) -> E.DifferenceMaps:
    return E.difference_maps(sd15, latent, _masks(), lam=10.0, steps=E.FAST_STEPS, max_batch=EXACT_BATCH, grid=GRID)


# ---------------------------------------------------------------------------------------------
# site choice
# ---------------------------------------------------------------------------------------------

def test_choose_site_picks_the_decoder_grid_at_one_32nd_of_the_image(sd15):
    # auto (grid 0): 1/32 of the image side. Sites given as a list are read as an f = 8 latent
    # model's. SD1.5 at 512 px (64x64 latent): the paper's up_blocks[1].attentions[0]...attn2, 16x16
    sites = sd15.sites()
    site = E.choose_site(sites, (64, 64))
    assert site.key == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert (site.stage, site.kind, site.depth, site.grid((64, 64))) == ("up", "cross", 0, (16, 16))
    # 256 px (32x32 latent): the 8x8 grid, the same 1/32 ratio (the embedded model's choice)
    assert E.choose_site(sites, HW).grid(HW) == (8, 8)
    # 768 px (96x96 latent): 24x24
    assert E.choose_site(sites, (96, 96)).grid((96, 96)) == (24, 24)
    # this pixel-space backend (latent = image): 1/32 of a 256 px image is 8 -> the 8x8 grid
    # an explicit grid picks the nearest decoder grid to it
    site = E.choose_site(sd15, HW, grid=16)
    assert site.key == "up_blocks.2.attentions.0.transformer_blocks.0.attn2" and site.grid(HW) == (16, 16)
    assert E.choose_site(sd15, HW, grid=16, layer=2).key == "up_blocks.2.attentions.2.transformer_blocks.0.attn2"
    # nearest grid when no 16x16 exists: 48x48 latent -> grids 24/12/6 -> 12x12 is nearest (log scale)
    assert E.choose_site(sd15, (48, 48), grid=16).grid((48, 48)) == (12, 12)
    sdxl = tiny_backend("sdxl")
    s = E.choose_site(sdxl, HW, grid=16, depth=1)
    assert s.key == "up_blocks.1.attentions.0.transformer_blocks.1.attn2" and s.grid(HW) == (16, 16)
    assert E.choose_site(sdxl.sites(), (128, 128)).grid((128, 128)) == (32, 32)  # SDXL at 1024 px: 32x32
    with pytest.raises(EmergentSegError, match="layer 3 does not exist"):
        E.choose_site(sd15, HW, layer=3)
    with pytest.raises(EmergentSegError, match="depth 1 does not exist"):
        E.choose_site(sd15, HW, depth=1)


def test_model_without_decoder_cross_attention_is_rejected():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
        cross_attention_dim=16, attention_head_dim=4).eval()
    backend = DiffusersBackend(unet, encode_prompt=lambda p: random_conditioning(unet))
    with pytest.raises(UnsupportedModelError, match="no cross-attention layers in its decoder"):
        E.choose_site(backend, HW, grid=GRID)
    with pytest.raises(UnsupportedModelError):
        E.lowres_kmeans(backend, torch.zeros(1, 4, *HW), k=2, grid=GRID)


# ---------------------------------------------------------------------------------------------
# low-res segmentation
# ---------------------------------------------------------------------------------------------

def test_features_are_the_queries_of_the_chosen_site(sd15, latent):
    site = E.choose_site(sd15, HW, grid=GRID)
    module = sd15._modules[site.key]
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        feats = E.extract_features(sd15, latent, timestep=1, seed=3, grid=GRID)
    finally:
        handle.remove()
    assert len(seen) == 1  # norm2(h), the attn2 input
    with torch.no_grad():
        expected = module.to_q(seen[0])
    assert feats.features.shape == (1, 256, expected.shape[-1]) and feats.grid == (16, 16)
    assert torch.equal(feats.features, expected.float())
    assert feats.site == site and feats.timestep == 1 and feats.evaluations == 1


def test_kmeans_masks_partition_are_seeded_and_recover_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = 10 * torch.randn(3, 8, generator=g)
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[:, 6:] = 1
    truth[10:, :] = 2
    feats = centers[truth.view(-1)] + 0.1 * torch.randn(256, 8, generator=g)
    batch = torch.stack([feats, feats.flip(0)])  # batched over images
    labels = E.kmeans_labels(batch, (16, 16), k=3, seed=7)
    assert labels.shape == (2, 16, 16)
    assert torch.equal(labels, E.kmeans_labels(batch, (16, 16), k=3, seed=7))
    for b in range(2):
        _, masks = E.label_masks(labels[b])
        assert torch.equal(masks.sum(0), torch.ones(16, 16))          # sum_i M^i = 1
        assert masks.shape[0] == 3
    # planted clusters recovered exactly (up to relabelling)
    pairs = {(int(a), int(b)) for a, b in zip(truth.view(-1), labels[0].view(-1))}
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3
    flipped = truth.view(-1).flip(0)                       # image 1 holds the points in reverse order
    pairs = {(int(a), int(b)) for a, b in zip(flipped, labels[1].view(-1))}
    assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3
    with pytest.raises(EmergentSegError, match="has only 256 cells"):
        E.kmeans_labels(batch, (16, 16), k=257)


def test_lowres_kmeans_segmentation(sd15, latent):
    two = torch.cat([latent, latent.flip(-1)])
    seg = E.lowres_kmeans(sd15, two, k=4, seed=1, grid=GRID)
    assert isinstance(seg, Segmentation) and seg.labels.shape == (2, *HW) and seg.lowres.shape == (2, 16, 16)
    assert seg.info["grid"] == [16, 16] and seg.info["evaluations"] == 2 and seg.method == "emerdiff-kmeans"
    assert all(c <= 4 for c in seg.counts)
    # labels = the grid upsampled (nearest)
    assert torch.equal(seg.labels, E.upsample_labels(seg.lowres, HW))
    # one image alone gives the same result as in the batch (shared noise sample, per-item k-means)
    alone = E.lowres_kmeans(sd15, two[1:], k=4, seed=1, grid=GRID)
    assert torch.equal(alone.lowres[0], seg.lowres[1])
    with pytest.raises(EmergentSegError, match="K = 257 segments requested but the 16x16"):
        E.lowres_kmeans(sd15, latent, k=257, grid=GRID)


def test_pool_labels_majority_vote():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 5          # whole cell (0,0) of a 2x2 grid
    labels[0, :2, 4:] = 3          # half of cell (0,1): tie 3 vs 0 -> lowest id 0
    labels[0, 4:, 4:7] = 9         # 12 of 16 -> 9
    labels[0, 7, 0] = 7            # one pixel: lost at 2x2
    pooled = E.pool_labels(labels, 2)
    assert pooled.tolist() == [[[5, 0], [0, 9]]]
    assert 7 not in pooled and 3 not in pooled
    # sizes need not divide: 9x7 onto 2x3, each pixel in exactly one cell
    odd = torch.arange(63).view(1, 9, 7) % 2
    assert E.pool_labels(odd, (2, 3)).shape == (1, 2, 3)
    # grid = full resolution is the identity
    assert torch.equal(E.pool_labels(labels, 8), labels)
    seg = Segmentation.from_labels(labels)
    assert torch.equal(E.lowres_from_segmentation(seg, (2, 2)), E.pool_labels(seg.labels, 2))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4),
       st.integers(0, 2**31 - 1), st.integers(-3, 1000))
def test_pool_labels_matches_a_naive_mode(b, hh, ww, gh, gw, seed, offset):
    gh, gw = min(gh, hh), min(gw, ww)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (b, hh, ww), generator=g) * 7 + offset
    pooled = E.pool_labels(labels, (gh, gw))
    for i in range(b):
        for cy in range(gh):
            for cx in range(gw):
                cell = [int(labels[i, y, x]) for y in range(hh) for x in range(ww)
                        if y * gh // hh == cy and x * gw // ww == cx]
                best = max(cell.count(v) for v in cell)
                assert int(pooled[i, cy, cx]) == min(v for v in cell if cell.count(v) == best)


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------

def test_reference_attention_equals_explicit_attention_with_replaced_probs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, n, 32, generator=g) for n in (64, 77, 77))
    got = E.reference_attention(q, k, v, 4, ref=0, budget_bytes=5000)
    want = explicit_attention(q, k, v, 4, replace_probs=lambda s, p: p[:1].expand_as(p), budget_bytes=5000)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # identical members get bit-identical outputs
    vv = v.clone()
    vv[3] = vv[0]
    out = E.reference_attention(q, k, vv, 4)
    assert torch.equal(out[3], out[0])


def test_output_hook_is_noop_elsewhere_and_zero_is_no_patch(sd15, latent):
    site = E.choose_site(sd15, HW, grid=GRID)
    other = E.choose_site(sd15, HW, layer=1, grid=GRID)
    masks = torch.ones(1, 256)
    hook = E.modulation_hook(site, masks, torch.tensor([10.0]))
    x = torch.randn(1, 256, 8)
    assert hook(other, x) is x
    assert torch.equal(hook(site, x), x + 10.0)
    t = torch.tensor([281])
    cond = sd15.empty_conditioning()
    plain = sd15.predict_noise(latent, t, cond)
    zero = sd15.predict_noise(latent, t, cond, PassHooks(output={site.key: E.modulation_hook(
        site, masks, torch.tensor([0.0]))}))
    assert torch.equal(plain, zero)


class _Spy:
    """A backend stand-in that records each pass's inputs and hooks and predicts zero noise."""

    def __init__(self, inner: DiffusersBackend) -> None:
        self.inner, self.latent_scale, self.calls = inner, inner.latent_scale, []

    def sites(self):
        return self.inner.sites()

    def size_multiple(self):
        return self.inner.size_multiple()

    def alphas_cumprod(self):
        return self.inner.alphas_cumprod()

    def empty_conditioning(self):
        return self.inner.empty_conditioning()

    def decode(self, latents):
        return self.inner.decode(latents)

    def predict_noise(self, latents, timesteps, cond, hooks=None):
        self.calls.append((latents.clone(), timesteps.clone(), hooks or PassHooks()))
        return torch.zeros_like(latents)


@pytest.mark.parametrize("inject_all_steps", [True, False])
def test_modulation_only_at_t_m_and_injection_schedule(sd15, latent, inject_all_steps):
    spy = _Spy(sd15)
    site = E.choose_site(sd15, HW, grid=GRID)
    x_t = E.add_noise(sd15, latent, 281, seed=0)
    E.run_modulated(spy, x_t, site, _masks(), torch.tensor([10.0, -10.0]), [281, 141, 1],
                    inject="self", inject_all_steps=inject_all_steps)
    assert [int(c[1][0]) for c in spy.calls] == [281, 141, 1]
    first = spy.calls[0]
    assert all(torch.equal(first[0][j], first[0][0]) for j in range(3))  # same noisy latent for all
    assert list(first[2].output) == [site.key]
    n_self = sum(s.kind == "self" for s in sd15.sites())
    assert len(first[2].attention) == n_self
    for call in spy.calls[1:]:
        assert not call[2].output                                      # modulation at t_m only
        assert len(call[2].attention) == (n_self if inject_all_steps else 0)
    spy.calls.clear()
    E.run_modulated(spy, x_t, site, _masks(), torch.tensor([1.0, 1.0]), [281], inject="none",
                    reference=False)
    assert spy.calls[0][0].shape[0] == 2 and not spy.calls[0][2].attention


@pytest.mark.parametrize("inject,timesteps", [("all", [281, 1]), ("cross", [281])])
def test_injection_identity_unmodulated_member_equals_reference(sd15, latent, inject, timesteps):
    site = E.choose_site(sd15, HW, grid=GRID)
    x_t = E.add_noise(sd15, latent, 281, seed=0)
    out = E.run_modulated(sd15, x_t, site, _masks()[[0, 0]], torch.tensor([10.0, 0.0]),
                          timesteps, inject=inject)
    assert out.shape == (3, 4, *HW)
    assert torch.equal(out[2], out[0])                  # c = 0 member is bit-identical to the reference
    assert not torch.equal(out[1], out[0])


# ---------------------------------------------------------------------------------------------
# difference maps
# ---------------------------------------------------------------------------------------------

def test_lambda_zero_and_empty_mask_give_zero_maps(sd15, latent, fast_maps):
    zero = E.difference_maps(sd15, latent, _masks()[:1], lam=0.0, steps=E.FAST_STEPS, grid=GRID)
    assert zero.maps.shape == (1, *HW)
    assert torch.count_nonzero(zero.maps) == 0                         # [ref, +0*M, -0*M]
    assert torch.count_nonzero(fast_maps.maps[1]) == 0                 # all-zero M -> d = 0
    assert fast_maps.maps[0].max() > 0
    # counts: chunks [ref, +M0, +M1] and [ref, -M0, -M1] at 1 step, 4 decodes
    assert (fast_maps.evaluations, fast_maps.unet_passes, fast_maps.decodes, fast_maps.chunks) == (6, 2, 4, 2)


def test_swapping_signs_gives_the_same_map(sd15, latent, fast_maps):
    swapped = E.difference_maps(sd15, latent, _masks(), lam=-10.0, steps=E.FAST_STEPS, max_batch=EXACT_BATCH, grid=GRID)
    assert torch.equal(swapped.maps, fast_maps.maps)


def test_modulation_acts_mostly_inside_the_mask_footprint(fast_maps):
    # Random weights, so only a sanity bound: the mapped footprint is local convs + residuals;
    # injected self-attention (near-uniform in a random UNet) spreads a weak global offset.
    # Measured: 48 % of the mass of d inside a footprint of 25 % of the pixels.
    d = fast_maps.maps[0]
    footprint = torch.zeros(*HW)
    footprint[:16, :16] = 1
    inside = float((d * footprint).sum() / d.sum())
    area = float(footprint.mean())
    assert inside > 1.5 * area
    assert float(d[:16, :16].mean()) > 2.0 * float(d[16:, 16:].mean())


def test_chunking_does_not_change_the_maps(sd15, latent):
    m = torch.zeros(1, 16, 16)
    m[0, :8] = 1
    one = E.difference_maps(sd15, latent, m, lam=10.0, steps=2, max_batch=3, grid=GRID)   # [ref, +M, -M]
    two = E.difference_maps(sd15, latent, m, lam=10.0, steps=2, max_batch=2, grid=GRID)   # [ref, +M], [ref, -M]
    assert (one.chunks, two.chunks) == (1, 2)
    assert (one.evaluations, two.evaluations) == (6, 8)
    assert one.timesteps == (281, 1)
    torch.testing.assert_close(two.maps, one.maps, atol=1e-5, rtol=1e-4)
    assert one.maps.max() > 1e-3


def test_one_sided_difference(sd15, latent):
    zero = E.difference_maps(sd15, latent, _masks()[:1], lam=0.0, steps=E.FAST_STEPS, difference="one_sided", grid=GRID)
    assert torch.count_nonzero(zero.maps) == 0 and zero.evaluations == 2 and zero.decodes == 2


def test_smooth_and_assign():
    d = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(E.smooth(d, 0.0), d)
    s = E.smooth(d, 1.5)
    assert s.shape == d.shape and s.std() < d.std()
    flat = torch.full((3, 4, 4), 0.5)
    flat[2, 0, 0] = 0.9
    flat[1, 1, 1] = 0.9
    flat[2, 1, 1] = 0.9                                                  # tie -> lowest index
    a = E.assign(flat)
    assert a[0, 0] == 2 and a[1, 1] == 1 and a[3, 3] == 0
    assert torch.equal(E.assign(d), d.argmax(0))


def test_denoise_timesteps():
    assert E.denoise_timesteps(281, E.PAPER_STEPS) == list(range(281, 0, -20))
    assert E.denoise_timesteps(281, E.FAST_STEPS) == [281]
    assert len(E.denoise_timesteps(281, 15)) == 15
    with pytest.raises(EmergentSegError):
        E.denoise_timesteps(281, 0)


# ---------------------------------------------------------------------------------------------
# the mapper
# ---------------------------------------------------------------------------------------------

def test_mapper_assigns_per_pixel_argmax_of_smoothed_maps(sd15, latent):
    lowres = torch.full((1, 16, 16), 9, dtype=torch.long)
    lowres[0, 8:, 4:] = 2
    seg = E.modulated_denoise_mapper(sd15, latent, lowres, E.EmerDiffSettings(
        quality="faithful", steps=E.FAST_STEPS, sigma=1.0, max_batch=EXACT_BATCH, grid=GRID), method="test")
    assert seg.labels.shape == (1, *HW) and seg.method == "test"
    assert seg.info["grid"] == [16, 16] and seg.info["site"].startswith("up_blocks.2.attentions.0")
    assert seg.info["evaluations"] == 6 and seg.info["vae_decodes"] == 4 and seg.info["steps"] == 1
    assert seg.info["chunks"] == 2
    assert seg.info["segments"] == [2]
    ids, masks = E.label_masks(lowres[0])
    dm = E.difference_maps(sd15, latent, masks, steps=E.FAST_STEPS, max_batch=EXACT_BATCH, grid=GRID)
    want = ids[E.assign(E.smooth(dm.maps, 1.0))]
    assert torch.equal(Segmentation.from_labels(want.unsqueeze(0)).labels, seg.labels)
    assert torch.equal(seg.lowres, Segmentation.from_labels(lowres).labels)


def test_mapper_accepts_pooled_labels_and_drops_lost_segments(sd15, latent):
    full = torch.zeros(1, *HW, dtype=torch.long)
    full[0, :, 16:] = 1
    full[0, 0, 0] = 2                                   # one pixel: lost at 16x16
    seg = Segmentation.from_labels(full, method="diffseg")
    low = E.lowres_from_segmentation(seg, (16, 16))
    assert set(low.unique().tolist()) == {0, 1}
    out = E.modulated_denoise_mapper(sd15, latent, low, E.EmerDiffSettings(
        quality="faithful", steps=E.FAST_STEPS, max_batch=EXACT_BATCH, grid=GRID), method="diffseg+mapper")
    assert out.counts[0] <= 2 and out.info["segments"] == [2] and out.info["evaluations"] == 6
    assert out.method == "diffseg+mapper" and out.labels.shape == (1, *HW)


def test_mapper_bad_inputs(sd15, latent):
    low = torch.zeros(1, 16, 16, dtype=torch.long)
    with pytest.raises(EmergentSegError, match="lambda must be non-zero"):
        E.modulated_denoise_mapper(sd15, latent, low, E.EmerDiffSettings(lam=0.0, grid=GRID))
    with pytest.raises(EmergentSegError, match="works on a 16x16 grid"):
        E.modulated_denoise_mapper(sd15, latent, torch.zeros(1, 8, 8, dtype=torch.long), E.EmerDiffSettings(grid=GRID))
    with pytest.raises(EmergentSegError, match="integer labels"):
        E.modulated_denoise_mapper(sd15, latent, low.float(), E.EmerDiffSettings(grid=GRID))
    with pytest.raises(EmergentSegError, match="injection mode"):
        E.modulated_denoise_mapper(sd15, latent, low, E.EmerDiffSettings(inject="some", grid=GRID))
    with pytest.raises(EmergentSegError, match="t_m"):
        E.modulated_denoise_mapper(sd15, latent, low, E.EmerDiffSettings(t_m=1000, grid=GRID))


def test_emerdiff_end_to_end_sdxl_layout_progress_and_cancel(latent):
    backend = tiny_backend("sdxl")
    updates = []
    progress = Progress(on_update=lambda done, total: updates.append((done, total)))
    seg = E.emerdiff(backend, latent, E.EmerDiffSettings(clusters=2, quality="faithful", steps=E.FAST_STEPS, grid=GRID),
                     progress=progress)
    assert seg.labels.shape == (1, *HW) and seg.method == "emerdiff" and 1 <= seg.counts[0] <= 2
    assert seg.info["evaluations"] == 1 + 5 and seg.info["feature_evaluations"] == 1
    assert seg.info["mapper_evaluations"] == 5 and seg.info["k"] == 2
    # units: feature pass, 1 UNet pass, 1 decode chunk
    assert updates[-1] == (3, 3)
    polls = []

    def cancelled() -> bool:  # cancel on the third poll, i.e. inside the mapper
        polls.append(1)
        return len(polls) >= 3
    cancel = Progress(is_cancelled=cancelled)
    with pytest.raises(Interrupted):
        E.emerdiff(backend, latent, E.EmerDiffSettings(clusters=2, quality="faithful", steps=2, grid=GRID),
                   progress=cancel)


def test_plan_counts():
    paper = E.plan(20, E.PAPER_STEPS, features=True)
    fast = E.plan(20, E.FAST_STEPS, features=True)
    assert paper["chunk_sizes"] == [21, 21] and paper["evaluations"] == 1 + 15 * 42 and paper["decodes"] == 40
    assert fast["evaluations"] == 43 and fast["unet_passes"] == 2
    one = E.plan(20, E.FAST_STEPS, difference="one_sided", features=True)
    assert one["evaluations"] == 22 and one["decodes"] == 21
    assert paper["evaluations"] / one["evaluations"] >= 20
    assert E.plan(3, 2, max_batch=4)["chunk_sizes"] == [4, 4]             # balanced: 3 + 3 members
    assert E.plan(2, 1, inject="none")["chunk_sizes"] == [4]              # no reference needed
    assert E.plan(2, 1, inject="none", difference="one_sided", max_batch=2)["chunk_sizes"] == [2, 1]


def test_bilinear_upsampling_of_a_label_grid():
    from emergent_seg.core.emerdiff import upsample_labels

    grid = torch.tensor([[[0, 1], [0, 1]]])
    near = upsample_labels(grid, (4, 4))
    bil = upsample_labels(grid, (4, 4), "bilinear")
    assert torch.equal(near, bil)  # a straight boundary stays where it is
    grid = torch.tensor([[[0, 0, 0], [0, 1, 0], [0, 0, 0]]])
    bil = upsample_labels(grid, (12, 12), "bilinear")
    near = upsample_labels(grid, (12, 12))
    # a lone cell becomes a rounded blob inside its square: fewer pixels, corners lost
    assert 0 < int((bil == 1).sum()) < int((near == 1).sum())
    assert bil[0, 4, 4] == 0 and bil[0, 6, 6] == 1
    with pytest.raises(Exception, match="unknown upsampling"):
        upsample_labels(grid, (4, 4), "cubic")
