"""Oracle DiT test through the real host: tiny Flux and SD3 (MMDiT) models built from ComfyUI's own
classes, with hand-set weights whose image-token queries and keys encode planted regions. Capture
(``capture_dit_attention``, the host's own forward) -> KL Merge node must give back the planted
label maps exactly, up to a renaming of the labels.

How the weights plant the regions (both families):
- the latent carries each token's region as a one-hot over channels 0-3 (times a random
  per-token amplitude); channels 4-15 hold strong random content that only a random model reads;
- the patch embedding copies channels 0-3 into hidden dims 0-3 and drops everything else, so the
  image residual is the region code (LayerNorm removes the amplitude);
- in a planted block, q and k of each head read hidden dims 0-3 into head dims 0-3, nothing else
  (Flux: those dims are RoPE's first axis, the reference index, 0 for every token: rotated by
  angle 0, so no position leaks in; SD3: the absolute position embedding is zeroed). Head 0's
  query of region r is the sum of the keys of regions r and PERM[r], so it looks at both; head 1's
  queries and keys share another permutation, so it looks at its own region only. The q/k RMS-norm
  scale is large, so an image query puts ~all its image attention uniformly on those regions and
  none elsewhere: every aggregate row is known exactly, and it is not symmetric (a q/k swap, a
  head mix-up or a shifted token range in the capture would show). Each region still attends
  most to itself, which is what DiffSeg's labelling assumes;
- blocks before a planted block leave the image residual alone (zero modulation: gate 0), so every
  planted block sees the same codes. The last blocks keep random gates and weights, so the
  prediction does depend on the attention.

Controls that must fail: a random block of the same model, a fully random model, and a model
whose embedding gives two regions the same code (which must then return those two merged).
"""
from __future__ import annotations

import comfy_support as cs
import pytest
import torch
from emergent_seg.nodes import kl_merge

cs.require_comfy()                   # skips the module without a ComfyUI checkout

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (8, 12)                       # token grid: latent 16x24, image 128x192
IMAGE = (GRID[0] * 16, GRID[1] * 16)
REGIONS = 4
SIGMA = 0.005                        # the capture's own noise (x = SIGMA*noise + (1-SIGMA)*latent)
SCALE = 3.0                          # q/k RMS-norm scale: logit gaps of ~35-75 to unwatched regions
TEXT = 5
PERM = (2, 0, 1, 3)                  # head 0: region r's queries match the keys of r and PERM[r]
HEAD0 = torch.eye(REGIONS) + torch.eye(REGIONS)[list(PERM)]                  # [r, s]: r looks at s
Q_MIXES = (HEAD0.T, torch.eye(REGIONS).flip(0))   # per head: q = mix @ code (code: hidden dims 0-3)
K_MIXES = (torch.eye(REGIONS), torch.eye(REGIONS).flip(0))
OWN = torch.arange(REGIONS)          # embedding: latent channel r -> hidden dim OWN[r]
MERGED = torch.tensor([0, 1, 2, 2])  # region 3 embedded as region 2 (PERM keeps 0-2 among
                                     # themselves): the model cannot tell regions 2 and 3 apart

# family -> (blocks planted and captured, a block with random q/k on the same residual)
BLOCKS = {"flux": (["double_block.1", "single_block.0"], "double_block.0"),
          "sd3": (["double_block.1"], "double_block.0")}


# --------------------------------------------------------------------------- planted scene


def planted_maps() -> torch.Tensor:
    """Two different ``[8, 12]`` maps of 4 regions with slanted, curved boundaries (no region is a
    union of grid-aligned rectangles; the background of each is in two pieces)."""
    yy, xx = torch.meshgrid(torch.arange(GRID[0]) + 0.5, torch.arange(GRID[1]) + 0.5, indexing="ij")
    a = torch.zeros(GRID, dtype=torch.long)
    a[(yy - 3.2) ** 2 + (xx - 3.9) ** 2 < 2.6 ** 2] = 1                     # disc
    a[(xx + 0.6 * yy > 9.3) & (xx + 0.6 * yy < 12.1)] = 2                     # slanted band
    a[(yy > 0.5 * xx + 3.4) & (a == 0)] = 3                                   # wedge
    b = torch.zeros(GRID, dtype=torch.long)
    b[yy - 0.35 * xx < 1.7] = 1                                               # slanted top
    b[(yy - 5.4) ** 2 / 4 + (xx - 8.3) ** 2 / 9 < 1] = 2                      # ellipse
    b[(xx < 3.3 + 0.4 * yy) & (yy > 4.1)] = 3                                 # trapezoid
    return torch.stack([a, b])


def planted_latents(maps: torch.Tensor, seed: int = 5) -> torch.Tensor:
    """``[B, 16, 2h, 2w]``: channels 0-3 one-hot region codes with a random amplitude in
    [20, 80] per token (constant over its 2x2 patch), channels 4-15 random with std 40. Large
    next to the capture's unit noise times SIGMA, so the planted rows hold to ~1e-4."""
    g = torch.Generator().manual_seed(seed)
    b = maps.shape[0]
    amplitude = 20.0 + 60.0 * torch.rand(b, 1, *GRID, generator=g)
    latents = 40.0 * torch.randn(b, 16, 2 * GRID[0], 2 * GRID[1], generator=g)
    codes = torch.nn.functional.one_hot(maps, REGIONS).permute(0, 3, 1, 2).float() * amplitude
    latents[:, :REGIONS] = codes.repeat_interleave(2, 2).repeat_interleave(2, 3)
    return latents


def conditioning(family: str, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "flux":
        return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 16, generator=g),
                "guidance": torch.full((batch,), 3.5)}
    return {"c_crossattn": torch.randn(batch, TEXT, 32, generator=g), "y": torch.randn(batch, 32, generator=g)}


def region_rows(maps: torch.Tensor, looks: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]``: row i uniform over the tokens of the regions ``s`` with
    ``looks[label of token i, s] = 1``, zero elsewhere."""
    onehot = torch.nn.functional.one_hot(maps.reshape(maps.shape[0], -1), REGIONS).float()
    rows = onehot @ looks @ onehot.transpose(1, 2)
    return rows / rows.sum(-1, keepdim=True)


def expected_rows(maps: torch.Tensor) -> torch.Tensor:
    """The planted aggregate: the mean of head 0 (regions r and PERM[r]) and head 1 (region r)."""
    return 0.5 * region_rows(maps, HEAD0) + 0.5 * region_rows(maps, torch.eye(REGIONS))


def same_partition(labels: torch.Tensor, planted: torch.Tensor) -> bool:
    """The two label maps are equal up to a one-to-one renaming of the labels."""
    pairs = set(zip(labels.reshape(-1).tolist(), planted.reshape(-1).tolist(), strict=True))
    return len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs})


def token_labels(seg) -> torch.Tensor:
    """The KL Merge labels at the centre of every token's 16x16 pixel cell: ``[B, 8, 12]``."""
    assert seg.labels.shape[-2:] == IMAGE
    return seg.labels[:, 8::16, 8::16]


# --------------------------------------------------------------------------- planted weights


def plant_qk(weight: torch.Tensor, bias: torch.Tensor, hidden: int, heads: int) -> None:
    """Rows ``[0, hidden)`` are q, ``[hidden, 2*hidden)`` k (then v, left alone): head dims 0-3 of
    head h read hidden dims 0-3 through ``Q_MIXES[h]`` / ``K_MIXES[h]``; every other q/k entry is 0."""
    assert heads == len(Q_MIXES)
    head_dim = hidden // heads
    weight[:2 * hidden].zero_()
    bias[:2 * hidden].zero_()
    for start, mixes in ((0, Q_MIXES), (hidden, K_MIXES)):
        for h, mix in enumerate(mixes):
            row = start + h * head_dim
            weight[row:row + REGIONS, :REGIONS] = mix


def flux_model(embed: torch.Tensor | None):
    """Tiny Flux (2 double, 2 single blocks, 2 heads of 32), latent channel r embedded as hidden
    dim ``embed[r]``; ``embed=None``: all random."""
    model = cs.tiny_flux_model(seed=0)
    if embed is None:
        return model
    net = model.model.diffusion_model
    hidden, heads = net.hidden_size, net.num_heads
    assert net.params.axes_dim[0] >= REGIONS          # head dims 0-3: RoPE's index axis (position 0)
    with torch.no_grad():
        net.img_in.weight.zero_()                     # latent features are (channel, 2x2 pixel)
        net.img_in.bias.zero_()
        for r in range(REGIONS):
            net.img_in.weight[int(embed[r]), 4 * r:4 * r + 4] = 0.25
        for block in net.double_blocks:               # the image stream passes both untouched
            block.img_mod.lin.weight.zero_()
            block.img_mod.lin.bias.zero_()
        planted = net.double_blocks[1]
        plant_qk(planted.img_attn.qkv.weight, planted.img_attn.qkv.bias, hidden, heads)
        planted.img_attn.norm.query_norm.scale.fill_(SCALE)
        planted.img_attn.norm.key_norm.scale.fill_(SCALE)
        single = net.single_blocks[0]                 # text and image share its weights
        single.modulation.lin.weight[:2 * hidden].zero_()    # shift, scale = 0; the gate stays random
        single.modulation.lin.bias[:2 * hidden].zero_()
        plant_qk(single.linear1.weight, single.linear1.bias, hidden, heads)
        single.norm.query_norm.scale.fill_(SCALE)
        single.norm.key_norm.scale.fill_(SCALE)
    return model


def sd3_model(embed: torch.Tensor | None):
    """Tiny SD3 (2 joint blocks, 2 heads of 64, block 1 with SD3.5's image-only attention), latent
    channel r embedded as hidden dim ``embed[r]``; ``embed=None``: all random."""
    model = cs.tiny_sd3_model(seed=0)
    if embed is None:
        return model
    net = model.model.diffusion_model
    hidden, heads = net.hidden_size, net.num_heads
    with torch.no_grad():
        net.x_embedder.proj.weight.zero_()            # 2x2 stride-2 conv: the mean of channel r
        net.x_embedder.proj.bias.zero_()
        for r in range(REGIONS):
            net.x_embedder.proj.weight[int(embed[r]), r] = 0.25
        net.pos_embed.zero_()
        first = net.joint_blocks[0].x_block           # random q/k; leaves the image residual alone
        first.adaLN_modulation[1].weight.zero_()
        first.adaLN_modulation[1].bias.zero_()
        planted = net.joint_blocks[1].x_block
        planted.adaLN_modulation[1].weight[:2 * hidden].zero_()   # shift, scale of the joint attention
        planted.adaLN_modulation[1].bias[:2 * hidden].zero_()
        plant_qk(planted.attn.qkv.weight, planted.attn.qkv.bias, hidden, heads)
        planted.attn.ln_q.weight.fill_(SCALE)
        planted.attn.ln_k.weight.fill_(SCALE)
    return model


BUILD = {"flux": flux_model, "sd3": sd3_model}


@pytest.fixture(scope="module")
def scene():
    maps = planted_maps()
    return maps, planted_latents(maps)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def family(request):
    name = request.param
    return name, {kind: BUILD[name](mix) for kind, mix in (("planted", OWN), ("merged", MERGED),
                                                           ("random", None))}


def capture(model, family_name: str, latents: torch.Tensor, blocks: list[str]):
    from emergent_seg.nodes.comfy_backend import capture_dit_attention  # imports comfy

    return capture_dit_attention(model, latents, conditioning(family_name, latents.shape[0]), SIGMA, blocks,
                                 IMAGE)


def kl_labels(cap) -> tuple[torch.Tensor, tuple[int, ...]]:
    seg = kl_merge.run(cap).outputs[0]                  # the KL Merge node at its defaults (tau 1.1)
    return token_labels(seg), seg.counts


# --------------------------------------------------------------------------- tests


def test_the_scene_is_not_trivial(scene):
    maps, _ = scene
    for m in maps:
        sizes = torch.bincount(m.reshape(-1), minlength=REGIONS)
        assert bool((sizes >= 10).all())
        for r in range(REGIONS):                      # no region is its bounding box
            ys, xs = torch.nonzero(m == r, as_tuple=True)
            box = (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
            assert box > int(sizes[r])
    assert not torch.equal(maps[0], maps[1])


def test_planted_regions_are_recovered_exactly(scene, family):
    name, models = family
    maps, latents = scene
    blocks, _ = BLOCKS[name]
    cap = capture(models["planted"], name, latents, blocks)
    assert cap.grid == GRID
    expected = expected_rows(maps)
    # every row as planted: uniform on the regions its heads look at, nothing elsewhere
    assert (cap.self_attention - expected).abs().max().item() < 1e-3
    assert (cap.self_attention * (expected == 0)).sum(-1).max().item() < 1e-6
    labels, counts = kl_labels(cap)
    assert counts == (REGIONS, REGIONS)
    assert all(same_partition(labels[i], maps[i]) for i in range(2))


def test_the_map_follows_the_weights_not_the_input(scene, family):
    """Same latents, same q/k weights, but an embedding that gives regions 2 and 3 one code: the
    aggregate is the merged map's, and KL Merge returns those two as one segment, the rest exactly
    as planted."""
    name, models = family
    maps, latents = scene
    blocks, _ = BLOCKS[name]
    merged_maps = MERGED[maps]
    cap = capture(models["merged"], name, latents, blocks)
    assert (cap.self_attention - expected_rows(merged_maps)).abs().max().item() < 1e-3
    labels, counts = kl_labels(cap)
    assert counts == (REGIONS - 1, REGIONS - 1)
    assert all(same_partition(labels[i], merged_maps[i]) for i in range(2))
    assert not any(same_partition(labels[i], maps[i]) for i in range(2))


def test_controls_do_not_recover_the_planted_map(scene, family):
    """A block with random q/k on the same residual, and a model with random weights everywhere,
    through the same capture and merge: not the planted map, rows far from the planted rows."""
    name, models = family
    maps, latents = scene
    blocks, wrong = BLOCKS[name]
    expected = expected_rows(maps)
    for model, chosen in ((models["planted"], [wrong]), (models["random"], blocks)):
        cap = capture(model, name, latents, chosen)
        assert (cap.self_attention - expected).abs().max().item() > 0.02
        labels, _ = kl_labels(cap)
        assert not any(same_partition(labels[i], maps[i]) for i in range(2))


def predict(model, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), SIGMA), transformer_options=dict(
            model.model_options.get("transformer_options", {})), **kwargs)


def test_capture_leaves_the_prediction_and_the_users_model_unchanged(scene, family):
    """The capture's own forward predicts bit for bit what the plain model predicts from the same
    noisy latent (the planted attention reaches the prediction through random gates), and the
    user's patcher predicts the same before and after."""
    name, models = family
    model = models["planted"]
    _, latents = scene
    blocks, _ = BLOCKS[name]
    kwargs = conditioning(name, 2)
    x = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    before = predict(model, x, kwargs)
    options_before = repr(model.model_options)
    outputs: list = []
    handle = model.model.diffusion_model.final_layer.register_forward_hook(
        lambda module, args, out: outputs.append(out.detach().clone()))
    try:
        capture(model, name, latents, blocks)
        ms = model.get_model_object("model_sampling")
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        predict(model, ms.noise_scaling(torch.full((2, 1, 1, 1), SIGMA), noise, latents), kwargs)
    finally:
        handle.remove()
    assert len(outputs) == 2 and torch.equal(outputs[0], outputs[1])
    assert repr(model.model_options) == options_before
    assert torch.equal(predict(model, x, kwargs), before)
    # the attention does reach the prediction, so the equality above is no accident: keys reversed
    scrambled = model.clone()
    scrambled.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda func, q, k, v, *args, **kw: func(q, k.flip(-2), v, *args, **kw)
    assert not torch.allclose(predict(scrambled, x, kwargs), before, atol=1e-4)
