// pdserve dashboard: polls /dashboard/api/state every 2 s (admin token), draws the charts and pool tables,
// and resizes pools through PUT /admin/pools/{pool}. No dependencies, no build step.
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const sortState = {};  // pool -> {key, asc}
let token = new URLSearchParams(location.hash.slice(1)).get("token") || localStorage.getItem("pdserve-admin-token") || "";
if (token) localStorage.setItem("pdserve-admin-token", token);
$("#token").value = token;
$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("#token").value.trim();
  localStorage.setItem("pdserve-admin-token", token);
  refresh();
});

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: {"authorization": `Bearer ${token}`, "content-type": "application/json"},
                               body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `${r.status}`);
  return data;
}

const num = (v) => Math.abs(v) >= 100 ? String(Math.round(v)) : Number(v.toPrecision(3)).toString();

// One chart: each line's samples over the window (null: none in that bucket), joined where they are adjacent; a
// sample with no neighbour is a dot, so that a light load still shows. The canvas's aria-label says in words
// what it shows (each line's latest and highest value, or that there is no data yet).
function drawChart(canvas, t, lines, unit) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d"); g.scale(dpr, dpr); g.clearRect(0, 0, w, h);
  const values = lines.flatMap((l) => l.data.filter((v) => v !== null));
  const left = 40, bottom = h - 16;
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#6b7280"; g.font = "10px system-ui";
  if (!values.length) {
    g.beginPath(); g.moveTo(left, bottom); g.lineTo(w, bottom); g.stroke();
    g.fillText("no data yet", left + 8, bottom / 2);
    canvas.setAttribute("aria-label", "no data yet");
    return;
  }
  const top = Math.max(...values), max = (top > 0 ? top : 1) * 1.15;
  for (const f of [0, 0.5, 1]) {
    const y = bottom - f * (bottom - 6);
    g.beginPath(); g.moveTo(left, y); g.lineTo(w, y); g.stroke();
    g.fillText(num(max * f), 2, y + 3);
  }
  if (t.length) g.fillText(`${Math.round((t[t.length - 1] - t[0]) / 60)} min`, left, h - 2);
  const said = [];
  for (const line of lines) {
    const d = line.data, at = (i) => [left + (i / Math.max(1, d.length - 1)) * (w - left), bottom - (d[i] / max) * (bottom - 6)];
    g.strokeStyle = g.fillStyle = line.color; g.lineWidth = 1.5; g.beginPath();
    d.forEach((v, i) => {
      if (v === null) return;
      const [x, y] = at(i);
      if (i > 0 && d[i - 1] !== null) g.lineTo(x, y); else g.moveTo(x, y);
      if ((i === 0 || d[i - 1] === null) && (i === d.length - 1 || d[i + 1] === null)) g.fillRect(x - 2, y - 2, 4, 4);
    });
    g.stroke();
    const seen = d.filter((v) => v !== null);
    if (seen.length) said.push(`${line.label}: latest ${num(seen[seen.length - 1])}, highest ${num(Math.max(...seen))}`);
  }
  canvas.setAttribute("aria-label", `${said.join("; ")} (${unit})`);
}

const fmt = {
  healthy: (w) => w.draining ? ["draining", "draining"] : w.healthy ? ["healthy", "ok"] : ["down", "bad"],
  kv_used: (w) => w.kv_total ? `<span class="bar"><span style="width:${(100 * w.kv_used / w.kv_total).toFixed(0)}%"></span></span>${w.kv_used}/${w.kv_total}` : "–",
  hit_ratio: (w) => w.hit_ratio === null ? "–" : `${(100 * w.hit_ratio).toFixed(0)}%`,
  // the host tier: blocks held of its size, and the share of prompt tokens it served
  kv_host: (w) => !w.kv_host_total ? "–" : `${w.kv_host_used}/${w.kv_host_total}` +
    (w.host_hit_ratio === null ? "" : ` <span class="muted">(${(100 * w.host_hit_ratio).toFixed(0)}% hits)</span>`),
};

function renderPool(p, advice) {
  let el = document.getElementById(`pool-${p.pool}`);
  if (!el) {
    el = $("#pool-template").content.firstElementChild.cloneNode(true);
    el.id = `pool-${p.pool}`;
    $(".pool-name", el).textContent = `${p.pool} pool`;
    $(".scale-up", el).addEventListener("click", () => scale(p.pool, +1));
    $(".scale-down", el).addEventListener("click", () => scale(p.pool, -1));
    el.querySelectorAll("th[data-key]").forEach((th) => th.addEventListener("click", () => {
      const s = sortState[p.pool] || {key: "name", asc: true};
      sortState[p.pool] = {key: th.dataset.key, asc: s.key === th.dataset.key ? !s.asc : true};
      refresh();
    }));
    $("#pools").appendChild(el);
  }
  el.dataset.replicas = p.replicas;
  $(".pool-count", el).textContent = `${p.healthy} healthy of ${p.replicas} wanted`;
  $(".scale", el).hidden = !p.scalable;
  const a = advice && advice[p.pool];
  $(".advice", el).textContent = a ? `advice: ${a.recommended} worker${a.recommended === 1 ? "" : "s"} — ${a.reasons.join("; ")}` : "";
  const s = sortState[p.pool] || {key: "name", asc: true};
  el.querySelectorAll("th[data-key]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === s.key); th.classList.toggle("asc", th.dataset.key === s.key && s.asc);
  });
  const rows = [...p.workers].sort((x, y) => {
    const a = x[s.key] ?? "", b = y[s.key] ?? "";
    return (a < b ? -1 : a > b ? 1 : 0) * (s.asc ? 1 : -1);
  });
  const tbody = $("tbody", el);
  tbody.innerHTML = "";
  for (const w of rows) {
    const tr = document.createElement("tr");
    tr.className = "worker-row";
    tr.dataset.url = w.url;
    const [health, cls] = fmt.healthy(w);
    const cells = [w.name || "(registering)", w.model || "–", health, w.running ?? "–", w.waiting ?? "–", fmt.kv_used(w),
                   fmt.kv_host(w), fmt.hit_ratio(w), w.tokens_per_s, w.kv_gb_per_s, w.url];
    cells.forEach((c, i) => {
      const td = document.createElement("td");
      td.innerHTML = String(c);
      if (i === 2) {
        td.className = cls;
        td.dataset.health = health;
        if (w.restarts) td.innerHTML += ` <span class="restarts">(restarted ${w.restarts}×)</span>`;
      }
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  }
}

// The SLA planner: its mode, targets and profile, and its recent decisions (newest first) with their reasons.
function renderPlanner(p) {
  const el = $("#planner");
  el.hidden = !p;
  if (!p) return;
  $(".planner-mode", el).textContent = `(${p.mode}${p.leading ? ", leading" : ", another router leads"})`;
  const prof = p.profile;
  $(".planner-summary", el).textContent = `targets: TTFT ${p.targets.ttft_s} s, ITL ${Math.round(p.targets.itl_s * 1000)} ms; ` +
    `every ${p.interval_s} s; profile: ${prof.model || "?"} on ${prof.worker || "?"} (prefill ` +
    prof.prefill.map(([n, r]) => `${n} tok: ${Math.round(r)} tok/s`).join(", ") + "; decode " +
    prof.decode.map(([b, c, s]) => `batch ${b}` + (c ? ` at ${c} tokens` : "") + `: ${num(s * 1000)} ms`).join(", ") + ")";
  const tbody = $("tbody", el);
  tbody.innerHTML = "";
  for (const d of [...p.decisions].reverse()) {
    const tr = document.createElement("tr");
    const moved = (pool) => d.before[pool] === d.replicas[pool] ? `${d.replicas[pool]}` : `${d.before[pool]} → ${d.replicas[pool]}`;
    const cells = [new Date(d.time * 1000).toLocaleTimeString() + (d.acted ? "" : " (not acted on)"), moved("prefill"),
                   moved("decode"), `prefill: ${d.reasons.prefill}. decode: ${d.reasons.decode}.`];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    tbody.appendChild(tr);
  }
}

async function scale(pool, delta) {
  const el = document.getElementById(`pool-${pool}`);
  const target = Math.max(0, Number(el.dataset.replicas) + delta);
  try {
    $("#status").textContent = `scaling the ${pool} pool to ${target}…`;
    await api("PUT", `/admin/pools/${pool}`, {replicas: target});
    refresh();
  } catch (e) { $("#status").textContent = `scaling failed: ${e.message}`; }
}

async function refresh() {
  if (!token) { $("#status").textContent = "enter the admin token to connect"; return; }
  try {
    const s = await api("GET", "/dashboard/api/state");
    const scaling = $("#status").textContent.startsWith("scaling the");
    const settled = ["prefill", "decode"].every((p) => s.pools[p].healthy === s.pools[p].replicas);
    if (!scaling || settled) $("#status").textContent = "";  // a resize message stays until the pools match
    $("#model").textContent = s.model ? `model: ${s.model}` : "";
    $("#updated").textContent = `updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
    const x = s.series;
    drawChart($("#chart-rps"), x.t, [{label: "requests", data: x.rps, color: "#2563eb"},
                                     {label: "errors", data: x.errors, color: "#b91c1c"}], "per s");
    drawChart($("#chart-ttft"), x.t, [{label: "p50", data: x.ttft_p50_ms, color: "#2563eb"},
                                      {label: "p99", data: x.ttft_p99_ms, color: "#f59e0b"}], "ms");
    drawChart($("#chart-itl"), x.t, [{label: "p50", data: x.itl_p50_ms, color: "#2563eb"},
                                     {label: "p99", data: x.itl_p99_ms, color: "#f59e0b"}], "ms");
    drawChart($("#chart-tokens"), x.t, [{label: "tokens", data: x.tokens_per_s, color: "#15803d"}], "per s");
    for (const p of ["prefill", "decode"]) renderPool(s.pools[p], s.advice);
    renderPlanner(s.planner);
    const tbody = $("#errors tbody");
    tbody.innerHTML = "";
    for (const e of s.errors.slice(0, 20)) {
      const tr = document.createElement("tr");
      for (const c of [new Date(e.time * 1000).toLocaleTimeString(), e.status, e.code || "", e.message]) {
        const td = document.createElement("td"); td.textContent = String(c); tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
  } catch (e) { $("#status").textContent = `cannot read the cluster state: ${e.message}`; }
}

refresh();
setInterval(refresh, 2000);
