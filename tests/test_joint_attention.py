"""DiT joint attention, host-free: the image->image head mean, the block bookkeeping, and an oracle
whose planted regions KL Merge must recover exactly."""
from __future__ import annotations

import pytest
import torch

from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.joint_attention import JointAttentionCapture, image_head_mean


def reference_image_mean(q: torch.Tensor, k: torch.Tensor, image: slice) -> torch.Tensor:
    """Full softmax over every key (text, image, reference), image rows and columns kept, rows
    renormalised, mean over heads: ``[B, n, n]`` float64."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    probs = scores.softmax(-1)[:, :, image, image]
    probs = probs / probs.sum(-1, keepdim=True)
    return probs.mean(1)


@pytest.mark.parametrize("grid,text,reference", [((3, 5), 7, 0), ((4, 4), 5, 6), ((1, 9), 1, 3)])
def test_image_rows_renormalised_over_image_keys(grid, text, reference):
    torch.manual_seed(0)
    n = grid[0] * grid[1]
    b, heads, d = 2, 3, 8
    q, k = (torch.randn(b, heads, text + n + reference, d) * 2 for _ in range(2))
    image = slice(text, text + n)
    target = torch.zeros(b, n, n)
    image_head_mean(q, k, image, target, 1.0, budget_bytes=4 * n * 2)      # chunks of 2 queries
    expected = reference_image_mean(q, k, image)
    assert torch.allclose(target.double(), expected, atol=1e-6)
    assert torch.allclose(target.sum(-1), torch.ones(b, n), atol=1e-5)
    # the text and reference keys change nothing once renormalised away: image tokens alone agree
    alone = torch.zeros(b, n, n)
    image_head_mean(q[:, :, image], k[:, :, image], slice(0, n), alone)
    assert torch.allclose(alone, target, atol=1e-6)


def test_half_precision_inputs_accumulate_in_float32():
    torch.manual_seed(1)
    q, k = (torch.randn(1, 2, 10, 4).half() for _ in range(2))
    target = torch.zeros(1, 6, 6)
    image_head_mean(q, k, slice(4, 10), target)
    assert target.dtype == torch.float32
    assert torch.allclose(target.double(), reference_image_mean(q.float(), k.float(), slice(4, 10)), atol=1e-5)


def test_a_wrong_image_range_is_a_clear_error():
    q = k = torch.randn(1, 2, 10, 4)
    with pytest.raises(EmergentSegError, match="image tokens"):
        image_head_mean(q, k, slice(2, 10), torch.zeros(1, 6, 6))


def _capture(blocks=("double_block.1", "single_block.0"), grid=(2, 3), batch=1) -> JointAttentionCapture:
    return JointAttentionCapture(batch=batch, grid=grid, blocks=blocks, image_size=(16, 24), timestep=500)


def test_each_chosen_block_counts_once_with_equal_weight():
    torch.manual_seed(2)
    cap = _capture()
    qk = {name: (torch.randn(1, 2, 4 + 6, 8), torch.randn(1, 2, 4 + 6, 8))
          for name in ("double_block.0", "double_block.1", "single_block.0")}
    for name, (q, k) in qk.items():
        cap.observe(name, q, k, slice(4, 10))
    result = cap.result()
    expected = sum(reference_image_mean(*qk[b], slice(4, 10)) for b in ("double_block.1", "single_block.0")) / 2
    assert torch.allclose(result.self_attention.double(), expected, atol=1e-6)
    assert torch.allclose(result.self_attention.sum(-1), torch.ones(1, 6), atol=1e-5)
    assert result.grid == (2, 3) and result.image_size == (16, 24) and result.timestep == 500
    assert result.levels[0].layers == 2 and result.describe() == "self-attention 2x3 x2 (w=1.000)"
    with pytest.raises(EmergentSegError, match="ran twice"):
        cap.observe("single_block.0", *qk["single_block.0"], slice(4, 10))


def test_missing_and_repeated_blocks_are_errors():
    cap = _capture()
    cap.observe("double_block.1", torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), slice(0, 6))
    with pytest.raises(EmergentSegError, match=r"\['single_block.0'\] never ran"):
        cap.result()
    with pytest.raises(EmergentSegError, match="listed twice"):
        _capture(blocks=("a", "a"))
    with pytest.raises(EmergentSegError, match="at least one block"):
        _capture(blocks=())


def test_oracle_planted_regions_are_recovered_exactly_by_kl_merge():
    """Hand-set queries and keys: every image token's q and k encode the region it belongs to,
    text tokens attend nowhere in particular. Capture -> KL Merge must give back the regions."""
    from emergent_seg.core.pipeline import merge
    from emergent_seg.core.settings import DiffSegSettings

    torch.manual_seed(3)
    gh, gw, text, heads, d = 16, 16, 9, 2, 16
    regions = torch.zeros(gh, gw, dtype=torch.long)
    regions[:, 10:] = 1
    regions[9:, :6] = 2
    codes = torch.eye(d)[: 3] * 6.0                                     # one direction per region
    img = codes[regions.reshape(-1)] + 0.05 * torch.randn(gh * gw, d)
    txt = 0.05 * torch.randn(text, d)
    tokens = torch.cat([txt, img]).expand(1, heads, -1, -1)
    cap = JointAttentionCapture(batch=1, grid=(gh, gw), blocks=("double_block.0", "double_block.1"),
                                image_size=(128, 128))
    for block in cap.blocks:
        cap.observe(block, tokens, tokens, slice(text, text + gh * gw))
    seg = merge(cap.result(), DiffSegSettings(tau=1.1))
    assert seg.counts == (3,)
    centres = seg.labels[0, 4::8, 4::8]                                   # one pixel per token cell
    assert centres.shape == regions.shape
    # the same partition: a one-to-one map between predicted and planted ids
    pairs = set(zip(centres.reshape(-1).tolist(), regions.reshape(-1).tolist()))
    assert len(pairs) == 3 and len({p for p, _ in pairs}) == 3


def test_block_choices_parse_ranges_presets_and_errors():
    from emergent_seg.core.joint_attention import parse_blocks

    available = [f"double_block.{i}" for i in range(4)] + [f"single_block.{i}" for i in range(3)]
    preset = ["double_block.2", "double_block.3"]
    assert parse_blocks("all", available, preset) == preset
    assert parse_blocks("", available, preset) == preset
    assert parse_blocks("every", available, preset) == available
    assert parse_blocks("single 2, double 1-2", available, preset) == [
        "double_block.1", "double_block.2", "single_block.2"]
    assert parse_blocks("double_block.3, s0-1, d0", available, preset) == [
        "double_block.0", "double_block.3", "single_block.0", "single_block.1"]
    with pytest.raises(EmergentSegError, match="outside this model's blocks"):
        parse_blocks("double 2-4", available, preset)
    with pytest.raises(EmergentSegError, match="outside"):
        parse_blocks("single 0", available[:4], preset)
    with pytest.raises(EmergentSegError, match="not a block range"):
        parse_blocks("64, 32", available, preset)
    with pytest.raises(EmergentSegError, match="outside"):
        parse_blocks("double 3-1", available, preset)


def test_dit_presets_scale_with_depth_and_never_come_back_empty():
    from emergent_seg.core.settings import DIT_PRESETS, dit_preset

    flux, sd3 = dit_preset("flux"), dit_preset("sd3")
    assert flux.blocks(19, 38) == [f"double_block.{i}" for i in range(9, 19)]
    assert sd3.blocks(24) == [f"double_block.{i}" for i in range(6, 18)]
    assert sd3.blocks(38) == [f"double_block.{i}" for i in range(9, 28)]
    for p in DIT_PRESETS.values():
        assert 0 < p.sigma <= 1
        for depth in (1, 2, 3, 5):
            names = p.blocks(depth, depth)
            assert names and all(int(n.split(".")[1]) < depth for n in names)
    with pytest.raises(EmergentSegError, match="no DiT preset"):
        dit_preset("hunyuan")
