/* SLIDE console, shared by its pages: API calls (with the API key kept for the tab), a Server-Sent Events reader,
   formatting, and the "try a query" box. Plain browser JavaScript, no build step. */
"use strict";

const Slide = (() => {
  const KEY = "slide.apiKey";
  let spec = null;
  let keyWaiters = [];

  const $ = (sel, root = document) => root.querySelector(sel);
  const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const short = (id) => (id ? String(id).slice(0, 8) : "");
  const num = (v, digits = 0) => (v == null || Number.isNaN(v) ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits }));
  const pct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
  const bytes = (n) => {
    if (n == null) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
  };
  const ago = (iso) => {
    if (!iso) return "–";
    const s = (Date.now() - new Date(iso).getTime()) / 1000;
    if (s < 60) return `${Math.max(0, Math.round(s))}s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(iso).toLocaleDateString();
  };
  const badge = (state) => `<span class="badge ${esc(state)}" data-state="${esc(state)}">${esc(state)}</span>`;
  const idCell = (id) => `<span class="id" title="${esc(id)}">${esc(id)}</span>`;

  // ---- the API key: asked once, kept in this tab's sessionStorage -----------------------------------------
  const getKey = () => sessionStorage.getItem(KEY) || "";
  function setKey(k) {
    if (k) sessionStorage.setItem(KEY, k); else sessionStorage.removeItem(KEY);
    paintKeyButton();
  }
  function paintKeyButton() {
    const b = $("#key-button");
    if (b) b.textContent = getKey() ? "API key: set" : "API key";
  }
  async function loadSpec() {
    if (!spec) {
      const r = await fetch("/openapi.json");
      spec = await r.json();
    }
    return spec;
  }
  /** The document declares a security scheme only when the service has an API key. */
  async function needsKey() {
    const s = await loadSpec();
    return !!(s.components && s.components.securitySchemes);
  }
  function askKey(message) {
    const dlg = $("#key-dialog");
    $("#key-message").textContent = message || "This service needs an API key (X-API-Key). It is kept for this tab only.";
    $("#key-input").value = getKey();
    if (!dlg.open) dlg.showModal();
    $("#key-input").focus();
    return new Promise((resolve) => keyWaiters.push(resolve));
  }
  function wireKeyDialog() {
    const dlg = $("#key-dialog");
    $("#key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      setKey($("#key-input").value.trim());
      dlg.close();
      keyWaiters.splice(0).forEach((f) => f());
    });
    $("#key-button").addEventListener("click", () => askKey());
    paintKeyButton();
  }
  async function ensureKey() {
    if ((await needsKey()) && !getKey()) await askKey();
  }

  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  async function api(path, opts = {}) {
    await ensureKey();
    const headers = Object.assign({}, opts.headers || {});
    if (getKey()) headers["X-API-Key"] = getKey();
    let body = opts.body;
    if (body !== undefined && typeof body !== "string") {
      body = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    const r = await fetch(path, { method: opts.method || "GET", headers, body });
    if (r.status === 401) {
      await askKey("The API key was refused; enter the service's key.");
      return api(path, opts);
    }
    if (r.status === 204) return null;
    const type = r.headers.get("content-type") || "";
    const data = type.includes("json") ? await r.json() : await r.text();
    if (!r.ok) throw new ApiError(r.status, typeof data === "object" ? data : { detail: data });
    return data;
  }

  /** Server-Sent Events over fetch (EventSource cannot send the X-API-Key header). Reconnects with
      Last-Event-ID; `onEvent(type, data)` gets parsed JSON. Returns a function that stops it. */
  function events(path, onEvent) {
    let stopped = false;
    let lastId = null;
    let controller = null;
    async function run() {
      while (!stopped) {
        controller = new AbortController();
        try {
          await ensureKey();
          const headers = { Accept: "text/event-stream" };
          if (getKey()) headers["X-API-Key"] = getKey();
          if (lastId) headers["Last-Event-ID"] = lastId;
          const r = await fetch(path, { headers, signal: controller.signal });
          if (r.status === 401) { await askKey("The API key was refused; enter the service's key."); continue; }
          if (!r.ok) { onEvent("error", await r.json().catch(() => ({ detail: `HTTP ${r.status}` }))); return; }
          const reader = r.body.getReader();
          const decoder = new TextDecoder();
          let buf = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
            let cut;
            while ((cut = buf.indexOf("\n\n")) >= 0) {
              const block = buf.slice(0, cut);
              buf = buf.slice(cut + 2);
              let type = "message", data = "", id = null;
              for (const line of block.split("\n")) {
                if (line.startsWith(":")) continue;
                const i = line.indexOf(":");
                const field = i < 0 ? line : line.slice(0, i);
                const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
                if (field === "event") type = val;
                else if (field === "data") data += (data ? "\n" : "") + val;
                else if (field === "id") id = val;
              }
              if (id) lastId = id;
              if (!data) continue;
              let parsed;
              try { parsed = JSON.parse(data); } catch { parsed = data; }
              onEvent(type, parsed);
              if (type === "end") { stopped = true; return; }
            }
          }
        } catch (e) {
          if (stopped) return;
        }
        if (!stopped) await new Promise((f) => setTimeout(f, 1500));
      }
    }
    run();
    return () => { stopped = true; if (controller) controller.abort(); };
  }

  // ---- the query box ------------------------------------------------------------------------------------
  /** Parse "f:v f:v", an XMC line "l1,l2 f:v ..." (its labels are the truth to compare with), or ids alone. */
  function parseFeatures(text) {
    const tokens = text.trim().split(/\s+/).filter(Boolean);
    let truth = [];
    if (tokens.length && !tokens[0].includes(":") && /^\d+(,\d+)*$/.test(tokens[0]) && tokens.slice(1).some((t) => t.includes(":"))) {
      truth = tokens.shift().split(",").map(Number);
    }
    const seen = new Map();
    for (const t of tokens) {
      const [f, v] = t.includes(":") ? t.split(":") : [t, "1"];
      const id = Number(f), val = Number(v);
      if (!Number.isInteger(id) || id < 0 || !Number.isFinite(val)) throw new Error(`cannot read "${t}": write feature:value, e.g. 17:0.5`);
      seen.set(id, val);
    }
    if (!seen.size) throw new Error("no features: write feature:value pairs, e.g. 0:1.0 5:0.5");
    return { instance: { indices: [...seen.keys()], values: [...seen.values()] }, truth };
  }

  /** The modes the service offers and its default, from its OpenAPI document. */
  async function predictModes() {
    try {
      const s = await loadSpec();
      const mode = s.components.schemas.PredictRequest.properties.mode;
      const found = mode.enum || (mode.anyOf || []).flatMap((m) => m.enum || []);
      return found.length ? { modes: found, preferred: mode.default || found[0] } : { modes: ["lsh", "exact"], preferred: "lsh" };
    } catch { return { modes: ["lsh", "exact"], preferred: "lsh" }; }
  }

  /** Whether a predict instance may be `{"text": ...}` here: some schema an instance refers to has `text`. */
  async function acceptsText() {
    try {
      const s = await loadSpec();
      const seen = new Set();
      const visit = (node) => {
        if (!node || typeof node !== "object") return false;
        if (node.$ref) {
          const name = node.$ref.split("/").pop();
          if (seen.has(name)) return false;
          seen.add(name);
          node = s.components.schemas[name] || {};
        }
        if (node.properties && node.properties.text) return true;
        return [node.items, ...(node.anyOf || []), ...(node.oneOf || [])].some(visit);
      };
      return visit(s.components.schemas.PredictRequest.properties.instances);
    } catch { return false; }
  }

  /** A query box in `root`. `getModel()` -> model id (or null). */
  async function queryBox(root, getModel) {
    const { modes, preferred } = await predictModes();
    const text = await acceptsText();
    root.innerHTML = `
      <div class="form-row">
        <div><label>Input</label>
          <div class="tabs" id="q-kind"><button type="button" data-kind="features" class="on">features</button><button type="button" data-kind="text" ${text ? "" : 'disabled title="this service predicts from feature ids only"'}>text</button></div>
        </div>
        <div class="narrow"><label for="q-k">k</label><input id="q-k" type="number" min="1" value="5"></div>
        <div class="narrow"><label for="q-mode">mode</label><select id="q-mode">${modes.map((m) => `<option ${m === preferred ? "selected" : ""}>${esc(m)}</option>`).join("")}</select></div>
        <div class="narrow"><button type="button" class="primary" id="q-run">Predict</button></div>
      </div>
      <textarea id="q-input" spellcheck="false" placeholder="feature:value pairs, e.g. 0:1.0 2:0.5 5:0.25 — or paste a line of an XMC file (its labels are shown as the truth)">0:1.0 2:0.5 5:0.25</textarea>
      <div id="q-out"></div>`;
    let kind = "features";
    root.querySelectorAll("#q-kind button").forEach((b) => b.addEventListener("click", () => {
      kind = b.dataset.kind;
      root.querySelectorAll("#q-kind button").forEach((x) => x.classList.toggle("on", x === b));
      $("#q-input", root).placeholder = kind === "text"
        ? "query text (models trained on a text dataset)"
        : "feature:value pairs, e.g. 0:1.0 2:0.5 5:0.25 — or paste a line of an XMC file";
    }));
    $("#q-run", root).addEventListener("click", () => run());

    async function timed(model, body) {
      const t0 = performance.now();
      const answer = await api(`/v1/models/${encodeURIComponent(model)}/predict`, { method: "POST", body });
      return { answer, ms: performance.now() - t0 };
    }

    async function run() {
      const out = $("#q-out", root);
      const model = getModel();
      if (!model) { out.innerHTML = `<div class="error">Pick a model first (a job with a snapshot).</div>`; return; }
      let instance, truth = [];
      try {
        if (kind === "text") instance = { text: $("#q-input", root).value };
        else ({ instance, truth } = parseFeatures($("#q-input", root).value));
      } catch (e) { out.innerHTML = `<div class="error">${esc(e.message)}</div>`; return; }
      const k = Number($("#q-k", root).value) || 5;
      const mode = $("#q-mode", root).value;
      out.innerHTML = `<div class="result-meta">asking…</div>`;
      try {
        const main = await timed(model, { instances: [instance], k, mode });
        const exact = mode === "exact" ? main : await timed(model, { instances: [instance], k, mode: "exact" });
        render(out, main, exact, mode, truth, k);
      } catch (e) {
        out.innerHTML = `<div class="error">${esc(e.status ? `HTTP ${e.status}: ` : "")}${esc(e.message)}</div>`;
      }
    }

    function render(out, main, exact, mode, truth, k) {
      const p = main.answer.predictions[0];
      const ex = exact.answer.predictions[0];
      const exactSet = new Set(ex.labels);
      const overlap = p.labels.filter((l) => exactSet.has(l)).length;
      const truthSet = new Set(truth);
      const rows = p.labels.map((label, i) => {
        const name = p.names && p.names[i] != null ? p.names[i] : null;
        return `<tr data-label="${label}">
          <td class="num">${i + 1}</td>
          <td><span class="${truthSet.has(label) ? "truth" : ""}">${esc(label)}</span></td>
          <td>${name == null ? '<span class="sub">–</span>' : esc(name)}</td>
          <td class="num mono">${Number(p.scores[i]).toFixed(4)}</td>
          <td>${exactSet.has(label) ? '<span class="hit">✓</span>' : ""}</td></tr>`;
      }).join("");
      const warnings = [...(main.answer.warnings || []), ...(p.note ? [p.note] : [])]
        .map((w) => `<div class="notice">${esc(w)}</div>`).join("");
      out.innerHTML = `
        <div class="result-meta" id="q-meta">
          <span>model version <b>v${esc(main.answer.model_version)}</b></span>
          <span>${esc(mode)}${main.answer.mode && main.answer.mode !== mode ? ` (answered ${esc(main.answer.mode)})` : ""} <b id="q-latency">${main.ms.toFixed(1)} ms</b></span>
          ${mode === "exact" ? "" : `<span>exact <b>${exact.ms.toFixed(1)} ms</b></span>
          <span>${esc(mode)} vs exact overlap <b id="q-overlap">${overlap} / ${ex.labels.length}</b></span>`}
          ${truth.length ? `<span>true labels found <b>${p.labels.filter((l) => truthSet.has(l)).length} / ${truth.length}</b></span>` : ""}
        </div>
        ${warnings}
        <table id="q-results"><thead><tr><th class="num">#</th><th>label</th><th>name</th><th class="num">score (logit)</th><th>in exact top-${esc(k)}</th></tr></thead>
        <tbody>${rows || `<tr><td colspan="5" class="empty">no labels came back</td></tr>`}</tbody></table>`;
    }
  }

  function boot(fn) {
    document.addEventListener("DOMContentLoaded", async () => {
      wireKeyDialog();
      try { await fn(); } catch (e) { showError(e); }
    });
  }
  function showError(e) {
    const box = $("#page-error");
    if (box) { box.hidden = false; box.textContent = e.status ? `HTTP ${e.status}: ${e.message}` : String(e.message || e); }
  }

  return { $, esc, short, num, pct, bytes, ago, badge, idCell, api, events, queryBox, parseFeatures, boot, showError, ApiError, loadSpec };
})();
