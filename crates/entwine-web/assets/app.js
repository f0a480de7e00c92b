// The twins console: hash routing between the fleet (#/) and a twin (#/twins/<id>).

import { unfollow } from "./api.js";
import { fleetPage } from "./fleet.js";
import { twinPage } from "./twin.js";

const main = document.getElementById("main");
let current = null;

function route() {
  const hash = location.hash || "#/";
  const twin = hash.match(/^#\/twins\/([^?]+)/);
  if (current) current.leave();
  unfollow();
  delete document.body.dataset.ready;
  main.replaceChildren();
  window.scrollTo(0, 0);
  if (twin) {
    let id;
    try {
      id = decodeURIComponent(twin[1]);
    } catch {
      id = twin[1];
    }
    current = twinPage(main, id);
  } else {
    const query = new URLSearchParams(hash.split("?")[1] ?? "");
    current = fleetPage(main, query);
  }
  document.getElementById("nav-fleet").toggleAttribute("aria-current", !twin);
}

window.addEventListener("hashchange", route);
route();
