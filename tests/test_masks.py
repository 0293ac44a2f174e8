"""Selection grammar, mask maths, overlay and UI payload of core/masks.py."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emergent_seg.core import masks as M
from emergent_seg.core.errors import EmergentSegError
from emergent_seg.core.segmentation import Segmentation

# Must equal PALETTE_FIRST6 in web/tests/overlay_logic.test.mjs.
PALETTE_FIRST6 = [[242, 170, 61], [96, 50, 199], [61, 242, 64], [199, 50, 91], [61, 164, 242], [178, 199, 50]]


def _quadrants(h: int = 32, w: int = 32) -> torch.Tensor:
    """[H,W] labels: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right (sizes differ when odd)."""
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[:, w // 2:] = 1
    lab[h // 2:, : w // 2] = 2
    lab[h // 2:, w // 2:] = 3
    return lab


def _seg_words() -> Segmentation:
    """One 40x40 image, 4 segments with areas 0: 600, 1: 400, 2: 300, 3: 300 and words."""
    lab = torch.zeros(1, 40, 40, dtype=torch.long)
    lab[0, :, 30:] = 1          # 40 x 10 = 400
    lab[0, 30:, :30] = 2        # 10 x 30 = 300
    lab[0, :10, :30] = 3        # 10 x 30 = 300 ; remaining 0 = 20 x 30 = 600
    seg = Segmentation.from_labels(lab)
    return seg.with_words([["sky", "Cat", None, "cat"]])


def _batch() -> Segmentation:
    """Image 0 with 4 segments (quadrants), image 1 with 2 segments (halves)."""
    a = _quadrants()
    b = torch.zeros(32, 32, dtype=torch.long)
    b[:, 16:] = 1
    return Segmentation(torch.stack([a, b]), (4, 2), words=(("sky", "cat", "grass", None), ("cat", "dog")))


# --- selection grammar ---------------------------------------------------------------------------

def test_indices_ranges_all():
    seg = _seg_words()
    assert M.parse_selection("0,3", seg) == [0, 3]
    assert M.parse_selection("3 0  1", seg) == [0, 1, 3]
    assert M.parse_selection("1-3", seg) == [1, 2, 3]
    assert M.parse_selection("3-1", seg) == [1, 2, 3]
    assert M.parse_selection("1 - 2", seg) == [1, 2]
    assert M.parse_selection("all", seg) == [0, 1, 2, 3]
    assert M.parse_selection("ALL", seg) == [0, 1, 2, 3]
    assert M.parse_selection("0,0,0", seg) == [0]


def test_largest_smallest_by_area_with_index_tiebreak():
    seg = _seg_words()
    assert M.parse_selection("largest:1", seg) == [0]
    assert M.parse_selection("largest", seg) == [0]
    assert M.parse_selection("largest:2", seg) == [0, 1]
    assert M.parse_selection("largest: 2", seg) == [0, 1]
    assert M.parse_selection("smallest:1", seg) == [2]  # 2 and 3 tie at 300 px; lower index wins
    assert M.parse_selection("smallest:2", seg) == [2, 3]
    assert M.parse_selection("largest:99", seg) == [0, 1, 2, 3]


def test_words_case_insensitive_and_repeated():
    seg = _seg_words()
    assert M.parse_selection("cat", seg) == [1, 3]
    assert M.parse_selection("CAT, sky", seg) == [0, 1, 3]
    assert M.parse_selection("sky and 2", seg) == [0, 2]


def test_exclusion_forms():
    seg = _seg_words()
    assert M.parse_selection("all except 2", seg) == [0, 1, 3]
    assert M.parse_selection("all except 2, 3", seg) == [0, 1]
    assert M.parse_selection("!2", seg) == [0, 1, 3]
    assert M.parse_selection("! 2", seg) == [0, 1, 3]
    assert M.parse_selection("not 0", seg) == [1, 2, 3]
    assert M.parse_selection("cat !3", seg) == [1]
    assert M.parse_selection("0-3 !cat", seg) == [0, 2]
    assert M.parse_selection("except largest:2", seg) == [2, 3]


def test_none_and_empty():
    seg = _seg_words()
    for text in ("", "   ", "none", " , "):
        with pytest.raises(EmergentSegError, match="selection is empty"):
            M.parse_selection(text, seg)
        assert M.parse_selection(text, seg, allow_empty=True) == []
    with pytest.raises(EmergentSegError, match="selects no segment in image 0"):
        M.parse_selection("all except 0-3", seg)
    assert M.parse_selection("all except 0-3", seg, allow_empty=True) == []


def test_error_index_out_of_range():
    seg = _seg_words()
    with pytest.raises(EmergentSegError) as e:
        M.parse_selection("0, 7", seg)
    assert str(e.value) == "segment 7 does not exist in image 0, which has 4 segments (0-3)"
    with pytest.raises(EmergentSegError, match=r"segments 2-9 do not all exist in image 0"):
        M.parse_selection("2-9", seg)
    with pytest.raises(EmergentSegError, match="segment 4 does not exist"):
        M.parse_selection("!4", seg)


def test_error_unknown_word_lists_known_words():
    with pytest.raises(EmergentSegError) as e:
        M.parse_selection("dog", _seg_words())
    assert str(e.value) == "no segment is labelled 'dog'; labelled words are: sky, cat"


def test_error_words_without_word_labels():
    seg = Segmentation.from_labels(_quadrants())
    with pytest.raises(EmergentSegError, match=r"no word labels; connect a prompt \(CLIP \+ prompt\) to Capture Attention"):
        M.parse_selection("cat", seg)
    none_words = seg.with_words([[None] * 4])
    with pytest.raises(EmergentSegError, match="no word labels"):
        M.parse_selection("cat", none_words)


@pytest.mark.parametrize("text, fragment", [
    ("0, #", "'#' is not a valid selection term"),
    ("1.5", "'1.5' is not a valid selection term"),
    ("-3", "write !3"),
    ("largest:x", "'largest:x' needs a whole number"),
    ("largest:0", "'largest:0' selects nothing"),
    ("not", "'not' must be followed"),
    ("all except", "'except' must be followed"),
    ("!", "'!' must be followed"),
    ("!!2", "'!!2' is not a valid selection term"),
    ("none, 2", "'none' cannot be combined"),
    ("1 except 2 except 3", "'except' may appear only once"),
])
def test_garbage_names_the_token(text, fragment):
    with pytest.raises(EmergentSegError, match=re.escape(fragment)) as e:
        M.parse_selection(text, _seg_words())
    assert M.selection_syntax_error(text) == str(e.value)  # caught without a segmentation too


def test_syntax_check_is_independent_of_counts():
    assert M.selection_syntax_error("0, 99, dog, largest:3, !2") is None
    assert M.selection_syntax_error("0 ; 3-5") is None
    assert "'@@' is not a valid" in M.selection_syntax_error("@@")


def test_batch_index_valid_in_one_image_only_names_that_image():
    seg = _batch()
    assert M.parse_selection("3", seg, 0) == [3]
    with pytest.raises(EmergentSegError) as e:
        M.resolve_selection(seg, "3")
    assert str(e.value).startswith("segment 3 does not exist in image 1, which has 2 segments (0-1)")
    assert "segment counts per image: 4, 2" in str(e.value)


def test_batch_words_resolve_per_image():
    seg = _batch()
    assert M.resolve_selection(seg, "cat") == [[1], [0]]
    # 'sky' exists in the batch but not in image 1: not a typo, so image 1 simply selects nothing...
    with pytest.raises(EmergentSegError, match="selects no segment in image 1"):
        M.resolve_selection(seg, "sky")
    assert M.resolve_selection(seg, "sky", allow_empty=True) == [[0], []]
    # ...while a word absent from every image is an error.
    with pytest.raises(EmergentSegError, match="no segment is labelled 'cow'"):
        M.resolve_selection(seg, "cow", allow_empty=True)


def test_image_out_of_batch():
    with pytest.raises(EmergentSegError, match="image 2 does not exist"):
        M.parse_selection("0", _batch(), 2)


def test_tooltip_mentions_every_form():
    for form in ("0,3,5", "2-4", "all", "largest:N", "smallest:N", "!2", "except", "not"):
        assert form in M.SELECTION_TOOLTIP


# --- masks ---------------------------------------------------------------------------------------

def test_segment_masks_and_index_batch_alignment():
    seg = _batch()
    masks, index = M.segment_masks(seg)
    assert masks.dtype == torch.float32 and masks.shape == (6, 32, 32)
    assert index == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert index == M.segment_index(seg)
    for row, (b, s) in enumerate(index):
        assert torch.equal(masks[row], (seg.labels[b] == s).float())
    # each image's rows partition it
    assert torch.equal(masks[:4].sum(0), torch.ones(32, 32))
    assert torch.equal(masks[4:].sum(0), torch.ones(32, 32))


def test_union_is_or_of_selected():
    seg = _batch()
    u = M.union_mask(seg, "0, 1")
    assert u.dtype == torch.float32 and u.shape == (2, 32, 32)
    masks, _ = M.segment_masks(seg)
    torch.testing.assert_close(u[0], torch.maximum(masks[0], masks[1]))
    torch.testing.assert_close(u[1], torch.ones(32, 32))
    assert torch.equal(M.union_mask(seg, "all"), torch.ones(2, 32, 32))
    u = M.union_mask(seg, "cat")
    assert torch.equal(u[0], masks[1]) and torch.equal(u[1], masks[4])


def test_selection_mask_empty_selection_gives_zeros_of_right_shape():
    seg = _batch()
    out = M.selection_mask(seg, [[], [1]])
    assert out.shape == (2, 32, 32) and out.dtype == torch.float32
    assert out[0].sum() == 0 and out[1].sum() == 32 * 16


def _square(size: int = 64, lo: int = 24, hi: int = 40) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, lo:hi, lo:hi] = 1.0
    return m


def test_grow_and_shrink_square():
    m = _square()
    area = m.sum().item()  # 16 x 16
    grown = M.grow_mask(m, 4)
    shrunk = M.grow_mask(m, -4)
    assert grown.shape == (1, 64, 64) and grown.dtype == torch.float32
    # growth stays within the 4-px square band and covers the 4-px disk band
    assert (24 * 24) >= grown.sum().item() >= area + 4 * 16 * 4 + math.pi * 16 * 0.8
    assert shrunk.sum().item() == 8 * 8  # erosion of a square by any convex disk-like shape
    assert torch.all(grown >= m) and torch.all(shrunk <= m)
    assert grown[0, 20, 32] == 1 and grown[0, 19, 32] == 0  # flat side moves exactly 4 px
    assert grown[0, 20, 20] == 0  # the corner is rounded, not square


def test_grow_zero_identity_and_extremes():
    m = _square()
    torch.testing.assert_close(M.grow_mask(m, 0), m)
    assert torch.equal(M.grow_mask(torch.zeros(2, 16, 16), 5), torch.zeros(2, 16, 16))
    assert torch.equal(M.grow_mask(torch.zeros(2, 16, 16), -5), torch.zeros(2, 16, 16))
    assert torch.equal(M.grow_mask(torch.ones(2, 16, 16), 5), torch.ones(2, 16, 16))
    assert torch.equal(M.grow_mask(torch.ones(2, 16, 16), -5), torch.ones(2, 16, 16))
    assert M.grow_mask(m, -9).sum() == 0


def test_grow_accepts_hw_and_large_radius():
    m = _square()[0]
    out = M.grow_mask(m, 100)
    assert out.shape == (1, 64, 64)
    assert torch.equal(out, torch.ones(1, 64, 64))


def test_grow_is_disk_like():
    m = torch.zeros(1, 101, 101)
    m[0, 50, 50] = 1
    r = 30
    g = M.grow_mask(m, r)
    assert abs(g.sum().item() - math.pi * r * r) / (math.pi * r * r) < 0.08
    assert g[0, 50, 50 + r] == 1 and g[0, 50, 50 + r + 1] == 0
    d = int(r / math.sqrt(2))
    assert g[0, 50 + d - 1, 50 + d - 1] == 1 and g[0, 50 + d + 2, 50 + d + 2] == 0


def test_feather_softens_edges_and_stays_in_range():
    m = _square()
    f = M.feather_mask(m, 6)
    assert f.shape == (1, 64, 64) and f.dtype == torch.float32
    assert f.min() >= 0 and f.max() <= 1
    assert 0.3 < f[0, 32, 24].item() < 0.7  # on the edge: about half
    assert f[0, 32, 32] > 0.95 and f[0, 32, 12] < 0.01
    assert ((f > 0.01) & (f < 0.99)).sum() > 0  # there is now a soft band
    assert torch.all(f[0, :, :17] == 0)  # nothing beyond px from an edge changes
    torch.testing.assert_close(M.feather_mask(m, 0), m)
    assert torch.equal(M.feather_mask(torch.ones(1, 8, 8), 20), torch.ones(1, 8, 8))
    with pytest.raises(EmergentSegError):
        M.feather_mask(m, -1)


def test_invert_and_refine_order():
    m = _square()
    torch.testing.assert_close(M.invert_mask(m), 1 - m)
    # invert first, then grow: the inverted mask grows into the square
    r = M.refine_mask(m, invert=True, grow=2)
    assert r.sum().item() == 64 * 64 - 12 * 12
    assert M.refine_mask(m).dtype == torch.float32


def test_as_bhw():
    assert M.as_bhw(torch.ones(5, 6)).shape == (1, 5, 6)
    assert M.as_bhw(torch.ones(2, 1, 5, 6)).shape == (2, 5, 6)
    out = M.as_bhw(torch.full((3, 4), 2.0, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.max() == 1.0


# --- palette, overlay --------------------------------------------------------------------------

def test_palette_fixed_and_distinct():
    p = M.palette(6)
    assert p.dtype == torch.uint8 and p.shape == (6, 3)
    assert p.tolist() == PALETTE_FIRST6
    many = M.palette(64).tolist()
    assert len({tuple(c) for c in many}) == 64
    assert M.palette(64)[:6].tolist() == PALETTE_FIRST6  # a prefix never depends on n
    assert M.palette(0).shape == (0, 3)


def test_overlay_shape_range_and_colours():
    seg = Segmentation.from_labels(_quadrants(64, 64).unsqueeze(0))
    img = torch.zeros(1, 3, 64, 64)
    ov = M.render_overlay(img, seg, alpha=1.0)
    assert ov.shape == (1, 3, 64, 64) and ov.dtype == torch.float32
    assert ov.min() >= 0 and ov.max() <= 1
    pal = M.palette(4).float() / 255
    # a pixel inside segment 1 (top-right), away from the label and boundary, has segment 1's colour
    torch.testing.assert_close(ov[0, :, 4, 60], pal[1])
    torch.testing.assert_close(ov[0, :, 60, 4], pal[2])
    # alpha 0.5 blends with the image
    ov_half = M.render_overlay(torch.ones(1, 3, 64, 64), seg, alpha=0.5)
    torch.testing.assert_close(ov_half[0, :, 4, 60], 0.5 + 0.5 * pal[1])


def test_overlay_boundary_drawn():
    seg = Segmentation.from_labels(_quadrants(64, 64).unsqueeze(0))
    ov = M.render_overlay(torch.ones(1, 3, 64, 64), seg, alpha=0.0)
    # the boundary column between left and right halves is dark; far from it the image is untouched
    assert ov[0, :, 4, 31].max() < 0.1
    torch.testing.assert_close(ov[0, :, 4, 20], torch.ones(3))


def test_overlay_draws_each_index_at_its_anchor():
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[0, :, 32:] = 1
    seg = Segmentation.from_labels(lab)
    ov = M.render_overlay(torch.zeros(1, 3, 64, 64), seg, alpha=0.0)  # black image, no colour
    anchors = M.segment_anchors(seg)[0]
    white = (ov[0] == 1.0).all(0)
    assert white.sum() > 0
    # exactly the glyph pixels of "0" and "1" are white, each near its segment's anchor
    glyph_pixels = int(M.text_bitmap("0").sum() + M.text_bitmap("1").sum())
    assert int(white.sum()) == glyph_pixels
    for k, (x, y) in enumerate(anchors):
        assert lab[0, y, x] == k
        ys, xs = torch.nonzero(white[max(0, y - 4): y + 5, max(0, x - 4): x + 5], as_tuple=True)
        assert ys.numel() == int(M.text_bitmap(str(k)).sum())


def test_text_bitmap_glyph_and_scale():
    zero = M.text_bitmap("0")
    assert zero.shape == (5, 3)
    assert zero.int().tolist() == [[1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 0, 1], [1, 1, 1]]
    ten = M.text_bitmap("10", scale=2)
    assert ten.shape == (10, 14)
    assert not ten[:, 6:8].any()  # the gap column, scaled


def test_overlay_selected_stronger_and_batch_broadcast():
    seg = _batch()
    img = torch.ones(1, 3, 32, 32)
    ov = M.render_overlay(img, seg, alpha=0.5, selected=[[0], [1]])
    assert ov.shape == (2, 3, 32, 32)
    # distance from white (the image) is larger for a selected segment than an unselected one
    sel = (1 - ov[0, :, 2, 2]).abs().sum()
    unsel = (1 - ov[0, :, 2, 29]).abs().sum()
    assert sel > 2 * unsel
    with pytest.raises(EmergentSegError, match="3 images for a segmentation of 2"):
        M.render_overlay(torch.ones(3, 3, 32, 32), seg)
    none_bg = M.render_overlay(None, seg)
    assert none_bg.shape == (2, 3, 32, 32) and none_bg.min() >= 0 and none_bg.max() <= 1


def test_overlay_image_of_other_size_gets_resized_labels():
    seg = Segmentation.from_labels(_quadrants(32, 32).unsqueeze(0))
    ov = M.render_overlay(torch.zeros(1, 3, 64, 64), seg, alpha=1.0)
    assert ov.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ov[0, :, 4, 60], M.palette(4)[1].float() / 255)


def test_anchor_inside_concave_segment():
    # an L-shaped segment 0: its centroid falls outside it, the anchor must not
    lab = torch.ones(1, 60, 60, dtype=torch.long)
    lab[0, :, :15] = 0
    lab[0, 45:, :] = 0
    seg = Segmentation.from_labels(lab)
    (x0, y0), (x1, y1) = M.segment_anchors(seg)[0]
    assert lab[0, y0, x0] == 0 and lab[0, y1, x1] == 1
    assert 15 + 10 <= x1 <= 60 - 10 and 10 <= y1 <= 45 - 10  # well inside the square


def test_anchor_tiny_segment_survives():
    lab = torch.zeros(1, 400, 400, dtype=torch.long)
    lab[0, 201, 203] = 1  # one pixel: vanishes at the 96-px anchor grid
    seg = Segmentation.from_labels(lab)
    assert M.segment_anchors(seg)[0][1] == (203, 201)


# --- ui payload ----------------------------------------------------------------------------------

def test_rle_round_trip_equals_nearest_downsample():
    seg = _batch()
    seg = Segmentation(torch.nn.functional.interpolate(seg.labels[:, None].float(), size=(300, 200),
                                                       mode="nearest")[:, 0].long(), seg.counts, seg.words)
    payload = M.ui_payload(seg, max_side=64)
    json.dumps(payload)  # JSON-safe
    assert len(payload) == 2
    for b, entry in enumerate(payload):
        assert (entry["width"], entry["height"]) == (200, 300)
        assert (entry["grid_h"], entry["grid_w"]) == (64, 43)
        grid = M.rle_decode(entry["labels_rle"], entry["grid_h"], entry["grid_w"])
        assert torch.equal(grid, M.downsample_labels(seg.labels[b], 64))
        ys = ((torch.arange(64) + 0.5) * 300 / 64).floor().long()
        xs = ((torch.arange(43) + 0.5) * 200 / 43).floor().long()
        assert torch.equal(grid, seg.labels[b][ys][:, xs])
    seg0 = payload[0]["segments"]
    assert [s["index"] for s in seg0] == [0, 1, 2, 3]
    assert [s["word"] for s in seg0] == ["sky", "cat", "grass", None]
    assert [s["color"] for s in seg0] == PALETTE_FIRST6[:4]
    assert math.isclose(sum(s["area"] for s in seg0), 1.0, abs_tol=1e-5)
    assert sum(s["pixels"] for s in seg0) == 300 * 200
    assert payload[1]["segments"][1]["word"] == "dog"


def test_payload_small_image_is_not_upsampled():
    seg = Segmentation.from_labels(_quadrants(8, 10).unsqueeze(0))
    entry = M.ui_payload(seg, max_side=128)[0]
    assert (entry["grid_h"], entry["grid_w"]) == (8, 10)
    assert torch.equal(M.rle_decode(entry["labels_rle"], 8, 10), seg.labels[0])
    assert entry["labels_rle"][:4] == [0, 5, 1, 5]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60))
def test_rle_round_trip_property(values):
    t = torch.tensor(values, dtype=torch.long).view(1, -1)
    rle = M.rle_encode(t)
    assert all(n > 0 for n in rle[1::2])
    assert all(a != b for a, b in zip(rle[0::2], rle[2::2]))  # maximal runs
    assert torch.equal(M.rle_decode(rle, 1, len(values)), t)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 5), st.integers(0, 5))
def test_grow_monotone_property(r, y, x):
    m = torch.zeros(1, 20, 20)
    m[0, 7 + y % 3: 12 + y, 7 + x % 3: 12 + x] = 1
    g, s = M.grow_mask(m, r), M.grow_mask(m, -r)
    assert torch.all(s <= m) and torch.all(m <= g)
    assert torch.all(M.grow_mask(m, r + 1) >= g)
    # opening (erode then dilate) never adds pixels
    assert torch.all(M.grow_mask(s, r) <= m)


# --- the JS mirror (web/js/overlay_logic.js) agrees with this module -----------------------------

_JS_PROBE = """
import * as L from "./web/js/overlay_logic.js";
const input = JSON.parse(process.argv[1]);
const out = { palette: L.palette(input.n), selections: {}, hits: [] };
for (const text of input.texts) out.selections[text] = [...L.evaluateSelection(text, input.entry)].sort((a, b) => a - b);
const grid = L.decodeRle(input.entry.labels_rle, input.entry.grid_w, input.entry.grid_h);
const rect = { x: 0, y: 0, w: input.entry.width, h: input.entry.height };
for (const [x, y] of input.points) out.hits.push(L.hitTest(input.entry, grid, rect, x, y));
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_mirror_matches_python():
    lab = torch.zeros(1, 90, 70, dtype=torch.long)
    lab[0, :, 40:] = 1
    lab[0, 60:, :25] = 2
    lab[0, 10:30, 10:20] = 3
    lab[0, 70:, 50:] = 4
    seg = Segmentation.from_labels(lab).with_words([["sky", "cat", None, "Cat", "grass"]])
    entry = M.ui_payload(seg, max_side=32)[0]
    texts = ["0,3", "1-3", "all", "largest:2", "smallest:2", "largest", "cat", "CAT sky", "all except 2, 3",
             "!2", "not 0", "cat !3", "0-4 !cat", "except largest:2", "2 - 4", "grass and 0"]
    gen = torch.Generator().manual_seed(0)
    points = (torch.rand(300, 2, generator=gen) * torch.tensor([70.0, 90.0])).tolist()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arg = json.dumps({"n": 300, "texts": texts, "entry": entry, "points": points})
    res = subprocess.run(["node", "--input-type=module", "-e", _JS_PROBE, arg], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["palette"] == M.palette(300).tolist()
    for text in texts:
        assert out["selections"][text] == M.parse_selection(text, seg), text
    grid = M.downsample_labels(seg.labels[0], 32)
    gh, gw = grid.shape
    for (x, y), hit in zip(points, out["hits"]):
        assert hit == int(grid[int(y * gh / 90), int(x * gw / 70)])
