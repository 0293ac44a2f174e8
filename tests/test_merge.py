"""Tests for core.diffseg: DiffSeg merging in parity and fast mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from emergent_seg.core.diffseg import (
    DEFAULT_TAU,
    _greedy_groups,
    _greedy_parity,
    _group_means,
    _iteration0_kl,
    _iteration0_parts,
    _official_decisions_near_tau,
    _parity_iteration0,
    _TFBilinear,
    anchor_grid,
    kl_matrix,
    kl_merge,
    labels_from_proposals,
    merge_fast,
    merge_parity,
    refine_kmeans,
    symmetric_kl,
    threshold_from_quantile,
    to_segmentation,
)
from emergent_seg.core.errors import EmergentSegError, Interrupted
from synthetic import (
    planted_aggregate,
    random_aggregate,
    rect_regions,
    same_partition,
    voronoi_regions,
)


pytestmark = pytest.mark.usefixtures("one_thread")

def official_sampling_grid(num_of_points: int) -> np.ndarray:
    """google/diffseg ``generate_sampling_grid`` (hard-wired to 64), as (row, col) pairs."""
    segment_len = 63 // (num_of_points - 1)
    total_len = segment_len * (num_of_points - 1)
    start_point = (63 - total_len) // 2
    x_new = np.linspace(start_point, total_len + start_point, num_of_points)
    y_new = np.linspace(start_point, total_len + start_point, num_of_points)
    x_new, y_new = np.meshgrid(x_new, y_new, indexing="ij")
    return np.concatenate(([x_new.reshape(-1, 1), y_new.reshape(-1, 1)]), axis=-1).astype(int)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).double().mean())


# ------------------------------------------------------------------------------ anchor grid


@pytest.mark.parametrize("per_side", [16, 8, 5, 2])
def test_anchor_grid_equals_official_on_64(per_side):
    pts = official_sampling_grid(per_side)
    expected = torch.from_numpy(pts[:, 0] * 64 + pts[:, 1])
    assert torch.equal(anchor_grid(64, 64, per_side), expected)


def test_anchor_grid_official_coordinates():
    g = anchor_grid(64, 64)
    assert g.numel() == 256 and g.dtype == torch.long
    rows, cols = g // 64, g % 64
    assert sorted(set(rows.tolist())) == list(range(1, 62, 4))
    assert rows[:16].tolist() == [1] * 16 and cols[:16].tolist() == list(range(1, 62, 4))  # row-major


def test_anchor_grid_clamps_and_centres():
    assert torch.equal(anchor_grid(8, 8, 16), torch.arange(64))  # more anchors than cells: all
    assert anchor_grid(9, 7, 1).tolist() == [4 * 7 + 3]  # per_side 1: centre
    g = anchor_grid(12, 20, 16)  # non-square: 12 rows (clamped), cols 2..17
    assert g.numel() == 12 * 16
    assert sorted(set((g // 20).tolist())) == list(range(12))
    assert sorted(set((g % 20).tolist())) == list(range(2, 18))
    with pytest.raises(EmergentSegError, match="anchors_per_side"):
        anchor_grid(8, 8, 0)


# -------------------------------------------------------------------------------------- KL


def test_symmetric_kl_is_the_official_formula_and_kl_matrix_agrees():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 30, generator=g, dtype=torch.float64) * 2, 1)
    x = torch.softmax(torch.randn(7, 30, generator=g, dtype=torch.float64) * 2, 1)
    ref = 0.5 * (p[:, None] * (p[:, None] / x[None]).log()).sum(-1) \
        + 0.5 * (x[None] * (x[None] / p[:, None]).log()).sum(-1)
    torch.testing.assert_close(symmetric_kl(p[:, None], x[None]), ref)
    torch.testing.assert_close(kl_matrix(p, x), ref)
    torch.testing.assert_close(kl_matrix(p.float(), x.float()), ref.float(), atol=1e-5, rtol=1e-5)
    assert float(symmetric_kl(p[0], p[0])) == 0.0


def test_zeros_give_nan_in_official_kl_but_not_in_kl_matrix():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    assert torch.isnan(symmetric_kl(p[0], p)).all()  # NaN even against itself
    m = kl_matrix(p, p)
    assert torch.isfinite(m).all()
    assert float(m[0, 1]) > 10  # the zero makes the pair very far apart, not NaN


# -------------------------------------------------------------------- planted partitions


PLANTED = [
    pytest.param(lambda: voronoi_regions(16, 16, 4, seed=1), 16, id="voronoi4-16x16"),
    pytest.param(lambda: voronoi_regions(16, 16, 6, seed=5), 16, id="voronoi6-16x16"),
    pytest.param(lambda: rect_regions(16, 16, [(2, 2, 9, 7), (10, 3, 15, 14), (0, 9, 8, 16)]), 4,
                 id="rects-16x16-4anchors"),
    pytest.param(lambda: rect_regions(16, 16, [(0, 0, 16, 8)]), 16, id="halves-16x16"),
    pytest.param(lambda: voronoi_regions(12, 20, 3, seed=4), 16, id="voronoi3-12x20"),
]


@pytest.mark.parametrize("mode", ["fast", "parity"])
@pytest.mark.parametrize("make_regions, per_side", PLANTED)
def test_recovers_planted_partition(make_regions, per_side, mode):
    regions = make_regions()
    h, w = regions.shape
    a = planted_aggregate(regions, seed=h + w)
    labels, props = kl_merge(a, (h, w), (h, w), anchors_per_side=per_side, mode=mode)
    assert labels.shape == (1, h, w)
    assert props[0].shape == (int(regions.max()) + 1, h * w)
    assert same_partition(labels[0], regions)


def test_parity_and_fast_agree_on_easy_cases_upsampled():
    for seed, n in [(1, 4), (2, 6)]:
        regions = voronoi_regions(16, 16, n, seed=seed)
        a = planted_aggregate(regions, seed=seed)
        lf, pf = kl_merge(a, (16, 16), (128, 128), mode="fast")
        lp, pp = kl_merge(a, (16, 16), (128, 128), mode="parity")
        assert pf[0].shape[0] == pp[0].shape[0] == n
        assert agreement(lf, lp) >= 0.999
        torch.testing.assert_close(pf[0].double(), pp[0], atol=1e-6, rtol=1e-4)


def test_parity_64x64_official_defaults():
    """The one full-size parity case (official shapes: 4096x4096, 256 anchors, 3 iterations)."""
    regions = voronoi_regions(64, 64, 5, seed=3)
    a = planted_aggregate(regions, seed=3).float()
    pp = merge_parity(a, (64, 64), DEFAULT_TAU, 3, 16)
    pf = merge_fast(a, (64, 64), DEFAULT_TAU, 3, 16)
    assert pp.dtype == torch.float64 and pp.shape == pf.shape == (5, 4096)
    assert same_partition(labels_from_proposals(pp, (64, 64), (64, 64), tf_bilinear=True), regions)
    lp = labels_from_proposals(pp, (64, 64), (512, 512), tf_bilinear=True)
    lf = labels_from_proposals(pf, (64, 64), (512, 512))
    assert agreement(lp, lf) >= 0.999


def test_batch_equals_per_image_and_float64_fast():
    regs = [voronoi_regions(8, 8, 3, seed=s) for s in (0, 1)]
    a = torch.stack([planted_aggregate(r, seed=i) for i, r in enumerate(regs)])
    labels, props = kl_merge(a, (8, 8), (20, 20))
    for i in range(2):
        li, pi = kl_merge(a[i], (8, 8), (20, 20))
        assert torch.equal(labels[i], li[0]) and torch.equal(props[i], pi[0])
    l64, p64 = kl_merge(a, (8, 8), (20, 20), dtype=torch.float64)
    assert p64[0].dtype == torch.float64 and torch.equal(l64, labels)


# ------------------------------------------------------------------------------ iterations


def test_single_iteration_works_in_both_modes():
    regions = voronoi_regions(16, 16, 4, seed=1)
    a = planted_aggregate(regions)
    pp = merge_parity(a, (16, 16), 1.1, iterations=1)
    pf = merge_fast(a, (16, 16), 1.1, iterations=1)
    assert pp.shape == pf.shape == (256, 256)  # one proposal per anchor (= every cell here)
    assert not torch.isnan(pp).any()
    labels, _ = kl_merge(a, (16, 16), (16, 16), iterations=1, mode="parity")
    assert same_partition(labels[0], regions)


def test_parity_nan_anchor_is_dropped():
    regions = voronoi_regions(16, 16, 4, seed=1)
    a = planted_aggregate(regions)
    j = 37
    a[j, 5] = 1e-9  # below the float16 subnormal floor: an exact 0 after the official cast
    a[j] /= a[j].sum()
    assert float(a[j, 5].half()) == 0.0
    anchors = anchor_grid(16, 16)
    kl_bin, props = _parity_iteration0(a, anchors, 1.1)
    assert not kl_bin[j].any()  # NaN KL matches nothing, not even itself
    assert not kl_bin[:, j].any()  # and that query map joins no proposal
    assert torch.isnan(props[j]).all() and not torch.isnan(props[torch.arange(256) != j]).any()
    one = merge_parity(a, (16, 16), 1.1, iterations=1)
    assert one.shape[0] == 255 and not torch.isnan(one).any()
    three = merge_parity(a, (16, 16), 1.1, iterations=3)
    assert three.shape[0] == 4 and not torch.isnan(three).any()
    fast = merge_fast(a, (16, 16), 1.1, iterations=1)
    assert fast.shape[0] == 256 and torch.isfinite(fast).all()  # fast mode has no NaN


def test_parity_compares_float16_kl_with_float16_tau():
    # Two 2-pixel maps whose float16 KL is exactly fp16(1.1) = 1.0996: official TF compares in
    # float16, so they do not match, although 1.0996 < 1.1 and their float64 KL is below 1.1 too.
    x = torch.tensor([0.2, 0.8], dtype=torch.float64)
    s = torch.linspace(0.5, 0.99, 20001, dtype=torch.float64)
    rows = torch.stack([s, 1 - s], 1)
    tau16 = torch.tensor(1.1).half()
    kl16 = symmetric_kl(x.half(), rows.half())
    j = int(torch.nonzero(kl16 == tau16)[0])
    a = torch.stack([x, rows[j]])
    assert float(kl16[j]) < 1.1 and float(symmetric_kl(a[0], a[1])) < 1.1
    kl_bin, _ = _parity_iteration0(a, torch.tensor([0, 1]), 1.1)
    assert kl_bin.tolist() == [[True, False], [False, True]]
    # fast mode's float32 KL of this pair is below 1.1, but the pair sits inside the float16 band,
    # so fast decides it the official way and keeps the two maps apart, as parity does
    assert float(kl_matrix(a[:1].float(), a[1:].float())) < 1.1
    torch.testing.assert_close(merge_fast(a, (1, 2), 1.1, 1).double(), merge_parity(a, (1, 2), 1.1, 1))


def _near_tie_case(size: int, seed: int) -> tuple[torch.Tensor, float]:
    """A planted aggregate with tau at the median anchor-to-pixel KL: many pairs sit next to it."""
    regions = voronoi_regions(size, size, 4, seed=seed)
    a = planted_aggregate(regions, seed=seed, jitter=0.9)
    kl = _iteration0_kl(a.float(), (size, size), 16, None)
    return a, float(kl[kl > 0].median())


@pytest.mark.parametrize("size,seed", [(16, 0), (24, 1), (32, 2)])
def test_fast_iteration0_decides_near_ties_like_parity(size, seed):
    a, tau = _near_tie_case(size, seed)
    x = a.float()
    anchors, kl, h_x = _iteration0_parts(x, (size, size), 16, None)
    parity_bin, _ = _parity_iteration0(a.double(), anchors, tau)
    assert torch.isfinite(a.half().log()).all()  # no float16 zero: parity has no NaN here
    plain = kl < tau
    assert (plain != parity_bin).any()  # float32 alone disagrees with the official float16 KL
    banded = plain.clone()
    recomputed = _official_decisions_near_tau(banded, x, anchors, kl, h_x, tau)
    assert 0 < recomputed < kl.numel() // 2
    assert torch.equal(banded, parity_bin)
    labels_p = labels_from_proposals(merge_parity(a, (size, size), tau), (size, size), (size, size))
    labels_f = labels_from_proposals(merge_fast(a, (size, size), tau), (size, size), (size, size))
    assert torch.equal(labels_p, labels_f)


def test_near_tie_recomputation_is_the_official_float16_kl(monkeypatch):
    # with a band that takes in every pair, the recomputed decisions are parity's, all of them
    from emergent_seg.core import diffseg
    a, tau = _near_tie_case(16, 3)
    x = a.float()
    anchors, kl, h_x = _iteration0_parts(x, (16, 16), 16, None)
    parity_bin, _ = _parity_iteration0(a.double(), anchors, tau)
    monkeypatch.setattr(diffseg, "_FLOAT16_BAND", 1e3)
    selected = torch.zeros_like(parity_bin)
    assert _official_decisions_near_tau(selected, x, anchors, kl, h_x, tau, budget=100 * 256) == \
        kl.numel() - anchors.numel()
    selected[torch.arange(anchors.numel()), anchors] = True
    assert torch.equal(selected, parity_bin)


def test_float16_nan_pairs_keep_the_fast_decision():
    regions = voronoi_regions(16, 16, 4, seed=1)
    a = planted_aggregate(regions)
    j = 37
    a[j, 5] = 1e-9  # a float16 zero: every official KL against map j is NaN
    a[j] /= a[j].sum()
    x = a.float()
    anchors, kl, h_x = _iteration0_parts(x, (16, 16), 16, None)
    tau = float(kl[:, j].median())  # put map j's pairs next to tau
    selected = kl < tau
    before = selected[:, j].clone()
    _official_decisions_near_tau(selected, x, anchors, kl, h_x, tau)
    assert torch.equal(selected[:, j], before)


def _chain() -> tuple[torch.Tensor, float]:
    """p0 ~ p1 ~ p2 within tau, but p0 and p2 apart."""
    t = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)
    p = torch.stack([t, 1 - t], 1)
    kl = symmetric_kl(p[:, None], p[None])
    tau = 0.05
    assert kl[0, 1] < tau and kl[1, 2] < tau and kl[0, 2] > tau
    return p, tau


def test_greedy_claimed_proposals_still_enter_later_averages():
    p, tau = _chain()
    out = _greedy_parity(p, tau)
    assert out.shape[0] == 2
    torch.testing.assert_close(out[0], p[:2].mean(0))
    torch.testing.assert_close(out[1], p[1:].mean(0))  # p1 was claimed by p0, still averaged
    groups = _greedy_groups(kl_matrix(p, p) < tau)
    assert groups.tolist() == [[True, True, False], [False, True, True]]
    torch.testing.assert_close(_group_means(groups, p), out)


def test_greedy_order_dependence_and_nan_proposal():
    p, tau = _chain()
    rev = _greedy_parity(p.flip(0), tau)
    torch.testing.assert_close(rev[0], p[1:].mean(0))  # order decides which pairs form
    with_nan = torch.cat([torch.full((1, 2), float("nan"), dtype=torch.float64), p])
    out = _greedy_parity(with_nan, tau)
    assert out.shape[0] == 2 and not torch.isnan(out).any()  # dropped, nothing appended for it


# ---------------------------------------------------------------------------------- labels


def test_labels_are_argmax_of_bilinear_upsampling():
    g = torch.Generator().manual_seed(0)
    props = torch.rand(6, 7 * 9, generator=g, dtype=torch.float64)
    up = F.interpolate(props.reshape(1, 6, 7, 9), size=(37, 53), mode="bilinear", align_corners=False)
    expected = up[0].argmax(0)
    assert torch.equal(labels_from_proposals(props, (7, 9), (37, 53)), expected)
    assert torch.equal(labels_from_proposals(props, (7, 9), (37, 53), budget=100), expected)  # chunked
    tf = labels_from_proposals(props, (7, 9), (37, 53), tf_bilinear=True)
    assert torch.equal(tf, labels_from_proposals(props, (7, 9), (37, 53), tf_bilinear=True, budget=60))
    assert agreement(tf, expected) > 0.99  # float32 TF arithmetic: only near-ties may differ


def test_tf_bilinear_values():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    out = _TFBilinear(m, (4, 4))(slice(0, 4))[0]
    assert out[0].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert out[:, 0].tolist() == [0.0, 0.5, 1.5, 2.0]
    r = torch.rand(3, 5, 4, dtype=torch.float64)
    ref = F.interpolate(r[None], size=(11, 13), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(_TFBilinear(r, (11, 13))(slice(0, 11)).double(), ref, atol=1e-6, rtol=0)


def test_label_ties_go_to_lowest_index():
    p = torch.rand(1, 16).repeat(3, 1)
    for tf in (False, True):
        assert labels_from_proposals(p, (4, 4), (10, 10), tf_bilinear=tf, budget=50).eq(0).all()


def test_labels_reject_bad_proposals():
    with pytest.raises(EmergentSegError, match="NaN"):
        labels_from_proposals(torch.full((2, 4), float("nan")), (2, 2), (4, 4))
    with pytest.raises(EmergentSegError, match=r"\[S, 4\]"):
        labels_from_proposals(torch.rand(2, 5), (2, 2), (4, 4))


def test_to_segmentation_compacts_raw_ids():
    raw = torch.tensor([[[0, 4], [4, 7]]])
    seg = to_segmentation(raw, info={"tau": 1.1})
    assert seg.labels.tolist() == [[[0, 1], [1, 2]]] and seg.counts == (3,)
    assert seg.method == "diffseg" and seg.info == {"tau": 1.1}


# ------------------------------------------------------------------------------ refinement


def test_refine_keeps_planted_partition():
    regions = voronoi_regions(16, 16, 5, seed=7)
    a = planted_aggregate(regions, seed=1)
    for mode in ("fast", "parity"):
        labels, props = kl_merge(a, (16, 16), (16, 16), mode=mode, refine=True)
        assert props[0].shape[0] == 5 and same_partition(labels[0], regions)
        # refined proposals are the means of the aggregate rows of each cluster
        lab = labels[0].reshape(-1)
        for j in range(5):
            torch.testing.assert_close(props[0][j].double(), a[lab == j].mean(0), atol=1e-6, rtol=1e-4)


def test_refine_drops_empty_clusters():
    regions = voronoi_regions(8, 8, 3, seed=0)
    a = planted_aggregate(regions)
    p = merge_fast(a, (8, 8), 1.1).double()
    far = torch.full_like(p[:1], 10.0)  # nearer to no point than the real proposals: stays empty
    init = torch.cat([p[:1], far, p[1:]])
    out = refine_kmeans(a, init, reseed_empty=False)
    assert out.shape[0] == 3
    torch.testing.assert_close(out, refine_kmeans(a, p))


# ---------------------------------------------------------------------- adaptive threshold


def test_tau_quantile_is_monotone():
    regions = voronoi_regions(16, 16, 6, seed=5)
    a = planted_aggregate(regions, seed=2)
    qs = [0.02, 0.1, 0.3, 0.6, 0.9, 1.0]
    taus = [threshold_from_quantile(a, (16, 16), q) for q in qs]
    assert taus == sorted(taus) and taus[0] > 0
    counts = [kl_merge(a, (16, 16), (16, 16), tau_quantile=q)[1][0].shape[0] for q in qs]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    lq, _ = kl_merge(a, (16, 16), (16, 16), tau_quantile=0.3)
    lt, _ = kl_merge(a, (16, 16), (16, 16), tau=taus[2])
    assert torch.equal(lq, lt)
    batch = torch.stack([a, a])
    assert threshold_from_quantile(batch, (16, 16), 0.3) == [taus[2], taus[2]]


def test_tau_quantile_rescues_flat_attention():
    regions = voronoi_regions(16, 16, 4, seed=2)
    a = planted_aggregate(regions, region_mass=0.1, local_mass=0.0, jitter=0.05)
    _, fixed = kl_merge(a, (16, 16), (16, 16), tau=1.1)
    assert fixed[0].shape[0] == 1  # flat attention: everything within 1.1
    for mode in ("fast", "parity"):
        labels, _ = kl_merge(a, (16, 16), (16, 16), tau_quantile=0.1, mode=mode)
        assert same_partition(labels[0], regions)


# ------------------------------------------------------------------- callbacks and errors


def test_progress_and_should_stop():
    a = torch.stack([planted_aggregate(voronoi_regions(8, 8, 3, seed=s)) for s in (0, 1)])
    seen: list[tuple[int, int]] = []
    kl_merge(a, (8, 8), (8, 8), progress=lambda d, t: seen.append((d, t)), refine=True)
    assert seen[-1] == (10, 10) and all(t == 10 for _, t in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and len(set(done)) == len(done)

    calls = []

    def stop_on_third() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Interrupted):
        kl_merge(a, (8, 8), (8, 8), should_stop=stop_on_third)

    class Cancel(Exception):
        pass

    def raising() -> None:
        raise Cancel

    for mode in ("fast", "parity"):
        with pytest.raises(Cancel):
            kl_merge(a, (8, 8), (8, 8), should_stop=raising, mode=mode)


GOOD = planted_aggregate(voronoi_regions(4, 4, 2, seed=0))


@pytest.mark.parametrize("kwargs, match", [
    ({"tau": 0.0}, r"tau must be > 0 \(the paper uses 1.1 for COCO, 0.9 for Cityscapes\)"),
    ({"tau": -1.0}, "tau must be > 0"),
    ({"tau": float("nan")}, "tau must be > 0"),
    ({"tau": [1.1, 0.0, 1.1]}, "tau must be > 0"),
    ({"tau": [1.1, 1.1]}, "2 values but iterations=3"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"iterations": 1.5}, "iterations must be an integer >= 1"),
    ({"anchors_per_side": 0}, "anchors_per_side must be an integer >= 1"),
    ({"mode": "exact"}, "unknown mode 'exact'"),
    ({"tau": 1.1, "tau_quantile": 0.2}, "either tau or tau_quantile"),
    ({"tau_quantile": 0.0}, r"tau_quantile must be in \(0, 1\]"),
    ({"tau_quantile": 1.5}, r"tau_quantile must be in \(0, 1\]"),
    ({"grid": (4, 5)}, "grid 4x5 needs 20 x 20"),
    ({"a": GOOD * 2}, "must sum to 1"),
    ({"a": torch.full((16, 16), 1 / 16) - torch.eye(16) * 0.1}, "negative entries"),
    ({"a": torch.where(torch.eye(16, dtype=torch.bool), float("nan"), GOOD)}, "NaN or inf"),
    ({"a": GOOD[None, None]}, r"\[Q, K\] or \[B, Q, K\]"),
    ({"out_size": (0, 4)}, "grid must be positive"),
    ({"dtype": torch.float16}, "dtype must be"),
])
def test_errors_are_actionable(kwargs, match):
    args = {"a": GOOD, "grid": (4, 4), "out_size": (8, 8)} | kwargs
    with pytest.raises(EmergentSegError, match=match):
        kl_merge(**args)


def test_public_merges_validate_too():
    with pytest.raises(EmergentSegError, match="tau must be > 0"):
        merge_fast(GOOD, (4, 4), tau=0)
    with pytest.raises(EmergentSegError, match="iterations"):
        merge_parity(GOOD, (4, 4), iterations=0)
    with pytest.raises(EmergentSegError, match=r"\[Q, K\]"):
        merge_fast(torch.stack([GOOD, GOOD]), (4, 4))


# ---------------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 10_000),
       spread=st.floats(0.05, 5.0), tau=st.floats(0.01, 3.0), iterations=st.integers(1, 3),
       per_side=st.integers(1, 6), out=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       mode=st.sampled_from(["fast", "parity"]), refine=st.booleans())
def test_properties_on_random_aggregates(h, w, seed, spread, tau, iterations, per_side, out, mode,
                                         refine):
    a = random_aggregate(h * w, seed=seed, spread=spread)
    kwargs = {"tau": tau, "iterations": iterations, "anchors_per_side": per_side, "mode": mode,
              "refine": refine}
    labels, props = kl_merge(a, (h, w), out, **kwargs)
    assert labels.shape == (1, *out) and labels.dtype == torch.int64
    s = props[0].shape[0]
    n_anchors = min(per_side, h) * min(per_side, w)
    assert 1 <= s <= n_anchors and props[0].shape[1] == h * w
    assert int(labels.min()) >= 0 and int(labels.max()) < s
    assert torch.isfinite(props[0]).all()
    torch.testing.assert_close(props[0].sum(1).double(), torch.ones(s, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # proposals are averages of distributions
    labels2, props2 = kl_merge(a, (h, w), out, **kwargs)
    assert torch.equal(labels, labels2) and torch.equal(props[0], props2[0])
