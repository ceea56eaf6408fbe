// The status page: polls /status.json every second and redraws the tables.
// Every value goes in through textContent, never as markup.
"use strict";

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function fill(id, items, columns) {
  const body = document.querySelector("#" + id + " tbody");
  const rows = items.map((it) => {
    const tr = document.createElement("tr");
    for (const [value, cls] of columns(it)) cell(tr, value, cls);
    return tr;
  });
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    cell(tr, "none", "none");
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function duration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}

function size(b) {
  if (!b) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + units[i];
}

function time(ms) {
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}

function job(j) {
  return [[j.id], [j.pool], [j.state, "state " + j.state], [j.attempts],
          [time(j.created_ms)], [j.error, "error"]];
}

function draw(s) {
  fill("pools", s.pools, (p) => [
    [p.name], [p.state, "state " + p.state],
    [p.workers.filter((w) => w.state === "ready" || w.state === "busy").length + "/" + p.workers_wanted],
    [p.queued], [p.running], [p.succeeded], [p.failed], [p.last_error, "error"],
  ]);
  const workers = s.pools.flatMap((p) => p.workers.map((w) => [p.name, w]));
  fill("workers", workers, ([pool, w]) => [
    [pool], [w.id], [w.pid], [w.state, "state " + w.state],
    [w.pid ? duration(w.uptime_ms) : "-"], [w.restarts], [w.jobs], [size(w.rss_bytes)],
  ]);
  fill("recent", s.recent, job);
  fill("failed", s.failed, job);
}

async function refresh() {
  const status = document.getElementById("updated");
  try {
    const r = await fetch("/status.json", { cache: "no-store" });
    if (!r.ok) throw new Error((await r.text()).trim() || r.statusText);
    draw(await r.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (e) {
    status.textContent = "cannot reach jobvisord: " + e.message;
    status.className = "down";
  }
}

refresh();
setInterval(refresh, 1000);
