// The API client: JSON fetches with the bearer token, and the one live stream.

const TOKEN_KEY = "entwine.token";

/** An answer of the API other than 2xx, with its `{"error"}` message. */
export class ApiError extends Error {
  constructor(status, message, path) {
    super(`${path}: ${status} ${message}`);
    this.status = status;
  }
}

export function token() {
  try {
    return localStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

let asking = null;

/** Shows the token form; resolves once a token is entered (one form for every caller). */
function askToken(message) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  document.getElementById("token-message").textContent = message;
  asking = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      try {
        localStorage.setItem(TOKEN_KEY, value);
      } catch {
        /* private mode: the token lives as long as the page */
        memoryToken = value;
      }
      form.removeEventListener("submit", submit);
      dialog.close();
      asking = null;
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.showModal();
    input.focus();
  });
  return asking;
}

let memoryToken = null;
const currentToken = () => token() ?? memoryToken;

/**
 * GET `path` as JSON. A 401 asks for a token and tries again; `allow404` answers null for a
 * 404; any other failure throws an ApiError naming the path and the server's message.
 */
export async function getJSON(path, { allow404 = false, signal } = {}) {
  for (;;) {
    const headers = { Accept: "application/json" };
    const t = currentToken();
    if (t) headers.Authorization = `Bearer ${t}`;
    const response = await fetch(path, { headers, signal });
    if (response.status === 401) {
      await askToken(t ? "That token was refused: enter another." : "This platform asks for an API token.");
      continue;
    }
    if (response.status === 404 && allow404) return null;
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, body?.error ?? response.statusText, path);
    return body;
  }
}

/** `path?query` from an object, leaving out empty values. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") query.set(k, String(v));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

// The live stream: one EventSource at a time, reopened when the page changes what it follows.
let source = null;
let wanted = null;
let retry = null;
let retryDelay = 1000;

function setStatus(state, text) {
  const el = document.getElementById("stream-status");
  if (!el) return;
  el.dataset.state = state;
  el.textContent = text;
}

/**
 * Follows `/api/stream` with `params` (`device_id`, `events`), calling `handlers[event](data)`
 * for each event. EventSource reconnects by itself after a dropped connection; a refused one
 * (401, 400) is closed for good, so it is reopened here after the token form or a delay.
 */
export function follow(params, handlers) {
  wanted = { params, handlers };
  retryDelay = 1000;
  open();
}

export function unfollow() {
  wanted = null;
  clearTimeout(retry);
  if (source) source.close();
  source = null;
  setStatus("off", "not live");
}

function open() {
  clearTimeout(retry);
  if (source) source.close();
  if (!wanted) return;
  const { params, handlers } = wanted;
  const t = currentToken();
  const es = new EventSource(withQuery("/api/stream", { ...params, access_token: t ?? "" }));
  source = es;
  setStatus("connecting", "connecting…");
  es.onopen = () => {
    retryDelay = 1000;
    setStatus("live", "live");
  };
  es.onerror = () => {
    if (es !== source) return;
    if (es.readyState === EventSource.CONNECTING) {
      setStatus("reconnecting", "disconnected — reconnecting…");
      return;
    }
    setStatus("closed", "disconnected");
    // Refused: find out why through a fetch (a 401 shows the token form), then reopen.
    getJSON("/api/fleet")
      .catch(() => null)
      .finally(() => {
        retry = setTimeout(open, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 30000);
      });
  };
  for (const [event, handler] of Object.entries(handlers)) {
    es.addEventListener(event, (message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        console.warn("stream: not JSON", event, message.data);
        return;
      }
      handler(data);
    });
  }
}
