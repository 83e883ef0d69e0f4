// torchgate's live dashboard: polls dashboard/data once a second and draws its samples on
// plain canvases. No libraries: the page must work offline, behind any proxy, under a CSP
// that allows only this script.
"use strict";

const COLORS = {
  p50: "#5aa2e6", p95: "#e0a040", p99: "#e05252",
  "2xx": "#4caf7a", "4xx": "#e0a040", "5xx": "#e05252",
  line: "#5aa2e6", grid: "#273040", axis: "#8a96a8",
};
const MIN_SPAN_S = 60; // the x axis shows at least a minute, so a young history reads right

let boot = null;
let windowSize = 300;
let samples = [];
let now = null;

// numbers ----------------------------------------------------------------------------------

function fmt(value, digits) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "\u2013";
  const abs = Math.abs(value);
  if (digits !== undefined) return value.toFixed(digits);
  if (Number.isInteger(value)) return String(value);
  if (abs >= 100) return value.toFixed(0);
  if (abs >= 10) return value.toFixed(1);
  if (abs >= 1) return value.toFixed(2);
  return value.toPrecision(2);
}

function pct(ratio) {
  return ratio === null || ratio === undefined ? null : ratio * 100;
}

function setFigure(id, value, digits) {
  const el = document.getElementById(id);
  el.textContent = fmt(value, digits);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
}

// charts -----------------------------------------------------------------------------------

// A top for the y axis whose quarters (the grid lines) are round numbers.
function niceMax(value) {
  if (!(value > 0)) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  for (const m of [1, 1.2, 1.6, 2, 3, 4, 6, 8, 10]) {
    if (m * step >= value) return m * step;
  }
  return 10 * step;
}

function drawChart(canvasId, series, options = {}) {
  const canvas = document.getElementById(canvasId);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const pad = { left: 46, right: 8, top: 8, bottom: 20 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const latest = samples.length ? samples[samples.length - 1].t : 0;
  const oldest = samples.length ? samples[0].t : 0;
  const span = Math.max(MIN_SPAN_S, latest - oldest);
  let top = 0;
  for (const s of series) {
    for (const v of s.values) if (v !== null && v > top) top = v;
  }
  top = options.fixedMax || niceMax(Math.max(top * 1.08, options.minMax || 0));
  const x = (t) => pad.left + plotW * (1 - (latest - t) / span);
  const y = (v) => pad.top + plotH * (1 - v / top);

  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    const py = Math.round(y(v)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(pad.left, py);
    ctx.lineTo(width - pad.right, py);
    ctx.stroke();
    ctx.fillText(String(Number(v.toPrecision(3))), pad.left - 6, py);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const tick = span > 240 ? 60 : span > 120 ? 30 : 15;
  for (let ago = 0; ago <= span; ago += tick) {
    const px = x(latest - ago);
    ctx.fillText(ago === 0 ? "now" : `-${ago}s`, Math.min(px, width - pad.right - 12), height - pad.bottom + 5);
  }

  ctx.lineWidth = 1.6;
  ctx.lineJoin = "round";
  for (const s of series) {
    const lastValue = s.values.length ? s.values[s.values.length - 1] : null;
    if (lastValue !== null && lastValue !== undefined) {
      ctx.fillStyle = s.color;
      ctx.beginPath();
      ctx.arc(x(latest), y(Math.min(lastValue, top)), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.strokeStyle = s.color;
    ctx.beginPath();
    let drawing = false;
    samples.forEach((sample, i) => {
      const v = s.values[i];
      if (v === null || v === undefined) {
        drawing = false;
        return;
      }
      const px = x(sample.t);
      const py = y(Math.min(v, top));
      if (drawing) ctx.lineTo(px, py);
      else ctx.moveTo(px, py);
      drawing = true;
    });
    ctx.stroke();
  }
  if (!samples.length) {
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("waiting for samples\u2026", pad.left + plotW / 2, pad.top + plotH / 2);
  }

  const legend = document.getElementById(options.legend);
  legend.replaceChildren();
  for (const s of series) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = s.color;
    const last = document.createElement("b");
    const lastValue = s.values.length ? s.values[s.values.length - 1] : null;
    last.textContent = fmt(lastValue) + (options.unit || "");
    item.append(swatch, s.name, last);
    legend.append(item);
  }
}

function column(key, scale = 1) {
  return samples.map((s) => (s[key] === null || s[key] === undefined ? null : s[key] * scale));
}

// the page ---------------------------------------------------------------------------------

function renderOverview() {
  const current = now || (samples.length ? samples[samples.length - 1] : null);
  if (!current) return;
  setFigure("rps", current.rps);
  setFigure("error-rate", pct(current.error_rate));
  setFigure("p50", current.p50_ms);
  setFigure("p95", current.p95_ms);
  setFigure("p99", current.p99_ms);
  setFigure("inflight", current.inflight, 0);
  setFigure("models-loaded", current.models_loaded, 0);
  document.getElementById("error-rate").classList.toggle("bad", (current.error_rate || 0) > 0.001);

  const breakers = document.getElementById("breakers");
  breakers.replaceChildren();
  const entries = Object.entries(current.breakers);
  if (!entries.length) {
    const none = document.createElement("span");
    none.className = "empty";
    none.textContent = "none";
    breakers.append(none);
  }
  for (const [name, state] of entries) {
    const chip = document.createElement("span");
    chip.className = `chip ${state}`;
    chip.textContent = `${name} ${state.replace("_", "-")}`;
    breakers.append(chip);
  }
}

function render() {
  renderOverview();
  drawChart("chart-latency", [
    { name: "p50", color: COLORS.p50, values: column("p50_ms") },
    { name: "p95", color: COLORS.p95, values: column("p95_ms") },
    { name: "p99", color: COLORS.p99, values: column("p99_ms") },
  ], { legend: "legend-latency", unit: " ms", minMax: 1 });
  drawChart("chart-error-rate", [
    { name: "5xx", color: COLORS["5xx"], values: column("error_rate", 100) },
  ], { legend: "legend-error-rate", unit: " %", minMax: 1 });
  drawChart("chart-status", ["2xx", "4xx", "5xx"].map((cls) => ({
    name: cls, color: COLORS[cls], values: samples.map((s) => s.status[cls] ?? 0),
  })), { legend: "legend-status", unit: "/s", minMax: 1 });
  drawChart("chart-queue", [
    { name: "rows", color: COLORS.line, values: column("queue_rows") },
  ], { legend: "legend-queue", minMax: 4 });
  drawChart("chart-fill", [
    { name: "fill", color: COLORS.line, values: column("batch_fill", 100) },
  ], { legend: "legend-fill", unit: " %", fixedMax: 100 });
  drawChart("chart-inflight", [
    { name: "in flight", color: COLORS.line, values: column("inflight") },
  ], { legend: "legend-inflight", minMax: 4 });
  drawChart("chart-cache", [
    { name: "hits", color: COLORS.line, values: column("cache_hit_rate", 100) },
  ], { legend: "legend-cache", unit: " %", fixedMax: 100 });
}

function setStatus(text, live) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = live ? "live" : "down";
}

async function refresh() {
  const last = samples.length ? samples[samples.length - 1].t : null;
  const query = boot && last !== null ? `?boot=${encodeURIComponent(boot)}&since=${last}` : "";
  try {
    const answer = await fetch(`dashboard/data${query}`, { cache: "no-store" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    const data = await answer.json();
    if (data.boot !== boot) {
      boot = data.boot;
      samples = [];
    }
    windowSize = data.window || windowSize;
    samples = samples.concat(data.samples).slice(-windowSize);
    now = data.now;
    render();
    const clock = new Date().toLocaleTimeString();
    setStatus(`live \u00b7 ${samples.length} s of history \u00b7 ${clock}`, true);
  } catch (error) {
    setStatus(`no data: ${error.message}`, false);
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, 1000);
}

window.addEventListener("resize", render);
loop();
