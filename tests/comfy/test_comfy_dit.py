"""Flux joint attention through the real host (groundwork for DiT support, no node yet): a tiny
random-weight Flux built from ComfyUI's own classes, hooked only through ComfyUI's DiT block
patches and its attention override, on a clone of the user's model."""
from __future__ import annotations

import comfy_support as cs

cs.require_comfy()

import pytest  # noqa: E402
import torch  # noqa: E402

from emergent_seg.core.errors import EmergentSegError, UnsupportedModelError  # noqa: E402
from emergent_seg.core.joint_attention import image_head_mean  # noqa: E402
from emergent_seg.nodes.comfy_backend import capture_flux_attention, flux_blocks  # noqa: E402

TEXT = 5


@pytest.fixture(scope="module")
def flux():
    return cs.tiny_flux_model(seed=0)


def conditioning(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 16, generator=g),
            "guidance": torch.full((batch,), 3.5)}


def recorder(calls: list):
    """An override another pack could have installed: it records q/k and runs the attention."""
    def override(func, *args, **kwargs):
        calls.append((args[0].detach().clone(), args[1].detach().clone()))
        return func(*args, **kwargs)
    return override


def predict(model, x, sigma, kwargs):
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), sigma), transformer_options=dict(
            model.model_options.get("transformer_options", {})), **kwargs)


def test_flux_blocks_are_named_in_execution_order(flux):
    assert flux_blocks(flux) == ["double_block.0", "double_block.1", "single_block.0", "single_block.1"]
    with pytest.raises(UnsupportedModelError, match="not a Flux model"):
        flux_blocks(cs.tiny_sd15_model())


@pytest.mark.parametrize("latent_hw,reference", [((6, 10), False), ((8, 4), True)])
def test_every_chosen_block_once_with_the_image_tokens_after_the_text(flux, latent_hw, reference):
    """Odd grids (3x5) and Kontext-style reference latents after the image: the aggregate equals
    the head mean computed independently from the q/k a pre-installed override saw."""
    user = flux.clone()
    calls: list = []
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder(calls)
    latents = torch.randn(2, 16, *latent_hw, generator=torch.Generator().manual_seed(2))
    kwargs = conditioning(2)
    if reference:
        kwargs["ref_latents"] = [torch.randn(2, 16, 4, 4)]
    blocks = ["double_block.1", "single_block.0"]
    cap = capture_flux_attention(user, latents, kwargs, 0.6, blocks, (latent_hw[0] * 8, latent_hw[1] * 8))
    grid = (latent_hw[0] // 2, latent_hw[1] // 2)
    n = grid[0] * grid[1]
    assert cap.grid == grid and cap.self_attention.shape == (2, n, n)
    assert len(calls) == 4                                  # the other pack's override ran for every block
    extra = 4 if reference else 0                           # reference tokens: (4/2) x (4/2)
    assert all(q.shape[2] == TEXT + n + extra for q, _ in calls)
    expected = torch.zeros(2, n, n)
    for q, k in (calls[1], calls[2]):                       # double_block.1, single_block.0
        image_head_mean(q, k, slice(TEXT, TEXT + n), expected, 0.5)
    assert torch.allclose(cap.self_attention, expected, atol=1e-6)
    assert torch.allclose(cap.self_attention.sum(-1), torch.ones(2, n), atol=1e-5)


def test_capture_leaves_the_prediction_and_the_users_model_unchanged(flux):
    latents = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(3))
    kwargs = conditioning()
    x = torch.randn(1, 16, 6, 10)
    before = predict(flux, x, 0.6, kwargs)
    options_before = repr(flux.model_options)
    seen: dict = {}

    def observe_output(func, *args, **kwargs):               # the clone's output, seen from inside
        out = func(*args, **kwargs)
        seen.setdefault("outputs", []).append(out.clone())
        return out
    user = flux.clone()
    user.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = observe_output
    capture_flux_attention(user, latents, kwargs, 0.6, flux_blocks(flux), (48, 80))
    plain: list = []
    reference = flux.clone()
    reference.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder(plain)
    ms = flux.get_model_object("model_sampling")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    x_noisy = ms.noise_scaling(torch.full((1, 1, 1, 1), 0.6), noise, latents)
    predict(reference, x_noisy, 0.6, kwargs)
    # every block's attention output under capture equals the host's own, bit for bit
    outs = []

    def keep(func, *args, **kwargs):
        out = func(*args, **kwargs)
        outs.append(out)
        return out
    again = flux.clone()
    again.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = keep
    predict(again, x_noisy, 0.6, kwargs)
    assert len(seen["outputs"]) == len(outs) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["outputs"], outs))
    assert repr(flux.model_options) == options_before        # nothing of ours on the user's patcher
    assert torch.equal(predict(flux, x, 0.6, kwargs), before)


def test_bad_requests_are_clear_errors(flux):
    latents = torch.randn(1, 16, 6, 10)
    with pytest.raises(EmergentSegError, match="not in this model"):
        capture_flux_attention(flux, latents, conditioning(), 0.6, ["double_block.9"], (48, 80))
    with pytest.raises(EmergentSegError, match="sigma must be in"):
        capture_flux_attention(flux, latents, conditioning(), 0.0, ["double_block.0"], (48, 80))
    with pytest.raises(EmergentSegError, match="not a multiple"):
        capture_flux_attention(flux, torch.randn(1, 16, 5, 10), conditioning(), 0.6, ["double_block.0"], (40, 80))
