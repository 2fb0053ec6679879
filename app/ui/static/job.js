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
    $("#config").innerHTML = Object.entries(job.config)
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

  paintJob();
  draw();
  await refreshVersions();
  await Slide.queryBox($("#query"), () => jobId);
  follow();
  setInterval(refreshVersions, 10000);
});
