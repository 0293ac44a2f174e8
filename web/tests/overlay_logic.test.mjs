import { test } from "node:test";
import assert from "node:assert/strict";

import {
  canvasToImage,
  clampPage,
  cssColor,
  decodeRle,
  evaluateSelection,
  fitRect,
  highlightPixels,
  hitTest,
  legendRows,
  palette,
  paletteColor,
  parseSelection,
  toggleSelection,
} from "../js/overlay_logic.js";

// Must equal PALETTE_FIRST6 in tests/test_masks.py (core.masks.palette(6)).
const PALETTE_FIRST6 = [[242, 170, 61], [96, 50, 199], [61, 242, 64], [199, 50, 91], [61, 164, 242], [178, 199, 50]];

// A 4x4 image, grid 2x2 in cells: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
// Words: 0 sky, 1 cat, 2 null, 3 cat; pixel areas 0: 6, 1: 4, 2: 3, 3: 3 (as if at full res).
function entry4() {
  return {
    image: 0, width: 4, height: 4, grid_w: 2, grid_h: 2,
    labels_rle: [0, 1, 1, 1, 2, 1, 3, 1],
    segments: [
      { index: 0, word: "sky", color: PALETTE_FIRST6[0], area: 6 / 16, pixels: 6 },
      { index: 1, word: "Cat", color: PALETTE_FIRST6[1], area: 4 / 16, pixels: 4 },
      { index: 2, word: null, color: PALETTE_FIRST6[2], area: 3 / 16, pixels: 3 },
      { index: 3, word: "cat", color: PALETTE_FIRST6[3], area: 3 / 16, pixels: 3 },
    ],
  };
}

const sorted = (set) => [...set].sort((a, b) => a - b);

test("palette matches the Python palette bit for bit", () => {
  assert.deepEqual(palette(6), PALETTE_FIRST6);
  assert.deepEqual(paletteColor(4), PALETTE_FIRST6[4]);
  const many = palette(64).map((c) => c.join(","));
  assert.equal(new Set(many).size, 64);
  for (const c of palette(64)) for (const v of c) assert.ok(Number.isInteger(v) && v >= 0 && v <= 255);
  assert.equal(cssColor([1, 2, 3]), "rgb(1, 2, 3)");
});

test("RLE decode", () => {
  assert.deepEqual([...decodeRle([0, 3, 2, 1, 1, 2], 3, 2)], [0, 0, 0, 2, 1, 1]);
  assert.deepEqual([...decodeRle(entry4().labels_rle, 2, 2)], [0, 1, 2, 3]);
  assert.throws(() => decodeRle([0, 3], 2, 2), /covers 3 cells, expected 4/);
  assert.throws(() => decodeRle([0, 5], 2, 2), /longer than the grid/);
});

test("fitRect letterboxes and centres", () => {
  assert.deepEqual(fitRect(4, 4, 100, 50), { x: 25, y: 0, w: 50, h: 50, scale: 12.5 });
  assert.deepEqual(fitRect(200, 100, 100, 100), { x: 0, y: 25, w: 100, h: 50, scale: 0.5 });
  assert.equal(fitRect(0, 4, 100, 50).w, 0);
});

test("hit test maps canvas to segment through the letterbox", () => {
  const e = entry4();
  const grid = decodeRle(e.labels_rle, e.grid_w, e.grid_h);
  const rect = fitRect(e.width, e.height, 100, 50); // x 25..75, y 0..50
  assert.equal(hitTest(e, grid, rect, 30, 5), 0);
  assert.equal(hitTest(e, grid, rect, 70, 5), 1);
  assert.equal(hitTest(e, grid, rect, 30, 45), 2);
  assert.equal(hitTest(e, grid, rect, 74.9, 49.9), 3);
  assert.equal(hitTest(e, grid, rect, 49.9, 24.9), 0); // just before the centre lines
  assert.equal(hitTest(e, grid, rect, 50, 25), 3);
  // letterbox bars and outside the canvas
  assert.equal(hitTest(e, grid, rect, 10, 25), null);
  assert.equal(hitTest(e, grid, rect, 80, 25), null);
  assert.equal(hitTest(e, grid, rect, 75, 25), null);
  assert.equal(hitTest(e, grid, rect, 50, -1), null);
  assert.equal(hitTest(e, grid, rect, 50, 50), null);
  assert.equal(canvasToImage({ x: 0, y: 0, w: 0, h: 0 }, 0, 0, 4, 4), null);
});

test("hit test uses the same cell mapping as ui_payload when the grid is smaller than the image", () => {
  // 10 px wide, grid 4 cells: the point x (continuous, 0..10) lies in cell floor(x*4/10), the cell
  // whose sampled centre is nearest.
  const e = { width: 10, height: 1, grid_w: 4, grid_h: 1, labels_rle: [0, 1, 1, 1, 2, 1, 3, 1], segments: [] };
  const grid = decodeRle(e.labels_rle, 4, 1);
  const rect = { x: 0, y: 0, w: 10, h: 1 };
  const cells = [...Array(10).keys()].map((x) => hitTest(e, grid, rect, x + 0.5, 0.5));
  assert.deepEqual(cells, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]);
});

test("parseSelection and evaluateSelection mirror the Python grammar", () => {
  const e = entry4();
  const ev = (t) => sorted(evaluateSelection(t, e));
  assert.deepEqual(ev("0,3"), [0, 3]);
  assert.deepEqual(ev("1 - 3"), [1, 2, 3]);
  assert.deepEqual(ev("3-1"), [1, 2, 3]);
  assert.deepEqual(ev("ALL"), [0, 1, 2, 3]);
  assert.deepEqual(ev("largest:2"), [0, 1]);
  assert.deepEqual(ev("largest"), [0]);
  assert.deepEqual(ev("smallest:1"), [2]); // tie at 3 px: lower index
  assert.deepEqual(ev("CAT"), [1, 3]);
  assert.deepEqual(ev("all except 2, 3"), [0, 1]);
  assert.deepEqual(ev("!2"), [0, 1, 3]);
  assert.deepEqual(ev("not 0"), [1, 2, 3]);
  assert.deepEqual(ev("cat !3"), [1]);
  assert.deepEqual(ev("sky and 2"), [0, 2]);
  assert.deepEqual(ev(""), []);
  assert.deepEqual(ev("none"), []);
  assert.deepEqual(ev("9"), []); // the backend reports it; the frontend just selects nothing
  const p = parseSelection("0, #, -3");
  assert.deepEqual(p.raw, ["#", "-3"]);
  assert.deepEqual(ev("#"), []);
});

test("toggle: plain index lists stay sorted and canonical", () => {
  const e = entry4();
  assert.equal(toggleSelection("", 2, e), "2");
  assert.equal(toggleSelection("none", 2, e), "2");
  assert.equal(toggleSelection("3,0", 1, e), "0, 1, 3");
  assert.equal(toggleSelection("0, 1, 3", 1, e), "0, 3");
  assert.equal(toggleSelection("2", 2, e), "");
  assert.equal(toggleSelection("0,1,3", 2, e), "all");
  assert.equal(toggleSelection("1-3", 0, e), "all");
});

test("toggle: 'all', ranges and largest expand to the explicit list first", () => {
  const e = entry4();
  assert.equal(toggleSelection("all", 2, e), "0, 1, 3");
  assert.equal(toggleSelection("0-2", 1, e), "0, 2");
  assert.equal(toggleSelection("largest:2", 2, e), "0, 1, 2");
  assert.equal(toggleSelection("!0", 0, e), "all");
  assert.equal(toggleSelection("all except 1", 2, e), "0, 3");
});

test("toggle: words are preserved", () => {
  const e = entry4();
  assert.equal(toggleSelection("cat", 0, e), "cat, 0");
  assert.equal(toggleSelection("cat", 1, e), "cat, !1"); // deselecting a word's segment
  assert.equal(toggleSelection("cat, !1", 1, e), "cat"); // and selecting it again
  assert.equal(toggleSelection("cat, 0", 0, e), "cat");
  assert.equal(toggleSelection("sky", 0, e), "");
  // an excluding word that covers the clicked segment becomes explicit exclusions of the rest
  assert.equal(toggleSelection("all !cat", 1, e), "0, 1, 2");
  assert.equal(toggleSelection("!cat", 0, e), "2");
  assert.equal(toggleSelection("!cat", 3, e), "0, 2, 3");
  // a positive and a negative word
  assert.equal(toggleSelection("cat sky !cat", 2, e), "cat, sky, 2, !cat");
});

test("toggle keeps tokens it cannot read, verbatim", () => {
  const e = entry4();
  assert.equal(toggleSelection("0, #", 1, e), "0, 1, #");
  assert.equal(toggleSelection("#", 1, e), "1, #");
});

test("toggle round trip: clicking twice restores the selected set", () => {
  const e = entry4();
  for (const start of ["", "0", "0,2", "all", "cat", "cat, 0", "!1", "largest:2", "sky cat !3"]) {
    for (let i = 0; i < 4; i++) {
      const once = toggleSelection(start, i, e);
      const before = evaluateSelection(start, e);
      const after = evaluateSelection(once, e);
      assert.equal(after.has(i), !before.has(i), `${start} toggle ${i} -> ${once}`);
      for (let j = 0; j < 4; j++) if (j !== i) assert.equal(after.has(j), before.has(j), `${start} / ${i} keeps ${j}`);
      const twice = toggleSelection(once, i, e);
      assert.deepEqual(sorted(evaluateSelection(twice, e)), sorted(before), `${start} ${i} ${once} ${twice}`);
    }
  }
});

test("legend rows", () => {
  const e = entry4();
  const rows = legendRows(e, new Set([1, 3]), 2);
  assert.equal(rows.length, 4);
  assert.deepEqual(rows.map((r) => r.label), ["0 sky", "1 Cat", "2", "3 cat"]);
  assert.deepEqual(rows.map((r) => r.selected), [false, true, false, true]);
  assert.deepEqual(rows.map((r) => r.hovered), [false, false, true, false]);
  assert.equal(rows[0].css, "rgb(242, 170, 61)");
  assert.equal(rows[0].areaText, "37.5%");
  assert.equal(rows[2].word, null);
  // colour falls back to the palette when the payload lacks one
  const noColour = { ...e, segments: [{ index: 4, word: null, area: 0 }] };
  assert.deepEqual(legendRows(noColour)[0].color, PALETTE_FIRST6[4]);
});

test("highlight pixels: selected tinted, hovered white, others clear", () => {
  const e = entry4();
  const grid = decodeRle(e.labels_rle, 2, 2);
  const px = highlightPixels(e, grid, new Set([1]), 2);
  assert.deepEqual([...px.slice(0, 4)], [0, 0, 0, 0]);
  assert.deepEqual([...px.slice(4, 8)], [...PALETTE_FIRST6[1], 90]);
  assert.deepEqual([...px.slice(8, 12)], [255, 255, 255, 120]);
  assert.deepEqual([...px.slice(12, 16)], [0, 0, 0, 0]);
});

test("clampPage", () => {
  assert.equal(clampPage(5, 3), 2);
  assert.equal(clampPage(-1, 3), 0);
  assert.equal(clampPage(1, 0), 0);
});
