/* /ui/jobs/{id}: the job's live curves (over its Server-Sent Events stream), versions, controls and a query box. */
"use strict";

Slide.boot(async () => {
  const { $, esc, num, pct, ago, badge, api } = Slide;
  const jobId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  $("#job-id").textContent = jobId;
  document.title = `Job ${jobId.slice(0, 8)} · SLIDE console`;

  const FIELDS = ["step", "epoch", "samples", "loss", "p_at_1", "p_at_5", "samples_per_s", "active_fraction", "elapsed_s"];
  const series = Object.fromEntries(FIELDS.map((f) => [f, []]));
  let xField = "elapsed_s";
  let job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);

  const CHARTS = [
    { id: "chart-precision", title: "Precision on the held-out set", y: [["p_at_1", "P@1", "#3056d3"], ["p_at_5", "P@5", "#1f8a4c"]], yfmt: ".0%" },
    { id: "chart-loss", title: "Training loss", y: [["loss", "loss", "#c53030"]] },
    { id: "chart-throughput", title: "Throughput (samples/s)", y: [["samples_per_s", "samples/s", "#b7791f"]] },
    { id: "chart-active", title: "Active fraction of the output layer", y: [["active_fraction", "active", "#6b46c1"]], yfmt: ".2%" },
  ];
  const layout = (c) => ({
    title: { text: c.title, font: { size: 13 }, x: 0.02 },
    margin: { l: 52, r: 14, t: 34, b: 40 },
    xaxis: { title: { text: xField === "step" ? "step" : "training time (s)", font: { size: 11 } }, zeroline: false, gridcolor: "#eef0f4" },
    yaxis: { tickformat: c.yfmt || "", zeroline: false, gridcolor: "#eef0f4", rangemode: "tozero" },
    legend: { orientation: "h", y: 1.13, x: 1, xanchor: "right", font: { size: 11 } },
    paper_bgcolor: "#fff", plot_bgcolor: "#fff", font: { family: "system-ui, sans-serif", size: 11, color: "#1d2330" },
    uirevision: xField,
  });
  const traces = (c) => c.y.map(([field, name, color]) => {
    const xs = [], ys = [];
    series[field].forEach((v, i) => { if (v != null) { xs.push(series[xField][i]); ys.push(v); } });
    return { x: xs, y: ys, name, mode: "lines+markers", line: { color, width: 2 }, marker: { size: 4 }, type: "scatter" };
  });
  function draw() {
    for (const c of CHARTS) Plotly.react(c.id, traces(c), layout(c), { displayModeBar: false, responsive: true });
  }
  let pending = false;
  function schedule() {
    if (pending) return;
    pending = true;
    setTimeout(() => { pending = false; draw(); }, 250);
  }
  $("#x-axis").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-x]");
    if (!b) return;
    xField = b.dataset.x;
    document.querySelectorAll("#x-axis button").forEach((x) => x.classList.toggle("on", x === b));
    draw();
  });

  function paintJob() {
    $("#job-state").innerHTML = badge(job.state) + (job.state === "queued" && job.queue_position ? ` <span class="hint">#${job.queue_position} in the queue${job.queue_reason ? ": " + esc(job.queue_reason) : ""}</span>` : "");
    $("#btn-stop").disabled = !["queued", "running", "interrupted"].includes(job.state);
    $("#btn-resume").disabled = !["stopped", "failed", "interrupted"].includes(job.state);
    $("#job-sub").innerHTML = `training set ${Slide.idCell(job.train_dataset_id)}${job.eval_dataset_id ? ` · held-out set ${Slide.idCell(job.eval_dataset_id)}` : " · no held-out set (no P@k)"} · created ${ago(job.created_at)}${job.error ? `<div class="error">${esc(job.error)}</div>` : ""}`;
    const p = job.progress, m = job.latest_metrics || {};
    const stat = (k, v, id) => `<div class="stat"><div class="k">${k}</div><div class="v" id="${id}">${v}</div></div>`;
    $("#stats").innerHTML = [
      stat("epoch", `${num(p.epoch)} / ${num(p.epochs)}`, "s-epoch"),
      stat("step", num(p.step), "s-step"),
      stat("samples/s", num(p.samples_per_s), "s-rate"),
      stat("P@1", pct(m.p_at_1), "s-p1"),
      stat("P@5", pct(m.p_at_5), "s-p5"),
      stat("loss", m.loss == null ? "–" : Number(m.loss).toFixed(3), "s-loss"),
      stat("model", job.model_version == null ? "–" : "v" + job.model_version, "s-model"),
      stat("memory (estimate)", job.estimated_memory_bytes == null ? "–" : Slide.bytes(job.estimated_memory_bytes), "s-memory"),
    ].join("");
    // one row per setting, by its path (sampling.hash_l): the groups are objects
    const settings = Object.entries(job.config).flatMap(([k, v]) =>
      v !== null && typeof v === "object" && !Array.isArray(v)
        ? Object.entries(v).map(([f, x]) => [`${k}.${f}`, x]) : [[k, v]]);
    $("#config").innerHTML = settings
      .map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${esc(JSON.stringify(v))}</dd></div>`).join("");
  }

  async function refreshVersions() {
    let model;
    try { model = await api(`/v1/models/${encodeURIComponent(jobId)}`); } catch (e) { return; }
    const rows = model.versions.slice().reverse();
    $("#versions").innerHTML = rows.length
      ? `<table><thead><tr><th class="num">version</th><th class="num">step</th><th class="num">epoch</th><th>published</th><th>on disk</th></tr></thead>
        <tbody>${rows.map((v) => `<tr><td class="num"><b>v${v.version}</b></td><td class="num">${num(v.step)}</td><td class="num">${num(v.epoch)}</td>
          <td>${ago(v.created_at)}</td><td>${v.available ? '<span class="hit">✓</span>' : '<span class="hint">pruned</span>'}</td></tr>`).join("")}</tbody></table>`
      : `<div class="empty">No snapshot yet: the first comes within SLIDE_SNAPSHOT_INTERVAL_S of training.</div>`;
  }

  for (const [id, act] of [["#btn-stop", "stop"], ["#btn-resume", "resume"]]) {
    $(id).addEventListener("click", async () => {
      try { job = await api(`/v1/jobs/${encodeURIComponent(jobId)}/${act}`, { method: "POST" }); paintJob(); }
      catch (e) { Slide.showError(e); }
      if (act === "resume") follow();
    });
  }

  let stop = null;
  function follow() {
    if (stop) stop();
    FIELDS.forEach((f) => { series[f].length = 0; });
    $("#stream-state").textContent = "live";
    stop = Slide.events(`/v1/jobs/${encodeURIComponent(jobId)}/events`, (type, data) => {
      if (type === "metrics") {
        FIELDS.forEach((f) => series[f].push(data[f] ?? null));
        job.latest_metrics = data;
        schedule();
        paintJob();
      } else if (type === "progress") {
        Object.assign(job.progress, { step: data.step, epoch: data.epoch, samples: data.samples, samples_per_s: data.samples_per_s });
        if (data.model_version !== job.model_version) { job.model_version = data.model_version; refreshVersions(); }
        paintJob();
      } else if (type === "state") {
        job.state = data.state;
        job.error = data.error;
        paintJob();
      } else if (type === "end") {
        $("#stream-state").textContent = `stream ended: ${data.state}`;
        api(`/v1/jobs/${encodeURIComponent(jobId)}`).then((j) => { job = j; paintJob(); refreshVersions(); });
      } else if (type === "error") {
        $("#stream-state").textContent = "no stream";
        Slide.showError(new Slide.ApiError(data.status || 0, data));
      }
    });
  }

  // ---- labels: a page of the newest version's labels, add one from examples, retire one --------------------
  const PAGE = 20;
  const labelsPath = `/v1/models/${encodeURIComponent(jobId)}/labels`;
  let cursors = [null];  // the cursor of each page shown so far (null: the first)
  let nextCursor = null;
  /** The cursor of a page that starts at label `id` (the list's cursor names the last id seen). */
  const fromId = (id) => (id > 0 ? btoa(JSON.stringify([id - 1])).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "") : null);
  const say = (html, kind = "notice") => { $("#labels-out").innerHTML = html ? `<div class="${kind}">${html}</div>` : ""; };

  async function refreshLabels() {
    const cursor = cursors[cursors.length - 1];
    let page;
    try {
      page = await api(`${labelsPath}?limit=${PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    } catch (e) {
      $("#labels").innerHTML = `<div class="empty">${esc(e.message)}</div>`;
      return;
    }
    nextCursor = page.next_cursor;
    $("#labels").innerHTML = page.data.length
      ? `<table><thead><tr><th class="num">id</th><th>name</th><th>status</th><th></th></tr></thead>
        <tbody>${page.data.map((l) => `<tr data-label-id="${l.id}" data-status="${esc(l.status)}"><td class="num">${l.id}</td>
          <td>${l.name == null ? '<span class="hint">no name</span>' : esc(l.name)}</td>
          <td>${l.status === "live" ? '<span class="badge completed">live</span>' : '<span class="badge failed">retired</span>'}</td>
          <td><button type="button" class="danger" data-retire="${l.id}" ${l.status === "live" ? "" : "disabled"}>Retire</button></td></tr>`).join("")}</tbody></table>`
      : `<div class="empty">No labels from here.</div>`;
    $("#labels-info").textContent = `version v${page.model_version}`;
    $("#labels-prev").disabled = cursors.length < 2;
    $("#labels-first").disabled = cursors.length < 2 && !cursors[0];
    $("#labels-next").disabled = !nextCursor;
  }

  $("#labels-next").addEventListener("click", () => { if (nextCursor) { cursors.push(nextCursor); refreshLabels(); } });
  $("#labels-prev").addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); refreshLabels(); } });
  $("#labels-first").addEventListener("click", () => { cursors = [null]; refreshLabels(); });
  $("#labels-go").addEventListener("click", () => { cursors = [fromId(Math.max(0, Number($("#labels-from").value) || 0))]; refreshLabels(); });

  $("#labels").addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-retire]");
    if (!b) return;
    const id = Number(b.dataset.retire);
    b.disabled = true;
    try {
      const done = (await api(`${labelsPath}/${id}`, { method: "DELETE" })) === null;  // 204 (null), else 202
      say(done ? `Label ${id} is retired: never predicted again.` : `Label ${id} goes to the training job: retired at its next step.`);
    } catch (err) { say(esc(err.message), "error"); }
    await refreshLabels();
  });

  /** A line of features ("3:1.0 17 25:0.5") or, when the line is not one, text. */
  function example(line) {
    if (/^(\d+(:[-+]?[\d.]+(e[-+]?\d+)?)?\s*)+$/i.test(line)) return Slide.parseFeatures(line).instance;
    return { text: line };
  }

  $("#la-add").addEventListener("click", async () => {
    const name = $("#la-name").value.trim();
    let examples;
    try { examples = $("#la-examples").value.split("\n").map((x) => x.trim()).filter(Boolean).map(example); }
    catch (e) { say(esc(e.message), "error"); return; }
    try {
      const r = await api(labelsPath, { method: "POST", body: { labels: [{ name, examples }] } });
      if (r.state === "pending") {
        say(`Label <b>${esc(name)}</b> goes to the training job: added at its next step.`);
      } else {
        const id = r.label_ids[0];
        say(`Label <b>${esc(name)}</b> is id ${id}, served from version v${r.model_version}.`);
        cursors = [fromId(id)];
        $("#la-name").value = "";
      }
    } catch (e) { say(esc(e.message), "error"); }
    await refreshLabels();
  });

  paintJob();
  draw();
  await refreshVersions();
  await refreshLabels();
  await Slide.queryBox($("#query"), () => jobId);
  follow();
  setInterval(() => { refreshVersions(); refreshLabels(); }, 10000);
});
