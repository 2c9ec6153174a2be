// The accept-mqtt dashboard: folds the job's JSON topics (docs/monitoring.md) into a page.
// It only subscribes (mqttws.js cannot publish); every payload is untrusted: a message that
// does not parse or lacks a field is skipped, never fatal.
"use strict";

const RECENT_STEPS = 400;   // steps kept for the curves
const TIMELINE_STEPS = 24;  // step intervals shown in the stage timeline
const state = {devices: {}, jobs: {}, cfg: null, dirty: true};

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
                                                  '"': "&quot;", "'": "&#39;"}[c]));
}
function num(x) { return typeof x === "number" && isFinite(x); }
function fmt(x, digits) { return num(x) ? x.toFixed(digits) : "-"; }
function pct(x) { return num(x) ? Math.round(100 * x) + "%" : "-"; }
function ago(t) {
  if (!num(t)) return "-";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? Math.round(s) + "s ago" : Math.round(s / 60) + "min ago";
}

function job(id) {
  if (!state.jobs[id]) {
    state.jobs[id] = {id, plan: null, ended: false, steps: [], epochs: [], done: null,
                      events: [], last: 0};
  }
  return state.jobs[id];
}

// -- folding messages -------------------------------------------------------------------
function ingest(topic, text) {
  const root = state.cfg.root.split("/");
  const parts = topic.split("/");
  if (parts.slice(0, root.length).join("/") !== state.cfg.root) return;
  const tail = parts.slice(root.length);
  let body = null;
  if (text !== "") {
    try { body = JSON.parse(text); } catch (e) { return; }
    if (body === null || typeof body !== "object" || Array.isArray(body)) return;
  }
  if (tail.length === 3 && tail[0] === "devices") {
    const d = state.devices[tail[1]] || (state.devices[tail[1]] = {id: tail[1]});
    if (tail[2] === "status") d.status = body;
    else if (tail[2] === "profile") d.profile = body;
  } else if (tail.length === 3 && tail[0] === "jobs") {
    if (state.cfg.job && tail[1] !== state.cfg.job) return;
    const j = job(tail[1]);
    if (tail[2] === "plan") {
      if (body === null) { j.ended = true; } else { j.plan = body; j.ended = false; }
    } else if (tail[2] === "metrics" && body) {
      metric(j, body);
    } else {
      return;
    }
    j.last = Date.now();
  } else {
    return;
  }
  state.dirty = true;
}

function metric(j, m) {
  if (m.type === "step" && num(m.step)) {
    j.steps.push(m);
    if (j.steps.length > RECENT_STEPS) j.steps.shift();
  } else if (m.type === "epoch") {
    j.epochs.push(m);
  } else if (m.type === "done") {
    j.done = m;
  } else if (typeof m.type === "string" && m.type !== "status") {
    // errors, drift, checkpoints, re-plans, extensions: one line each, newest first
    const rest = Object.entries(m)
      .filter(([k, v]) => !["type", "job", "time", "step", "path"].includes(k) && v !== null &&
              typeof v !== "object")
      .map(([k, v]) => `${k} ${v}`).join(", ").slice(0, 200);
    const what = m.type === "error"
      ? `error: ${m.device || "?"} on ${m.topic || "?"}: ${m.reason || ""}`
      : m.type + (num(m.step) ? ` at step ${m.step}` : "") + (rest ? ": " + rest : "");
    j.events.push({what, error: m.type === "error"});
    if (j.events.length > 8) j.events.shift();
  }
}

// -- stage loads: the monitor's arithmetic (accept_mqtt/cli/monitor.py, stage_loads) ------
function loads(prev, cur) {
  const dt = (cur.time || 0) - (prev.time || 0);
  const out = {};
  if (!(dt > 0) || !Array.isArray(cur.stages) || !Array.isArray(prev.stages)) return out;
  for (const c of cur.stages) {
    const p = prev.stages.find((s) => s.stage === c.stage);
    if (!p || p.device !== c.device) continue;
    const dBusy = c.busy_ms - p.busy_ms, dSend = c.send_ms - p.send_ms;
    if (!(dBusy >= 0 && dSend >= 0)) continue;  // its agent re-joined: counters restarted
    const busy = Math.min(1, dBusy / (dt * 1e3)), send = Math.min(1, dSend / (dt * 1e3));
    out[c.stage] = {busy, send, idle: Math.max(0, 1 - busy - send), dt};
  }
  return out;
}

// -- drawing ----------------------------------------------------------------------------
function chart(series, opts) {
  const W = 520, H = 170, L = 44, B = 20, T = 8, R = 8;
  const pts = series.flatMap((s) => s.points);
  if (pts.length === 0) return '<div class="dim">no data yet</div>';
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = opts.yrange || [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => L + (W - L - R) * (x - x0) / (x1 - x0);
  const Y = (y) => T + (H - T - B) * (1 - (y - y0) / (y1 - y0));
  let svg = `<svg viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="${esc(opts.label)}">`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#bbb"/>`;
  svg += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#bbb"/>`;
  svg += `<text x="${L - 4}" y="${T + 9}" text-anchor="end">${esc(y1.toFixed(opts.digits))}</text>`;
  svg += `<text x="${L - 4}" y="${H - B}" text-anchor="end">${esc(y0.toFixed(opts.digits))}</text>`;
  svg += `<text x="${L}" y="${H - 4}">step ${esc(x0)}</text>`;
  svg += `<text x="${W - R}" y="${H - 4}" text-anchor="end">step ${esc(x1)}</text>`;
  for (const s of series) {
    if (s.points.length === 0) continue;
    if (s.dots) {
      for (const [x, y] of s.points) svg += `<circle cx="${X(x)}" cy="${Y(y)}" r="3.5" fill="${s.color}"/>`;
    } else {
      const d = s.points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ");
      svg += `<polyline points="${d}" fill="none" stroke="${s.color}" stroke-width="1.8"/>`;
    }
  }
  return svg + "</svg>";
}

function timeline(j) {
  const steps = j.steps.slice(-(TIMELINE_STEPS + 1));
  const rows = {};
  const intervals = [];
  for (let i = 1; i < steps.length; i++) {
    const l = loads(steps[i - 1], steps[i]);
    if (Object.keys(l).length === 0) continue;
    intervals.push({step: steps[i].step, l, dt: Object.values(l)[0].dt});
    for (const c of steps[i].stages) rows[c.stage] = c.device;
  }
  if (intervals.length === 0) return '<span class="dim">needs two steps of the same plan</span>';
  const W = 1000, rowH = 22, L = 110, H = Object.keys(rows).length * (rowH + 6) + 18;
  const total = intervals.reduce((a, s) => a + s.dt, 0);
  let svg = `<svg viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="stage timeline">`;
  Object.keys(rows).map(Number).sort((a, b) => a - b).forEach((k, r) => {
    const y = r * (rowH + 6);
    svg += `<text x="0" y="${y + 15}">stage ${k} · ${esc(rows[k])}</text>`;
    let x = L;
    for (const s of intervals) {
      const w = (W - L) * s.dt / total;
      const f = s.l[k];
      if (f) {
        const parts = [["busy", f.busy], ["send", Math.min(f.send, 1 - f.busy)], ["idle", f.idle]];
        let xx = x;
        for (const [kind, frac] of parts) {
          const ww = w * frac;
          if (ww > 0) svg += `<rect x="${xx.toFixed(2)}" y="${y}" width="${ww.toFixed(2)}" height="${rowH}" fill="var(--${kind})"><title>step ${s.step} stage ${k}: ${kind} ${pct(frac)}</title></rect>`;
          xx += ww;
        }
      }
      svg += `<line x1="${(x + w).toFixed(2)}" y1="${y}" x2="${(x + w).toFixed(2)}" y2="${y + rowH}" stroke="#fff"/>`;
      x += w;
    }
  });
  const last = intervals[intervals.length - 1], first = intervals[0];
  svg += `<text x="${L}" y="${H - 2}">step ${first.step}</text>`;
  svg += `<text x="${W}" y="${H - 2}" text-anchor="end">step ${last.step} (${total.toFixed(1)} s shown)</text>`;
  return svg + "</svg>";
}

function currentJob() {
  const ids = Object.keys(state.jobs);
  if (state.cfg.job) return state.jobs[state.cfg.job] || null;
  if (ids.length === 0) return null;
  return ids.map((i) => state.jobs[i]).sort((a, b) => b.last - a.last)[0];
}

function render() {
  const devs = Object.values(state.devices).sort((a, b) => a.id.localeCompare(b.id));
  document.querySelector("#devices tbody").innerHTML = devs.map((d) => {
    const s = d.status || {}, p = d.profile || {};
    const js = s.job ? `${esc(s.job)}/${esc(s.stage ?? "-")}` : "-";
    const st = esc(s.state || "?") + (s.state === "offline" && s.reason ? ` (${esc(s.reason)})` : "");
    return `<tr data-device="${esc(d.id)}"><td>${esc(d.id)}</td>` +
      `<td class="state-${esc(s.state || "")}">${st}</td><td>${js}</td>` +
      `<td>${esc(p.cores ?? "-")}</td><td>${fmt(p.bench_gflops, 1)}</td>` +
      `<td>${fmt(p.slowdown, 2)}</td><td class="dim">${ago(s.time)}</td></tr>`;
  }).join("") || '<tr><td colspan="7" class="dim">no device has announced itself</td></tr>';

  const j = currentJob();
  if (!j) return;
  document.getElementById("job").textContent = j.id;
  document.getElementById("jobname").textContent = "job " + j.id;
  const last = j.steps[j.steps.length - 1];
  const ep = j.epochs[j.epochs.length - 1];
  let prog = "";
  if (last) {
    prog = `step <b id="step">${esc(last.step)}</b>/${esc(last.total_steps ?? "?")} · epoch ` +
      `${esc(num(last.epoch) ? last.epoch + 1 : "-")} · loss <b id="loss" data-value="${esc(last.loss)}">` +
      `${fmt(last.loss, 4)}</b> · train acc ${fmt(last.train_acc, 3)} · ` +
      `${fmt(last.samples_per_s, 0)} samples/s`;
  } else {
    prog = "waiting for the first step";
  }
  if (ep) prog += ` · held-out acc <b id="testacc">${fmt(ep.test_accuracy, 4)}</b>`;
  if (j.done) prog += ` · <b>done</b> (final accuracy ${fmt(j.done.final_accuracy, 4)})`;
  else if (j.ended) prog += " · ended";
  const progEl = document.getElementById("progress");
  progEl.innerHTML = prog;
  progEl.className = "";

  const p = j.plan;
  const lastLoads = j.steps.length > 1 ? loads(j.steps[j.steps.length - 2], last) : {};
  if (p && Array.isArray(p.stages)) {
    document.getElementById("plansum").textContent =
      `plan v${p.version ?? "?"} · ${p.model ?? "?"} · ${p.method ?? "?"} · ${p.schedule ?? "?"} · ` +
      `${p.micro_batches ?? "?"} micro-batches · predicted bottleneck ${fmt(p.predicted_bottleneck_ms, 2)} ms`;
    document.querySelector("#plan tbody").innerHTML = p.stages.map((s) => {
      const l = lastLoads[s.index] || {};
      return `<tr data-stage="${esc(s.index)}"><td>${esc(s.index)}</td><td>${esc(s.device)}</td>` +
        `<td>[${esc(s.start)}, ${esc(s.end)})</td><td>${esc(s.act_bits)}/${esc(s.grad_bits)}</td>` +
        `<td>${fmt(s.predicted_ms, 3)}</td><td>${pct(l.busy)}</td><td>${pct(l.send)}</td>` +
        `<td>${pct(l.idle)}</td></tr>`;
    }).join("");
  }

  const lossPts = j.steps.filter((s) => num(s.loss)).map((s) => [s.step, s.loss]);
  document.getElementById("losschart").innerHTML =
    chart([{points: lossPts, color: "var(--loss)"}], {label: "loss", digits: 3});
  const accPts = j.steps.filter((s) => num(s.train_acc)).map((s) => [s.step, s.train_acc]);
  const testPts = j.epochs.filter((e) => num(e.test_accuracy) && num(e.step))
    .map((e) => [e.step, e.test_accuracy]);
  document.getElementById("accchart").innerHTML = chart(
    [{points: accPts, color: "var(--acc)"}, {points: testPts, color: "#DD8452", dots: true}],
    {label: "accuracy", digits: 2, yrange: [0, 1]});
  document.getElementById("timeline").innerHTML = timeline(j);
  document.getElementById("errors").innerHTML = j.events.length
    ? j.events.slice().reverse().map((e) => `<li class="${e.error ? "err" : "dim"}">${esc(e.what)}</li>`).join("")
    : '<li class="dim">none</li>';
}

async function main() {
  const cfg = await (await fetch("config.json", {cache: "no-store"})).json();
  state.cfg = cfg;
  document.getElementById("broker").textContent = cfg.display_url;
  const r = cfg.root, j = cfg.job ? cfg.job : "+";
  // never {root}/# : that would also deliver every tensor frame
  const topics = [`${r}/devices/+/status`, `${r}/devices/+/profile`, `${r}/jobs/${j}/plan`,
                  `${r}/jobs/${j}/metrics`];
  const conn = document.getElementById("conn");
  const client = new MqttSubscriber(cfg.ws_url, {
    username: cfg.username, password: cfg.password, topics,
    onMessage: (topic, text) => ingest(topic, text),
    onState: (s, detail) => {
      conn.textContent = s === "connected" ? "connected" : `${s}: ${detail}`;
      conn.className = s;
    },
  });
  client.connect();
  setInterval(() => { if (state.dirty) { state.dirty = false; render(); } }, 250);
  setInterval(() => { state.dirty = true; }, 5000);  // keep "updated" ages moving
}

main().catch((e) => {
  const conn = document.getElementById("conn");
  conn.textContent = "error: " + e;
  conn.className = "error";
});
