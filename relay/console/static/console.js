// relay console: times in the viewer's zone, the overview refreshed in place, select all.
// Plain script, no build step; the pages work without it (times then read in UTC).
"use strict";

function localise(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const at = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(at.getTime())) continue;
    el.textContent = at.toLocaleString(undefined, {
      month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
    el.title = at.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
}

function refreshed(root) {
  const table = root.querySelector("[data-read-at]");
  const label = document.getElementById("refreshed");
  if (!table || !label) return;
  const at = new Date(table.dataset.readAt);
  label.textContent = "read " + at.toLocaleTimeString();
  label.title = at.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function poll(box) {
  const seconds = Number(box.dataset.seconds) || 5;
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const answer = await fetch(box.dataset.refresh, { credentials: "same-origin" });
      if (answer.status === 401) {
        document.getElementById("refreshed").textContent = "logged out: reload to log in";
        return;
      }
      box.innerHTML = await answer.text();  // server-rendered, every value escaped there
      localise(box);
      refreshed(box);
    } catch (err) {
      document.getElementById("refreshed").textContent = "not refreshed: " + err;
    } finally {
      busy = false;
    }
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  localise(document);
  const box = document.querySelector("[data-refresh]");
  if (box) {
    refreshed(box);
    poll(box);
  }
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      for (const box of document.querySelectorAll("input[name=id]")) box.checked = all.checked;
    });
  }
});
