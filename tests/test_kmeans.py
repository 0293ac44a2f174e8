"""Tests for core.kmeans: seeded, batched, deterministic k-means."""
from __future__ import annotations

import pytest
import torch

from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.kmeans import kmeans, kmeans_plus_plus, pairwise_sq_dist
from synthetic import same_partition


pytestmark = pytest.mark.usefixtures("one_thread")

def blobs(n_per: int, centers: torch.Tensor, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, d = centers.shape
    truth = torch.arange(k).repeat_interleave(n_per)
    x = centers[truth] + spread * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return x[perm], truth[perm]


CENTERS = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0],
                        [10.0, 10.0, 10.0]])


def test_recovers_planted_clusters():
    x, truth = blobs(40, CENTERS, 0.5, seed=1)
    for seed in range(5):
        assign, cent = kmeans(x, 5, seed=seed)
        assert assign.shape == (200,) and cent.shape == (5, 3)
        assert same_partition(assign, truth)
        # each centroid is the mean of its cluster
        for j in range(5):
            torch.testing.assert_close(cent[j], x[assign == j].mean(0), rtol=1e-5, atol=1e-5)


def test_deterministic_for_a_seed_and_independent_of_global_rng():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))  # no cluster structure
    torch.manual_seed(123)
    a1, c1 = kmeans(x, 6, seed=7)
    torch.manual_seed(999)
    torch.rand(10)
    a2, c2 = kmeans(x, 6, seed=7)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


def test_different_seeds_can_differ():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    results = {tuple(kmeans(x, 6, seed=s, iters=1)[0].tolist()) for s in range(6)}
    assert len(results) > 1


def test_batched_equals_per_item():
    xs = torch.stack([blobs(30, CENTERS, 1.5, seed=s)[0] for s in range(3)])
    ab, cb = kmeans(xs, 5, seed=3)
    assert ab.shape == (3, 150) and cb.shape == (3, 5, 3)
    for i in range(3):
        ai, ci = kmeans(xs[i], 5, seed=3)
        assert torch.equal(ab[i], ai) and torch.equal(cb[i], ci)


def test_explicit_init_is_used_and_converges_to_nearest_means():
    x, truth = blobs(20, CENTERS, 0.3, seed=2)
    init = CENTERS.flip(0)  # cluster j starts at CENTERS[4-j]
    assign, cent = kmeans(x, 5, init=init)
    assert torch.equal(assign, 4 - truth)
    torch.testing.assert_close(cent, CENTERS.flip(0), atol=0.2, rtol=0)


def test_ties_go_to_lowest_index():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    init = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical centroids: every distance ties
    assign, _ = kmeans(x, 2, init=init, iters=1, reseed_empty=False)
    assert assign.tolist() == [0, 0]
    d = pairwise_sq_dist(x, init)
    assert torch.equal(d.argmin(1), torch.tensor([0, 0]))


def test_empty_cluster_reseeded_to_farthest_point_or_kept():
    x = torch.tensor([[0.0], [0.1], [0.2], [5.0]])
    init = torch.tensor([[0.0], [100.0]])  # cluster 1 starts with no points
    kept, c_kept = kmeans(x, 2, init=init, reseed_empty=False)
    assert kept.tolist() == [0, 0, 0, 0] and float(c_kept[1, 0]) == 100.0
    re, c_re = kmeans(x, 2, init=init)
    assert re.tolist() == [0, 0, 0, 1]  # reseeded onto 5.0, the point farthest from its centroid
    torch.testing.assert_close(c_re, torch.tensor([[0.1], [5.0]]))


def test_kmeans_plus_plus_picks_distinct_points_and_handles_duplicates():
    x, _ = blobs(10, CENTERS, 0.1, seed=0)
    c = kmeans_plus_plus(x, 5, torch.Generator().manual_seed(0))
    # with well separated blobs, k-means++ lands one seed in each blob
    nearest = pairwise_sq_dist(c, CENTERS).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3, 4]
    dup = torch.zeros(4, 2)
    assign, cent = kmeans(dup, 3)
    assert assign.tolist() == [0, 0, 0, 0] and cent.shape == (3, 2)


def test_float64_and_2d_shapes():
    x, truth = blobs(15, CENTERS.double(), 0.2, seed=4)
    assign, cent = kmeans(x, 5)
    assert cent.dtype == torch.float64 and assign.dtype == torch.long
    assert same_partition(assign, truth)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_bad_k(k):
    with pytest.raises(EmergentSegError, match="k"):
        kmeans(torch.randn(10, 2), k)


def test_bad_init():
    with pytest.raises(EmergentSegError, match="init"):
        kmeans(torch.randn(10, 2), 3, init="random")
    with pytest.raises(EmergentSegError, match="init centroids"):
        kmeans(torch.randn(10, 2), 3, init=torch.zeros(2, 2))
