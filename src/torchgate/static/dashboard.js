// torchgate's live dashboard: polls dashboard/data once a second and draws its samples on
// plain canvases. No libraries: the page must work offline, behind any proxy, under a CSP
// that allows only this script. Tiles and legends summarise the last minute (the
// sampler's `now`); the charts show each second of the last five minutes.
"use strict";

const COLORS = {
  p50: "#5aa2e6", p95: "#e0a040", p99: "#e05252",
  "2xx": "#4caf7a", "4xx": "#e0a040", "429": "#b48ee8", "5xx": "#e05252",
  line: "#5aa2e6", grid: "#273040", axis: "#8a96a8",
};
const CLASSES = ["2xx", "4xx", "429", "5xx"];
const MIN_SPAN_S = 60; // the x axis shows at least a minute, so a young history reads right
const SUMMARY_S = 60; // what the legends summarise

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

function answered(sample) {
  return CLASSES.reduce((sum, cls) => sum + (sample.counts[cls] || 0), 0);
}

// The share of a sample's answers in `classes`, as a percentage; an idle second is 0 %,
// which is the truth: nothing was refused or failed in it.
function share(sample, classes) {
  const total = answered(sample);
  if (!total) return 0;
  return (100 * classes.reduce((sum, cls) => sum + (sample.counts[cls] || 0), 0)) / total;
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

// Seconds between x axis labels: the smallest round step that leaves each label room.
function tickStep(span, plotWidth) {
  for (const step of [15, 30, 60, 120, 300]) {
    if ((plotWidth * step) / span >= 44) return step;
  }
  return 600;
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

  const pad = { left: 42, right: 10, top: 8, bottom: 20 };
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
  ctx.textBaseline = "top";
  const tick = tickStep(span, plotW);
  for (let ago = 0; ago <= span; ago += tick) {
    const px = x(latest - ago);
    const label = ago === 0 ? "now" : ago % 60 === 0 ? `-${ago / 60}m` : `-${ago}s`;
    // the labels at either end stay inside the plot, clear of the y axis's numbers
    const edge = ago === 0 ? "right" : px - pad.left < 16 ? "left" : "center";
    ctx.textAlign = edge;
    ctx.fillText(label, ago === 0 ? width - pad.right : px, height - pad.bottom + 5);
  }

  ctx.lineWidth = 1.6;
  ctx.lineJoin = "round";
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.beginPath();
    const points = samples.map((sample, i) => {
      const v = s.values[i];
      return v === null || v === undefined ? null : [x(sample.t), y(Math.min(v, top))];
    });
    points.forEach((point, i) => {
      if (!point) return;
      if (points[i - 1]) ctx.lineTo(point[0], point[1]);
      else ctx.moveTo(point[0], point[1]);
    });
    ctx.stroke();
    // a second with a value between two without (a lone request) is a dot, not nothing
    points.forEach((point, i) => {
      if (point && !points[i - 1] && !points[i + 1]) {
        ctx.beginPath();
        ctx.arc(point[0], point[1], 2, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
  }
  if (!samples.length) {
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("waiting for samples\u2026", pad.left + plotW / 2, pad.top + plotH / 2);
  }

  const legend = document.getElementById(options.legend);
  legend.replaceChildren();
  series.forEach((s, i) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = s.color;
    const summary = document.createElement("b");
    summary.textContent = options.summaries[i];
    item.append(swatch, s.name, summary);
    legend.append(item);
  });
}

function column(key, scale = 1) {
  return samples.map((s) => (s[key] === null || s[key] === undefined ? null : s[key] * scale));
}

function lastMinute() {
  const latest = samples.length ? samples[samples.length - 1].t : 0;
  return samples.filter((s) => s.t > latest - SUMMARY_S);
}

function peak(key) {
  const values = lastMinute().map((s) => s[key]);
  return values.length ? Math.max(...values) : null;
}

function mean(key) {
  const values = lastMinute().map((s) => s[key]);
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

// the page ---------------------------------------------------------------------------------

function renderOverview() {
  const current = now || (samples.length ? samples[samples.length - 1] : null);
  if (!current) return;
  const span = Math.round(current.interval_s);
  document.getElementById("overview-span").textContent =
    span >= SUMMARY_S - 1 ? "last minute" : `last ${span} s (since start)`;
  setFigure("rps", current.rps);
  setFigure("answered", answered(current), 0);
  setFigure("error-rate", pct(current.error_rate));
  setFigure("refused-rate", pct(current.refused_rate));
  setFigure("limited-rate", pct(current.limited_rate));
  for (const cls of ["4xx", "429", "5xx"]) setFigure(`count-${cls}`, current.counts[cls] || 0, 0);
  setFigure("p50", current.p50_ms);
  setFigure("p95", current.p95_ms);
  setFigure("p99", current.p99_ms);
  setFigure("inflight", current.inflight, 0);
  setFigure("models-loaded", current.models_loaded, 0);
  document.getElementById("error-rate").classList.toggle("bad", (current.error_rate || 0) > 0.001);
  document.getElementById("refused-rate").classList.toggle("warn", (current.refused_rate || 0) > 0.001);
  document.getElementById("limited-rate").classList.toggle("limit", (current.limited_rate || 0) > 0.001);

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

const MIB = 1024 * 1024;

// The resident set: what is loaded now (the latest second), loads and evictions over the
// last minute.
function renderResidency() {
  const latest = samples.length ? samples[samples.length - 1] : null;
  if (!latest) return;
  const minute = now || latest;
  const budget = latest.memory_budget_bytes;
  setFigure("memory-held", latest.memory_bytes / MIB, 1);
  setFigure("memory-budget", budget === null ? null : budget / MIB, 1);
  document.getElementById("memory-held").classList.toggle("over", budget !== null && latest.memory_bytes > budget);
  const versions = Object.entries(latest.resident).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  setFigure("resident-count", versions.length, 0);
  setFigure("loads", minute.loads, 0);
  setFigure("evictions", minute.evictions, 0);
  setFigure("load-failures", minute.load_failures, 0);
  const list = document.getElementById("resident");
  list.replaceChildren();
  if (!versions.length) {
    const none = document.createElement("span");
    none.className = "empty";
    none.textContent = "none";
    list.append(none);
  }
  for (const [name, bytes] of versions) {
    const chip = document.createElement("span");
    chip.className = "chip";
    const size = document.createElement("span");
    size.textContent = `${fmt(bytes / MIB)} MiB`;
    chip.append(`${name} `, size);
    list.append(chip);
  }
}

function render() {
  renderOverview();
  renderResidency();
  const minute = now || {};
  const counts = minute.counts || {};
  const total = CLASSES.reduce((sum, cls) => sum + (counts[cls] || 0), 0);
  const minuteShare = (cls) => (total ? fmt((100 * (counts[cls] || 0)) / total) : "0") + " %";
  drawChart("chart-latency", [
    { name: "p50", color: COLORS.p50, values: column("p50_ms") },
    { name: "p95", color: COLORS.p95, values: column("p95_ms") },
    { name: "p99", color: COLORS.p99, values: column("p99_ms") },
  ], {
    legend: "legend-latency", minMax: 1,
    summaries: ["p50_ms", "p95_ms", "p99_ms"].map((k) => `${fmt(minute[k])} ms`),
  });
  drawChart("chart-error-rate", [
    { name: "refused 4xx", color: COLORS["4xx"], values: samples.map((s) => share(s, ["4xx"])) },
    { name: "rate limited 429", color: COLORS["429"], values: samples.map((s) => share(s, ["429"])) },
    { name: "failed 5xx", color: COLORS["5xx"], values: samples.map((s) => share(s, ["5xx"])) },
  ], {
    legend: "legend-error-rate", minMax: 1,
    summaries: ["4xx", "429", "5xx"].map(minuteShare),
  });
  drawChart("chart-status", CLASSES.map((cls) => ({
    name: cls, color: COLORS[cls], values: samples.map((s) => s.status[cls] ?? 0),
  })), {
    legend: "legend-status", minMax: 1,
    summaries: CLASSES.map((cls) => `${counts[cls] || 0} (${fmt((minute.status || {})[cls] || 0)}/s)`),
  });
  drawChart("chart-queue", [
    { name: "rows", color: COLORS.line, values: column("queue_rows") },
  ], { legend: "legend-queue", minMax: 4, summaries: [`peak ${fmt(peak("queue_rows"))}, mean ${fmt(mean("queue_rows"))}`] });
  drawChart("chart-fill", [
    { name: "fill", color: COLORS.line, values: column("batch_fill", 100) },
  ], { legend: "legend-fill", fixedMax: 100, summaries: [`${fmt(pct(minute.batch_fill))} %`] });
  drawChart("chart-inflight", [
    { name: "in flight", color: COLORS.line, values: column("inflight") },
  ], { legend: "legend-inflight", minMax: 4, summaries: [`peak ${fmt(peak("inflight"))}`] });
  const budgets = column("memory_budget_bytes", 1 / MIB);
  const memorySeries = [{ name: "held", color: COLORS.line, values: column("memory_bytes", 1 / MIB) }];
  const latestBudget = budgets.length ? budgets[budgets.length - 1] : null;
  if (latestBudget !== null) memorySeries.push({ name: "budget", color: COLORS.p99, values: budgets });
  drawChart("chart-memory", memorySeries, {
    legend: "legend-memory", minMax: 1,
    summaries: [`peak ${fmt(peak("memory_bytes") === null ? null : peak("memory_bytes") / MIB)} MiB`,
      `${fmt(latestBudget)} MiB`].slice(0, memorySeries.length),
  });
  drawChart("chart-cache", [
    { name: "hits", color: COLORS.line, values: column("cache_hit_rate", 100) },
  ], { legend: "legend-cache", fixedMax: 100, summaries: [`${fmt(pct(minute.cache_hit_rate))} %`] });
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
