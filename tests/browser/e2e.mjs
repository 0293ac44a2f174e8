// Real-browser end-to-end check of the Mask Output overlay, driven by tests/comfy/test_browser.py.
//
//   node e2e.mjs <config.json>
//
// config: {url, workflow (path of a UI-format JSON), outDir, chromium, timeoutMs,
//          overrides: {nodeType: {widget: value}} set through the widgets after loading}. Prints one JSON line with what it saw; writes screenshots into outDir.
// Uses the system Chromium through playwright-core; never downloads a browser.
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const result = { console: [], pageErrors: [], steps: [] };
const step = (s) => { result.steps.push(s); console.error(`[e2e] ${s}`); };

const userDataDir = fs.mkdtempSync(path.join(cfg.outDir, "chromium-profile-"));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: cfg.chromium,
  headless: true,
  viewport: { width: 1600, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") result.console.push(`${m.type()}: ${m.text().slice(0, 300)}`);
  });
  page.on("pageerror", (e) => result.pageErrors.push(String(e.stack ?? e.message).slice(0, 1500)));
  result.failedRequests = [];
  page.on("response", (r) => { if (r.status() >= 400) result.failedRequests.push(`${r.status()} ${r.url()}`); });
  page.on("requestfailed", (r) => result.failedRequests.push(`failed ${r.url()}`));

  await page.goto(cfg.url);
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.EmergentSegMaskOutput
      && window.app.extensions?.some((e) => e.name === "emergent_seg.overlay"),
    null, { timeout: 180000 });
  step("frontend up, extension registered");
  // A new user gets the template browser on first start; close it and keep it closed.
  await page.evaluate(async () => {
    try { await window.app.extensionManager.setting.set("Comfy.TutorialCompleted", true); } catch { /* older frontend */ }
  });
  for (let k = 0; k < 10 && (await page.locator(".p-dialog-mask").count()) > 0; k++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
  }
  result.dialogsOpen = await page.locator(".p-dialog-mask").count();

  if (cfg.mode === "roundtrip") await roundTrip(page);
  else await runWorkflow(page);
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.error = String(err?.stack ?? err);
  try {
    const page = context.pages()[0];
    result.screenshot = path.join(cfg.outDir, "failure.png");
    await page.screenshot({ path: result.screenshot });
  } catch { /* nothing more to save */ }
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));

async function roundTrip(page) {
  // Each workflow as the frontend loads, re-saves and queues it (nothing is run).
  result.workflows = {};
  for (const file of cfg.workflows) {
    const wf = JSON.parse(fs.readFileSync(file, "utf8"));
    result.workflows[path.basename(file, ".json")] = await page.evaluate(async (wf) => {
      await window.app.loadGraphData(wf);
      const serialized = window.app.graph.serialize();
      const prompt = (await window.app.graphToPrompt()).output;
      const widgets = Object.fromEntries(window.app.graph.nodes.map((n) => [n.id, (n.widgets ?? []).map((w) => w.name)]));
      return { serialized, prompt, widgets };
    }, wf);
    step(`round trip of ${file}`);
  }

}

async function runWorkflow(page) {
  // Load the workflow through the UI's own loader, then apply the overrides (CPU time).
  const workflow = JSON.parse(fs.readFileSync(cfg.workflow, "utf8"));
  result.loaded = await page.evaluate(async ({ wf, overrides }) => {
    await window.app.loadGraphData(wf);
    const serialized = window.app.graph.serialize();
    const nodes = window.app.graph.nodes;
    for (const [type, values] of Object.entries(overrides)) {
      for (const node of nodes.filter((n) => n.type === type)) {
        for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
      }
    }
    const mo = nodes.find((n) => n.type === "EmergentSegMaskOutput");
    return {
      nodes: nodes.length,
      maskOutputId: mo.id,
      widgets: mo.widgets.map((w) => w.name),
      selection: mo.widgets.find((w) => w.name === "selection").value,
      serialized,
    };
  }, { wf: workflow, overrides: cfg.overrides ?? {} });
  step(`workflow loaded (${result.loaded.nodes} nodes)`);
  await page.screenshot({ path: path.join(cfg.outDir, "loaded.png") });

  // Queue it as the Run button does, and wait for Mask Output's overlay payload.
  await page.evaluate(() => {
    window.__esEvents = [];
    const api = window.comfyAPI?.api?.api;
    for (const type of ["execution_error", "execution_success", "executed"]) {
      api?.addEventListener(type, (e) => window.__esEvents.push({ type, node: e.detail?.node ?? e.detail?.node_id ?? null,
        message: e.detail?.exception_message ?? null }));
    }
    return window.app.queuePrompt(0, 1);
  });
  step("queued");
  if (cfg.mode === "thumbnail") await makeThumbnail(page);
  else await checkOverlay(page);
}

async function waitForRun(page) {
  const done = await page.waitForFunction(
    () => window.__esEvents.some((e) => e.type === "execution_success" || e.type === "execution_error"),
    null, { timeout: cfg.timeoutMs, polling: 1000 }).then(() => true, (e) => String(e));
  if (done !== true) throw new Error(`the run did not finish in ${cfg.timeoutMs} ms: ${done}`);
  const failed = await page.evaluate(() => window.__esEvents.filter((e) => e.type === "execution_error"));
  if (failed.length) throw new Error(`execution error: ${JSON.stringify(failed)}`);
}

// Thumbnail: after the run, fit the nodes titled cfg.thumbnail.nodes into the view and save that
// part of the screen as cfg.thumbnail.png.
async function makeThumbnail(page) {
  await waitForRun(page);
  step("run finished");
  await page.waitForTimeout(3000); // previews load
  await page.evaluate(async () => {
    for (const [id, value] of [["Comfy.Minimap.Visible", false], ["Comfy.Graph.CanvasInfo", false]]) {
      try { await window.app.extensionManager.setting.set(id, value); } catch { /* older frontend */ }
    }
  });
  // One clip per group of node titles (cfg.thumbnail.groups), saved as cfg.thumbnail.png with _<k>.
  result.thumbnails = [];
  for (const [k, titles] of cfg.thumbnail.groups.entries()) {
    const clip = await page.evaluate(({ titles, view }) => {
      const app = window.app;
      app.canvas.deselectAll?.();
      const nodes = app.graph.nodes.filter((n) => titles.includes(n.title));
      const title = 30;
      const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 10;
      const y0 = Math.min(...nodes.map((n) => n.pos[1])) - title - 10;
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 10;
      const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 10;
      const ds = app.canvas.ds;
      const r = app.canvas.canvas.getBoundingClientRect();
      ds.scale = Math.min(view.w / (x1 - x0), view.h / (y1 - y0), 1.5);
      const w = (x1 - x0) * ds.scale;
      const h = (y1 - y0) * ds.scale;
      const left = view.x + (view.w - w) / 2;
      const top = view.y + (view.h - h) / 2;
      ds.offset[0] = (left - r.left) / ds.scale - x0;
      ds.offset[1] = (top - r.top) / ds.scale - y0;
      app.canvas.setDirty(true, true);
      return { x: left, y: top, width: w, height: h, found: nodes.length };
    }, { titles, view: { x: 90, y: 100, w: 1480, h: 800 } });
    if (clip.found !== titles.length) throw new Error(`thumbnail nodes: found ${clip.found} of ${titles}`);
    await page.mouse.move(5, 995);
    await page.waitForTimeout(1500);
    delete clip.found;
    const file = cfg.thumbnail.png.replace(/\.png$/, `_${k}.png`);
    await page.screenshot({ path: file, clip });
    result.thumbnails.push(file);
  }
  result.screenshot = path.join(cfg.outDir, "thumbnail_full.png");
  await page.screenshot({ path: result.screenshot });
}

async function checkOverlay(page) {
  const waited = await page.waitForFunction((id) => {
    const node = window.app.graph.getNodeById(id);
    const st = node?.__emergentSegOverlay;
    const img = st?.images?.[0];
    if (window.__esEvents.some((e) => e.type === "execution_error")) return true;
    return !!st?.payload && !!(img?.complete && img.naturalWidth > 0);
  }, result.loaded.maskOutputId, { timeout: cfg.timeoutMs, polling: 1000 }).then(() => true, (e) => String(e));
  if (waited !== true) throw new Error(`no overlay after ${cfg.timeoutMs} ms: ${waited}`);
  const failed = await page.evaluate(() => window.__esEvents.filter((e) => e.type === "execution_error"));
  if (failed.length) throw new Error(`execution error: ${JSON.stringify(failed)}`);
  step("executed; overlay payload and image arrived");
  await page.waitForTimeout(500);

  // Centre the Mask Output node on screen so the overlay is large and fully visible.
  await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const canvas = window.app.canvas;
    canvas.ds.scale = 1;
    const el = canvas.canvas;
    canvas.ds.offset[0] = el.clientWidth / 2 - (node.pos[0] + node.size[0] / 2);
    canvas.ds.offset[1] = el.clientHeight / 2 - (node.pos[1] + node.size[1] / 2);
    canvas.setDirty(true, true);
  }, result.loaded.maskOutputId);
  await page.waitForTimeout(1000);

  const readState = () => page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const st = node.__emergentSegOverlay;
    const c = st.dom.canvas;
    const r = c.getBoundingClientRect();
    const ctx = c.getContext("2d");
    const data = c.width && c.height ? ctx.getImageData(0, 0, c.width, c.height).data : [];
    let painted = 0;
    for (let k = 3; k < data.length; k += 4) if (data[k] > 0) painted++;
    return {
      payload: st.payload,
      rect: st.rect,
      canvasBox: { left: r.left, top: r.top, width: r.width, height: r.height },
      canvasCss: { w: c.clientWidth, h: c.clientHeight },
      canvasPx: { w: c.width, h: c.height },
      painted,
      legend: [...st.dom.legend.children].map((e) => ({ text: e.textContent, opacity: e.style.opacity, weight: e.style.fontWeight, outline: e.style.outline })),
      selection: node.widgets.find((w) => w.name === "selection").value,
      imageShown: !!node.imgs?.length,
    };
  }, result.loaded.maskOutputId);

  const before = await readState();
  result.before = { ...before, payload: undefined };
  result.payload = before.payload;
  step(`overlay drawn: ${before.painted} painted canvas pixels, ${before.legend.length} legend rows`);

  // Choose a pixel well inside a segment: the cell of the biggest segment farthest from its edge.
  const entry = before.payload[0];
  const grid = decodeRle(entry.labels_rle, entry.grid_w, entry.grid_h);
  const target = interiorCell(grid, entry.grid_w, entry.grid_h, entry.segments);
  const imgX = ((target.gx + 0.5) * entry.width) / entry.grid_w;
  const imgY = ((target.gy + 0.5) * entry.height) / entry.grid_h;
  const { rect, canvasBox, canvasCss } = before;
  const pageX = canvasBox.left + ((rect.x + (imgX / entry.width) * rect.w) * canvasBox.width) / canvasCss.w;
  const pageY = canvasBox.top + ((rect.y + (imgY / entry.height) * rect.h) * canvasBox.height) / canvasCss.h;
  result.click = { segment: target.index, cell: [target.gx, target.gy], depth: target.depth, image: [imgX, imgY], page: [pageX, pageY] };
  const hit = await page.evaluate(([x, y]) => {
    const e = document.elementFromPoint(x, y);
    return e ? `${e.tagName.toLowerCase()}${e.className ? "." + String(e.className).replace(/\s+/g, ".") : ""}` : null;
  }, [pageX, pageY]);
  result.click.elementAtPoint = hit;
  await page.mouse.move(pageX, pageY);
  await page.waitForTimeout(300);
  result.hoverLegend = (await readState()).legend;
  await page.mouse.click(pageX, pageY);
  await page.waitForTimeout(500);
  const after = await readState();
  result.after = { ...after, payload: undefined };
  step(`clicked segment ${target.index} at (${pageX.toFixed(0)}, ${pageY.toFixed(0)}): selection "${before.selection}" -> "${after.selection}"`);

  // The new selection is what the next queue sends, and the server accepts it.
  result.promptSelection = await page.evaluate(async (id) => {
    const p = await window.app.graphToPrompt();
    return p.output[String(id)].inputs.selection;
  }, result.loaded.maskOutputId);
  await page.evaluate((id) => {
    window.__esPrevPayload = window.app.graph.getNodeById(id).__emergentSegOverlay.payload;
    window.__esEvents.length = 0;
    return window.app.queuePrompt(0, 1);
  }, result.loaded.maskOutputId);
  await page.waitForFunction((id) => window.__esEvents.some((e) => e.type === "execution_error")
    || window.app.graph.getNodeById(id).__emergentSegOverlay.payload !== window.__esPrevPayload,
  result.loaded.maskOutputId, { timeout: cfg.timeoutMs, polling: 500 });
  // The overlay arrives with Mask Output's "executed"; the run's end (execution_success) comes
  // after it, so wait for that too before reading the events.
  await waitForRun(page);
  result.requeue = await page.evaluate(() => window.__esEvents);
  step(`re-queued with the clicked selection: ${JSON.stringify(result.requeue.map((e) => e.type))}`);
  await page.waitForTimeout(1000);
  result.afterRequeue = { ...(await readState()), payload: undefined };

  await page.mouse.move(5, 500); // no hover outline in the screenshot
  await page.waitForTimeout(300);
  result.screenshot = path.join(cfg.outDir, "mask_output_overlay.png");
  await page.screenshot({ path: result.screenshot });
  result.nodeScreenshot = path.join(cfg.outDir, "mask_output_node.png");
  const box = await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id);
    const [x, y] = window.app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1]]);
    const s = window.app.canvas.ds.scale;
    const r = window.app.canvas.canvas.getBoundingClientRect();
    return { x: r.left + x - 10, y: r.top + y - 40 * s, width: node.size[0] * s + 20, height: node.size[1] * s + 50 * s };
  }, result.loaded.maskOutputId);
  await page.screenshot({ path: result.nodeScreenshot, clip: box });
}

function decodeRle(rle, w, h) {
  const out = new Int32Array(w * h);
  let pos = 0;
  for (let k = 0; k + 1 < rle.length; k += 2) {
    out.fill(rle[k], pos, pos + rle[k + 1]);
    pos += rle[k + 1];
  }
  return out;
}

// The cell deepest inside its segment (Chebyshev distance to another label or the border),
// preferring large segments: a click there hits that segment whatever the rounding.
function interiorCell(grid, w, h, segments) {
  let best = null;
  for (let gy = 0; gy < h; gy++) {
    for (let gx = 0; gx < w; gx++) {
      const v = grid[gy * w + gx];
      let d = 0;
      grow: for (d = 0; d < Math.max(w, h); d++) {
        const r = d + 1;
        if (gx - r < 0 || gy - r < 0 || gx + r >= w || gy + r >= h) break;
        for (let yy = gy - r; yy <= gy + r; yy++) {
          for (let xx = gx - r; xx <= gx + r; xx++) {
            if (grid[yy * w + xx] !== v) break grow;
          }
        }
      }
      if (!best || d > best.depth) best = { gx, gy, depth: d, index: v };
    }
  }
  best.pixels = segments[best.index]?.pixels;
  return best;
}
