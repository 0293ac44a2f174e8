// Pure logic for the emergent_seg overlay: no DOM, no ComfyUI imports, no side effects on import
// (ComfyUI imports every .js under web/, and `node --test web/tests/` imports this file directly).
//
// Mirrors core/masks.py: palette() bit for bit, the label-grid sampling of ui_payload(), and the
// selection grammar (SELECTION_TOOLTIP) without its error checks.

export const GOLDEN = 0.618033988749895;

/** Colour of segment index i as [r, g, b] integers 0-255; identical to core.masks.palette. */
export function paletteColor(i) {
  const h = (i * GOLDEN + 0.1) % 1.0;
  const s = 0.75;
  const v = i % 2 === 0 ? 0.95 : 0.78;
  const h6 = h * 6.0;
  const sector = Math.floor(h6);
  const f = h6 - sector;
  const p = v * (1.0 - s);
  const q = v * (1.0 - s * f);
  const t = v * (1.0 - s * (1.0 - f));
  const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][sector % 6];
  // Half-up rounding, as Python's floor(x * 255 + 0.5) (Math.round differs on negatives only,
  // but keep the exact same expression).
  return rgb.map((c) => Math.floor(c * 255.0 + 0.5));
}

export function palette(n) {
  return Array.from({ length: n }, (_, i) => paletteColor(i));
}

export function cssColor([r, g, b]) {
  return `rgb(${r | 0}, ${g | 0}, ${b | 0})`;
}

/** Decode [v0, n0, v1, n1, ...] into an Int32Array of width*height cells (row-major). */
export function decodeRle(rle, width, height) {
  const out = new Int32Array(width * height);
  let pos = 0;
  for (let k = 0; k + 1 < rle.length; k += 2) {
    const value = rle[k];
    const run = rle[k + 1];
    if (pos + run > out.length) throw new Error("run-length code is longer than the grid");
    out.fill(value, pos, pos + run);
    pos += run;
  }
  if (pos !== out.length) throw new Error(`run-length code covers ${pos} cells, expected ${out.length}`);
  return out;
}

/** The rectangle an image of imgW x imgH occupies when fitted (letterboxed) into boxW x boxH. */
export function fitRect(imgW, imgH, boxW, boxH) {
  if (!(imgW > 0 && imgH > 0 && boxW > 0 && boxH > 0)) return { x: 0, y: 0, w: 0, h: 0, scale: 0 };
  const scale = Math.min(boxW / imgW, boxH / imgH);
  const w = imgW * scale;
  const h = imgH * scale;
  return { x: (boxW - w) / 2, y: (boxH - h) / 2, w, h, scale };
}

/** Canvas point -> image pixel coordinates (floats), or null outside the drawn image. */
export function canvasToImage(rect, cx, cy, imgW, imgH) {
  if (!(rect.w > 0 && rect.h > 0)) return null;
  if (cx < rect.x || cy < rect.y || cx >= rect.x + rect.w || cy >= rect.y + rect.h) return null;
  return { x: ((cx - rect.x) / rect.w) * imgW, y: ((cy - rect.y) / rect.h) * imgH };
}

/**
 * Segment index under a canvas point, or null outside the image.
 * entry: one ui_payload item; grid: decodeRle(entry.labels_rle, entry.grid_w, entry.grid_h);
 * rect: where the image is drawn on the canvas (fitRect).
 * Pixel (x, y) lies in cell (floor(y*grid_h/H), floor(x*grid_w/W)), as in core.masks.ui_payload.
 */
export function hitTest(entry, grid, rect, cx, cy) {
  const p = canvasToImage(rect, cx, cy, entry.width, entry.height);
  if (!p) return null;
  const gx = Math.min(entry.grid_w - 1, Math.floor((p.x * entry.grid_w) / entry.width));
  const gy = Math.min(entry.grid_h - 1, Math.floor((p.y * entry.grid_h) / entry.height));
  const v = grid[gy * entry.grid_w + gx];
  return v === undefined ? null : v;
}

// ------------------------------------------------------------------------------------------------
// Selection grammar (see SELECTION_TOOLTIP in core/masks.py)
// ------------------------------------------------------------------------------------------------

const RE_INDEX = /^\d+$/;
const RE_RANGE = /^(\d+)-(\d+)$/;
const RE_RANK = /^(largest|smallest)(?::(\d+))?$/;
const RE_WORD = /^[\p{L}\p{M}][\p{L}\p{M}\p{N}_'-]*$/u;

function normalise(text) {
  return text
    .replace(/\s*:\s*/g, ":")
    .replace(/(?<=\d)(?:\s+-\s+|-\s+)(?=\d)/g, "-")
    .replace(/!\s+/g, "!");
}

function parseTerm(body) {
  const low = body.toLowerCase();
  if (low === "all" || low === "*") return { kind: "all" };
  if (RE_INDEX.test(low)) return { kind: "index", a: Number(low) };
  let m = RE_RANGE.exec(low);
  if (m) {
    const a = Number(m[1]);
    const b = Number(m[2]);
    return { kind: "range", a: Math.min(a, b), b: Math.max(a, b) };
  }
  m = RE_RANK.exec(low);
  if (m) {
    const n = m[2] === undefined ? 1 : Number(m[2]);
    return n >= 1 ? { kind: m[1], a: n } : null;
  }
  if (RE_WORD.test(body)) return { kind: "word", word: low };
  return null;
}

/**
 * Parse a selection string: {none, include: Term[], exclude: Term[], raw: string[]}.
 * Tokens the grammar rejects are kept verbatim in `raw` (the backend reports them); they select
 * nothing here.
 */
export function parseSelection(text) {
  const tokens = normalise(String(text ?? "").trim()).split(/[\s,;]+/).filter(Boolean);
  const result = { none: false, include: [], exclude: [], raw: [] };
  if (tokens.length === 0 || (tokens.length === 1 && tokens[0].toLowerCase() === "none")) {
    result.none = true;
    return result;
  }
  let negateNext = false;
  let exceptMode = false;
  for (const token of tokens) {
    const low = token.toLowerCase();
    if (low === "and" || low === "or" || low === "+") continue;
    if (low === "except") { exceptMode = true; continue; }
    if (low === "not") { negateNext = true; continue; }
    const negated = token.startsWith("!");
    const term = parseTerm(negated ? token.slice(1) : token);
    if (term === null || low === "none") {
      result.raw.push(negateNext ? `not ${token}` : token);
    } else if (negated || negateNext || exceptMode) {
      result.exclude.push(term);
    } else {
      result.include.push(term);
    }
    negateNext = false;
  }
  return result;
}

function segmentCount(entry) {
  return entry.segments.length;
}

function areaOf(seg) {
  return seg.pixels ?? seg.area ?? 0;
}

function wordSegments(entry, word) {
  const out = [];
  for (const s of entry.segments) if (s.word != null && String(s.word).toLowerCase() === word) out.push(s.index);
  return out;
}

function termSegments(term, entry) {
  const n = segmentCount(entry);
  const inRange = (i) => i >= 0 && i < n;
  switch (term.kind) {
    case "all":
      return [...Array(n).keys()];
    case "index":
      return inRange(term.a) ? [term.a] : [];
    case "range": {
      const out = [];
      for (let i = term.a; i <= term.b && i < n; i++) out.push(i);
      return out;
    }
    case "largest":
    case "smallest": {
      const sign = term.kind === "largest" ? -1 : 1;
      const order = entry.segments
        .map((s) => s.index)
        .sort((i, j) => sign * (areaOf(entry.segments[i]) - areaOf(entry.segments[j])) || i - j);
      return order.slice(0, term.a);
    }
    case "word":
      return wordSegments(entry, term.word);
    default:
      return [];
  }
}

function unionOf(terms, entry) {
  const out = new Set();
  for (const t of terms) for (const i of termSegments(t, entry)) out.add(i);
  return out;
}

/** The set of segment indices a selection string selects in one image (a ui_payload entry). */
export function evaluateSelection(text, entry) {
  const parsed = typeof text === "string" || text == null ? parseSelection(text) : text;
  if (parsed.none) return new Set();
  const chosen = parsed.include.length || parsed.raw.length
    ? unionOf(parsed.include, entry)
    : new Set([...Array(segmentCount(entry)).keys()]);
  for (const i of unionOf(parsed.exclude, entry)) chosen.delete(i);
  return chosen;
}

/**
 * Toggle segment `index` in a selection string, for the image `entry` that was clicked.
 *
 * Rules (the result is canonical: ", "-separated, words first, then sorted indices, then
 * exclusions, then any tokens the grammar rejects, verbatim):
 * 1. Words stay words (`cat`, `!sky`). Everything else (`all`, ranges, `largest:N`, an implied
 *    "all" when there are only exclusions) is expanded to explicit indices for this image.
 * 2. A selected segment is deselected: its index is removed; if a word still selects it, `!i` is
 *    added.
 * 3. An unselected segment is selected: a `!i` is removed; an excluding word that covers it is
 *    replaced by `!j` for its other segments; `i` is added unless a word already selects it.
 * 4. Redundant terms are dropped (indices that are excluded anyway, exclusions that remove
 *    nothing). Every segment selected and no words -> "all"; nothing selected -> "".
 */
export function toggleSelection(text, index, entry) {
  const parsed = parseSelection(text);
  const n = segmentCount(entry);
  const posWords = [];
  const negWords = [];
  const addWord = (list, w) => { if (!list.includes(w)) list.push(w); };
  let posIdx = new Set();
  let negIdx = new Set();
  if (!parsed.none) {
    for (const t of parsed.include) {
      if (t.kind === "word") addWord(posWords, t.word);
      else for (const i of termSegments(t, entry)) posIdx.add(i);
    }
    for (const t of parsed.exclude) {
      if (t.kind === "word") addWord(negWords, t.word);
      else for (const i of termSegments(t, entry)) negIdx.add(i);
    }
    if (parsed.include.length === 0 && parsed.raw.length === 0) {
      for (let i = 0; i < n; i++) posIdx.add(i);
    }
  }
  const byWords = (words) => {
    const s = new Set();
    for (const w of words) for (const i of wordSegments(entry, w)) s.add(i);
    return s;
  };
  const isSelected = (i) =>
    (posIdx.has(i) || byWords(posWords).has(i)) && !negIdx.has(i) && !byWords(negWords).has(i);

  if (isSelected(index)) {
    posIdx.delete(index);
    if (isSelected(index)) negIdx.add(index);
  } else {
    for (const w of [...negWords]) {
      const covered = wordSegments(entry, w);
      if (covered.includes(index)) {
        negWords.splice(negWords.indexOf(w), 1);
        for (const j of covered) if (j !== index) negIdx.add(j);
      }
    }
    negIdx.delete(index);
    if (!byWords(posWords).has(index)) posIdx.add(index);
  }

  // Canonicalise.
  const negByWords = byWords(negWords);
  posIdx = new Set([...posIdx].filter((i) => !negIdx.has(i) && !negByWords.has(i)));
  const posByWords = byWords(posWords);
  negIdx = new Set([...negIdx].filter((i) => posByWords.has(i)));
  const keptNegWords = negWords.filter((w) => wordSegments(entry, w).some((i) => posByWords.has(i)));
  const selected = new Set([...posIdx, ...[...posByWords].filter((i) => !negIdx.has(i) && !negByWords.has(i))]);

  const raw = parsed.raw;
  if (selected.size === 0) return raw.join(", ");
  if (posWords.length === 0 && negWords.length === 0 && selected.size === n && n > 0) {
    return ["all", ...raw].join(", ");
  }
  const asc = (a, b) => a - b;
  return [
    ...posWords,
    ...[...posIdx].sort(asc).map(String),
    ...keptNegWords.map((w) => `!${w}`),
    ...[...negIdx].sort(asc).map((i) => `!${i}`),
    ...raw,
  ].join(", ");
}

// ------------------------------------------------------------------------------------------------
// Presentation models
// ------------------------------------------------------------------------------------------------

/** Legend rows for one image: colour, index, word, area and whether the selection includes it. */
export function legendRows(entry, selected = new Set(), hover = null) {
  return entry.segments.map((s) => {
    const color = Array.isArray(s.color) && s.color.length === 3 ? s.color : paletteColor(s.index);
    return {
      index: s.index,
      word: s.word ?? null,
      color,
      css: cssColor(color),
      label: s.word ? `${s.index} ${s.word}` : String(s.index),
      areaText: `${(100 * (s.area ?? 0)).toFixed(1)}%`,
      selected: selected.has(s.index),
      hovered: hover === s.index,
    };
  });
}

/**
 * RGBA pixels (grid_w x grid_h) to draw over the image: selected segments tinted in their colour,
 * the hovered segment in translucent white, everything else transparent.
 */
export function highlightPixels(entry, grid, selected = new Set(), hover = null) {
  const out = new Uint8ClampedArray(entry.grid_w * entry.grid_h * 4);
  const colors = entry.segments.map((s) => s.color ?? paletteColor(s.index));
  for (let k = 0; k < grid.length; k++) {
    const v = grid[k];
    const o = k * 4;
    if (v === hover) {
      out[o] = 255; out[o + 1] = 255; out[o + 2] = 255; out[o + 3] = 120;
    } else if (selected.has(v)) {
      const c = colors[v] ?? [255, 255, 255];
      out[o] = c[0]; out[o + 1] = c[1]; out[o + 2] = c[2]; out[o + 3] = 90;
    }
  }
  return out;
}

/** Clamp a page number into 0..count-1 (0 when there are no pages). */
export function clampPage(page, count) {
  if (!(count > 0)) return 0;
  return Math.min(Math.max(0, page | 0), count - 1);
}
