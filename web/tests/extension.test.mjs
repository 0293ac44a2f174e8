// Drives web/js/emergent_seg.js against a fake ComfyUI app and a minimal fake DOM: the ComfyUI
// imports are redirected by a module-resolution hook, so no browser or npm package is needed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { register } from "node:module";

const extensions = [];
globalThis.__emergentSegFake = {
  app: {
    registerExtension: (ext) => extensions.push(ext),
    canvas: { name: "fake-canvas" },
    graph: { dirty: 0, setDirtyCanvas() { this.dirty++; } },
  },
  api: { apiURL: (path) => `/api${path}` },
};
const hooks = `
export async function resolve(specifier, context, next) {
  if (specifier.endsWith("/scripts/app.js"))
    return { url: "data:text/javascript,export const app = globalThis.__emergentSegFake.app;", shortCircuit: true };
  if (specifier.endsWith("/scripts/api.js"))
    return { url: "data:text/javascript,export const api = globalThis.__emergentSegFake.api;", shortCircuit: true };
  return next(specifier, context);
}`;
register(`data:text/javascript,${encodeURIComponent(hooks)}`);

class FakeContext {
  constructor() { this.calls = []; }
  setTransform() {}
  clearRect() {}
  fillText(text) { this.calls.push(["fillText", text]); }
  drawImage(img, x, y, w, h) { this.calls.push(["drawImage", x, y, w, h]); }
  putImageData() {}
  createImageData(w, h) { return { data: new Uint8ClampedArray(w * h * 4) }; }
}

class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.style = {};
    this.children = [];
    this.listeners = {};
    this.textContent = "";
    this.title = "";
    this.disabled = false;
    this.clientWidth = 200;
    this.clientHeight = 100;
    this.ctx = new FakeContext();
  }
  append(...c) { this.children.push(...c); }
  replaceChildren(...c) { this.children = c; }
  addEventListener(type, fn) { (this.listeners[type] ??= []).push(fn); }
  fire(type, ev = {}) { for (const fn of this.listeners[type] ?? []) fn(ev); }
  // The graph is zoomed 2x: the element's on-screen box is twice its CSS size.
  getBoundingClientRect() { return { left: 0, top: 0, width: this.clientWidth * 2, height: this.clientHeight * 2 }; }
  getContext() { return this.ctx; }
}

const images = [];
class FakeImage {
  constructor() { this.complete = false; this.naturalWidth = 0; this.listeners = {}; images.push(this); }
  addEventListener(type, fn) { this.listeners[type] = fn; }
}

globalThis.document = { createElement: (tag) => new FakeElement(tag) };
globalThis.window = { devicePixelRatio: 1 };
globalThis.Image = FakeImage;

await import("../js/emergent_seg.js");
const ext = extensions[0];

function entry(n, b) {
  // 4x4 image, 2x2 grid; segment ids laid out row-major, repeating when n < 4.
  const cells = [0, 1, 2, 3].map((k) => k % n);
  const rle = cells.flatMap((v) => [v, 1]);
  return {
    image: b, width: 4, height: 4, grid_w: 2, grid_h: 2, labels_rle: rle,
    segments: [...Array(n).keys()].map((i) => ({ index: i, word: i === 1 ? "cat" : null, color: [10 * i, 0, 0], area: 1 / n, pixels: 16 / n })),
  };
}

function makeNodeType() {
  const calls = { created: 0, executed: [], removed: 0 };
  function NodeType() {}
  NodeType.prototype.onNodeCreated = function () { calls.created++; return "created"; };
  NodeType.prototype.onExecuted = function (m) { calls.executed.push(m); return "executed"; };
  NodeType.prototype.onRemoved = function () { calls.removed++; };
  return { NodeType, calls };
}

function makeNode(NodeType, selection = "1") {
  const node = new NodeType();
  node.dirty = 0;
  node.selectionCalls = [];
  node.widgets = [{
    name: "selection",
    value: selection,
    callback(v) { node.selectionCalls.push(v); },
  }];
  node.addDOMWidget = (name, type, element, options) => {
    const w = { name, type, element, options };
    node.widgets.push(w);
    node.domWidget = w;
    return w;
  };
  node.setDirtyCanvas = () => { node.dirty++; };
  return node;
}

const legendLabels = (node) => node.domWidget.element.children[2].children.map((item) => item.children[1].textContent);

test("registers one namespaced extension", () => {
  assert.equal(extensions.length, 1);
  assert.equal(ext.name, "emergent_seg.overlay");
});

test("other node types are left untouched", async () => {
  const { NodeType } = makeNodeType();
  const before = { ...NodeType.prototype };
  await ext.beforeRegisterNodeDef(NodeType, { name: "KSampler" });
  await ext.beforeRegisterNodeDef(NodeType, { name: "MaskOutput", category: "segmentation/emergent" });
  assert.deepEqual({ ...NodeType.prototype }, before);
});

test("Mask Output: chains callbacks, shows payload, pages, hovers and toggles the selection widget", async () => {
  const { NodeType, calls } = makeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "EmergentSegMaskOutput" });
  const node = makeNode(NodeType, "1");

  assert.equal(node.onNodeCreated(), "created");
  assert.equal(calls.created, 1);
  const w = node.domWidget;
  assert.ok(w, "a DOM widget was added");
  assert.equal(w.options.serialize, false);
  assert.equal(w.serialize, false);
  const [canvas, nav, legend] = w.element.children;
  assert.equal(canvas.tagName, "CANVAS");
  assert.ok(canvas.ctx.calls.some(([k, t]) => k === "fillText" && /Run the workflow/.test(t)));

  const message = {
    images: [{ filename: "a b.png", subfolder: "", type: "temp" }, { filename: "c.png", subfolder: "x", type: "temp" }],
    emergent_seg: [entry(4, 0), entry(2, 1)],
  };
  assert.equal(node.onExecuted(message), "executed");
  assert.deepEqual(calls.executed, [message]);
  assert.equal(images.at(-2).src, "/api/view?filename=a+b.png&type=temp&subfolder=");
  assert.equal(images.at(-1).src, "/api/view?filename=c.png&type=temp&subfolder=x");
  assert.deepEqual(legendLabels(node), ["0", "1 cat", "2", "3"]);
  assert.equal(legend.children[1].style.fontWeight, "bold"); // "1" is selected
  assert.equal(legend.children[0].style.fontWeight, "normal");
  assert.equal(nav.style.display, "flex");
  assert.equal(nav.children[1].textContent, "image 1 / 2");

  // The image is letterboxed into 200x100 at x 50..150; the element is shown at 2x zoom.
  canvas.fire("click", { clientX: 2 * 60, clientY: 2 * 10 }); // image (0.4, 0.4): segment 0
  assert.equal(node.widgets[0].value, "0, 1");
  assert.deepEqual(node.selectionCalls, ["0, 1"]);
  assert.ok(node.dirty > 0);
  assert.equal(legend.children[0].style.fontWeight, "bold"); // redrawn through the chained callback

  canvas.fire("click", { clientX: 2 * 10, clientY: 2 * 50 }); // letterbox bar: nothing happens
  assert.equal(node.widgets[0].value, "0, 1");

  canvas.fire("pointermove", { clientX: 2 * 140, clientY: 2 * 90 }); // segment 3
  assert.equal(legend.children[3].style.outline, "1px solid #fff");
  canvas.fire("pointerleave");
  assert.equal(legend.children[3].style.outline, "none");

  legend.children[1].fire("click"); // legend rows toggle too
  assert.equal(node.widgets[0].value, "0");

  // page 2 has two segments; its legend and hit test follow the page
  nav.children[2].fire("click");
  assert.equal(nav.children[1].textContent, "image 2 / 2");
  assert.deepEqual(legendLabels(node), ["0", "1 cat"]);
  canvas.fire("click", { clientX: 2 * 140, clientY: 2 * 10 }); // top-right cell: segment 1
  assert.equal(node.widgets[0].value, "all");
  nav.children[2].fire("click"); // already on the last page
  assert.equal(nav.children[1].textContent, "image 2 / 2");
  nav.children[0].fire("click");
  assert.equal(nav.children[1].textContent, "image 1 / 2");

  // typing in the selection widget still runs its own callback and refreshes the legend
  node.widgets[0].value = "2";
  node.widgets[0].callback("2");
  assert.equal(node.selectionCalls.at(-1), "2");
  assert.deepEqual(legend.children.map((c) => c.style.fontWeight), ["normal", "normal", "bold", "normal"]);

  node.onRemoved();
  assert.equal(calls.removed, 1);
});

test("a message without a payload keeps the previous state", async () => {
  const { NodeType } = makeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "EmergentSegMaskOutput" });
  const node = makeNode(NodeType);
  node.onNodeCreated();
  node.onExecuted({ images: [] });
  node.onExecuted(undefined);
  assert.deepEqual(legendLabels(node), []);
  node.onExecuted({ emergent_seg: [entry(3, 0)] }); // no preview image: grid colours are drawn instead
  assert.deepEqual(legendLabels(node), ["0", "1 cat", "2"]);
  assert.equal(node.domWidget.element.children[1].style.display, "none");
});

test("no innerHTML or eval in the frontend", () => {
  for (const f of ["../js/emergent_seg.js", "../js/overlay_logic.js"]) {
    const src = readFileSync(new URL(f, import.meta.url), "utf8");
    assert.doesNotMatch(src, /innerHTML|outerHTML|insertAdjacentHTML|\beval\s*\(|new Function/);
  }
});

test("ComfyUI imports resolve from where the pack serves this file", () => {
  // ComfyUI serves web/ at /extensions/<pack>/, so web/js/emergent_seg.js is /extensions/<pack>/js/.
  const served = "http://localhost:8188/extensions/emergent-seg/js/emergent_seg.js";
  const src = readFileSync(new URL("../js/emergent_seg.js", import.meta.url), "utf8");
  const specs = [...src.matchAll(/^(?:import|}) .*from "([^"]+)";$/gm)].map((m) => m[1]);
  const paths = specs.map((s) => new URL(s, served).pathname);
  assert.deepEqual(paths.sort(), ["/extensions/emergent-seg/js/overlay_logic.js", "/scripts/api.js", "/scripts/app.js"]);
});

test("Mask Output: the frontend's duplicate image preview is suppressed, imgs are kept", async () => {
  const { NodeType } = makeNodeType();
  // What the frontend's own background handler does: adds its preview widget when imgs exist.
  NodeType.prototype.onDrawBackground = function () {
    if (!this.imgs?.length) return "no-imgs";
    this.widgets.push({ name: "$$canvas-image-preview", onRemove: () => { this.previewRemoved = true; } });
    return "preview";
  };
  await ext.beforeRegisterNodeDef(NodeType, { name: "EmergentSegMaskOutput" });
  const node = makeNode(NodeType);
  node.onNodeCreated();
  node.imgs = ["img"];
  assert.equal(node.onDrawBackground(), "no-imgs");
  assert.deepEqual(node.imgs, ["img"]);
  assert.ok(!node.widgets.some((w) => w.name === "$$canvas-image-preview"));
  // a preview added by someone else is removed on the next draw
  node.widgets.push({ name: "$$canvas-image-preview", onRemove: () => { node.previewRemoved = true; } });
  node.onDrawBackground();
  assert.ok(node.previewRemoved && !node.widgets.some((w) => w.name === "$$canvas-image-preview"));
});
