/* tuneserve dashboard: a dependency-free single-page app (hash routes, no build step).
 *
 * Every API call carries `Authorization: Bearer <key>`; the key is asked once and kept in
 * localStorage. All server text goes into the page through textContent / attributes, never
 * innerHTML, because job names, events and model output are user-controlled.
 */
(function () {
  "use strict";

  const KEY_STORAGE = "tuneserve.apiKey";
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const JOBS_REFRESH_MS = 3000;
  const JOB_REFRESH_MS = 2000;
  const EVENTS_PAGE = 100;
  const MAX_EVENT_PAGES = 200; // 20k events: enough for any curve, bounded for the browser
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------------------------------
  // DOM helpers
  // ---------------------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function $(sel, root) { return (root || document).querySelector(sel); }

  function flash(message, kind) {
    const el = $("#flash");
    if (!message) { el.hidden = true; el.textContent = ""; return; }
    el.hidden = false;
    el.className = "flash " + (kind || "error");
    el.textContent = message;
  }

  // ---------------------------------------------------------------------------------------
  // Formatting
  // ---------------------------------------------------------------------------------------
  function toDate(value) {
    if (value === null || value === undefined || value === "") return null;
    // The API speaks unix seconds (OpenAI style); tolerate ISO strings too.
    const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    return isNaN(d.getTime()) ? null : d;
  }

  function fmtTime(value) {
    const d = toDate(value);
    if (!d) return "—";
    const pad = (n) => String(n).padStart(2, "0");
    // Local time, ISO-like: compact and unambiguous.
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    seconds = Math.max(0, Math.round(seconds));
    const hh = Math.floor(seconds / 3600), mm = Math.floor((seconds % 3600) / 60), ss = seconds % 60;
    if (hh) return `${hh}h ${mm}m`;
    if (mm) return `${mm}m ${ss}s`;
    return `${ss}s`;
  }

  function fmtNum(value, digits) {
    if (value === null || value === undefined || value === "") return "—";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString();
    const d = digits === undefined ? 4 : digits;
    return Math.abs(value) >= 1000 ? value.toFixed(0) : Number(value.toPrecision(d)).toString();
  }

  function fmtValue(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value === "number") return fmtNum(value);
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function badge(status) {
    return h("span", { class: "badge status-" + String(status || "unknown").replace(/[^a-z_]/g, ""),
                       "data-status": status, text: status || "unknown" });
  }

  // ---------------------------------------------------------------------------------------
  // API
  // ---------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      const err = body && body.error ? body.error : null;
      super(err && err.message ? err.message : `HTTP ${status}`);
      this.status = status;
      this.code = err ? err.code : null;
      this.param = err ? err.param : null;
    }
  }

  function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) headers["Authorization"] = "Bearer " + key;
    return headers;
  }

  async function readError(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    const err = new ApiError(resp.status, body);
    if (resp.status === 401) {
      showAuth(apiKey() ? "That key was refused (401). Enter a valid API key."
                        : "This service needs an API key: the one `make run` printed (also in .tuneserve/api_key).");
    }
    return err;
  }

  async function api(path, options) {
    const opts = Object.assign({ method: "GET" }, options || {});
    const init = { method: opts.method, headers: authHeaders(opts.body !== undefined ? { "Content-Type": "application/json" } : {}),
                   signal: opts.signal };
    if (opts.body !== undefined) init.body = JSON.stringify(opts.body);
    const resp = await fetch(path, init);
    if (!resp.ok) throw await readError(resp);
    if (resp.status === 204) return null;
    return resp.json();
  }

  function listOf(payload) {
    if (Array.isArray(payload)) return payload;
    if (payload && Array.isArray(payload.data)) return payload.data;
    return [];
  }

  // ---------------------------------------------------------------------------------------
  // Auth panel
  // ---------------------------------------------------------------------------------------
  function showAuth(message) {
    const panel = $("#auth");
    panel.hidden = false;
    $("#auth-message").textContent = message || "The key `make run` printed. It stays in this browser only.";
    $("#api-key").value = "";
    $("#api-key").focus();
  }

  function updateAuthLabel() {
    const key = apiKey();
    $("#auth-label").textContent = key ? "key " + key.slice(0, 6) + "…" : "no API key";
  }

  function setupAuth() {
    $("#auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("#api-key").value.trim();
      if (!value) return;
      localStorage.setItem(KEY_STORAGE, value);
      $("#auth").hidden = true;
      updateAuthLabel();
      flash(null);
      route();
    });
    $("#auth-cancel").addEventListener("click", () => { $("#auth").hidden = true; });
    $("#auth-change").addEventListener("click", () => showAuth());
    updateAuthLabel();
    if (!apiKey()) showAuth();
  }

  // ---------------------------------------------------------------------------------------
  // Router: each view returns a dispose() that stops its timers and streams.
  // ---------------------------------------------------------------------------------------
  let disposeView = null;

  function route() {
    if (disposeView) { try { disposeView(); } catch (_) { /* ignore */ } disposeView = null; }
    flash(null);
    const hash = location.hash.replace(/^#\/?/, "");
    const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
    const root = $("#view");
    root.replaceChildren();
    let name = parts[0] || "jobs";
    for (const a of document.querySelectorAll("[data-nav]")) {
      a.classList.toggle("active", a.dataset.nav === name);
    }
    if (!apiKey()) {  // first visit: ask, rather than let every request answer 401
      root.append(h("p", { class: "empty", id: "needs-key",
                           text: "Enter your API key above to continue (`make run` printed it; it is also in .tuneserve/api_key)." }));
      showAuth();
      return;
    }
    if (name === "jobs" && parts[1]) disposeView = jobView(root, parts[1]);
    else if (name === "jobs") disposeView = jobsView(root);
    else if (name === "adapters") disposeView = adaptersView(root);
    else if (name === "new") disposeView = newJobView(root);
    else if (name === "webhooks") disposeView = webhooksView(root);
    else if (name === "keys") disposeView = keysView(root);
    else if (name === "chat") disposeView = chatView(root, parts[1] || null);
    else { root.append(h("p", { text: "Unknown page." })); }
  }

  /** Poll `fn` every `ms` while the tab is visible; returns stop(). */
  function poller(fn, ms) {
    let timer = null, stopped = false, running = false;
    async function tick() {
      if (stopped) return;
      if (!document.hidden && !running) {
        running = true;
        try { await fn(); } catch (e) { /* fn reports its own errors */ }
        running = false;
      }
      if (!stopped) timer = setTimeout(tick, ms);
    }
    timer = setTimeout(tick, ms);
    return () => { stopped = true; clearTimeout(timer); };
  }

  // ---------------------------------------------------------------------------------------
  // Jobs list
  // ---------------------------------------------------------------------------------------
  function progressCell(job) {
    const p = job.progress || {};
    if (!p.total_steps) return p.step ? `step ${p.step}` : "—";
    const pct = Math.min(100, Math.round((100 * (p.step || 0)) / p.total_steps));
    return h("div", { class: "mini-progress", title: `${p.step || 0}/${p.total_steps}` },
      h("div", { class: "bar", style: `width:${pct}%` }),
      h("span", { text: `${p.step || 0}/${p.total_steps}` }));
  }

  function jobsView(root) {
    let jobs = [];     // newest first
    let hasMore = false;
    let stopped = false;
    const tbody = h("tbody", { id: "jobs-body" });
    const more = h("button", { type: "button", id: "jobs-more", hidden: true, text: "Load more",
                               onclick: () => loadMore() });
    const stamp = h("span", { class: "muted", id: "jobs-updated" });
    root.append(
      h("div", { class: "page-head" }, h("h1", { text: "Fine-tuning jobs" }), stamp),
      h("table", { class: "grid", id: "jobs-table" },
        h("thead", {}, h("tr", {},
          ["Job", "Status", "Base model", "Fine-tuned model", "Progress", "Created", "Finished"]
            .map((t) => h("th", { text: t })))),
        tbody),
      h("p", { class: "empty muted", id: "jobs-empty", hidden: true,
               text: "No jobs yet. Create one with `tuneserve jobs create` or POST /v1/fine_tuning/jobs." }),
      more);

    function render() {
      tbody.replaceChildren(...jobs.map((job) => h("tr", { "data-job-id": job.id },
        h("td", { class: "nowrap" }, h("a", { href: "#/jobs/" + encodeURIComponent(job.id), text: job.id })),
        h("td", {}, badge(job.status)),
        h("td", { text: job.model || "—" }),
        h("td", {}, job.fine_tuned_model
          ? h("a", { href: "#/chat/" + encodeURIComponent(job.fine_tuned_model), text: job.fine_tuned_model,
                     title: "chat with this adapter" })
          : "—"),
        h("td", {}, progressCell(job)),
        h("td", { class: "nowrap", text: fmtTime(job.created_at) }),
        h("td", { class: "nowrap", text: fmtTime(job.finished_at) }))));
      $("#jobs-empty").hidden = jobs.length > 0;
      more.hidden = !hasMore;
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
    }

    async function refresh() {
      try {
        const page = await api(`/v1/fine_tuning/jobs?limit=20`);
        if (stopped) return;
        const fresh = listOf(page);
        const byId = new Map(fresh.map((j) => [j.id, j]));
        const older = jobs.filter((j) => !byId.has(j.id));
        // The first page is authoritative for the newest jobs; older pages keep what was loaded.
        const cutoff = fresh.length ? fresh[fresh.length - 1] : null;
        jobs = fresh.concat(cutoff ? older.filter((j) => (toDate(j.created_at) || 0) <= (toDate(cutoff.created_at) || 0)) : older);
        if (jobs.length === fresh.length) hasMore = !!page.has_more;
        render();
      } catch (e) {
        if (!stopped) flash("Could not load jobs: " + e.message);
      }
    }

    async function loadMore() {
      if (!jobs.length) return;
      try {
        const last = jobs[jobs.length - 1].id;
        const page = await api(`/v1/fine_tuning/jobs?limit=20&after=${encodeURIComponent(last)}`);
        jobs = jobs.concat(listOf(page).filter((j) => !jobs.some((k) => k.id === j.id)));
        hasMore = !!page.has_more;
        render();
      } catch (e) { flash("Could not load more jobs: " + e.message); }
    }

    refresh();
    const stop = poller(refresh, JOBS_REFRESH_MS);
    return () => { stopped = true; stop(); };
  }

  // ---------------------------------------------------------------------------------------
  // Loss curve (inline SVG, no library)
  // ---------------------------------------------------------------------------------------
  /** Metrics events -> {train: [[step, loss]], eval: [[step, eval_loss]]}, one point per step
   * (a resumed job may log a step twice; the latest wins), sorted by step. */
  function lossSeries(events) {
    const train = new Map(), evalPts = new Map();
    // events arrive oldest first here
    for (const ev of events) {
      if (ev.type !== "metrics" || !ev.data) continue;
      const step = Number(ev.data.step);
      if (!isFinite(step)) continue;
      if (typeof ev.data.loss === "number" && isFinite(ev.data.loss)) train.set(step, ev.data.loss);
      if (typeof ev.data.eval_loss === "number" && isFinite(ev.data.eval_loss)) evalPts.set(step, ev.data.eval_loss);
    }
    const sorted = (m) => Array.from(m.entries()).sort((a, b) => a[0] - b[0]);
    return { train: sorted(train), eval: sorted(evalPts) };
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((v) => v >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function drawLossChart(container, series) {
    const W = 960, H = 320, M = { l: 56, r: 16, t: 14, b: 36 };
    const all = series.train.concat(series.eval);
    container.replaceChildren();
    if (!all.length) {
      container.append(h("p", { class: "muted", id: "loss-empty", text: "No metrics yet." }));
      return;
    }
    let xMin = Math.min(...all.map((p) => p[0])), xMax = Math.max(...all.map((p) => p[0]));
    let yMin = Math.min(...all.map((p) => p[1])), yMax = Math.max(...all.map((p) => p[1]));
    if (xMax === xMin) { xMin -= 1; xMax += 1; }
    if (yMax === yMin) { const d = Math.abs(yMin) * 0.1 || 1; yMin -= d; yMax += d; }
    const pad = (yMax - yMin) * 0.05; yMin -= pad; yMax += pad;
    const px = (x) => M.l + ((x - xMin) / (xMax - xMin)) * (W - M.l - M.r);
    const py = (y) => H - M.b - ((y - yMin) / (yMax - yMin)) * (H - M.t - M.b);
    const pts = (arr) => arr.map(([x, y]) => `${px(x).toFixed(2)},${py(y).toFixed(2)}`).join(" ");

    const svg = s("svg", { id: "loss-chart", viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img",
                           "aria-label": "training loss by step", preserveAspectRatio: "xMidYMid meet" });
    const grid = s("g", { class: "grid-lines" });
    for (const t of niceTicks(yMin, yMax, 8)) {
      grid.append(s("line", { x1: M.l, x2: W - M.r, y1: py(t), y2: py(t) }),
                  s("text", { x: M.l - 6, y: py(t) + 4, "text-anchor": "end", class: "tick", text: fmtNum(t, 3) }));
    }
    for (const t of niceTicks(xMin, xMax, 10).filter((v) => Number.isInteger(v))) {
      grid.append(s("line", { x1: px(t), x2: px(t), y1: M.t, y2: H - M.b, class: "vgrid" }),
                  s("text", { x: px(t), y: H - M.b + 16, "text-anchor": "middle", class: "tick", text: String(t) }));
    }
    svg.append(grid,
      s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }),
      s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }),
      s("text", { class: "axis-label", x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle", text: "step" }),
      s("text", { class: "axis-label", x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                  transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})`, text: "loss" }));

    if (series.train.length) {
      svg.append(s("polyline", { id: "loss-curve", class: "series train", points: pts(series.train),
                                 "data-steps": series.train.map((p) => p[0]).join(","),
                                 "data-count": series.train.length }));
    }
    if (series.eval.length) {
      svg.append(s("polyline", { id: "eval-loss-curve", class: "series eval", points: pts(series.eval),
                                 "data-steps": series.eval.map((p) => p[0]).join(","),
                                 "data-count": series.eval.length }));
      // eval points are sparse: mark each one
      for (const [x, y] of series.eval) {
        svg.append(s("circle", { class: "eval-dot", cx: px(x), cy: py(y), r: 3 },
                     s("title", { text: `step ${x}: eval loss ${fmtNum(y)}` })));
      }
    }
    // Hover readout: nearest training point.
    const cursor = s("circle", { class: "cursor", r: 4, cx: -10, cy: -10 });
    const readout = h("div", { class: "chart-readout muted", id: "loss-readout", text: "" });
    svg.append(cursor);
    svg.addEventListener("mousemove", (ev) => {
      const data = series.train.length ? series.train : series.eval;
      const rect = svg.getBoundingClientRect();
      const x = xMin + ((ev.clientX - rect.left) * (W / rect.width) - M.l) / (W - M.l - M.r) * (xMax - xMin);
      let best = data[0];
      for (const p of data) if (Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
      cursor.setAttribute("cx", px(best[0])); cursor.setAttribute("cy", py(best[1]));
      readout.textContent = `step ${best[0]}: loss ${fmtNum(best[1])}`;
    });
    const legend = h("div", { class: "legend" },
      series.train.length ? h("span", { class: "key train", text: `train loss (${series.train.length} steps)` }) : null,
      series.eval.length ? h("span", { class: "key eval", text: `eval loss (${series.eval.length} points)` }) : null);
    container.append(svg, legend, readout);
  }

  // ---------------------------------------------------------------------------------------
  // Job page
  // ---------------------------------------------------------------------------------------
  function kvTable(obj, id) {
    const rows = Object.entries(obj || {}).filter(([, v]) => v !== null && v !== undefined);
    return h("table", { class: "kv", id: id || null },
      h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { text: k }), h("td", { text: fmtValue(v) })))));
  }

  /** Any list of flat objects (e.g. the before/after samples) as a table with their keys as columns. */
  function recordsTable(records, id) {
    const cols = [];
    for (const r of records) for (const k of Object.keys(r || {})) if (!cols.includes(k)) cols.push(k);
    return h("table", { class: "grid records", id: id || null },
      h("thead", {}, h("tr", {}, cols.map((c) => h("th", { text: c })))),
      h("tbody", {}, records.map((r) => h("tr", {}, cols.map((c) => h("td", { class: "cell-text", text: fmtValue(r ? r[c] : null) }))))));
  }

  /** `training`, `evaluating 12/100`, `publishing` (JobProgress.phase_text on the server). */
  function phaseText(p) {
    if (!p || !p.phase) return "";
    if (p.phase === "evaluating" && p.eval_total) return `evaluating ${p.eval_done || 0}/${p.eval_total}`;
    return p.phase;
  }

  const QUALITY_METRICS = ["bleu-4", "rouge-1", "rouge-2", "rouge-l"];

  /** BLEU-4 / ROUGE of the base and the adapter on the evaluation prompts, and the difference. */
  function qualityTable(quality, id) {
    const base = quality.base || {}, tuned = quality.adapter || {};
    const keys = QUALITY_METRICS.filter((k) => k in tuned || k in base)
      .concat(Object.keys(tuned).filter((k) => !QUALITY_METRICS.includes(k) && k !== "n_samples" && typeof tuned[k] === "number"));
    const diff = (k) => (typeof tuned[k] === "number" && typeof base[k] === "number") ? tuned[k] - base[k] : null;
    return h("table", { class: "grid quality", id: id || null },
      h("thead", {}, h("tr", {}, ["Metric", "Base", "Adapter", "Δ"].map((t) => h("th", { text: t })))),
      h("tbody", {}, keys.map((k) => {
        const d = diff(k);
        return h("tr", { "data-metric": k },
          h("td", { text: k.toUpperCase() }), h("td", { text: fmtNum(base[k], 4) }), h("td", { text: fmtNum(tuned[k], 4) }),
          h("td", { class: d === null ? "" : d >= 0 ? "up" : "down",
                    text: d === null ? "—" : (d >= 0 ? "+" : "") + d.toFixed(2) }));
      })));
  }

  /** Rows behind a <details>, fetched from `path` the first time it is opened. */
  function lazySamples(path, count, id) {
    const body = h("div", { class: "scroll" });
    const box = h("details", { id: id || null, class: "samples" },
      h("summary", { text: `Before / after samples (${count})` }), body);
    let loaded = false;
    box.addEventListener("toggle", async () => {
      if (!box.open || loaded) return;
      loaded = true;
      body.replaceChildren(h("p", { class: "muted", text: "loading…" }));
      try {
        const rows = listOf(await api(path));
        body.replaceChildren(recordsTable(rows, "before-after"));
      } catch (e) {
        loaded = false;
        body.replaceChildren(h("p", { class: "muted", text: "Samples unavailable: " + e.message }));
      }
    });
    return box;
  }

  function renderResult(container, job) {
    container.replaceChildren();
    const result = job.result || {};
    const metrics = result.metrics || null;
    const scalars = Object.fromEntries(Object.entries(metrics || {}).filter(([, v]) => typeof v !== "object" || v === null));
    if (Object.keys(scalars).length) {
      container.append(h("h3", { text: "Evaluation metrics" }), kvTable(scalars, "job-metrics"));
    }
    const quality = metrics && metrics.quality;
    if (quality && quality.adapter) {
      container.append(h("h3", { text: `Quality on ${quality.n_samples} ${quality.split || ""} prompts` }),
                       qualityTable(quality, "quality-table"),
                       lazySamples(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/samples?limit=1000`,
                                   quality.n_samples, "job-samples"));
    } else if (quality && quality.error) {
      container.append(h("p", { class: "muted", text: "Quality: " + quality.error }));
    }
    // Older shapes: a list under a known key, or {before: [...], after: [...]} zipped by index.
    let rows = null;
    for (const key of ["before_after", "samples", "comparison", "examples"]) {
      if (Array.isArray(result[key]) && result[key].length) { rows = result[key]; break; }
    }
    if (!rows && Array.isArray(result.before) && Array.isArray(result.after)) {
      rows = result.before.map((b, i) => Object.assign({}, typeof b === "object" ? b : { before: b },
                                                       typeof result.after[i] === "object" ? result.after[i] : { after: result.after[i] }));
    }
    if (rows) container.append(h("h3", { text: "Before / after" }), h("div", { class: "scroll" }, recordsTable(rows, "before-after")));
    const rest = Object.fromEntries(Object.entries(result).filter(([k, v]) =>
      !["metrics", "before_after", "samples", "comparison", "examples", "before", "after"].includes(k)));
    if (Object.keys(rest).length) {
      container.append(h("details", {}, h("summary", { text: "Other result fields" }),
                         h("pre", { class: "json", text: JSON.stringify(rest, null, 2) })));
    }
  }

  function jobView(root, jobId) {
    let stopped = false;
    let stopPoll = null;
    const events = new Map(); // id -> event
    let order = [];           // ids, oldest first
    let job = null;

    const head = h("div", { class: "page-head" },
      h("h1", {}, h("a", { href: "#/jobs", class: "muted", text: "Jobs" }), " / ", h("span", { id: "job-id", text: jobId })),
      h("span", { id: "job-status" }));
    const cancelBtn = h("button", { type: "button", id: "job-cancel", class: "danger", hidden: true, text: "Cancel job",
                                    onclick: () => cancel() });
    const bar = h("div", { class: "bar" });
    const progress = h("div", { class: "progress", id: "job-progress", role: "progressbar",
                                "aria-valuemin": 0, "aria-valuemax": 100 }, bar);
    const progressText = h("div", { class: "progress-text muted", id: "job-progress-text" });
    const summary = h("div", { id: "job-summary" });
    const errorBox = h("div", { id: "job-error", class: "flash error", hidden: true });
    const chart = h("div", { class: "chart", id: "loss-chart-box" });
    const result = h("div", { id: "job-result" });
    const resultCard = h("section", { class: "card", hidden: true }, result);
    const checkpoints = h("div", { id: "job-checkpoints" });
    let checkpointsAt = 0;
    const evBody = h("tbody", { id: "events-body" });
    const evNote = h("span", { class: "muted", id: "events-count" });
    root.append(head, errorBox,
      h("section", { class: "card" }, h("div", { class: "row" }, h("h2", { text: "Progress" }), cancelBtn),
        progress, progressText, summary),
      h("section", { class: "card" }, h("h2", { text: "Loss" }), chart),
      resultCard,
      h("section", { class: "card" }, h("h2", { text: "Checkpoints" }), checkpoints),
      h("section", { class: "card" }, h("div", { class: "row" }, h("h2", { text: "Events" }), evNote),
        h("div", { class: "scroll" }, h("table", { class: "grid", id: "events-table" },
          h("thead", {}, h("tr", {}, ["Time", "Level", "Type", "Message"].map((t) => h("th", { text: t })))),
          evBody))));

    function renderJob() {
      const p = job.progress || {};
      $("#job-status").replaceChildren(badge(job.status));
      const final = FINAL.has(job.status);
      cancelBtn.hidden = final;
      // A running job stops at its next step; until then say so instead of offering cancel again.
      const cancelling = !final && !!job.cancel_requested;
      cancelBtn.disabled = cancelling;
      cancelBtn.textContent = cancelling ? "Cancel requested…" : "Cancel job";
      cancelBtn.dataset.requested = cancelling ? "true" : "false";
      let pct = 0;
      if (job.status === "succeeded") pct = 100;
      else if (p.total_steps) pct = Math.min(100, (100 * (p.step || 0)) / p.total_steps);
      bar.style.width = pct.toFixed(1) + "%";
      progress.setAttribute("aria-valuenow", pct.toFixed(0));
      progress.dataset.status = job.status;
      const parts = [];
      const phase = phaseText(p);
      if (!final && phase) parts.push(phase);
      parts.push(p.total_steps ? `step ${p.step || 0} / ${p.total_steps} (${pct.toFixed(0)}%)` : `step ${p.step || 0}`);
      if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${fmtNum(p.loss)}`);
      if (p.eval_loss !== null && p.eval_loss !== undefined) parts.push(`eval loss ${fmtNum(p.eval_loss)}`);
      if (p.tokens_per_second) parts.push(`${fmtNum(p.tokens_per_second, 3)} tok/s`);
      if (p.label_tokens_per_second) parts.push(`${fmtNum(p.label_tokens_per_second, 3)} label tok/s`);
      if (!final && p.eta_seconds !== null && p.eta_seconds !== undefined) parts.push(`ETA ${fmtDuration(p.eta_seconds)}`);
      progressText.textContent = parts.join(" · ");
      progressText.dataset.phase = final ? "" : (p.phase || "");

      const info = {
        model: job.model, fine_tuned_model: job.fine_tuned_model, trained_tokens: job.trained_tokens,
        created: fmtTime(job.created_at), finished: job.finished_at ? fmtTime(job.finished_at) : null,
        training_file: job.training_file, validation_file: job.validation_file,
      };
      summary.replaceChildren(kvTable(info, "job-info"));
      if (job.fine_tuned_model && job.status === "succeeded") {
        summary.append(h("p", {}, h("a", { href: "#/chat/" + encodeURIComponent(job.fine_tuned_model),
                                           id: "job-chat-link", text: "Chat with " + job.fine_tuned_model + " →" })));
      }
      const hp = job.hyperparameters || null;
      const spec = job.spec || null;
      if (hp || spec) {
        summary.append(h("details", {}, h("summary", { text: "Hyperparameters & spec" }),
          hp ? kvTable(hp, "job-hyperparameters") : null,
          spec ? h("pre", { class: "json", text: JSON.stringify(spec, null, 2) }) : null));
      }
      if (job.error && (job.error.message || job.error.code)) {
        errorBox.hidden = false;
        errorBox.textContent = `${job.error.code || "error"}: ${job.error.message || ""}`;
      } else {
        errorBox.hidden = true;
      }
      renderResult(result, job);
      resultCard.hidden = !result.firstChild;
    }

    function renderEvents() {
      const newestFirst = order.slice().reverse().slice(0, 500).map((id) => events.get(id));
      evNote.textContent = order.length > 500 ? `latest 500 of ${order.length}` : `${order.length}`;
      evBody.replaceChildren(...newestFirst.map((ev) => h("tr", { class: "level-" + ev.level, "data-type": ev.type },
        h("td", { class: "nowrap", text: fmtTime(ev.created_at) }),
        h("td", { text: ev.level }),
        h("td", { text: ev.type }),
        h("td", { class: "cell-text" }, ev.message, ev.type === "metrics" && ev.data
          ? h("span", { class: "muted", text: "  " + Object.entries(ev.data).map(([k, v]) => `${k}=${fmtValue(v)}`).join(" ") })
          : null))));
      drawLossChart(chart, lossSeries(order.map((id) => events.get(id))));
    }

    /** Page backwards (newest first) until an event already seen, so a refresh costs one
     * request when little happened and the first load gets the whole history. */
    async function loadEvents() {
      const fresh = [];
      let after = null;
      for (let i = 0; i < MAX_EVENT_PAGES; i++) {
        const q = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?limit=${EVENTS_PAGE}` +
                  (after ? `&after=${encodeURIComponent(after)}` : "");
        const page = await api(q);
        const data = listOf(page);
        let hitKnown = false;
        for (const ev of data) {
          if (events.has(ev.id)) { hitKnown = true; break; }
          fresh.push(ev);
        }
        if (hitKnown || !page.has_more || !data.length) break;
        after = data[data.length - 1].id;
      }
      if (!fresh.length) return false;
      for (const ev of fresh.reverse()) { events.set(ev.id, ev); order.push(ev.id); }
      return true;
    }

    /** Checkpoints change rarely and listing them touches the job's disk: every 15 s at most. */
    async function loadCheckpoints(force) {
      if (!force && Date.now() - checkpointsAt < 15000) return;
      checkpointsAt = Date.now();
      try {
        const items = listOf(await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`));
        if (stopped) return;
        if (!items.length) {
          checkpoints.replaceChildren(h("p", { class: "muted", text: "No checkpoints." }));
          return;
        }
        checkpoints.replaceChildren(h("table", { class: "grid", id: "checkpoints-table" },
          h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss", "Created", "Checkpoint"].map((c) => h("th", { text: c })))),
          h("tbody", {}, items.map((c) => h("tr", {},
            h("td", { text: fmtValue(c.step_number) }),
            h("td", { text: fmtValue((c.metrics || {}).train_loss) }),
            h("td", { text: fmtValue((c.metrics || {}).valid_loss) }),
            h("td", { text: fmtTime(c.created_at) }),
            h("td", {}, h("code", { text: c.fine_tuned_model_checkpoint || c.id })))))));
      } catch (e) {
        if (!stopped) checkpoints.replaceChildren(h("p", { class: "muted", text: "Checkpoints unavailable: " + e.message }));
      }
    }

    async function refresh() {
      try {
        const before = job ? job.status : null;
        job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
        if (stopped) return;
        renderJob();
        const changed = await loadEvents();
        if (stopped) return;
        if (changed || !chart.firstChild) renderEvents();
        loadCheckpoints(before !== job.status);
        root.dataset.loaded = "true";
        if (FINAL.has(job.status) && stopPoll) { stopPoll(); stopPoll = null; }
      } catch (e) {
        if (stopped) return;
        if (e.status === 404) {
          flash(`Job ${jobId} not found.`);
          if (stopPoll) { stopPoll(); stopPoll = null; }
        } else {
          flash("Could not load the job: " + e.message);
        }
      }
    }

    async function cancel() {
      if (!confirm(`Cancel ${jobId}?`)) return;
      cancelBtn.disabled = true;
      try {
        job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST" });
        renderJob();
        flash("Cancel requested.", "info");
      } catch (e) {
        flash("Cancel failed: " + e.message);
        cancelBtn.disabled = false;
      }
      refresh();
    }

    refresh().then(() => { if (!stopped && job && !FINAL.has(job.status)) stopPoll = poller(refresh, JOB_REFRESH_MS); });
    return () => { stopped = true; if (stopPoll) stopPoll(); };
  }

  // ---------------------------------------------------------------------------------------
  // Adapters
  // ---------------------------------------------------------------------------------------
  function scalarMetrics(metrics) {
    return Object.entries(metrics || {}).filter(([, v]) => typeof v === "number" || typeof v === "string");
  }

  function adaptersView(root) {
    let stopped = false;
    const list = h("div", { id: "adapters-list" });
    root.append(h("div", { class: "page-head" }, h("h1", { text: "Adapters" })), list);

    (async () => {
      try {
        const adapters = listOf(await api("/v1/adapters"));
        if (stopped) return;
        if (!adapters.length) {
          list.append(h("p", { class: "muted empty", id: "adapters-empty",
                               text: "No adapters yet: a succeeded fine-tuning job publishes one." }));
          return;
        }
        // Metric names across all adapters, so they line up as columns.
        const metricCols = [];
        for (const a of adapters) for (const [k] of scalarMetrics(a.metrics)) if (!metricCols.includes(k)) metricCols.push(k);
        list.append(h("table", { class: "grid", id: "adapters-table" },
          h("thead", {}, h("tr", {},
            ["Name", "Version", "Base model", "r", "alpha", "Target modules", "Created", ...metricCols, "BLEU-4 base → adapter", "", "Export"]
              .map((t) => h("th", { text: t })))),
          h("tbody", {}, adapters.map((a) => {
            const name = a.name || a.id;
            const details = h("tr", { class: "manifest-row", hidden: true },
              h("td", { colspan: 10 + metricCols.length }, h("pre", { class: "json", text: JSON.stringify(a, null, 2) })));
            const q = (a.metrics || {}).quality;
            const bleu = q && q.adapter && typeof q.adapter["bleu-4"] === "number"
              ? `${fmtNum((q.base || {})["bleu-4"], 4)} → ${fmtNum(q.adapter["bleu-4"], 4)}` : "—";
            const exportPath = (fmt) => `/v1/adapters/${encodeURIComponent(name)}/export?format=${fmt}&version=${a.version}`;
            const row = h("tr", { "data-adapter": name },
              h("td", {}, h("a", { href: "#/chat/" + encodeURIComponent(name), title: "chat with this adapter", text: name })),
              h("td", { text: fmtValue(a.version) }),
              h("td", { text: a.base_model || "—" }),
              h("td", { text: fmtValue(a.r) }),
              h("td", { text: fmtValue(a.lora_alpha) }),
              h("td", { text: (a.target_modules || []).join(", ") }),
              h("td", { text: fmtTime(a.created_at) }),
              metricCols.map((k) => h("td", { text: fmtValue((a.metrics || {})[k]) })),
              h("td", { class: "nowrap", text: bleu }),
              h("td", {}, h("button", { type: "button", class: "link", text: "manifest",
                                        onclick: () => { details.hidden = !details.hidden; } })),
              h("td", { class: "nowrap" },
                ["chatglm3", "peft"].map((fmt) => h("button", { type: "button", class: "link", "data-export": fmt,
                  title: fmt === "chatglm3" ? "for the original ChatGLM3-6B + peft" : "the registry's own PEFT pair",
                  text: fmt, onclick: (ev) => download(ev.target, exportPath(fmt), `${name}-v${a.version}-${fmt}.zip`) }))));
            return [row, details];
          }))));
      } catch (e) {
        if (!stopped) flash("Could not load adapters: " + e.message);
      }
    })();
    return () => { stopped = true; };
  }

  /** Fetch with the key (a plain link cannot send it) and save the body as `filename`. */
  async function download(button, path, filename) {
    button.disabled = true;
    try {
      const resp = await fetch(path, { headers: authHeaders() });
      if (!resp.ok) throw await readError(resp);
      const url = URL.createObjectURL(await resp.blob());
      const a = h("a", { href: url, download: filename, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      button.dataset.downloaded = "true";
      flash(`Downloaded ${filename}.`, "info");
    } catch (e) {
      flash("Export failed: " + e.message);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // New job: upload (drop or pick) a dataset, then start a job with the common hyperparameters
  // ---------------------------------------------------------------------------------------
  /** An error body as lines: the message (which names the line and field of a bad row) and param. */
  function errorLines(e) {
    const lines = String(e.message || e).split("\n").filter(Boolean);
    if (e.param) lines.push(`field: ${e.param}`);
    return lines;
  }

  function dropZone(id, label, onFile) {
    const input = h("input", { type: "file", id: id + "-input", accept: ".jsonl,.json,application/jsonl", hidden: true });
    const zone = h("div", { class: "dropzone", id, tabindex: 0 },
      h("strong", { text: label }), h("span", { class: "muted", text: " drop a JSONL file here, or " }),
      h("button", { type: "button", class: "link", text: "choose one", onclick: () => input.click() }), input);
    input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); input.value = ""; });
    zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (ev) => {
      ev.preventDefault();
      zone.classList.remove("over");
      const f = ev.dataTransfer && ev.dataTransfer.files[0];
      if (f) onFile(f);
    });
    return zone;
  }

  async function uploadFile(file) {
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    const resp = await fetch("/v1/files", { method: "POST", headers: authHeaders(), body: form });
    if (!resp.ok) throw await readError(resp);
    return resp.json();
  }

  // The form's fields: TrainingSpec keys with their defaults (service/core/domain.py; README
  // "Hyperparameters"). Empty = the server's default.
  const JOB_FIELDS = [
    ["n_epochs", "Epochs", 3, "number", "0.1"], ["max_steps", "Max steps (wins over epochs)", "", "number", "1"],
    ["batch_size", "Batch size", 16, "number", "1"], ["learning_rate", "Learning rate", 0.0001, "number", "any"],
    ["lora_r", "LoRA rank", 8, "number", "1"], ["lora_alpha", "LoRA alpha", 32, "number", "any"],
    ["eval_max_samples", "Evaluation prompts", 50, "number", "1"],
  ];

  function newJobView(root) {
    let stopped = false;
    const chosen = { training: null, validation: null };
    const status = { training: h("div", { id: "upload-training-status", class: "upload-status" }),
                     validation: h("div", { id: "upload-validation-status", class: "upload-status" }) };
    const base = h("select", { id: "job-model" });
    const suffix = h("input", { id: "job-suffix", placeholder: "e.g. ads", maxlength: 45 });
    const fields = JOB_FIELDS.map(([key, label, def, type, step]) =>
      [key, h("input", { id: "hp-" + key, name: key, type, step, value: def, placeholder: def === "" ? "—" : String(def) }), label]);
    const submit = h("button", { type: "submit", id: "job-create", text: "Start fine-tuning", disabled: true });
    const formError = h("div", { id: "job-create-error", class: "flash error", hidden: true });

    function showUpload(which, state, info) {
      const el = status[which];
      el.className = "upload-status " + state;
      if (state === "ok") {
        el.replaceChildren(h("span", { text: `✓ ${info.filename}: ${info.id}, ${fmtNum(info.rows)} rows` }));
      } else if (state === "error") {
        el.replaceChildren(h("strong", { text: "Upload refused:" }),
                           h("ul", { class: "row-errors" }, errorLines(info).map((l) => h("li", { text: l }))));
      } else {
        el.replaceChildren(h("span", { class: "muted", text: info }));
      }
      submit.disabled = !chosen.training;
    }

    async function take(which, file) {
      chosen[which] = null;
      showUpload(which, "busy", `uploading ${file.name}…`);
      try {
        const info = await uploadFile(file);
        if (stopped) return;
        chosen[which] = info.id;
        showUpload(which, "ok", info);
      } catch (e) {
        if (!stopped) showUpload(which, "error", e);
      }
    }

    const form = h("form", { id: "job-form" },
      h("div", { class: "form-grid" },
        h("label", {}, "Base model", base), h("label", {}, "Suffix", suffix),
        fields.map(([, input, label]) => h("label", {}, label, input))),
      h("div", { class: "row" }, submit, h("span", { class: "muted", text: "empty fields: the server's defaults" })),
      formError);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      formError.hidden = true;
      const hp = {};
      for (const [key, input] of fields) if (input.value !== "") hp[key] = Number(input.value);
      const body = { model: base.value, training_file: chosen.training, hyperparameters: hp };
      if (chosen.validation) body.validation_file = chosen.validation;
      if (suffix.value.trim()) body.suffix = suffix.value.trim();
      submit.disabled = true;
      try {
        const job = await api("/v1/fine_tuning/jobs", { method: "POST", body });
        location.hash = "#/jobs/" + encodeURIComponent(job.id);
      } catch (e) {
        formError.hidden = false;
        formError.replaceChildren(h("ul", { class: "row-errors" }, errorLines(e).map((l) => h("li", { text: l }))));
        submit.disabled = false;
      }
    });

    root.append(h("div", { class: "page-head" }, h("h1", { text: "New fine-tuning job" })),
      h("section", { class: "card" }, h("h2", { text: "1. Data" }),
        h("p", { class: "muted", text: 'One JSON object per line: {"content", "summary"} (AdvertiseGen), ' +
                                       '{"conversations": [...]} (ChatGLM3) or {"messages": [...]} (OpenAI chat). ' +
                                       "Every row is checked on upload." }),
        dropZone("drop-training", "Training file", (f) => take("training", f)), status.training,
        dropZone("drop-validation", "Validation file (optional)", (f) => take("validation", f)), status.validation),
      h("section", { class: "card" }, h("h2", { text: "2. Hyperparameters" }), form));

    (async () => {
      try {
        const models = listOf(await api("/v1/models")).filter((m) => (m.kind || "base") === "base");
        if (stopped) return;
        base.replaceChildren(...models.map((m) => h("option", { value: m.id, text: m.id })));
        base.dataset.loaded = "true";
      } catch (e) { if (!stopped) flash("Could not load models: " + e.message); }
    })();
    return () => { stopped = true; };
  }

  // ---------------------------------------------------------------------------------------
  // Webhooks (OpenAI's /v1/webhook_endpoints)
  // ---------------------------------------------------------------------------------------
  const EVENT_TYPES = ["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"];

  function webhooksView(root) {
    let stopped = false;
    const list = h("div", { id: "webhooks-list" });
    const secretBox = h("div", { id: "webhook-secret", class: "flash info", hidden: true });
    const name = h("input", { id: "webhook-name", placeholder: "ci", required: true });
    const url = h("input", { id: "webhook-url", type: "url", placeholder: "https://example.com/hooks/tuneserve", required: true, size: 40 });
    const checks = EVENT_TYPES.map((t) => [t, h("input", { type: "checkbox", value: t, checked: true, "data-event": t })]);
    const form = h("form", { id: "webhook-form", class: "form-grid" },
      h("label", {}, "Name", name), h("label", {}, "URL", url),
      h("fieldset", {}, h("legend", { text: "Events" }), checks.map(([t, c]) => h("label", { class: "check" }, c, t))),
      h("div", {}, h("button", { type: "submit", id: "webhook-create", text: "Add endpoint" })));

    function showSecret(ep, what) {
      secretBox.hidden = false;
      secretBox.replaceChildren(h("div", { text: `${what} for ${ep.name}; shown only now, copy it:` }),
                                h("code", { id: "webhook-secret-value", text: ep.signing_secret }));
    }

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const ep = await api("/v1/webhook_endpoints", { method: "POST", body: {
          name: name.value.trim(), url: url.value.trim(),
          event_types: checks.filter(([, c]) => c.checked).map(([t]) => t) } });
        showSecret(ep, "Signing secret");
        name.value = ""; url.value = "";
        load();
      } catch (e) { flash("Could not add the endpoint: " + errorLines(e).join("; ")); }
    });

    async function act(ep, what) {
      try {
        if (what === "delete") {
          if (!confirm(`Delete ${ep.name}? Its undelivered events are dropped.`)) return;
          await api(`/v1/webhook_endpoints/${encodeURIComponent(ep.id)}`, { method: "DELETE" });
        } else if (what === "test") {
          const r = await api(`/v1/webhook_endpoints/${encodeURIComponent(ep.id)}/test`,
                              { method: "POST", body: { event_type: ep.event_types[0] } });
          flash(`Test delivery to ${ep.name}: HTTP ${r.status_code ?? "—"}`, "info");
        } else if (what === "rotate") {
          showSecret(await api(`/v1/webhook_endpoints/${encodeURIComponent(ep.id)}/rotate_secret`,
                               { method: "POST", body: { keep_old_secret_active_for_24_hours: true } }), "New signing secret");
        }
        load();
      } catch (e) { flash(`${what} failed: ` + e.message); }
    }

    async function deliveries(ep, cell) {
      try {
        const rows = listOf(await api(`/v1/webhook_endpoints/${encodeURIComponent(ep.id)}/deliveries?limit=20`));
        cell.replaceChildren(rows.length ? recordsTable(rows.map((d) => ({
          event: d.event_type, status: d.status, attempts: d.attempts, http: d.last_status_code,
          error: d.last_error, next: d.next_attempt_at ? fmtTime(d.next_attempt_at) : null })), "webhook-deliveries")
          : h("p", { class: "muted", text: "No deliveries yet." }));
      } catch (e) { cell.replaceChildren(h("p", { class: "muted", text: e.message })); }
    }

    async function load() {
      try {
        const eps = listOf(await api("/v1/webhook_endpoints"));
        if (stopped) return;
        if (!eps.length) { list.replaceChildren(h("p", { class: "muted empty", text: "No endpoints." })); return; }
        list.replaceChildren(h("table", { class: "grid", id: "webhooks-table" },
          h("thead", {}, h("tr", {}, ["Name", "URL", "Events", "Secret", "Created", ""].map((t) => h("th", { text: t })))),
          h("tbody", {}, eps.map((ep) => {
            const log = h("td", { colspan: 6 });
            const logRow = h("tr", { hidden: true }, log);
            return [h("tr", { "data-webhook": ep.id },
              h("td", { text: ep.name }), h("td", { class: "cell-text", text: ep.url }),
              h("td", { text: (ep.event_types || []).join(", ") }),
              h("td", {}, h("code", { text: ep.signing_secret_hint || "—" })),
              h("td", { class: "nowrap", text: fmtTime(ep.created_at) }),
              h("td", { class: "nowrap" },
                h("button", { type: "button", class: "link", text: "test", onclick: () => act(ep, "test") }),
                h("button", { type: "button", class: "link", text: "rotate secret", onclick: () => act(ep, "rotate") }),
                h("button", { type: "button", class: "link", text: "deliveries",
                              onclick: () => { logRow.hidden = !logRow.hidden; if (!logRow.hidden) deliveries(ep, log); } }),
                h("button", { type: "button", class: "link danger-text", text: "delete", onclick: () => act(ep, "delete") }))),
              logRow];
          }))));
      } catch (e) { if (!stopped) flash("Could not load webhooks: " + e.message); }
    }

    root.append(h("div", { class: "page-head" }, h("h1", { text: "Webhooks" })),
      h("p", { class: "muted", text: "POSTed when a job succeeds, fails or is cancelled, signed as OpenAI signs them " +
                                     "(verify with the openai package's client.webhooks.unwrap)." }),
      secretBox, h("section", { class: "card" }, list), h("section", { class: "card" }, h("h2", { text: "Add an endpoint" }), form));
    load();
    return () => { stopped = true; };
  }

  // ---------------------------------------------------------------------------------------
  // API keys of this tenant (listed by prefix; a new key is shown once)
  // ---------------------------------------------------------------------------------------
  function keysView(root) {
    let stopped = false;
    const list = h("div", { id: "keys-list" });
    const shown = h("div", { id: "new-key", class: "flash info", hidden: true });
    const name = h("input", { id: "key-name", placeholder: "e.g. ci" });
    const form = h("form", { id: "key-form", class: "row" }, h("label", {}, "Name ", name),
                   h("button", { type: "submit", id: "key-create", text: "Create key" }));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const k = await api("/v1/api_keys", { method: "POST", body: name.value.trim() ? { name: name.value.trim() } : {} });
        shown.hidden = false;
        shown.replaceChildren(h("div", { text: "New key; shown only now, copy it:" }), h("code", { id: "new-key-value", text: k.key }));
        name.value = "";
        load();
      } catch (e) { flash("Could not create a key: " + e.message); }
    });
    async function revoke(k) {
      const own = apiKey().startsWith(k.prefix);
      if (!confirm(own ? `Revoke ${k.prefix}…? It looks like the key this page uses.` : `Revoke ${k.prefix}…?`)) return;
      try { await api(`/v1/api_keys/${encodeURIComponent(k.id)}`, { method: "DELETE" }); load(); }
      catch (e) { flash("Revoke failed: " + e.message); }
    }
    async function load() {
      try {
        const keys = listOf(await api("/v1/api_keys"));
        if (stopped) return;
        list.replaceChildren(h("table", { class: "grid", id: "keys-table" },
          h("thead", {}, h("tr", {}, ["Prefix", "Name", "Created", "Revoked", ""].map((t) => h("th", { text: t })))),
          h("tbody", {}, keys.map((k) => h("tr", { "data-key": k.id, class: k.revoked_at ? "muted" : "" },
            h("td", {}, h("code", { text: k.prefix + "…" }),
              apiKey().startsWith(k.prefix) ? h("span", { class: "muted", text: " (this page)" }) : null),
            h("td", { text: k.name || "—" }), h("td", { class: "nowrap", text: fmtTime(k.created_at) }),
            h("td", { class: "nowrap", text: k.revoked_at ? fmtTime(k.revoked_at) : "—" }),
            h("td", {}, k.revoked_at ? null : h("button", { type: "button", class: "link danger-text", text: "revoke",
                                                            onclick: () => revoke(k) })))))));
      } catch (e) { if (!stopped) flash("Could not load keys: " + e.message); }
    }
    root.append(h("div", { class: "page-head" }, h("h1", { text: "API keys" })), shown,
                h("section", { class: "card" }, list), h("section", { class: "card" }, form));
    load();
    return () => { stopped = true; };
  }

  // ---------------------------------------------------------------------------------------
  // Chat playground (POST + ReadableStream: EventSource cannot POST or send headers)
  // ---------------------------------------------------------------------------------------
  /** Yields parsed `data:` payloads of an SSE body; "[DONE]" ends it. Calls onRead per network read. */
  async function* sseData(body, onRead) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (onRead) onRead();
        buffer += decoder.decode(value, { stream: true });
        // Events are separated by a blank line; handle \r\n too.
        let idx;
        while ((idx = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const raw = buffer.slice(0, idx);
          buffer = buffer.slice(idx).replace(/^\r?\n\r?\n/, "");
          const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue; // comment / keep-alive
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  function chatView(root, preselect) {
    let controller = null;
    const history = []; // {role, content}
    const select = h("select", { id: "chat-model" });
    const system = h("textarea", { id: "chat-system", rows: 2, placeholder: "optional system prompt" });
    const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.8 });
    const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 4096, step: 1, value: 128 });
    const log = h("div", { id: "chat-log", class: "chat-log" });
    const input = h("textarea", { id: "chat-input", rows: 3, placeholder: "Type a message (Ctrl+Enter sends)" });
    const send = h("button", { type: "submit", id: "chat-send", text: "Send" });
    const stopBtn = h("button", { type: "button", id: "chat-stop", hidden: true, text: "Stop", onclick: () => controller && controller.abort() });
    const clear = h("button", { type: "button", class: "link", id: "chat-clear", text: "New conversation",
                                onclick: () => { history.length = 0; log.replaceChildren(); usage.textContent = ""; } });
    const usage = h("div", { id: "chat-usage", class: "muted" });
    const form = h("form", { id: "chat-form", class: "chat-form" }, input, h("div", { class: "row" }, send, stopBtn, clear, usage));
    root.append(
      h("div", { class: "page-head" }, h("h1", { text: "Chat playground" })),
      h("section", { class: "card chat-settings" },
        h("label", {}, "Model ", select),
        h("label", {}, "Temperature ", temperature),
        h("label", {}, "Max tokens ", maxTokens),
        h("label", { class: "wide" }, "System ", system)),
      log, form);

    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); form.requestSubmit(); }
    });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); sendMessage(); });

    (async () => {
      try {
        const models = listOf(await api("/v1/models"));
        const ids = models.map((m) => m.id);
        if (preselect && !ids.includes(preselect)) ids.push(preselect);
        select.replaceChildren(...ids.map((id) => {
          const m = models.find((x) => x.id === id) || {};
          const kind = m.kind || (m.owned_by === "user" ? "adapter" : m.owned_by ? "base" : "");
          const label = kind ? `${id} (${kind}${m.version ? " v" + m.version : ""})` : id;
          return h("option", { value: id, text: label, selected: id === preselect });
        }));
        select.dataset.loaded = "true";
      } catch (e) {
        flash("Could not load models: " + e.message);
      }
    })();

    function bubble(role, text) {
      const content = h("div", { class: "content", text: text || "" });
      const el = h("div", { class: "msg " + role }, h("div", { class: "role", text: role }), content);
      log.append(el);
      log.scrollTop = log.scrollHeight;
      return { el, content };
    }

    async function sendMessage() {
      const text = input.value.trim();
      if (!text || controller) return;
      if (!select.value) { flash("No model to chat with."); return; }
      flash(null);
      input.value = "";
      history.push({ role: "user", content: text });
      bubble("user", text);
      const reply = bubble("assistant", "");
      reply.el.classList.add("streaming");
      // Stream bookkeeping on the element itself, so tests and curious users can see it.
      let chunks = 0, reads = 0, answer = "";
      const started = performance.now();
      let firstTokenMs = null;
      reply.el.dataset.chunks = "0";
      reply.el.dataset.reads = "0";
      const messages = (system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []).concat(history);
      const body = {
        model: select.value, messages, stream: true,
        stream_options: { include_usage: true },
        temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
      };
      controller = new AbortController();
      send.disabled = true; stopBtn.hidden = false;
      let finish = null, usageInfo = null;
      try {
        const resp = await fetch("/v1/chat/completions", {
          method: "POST", headers: authHeaders({ "Content-Type": "application/json", "Accept": "text/event-stream" }),
          body: JSON.stringify(body), signal: controller.signal,
        });
        if (!resp.ok) throw await readError(resp);
        let sawContentThisRead = false;
        for await (const chunk of sseData(resp.body, () => { sawContentThisRead = false; })) {
          if (chunk.error) throw new ApiError(500, chunk);
          if (chunk.usage) usageInfo = chunk.usage;
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          const delta = (choice.delta && choice.delta.content) || "";
          if (delta) {
            if (firstTokenMs === null) firstTokenMs = performance.now() - started;
            answer += delta;
            chunks += 1;
            if (!sawContentThisRead) { reads += 1; sawContentThisRead = true; }
            reply.content.textContent = answer;
            reply.el.dataset.chunks = String(chunks);
            reply.el.dataset.reads = String(reads);
            log.scrollTop = log.scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        history.push({ role: "assistant", content: answer });
      } catch (e) {
        if (e.name === "AbortError") finish = "stopped";
        else { flash("Chat failed: " + e.message); reply.el.classList.add("failed"); history.pop(); }
      } finally {
        controller = null;
        send.disabled = false; stopBtn.hidden = true;
        reply.el.classList.remove("streaming");
        reply.el.dataset.done = "true";
        if (finish) reply.el.dataset.finishReason = finish;
        const secs = (performance.now() - started) / 1000;
        const parts = [];
        if (usageInfo) {
          parts.push(`prompt ${usageInfo.prompt_tokens} + completion ${usageInfo.completion_tokens} = ${usageInfo.total_tokens} tokens`);
          if (usageInfo.completion_tokens && secs > 0) parts.push(`${(usageInfo.completion_tokens / secs).toFixed(1)} tok/s`);
        } else {
          parts.push(`${chunks} chunks`);
        }
        if (firstTokenMs !== null) parts.push(`first token ${Math.round(firstTokenMs)} ms`);
        parts.push(`${secs.toFixed(2)} s`);
        if (finish) parts.push(`finish: ${finish}`);
        usage.textContent = parts.join(" · ");
        input.focus();
      }
    }

    return () => { if (controller) controller.abort(); };
  }

  // ---------------------------------------------------------------------------------------
  window.addEventListener("hashchange", route);
  window.addEventListener("DOMContentLoaded", () => { setupAuth(); route(); });
  // Small surface for tests and the console.
  window.tuneserve = { lossSeries, sseData };
})();
