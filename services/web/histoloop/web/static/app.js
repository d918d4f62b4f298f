// The histoloop workspace: slide (OpenSeadragon), overlay (canvas), labelling, panels, live updates.
// Plain ES module, no build step. Every read and write goes through the workspace's /api.

import { parseLayer } from './layer.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const FALLBACK_COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];

const state = {
  project: params.get('project') || '',
  dataset: params.get('dataset') || '',
  me: null,
  projectInfo: null,
  slide: null,
  layer: null,
  mode: 'consensus',
  tool: 'click',
  cls: 0,
  pending: new Map(),      // unit index -> class index
  undo: [],                // [[unit, previous class or undefined], ...] per action
  query: [],               // unit indices in query order
  cursor: -1,
  focus: -1,               // the last clicked unit (r proposes its region)
  raters: [],              // annotators the latest model has a per-annotator model of
  grid: null,
  sentAt: 0,
  round: 0,
  latencies: [],
  frames: 0,
  drawMs: [],              // per moving frame (bitmap)
  fullDrawMs: [],          // per full overlay redraw
  interactive: false,
  readOnly: false,
  render: 'auto',          // full redraws: 'auto' (raster when units are small on screen), 'path' or 'raster'
  rendered: '',            // which of the two the last full redraw used
};
window.__histoloop = state;
state.redraw = () => draw();  // a full overlay redraw, for tests and benchmarks/bench_web.py

let viewer = null;
const canvas = $('overlay');
const ctx = canvas.getContext('2d');

function say(text, error = false) {
  const line = $('status-line');
  line.textContent = text;
  line.className = error ? 'error' : '';
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: 'same-origin', ...options });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}
const getJSON = async (path) => (await api(path)).json();
const base = () => `/api/projects/${encodeURIComponent(state.project)}`;
const dsBase = () => `${base()}/datasets/${encodeURIComponent(state.dataset)}`;

function colourOf(c) {
  if (c < 0 || !state.layer) return null;
  return state.layer.class_colors[c] || FALLBACK_COLOURS[c % FALLBACK_COLOURS.length];
}

// ---------------------------------------------------------------------------- sign-in
// Returns whether the sign-in form was shown (the project may then have changed).
async function signIn() {
  state.me = await getJSON('/api/me');
  const prompt = state.me.auth && !state.me.signed_in;
  if (prompt) {
    $('signin').hidden = false;
    $('signin-project').value = state.project;
    await new Promise((resolve) => {
      $('signin-form').onsubmit = async (event) => {
        event.preventDefault();
        try {
          await api('/api/session', {
            method: 'POST', headers: { 'Content-Type': 'application/json' },
            body: JSON.stringify({ token: $('signin-token').value, project: $('signin-project').value,
              view_only: $('signin-view-only').checked }),
          });
          state.project = $('signin-project').value;
          $('signin').hidden = true;
          resolve();
        } catch (e) { $('signin-error').textContent = e.message; }
      };
    });
    state.me = await getJSON('/api/me');
  }
  state.readOnly = !!state.me.read_only;
  document.body.classList.toggle('read-only', state.readOnly);
  $('who').textContent = (state.me.subject || '') + (state.readOnly ? ' (read-only)' : '');
  $('signout').hidden = !state.me.auth;
  $('signout').onclick = async () => { await api('/api/session', { method: 'DELETE' }); location.reload(); };
  return prompt;
}

// ---------------------------------------------------------------------------- slide + layer
// OpenSeadragon's drawer. Its default, WebGL, pans at a quarter of the 2D canvas's frame rate when
// WebGL is a software renderer (SwiftShader, llvmpipe: no GPU, or a blocklisted one), so the page
// takes the canvas drawer there (benchmarks/README.md, "Pan/zoom"). ?drawer=webgl|canvas|html forces one.
const DRAWERS = ['webgl', 'canvas', 'html'];
function chooseDrawer() {
  if (DRAWERS.includes(params.get('drawer'))) return params.get('drawer');
  const gl = document.createElement('canvas').getContext('webgl');
  if (!gl) return 'canvas';
  const info = gl.getExtension('WEBGL_debug_renderer_info');
  const renderer = info ? String(gl.getParameter(info.UNMASKED_RENDERER_WEBGL)) : '';
  const lose = gl.getExtension('WEBGL_lose_context');
  if (lose) lose.loseContext();
  return /swiftshader|llvmpipe|softpipe|software/i.test(renderer) ? 'canvas' : 'webgl';
}

async function openDataset() {
  const layerBytes = fetchLayer();  // in parallel with the slide
  const slide = await getJSON(`${dsBase()}/slide.json`);
  state.slide = slide;
  if (viewer) viewer.destroy();
  viewer = OpenSeadragon({
    element: $('viewer'), prefixUrl: '/static/vendor/openseadragon/images/',
    tileSources: { Image: slide.Image }, showNavigator: true, animationTime: 0.6,
    gestureSettingsMouse: { clickToZoom: false }, maxZoomPixelRatio: 4, drawer: chooseDrawer(),
  });
  state.viewer = viewer;
  viewer.addHandler('update-viewport', onViewport);
  viewer.addHandler('resize', scheduleDraw);
  viewer.addHandler('canvas-click', onCanvasClick);
  await new Promise((resolve) => viewer.addOnceHandler('open', resolve));
  mark('slide-open');
  await loadLayer(layerBytes);
}

// Resolves once the slide's tiles in view are drawn (at most 3 s): the panels' reads (GetStatus,
// GetAgreement: seconds of store work on a large project) wait for it, so they do not slow the tiles.
function slideShown() {
  const image = viewer && viewer.world.getItemAt(0);
  if (!image || image.getFullyLoaded()) return Promise.resolve();
  return new Promise((resolve) => {
    image.addOnceHandler('fully-loaded-change', resolve);
    setTimeout(resolve, 3000);
  });
}

// The first view's steps as performance marks (histoloop-<step>; benchmarks/bench_web.py reads them).
function mark(step) {
  if (!state.interactive) performance.mark('histoloop-' + step);
}

async function fetchLayer() {
  const buffer = await (await api(`${dsBase()}/layer`)).arrayBuffer();
  mark('layer-fetched');
  return buffer;
}

async function loadLayer(pending = null) {
  const buffer = await (pending || fetchLayer());
  const layer = parseLayer(buffer);
  state.layer = layer;
  state.round = layer.round;
  state.query = [];
  for (let i = 0; i < layer.n; i++) if (layer.query_rank[i]) state.query.push(i);
  state.query.sort((a, b) => layer.query_rank[a] - layer.query_rank[b]);
  state.cursor = -1;
  state.focus = -1;
  state.rgb = layer.classes.map((_, c) => rgbOf(colourOf(c)));
  buildGrid();
  mark('layer-parsed');
  renderClasses();
  renderAdjudication();
  draw();
  if (!state.interactive) {
    mark('interactive');
    state.interactive = true;
  }
}

// A uniform grid over the units (cells at least as wide as the largest unit) for hit tests:
// each cell's units are order[start[cell] .. start[cell + 1]].
function buildGrid() {
  const L = state.layer;
  let largest = 0, minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (let i = 0; i < L.n; i++) {
    largest = Math.max(largest, L.size[i]);
    minX = Math.min(minX, L.x[i]); maxX = Math.max(maxX, L.x[i]);
    minY = Math.min(minY, L.y[i]); maxY = Math.max(maxY, L.y[i]);
  }
  if (!L.n) minX = minY = maxX = maxY = 0;
  let cell = Math.max(largest, 1), cols, rows;
  for (;;) {  // sparse layers get coarser cells: at most about four per unit
    cols = Math.floor((maxX - minX) / cell) + 1;
    rows = Math.floor((maxY - minY) / cell) + 1;
    if (cols * rows <= 4 * L.n + 1024) break;
    cell *= 2;
  }
  const key = new Int32Array(L.n);
  const start = new Int32Array(cols * rows + 1);
  for (let i = 0; i < L.n; i++) {
    key[i] = Math.floor((L.x[i] - minX) / cell) * rows + Math.floor((L.y[i] - minY) / cell);
    start[key[i] + 1] += 1;
  }
  for (let k = 0; k < cols * rows; k++) start[k + 1] += start[k];
  const next = start.slice(0, -1);
  const order = new Int32Array(L.n);
  for (let i = 0; i < L.n; i++) order[next[key[i]]++] = i;
  state.grid = { largest, cell, minX, minY, cols, rows, start, order };
}

function unitsNear(ux, uy, radius) {
  const { cell, minX, minY, cols, rows, start, order } = state.grid;
  const L = state.layer;
  const out = [];
  const r = Math.ceil((radius + cell) / cell);
  const cx = Math.floor((ux - minX) / cell), cy = Math.floor((uy - minY) / cell);
  for (let gx = Math.max(0, cx - r); gx <= Math.min(cols - 1, cx + r); gx++) {
    for (let gy = Math.max(0, cy - r); gy <= Math.min(rows - 1, cy + r); gy++) {
      for (let k = start[gx * rows + gy]; k < start[gx * rows + gy + 1]; k++) {
        const i = order[k];
        const dx = L.x[i] - ux, dy = L.y[i] - uy;
        if (dx * dx + dy * dy <= (radius + L.size[i] / 2) ** 2) out.push(i);
      }
    }
  }
  return out;
}

function unitAt(ux, uy) {
  const L = state.layer;
  let best = -1, bestD = Infinity;
  for (const i of unitsNear(ux, uy, 0)) {
    const dx = L.x[i] - ux, dy = L.y[i] - uy;
    const half = L.size[i] / 2;
    const inside = L.kind === 'wsi' ? Math.abs(dx) <= half && Math.abs(dy) <= half : dx * dx + dy * dy <= half * half;
    const d = dx * dx + dy * dy;
    if (inside && d < bestD) { best = i; bestD = d; }
  }
  return best;
}

// screen (viewer element px) <-> unit coordinates
function transform() {
  const vp = viewer.viewport;
  const p0 = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
  const p1 = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 1000));
  const s = ((p1.x - p0.x) / 1000) * state.slide.unit_scale;
  return { ox: p0.x, oy: p0.y, s };
}
function toUnits(px, py) {
  const t = transform();
  return [(px - t.ox) / t.s, (py - t.oy) / t.s];
}

// ---------------------------------------------------------------------------- drawing
// While the view moves, the last full overlay is redrawn as one transformed bitmap (cheap
// at any unit count); the full redraw follows once the view has been still for a moment.
const SETTLE_MS = 400;
let cache = null;
let settleTimer = 0;

function onViewport() {
  if (!cache || !state.layer) { scheduleDraw(); return; }
  const started = performance.now();
  const ratio = window.devicePixelRatio || 1;
  const { ox, oy, s } = transform();
  const k = s / cache.s;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.setTransform(k, 0, 0, k, (ox - cache.ox * k) * ratio, (oy - cache.oy * k) * ratio);
  ctx.drawImage(cache.canvas, 0, 0);
  state.frames += 1;
  state.drawMs.push(performance.now() - started);
  if (state.drawMs.length > 600) state.drawMs.shift();
  clearTimeout(settleTimer);
  settleTimer = setTimeout(draw, SETTLE_MS);
}

let drawScheduled = false;
function scheduleDraw() {
  if (drawScheduled) return;
  drawScheduled = true;
  requestAnimationFrame(() => { drawScheduled = false; draw(); });
}

function labelColumn() {
  const L = state.layer;
  return state.mode === 'mine' ? L.mine : state.mode === 'consensus' ? L.consensus : L.predicted;
}

// Units narrower than this on screen (CSS px) are drawn as squares, and a full redraw then
// rasterises them straight into pixels: a path per unit costs ~3 µs, a few pixel writes far less.
const SMALL_PX = 4;
const FILL_ALPHA = 153;  // 0.6: labels and predictions over the slide
const ALPHA_SHIFT = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1 ? 24 : 0;  // little/big-endian
const colourProbe = document.createElement('canvas').getContext('2d', { willReadFrequently: true });
let raster = null;       // { image, pixels }: the ImageData a raster redraw fills, reused while the size holds

// a CSS colour as the Uint32Array value of one ImageData pixel (straight RGBA bytes) with alpha 0
function rgbOf(colour) {
  colourProbe.clearRect(0, 0, 1, 1);
  colourProbe.fillStyle = colour;
  colourProbe.fillRect(0, 0, 1, 1);
  const [r, g, b] = colourProbe.getImageData(0, 0, 1, 1).data;
  return (ALPHA_SHIFT ? (b << 16) | (g << 8) | r : (r << 24) | (g << 16) | (b << 8)) >>> 0;
}

function rasterPixels(width, height) {
  if (!raster || raster.image.width !== width || raster.image.height !== height) {
    const image = ctx.createImageData(width, height);
    raster = { image, pixels: new Uint32Array(image.data.buffer) };
  } else raster.pixels.fill(0);
  return raster.pixels;
}

function draw() {
  if (!viewer || !state.layer || !state.slide) return;
  const started = performance.now();
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const L = state.layer;
  const { ox, oy, s } = transform();
  const column = labelColumn();
  const square = L.kind === 'wsi';
  const rasterise = state.render === 'auto' ? state.grid.largest * s < SMALL_PX : state.render === 'raster';
  const W = canvas.width, H = canvas.height;
  const pixels = rasterise ? rasterPixels(W, H) : null;
  const buckets = new Map();     // class * 256 + alpha -> [unit indices]
  const outline = [];
  for (let i = 0; i < L.n; i++) {
    const px = ox + L.x[i] * s, py = oy + L.y[i] * s, half = Math.max(L.size[i] * s / 2, 0.6);
    if (px + half < 0 || py + half < 0 || px - half > w || py - half > h) continue;
    const pending = state.pending.get(i);
    if (!(L.flags[i] & 1) && column[i] < 0 && pending === undefined) continue;  // off tissue, unlabelled
    const c = pending === undefined ? column[i] : pending;
    let alpha = FILL_ALPHA;
    if (state.mode === 'uncertainty' && pending === undefined) {
      alpha = L.uncertainty[i] === 255 ? 0 : Math.round(255 * Math.max(0.05, L.uncertainty[i] / 254));
    }
    if (c < 0 || alpha === 0) { if (half > 2.5) outline.push(i); continue; }
    if (pixels) {  // the device pixels whose centres fall inside the unit (at least one)
      const value = (state.rgb[c] | (alpha << ALPHA_SHIFT)) >>> 0;
      const cx = px * ratio, cy = py * ratio, r = half * ratio;
      let x0 = Math.round(cx - r), x1 = Math.max(Math.round(cx + r), x0 + 1);
      let y0 = Math.round(cy - r), y1 = Math.max(Math.round(cy + r), y0 + 1);
      x0 = Math.max(x0, 0); x1 = Math.min(x1, W); y0 = Math.max(y0, 0); y1 = Math.min(y1, H);
      for (let y = y0; y < y1; y++) pixels.fill(value, y * W + x0, y * W + x1);
      continue;
    }
    const key = c * 256 + alpha;
    let list = buckets.get(key);
    if (!list) buckets.set(key, list = []);
    list.push(i);
  }
  if (pixels) ctx.putImageData(raster.image, 0, 0);
  state.rendered = pixels ? 'raster' : 'path';
  const shape = (i) => {
    const px = ox + L.x[i] * s, py = oy + L.y[i] * s, half = Math.max(L.size[i] * s / 2, 0.6);
    if (square || 2 * half < SMALL_PX) { ctx.rect(px - half, py - half, 2 * half, 2 * half); }
    else { ctx.moveTo(px + half, py); ctx.arc(px, py, half, 0, 2 * Math.PI); }
  };
  for (const [key, list] of buckets) {
    ctx.globalAlpha = (key % 256) / 255;
    ctx.fillStyle = colourOf(Math.floor(key / 256));
    ctx.beginPath();
    for (const i of list) shape(i);
    ctx.fill();
  }
  ctx.globalAlpha = 0.5;
  ctx.strokeStyle = '#ffffff';
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (const i of outline) shape(i);
  ctx.stroke();
  ctx.globalAlpha = 1;
  // disputed units: a magenta cross
  ctx.strokeStyle = '#ff00ff';
  ctx.lineWidth = 2;
  ctx.beginPath();
  for (let i = 0; i < L.n; i++) {
    if (!(L.flags[i] & 2)) continue;
    const px = ox + L.x[i] * s, py = oy + L.y[i] * s, half = Math.max(L.size[i] * s / 2, 3);
    ctx.moveTo(px - half, py - half); ctx.lineTo(px + half, py + half);
    ctx.moveTo(px + half, py - half); ctx.lineTo(px - half, py + half);
  }
  ctx.stroke();
  // the query set: rings (and numbers when there is room)
  ctx.font = 'bold 12px system-ui, sans-serif';
  ctx.textAlign = 'center';
  ctx.textBaseline = 'middle';
  state.query.forEach((i, k) => {
    const px = ox + L.x[i] * s, py = oy + L.y[i] * s, half = Math.max(L.size[i] * s / 2, 4);
    if (px + half < 0 || py + half < 0 || px - half > w || py - half > h) return;
    const current = k === state.cursor;
    ctx.lineWidth = current ? 4 : 2.5;
    ctx.strokeStyle = current ? '#00e5ff' : '#ffd400';
    ctx.beginPath();
    if (square) ctx.rect(px - half - 2, py - half - 2, 2 * half + 4, 2 * half + 4);
    else ctx.arc(px, py, half + 2, 0, 2 * Math.PI);
    ctx.stroke();
    if (half >= 3) {
      ctx.fillStyle = '#000';
      ctx.fillText(String(k + 1), px + 1, py - half - 9);
      ctx.fillStyle = '#ffd400';
      ctx.fillText(String(k + 1), px, py - half - 10);
    }
  });
  if (lasso.length > 1) {
    ctx.strokeStyle = '#00e5ff';
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(lasso[0][0], lasso[0][1]);
    for (const [x, y] of lasso) ctx.lineTo(x, y);
    ctx.stroke();
  }
  if (!cache) cache = { canvas: document.createElement('canvas') };
  cache.canvas.width = canvas.width;
  cache.canvas.height = canvas.height;
  cache.canvas.getContext('2d').drawImage(canvas, 0, 0);
  Object.assign(cache, { ox, oy, s });
  state.frames += 1;
  state.fullDrawMs.push(performance.now() - started);
  if (state.fullDrawMs.length > 600) state.fullDrawMs.shift();
}

// ---------------------------------------------------------------------------- labelling
function assign(units) {
  if (state.readOnly || !units.length) return;
  const action = [];
  for (const i of units) {
    if (state.pending.get(i) === state.cls) continue;
    action.push([i, state.pending.get(i)]);
    state.pending.set(i, state.cls);
  }
  if (action.length) state.undo.push(action);
  afterEdit();
}

function undo() {
  const action = state.undo.pop();
  if (!action) return;
  for (const [i, previous] of action.reverse()) {
    if (previous === undefined) state.pending.delete(i); else state.pending.set(i, previous);
  }
  afterEdit();
}

// The model's connected same-class region around the clicked (else the current query) unit, as one
// undo step, in the current class: the annotator accepts it by sending, or trims it.
async function proposeRegion() {
  const L = state.layer;
  const i = state.focus >= 0 ? state.focus : state.query[state.cursor];
  if (state.readOnly || !L || i === undefined || i < 0) return;
  try {
    // as the signed-in annotator when the latest model knows their style (a per-annotator model)
    const as = state.raters.includes(state.me.subject) ? state.me.subject : '';
    const region = await getJSON(`${dsBase()}/region?unit=${encodeURIComponent(L.ids[i])}` +
                                 (as ? `&as=${encodeURIComponent(as)}` : ''));
    if (!L.index) L.index = new Map(L.ids.map((id, k) => [id, k]));
    const units = region.units.map((id) => L.index.get(id)).filter((k) => k !== undefined);
    assign(units);
    say(`region of ${units.length} units (model ${region.model_version}${as ? ' as ' + as : ''}: ` +
        `${region.class_name}) → ${L.classes[state.cls]}`);
  } catch (error) {
    say(`region: ${error.message}`, true);
  }
}

function afterEdit() {
  $('pending-count').textContent = String(state.pending.size);
  draw();
  if ($('auto-send').checked && state.query.length && state.query.every((i) => state.pending.has(i))) send();
}

function onCanvasClick(event) {
  if (!event.quick || state.tool !== 'click' || !state.layer) return;
  const [ux, uy] = toUnits(event.position.x, event.position.y);
  const i = unitAt(ux, uy);
  if (i >= 0) {
    state.focus = i;
    assign([i]);
    const k = state.query.indexOf(i);
    if (k >= 0) state.cursor = k;
  }
}

let lasso = [];
let painting = false;
function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll('.tool').forEach((b) => b.classList.toggle('active', b.dataset.tool === tool));
  canvas.classList.toggle('capture', tool !== 'click');
  if (viewer) viewer.setMouseNavEnabled(tool === 'click');
}
function pointer(event) {
  const rect = canvas.getBoundingClientRect();
  return [event.clientX - rect.left, event.clientY - rect.top];
}
const BRUSH_PX = 14;
function brushAt(event) {
  const [px, py] = pointer(event);
  const [ux, uy] = toUnits(px, py);
  assign(unitsNear(ux, uy, BRUSH_PX / transform().s));
}
canvas.addEventListener('pointerdown', (event) => {
  if (state.tool === 'click') return;
  painting = true;
  canvas.setPointerCapture(event.pointerId);
  if (state.tool === 'brush') { state.undo.push([]); brushAt(event); }
  else lasso = [pointer(event)];
});
canvas.addEventListener('pointermove', (event) => {
  if (!painting) return;
  if (state.tool === 'brush') {
    const [px, py] = pointer(event);
    const [ux, uy] = toUnits(px, py);
    const units = unitsNear(ux, uy, BRUSH_PX / transform().s).filter((i) => state.pending.get(i) !== state.cls);
    if (units.length && !state.readOnly) {
      const action = state.undo[state.undo.length - 1];
      for (const i of units) { action.push([i, state.pending.get(i)]); state.pending.set(i, state.cls); }
      afterEdit();
    }
  } else { lasso.push(pointer(event)); scheduleDraw(); }
});
canvas.addEventListener('pointerup', () => {
  if (!painting) return;
  painting = false;
  if (state.tool === 'brush') {
    if (state.undo.length && !state.undo[state.undo.length - 1].length) state.undo.pop();
    return;
  }
  const polygon = lasso;
  lasso = [];
  if (polygon.length < 3) { draw(); return; }
  const L = state.layer;
  const { ox, oy, s } = transform();
  const inside = [];
  for (let i = 0; i < L.n; i++) {
    const px = ox + L.x[i] * s, py = oy + L.y[i] * s;
    let hit = false;
    for (let a = 0, b = polygon.length - 1; a < polygon.length; b = a++) {
      const [xa, ya] = polygon[a], [xb, yb] = polygon[b];
      if ((ya > py) !== (yb > py) && px < ((xb - xa) * (py - ya)) / (yb - ya) + xa) hit = !hit;
    }
    if (hit) inside.push(i);
  }
  assign(inside);
});

function fly(k) {
  if (!state.query.length) return;
  state.cursor = Math.max(0, Math.min(state.query.length - 1, k));
  const L = state.layer;
  const i = state.query[state.cursor];
  const scale = state.slide.unit_scale;
  const centre = viewer.viewport.imageToViewportCoordinates(new OpenSeadragon.Point(L.x[i] * scale, L.y[i] * scale));
  const span = viewer.viewport.imageToViewportCoordinates(new OpenSeadragon.Point(L.size[i] * scale * 30, 0)).x;
  viewer.viewport.panTo(centre, false);
  viewer.viewport.zoomTo(Math.min(viewer.viewport.getMaxZoom(), 1 / Math.max(span, 1e-6)), centre, false);
  say(`query unit ${state.cursor + 1} of ${state.query.length}: ${L.ids[i]}`);
  draw();
}

function labelCurrent() {
  if (state.cursor < 0 || !state.query.length) return false;
  assign([state.query[state.cursor]]);
  if (state.cursor < state.query.length - 1) fly(state.cursor + 1);
  return true;
}

async function send() {
  if (state.readOnly || !state.pending.size || state.sending) return;
  state.sending = true;
  const L = state.layer;
  const labels = [...state.pending].map(([i, c]) => ({ unit: L.ids[i], label: L.classes[c] }));
  const batchId = 'web-' + (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2));
  const sentAt = performance.now();
  try {
    const reply = await (await api(`${dsBase()}/labels`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ labels, queryset_id: L.queryset_id, batch_id: batchId }),
    })).json();
    state.sentAt = sentAt;
    state.pending.clear();
    state.undo = [];
    $('pending-count').textContent = '0';
    say(`sent ${reply.n_labels} labels (label version ${reply.label_version}); waiting for round ${state.round + 1}…`);
    await loadLayer();
  } catch (e) {
    say('send failed: ' + e.message, true);
  } finally {
    state.sending = false;
  }
}

// ---------------------------------------------------------------------------- panels
function renderClasses() {
  const L = state.layer;
  const box = $('classes');
  box.innerHTML = '';
  L.classes.forEach((name, c) => {
    const button = document.createElement('button');
    button.className = 'class-button' + (c === state.cls ? ' active' : '');
    button.dataset.cls = String(c);
    button.innerHTML = `<span class="swatch" style="background:${colourOf(c)}"></span>${escape(name)}` +
      (c < 9 ? `<kbd>${c + 1}</kbd>` : '');
    button.onclick = () => selectClass(c, false);
    box.appendChild(button);
  });
}
function selectClass(c, fromKey) {
  if (!state.layer || c >= state.layer.classes.length) return;
  state.cls = c;
  document.querySelectorAll('.class-button').forEach((b) => b.classList.toggle('active', Number(b.dataset.cls) === c));
  if (fromKey && state.tool === 'click') labelCurrent();  // brush/lasso: the key picks the paint
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[ch]));
}

const KNOWN_STATUS = new Set(['project_id', 'round', 'labelled_per_class', 'n_labelled', 'n_spots', 'label_version',
  'latest_model_version', 'latest_metrics', 'stopping', 'n_disputed', 'pending_events', 'stages', 'parked', 'n_parked',
  'config_history', 'notice']);

// A stage's state in plain words (GetStatus sends the enum's name).
const STAGE_WORDS = {
  STAGE_STATUS_PENDING: 'waiting', STAGE_STATUS_RUNNING: 'running', STAGE_STATUS_DONE: 'done',
  STAGE_STATUS_FAILED: 'failed, trying again', STAGE_STATUS_PARKED: 'stopped: needs an operator',
};
const BAD_STAGE = new Set(['STAGE_STATUS_FAILED', 'STAGE_STATUS_PARKED']);

function renderStages(status) {
  const parts = [];
  if (status.notice) parts.push(`<p class="notice">Waiting: ${escape(status.notice)}</p>`);
  const rows = (status.stages || []).map((s) => {
    const bad = BAD_STAGE.has(s.status);
    let word = STAGE_WORDS[s.status] || 'unknown';
    if (s.status === 'STAGE_STATUS_RUNNING' && s.progress > 0 && s.progress < 1) word += ` (${Math.round(100 * s.progress)} %)`;
    if (bad && s.attempts) word += ` after ${s.attempts} attempt${s.attempts === 1 ? '' : 's'}`;
    const where = escape(s.stage) + (s.dataset ? ` <span class="muted">${escape(s.dataset)}</span>` : '');
    const css = bad ? 'state-bad' : s.status === 'STAGE_STATUS_DONE' ? 'state-ok' : '';
    return `<tr><td>${where}</td><td class="${css}">${escape(word)}</td></tr>` +
      (bad && s.last_error ? `<tr><td colspan="2" class="error">${escape(s.last_error)}</td></tr>` : '');
  });
  parts.push(rows.length ? `<table class="stages">${rows.join('')}</table>` : '<p>no stage has run yet</p>');
  for (const p of status.parked || []) {
    parts.push(`<p class="error">Parked: ${escape(p.stage)}${p.dataset ? ' of ' + escape(p.dataset) : ''} after ` +
      `${p.attempts} attempts: ${escape(p.error)}. Once the cause is fixed, an operator runs ` +
      `<code>histoloop retry ${escape(status.project_id)} ${escape(p.stage)}</code>.</p>`);
  }
  if (status.pending_events) parts.push(`<p class="muted">${status.pending_events} event(s) waiting to be published</p>`);
  const changes = status.config_history || [];
  if (changes.length) {
    const last = changes[changes.length - 1];
    parts.push(`<p class="muted">loop settings changed ${changes.length}×, last by ${escape(last.changed_by || 'unknown')}` +
      `${last.reason ? ': ' + escape(last.reason) : ''}</p>`);
  }
  return parts.join('');
}

function renderStopping(status) {
  const stop = status.stopping || {};
  if (!status.latest_model_version) return 'not yet (no model)';
  const pct = (x) => `${(100 * (x || 0)).toFixed(1)} %`;
  return `<p class="${stop.recommend_stop ? 'state-ok' : ''}"><b>${stop.recommend_stop ? 'Stop: the map has settled' : 'Keep labelling'}</b>` +
    `${stop.reason ? ' (' + escape(stop.reason) + ')' : ''}</p><table>` +
    `<tr><th>predictions changed since the last round</th><td>${pct(stop.changed_fraction)}</td></tr>` +
    `<tr><th>agreement with the last round (κ)</th><td>${(stop.kappa_vs_previous || 0).toFixed(3)}</td></tr>` +
    `<tr><th>mean uncertainty</th><td>${(stop.mean_uncertainty || 0).toFixed(3)}</td></tr></table>`;
}

let statusPending = false;
async function refreshStatus() {
  if (statusPending) return;  // GetStatus can take seconds on a large project: never two at once
  statusPending = true;
  let status;
  try { status = await getJSON(`${base()}/status`); } catch (e) { say(e.message, true); return; } finally { statusPending = false; }
  const per = status.labelled_per_class || {};
  const max = Math.max(1, ...Object.values(per));
  $('round').innerHTML = `<table><tr><th>round</th><td id="round-number">${status.round || 0}</td></tr>` +
    `<tr><th>labelled</th><td>${status.n_labelled || 0} of ${status.n_spots || 0}</td></tr>` +
    `<tr><th>disputed</th><td>${status.n_disputed || 0}</td></tr>` +
    `<tr><th>query set</th><td>${escape(state.layer ? state.layer.queryset_id : '')}</td></tr></table>`;
  const classes = state.layer ? state.layer.classes : Object.keys(per);
  $('per-class').innerHTML = '<table>' + classes.map((name, c) => {
    const n = per[name] || 0;
    return `<tr><td><span class="swatch" style="background:${colourOf(c) || '#999'}"></span>${escape(name)}</td>` +
      `<td>${n}</td><td><span class="bar" style="width:${Math.round((80 * n) / max)}px"></span></td></tr>`;
  }).join('') + '</table>';
  const m = status.latest_metrics || {};
  const model = `<tr><th>model</th><td>${escape(status.latest_model_version).slice(0, 18)}</td></tr>` +
    `<tr><th>trained on</th><td>${m.n_train || 0} labels</td></tr>`;
  $('metrics').innerHTML = !status.latest_model_version ? 'no model yet'
    : !m.n_val ? `<table>${model}</table><p class="muted">too few labels to hold some out for validation yet</p>`
    : `<table>${model}<tr><th>macro-F1</th><td>${(m.macro_f1 || 0).toFixed(3)}</td></tr>` +
      `<tr><th>balanced acc.</th><td>${(m.balanced_accuracy || 0).toFixed(3)}</td></tr>` +
      `<tr><th>kappa</th><td>${(m.cohen_kappa || 0).toFixed(3)}</td></tr>` +
      `<tr><th>validated on</th><td>${m.n_val} held-out labels</td></tr></table>`;
  $('stopping').innerHTML = renderStopping(status);
  // any status field newer than this page: rendered as it comes
  const extra = Object.entries(status).filter(([k]) => !KNOWN_STATUS.has(k));
  $('stages').innerHTML = renderStages(status) + extra.map(([k, v]) => renderValue(k, v)).join('');
}

function renderValue(key, value) {
  if (Array.isArray(value) && value.length && typeof value[0] === 'object') {
    const columns = [...new Set(value.flatMap((row) => Object.keys(row)))];
    return `<div><b>${escape(key)}</b><table><tr>${columns.map((c) => `<th>${escape(c)}</th>`).join('')}</tr>` +
      value.map((row) => '<tr>' + columns.map((c) => {
        const v = row[c];
        const bad = /fail|error|dead|park|stall/i.test(String(v));
        return `<td class="${bad ? 'state-bad' : ''}">${escape(typeof v === 'object' ? JSON.stringify(v) : v ?? '')}</td>`;
      }).join('') + '</tr>').join('') + '</table></div>';
  }
  if (value && typeof value === 'object') {
    return `<div><b>${escape(key)}</b><table>` + Object.entries(value).map(([k, v]) =>
      `<tr><th>${escape(k)}</th><td>${escape(typeof v === 'object' ? JSON.stringify(v) : v)}</td></tr>`).join('') + '</table></div>';
  }
  return `<div><b>${escape(key)}</b>: ${escape(value)}</div>`;
}

async function refreshCurve() {
  let models = [];
  try { models = (await getJSON(`${base()}/models`)).models; } catch (e) { return; }
  state.raters = models.length ? models[models.length - 1].raters : [];
  const svg = $('curve');
  const points = models.filter((m) => m.n_train > 0 && m.n_val > 0).map((m) => [m.n_train, m.macro_f1]);  // validated models only
  if (!points.length) { svg.innerHTML = ''; return; }
  const W = 260, H = 110, pad = 22;
  const maxX = Math.max(...points.map((p) => p[0]));
  const px = (x) => pad + ((W - pad - 6) * x) / Math.max(maxX, 1);
  const py = (y) => H - pad - (H - pad - 6) * y;
  svg.innerHTML = `<line x1="${pad}" y1="${H - pad}" x2="${W - 4}" y2="${H - pad}" stroke="#999"/>` +
    `<line x1="${pad}" y1="4" x2="${pad}" y2="${H - pad}" stroke="#999"/>` +
    `<text x="${pad}" y="${H - 6}" font-size="10">labels →${maxX}</text>` +
    `<text x="2" y="10" font-size="10">F1</text>` +
    `<polyline fill="none" stroke="#2e8b57" stroke-width="2" points="${points.map((p) => px(p[0]) + ',' + py(p[1])).join(' ')}"/>` +
    points.map((p) => `<circle cx="${px(p[0])}" cy="${py(p[1])}" r="2.5" fill="#2e8b57"/>`).join('');
}

async function renderAdjudication() {
  const L = state.layer;
  const byUnit = new Map();
  for (const [i, annotator, c] of L.votes) {
    if (!byUnit.has(i)) byUnit.set(i, []);
    byUnit.get(i).push(`${escape(annotator)}: ${escape(L.classes[c] ?? '?')}`);
  }
  let kappa = '';
  await slideShown();
  try {
    const agreement = await getJSON(`${base()}/agreement?dataset=${encodeURIComponent(state.dataset)}`);
    if (agreement.n_spots_multi_rated) {
      kappa = `<div>Fleiss' kappa ${(agreement.fleiss_kappa || 0).toFixed(3)} over ${agreement.n_spots_multi_rated} units</div>` +
        (agreement.cohen || []).map((p) => `<div>${escape(p.annotator_a)} × ${escape(p.annotator_b)}: κ ${(p.kappa || 0).toFixed(3)}</div>`).join('');
    }
  } catch (e) { /* no agreement yet */ }
  $('adjudication').innerHTML = kappa + (byUnit.size
    ? '<table>' + [...byUnit].map(([i, votes]) => `<tr class="disputed-unit" data-unit="${i}"><td>${escape(L.ids[i])}</td><td>${votes.join('<br>')}</td></tr>`).join('') + '</table>'
    : '<div>no disputed units</div>');
  document.querySelectorAll('.disputed-unit').forEach((row) => {
    row.onclick = () => {
      const i = Number(row.dataset.unit);
      const scale = state.slide.unit_scale;
      viewer.viewport.panTo(viewer.viewport.imageToViewportCoordinates(new OpenSeadragon.Point(L.x[i] * scale, L.y[i] * scale)));
    };
  });
}

function renderExports() {
  const formats = [['loupe', 'Loupe CSV'], ['geojson', 'QuPath GeoJSON']];
  $('exports').innerHTML = ['labels', 'queryset', 'predictions'].flatMap((kind) => formats.map(([format, name]) =>
    `<a class="export" href="${dsBase()}/export?kind=${kind}&format=${format}" download>${name}: ${kind}</a>`))
    .concat([`<a class="export" href="${dsBase()}/export?kind=queryset&format=png" download>PNG: queryset</a>`])
    .join('');
}

// ---------------------------------------------------------------------------- live updates
function listen() {
  const source = new EventSource(`${base()}/events`);
  source.addEventListener('queryset', async (event) => {
    const data = JSON.parse(event.data);
    if (data.round <= state.round && state.layer && data.queryset_id === state.layer.queryset_id) return;
    await loadLayer();
    refreshStatus();
    refreshCurve();
    if (state.sentAt) {
      state.latencies.push(performance.now() - state.sentAt);
      state.sentAt = 0;
    }
    const banner = $('banner');
    banner.hidden = false;
    banner.textContent = `round ${data.round}: ${data.n} new ${state.layer.kind === 'wsi' ? 'tiles' : 'spots'}`;
    if (state.query.length) fly(0);
  });
  source.addEventListener('error', () => say('live updates interrupted; reconnecting…', true));
  source.addEventListener('open', () => say('live'));
}

// ---------------------------------------------------------------------------- keys, start
document.addEventListener('keydown', (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  if (event.key >= '1' && event.key <= '9') selectClass(Number(event.key) - 1, true);
  else if (event.key === 'n') fly(state.cursor + 1);
  else if (event.key === 'p') fly(state.cursor - 1);
  else if (event.key === 'u' || (event.key === 'z' && (event.ctrlKey || event.metaKey))) undo();
  else if (event.key === 's') send();
  else if (event.key === 'r') proposeRegion();
  else if (event.key === 'c') setTool('click');
  else if (event.key === 'b') setTool('brush');
  else if (event.key === 'l') setTool('lasso');
});

async function main() {
  $('colour-mode').onchange = (event) => { state.mode = event.target.value; draw(); };
  document.querySelectorAll('.tool').forEach((b) => { b.onclick = () => setTool(b.dataset.tool); });
  $('undo').onclick = undo;
  $('region').onclick = proposeRegion;
  $('send').onclick = send;
  $('next').onclick = () => fly(state.cursor + 1);
  $('prev').onclick = () => fly(state.cursor - 1);
  // the project is asked for together with /api/me (one round trip less); after a sign-in, again
  const early = state.project ? getJSON(base()).catch(() => null) : null;
  const prompted = await signIn();
  if (!state.project) { say('open a project: add ?project=<id> to the address', true); return; }
  state.projectInfo = (!prompted && await early) || await getJSON(base());
  mark('project');
  $('project-name').textContent = state.projectInfo.name || state.project;
  const datasets = state.projectInfo.datasets || [];
  if (!datasets.length) { say('this project has no dataset yet', true); return; }
  if (!state.dataset || !datasets.includes(state.dataset)) state.dataset = datasets[0];
  $('dataset').innerHTML = datasets.map((d) => `<option${d === state.dataset ? ' selected' : ''}>${escape(d)}</option>`).join('');
  $('dataset').onchange = async (event) => { state.dataset = event.target.value; state.pending.clear(); renderExports(); await openDataset(); };
  renderExports();
  await openDataset();
  listen();
  slideShown().then(() => {
    refreshStatus();
    refreshCurve();
    setInterval(refreshStatus, 10000);
  });
  say(`${state.layer.n} units; ${state.query.length} asked in round ${state.round}`);
  if (state.query.length) fly(0);
  state.ready = true;
}

main().catch((e) => say(e.message, true));
