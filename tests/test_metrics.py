"""Hungarian matching and segmentation scores, against hand-computed values and brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from emergent_seg.core.metrics import (SegmentationScorer, confusion, hungarian, instance_scores,
                                       per_image_scores, score_instances)


def _brute_force(w: np.ndarray, maximize: bool) -> float:
    n, m = w.shape
    best = None
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            s = sum(w[i, c] for i, c in enumerate(cols))
            best = s if best is None else (max(best, s) if maximize else min(best, s))
    else:
        for rows in itertools.permutations(range(n), m):
            s = sum(w[r, j] for j, r in enumerate(rows))
            best = s if best is None else (max(best, s) if maximize else min(best, s))
    return float(best)


def _check_assignment(w: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    assert len(rows) == len(cols) == min(w.shape)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert np.all(np.diff(rows) > 0)


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.integers(0, 9)),
       st.booleans())
def test_hungarian_matches_brute_force(w: np.ndarray, maximize: bool) -> None:
    rows, cols = hungarian(w, maximize=maximize)
    _check_assignment(w, rows, cols)
    assert w[rows, cols].sum() == pytest.approx(_brute_force(w, maximize))


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 6)),
              elements=st.floats(-100, 100, allow_nan=False)))
def test_hungarian_real_weights(w: np.ndarray) -> None:
    rows, cols = hungarian(w)
    _check_assignment(w, rows, cols)
    assert w[rows, cols].sum() == pytest.approx(_brute_force(w, True), abs=1e-9)


def test_hungarian_agrees_with_scipy_on_larger_matrices() -> None:
    lsa = pytest.importorskip("scipy.optimize").linear_sum_assignment
    rng = np.random.default_rng(0)
    for n, m in [(27, 27), (27, 40), (40, 27), (60, 60), (1, 30)]:
        w = rng.integers(0, 1000, size=(n, m)).astype(np.float64)
        rows, cols = hungarian(w)
        _check_assignment(w, rows, cols)
        r2, c2 = lsa(w, maximize=True)
        assert w[rows, cols].sum() == w[r2, c2].sum()


def test_hungarian_non_square_explicit() -> None:
    w = np.array([[1, 9, 3, 0, 2],
                  [8, 7, 1, 1, 1],
                  [2, 2, 2, 6, 9]])
    rows, cols = hungarian(w)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 4]
    rows, cols = hungarian(w.T)
    assert rows.tolist() == [0, 1, 4] and cols.tolist() == [1, 0, 2]
    rows, cols = hungarian(w, maximize=False)
    assert w[rows, cols].sum() == 0 + 1 + 2


def test_hungarian_empty_and_torch_input() -> None:
    rows, cols = hungarian(np.zeros((0, 3)))
    assert rows.size == 0 and cols.size == 0
    rows, cols = hungarian(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert cols.tolist() == [1, 0]


def test_confusion_is_fast_hist() -> None:
    gt = np.array([0, 0, 1, 2, 255, -1])
    pred = np.array([0, 3, 3, 1, 0, 2])
    hist = confusion(gt, pred, 3)
    assert hist.shape == (3, 4)  # columns = max(num_classes, pred.max()+1)
    expected = np.zeros((3, 4), dtype=np.int64)
    expected[0, 0] = expected[0, 3] = expected[1, 3] = expected[2, 1] = 1
    np.testing.assert_array_equal(hist, expected)


def _gt() -> np.ndarray:
    return np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 2, 2],
                     [2, 2, 2, 2]])


@pytest.mark.parametrize("protocol", ["per_image", "dataset"])
def test_perfect_prediction_scores_one(protocol: str) -> None:
    scorer = SegmentationScorer(3, protocol=protocol)
    scorer.update(_gt(), _gt())
    out = scorer.compute()
    assert out["miou"] == 1.0 and out["acc"] == 1.0
    assert out["protocol"] == protocol and out["images"] == 1 and out["pixels"] == 16
    assert score_instances([_gt()], [_gt()])["miou"] == 1.0


def test_permuted_labels_score_one() -> None:
    perm = np.array([7, 2, 4])  # arbitrary, non-contiguous cluster ids
    pred = perm[_gt()]
    scorer = SegmentationScorer(3)
    scorer.update(torch.from_numpy(pred), torch.from_numpy(_gt()))
    assert scorer.compute()["miou"] == 1.0
    assert score_instances(pred[None], _gt()[None])["miou"] == 1.0
    assert instance_scores(pred, _gt())["acc"] == 1.0


def test_three_by_three_by_hand() -> None:
    gt = np.array([[0, 0, 1],
                   [0, 1, 1],
                   [2, 2, 2]])
    pred = np.array([[5, 5, 5],
                     [5, 7, 7],
                     [7, 7, 9]])
    # hist (rows gt 0,1,2; cols pred 5,7,9) = [[3,0,0],[1,2,0],[0,2,1]]; best match 0-5, 1-7, 2-9.
    # tp = [3,2,1]; fp = colsum - tp = [4-3, 4-2, 1-1]; fn = rowsum - tp = [0, 1, 2]
    tp, fp, fn = per_image_scores(pred, gt, 3)
    assert tp.tolist() == [3, 2, 1] and fp.tolist() == [1, 2, 0] and fn.tolist() == [0, 1, 2]
    expected_miou = (3 / 4 + 2 / 5 + 1 / 3) / 3
    scorer = SegmentationScorer(3)
    scorer.update(pred, gt)
    out = scorer.compute()
    assert out["miou"] == pytest.approx(expected_miou)
    assert out["acc"] == pytest.approx(6 / 9)
    inst = instance_scores(pred, gt)
    assert inst["miou"] == pytest.approx(expected_miou) and inst["acc"] == pytest.approx(6 / 9)
    assert inst["iou"] == pytest.approx({0: 0.75, 1: 0.4, 2: 1 / 3})


def test_unmatched_extra_cluster_counts_as_fn_only() -> None:
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 2], [1, 1]])  # cluster 2 splits off one background pixel
    tp, fp, fn = per_image_scores(pred, gt, 2)  # 3 clusters > 2 classes: cluster 2 is unmatched
    assert tp.tolist() == [1, 2] and fp.tolist() == [0, 0] and fn.tolist() == [1, 0]
    scorer = SegmentationScorer(2)
    scorer.update(pred, gt)
    assert scorer.compute()["miou"] == pytest.approx((1 / 2 + 1) / 2)
    assert scorer.compute()["acc"] == pytest.approx(3 / 4)
    assert score_instances([pred], [gt])["miou"] == pytest.approx(0.75)


def test_leftover_cluster_matched_to_absent_class_is_fp() -> None:
    # Official DiffSeg behaviour: with num_classes >= #clusters every cluster gets a class row,
    # so the extra cluster lands on class 2 (absent from this image) as a false positive.
    gt = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 2], [1, 1]])
    tp, fp, fn = per_image_scores(pred, gt, 3)
    assert tp.tolist() == [1, 2, 0] and fp.tolist() == [0, 0, 1] and fn.tolist() == [1, 0, 0]
    scorer = SegmentationScorer(3)
    scorer.update(pred, gt)
    assert scorer.compute()["miou"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_absent_class_without_predictions_is_nan_and_skipped() -> None:
    scorer = SegmentationScorer(4)
    scorer.update(_gt(), _gt())
    out = scorer.compute()
    assert np.isnan(out["iou"][3]) and out["miou"] == 1.0


def test_ignore_labels_are_excluded() -> None:
    gt = np.array([[0, 255], [1, -1]])
    pred = np.array([[0, 1], [1, 0]])
    scorer = SegmentationScorer(2)
    scorer.update(pred, gt)
    out = scorer.compute()
    assert out["miou"] == 1.0 and out["acc"] == 1.0 and out["pixels"] == 2
    inst = instance_scores(pred, gt)
    assert inst["miou"] == 1.0 and set(inst["iou"]) == {0, 1}
    assert np.isnan(instance_scores(pred, np.full((2, 2), 255))["miou"])


def test_missed_ground_truth_instance_scores_zero() -> None:
    gt = np.array([[0, 0], [1, 2]])
    pred = np.zeros((2, 2), dtype=np.int64)
    inst = instance_scores(pred, gt)
    assert inst["iou"] == pytest.approx({0: 0.5, 1: 0.0, 2: 0.0})
    assert inst["miou"] == pytest.approx(0.5 / 3) and inst["acc"] == pytest.approx(0.5)


def test_dataset_protocol_uses_one_matching() -> None:
    gt = np.array([[0, 1]])
    per_image = SegmentationScorer(2, "per_image")
    dataset = SegmentationScorer(2, "dataset")
    for pred in (np.array([[0, 1]]), np.array([[1, 0]])):  # ids swap between the two images
        per_image.update(pred, gt)
        dataset.update(pred, gt)
    assert per_image.compute()["miou"] == 1.0
    out = dataset.compute()
    assert out["acc"] == pytest.approx(0.5) and out["miou"] == pytest.approx(1 / 3)
    # Consistent ids across images: dataset matching is as good as per-image matching.
    consistent = SegmentationScorer(2, "dataset")
    consistent.update(np.stack([np.array([[1, 0]])] * 2), np.stack([gt] * 2))
    assert consistent.compute()["miou"] == 1.0


def test_per_image_accumulates_over_batch() -> None:
    gts = np.stack([_gt(), _gt()])
    preds = np.stack([_gt(), np.zeros((4, 4), dtype=np.int64)])
    scorer = SegmentationScorer(3)
    scorer.update(preds, gts)
    out = scorer.compute()
    # image 2: everything in one cluster, matched to class 2 (8 px): tp 8, fp 8 on class 2, fn 4+4.
    assert out["tp"] == [4, 4, 16] and out["fp"] == [0, 0, 8] and out["fn"] == [4, 4, 0]
    assert out["acc"] == pytest.approx(24 / 32)
    inst = score_instances(preds, gts)
    assert inst["miou"] == pytest.approx((1.0 + (0 + 0 + 8 / 16) / 3) / 2)
    assert inst["images"] == 2


def test_scorer_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        SegmentationScorer(3, protocol="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SegmentationScorer(3).update(np.zeros((2, 2)), np.zeros((3, 3)))
