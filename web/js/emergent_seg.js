// emergent_seg.overlay: a clickable segment overlay with a legend on the Mask Output node.
// Presentation only: the selection lives in the node's `selection` widget, which this code edits.
// The file sits at /extensions/<pack>/js/, so ComfyUI's scripts are three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import {
  clampPage,
  decodeRle,
  evaluateSelection,
  fitRect,
  highlightPixels,
  hitTest,
  legendRows,
  paletteColor,
  toggleSelection,
} from "./overlay_logic.js";

const NODE_TYPE = "EmergentSegMaskOutput";
const WIDGET_NAME = "emergent_seg_overlay";
const STATE = "__emergentSegOverlay";
const STOCK_PREVIEW = "$$canvas-image-preview"; // the frontend's image-preview widget

function el(tag, style = {}, text = null) {
  const e = document.createElement(tag);
  Object.assign(e.style, style);
  if (text !== null) e.textContent = text;
  return e;
}

function selectionWidget(node) {
  return node.widgets?.find((w) => w.name === "selection") ?? null;
}

function currentEntry(st) {
  return st.payload?.[st.page] ?? null;
}

function currentGrid(st) {
  const entry = currentEntry(st);
  if (!entry) return null;
  if (!st.grids[st.page]) {
    try {
      st.grids[st.page] = decodeRle(entry.labels_rle ?? [], entry.grid_w, entry.grid_h);
    } catch (err) {
      console.warn("[emergent_seg] bad overlay payload:", err);
      st.grids[st.page] = new Int32Array(0);
    }
  }
  return st.grids[st.page];
}

function currentSelection(node, st) {
  const entry = currentEntry(st);
  const w = selectionWidget(node);
  return entry && w ? evaluateSelection(String(w.value ?? ""), entry) : new Set();
}

function imageUrl(info) {
  const params = new URLSearchParams({
    filename: info.filename ?? "",
    type: info.type ?? "temp",
    subfolder: info.subfolder ?? "",
  });
  return api.apiURL(`/view?${params.toString()}`);
}

function buildDom(node, st) {
  const root = el("div", {
    display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
    boxSizing: "border-box", fontFamily: "sans-serif", fontSize: "11px", color: "var(--input-text, #ddd)",
  });
  const canvas = el("canvas", { width: "100%", flex: "1 1 auto", minHeight: "96px", cursor: "pointer", display: "block" });
  const nav = el("div", { display: "none", alignItems: "center", justifyContent: "center", gap: "8px" });
  const prev = el("button", {}, "\u25C0");
  const next = el("button", {}, "\u25B6");
  const pageLabel = el("span", {}, "");
  prev.title = "previous image";
  next.title = "next image";
  nav.append(prev, pageLabel, next);
  const legend = el("div", { maxHeight: "96px", overflowY: "auto", display: "flex", flexWrap: "wrap", gap: "2px 8px" });
  root.append(canvas, nav, legend);

  prev.addEventListener("click", () => setPage(node, st.page - 1));
  next.addEventListener("click", () => setPage(node, st.page + 1));

  const toCanvas = (e) => {
    const r = canvas.getBoundingClientRect();
    if (!(r.width > 0 && r.height > 0)) return null;
    // The DOM layer is CSS-scaled with the graph zoom; map back to the canvas's own CSS pixels.
    return { x: ((e.clientX - r.left) * canvas.clientWidth) / r.width, y: ((e.clientY - r.top) * canvas.clientHeight) / r.height };
  };
  const segmentAt = (e) => {
    const entry = currentEntry(st);
    const grid = currentGrid(st);
    const p = toCanvas(e);
    if (!entry || !grid || !p || !st.rect) return null;
    return hitTest(entry, grid, st.rect, p.x, p.y);
  };
  canvas.addEventListener("pointermove", (e) => setHover(node, segmentAt(e)));
  canvas.addEventListener("pointerleave", () => setHover(node, null));
  canvas.addEventListener("click", (e) => {
    const idx = segmentAt(e);
    if (idx !== null) toggleSegment(node, idx);
  });

  st.dom = { root, canvas, nav, prev, next, pageLabel, legend };
  if (typeof ResizeObserver !== "undefined") {
    st.resize = new ResizeObserver(() => draw(node));
    st.resize.observe(canvas);
  }
  return root;
}

function setPage(node, page) {
  const st = node[STATE];
  st.page = clampPage(page, st.payload?.length ?? 0);
  st.hover = null;
  refresh(node);
}

function setHover(node, idx) {
  const st = node[STATE];
  if (st.hover === idx) return;
  st.hover = idx;
  refresh(node);
}

function toggleSegment(node, idx) {
  const st = node[STATE];
  const entry = currentEntry(st);
  const w = selectionWidget(node);
  if (!entry || !w) return;
  w.value = toggleSelection(String(w.value ?? ""), idx, entry);
  // The widget's own callback (chained in onNodeCreated) redraws us.
  w.callback?.call(w, w.value, app.canvas, node);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function drawGridColours(ctx, entry, grid, rect) {
  const off = document.createElement("canvas");
  off.width = entry.grid_w;
  off.height = entry.grid_h;
  const octx = off.getContext("2d");
  const data = octx.createImageData(entry.grid_w, entry.grid_h);
  const colours = entry.segments.map((s) => s.color ?? paletteColor(s.index));
  for (let k = 0; k < grid.length; k++) {
    const c = colours[grid[k]] ?? [128, 128, 128];
    data.data.set([c[0], c[1], c[2], 255], k * 4);
  }
  octx.putImageData(data, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, rect.x, rect.y, rect.w, rect.h);
}

function draw(node) {
  const st = node[STATE];
  const canvas = st?.dom?.canvas;
  if (!canvas) return;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(cssW * dpr));
  canvas.height = Math.max(1, Math.round(cssH * dpr));
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  const entry = currentEntry(st);
  if (!entry) {
    st.rect = null;
    ctx.fillStyle = "#888";
    ctx.textAlign = "center";
    ctx.fillText("Run the workflow to see the segments", cssW / 2, cssH / 2);
    return;
  }
  const grid = currentGrid(st);
  const rect = fitRect(entry.width, entry.height, cssW, cssH);
  st.rect = rect;
  const img = st.images[st.page];
  if (img?.complete && img.naturalWidth > 0) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(img, rect.x, rect.y, rect.w, rect.h);
  } else if (grid.length) {
    drawGridColours(ctx, entry, grid, rect);
  }
  if (!grid.length) return;
  const off = document.createElement("canvas");
  off.width = entry.grid_w;
  off.height = entry.grid_h;
  const octx = off.getContext("2d");
  const data = octx.createImageData(entry.grid_w, entry.grid_h);
  data.data.set(highlightPixels(entry, grid, currentSelection(node, st), st.hover));
  octx.putImageData(data, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, rect.x, rect.y, rect.w, rect.h);
}

function renderLegend(node) {
  const st = node[STATE];
  const dom = st?.dom;
  if (!dom) return;
  const count = st.payload?.length ?? 0;
  dom.nav.style.display = count > 1 ? "flex" : "none";
  dom.pageLabel.textContent = count ? `image ${st.page + 1} / ${count}` : "";
  dom.prev.disabled = st.page <= 0;
  dom.next.disabled = st.page >= count - 1;
  const entry = currentEntry(st);
  const rows = entry ? legendRows(entry, currentSelection(node, st), st.hover) : [];
  dom.legend.replaceChildren(...rows.map((row) => {
    const item = el("span", {
      display: "inline-flex", alignItems: "center", gap: "3px", cursor: "pointer", padding: "0 2px",
      borderRadius: "3px", outline: row.hovered ? "1px solid #fff" : "none",
      fontWeight: row.selected ? "bold" : "normal", opacity: row.selected ? "1" : "0.7",
    });
    const swatch = el("span", {
      width: "10px", height: "10px", background: row.css, display: "inline-block",
      border: row.selected ? "2px solid #fff" : "1px solid #000", boxSizing: "border-box",
    });
    item.title = `segment ${row.index}${row.word ? ` (${row.word})` : ""}, ${row.areaText} of the image`;
    item.append(swatch, el("span", {}, row.label));
    item.addEventListener("click", () => toggleSegment(node, row.index));
    item.addEventListener("pointerenter", () => setHover(node, row.index));
    item.addEventListener("pointerleave", () => setHover(node, null));
    return item;
  }));
}

function refresh(node) {
  renderLegend(node);
  draw(node);
}

function onData(node, message) {
  const st = node[STATE];
  if (!st) return;
  const payload = Array.isArray(message?.emergent_seg) ? message.emergent_seg : null;
  if (!payload) return;
  st.payload = payload;
  st.grids = [];
  st.page = clampPage(st.page, payload.length);
  st.hover = null;
  const infos = Array.isArray(message?.images) ? message.images : [];
  st.images = payload.map((_, b) => {
    const info = infos[b];
    if (!info?.filename) return null;
    const img = new Image();
    img.addEventListener("load", () => draw(node));
    img.src = imageUrl(info);
    return img;
  });
  refresh(node);
}

app.registerExtension({
  name: "emergent_seg.overlay",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const node = this;
      const st = { payload: null, images: [], grids: [], page: 0, hover: null, rect: null, dom: null, resize: null };
      node[STATE] = st;
      const widget = node.addDOMWidget(WIDGET_NAME, WIDGET_NAME, buildDom(node, st), {
        serialize: false, // keep it out of the prompt
        hideOnZoom: false,
        getValue: () => "",
        setValue: () => {},
        getMinHeight: () => 200,
      });
      if (widget) widget.serialize = false; // and out of the saved widgets_values
      const sel = selectionWidget(node);
      if (sel) {
        const cb = sel.callback;
        sel.callback = function () {
          const out = cb?.apply(this, arguments);
          refresh(node);
          return out;
        };
      }
      refresh(node);
      return r;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      onData(this, message);
      return r;
    };

    // The frontend would also draw the `images` output as its own (unclickable) preview under the
    // node, a second copy of the overlay that squeezes the clickable one. Hide node.imgs from its
    // background handler so it never adds that preview; imgs stay set for Open/Save Image.
    const onDrawBackground = nodeType.prototype.onDrawBackground;
    nodeType.prototype.onDrawBackground = function () {
      const imgs = this.imgs;
      this.imgs = undefined;
      try {
        return onDrawBackground?.apply(this, arguments);
      } finally {
        if (this.imgs === undefined) this.imgs = imgs;
        const i = this.widgets?.findIndex((w) => w.name === STOCK_PREVIEW) ?? -1;
        if (i >= 0) {
          this.widgets[i].onRemove?.();
          this.widgets.splice(i, 1);
        }
      }
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this[STATE]?.resize?.disconnect();
      return onRemoved?.apply(this, arguments);
    };
  },
});
