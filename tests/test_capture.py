"""Capture plumbing on tiny random UNets with the real SD1.x and SDXL block layouts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emergent_seg.core.attention import explicit_attention
from emergent_seg.core.backend import PassHooks
from emergent_seg.core.capture import capture_attention
from emergent_seg.core.errors import EmergentSegError, UnsupportedModelError
from emergent_seg.core.backends.diffusers import DiffusersBackend
from emergent_seg.core.sites import select, strides_of
from tiny_models import tiny_backend


def _latent(backend, h=32, w=32, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _reference_aggregate(backend, latent, cond, timestep=300):
    """Independent re-statement: record every attn1 input with forward hooks under the UNet's
    own processors, recompute softmax(QK^T/sqrt(d)) per head, then aggregate as the official
    `aggregate_weights` does."""
    inputs = {}
    handles = []
    for site in select(backend.sites(), kind="self"):
        module = backend._modules[site.key]
        handles.append(module.register_forward_hook(
            lambda m, args, kwargs, out, key=site.key: inputs.__setitem__(key, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    try:
        with torch.no_grad():
            backend.unet(latent, torch.tensor([timestep]), encoder_hidden_states=cond.context,
                         added_cond_kwargs=cond.extra or None)
    finally:
        for h in handles:
            h.remove()
    per_stride = {}
    for site in select(backend.sites(), kind="self"):
        attn = backend._modules[site.key]
        x = inputs[site.key]
        with torch.no_grad():
            q, k = attn.to_q(x), attn.to_k(x)
        heads = attn.heads
        qh = q.view(1, q.shape[1], heads, -1).permute(0, 2, 1, 3).double()
        kh = k.view(1, k.shape[1], heads, -1).permute(0, 2, 1, 3).double()
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        per_stride.setdefault(site.stride, []).append(probs.mean(dim=1)[0])
    latent_hw = latent.shape[-2:]
    top = min(per_stride)
    H, W = latent_hw[0] // top, latent_hw[1] // top
    weights = {s: (1 / s) / sum(1 / t for t in per_stride) for s in per_stride}
    agg = torch.zeros(H, W, H, W, dtype=torch.float64)
    for s, maps in per_stride.items():
        h, w = latent_hw[0] // s, latent_hw[1] // s
        mean = torch.stack(maps).mean(0).view(h * w, 1, h, w)
        up = F.interpolate(mean, size=(H, W), mode="bilinear", align_corners=False).view(h, w, H, W)
        up = up / up.sum(dim=(-1, -2), keepdim=True)
        up = up.repeat_interleave(H // h, dim=0).repeat_interleave(W // w, dim=1)
        agg += weights[s] * up
    return agg.view(H * W, H * W)


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_captured_aggregate_equals_independent_softmax(layout):
    backend = tiny_backend(layout)
    latent = _latent(backend)
    cond = backend.empty_conditioning()
    cap = capture_attention(backend, latent, cond, timestep=300, budget_bytes=4096)  # forces chunking
    expected = _reference_aggregate(backend, latent, cond)
    got = cap.self_attention[0].double()
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_sd15_layer_resolution_bookkeeping():
    backend = tiny_backend("sd15")
    sites = backend.sites()
    assert len(select(sites, kind="self")) == 16 and len(select(sites, kind="cross")) == 16
    counts = {s: len(select(sites, kind="self", strides=[s])) for s in strides_of(sites)}
    assert counts == {1: 5, 2: 5, 4: 5, 8: 1}
    assert backend.size_multiple() == 8  # no VAE: 1 px per latent cell x 8 from the UNet
    ups = select(sites, kind="cross", stage="up", strides=[4])
    assert ups[0].key == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert [s.order for s in sites] == list(range(len(sites)))
    cap = capture_attention(backend, _latent(backend, 32, 48))  # non-square
    assert cap.grid == (32, 48)
    assert [(l.grid, l.layers) for l in cap.levels] == [((32, 48), 5), ((16, 24), 5), ((8, 12), 5), ((4, 6), 1)]
    assert [round(l.weight, 4) for l in cap.levels] == [0.5333, 0.2667, 0.1333, 0.0667]


def test_sdxl_layer_resolution_bookkeeping():
    backend = tiny_backend("sdxl")
    sites = backend.sites()
    counts = {s: len(select(sites, kind="self", strides=[s])) for s in strides_of(sites)}
    # down: 2 blocks x 2 layers @2, 2 x 3 @4; mid 3 @4; up: 3 x 3 @4, 3 x 2 @2
    assert counts == {2: 4 + 6, 4: 6 + 3 + 9}
    assert {s.depth for s in select(sites, strides=[4])} == {0, 1, 2}
    cap = capture_attention(backend, _latent(backend, 32, 32))
    assert cap.grid == (16, 16)
    assert [l.layers for l in cap.levels] == [10, 18]


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_capture_leaves_output_unchanged_and_restores_processors(layout):
    backend = tiny_backend(layout)
    latent = _latent(backend)
    cond = backend.empty_conditioning()
    before = {k: m.processor for k, m in backend._modules.items()}
    t = torch.tensor([300])
    plain = backend.predict_noise(latent, t, cond)
    seen = []

    def observe(site, q, k, v):
        seen.append(site.key)
        return explicit_attention(q, k, v, site.heads, on_chunk=lambda s, p: None)
    hooks = PassHooks({s.key: observe for s in backend.sites()})
    hooked = backend.predict_noise(latent, t, cond, hooks)
    assert len(seen) == len(backend.sites())
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-4)
    assert {k: m.processor for k, m in backend._modules.items()} == before
    after = backend.predict_noise(latent, t, cond)
    assert torch.equal(after, plain)


def test_processors_restored_after_an_exception():
    backend = tiny_backend("sd15")
    before = {k: m.processor for k, m in backend._modules.items()}

    def boom(site, q, k, v):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        backend.predict_noise(_latent(backend), torch.tensor([300]), backend.empty_conditioning(),
                              PassHooks({backend.sites()[3].key: boom}))
    assert {k: m.processor for k, m in backend._modules.items()} == before


def test_cross_attention_capture_and_stride_selection():
    backend = tiny_backend("sd15")
    cap = capture_attention(backend, _latent(backend), backend.empty_conditioning(), cross=True, strides=[2, 4])
    assert cap.grid == (16, 16) and [l.stride for l in cap.levels] == [2, 4]
    assert [c.grid for c in cap.cross] == [(16, 16), (8, 8)]
    for level in cap.cross:
        torch.testing.assert_close(level.maps.sum(-1), torch.ones_like(level.maps.sum(-1)))


def test_explicit_attention_matches_sdpa_in_chunks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 12, generator=g) for _ in range(3))
    chunks = []
    out = explicit_attention(q, k, v, heads=3, on_chunk=lambda s, p: chunks.append((s, p.shape)), budget_bytes=2 * 3 * 37 * 4 * 5)
    ref = F.scaled_dot_product_attention(q.view(2, 37, 3, 4).transpose(1, 2), k.view(2, 37, 3, 4).transpose(1, 2),
                                         v.view(2, 37, 3, 4).transpose(1, 2)).transpose(1, 2).reshape(2, 37, 12)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [c[0] for c in chunks] == list(range(0, 37, 5))


def test_bad_inputs_have_clear_errors():
    backend = tiny_backend("sd15")
    with pytest.raises(EmergentSegError, match="multiple of 8"):
        capture_attention(backend, torch.randn(1, 4, 30, 32))
    with pytest.raises(EmergentSegError, match="timestep"):
        capture_attention(backend, _latent(backend), timestep=1000)
    with pytest.raises(EmergentSegError, match="available"):
        capture_attention(backend, _latent(backend), strides=[16])
    with pytest.raises(UnsupportedModelError, match="UNet"):
        DiffusersBackend(torch.nn.Linear(2, 2))


def test_head_mean_attention_matches_explicit_attention_in_chunks():
    from emergent_seg.core.attention import attention_with_head_mean
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 12, generator=g) for _ in range(3))
    want_mean = torch.zeros(2, 37, 37)

    def fold(start, probs):
        want_mean[:, start:start + probs.shape[2]] += probs.mean(dim=1)
    want = explicit_attention(q, k, v, heads=3, on_chunk=fold)
    target = torch.full((2, 37, 37), 0.5)
    # 5 query rows of one head per chunk: 8 chunks per (image, head), the last one partial
    out = attention_with_head_mean(q, k, v, 3, target, weight=0.25, budget_bytes=37 * 4 * 5)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(target, 0.5 + 0.25 * want_mean, atol=1e-6, rtol=1e-5)
    cross = torch.zeros(2, 37, 7)
    attention_with_head_mean(q, k[:, :7], v[:, :7], 3, cross)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 37))
    with pytest.raises(ValueError, match="target"):
        attention_with_head_mean(q, k, v, 3, torch.zeros(2, 37, 7))


def test_zero_weight_resolutions_are_not_captured():
    backend = tiny_backend("sd15")
    latent = _latent(backend)
    strides = strides_of(backend.sites(), "self")
    seen = []
    real = backend.predict_noise

    def spy(latents, t, cond, hooks=None):
        seen.extend(hooks.attention)
        return real(latents, t, cond, hooks)
    backend.predict_noise = spy
    weights = {s: (0.0 if s == strides[-1] else 1.0) for s in strides}
    cap = capture_attention(backend, latent, weights=weights)
    assert [l.stride for l in cap.levels] == strides[:-1]
    assert {k for k in seen} == {s.key for s in select(backend.sites(), kind="self", strides=strides[:-1])}
    torch.testing.assert_close(cap.self_attention.sum(-1), torch.full_like(cap.self_attention[..., 0], sum(weights.values())))
    with pytest.raises(EmergentSegError, match="weight 0"):
        capture_attention(backend, latent, weights={s: 0.0 for s in strides})
