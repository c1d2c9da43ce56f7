// inferd's dashboard: reads /dashboard/api/* and the V2 REST API of the server that serves it.
// No dependencies; every request goes to this page's own origin.
"use strict";

const $ = (sel) => document.querySelector(sel);
const HISTORY = 90;          // points kept per chart (one a second)
const WINDOW = 5;            // readings between which percentiles and rates are computed
const readings = [];
const series = { rps: [], p50: [], p99: [], errors: [], batch: [], queue: [], inflight: [], memory: [] };
let models = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function notice(text, error = false) {
  const n = $("#notice");
  n.textContent = text;
  n.className = error ? "error" : "";
}

function tokenHeader(admin) {
  const token = admin ? $("#admin-token").value : ($("#api-token").value || $("#admin-token").value);
  return token ? { authorization: "Bearer " + token } : {};
}

async function call(method, path, body, admin = false) {
  const headers = { ...tokenHeader(admin) };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let doc;
  try { doc = JSON.parse(text); } catch { doc = { error: text }; }
  if (!response.ok) {
    const err = new Error(`${response.status}: ${doc.error || text}`);
    err.status = response.status;
    throw err;
  }
  return doc;
}

// ---------- models ----------
async function refreshModels() {
  try {
    models = await call("GET", "/dashboard/api/models");
  } catch (e) {
    notice(e.status === 401 ? "This server needs its API token: enter it above." : "models: " + e.message, true);
    return;
  }
  renderModels();
  renderTryModels();
}

async function admin(label, method, path, body) {
  try {
    await call(method, path, body, true);
    notice(label + ": done");
  } catch (e) {
    notice(label + " refused: " + e.message, true);
  }
  await refreshModels();
}

function renderModels() {
  const body = $("#model-table tbody");
  const focus = focused(body);
  body.replaceChildren();
  for (const m of models) {
    const versions = el("td");
    if (m.unloaded) versions.append(el("span", { class: "unloaded" }, "unloaded by an admin"));
    for (const v of m.versions) {
      const row = el("div", { class: "version", "data-version": v.version },
        `${v.version} `, el("span", { class: "state-" + v.state }, v.state));
      if (v.resident_bytes) row.append(" ", el("span", { class: "resident" }, `${fmt(v.resident_bytes / 2 ** 20)} MiB`));
      if (v.reason) row.append(el("span", { class: "reason" }, v.reason));
      versions.append(row);
    }
    const labels = el("td");
    for (const [name, version] of Object.entries(m.labels)) {
      labels.append(el("div", { class: "label", "data-label": name }, `${name} → ${version}`));
    }
    const available = m.versions.filter((v) => v.state === "AVAILABLE").map((v) => v.version);
    const actions = el("td");
    const enc = encodeURIComponent(m.name);
    actions.append(
      el("button", { type: "button", class: "load", onclick: () => admin(`load ${m.name}`, "POST", `/v2/repository/models/${enc}/load`) }, "load"),
      " ",
      el("button", { type: "button", class: "unload", onclick: () => admin(`unload ${m.name}`, "POST", `/v2/repository/models/${enc}/unload`) }, "unload"),
    );
    const labelInput = remember(`${m.name}/label-name`, el("input", { class: "label-name", size: 8, placeholder: "label", value: Object.keys(m.labels)[0] || "stable" }));
    const versionSelect = remember(`${m.name}/label-version`, el("select", { class: "label-version" }, ...available.map((v) => el("option", { value: v }, v))));
    const move = el("form", { class: "move-label", onsubmit: (ev) => {
      ev.preventDefault();
      const label = labelInput.value.trim();
      admin(`move ${m.name}/${label}`, "POST", `/dashboard/api/models/${enc}/labels/${encodeURIComponent(label)}`,
        { version: Number(versionSelect.value) });
    } }, labelInput, " to ", versionSelect, el("button", { type: "submit" }, "move label"));
    actions.append(el("br"), move);
    body.append(el("tr", { "data-model": m.name }, el("td", {}, el("strong", {}, m.name), el("br"), m.platform || ""), versions, labels, renderTraffic(m, available), actions));
  }
  focus();
}

// The model table is drawn again every refresh: what an operator typed into its forms is kept here.
const drafts = {};

function remember(key, node) {
  node.dataset.draft = key;
  if (key in drafts) node.value = drafts[key];
  const keep = () => { drafts[key] = node.value; };
  node.addEventListener("input", keep);
  node.addEventListener("change", keep);
  return node;
}

// The field being typed into inside `root`, found again after a redraw: a function that focuses
// its new copy and puts the caret back, so keys typed across a refresh are not lost.
function focused(root) {
  const node = document.activeElement;
  const key = node && root.contains(node) ? node.dataset.draft : undefined;
  if (key === undefined) return () => {};
  let caret = null;
  try { caret = [node.selectionStart, node.selectionEnd]; } catch { /* a select has no caret */ }
  return () => {
    const again = [...root.querySelectorAll("[data-draft]")].find((n) => n.dataset.draft === key);
    if (!again) return;
    again.focus();
    try { if (caret && caret[0] !== null) again.setSelectionRange(...caret); } catch { /* type=number */ }
  };
}

// ---------- traffic and rollouts ----------
const GUARD_METRICS = ["error_rate", "p99_ms", "agreement"];

function percents(weights) {
  const entries = Object.entries(weights || {});
  return entries.length ? entries.map(([v, p]) => `${v}: ${fmt(p)}%`).join(", ") : "not split";
}

function renderTraffic(m, available) {
  const cell = el("td", { class: "traffic" }, el("div", { class: "split" }, "traffic: ", el("span", { class: "weights" }, percents(m.split))));
  const enc = encodeURIComponent(m.name);
  const r = m.rollout;
  if (r) {
    const live = r.state === "running" || r.state === "paused";
    const box = el("div", { class: "rollout", "data-state": r.state },
      el("div", {}, `rollout ${r.label}: ${r.baseline} → ${r.canary} `, el("span", { class: "rollout-state state-" + r.state }, r.state)));
    if (live) box.append(el("div", { class: "rollout-step" }, `step ${r.step + 1} of ${r.steps.length}: ${fmt(r.steps[r.step])}% to ${r.canary}, ${fmt(r.step_s)} s a step`));
    const metrics = live && Object.keys(r.current || {}).length ? r.current : r.checked || {};
    const used = GUARD_METRICS.filter((k) => r.guards.some((g) => g.startsWith(k)));
    const guards = el("table", { class: "guards" }, el("tr", {}, el("th", {}, live ? "this step" : "last step"), el("th", {}, "canary"), el("th", {}, "baseline")));
    for (const k of used.length ? used : ["error_rate", "p99_ms"]) {
      const v = metrics[k] || {};
      guards.append(el("tr", { "data-metric": k }, el("td", {}, k), el("td", {}, fmt(v.canary)), el("td", {}, fmt(v.baseline))));
    }
    box.append(el("div", { class: "guard-list" }, "guards: " + (r.guards.join(", ") || "none")), guards);
    const last = r.history.at(-1);
    if (last) box.append(el("div", { class: "rollout-event" }, `${new Date(last.time * 1000).toLocaleTimeString()} ${last.event}` + (last.failed ? `: ${last.failed.join("; ")}` : "")));
    const act = (action) => el("button", { type: "button", class: "rollout-" + action,
      onclick: () => admin(`${action} rollout of ${m.name}`, "POST", `/dashboard/api/models/${enc}/rollout/${action}`) }, action);
    if (r.state === "running") box.append(act("pause"), " ", act("promote"), " ", act("abort"));
    if (r.state === "paused") box.append(act("resume"), " ", act("promote"), " ", act("abort"));
    cell.append(box);
    if (live) return cell;
  }
  if (available.length < 2) return cell;  // a rollout needs a second AVAILABLE version
  const to = el("select", { class: "rollout-to" }, ...available.map((v) => el("option", { value: v }, v)));
  to.value = String(Math.max(...available, 0));
  remember(`${m.name}/rollout-to`, to);
  const label = remember(`${m.name}/rollout-label`, el("input", { class: "rollout-label", size: 8, value: (r && r.label) || Object.keys(m.labels)[0] || "stable" }));
  const steps = remember(`${m.name}/rollout-steps`, el("input", { class: "rollout-steps", size: 12, value: "1,5,25,50,100" }));
  const stepS = remember(`${m.name}/rollout-step-s`, el("input", { class: "rollout-step-s", type: "number", min: "0.1", step: "any", value: "60" }));
  const guardText = remember(`${m.name}/rollout-guards`, el("textarea", { class: "rollout-guards", rows: 2, placeholder: "error_rate<=0.01\np99_ms<=1.2*baseline" }));
  const form = el("form", { class: "start-rollout", onsubmit: (ev) => {
    ev.preventDefault();
    const body = {
      to: Number(to.value),
      label: label.value.trim(),
      steps: steps.value.split(",").map((x) => Number(x.trim())),
      step_s: Number(stepS.value),
      guards: guardText.value.split("\n").map((g) => g.trim()).filter((g) => g),
    };
    admin(`start rollout of ${m.name}`, "POST", `/dashboard/api/models/${enc}/rollout`, body);
  } }, "from label ", label, " to ", to, el("br"), "steps % ", steps, " every ", stepS, " s", el("br"), guardText, el("br"),
    el("button", { type: "submit" }, "start rollout"));
  cell.append(form);
  return cell;
}

// ---------- live charts ----------
function quantile(bounds, counts, q) {
  // counts: per-bucket (not cumulative) counts; linear interpolation inside the bucket.
  const total = counts.reduce((a, b) => a + b, 0);
  if (total <= 0) return null;
  let rank = q * total, seen = 0;
  for (let i = 0; i < counts.length; i++) {
    if (seen + counts[i] >= rank && counts[i] > 0) {
      const lo = i === 0 ? 0 : bounds[i - 1];
      const hi = Number.isFinite(bounds[i]) ? bounds[i] : lo;
      return lo + (hi - lo) * ((rank - seen) / counts[i]);
    }
    seen += counts[i];
  }
  return bounds[bounds.length - 2] || 0;
}

function bucketDelta(now, then) {
  // cumulative bucket counts -> per-bucket counts of the interval
  const out = [];
  let prev = 0;
  for (let i = 0; i < now.length; i++) {
    const c = (now[i] || 0) - ((then && then[i]) || 0);
    out.push(Math.max(0, c - prev));
    prev = c;
  }
  return out;
}

function sum(obj) { return Object.values(obj).reduce((a, b) => a + b, 0); }

function push(name, value) {
  series[name].push(value);
  if (series[name].length > HISTORY) series[name].shift();
}

function draw(svgId, lines) {
  const svg = $(svgId);
  const values = lines.flatMap((l) => l.filter((v) => v !== null));
  const max = Math.max(1e-9, ...values) * 1.1;
  const parts = [`<line class="axis" x1="0" y1="99" x2="300" y2="99"/>`];
  lines.forEach((line, i) => {
    const pts = line.map((v, j) => v === null ? null : `${(300 * (j + HISTORY - line.length) / (HISTORY - 1)).toFixed(1)},${(99 - 95 * v / max).toFixed(1)}`)
      .filter((p) => p !== null).join(" ");
    parts.push(`<polyline class="s${i}" points="${pts}"/>`);
  });
  svg.innerHTML = parts.join("");
  let scale = svg.parentElement.querySelector(".scale-max");
  if (!scale) {
    scale = el("small", { class: "scale-max" });
    svg.parentElement.querySelector("figcaption").append(scale);
  }
  scale.textContent = `top ${fmt(max / 1.1)}`;
  svg.dataset.points = String(values.length);
  svg.dataset.max = String(Math.max(0, ...values));
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(3);
}

async function refreshMetrics() {
  let now;
  try {
    now = await call("GET", "/dashboard/api/metrics");
  } catch (e) {
    if (e.status === 401) notice("This server needs its API token: enter it above.", true);
    return;
  }
  readings.push(now);
  if (readings.length > WINDOW + 1) readings.shift();
  const then = readings[0];
  const prev = readings.length > 1 ? readings[readings.length - 2] : null;
  if (prev) {
    const dt = Math.max(1e-3, now.time - prev.time);
    push("rps", (sum(now.requests) - sum(prev.requests)) / dt);
    const errors = {};
    for (const [status, count] of Object.entries(now.requests)) {
      if (status === "OK") continue;
      const d = count - (prev.requests[status] || 0);
      if (d > 0) errors[status] = d / dt;
    }
    push("errors", sum(errors));
    $("#now-errors").textContent = Object.keys(errors).length ? Object.entries(errors).map(([s, r]) => `${s} ${fmt(r)}/s`).join(", ") : "none";
  }
  const bounds = now.latency_bounds_s.map((b) => b * 1000);
  const stageRows = $("#stage-table tbody");
  stageRows.replaceChildren();
  for (const [stage, counts] of Object.entries(now.stages)) {
    const delta = bucketDelta(counts, then !== now ? then.stages[stage] : null);
    const p50 = quantile(bounds, delta, 0.5), p99 = quantile(bounds, delta, 0.99);
    if (stage === "total") { push("p50", p50); push("p99", p99); }
    stageRows.append(el("tr", { "data-stage": stage }, el("td", {}, stage), el("td", {}, fmt(p50)), el("td", {}, fmt(p99))));
  }
  if (!("total" in now.stages)) { push("p50", null); push("p99", null); }
  const batchDelta = bucketDelta(now.batch_sizes, then !== now ? then.batch_sizes : null);
  const batches = batchDelta.reduce((a, b) => a + b, 0);
  push("batch", batches ? quantile(now.batch_bounds, batchDelta, 0.5) : null);
  push("queue", now.queue_rows);
  push("inflight", now.in_flight);
  push("memory", now.memory_bytes / 2 ** 20);
  $("#budgets").textContent = (now.budgets || []).map((b) =>
    `${b.device}: ${fmt(b.used_bytes / 2 ** 20)} MiB charged to loaded versions` +
    (b.limit_bytes === null ? " (no budget)" : ` of a ${fmt(b.limit_bytes / 2 ** 20)} MiB budget`)).join("; ");
  draw("#chart-rps", [series.rps]);
  draw("#chart-latency", [series.p50, series.p99]);
  draw("#chart-errors", [series.errors]);
  draw("#chart-batch", [series.batch]);
  draw("#chart-queue", [series.queue, series.inflight]);
  draw("#chart-memory", [series.memory]);
  $("#now-rps").textContent = fmt(series.rps.at(-1));
  $("#now-latency").textContent = `${fmt(series.p50.at(-1))} / ${fmt(series.p99.at(-1))}`;
  $("#now-batch").textContent = fmt(series.batch.at(-1));
  $("#now-queue").textContent = `${now.queue_rows} / ${now.in_flight}`;
  $("#now-memory").textContent = fmt(series.memory.at(-1));
  $("#chart-window").textContent = `(last ${HISTORY} s, a point a second; percentiles over the last ${readings.length - 1} s)`;
}

// ---------- try it ----------
function imageShape(spec) {
  // [-1, H, W], [-1, H, W, 1] or [-1, N*N] -> {h, w, c}; [-1, H, W, 3] -> colour; else null
  const s = spec.shape;
  if (!s || !spec.datatype.startsWith("FP")) return null;
  const dims = s.slice(1);
  if (dims.some((d) => d <= 0)) return null;
  if (dims.length === 1) {
    const side = Math.round(Math.sqrt(dims[0]));
    return side * side === dims[0] && side >= 4 ? { h: side, w: side, c: 1 } : null;
  }
  if (dims.length === 2) return { h: dims[0], w: dims[1], c: 1 };
  if (dims.length === 3 && (dims[2] === 1 || dims[2] === 3)) return { h: dims[0], w: dims[1], c: dims[2] };
  return null;
}

function defaultSignature(m) {
  return m.signatures.serving_default || Object.values(m.signatures)[0];
}

function renderTryModels() {
  const select = $("#try-model");
  const current = select.value;
  const served = models.filter((m) => defaultSignature(m));
  const names = served.map((m) => m.name).join();
  if (select.dataset.names === names) return;
  select.dataset.names = names;
  select.replaceChildren(...served.map((m) => el("option", { value: m.name }, m.name)));
  if (served.some((m) => m.name === current)) select.value = current;
  renderTryForm();
}

const inputs = {};   // input name -> () => {shape, data}

function renderTryForm() {
  const form = $("#try-form");
  form.replaceChildren();
  for (const k of Object.keys(inputs)) delete inputs[k];
  const m = models.find((x) => x.name === $("#try-model").value);
  if (!m) return;
  const sig = defaultSignature(m);
  for (const spec of sig.inputs) {
    const image = imageShape(spec);
    const box = el("fieldset", { "data-input": spec.name }, el("legend", {}, `${spec.name}: ${spec.datatype} [${(spec.shape || ["?"]).join(", ")}]`));
    if (image && image.c === 1) {
      box.append(drawingCanvas(spec, image));
    } else if (image) {
      box.append(imageUpload(spec, image));
    } else {
      const dims = (spec.shape || [1]).map((d, i) => (d < 0 ? 1 : d));
      const zeros = dims.slice(1).reduceRight((acc, d) => Array.from({ length: d }, () => acc), spec.datatype === "BYTES" ? "" : 0);
      const area = el("textarea", { name: spec.name, spellcheck: "false" });
      area.value = JSON.stringify([zeros]);
      box.append(area);
      inputs[spec.name] = () => {
        const data = JSON.parse(area.value);
        return { shape: shapeOf(data), data: data.flat(Infinity) };
      };
    }
    form.append(box);
  }
}

function shapeOf(value) {
  const shape = [];
  while (Array.isArray(value)) { shape.push(value.length); value = value[0]; }
  return shape;
}

function drawingCanvas(spec, image) {
  const size = 224;
  const canvas = el("canvas", { class: "draw", width: size, height: size, "data-input": spec.name });
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, size, size);
  // The digits data set counts ink 0..16 per cell; images in [0, 1] suit most others.
  const scale = el("input", { type: "number", value: image.h * image.w === 64 ? 16 : 1, step: "any", class: "scale" });
  let down = false;
  const at = (ev) => { const r = canvas.getBoundingClientRect(); return [(ev.clientX - r.left) * size / r.width, (ev.clientY - r.top) * size / r.height]; };
  const stroke = (ev) => {
    if (!down) return;
    const [x, y] = at(ev);
    ctx.fillStyle = "#fff"; ctx.beginPath(); ctx.arc(x, y, size / image.w * 0.6, 0, 2 * Math.PI); ctx.fill();
  };
  canvas.addEventListener("pointerdown", (ev) => { down = true; canvas.setPointerCapture(ev.pointerId); stroke(ev); });
  canvas.addEventListener("pointermove", stroke);
  canvas.addEventListener("pointerup", () => { down = false; });
  const clear = el("button", { type: "button", onclick: () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, size, size); } }, "clear");
  inputs[spec.name] = () => {
    const small = document.createElement("canvas");
    small.width = image.w; small.height = image.h;
    const sctx = small.getContext("2d");
    sctx.imageSmoothingEnabled = true; sctx.imageSmoothingQuality = "high";
    sctx.drawImage(canvas, 0, 0, image.w, image.h);
    const pixels = sctx.getImageData(0, 0, image.w, image.h).data;
    const data = [];
    for (let i = 0; i < pixels.length; i += 4) data.push(Math.round(pixels[i] / 255 * Number(scale.value) * 100) / 100);
    return { shape: [1, ...spec.shape.slice(1)], data };
  };
  return el("div", {}, canvas, el("div", {}, clear, " ink scale ", scale, ` (downsampled to ${image.h}×${image.w})`));
}

function imageUpload(spec, image) {
  const file = el("input", { type: "file", accept: "image/*" });
  const preview = el("canvas", { width: image.w, height: image.h, class: "preview" });
  file.addEventListener("change", async () => {
    const bitmap = await createImageBitmap(file.files[0]);
    preview.getContext("2d").drawImage(bitmap, 0, 0, image.w, image.h);
  });
  inputs[spec.name] = () => {
    const pixels = preview.getContext("2d").getImageData(0, 0, image.w, image.h).data;
    const data = [];
    for (let i = 0; i < pixels.length; i += 4) data.push(pixels[i] / 255, pixels[i + 1] / 255, pixels[i + 2] / 255);
    return { shape: [1, ...spec.shape.slice(1)], data };
  };
  return el("div", {}, file, " ", preview, ` (resized to ${image.h}×${image.w}, RGB in [0, 1])`);
}

async function sendTry() {
  const m = models.find((x) => x.name === $("#try-model").value);
  if (!m) return;
  const sig = defaultSignature(m);
  const result = $("#try-result");
  let body;
  try {
    body = { inputs: sig.inputs.map((spec) => ({ name: spec.name, datatype: spec.datatype, ...inputs[spec.name]() })) };
  } catch (e) {
    result.replaceChildren(el("p", { class: "reason" }, "input: " + e.message));
    return;
  }
  const path = `/v2/models/${encodeURIComponent(m.name)}/infer`;
  const auth = tokenHeader(false).authorization;
  const json = JSON.stringify(body);
  const quoted = "'" + json.replaceAll("'", "'\\''") + "'";  // the shell's single quotes hold all but '
  $("#try-curl").textContent = `curl -X POST ${location.origin}${path} -H 'content-type: application/json'` +
    (auth ? ` -H "authorization: Bearer $INFERD_API_TOKEN"` : "") + ` -d ${quoted}`;
  $("#try-python").textContent = `import requests\nrequests.post("${location.origin}${path}", json=${json}` +
    (auth ? `, headers={"authorization": "Bearer " + token}` : "") + `).json()`;
  try {
    const answer = await call("POST", path, body);
    result.replaceChildren(renderAnswer(answer));
  } catch (e) {
    result.replaceChildren(el("p", { class: "reason" }, e.message));
  }
}

function renderAnswer(answer) {
  const box = el("div", {}, el("p", {}, `version ${answer.model_version}`));
  const probs = answer.outputs.find((o) => o.shape.length === 2 && o.shape[0] === 1 && o.shape[1] > 1 && o.datatype.startsWith("FP"));
  if (probs) {
    const best = probs.data.indexOf(Math.max(...probs.data));
    box.append(el("p", {}, "class ", el("span", { class: "class", id: "predicted-class" }, best), ` (${probs.name})`));
    const bars = el("div", { class: "bars" });
    probs.data.forEach((p, i) => {
      const bar = el("div", { class: i === best ? "bar top" : "bar", "data-class": i });
      bar.style.width = `${Math.max(0.5, p * 100)}%`;  // CSSOM: the page's CSP allows no inline style
      bars.append(el("span", {}, i), el("div", {}, bar), el("span", {}, p.toFixed(3)));
    });
    box.append(bars);
  }
  for (const o of answer.outputs) {
    if (o !== probs) box.append(el("p", {}, `${o.name} [${o.shape.join(", ")}]: ${JSON.stringify(o.data).slice(0, 300)}`));
  }
  return box;
}

// ---------- views ----------
function show() {
  const view = (location.hash || "#models").slice(1);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("shown", s.id === view);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
}

function start() {
  for (const id of ["api-token", "admin-token"]) {
    const input = document.getElementById(id);
    input.value = sessionStorage.getItem(id) || "";
    input.addEventListener("change", () => { sessionStorage.setItem(id, input.value); notice(""); refreshModels(); });
  }
  $("#try-model").addEventListener("change", renderTryForm);
  $("#try-send").addEventListener("click", sendTry);
  window.addEventListener("hashchange", show);
  show();
  refreshModels();
  refreshMetrics();
  setInterval(refreshMetrics, 1000);
  setInterval(refreshModels, 2000);
}

document.addEventListener("DOMContentLoaded", start);
