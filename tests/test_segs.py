"""Segments to SEGS (nodes/segs.py): Impact Pack's SEGS built from a segmentation."""
from __future__ import annotations

import pytest
import torch

from emergent_seg.core import masks
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.segmentation import Segmentation
from emergent_seg.nodes import segs as segs_node


def _seg():
    labels = torch.zeros(1, 40, 60, dtype=torch.int64)
    labels[0, 10:20, 5:15] = 1      # a 10x10 square
    labels[0, 30:32, 50:52] = 2     # a 2x2 speck
    return Segmentation.from_labels(labels).with_words([["sky", "cat", None]])


def test_items_carry_box_crop_mask_and_label():
    image = torch.rand(1, 40, 60, 3)
    (shape, items), = segs_node.run(_seg(), "1, 2", crop_factor=2.0, drop_size=1, image=image).outputs
    assert shape == (40, 60) and len(items) == 2
    cat, speck = items
    assert cat.label == "cat" and speck.label == "segment 2"
    assert cat.bbox == [5, 10, 15, 20] and cat.crop_region == [0, 5, 20, 25]
    assert cat.cropped_mask.shape == (20, 20) and cat.cropped_mask.sum() == 100
    assert cat.cropped_image.shape == (1, 20, 20, 3)
    assert torch.equal(cat.cropped_image[0], image[0, 5:25, 0:20])
    # the crop region is shifted to stay inside the image
    assert speck.crop_region[2] <= 60 and speck.crop_region[3] <= 40
    assert cat.control_net_wrapper is None and cat.confidence == 1.0


def test_selection_drop_size_and_no_image():
    (_, items), = segs_node.run(_seg(), "all", crop_factor=1.0, drop_size=5).outputs
    assert [it.label for it in items] == ["sky", "cat"]  # the 2x2 speck is dropped
    assert all(it.cropped_image is None for it in items)
    assert items[1].crop_region == items[1].bbox  # crop_factor 1 = the tight box
    (_, none), = segs_node.run(_seg(), "2", drop_size=5).outputs
    assert none == []


def test_bad_inputs_are_one_sentence():
    with pytest.raises(EmergentSegError, match="image_index 3"):
        segs_node.run(_seg(), image_index=3)
    with pytest.raises(EmergentSegError, match="connect the images that were segmented"):
        segs_node.run(_seg(), image=torch.rand(1, 10, 10, 3))
    with pytest.raises(EmergentSegError, match="crop_factor"):
        masks.segment_regions(_seg(), 0, [1], crop_factor=0.5)
    with pytest.raises(EmergentSegError, match="KL Merge"):
        segs_node.run(torch.zeros(1, 4, 4))


def test_crop_region_grows_around_the_centre():
    assert masks.crop_region((10, 10, 20, 20), 100, 100, 3.0) == (0, 0, 30, 30)
    assert masks.crop_region((40, 40, 60, 60), 100, 100, 2.0) == (30, 30, 70, 70)
    assert masks.crop_region((0, 0, 100, 50), 100, 50, 3.0) == (0, 0, 100, 50)
