// The fleet page: counts by lifecycle, the ODTE distribution, the twins (server-side filter,
// sort and paging), dead letters; live through the stream's lifecycle events.

import { follow, getJSON, withQuery } from "./api.js";
import {
  LIFECYCLES, age, badge, el, failure, figure, number, perFrame, setText, throttle,
} from "./format.js";

const PAGE = 100;
const COLUMNS = [
  // [sort key or null, header, class]
  ["device_id", "Device", ""],
  [null, "Model", ""],
  ["lifecycle", "Lifecycle", ""],
  ["since", "Since", "num"],
  ["odte", "ODTE", "num"],
  [null, "A", "num"],
  [null, "R", "num"],
  [null, "T", "num"],
  ["last_digital_timestamp", "Last update", "num"],
];
const SORTS = new Set(COLUMNS.map((c) => c[0]).filter(Boolean).concat(["evaluated_at"]));

export function fleetPage(main, query) {
  const state = {
    lifecycle: LIFECYCLES.includes(query.get("lifecycle")) ? query.get("lifecycle") : "",
    model: query.get("model") ?? "",
    q: query.get("q") ?? "",
    sort: SORTS.has(query.get("sort")) ? query.get("sort") : "device_id",
    order: query.get("order") === "desc" ? "desc" : "asc",
    offset: Math.max(0, Number.parseInt(query.get("offset") ?? "0", 10) || 0),
  };
  let page = { items: [], total: 0 };
  let fleet = null;
  let left = false;
  let firstRender = true;
  let request = null;
  const rows = new Map(); // device id -> {tr, cells}

  // --- the skeleton ---
  const counts = el("div", { class: "counts", role: "group", "aria-label": "Twins by lifecycle" });
  const histogram = el("div", { class: "histogram", role: "img", "aria-label": "ODTE distribution" });
  const deadLetters = el("section", { class: "panel dead-letters", "aria-labelledby": "dl-title" },
    el("h2", { id: "dl-title" }, "Dead letters"), el("p", {}, "…"));
  const search = el("input", {
    id: "fleet-q", type: "search", placeholder: "device id contains…", value: state.q,
    autocomplete: "off", spellcheck: "false",
  });
  const lifecycleSelect = el("select", { id: "fleet-lifecycle" },
    el("option", { value: "" }, "any"), LIFECYCLES.map((l) => el("option", { value: l }, l)));
  lifecycleSelect.value = state.lifecycle;
  const modelSelect = el("select", { id: "fleet-model" }, el("option", { value: "" }, "any"));
  const tbody = el("tbody");
  const headRow = el("tr");
  const sortButtons = new Map();
  for (const [key, label, cls] of COLUMNS) {
    const th = el("th", { scope: "col", class: cls });
    if (key) {
      const button = el("button", { type: "button", class: "sort", onclick: () => sortBy(key) }, label);
      sortButtons.set(key, th);
      th.append(button);
    } else {
      th.textContent = label;
    }
    headRow.append(th);
  }
  const table = el("table", { class: "twins", id: "twins-table" },
    el("caption", { class: "visually-hidden" }, "Twins"), el("thead", {}, headRow), tbody);
  const pageInfo = el("span", { class: "page-info", "aria-live": "polite" });
  const prev = el("button", { type: "button", onclick: () => go(state.offset - PAGE) }, "← Previous");
  const next = el("button", { type: "button", onclick: () => go(state.offset + PAGE) }, "Next →");
  const tableError = el("div");

  main.append(
    el("section", { class: "summary", "aria-label": "Fleet summary" },
      el("div", { class: "panel" }, el("h2", {}, "Lifecycle"), counts),
      el("div", { class: "panel" }, el("h2", {}, "ODTE distribution"), histogram,
        el("div", { class: "axis" }, el("span", {}, "0"), el("span", {}, "0.5"), el("span", {}, "1"))),
      deadLetters),
    el("section", { class: "panel", "aria-labelledby": "twins-title" },
      el("div", { class: "toolbar" },
        el("h2", { id: "twins-title" }, "Twins"),
        el("label", { for: "fleet-q" }, "Filter"), search,
        el("label", { for: "fleet-lifecycle" }, "Lifecycle"), lifecycleSelect,
        el("label", { for: "fleet-model" }, "Model"), modelSelect),
      tableError,
      el("div", { class: "table-wrap" }, table),
      el("div", { class: "pager" }, prev, pageInfo, next)),
  );

  // --- controls ---
  let searchTimer = null;
  search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      state.q = search.value.trim();
      state.offset = 0;
      reload();
    }, 200);
  });
  lifecycleSelect.addEventListener("change", () => {
    state.lifecycle = lifecycleSelect.value;
    state.offset = 0;
    reload();
  });
  modelSelect.addEventListener("change", () => {
    state.model = modelSelect.value;
    state.offset = 0;
    reload();
  });
  function sortBy(key) {
    if (state.sort === key) state.order = state.order === "asc" ? "desc" : "asc";
    else {
      state.sort = key;
      state.order = key === "device_id" || key === "lifecycle" ? "asc" : "desc";
    }
    state.offset = 0;
    reload();
  }
  function go(offset) {
    state.offset = Math.max(0, offset);
    reload();
  }
  function reload() {
    history.replaceState(null, "", withQuery("#/", {
      lifecycle: state.lifecycle, model: state.model, q: state.q,
      sort: state.sort === "device_id" ? "" : state.sort,
      order: state.order === "asc" ? "" : state.order,
      offset: state.offset || "",
    }));
    loadPage();
  }

  // --- data ---
  async function loadPage() {
    if (request) request.abort();
    const controller = new AbortController();
    request = controller;
    try {
      const answer = await getJSON(withQuery("/api/twins", {
        lifecycle: state.lifecycle, model: state.model, q: state.q,
        sort: state.sort, order: state.order, offset: state.offset, limit: PAGE,
      }), { signal: controller.signal });
      if (left || controller !== request) return;
      page = answer;
      tableError.replaceChildren();
      scheduleTable();
    } catch (e) {
      if (e.name === "AbortError" || left) return;
      tableError.replaceChildren(failure(e));
      throw e;
    }
  }
  async function loadFleet() {
    const answer = await getJSON("/api/fleet");
    if (left) return;
    fleet = answer;
    renderSummary();
  }
  async function loadDeadLetters() {
    const answer = await getJSON("/api/deadletters?limit=5");
    if (left) return;
    renderDeadLetters(answer);
  }

  // --- rendering ---
  function renderSummary() {
    const buttons = [["", "all", fleet.twins]].concat(LIFECYCLES.map((l) => [l, l, fleet.lifecycle[l] ?? 0]));
    counts.replaceChildren(...buttons.map(([value, label, n]) => el("button", {
      type: "button", class: `count lc-${label}`, "aria-pressed": String(state.lifecycle === value),
      dataset: { lifecycle: label, count: n },
      onclick: () => {
        state.lifecycle = state.lifecycle === value ? "" : value;
        lifecycleSelect.value = state.lifecycle;
        state.offset = 0;
        renderSummary();
        reload();
      },
    }, el("strong", {}, number(n)), el("span", {}, label))));
    const bucketCounts = fleet.odte?.counts ?? [];
    const max = Math.max(1, ...bucketCounts);
    const width = fleet.odte?.bucket_width ?? 0.1;
    histogram.dataset.counts = bucketCounts.join(",");
    histogram.replaceChildren(...bucketCounts.map((n, i) => {
      const range = `${(i * width).toFixed(1)}–${((i + 1) * width).toFixed(1)}`;
      return el("div", { class: "bar", title: `ODTE ${range}: ${n} twins` },
        el("span", { style: `height:${(100 * n) / max}%` }),
        el("span", { class: "visually-hidden" }, `ODTE ${range}: ${n} twins`));
    }));
    const models = Object.keys(fleet.models ?? {}).sort();
    const chosen = state.model;
    modelSelect.replaceChildren(el("option", { value: "" }, "any"),
      ...models.map((m) => el("option", { value: m }, `${m} (${number(fleet.models[m])})`)));
    if (chosen && !models.includes(chosen)) modelSelect.append(el("option", { value: chosen }, chosen));
    modelSelect.value = chosen;
    if (fleet.dead_letters) {
      deadLetters.dataset.messages = fleet.dead_letters.messages;
    }
  }

  function renderDeadLetters(answer) {
    const items = answer.items ?? [];
    const messages = fleet?.dead_letters?.messages ?? answer.total ?? items.length;
    const deliveries = fleet?.dead_letters?.deliveries ?? answer.deliveries;
    const list = el("details", {},
      el("summary", {}, items.length ? `Latest ${items.length}` : "None stored"),
      el("ul", {}, items.map((d) => el("li", {},
        el("code", {}, d.topic), " ", el("span", { class: "muted" }, `${d.stage} · ${when_(d.last_at)} · ×${d.deliveries}`),
        el("div", { class: "error-text" }, d.error)))));
    deadLetters.replaceChildren(el("h2", { id: "dl-title" }, "Dead letters"),
      el("p", { class: "big" }, el("strong", {}, number(messages)), " messages",
        deliveries !== undefined ? el("span", { class: "muted" }, ` · ${number(deliveries)} deliveries`) : null),
      list);
  }
  const when_ = (ms) => (typeof ms === "number" ? `${age(ms)} ago` : "–");

  const scheduleTable = perFrame(renderTable);
  function renderTable() {
    if (left) return;
    const now = Date.now();
    const seen = new Set();
    const ordered = [];
    for (const twin of page.items) {
      seen.add(twin.device_id);
      let row = rows.get(twin.device_id);
      if (!row) {
        row = makeRow(twin.device_id);
        rows.set(twin.device_id, row);
      }
      fillRow(row, twin, now);
      ordered.push(row.tr);
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    // Reorder only where needed: a row already in place is not moved.
    ordered.forEach((tr, i) => {
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] ?? null);
    });
    if (!page.items.length) {
      tbody.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: COLUMNS.length }, "No twin matches.")));
    } else {
      tbody.querySelector("tr.empty")?.remove();
    }
    const total = page.total ?? page.items.length;
    const first = page.items.length ? state.offset + 1 : 0;
    pageInfo.textContent = `${number(first)}–${number(state.offset + page.items.length)} of ${number(total)}`;
    table.dataset.total = total;
    table.dataset.rows = page.items.length;
    prev.disabled = state.offset === 0;
    next.disabled = !page.next;
    for (const [key, th] of sortButtons) {
      th.setAttribute("aria-sort", key === state.sort ? (state.order === "asc" ? "ascending" : "descending") : "none");
    }
    if (firstRender && fleet) {
      firstRender = false;
      document.body.dataset.ready = "fleet";
      performance.mark("entwine-ready");
    }
  }

  function makeRow(id) {
    const link = el("a", { href: `#/twins/${encodeURIComponent(id)}` }, id);
    const cells = {
      model: el("td"), lifecycle: el("td"), since: el("td", { class: "num" }), odte: el("td", { class: "num odte" }),
      a: el("td", { class: "num" }), r: el("td", { class: "num" }), t: el("td", { class: "num" }),
      last: el("td", { class: "num" }),
    };
    const tr = el("tr", { dataset: { deviceId: id } }, el("th", { scope: "row" }, link),
      cells.model, cells.lifecycle, cells.since, cells.odte, cells.a, cells.r, cells.t, cells.last);
    return { tr, cells, twin: null };
  }

  function fillRow(row, twin, now) {
    const { tr, cells } = row;
    if (row.twin?.lifecycle !== twin.lifecycle) {
      if (row.twin) {
        tr.classList.remove("changed");
        void tr.offsetWidth; // restart the highlight
        tr.classList.add("changed");
      }
      tr.dataset.lifecycle = twin.lifecycle;
      cells.lifecycle.replaceChildren(badge(twin.lifecycle));
    }
    row.twin = twin;
    setText(cells.model, twin.model ?? "seed");
    setText(cells.since, age(twin.since, now));
    cells.since.title = new Date(twin.since).toISOString();
    setText(cells.odte, figure(twin.odte));
    cells.odte.style.setProperty("--v", String(twin.odte ?? 0));
    setText(cells.a, figure(twin.availability));
    setText(cells.r, figure(twin.reliability));
    setText(cells.t, figure(twin.timeliness));
    setText(cells.last, age(twin.last_digital_timestamp, now));
  }

  // --- live ---
  const refresh = throttle(() => {
    if (left) return;
    loadPage().catch(() => {});
    loadFleet().catch(() => {});
    loadDeadLetters().catch(() => {});
  }, 1000);
  follow({ events: "lifecycle" }, {
    lifecycle(change) {
      const row = rows.get(change.device_id);
      if (row?.twin) {
        const twin = { ...row.twin, lifecycle: change.to, since: change.at, odte: change.odte,
          availability: change.availability, reliability: change.reliability, timeliness: change.timeliness };
        page.items = page.items.map((t) => (t.device_id === change.device_id ? twin : t));
        scheduleTable();
      }
      refresh();
    },
  });
  // Ages are computed locally; refreshed every few seconds without asking the server.
  const ticker = setInterval(scheduleTable, 5000);

  Promise.all([loadFleet(), loadPage(), loadDeadLetters()])
    .then(scheduleTable)
    .catch((e) => {
      console.error(e);
      if (!left) main.prepend(failure(e));
    });

  return {
    leave() {
      left = true;
      clearInterval(ticker);
      if (request) request.abort();
    },
  };
}
