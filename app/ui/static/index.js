/* /ui: datasets, jobs (with stop / resume / start), models and aliases, and a query box. Polls the API. */
"use strict";

Slide.boot(async () => {
  const { $, esc, num, pct, bytes, ago, badge, idCell, api } = Slide;
  let datasets = [];
  let models = [];

  /** What kind of set it is: text (with its featurizer) or XMC, labels named or not, a `like` set's origin. */
  function labelNames(d) {
    const bits = [];
    if (d.format === "jsonl") bits.push("text");
    if (d.label_names) bits.push("named labels");
    if (d.like_dataset_id) bits.push(`featurized like ${esc(d.like_dataset_id.slice(0, 8))}`);
    if (d.unknown_labels) bits.push(`${num(d.unknown_labels)} unknown label names dropped`);
    return bits.length ? `<div class="bar-label">${bits.join(" · ")}</div>` : "";
  }

  function paintDatasets() {
    const box = $("#datasets");
    if (!datasets.length) { box.innerHTML = `<div class="empty">No datasets yet.</div>`; return; }
    box.innerHTML = `<table><thead><tr><th>name</th><th>id</th><th class="num">points</th><th class="num">features</th>
      <th class="num">labels</th><th class="num">labels / point</th><th class="num">features / point</th><th class="num">size</th><th>uploaded</th></tr></thead>
      <tbody>${datasets.map((d) => `<tr data-id="${esc(d.id)}">
        <td><b>${esc(d.name)}</b>${labelNames(d)}</td><td>${idCell(d.id)}</td>
        <td class="num">${num(d.num_points)}</td><td class="num">${num(d.num_features)}</td><td class="num">${num(d.num_labels)}</td>
        <td class="num">${num(d.avg_labels_per_point, 2)}</td><td class="num">${num(d.avg_features_per_point, 1)}</td>
        <td class="num">${bytes(d.bytes)}</td><td>${ago(d.created_at)}</td></tr>`).join("")}</tbody></table>`;
    const options = datasets.map((d) => `<option value="${esc(d.id)}">${esc(d.name)} · ${num(d.num_points)} points</option>`).join("");
    for (const [id, blank] of [["#nj-train", ""], ["#nj-eval", `<option value="">none</option>`]]) {
      const sel = $(id);
      const keep = sel.value;
      sel.innerHTML = blank + options;
      if (keep) sel.value = keep;
    }
  }

  function progressCell(j) {
    const p = j.progress;
    const frac = p.epochs ? Math.min(1, p.epoch / p.epochs) : 0;
    return `<div class="bar"><i style="width:${(100 * frac).toFixed(1)}%"></i></div>
      <div class="bar-label">epoch ${num(p.epoch)} / ${num(p.epochs)} · step ${num(p.step)}</div>`;
  }

  function actions(j) {
    const canStop = ["queued", "running", "interrupted"].includes(j.state);
    const canResume = ["stopped", "failed", "interrupted"].includes(j.state);
    return `<div class="actions">
      <a class="btn" href="/ui/jobs/${esc(j.id)}">Open</a>
      <button type="button" data-act="stop" data-id="${esc(j.id)}" ${canStop ? "" : "disabled"}>Stop</button>
      <button type="button" data-act="resume" data-id="${esc(j.id)}" ${canResume ? "" : "disabled"}>Resume</button></div>`;
  }

  async function refreshJobs() {
    const jobs = (await api("/v1/jobs")).data;
    const byId = Object.fromEntries(datasets.map((d) => [d.id, d.name]));
    const box = $("#jobs");
    if (!jobs.length) {
      box.innerHTML = `<div class="empty">No jobs yet: start one below.</div>`;
    } else {
      box.innerHTML = `<table><thead><tr><th>job</th><th>state</th><th>progress</th><th class="num">samples/s</th>
        <th class="num">P@1</th><th class="num">model</th><th></th></tr></thead><tbody>${jobs.map((j) => {
          const queue = j.state === "queued" && j.queue_position
            ? `<div class="bar-label" title="${esc(j.queue_reason || "")}">#${j.queue_position} in the queue${j.queue_reason ? ": " + esc(j.queue_reason) : ""}</div>` : "";
          const err = j.error ? `<div class="bar-label" title="${esc(j.error)}" style="color:var(--bad)">${esc(j.error.slice(0, 80))}</div>` : "";
          return `<tr data-id="${esc(j.id)}" data-state="${esc(j.state)}">
            <td><a href="/ui/jobs/${esc(j.id)}">${idCell(j.id)}</a><div class="bar-label">on ${esc(byId[j.train_dataset_id] || j.train_dataset_id.slice(0, 8))} · ${ago(j.created_at)}</div></td>
            <td>${badge(j.state)}${queue}${err}</td>
            <td>${progressCell(j)}</td>
            <td class="num">${num(j.progress.samples_per_s)}</td>
            <td class="num">${pct(j.latest_metrics && j.latest_metrics.p_at_1)}</td>
            <td class="num">${j.model_version == null ? "–" : "v" + j.model_version}</td>
            <td>${actions(j)}</td></tr>`;
        }).join("")}</tbody></table>`;
    }
    $("#jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    return jobs;
  }

  async function refreshModels() {
    models = (await api("/v1/models")).data;
    const box = $("#models");
    if (!models.length) { box.innerHTML = `<div class="empty">No models yet: every job becomes one.</div>`; }
    else {
      box.innerHTML = `<table><thead><tr><th>model</th><th>state</th><th class="num">labels</th><th class="num">newest</th><th class="num">versions kept</th></tr></thead>
        <tbody>${models.map((m) => `<tr data-id="${esc(m.id)}"><td><a href="/ui/jobs/${esc(m.id)}">${idCell(m.id)}</a></td>
          <td>${m.ready ? '<span class="badge completed">ready</span>' : '<span class="badge">no snapshot</span>'} ${badge(m.job_state)}</td>
          <td class="num">${num(m.num_labels)}</td><td class="num">${m.latest_version == null ? "–" : "v" + m.latest_version}</td>
          <td class="num">${m.versions.filter((v) => v.available).length}</td></tr>`).join("")}</tbody></table>`;
    }
    const sel = $("#q-model");
    const keep = sel.value;
    const ready = models.filter((m) => m.ready);
    sel.innerHTML = ready.length
      ? ready.map((m) => `<option value="${esc(m.id)}">model ${esc(m.id.slice(0, 8))} · v${m.latest_version} · ${m.job_state}</option>`).join("")
      : `<option value="">no model with a snapshot yet</option>`;
    if (keep && ready.some((m) => m.id === keep)) sel.value = keep;
  }

  async function refreshAliases() {
    // Aliases exist on services that have them (GET /v1/aliases); elsewhere the section stays empty.
    const spec = await Slide.loadSpec();
    if (!spec.paths["/v1/aliases"]) return;
    const aliases = (await api("/v1/aliases")).data || [];
    $("#aliases").innerHTML = `<h2 style="margin:16px 0 8px">Aliases</h2>` + (aliases.length
      ? `<table><thead><tr><th>alias</th><th>model</th><th class="num">pinned</th><th class="num">answers with</th></tr></thead><tbody>${aliases.map((a) => `<tr><td><b>${esc(a.alias)}</b></td><td><a href="/ui/jobs/${esc(a.model_id)}">${idCell(a.model_id)}</a></td><td class="num">${a.version == null ? "newest" : "v" + a.version}</td><td class="num">${a.model_version == null ? "–" : "v" + a.model_version}</td></tr>`).join("")}</tbody></table>`
      : `<div class="empty">No aliases.</div>`);
  }

  $("#jobs").addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-act]");
    if (!b) return;
    b.disabled = true;
    try { await api(`/v1/jobs/${b.dataset.id}/${b.dataset.act}`, { method: "POST" }); }
    catch (err) { Slide.showError(err); }
    await refreshJobs();
  });

  $("#nj-start").addEventListener("click", async () => {
    const out = $("#nj-out");
    out.innerHTML = "";
    let config = {};
    try { config = $("#nj-config").value.trim() ? JSON.parse($("#nj-config").value) : {}; }
    catch (e) { out.innerHTML = `<div class="error">config is not JSON: ${esc(e.message)}</div>`; return; }
    // settings are grouped (config.schedule.epochs); a flat "epochs" is the previous release's name for it
    const epochs = Number($("#nj-epochs").value) || (config.schedule || {}).epochs || config.epochs;
    delete config.epochs;
    if (epochs) config.schedule = { ...(config.schedule || {}), epochs };
    const body = { train_dataset_id: $("#nj-train").value, config };
    if ($("#nj-eval").value) body.eval_dataset_id = $("#nj-eval").value;
    try {
      const job = await api("/v1/jobs", { method: "POST", body });
      out.innerHTML = `<div class="notice">Job <a href="/ui/jobs/${esc(job.id)}">${esc(job.id)}</a> is ${esc(job.state)}.</div>`
        + (job.deprecations || []).map((d) => `<div class="notice">${esc(d)}</div>`).join("");
      await refreshJobs();
    } catch (e) { out.innerHTML = `<div class="error">${esc(e.message)}</div>`; }
  });

  datasets = (await api("/v1/datasets")).data;
  paintDatasets();
  await refreshJobs();
  await refreshModels();
  await Slide.queryBox($("#query"), () => $("#q-model").value || null);
  refreshAliases().catch(() => {});

  let tick = 0;
  setInterval(async () => {
    try {
      tick++;
      if (tick % 5 === 0) { datasets = (await api("/v1/datasets")).data; paintDatasets(); }
      await refreshJobs();
      await refreshModels();
    } catch (e) { Slide.showError(e); }
  }, 2000);
});
