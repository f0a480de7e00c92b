// Formatting and small DOM helpers shared by the pages.

export const LIFECYCLES = ["unbound", "bound", "entangled", "disentangled"];

/** An element: `el("td", {class: "num", dataset: {x: 1}}, "text", child)`. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A figure in 0..1 with three decimals, "–" when unset. */
export function figure(value) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(3) : "–";
}

/** How long ago `ms` was, compactly ("4 s", "3 min", "2 h", "5 d"). */
export function age(ms, now = Date.now()) {
  if (typeof ms !== "number") return "never";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

/** A timestamp (ms) as local date and time. */
export function when(ms) {
  if (typeof ms !== "number") return "–";
  return new Date(ms).toLocaleString(undefined, { hour12: false });
}

export function number(n) {
  return typeof n === "number" ? n.toLocaleString() : "–";
}

/** A lifecycle badge. */
export function badge(lifecycle) {
  return el("span", { class: `badge lc-${lifecycle}`, dataset: { lifecycle } }, lifecycle ?? "–");
}

/** Text of `node`, set only when it changed (no layout work for an unchanged cell). */
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** `fn` at most once per `ms`, trailing (the last call's effect always happens). */
export function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}

/** Calls `fn` once in the next animation frame, however often it is scheduled before. */
export function perFrame(fn) {
  let queued = false;
  return () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn();
    });
  };
}

/** An error shown in place of a panel. */
export function failure(error) {
  return el("p", { class: "error", role: "alert" }, String(error.message ?? error));
}
