// A twin's page: latest states, A / R / T / ODTE and readings over time (uPlot), the lifecycle
// timeline, recent states, the device's configuration and faults; live through the stream.

import { follow, getJSON, withQuery } from "./api.js";
import { LIFECYCLES, age, badge, el, failure, figure, perFrame, when } from "./format.js";

const RANGES = [["15 min", 15 * 60e3], ["1 h", 3600e3], ["6 h", 6 * 3600e3], ["24 h", 24 * 3600e3]];
const HISTORY = 20;
const FIGURES = [["odte", "ODTE"], ["availability", "A"], ["reliability", "R"], ["timeliness", "T"]];

function css(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

/** The readings of a state or history entry: the model's, or the seed's two. */
function readingsOf(state) {
  if (state.readings && typeof state.readings === "object") return state.readings;
  const seed = {};
  for (const k of ["temperature", "energy"]) if (typeof state[k] === "number") seed[k] = state[k];
  return seed;
}

function readingText(readings) {
  const entries = Object.entries(readings);
  if (!entries.length) return "–";
  return entries.map(([k, v]) => `${k} ${typeof v === "number" ? +v.toFixed(3) : JSON.stringify(v)}`).join(" · ");
}

export function twinPage(main, id) {
  let left = false;
  let range = RANGES[1][1];
  let twin = null;
  let history = [];
  let figuresChart = null;
  let readingsChart = null;
  let series = { x: [], figures: FIGURES.map(() => []), names: [], readings: [] };
  let runs = []; // lifecycle bands: {from, to, lifecycle}
  let ready = false;

  const title = el("h1", {}, id);
  const headBadge = el("span", { id: "twin-lifecycle" });
  const headMeta = el("p", { class: "muted" });
  const latest = el("div", { class: "cards" });
  const rangeButtons = RANGES.map(([label, ms]) => el("button", {
    type: "button", "aria-pressed": String(ms === range), dataset: { range: ms },
    onclick: () => {
      range = ms;
      for (const b of rangeButtons) b.setAttribute("aria-pressed", String(Number(b.dataset.range) === range));
      loadSeries().catch(show);
    },
  }, label));
  const figuresBox = el("div", { class: "chart", id: "chart-figures", role: "img", "aria-label": "A, R, T and ODTE over time" });
  const readingsBox = el("div", { class: "chart", id: "chart-readings", role: "img", "aria-label": "Readings over time" });
  const timeline = el("div", { class: "timeline", id: "lifecycle-timeline", role: "img", "aria-label": "Lifecycle over time" });
  const legend = el("div", { class: "legend" }, LIFECYCLES.map((l) => el("span", {}, el("i", { class: `lc-${l}` }), l)));
  const historyBody = el("tbody");
  const devicePanel = el("section", { class: "panel", id: "device-panel", hidden: true, "aria-labelledby": "device-title" });
  const errors = el("div");

  main.append(
    el("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, el("a", { href: "#/" }, "Fleet"), " / ", id),
    el("header", { class: "twin-head" }, title, headBadge, headMeta),
    errors,
    latest,
    el("section", { class: "panel", "aria-labelledby": "figures-title" },
      el("div", { class: "toolbar" }, el("h2", { id: "figures-title" }, "A / R / T / ODTE"),
        el("div", { class: "ranges", role: "group", "aria-label": "Time range" }, rangeButtons)),
      figuresBox,
      el("h3", {}, "Lifecycle"), timeline, legend),
    el("section", { class: "panel", "aria-labelledby": "readings-title" },
      el("h2", { id: "readings-title" }, "Readings"), readingsBox),
    el("section", { class: "panel", "aria-labelledby": "history-title" },
      el("h2", { id: "history-title" }, "Recent states"),
      el("div", { class: "table-wrap" }, el("table", { class: "history", id: "history-table" },
        el("thead", {}, el("tr", {}, ["State", "Time", "Device time", "Readings", "A", "R", "T", "ODTE", "Label"]
          .map((h, i) => el("th", { scope: "col", class: i >= 4 && i < 8 ? "num" : "" }, h)))),
        historyBody))),
    devicePanel,
  );

  function show(e) {
    if (left || e.name === "AbortError") return;
    console.error(e);
    errors.replaceChildren(failure(e));
  }

  // --- latest ---
  function renderHead() {
    if (!twin) return;
    headBadge.replaceChildren(badge(twin.lifecycle));
    headMeta.textContent = `${twin.model ?? "seed device"} · ${twin.lifecycle} since ${when(twin.since)} (${age(twin.since)})`;
    const last = history[0];
    const card = (label, value, extra) => el("div", { class: "card" }, el("span", { class: "label" }, label),
      el("strong", {}, value), extra ? el("span", { class: "muted" }, extra) : null);
    latest.replaceChildren(
      card("ODTE", figure(twin.odte), `evaluated ${age(twin.evaluated_at)} ago`),
      card("Availability", figure(twin.availability)),
      card("Reliability", figure(twin.reliability)),
      card("Timeliness", figure(twin.timeliness)),
      el("div", { class: "card wide", id: "latest-physical" }, el("span", { class: "label" }, "Physical state"),
        el("strong", {}, last ? readingText(readingsOf(last)) : "–"),
        el("span", { class: "muted" }, `device time ${when(last?.device_timestamp ?? twin.last_physical_timestamp)}`),
        last?.model ? el("span", { class: "muted" }, `${last.model} v${last.model_version}`) : null),
      el("div", { class: "card wide", id: "latest-digital" }, el("span", { class: "label" }, "Digital state"),
        el("strong", {}, last ? `#${last.id} · ${last.lifecycle}` : `#${twin.digital_state_id}`),
        el("span", { class: "muted" }, `twin time ${when(twin.last_digital_timestamp)}`)),
    );
  }
  const scheduleHead = perFrame(renderHead);

  function renderHistory() {
    historyBody.replaceChildren(...history.map((s) => el("tr", { dataset: { stateId: s.id } },
      el("td", { class: "num" }, s.id), el("td", {}, when(s.timestamp)), el("td", {}, when(s.device_timestamp)),
      el("td", {}, readingText(readingsOf(s))),
      el("td", { class: "num" }, figure(s.availability)), el("td", { class: "num" }, figure(s.reliability)),
      el("td", { class: "num" }, figure(s.timeliness)), el("td", { class: "num" }, figure(s.odte)),
      el("td", {}, badge(s.lifecycle)))));
  }
  const scheduleHistory = perFrame(renderHistory);

  // --- charts ---
  function chartOptions(box, seriesDefs, yRange) {
    const fg = css("--fg-muted", "#666");
    const grid = css("--grid", "rgba(128,128,128,.2)");
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } };
    return {
      width: Math.max(300, box.clientWidth), height: 240,
      scales: { x: { time: true }, y: yRange ? { range: yRange } : {} },
      series: [{}, ...seriesDefs.map(([label, color]) => ({ label, stroke: color, width: 1.5, spanGaps: false, points: { show: false } }))],
      axes: [axis, { ...axis, size: 50 }],
      legend: { live: true },
    };
  }
  const PALETTE = () => [css("--c1", "#2563eb"), css("--c2", "#16a34a"), css("--c3", "#d97706"), css("--c4", "#9333ea"), css("--c5", "#dc2626"), css("--c6", "#0891b2")];

  function draw() {
    if (left || typeof uPlot === "undefined") return;
    const palette = PALETTE();
    const figData = [series.x, ...series.figures];
    if (!figuresChart) {
      figuresChart = new uPlot(chartOptions(figuresBox, FIGURES.map(([, label], i) => [label, palette[i]]), [0, 1]), figData, figuresBox);
    } else {
      figuresChart.setData(figData);
    }
    const readData = [series.x, ...series.readings];
    if (readingsChart && readingsChart.series.length !== series.names.length + 1) {
      readingsChart.destroy();
      readingsChart = null;
    }
    if (!readingsChart && series.names.length) {
      readingsChart = new uPlot(chartOptions(readingsBox, series.names.map((n, i) => [n, palette[i % palette.length]])), readData, readingsBox);
    } else if (readingsChart) {
      readingsChart.setData(readData);
    }
    const points = series.figures[0].filter((v) => v !== null && v !== undefined).length;
    figuresBox.dataset.points = points;
    readingsBox.dataset.points = series.readings.length
      ? series.readings[0].filter((v) => v !== null && v !== undefined).length : 0;
    renderTimeline();
  }
  const scheduleDraw = perFrame(draw);

  function renderTimeline() {
    const now = Date.now();
    const from = now - range;
    const visible = runs.filter((r) => r.to > from);
    timeline.replaceChildren(...visible.map((r) => {
      const start = Math.max(r.from, from);
      const width = ((Math.min(r.to, now) - start) / range) * 100;
      const left_ = ((start - from) / range) * 100;
      return el("span", {
        class: `band lc-${r.lifecycle}`, dataset: { lifecycle: r.lifecycle },
        style: `left:${left_}%;width:${Math.max(width, 0.3)}%`,
        title: `${r.lifecycle}: ${when(r.from)} – ${when(r.to)}`,
      });
    }));
    timeline.dataset.lifecycle = runs.length ? runs[runs.length - 1].lifecycle : "";
  }

  async function loadSeries() {
    const to = Date.now();
    const from = to - range;
    const answer = await getJSON(withQuery(`/api/twins/${encodeURIComponent(id)}/series`, { from, to }));
    if (left) return;
    const step = answer.step;
    const names = [...new Set(answer.buckets.flatMap((b) => Object.keys(b.readings ?? {})))].sort();
    const next = { x: [], figures: FIGURES.map(() => []), names, readings: names.map(() => []) };
    const push = (t, bucket) => {
      next.x.push(t / 1000);
      FIGURES.forEach(([key], i) => {
        const v = bucket?.[key];
        next.figures[i].push(v === undefined || v === null ? null : typeof v === "object" ? v.avg : v);
      });
      names.forEach((n, i) => next.readings[i].push(bucket?.readings?.[n]?.avg ?? null));
    };
    let previous = null;
    const bands = [];
    for (const bucket of answer.buckets) {
      // An omitted bucket is a gap in the lines.
      if (previous !== null && bucket.t - previous > step) push(previous + step, null);
      push(bucket.t, bucket);
      previous = bucket.t;
      const last = bands[bands.length - 1];
      if (last && last.lifecycle === bucket.lifecycle && last.to >= bucket.t) last.to = bucket.t + step;
      else if (bucket.lifecycle) bands.push({ from: bucket.t, to: bucket.t + step, lifecycle: bucket.lifecycle });
    }
    series = next;
    // Live bands after the series' end stay.
    const end = bands.length ? bands[bands.length - 1].to : 0;
    runs = bands.concat(runs.filter((r) => r.from >= end && r.live));
    scheduleDraw();
  }

  async function loadTwin() {
    const [t, h] = await Promise.all([
      getJSON(`/api/twins/${encodeURIComponent(id)}`),
      getJSON(withQuery(`/api/twins/${encodeURIComponent(id)}/history`, { limit: HISTORY })),
    ]);
    if (left) return;
    twin = t;
    history = h.items ?? [];
    scheduleHead();
    scheduleHistory();
  }

  async function loadDevice() {
    const answer = await getJSON(`/api/devices/${encodeURIComponent(id)}`, { allow404: true });
    if (left) return;
    if (!answer) {
      devicePanel.hidden = true;
      return;
    }
    devicePanel.hidden = false;
    devicePanel.replaceChildren(el("h2", { id: "device-title" }, "Device"),
      el("div", { class: "two" },
        el("div", {}, el("h3", {}, "Configuration"), el("pre", {}, JSON.stringify(answer.conf, null, 2))),
        el("div", {}, el("h3", {}, "Faults"), el("pre", { id: "device-faults" }, JSON.stringify(answer.faults, null, 2)))));
  }

  // --- live ---
  follow({ device_id: id, events: "digitalstate,lifecycle" }, {
    digitalstate(state) {
      if (state.device_id !== id) return;
      const t = state.timestamp / 1000;
      if (series.x.length && t < series.x[series.x.length - 1]) return;
      series.x.push(t);
      FIGURES.forEach(([key], i) => series.figures[i].push(state[key] ?? null));
      const readings = readingsOf(state);
      series.names.forEach((n, i) => series.readings[i].push(typeof readings[n] === "number" ? readings[n] : null));
      // Memory bounded: points before the range are dropped.
      const from = (Date.now() - range) / 1000;
      let drop = 0;
      while (drop < series.x.length && series.x[drop] < from) drop++;
      if (drop) {
        series.x.splice(0, drop);
        series.figures.forEach((s) => s.splice(0, drop));
        series.readings.forEach((s) => s.splice(0, drop));
      }
      if (twin) {
        Object.assign(twin, {
          odte: state.odte, availability: state.availability, reliability: state.reliability,
          timeliness: state.timeliness, last_digital_timestamp: state.timestamp, digital_state_id: state.id,
        });
      }
      history.unshift({ ...state, device_timestamp: undefined });
      history.length = Math.min(history.length, HISTORY);
      const last = runs[runs.length - 1];
      if (last) last.to = Math.max(last.to, state.timestamp);
      scheduleDraw();
      scheduleHead();
      scheduleHistory();
    },
    lifecycle(change) {
      if (change.device_id !== id) return;
      const last = runs[runs.length - 1];
      if (last) last.to = change.at;
      runs.push({ from: change.at, to: Date.now(), lifecycle: change.to, live: true });
      if (twin) Object.assign(twin, { lifecycle: change.to, since: change.at, odte: change.odte });
      scheduleHead();
      scheduleDraw();
    },
  });

  const ticker = setInterval(() => {
    const last = runs[runs.length - 1];
    if (last) last.to = Math.max(last.to, Date.now());
    scheduleDraw();
  }, 5000);
  const resize = () => {
    for (const [chart, box] of [[figuresChart, figuresBox], [readingsChart, readingsBox]]) {
      if (chart) chart.setSize({ width: Math.max(300, box.clientWidth), height: 240 });
    }
  };
  window.addEventListener("resize", resize);

  Promise.all([loadTwin(), loadSeries()])
    .then(() => new Promise(requestAnimationFrame))
    .then(() => {
      if (left || ready) return;
      ready = true;
      document.body.dataset.ready = "twin";
      performance.mark("entwine-ready");
    })
    .catch(show);
  loadDevice().catch(show);

  return {
    leave() {
      left = true;
      clearInterval(ticker);
      window.removeEventListener("resize", resize);
      figuresChart?.destroy();
      readingsChart?.destroy();
    },
  };
}
