"""Evaluation harness: ``python -m emergent_seg eval`` (and calibration of the shipped model).
It lives outside ``core/``: it reads datasets, prints, and parses arguments; core does none of that.

Scores every method with Hungarian-matched mIoU and pixel accuracy (core/metrics.py) under the two
protocols below, reported in separate columns because they are never
comparable:

* **per-image** (DiffSeg's protocol, ``utils.hungarian_matching``): each image's predicted segments
  are matched to its ground-truth classes on their own; TP/FP/FN are accumulated over the dataset.
* **dataset** (the "traditional" PiCIE/STEGO protocol, EmerDiff Table 1): predicted segments need
  ids that mean the same thing in every image, so each method's segments get one. Exactly:

  1. every predicted segment of every image gets a *mask embedding*: the mean, over the segment's
     pixels, of a per-pixel feature. For methods that run the model (DiffSeg, EmerDiff, the
     mapper, the random-weights baseline) the feature is EmerDiff's low-res feature (the queries
     ``to_q(norm2(h))`` of the first cross-attention layer of the 16x16 decoder block, clean latent
     noised to t_f = 1 with seed 0, the same features EmerDiff clusters), L2-normalised per cell;
     each pixel takes the feature of the grid cell it falls in (cell ``(y*h//H, x*w//W)``), so the
     mean is area-weighted. Aggregated self-attention rows are *not* used: they are distributions
     over key positions of the same image and carry no identity across images. The random-weights
     baseline uses its own (random) model's features, colour k-means and one-segment use the mean
     RGB colour;
  2. k-means (seeded k-means++, 5 restarts, lowest inertia kept) with ``K = number of classes``
     over all segment embeddings of the dataset, one point per segment (not weighted by area);
  3. each pixel takes its segment's cluster id, and ONE Hungarian matching over the dataset's
     accumulated ``classes x K`` confusion gives TP/FP/FN (``SegmentationScorer(protocol=
     "dataset")`` on the accumulated histogram, computed from per-image class x segment counts).

  This follows EmerDiff's traditional protocol as far as it goes without a trained linear probe.

On the **synthetic** scenes (fixture/scenes.py) the ground truth is per-image instances; their
textures give semantic classes (9, one texture per region, distinct within a scene), used for the
two protocols above. The headline synthetic number is the **instance mIoU**
(``metrics.score_instances``: each image matched on its own against its instance ids, mean over
images), which is what the quality thresholds in tests/test_quality.py refer to.

Datasets (``--data ROOT``):

* ``coco-stuff-27``: COCO val2017 images + stuffthingmaps (fine ids 0..181, 255 = unlabelled),
  restricted to the curated list ``Coco164kFull_Stuff_Coarse_7.txt`` (2,175 images); fine ids are
  mapped to 27 coarse classes with :data:`COCO_FINE_TO_COARSE` (the IIC/PiCIE/STEGO table; no
  pickle is read); 255 -> ignore.
* ``cityscapes``: ``leftImg8bit/val`` + ``gtFine/val *_gtFine_labelIds.png`` (500 images); ids 0-6
  (and anything outside 7..33) -> ignore, 7..33 -> 0..26.

Both are centre-cropped to a square of side min(H, W) and resized to 512 (images bilinear without
antialiasing as ``tf.image.resize``; labels nearest with half-pixel centres, ``nearest-exact``, as
``tf.image.resize(NEAREST_NEIGHBOR)``). A model whose native size is not 512 (the shipped 32 px
model) segments the image resized to its native size (bilinear, antialiased) and its labels are
resized back to 512 (nearest) for scoring.

Methods (``--methods``, comma separated):

=================  ==========================================================================
diffseg-fast       DiffSeg, matmul-form merge (the CLI default), calibrated settings
diffseg-parity     DiffSeg, the official float16 arithmetic
diffseg-refine     DiffSeg fast + the official k-means refinement
emerdiff           EmerDiff: low-res k-means (K = ``--clusters`` or the calibrated K) + mapper
emerdiff-lowres    the same low-res k-means masks, nearest-upsampled (the mapper's naive baseline)
emerdiff-lowres-bilinear  the same masks, bilinear-upsampled (one-hot, then argmax; the paper's baseline)
diffseg+mapper     DiffSeg fast, pooled to the mapper's grid (majority vote), then the mapper
diffseg-pooled     that pooled grid nearest-upsampled (the naive baseline of diffseg+mapper)
diffseg-pooled-bilinear  that pooled grid bilinear-upsampled
random             DiffSeg fast on a UNet of the same architecture with random weights (seed 0)
color-kmeans       k-means on RGB pixels with the true K (classes/instances present in the image)
one-segment        the whole image as one segment
=================  ==========================================================================
"""

from .calibration import (
                       CALIBRATION_SEED,
                       calibrate,
                       calibrate_mapper,
                       write_calibration,
)
from .cli import main
from .datasets import (
                       CITYSCAPES_NAMES,
                       COCO_COARSE_NAMES,
                       COCO_FINE_TO_COARSE,
                       COCO_LIST,
                       EVAL_SIZE,
                       CityscapesDataset,
                       CocoStuff27Dataset,
                       Sample,
                       SyntheticDataset,
                       centre_crop_resize,
                       cityscapes_to_27,
                       coco_fine_to_coarse,
                       open_dataset,
)
from .methods import (
                       DEFAULT_METHODS,
                       METHODS,
                       MethodSpec,
                       diffseg_settings,
                       emerdiff_settings,
                       model_size,
                       parse_methods,
                       random_backend,
                       segment_colours,
                       segment_features,
)
from .report import format_table
from .scoring import Evaluation, evaluate

__all__ = [
    "Sample", "SyntheticDataset", "CocoStuff27Dataset", "CityscapesDataset", "open_dataset", "EVAL_SIZE",
    "COCO_FINE_TO_COARSE", "COCO_COARSE_NAMES", "COCO_LIST", "CITYSCAPES_NAMES", "coco_fine_to_coarse",
    "cityscapes_to_27", "centre_crop_resize", "METHODS", "MethodSpec", "DEFAULT_METHODS", "parse_methods",
    "emerdiff_settings", "model_size", "diffseg_settings", "random_backend",
    "segment_colours", "segment_features", "Evaluation", "evaluate", "format_table", "calibrate",
    "calibrate_mapper", "write_calibration", "CALIBRATION_SEED", "main",
]
