/* radfed dashboard: one run, refreshed every few seconds while it runs. */
"use strict";

(function () {
  const REFRESH_MS = 3000;
  const RETRY_MS = 6000;
  const EVENT_BATCH = 500;
  const MAX_EVENT_ROWS = 2000;
  const SPLIT_ORDER = ["test", "val", "train"];
  const POOLED = "ALL";
  const VERDICT_ORDER = { flagged: 0, inconclusive: 1 };

  const runId = RF.pageRunId();
  const state = {
    detail: null,
    split: null,
    metric: null,
    hidden: new Set(),
    lastSeq: -1,
    curves: null, // {key, data} of a metric other than the headline
    gapFilter: "all",
    drawnKey: null,
    colours: new Map(),
  };

  /* ---------------------------------------------------------------- head */

  function renderHead(d) {
    document.title = d.name + " · radfed";
    RF.setText("bar-name", d.name);
    RF.setText("run-name", d.name);
    const status = RF.byId("run-status");
    status.className = "badge " + RF.slug(d.status);
    status.textContent = d.status;
    RF.setText("run-reason", d.status_reason || "");
    RF.setText("rounds-done", d.rounds_done);
    RF.setText("rounds-planned", d.rounds_planned);
    const bar = RF.byId("rounds-progress");
    bar.max = Math.max(d.rounds_planned, 1);
    bar.value = Math.min(d.rounds_done, d.rounds_planned);
    const pooled = pooledHeadline(d);
    RF.setText("run-pooled", pooled);
    const facts = [
      ["Run id", d.id],
      ["Task", d.task],
      ["Strategy", d.strategy],
      ["Headline metric", d.headline],
      ["Bias margin", d.config && d.config["bias-margin"] !== undefined ? "±" + d.config["bias-margin"] : "–"],
      ["Seed", d.config && d.config.seed !== undefined ? d.config.seed : "–"],
      ["Started", RF.time(d.started_at)],
      ["Ended", d.ended_at ? RF.time(d.ended_at) : d.status === "running" ? "still running" : "–"],
      ["radfed", d.radfed_version || "–"],
      ["Folder", d.folder],
    ];
    const box = RF.clear(RF.byId("run-facts"));
    for (const [label, value] of facts) {
      const wide = label === "Run id" || label === "Folder";
      box.append(RF.el("div", { className: wide ? "wide" : null }, RF.el("dt", { text: label }), RF.el("dd", { text: value })));
    }
  }

  function pooledHeadline(d) {
    for (const split of SPLIT_ORDER) {
      const rows = (d.latest || {})[split] || [];
      const pooled = rows.find((r) => r.site === POOLED);
      if (pooled && !pooled.suppressed && RF.own(pooled.metrics, d.headline) !== undefined) {
        return "pooled " + d.headline + " " + RF.num(RF.own(pooled.metrics, d.headline)) + " (" + split + ", round " + d.latest_round + ")";
      }
    }
    return "";
  }

  /* ---------------------------------------------------------------- bias */

  function renderBias(d) {
    const report = d.report;
    const margin = d.config && d.config["bias-margin"] !== undefined ? d.config["bias-margin"] : null;
    const marginText = margin === null ? "the margin" : "the margin ±" + margin;
    const box = RF.clear(RF.byId("verdicts"));
    const link = RF.byId("report-link");
    link.classList.toggle("hidden", !(report && report.has_html));
    link.href = "/runs/" + encodeURIComponent(d.id) + "/report";
    RF.byId("report-missing").classList.toggle("hidden", Boolean(report && report.has_html));
    if (!report) {
      RF.setText("bias-round", "");
      RF.setText("verdict-text", "No bias report yet: the first is written once the sites have answered the survey of round 0.");
      renderGaps([], d);
      return;
    }
    RF.setText("bias-round", "round " + report.round + (report.round === 0 ? " (before training)" : ""));
    const c = report.counts || {};
    const f = c.flagged || 0;
    const i = c.inconclusive || 0;
    const w = c["within margin"] || 0;
    const chip = (count, label, kind) =>
      RF.el("div", { className: "verdict " + kind }, RF.el("span", { className: "count", text: count }), RF.el("span", { text: label }));
    box.append(
      chip(f, "flagged", "flagged"),
      chip(i, "inconclusive (too few cases)", "inconclusive"),
      chip(w, "within " + marginText.replace("the ", ""), "within-margin"),
    );
    if (report.in_sample_warnings) {
      box.append(chip(report.in_sample_warnings, "in-sample warnings (training cases, not counted)", "warning"));
    }
    const words = [];
    if (f) words.push(f + (f === 1 ? " gap exceeds " : " gaps exceed ") + marginText + " beyond chance.");
    if (i) {
      words.push(
        (f ? "" : "No gap is flagged, but ") + i + (i === 1 ? " comparison is" : " comparisons are") +
          " inconclusive: too few cases to tell, which is not evidence of no gap.",
      );
    }
    if (!f && !i && w) words.push("Every comparison (" + w + ") lies within " + marginText + ".");
    if (!f && !i && !w) words.push("No comparison has a verdict yet: nothing can be said about gaps.");
    RF.setText("verdict-text", words.join(" "));
    renderGaps(report.gaps || [], d);
  }

  function side(gap, key) {
    const s = gap[key];
    if (!s) return "–";
    return s.group + " " + RF.num(s.value) + " (n " + RF.count(s.n) + ")";
  }

  function groupsCell(gap) {
    const rest = gap.comparison === "one vs rest";
    return RF.el(
      "td",
      { title: gap.comparison, className: "nowrap" },
      RF.el("div", { text: side(gap, rest ? "group" : "worst") }),
      RF.el("div", { className: "muted", text: "vs " + side(gap, rest ? "rest" : "best") }),
    );
  }

  function noteCell(gap) {
    const td = RF.el("td", {});
    const a = gap.attribution || {};
    if (a.confounded_with_site) td.append(RF.badge("confounded with site", "confounded"), " ");
    if (gap.verdict === "flagged" && a.heterogeneous && Array.isArray(a.drivers) && a.drivers.length) {
      td.append(RF.el("span", { text: "driven by " + a.drivers.join(", ") + " " }));
    }
    if (gap.cases_needed && typeof gap.cases_needed === "object") {
      const need = Object.entries(gap.cases_needed).map(([g, n]) => g + " " + n).join(", ");
      td.append(RF.el("span", { className: "muted", text: "resolved at about " + need }));
    }
    return td;
  }

  function sortedGaps(gaps) {
    return gaps.slice().sort((a, b) => {
      const va = RF.own(VERDICT_ORDER, a.verdict) ?? 2;
      const vb = RF.own(VERDICT_ORDER, b.verdict) ?? 2;
      if (va !== vb) return va - vb;
      const da = Math.abs((a.difference || {}).value || 0);
      const db = Math.abs((b.difference || {}).value || 0);
      return db - da;
    });
  }

  function renderGapFilter(gaps) {
    const box = RF.clear(RF.byId("gap-filter"));
    box.classList.toggle("hidden", gaps.length === 0);
    const count = (v) => gaps.filter((g) => g.verdict === v).length;
    const confounded = gaps.filter((g) => (g.attribution || {}).confounded_with_site).length;
    const options = [
      ["all", "Flagged and inconclusive (" + gaps.length + ")"],
      ["flagged", "Flagged (" + count("flagged") + ")"],
      ["inconclusive", "Inconclusive (" + count("inconclusive") + ")"],
    ];
    for (const [key, label] of options) {
      const button = RF.el("button", { type: "button", "aria-pressed": String(state.gapFilter === key), text: label });
      button.addEventListener("click", () => {
        state.gapFilter = key;
        renderGaps(gaps, state.detail);
      });
      box.append(button);
    }
    if (confounded) {
      box.append(RF.el("span", { className: "muted small", text: confounded + " confounded with site: they compare sites, not groups, and are never flagged." }));
    }
  }

  function renderGaps(gaps, d) {
    renderGapFilter(gaps);
    const body = RF.clear(document.querySelector("#gaps tbody"));
    const shown = sortedGaps(gaps).filter((g) => state.gapFilter === "all" || g.verdict === state.gapFilter);
    RF.byId("gaps-box").classList.toggle("hidden", gaps.length === 0);
    for (const gap of shown) {
      body.append(
        RF.el(
          "tr",
          { className: RF.slug(gap.verdict), title: gap.reason || null },
          RF.el("td", {}, RF.badge(gap.verdict)),
          RF.el("td", { text: gap.split }),
          RF.el("td", { className: gap.site === POOLED ? "strong nowrap" : "nowrap", text: gap.site === POOLED ? "ALL (pooled)" : gap.site }),
          RF.el("td", { text: gap.attribute }),
          RF.el("td", { text: gap.metric }),
          groupsCell(gap),
          RF.el("td", { className: "num", text: RF.interval(gap.difference) }),
          noteCell(gap),
        ),
      );
    }
    if (gaps.length && !shown.length) {
      body.append(RF.el("tr", {}, RF.el("td", { colspan: 8, className: "empty", text: "None." })));
    }
  }

  /* ---------------------------------------------------------------- curves */

  function splitsOf(d) {
    const present = new Set([...Object.keys(d.latest || {}), ...Object.keys(d.curves || {})]);
    return SPLIT_ORDER.filter((s) => present.has(s)).concat([...present].filter((s) => !SPLIT_ORDER.includes(s)).sort());
  }

  function metricsOf(d, split) {
    const names = [];
    for (const row of (d.latest || {})[split] || []) {
      for (const name of Object.keys(row.metrics || {})) if (!names.includes(name)) names.push(name);
    }
    const rest = names.filter((n) => n !== d.headline);
    return [d.headline].concat(rest);
  }

  function fillSelect(select, values, current) {
    const have = [...select.options].map((o) => o.value);
    if (have.join("\n") !== values.join("\n")) {
      RF.clear(select);
      for (const v of values) select.append(RF.el("option", { value: v, text: v }));
    }
    select.value = current;
  }

  function renderSelectors(d) {
    const splits = splitsOf(d);
    if (!splits.includes(state.split)) state.split = splits[0] || null;
    const metrics = state.split ? metricsOf(d, state.split) : [d.headline];
    if (!metrics.includes(state.metric)) state.metric = d.headline;
    fillSelect(RF.byId("split"), splits, state.split);
    fillSelect(RF.byId("metric"), metrics, state.metric);
  }

  function colourOf(name) {
    if (!state.colours.has(name)) {
      const sites = [...state.colours.keys()].filter((n) => n !== POOLED).length;
      state.colours.set(name, RF.colour(name, name === POOLED ? 0 : sites));
    }
    return state.colours.get(name);
  }

  function siteNames(d, bySite) {
    const names = new Set((d.sites || []).map((s) => s.name));
    for (const name of Object.keys(bySite)) names.add(name);
    names.delete(POOLED);
    return [...names].sort().concat([POOLED]);
  }

  async function curvesFor(d) {
    if (!state.split) return {};
    if (state.metric === d.headline) return RF.own(d.curves || {}, state.split) || {};
    const key = [state.split, state.metric, d.latest_round, d.updated_at].join("\n");
    if (!state.curves || state.curves.key !== key) {
      const url = RF.apiRun(d.id) + "/curves?split=" + encodeURIComponent(state.split) + "&metric=" + encodeURIComponent(state.metric);
      const data = await RF.getJson(url);
      state.curves = { key: key, data: data.curves || {} };
    }
    return state.curves.data;
  }

  async function renderCurves(d, force) {
    const key = [state.split, state.metric, d.latest_round, d.updated_at, [...state.hidden].join(",")].join("\n");
    if (!force && key === state.drawnKey) return;
    const bySite = await curvesFor(d);
    state.drawnKey = key;
    const names = siteNames(d, bySite);
    const series = names.map((name) => ({
      name: name,
      colour: colourOf(name),
      points: RF.own(bySite, name) || [],
      hidden: state.hidden.has(name),
    }));
    const chart = RF.byId("chart");
    RF.plot(chart, series, {
      metric: state.metric + " (" + state.split + ")",
      empty: state.split ? "No " + state.metric + " values on " + state.split + " yet." : "No metrics yet: the first round has not been evaluated.",
    });
    renderLegend(series);
  }

  function renderLegend(series) {
    const legend = RF.clear(RF.byId("legend"));
    for (const s of series) {
      const swatch = RF.svg("svg", { viewBox: "0 0 28 14", "aria-hidden": "true" });
      swatch.append(RF.svg("line", { x1: 1, y1: 7, x2: 27, y2: 7, stroke: s.colour, "stroke-width": s.name === POOLED ? 4 : 3 }));
      swatch.append(RF.svg("circle", { cx: 14, cy: 7, r: 3.5, fill: s.colour }));
      const data = s.points.filter((p) => p[1] !== null);
      const label = s.name === POOLED ? "ALL (pooled)" : s.name;
      const button = RF.el(
        "button",
        {
          type: "button",
          className: s.hidden ? "off" : null,
          "aria-pressed": String(!s.hidden),
          title: data.length ? label + ": click to show or hide" : label + ": no values (suppressed or not evaluated)",
          "data-site": s.name,
        },
        swatch,
        RF.el("span", { text: label }),
      );
      button.addEventListener("click", () => {
        if (state.hidden.has(s.name)) state.hidden.delete(s.name);
        else state.hidden.add(s.name);
        renderCurves(state.detail, true).catch(showError);
      });
      button.addEventListener("mouseenter", () => RF.focusSeries(RF.byId("chart"), s.name));
      button.addEventListener("mouseleave", () => RF.focusSeries(RF.byId("chart"), null));
      legend.append(button);
    }
    const tools = RF.clear(RF.byId("legend-tools"));
    const tool = (label, hide) => {
      const button = RF.el("button", { type: "button", text: label });
      button.addEventListener("click", () => {
        state.hidden = new Set(series.map((s) => s.name).filter(hide));
        renderCurves(state.detail, true).catch(showError);
      });
      return button;
    };
    tools.append(
      RF.el("span", { className: "muted small", text: "Sites (" + (series.length - 1) + " + pool):" }),
      tool("Show all", () => false),
      tool("Pool only", (n) => n !== POOLED),
      tool("Sites only", (n) => n === POOLED),
    );
  }

  /* ---------------------------------------------------------------- tables */

  function renderLatest(d) {
    const rows = ((d.latest || {})[state.split] || []).slice();
    rows.sort((a, b) => (a.site === POOLED) - (b.site === POOLED) || a.site.localeCompare(b.site));
    const metrics = state.split ? metricsOf(d, state.split) : [];
    RF.setText("latest-caption", d.latest_round === null ? "no round evaluated yet" : "round " + d.latest_round + ", " + state.split + " split");
    const head = RF.clear(document.querySelector("#latest thead tr"));
    head.append(RF.el("th", { text: "Site" }), RF.el("th", { className: "num", text: "n" }));
    for (const m of metrics) head.append(RF.el("th", { className: "num", text: m }));
    const body = RF.clear(document.querySelector("#latest tbody"));
    if (!rows.length) {
      body.append(RF.el("tr", {}, RF.el("td", { colspan: metrics.length + 2, className: "empty", text: "No results yet." })));
    }
    for (const row of rows) {
      const pooled = row.site === POOLED;
      const tr = RF.el("tr", { className: pooled ? "pooled" : null, "data-site": row.site });
      tr.append(RF.el("td", { className: "nowrap", text: pooled ? "ALL (pooled)" : row.site }));
      if (row.suppressed) {
        tr.append(
          RF.el("td", { className: "num suppressed", text: "suppressed" }),
          RF.el("td", {
            colspan: Math.max(metrics.length, 1),
            className: "suppressed",
            text: "fewer cases than the minimum cell size: nothing but the flag left the site",
          }),
        );
      } else {
        tr.append(RF.el("td", { className: "num", text: RF.count(row.n) }));
        for (const m of metrics) tr.append(RF.el("td", { className: "num", text: RF.num(RF.own(row.metrics, m)) }));
      }
      body.append(tr);
    }
  }

  /** Sites that need a look first: failed, refused, late, waiting, then the rest by name. */
  const STATE_ORDER = { failed: 0, refused: 1, late: 2, waiting: 3, expected: 4 };

  function renderSites(d) {
    const sites = (d.sites || []).slice().sort(
      (a, b) => (RF.own(STATE_ORDER, a.state) ?? 9) - (RF.own(STATE_ORDER, b.state) ?? 9) || a.name.localeCompare(b.name),
    );
    const counts = {};
    for (const s of sites) counts[s.state] = (counts[s.state] || 0) + 1;
    RF.setText("sites-caption", sites.length + " sites: " + Object.entries(counts).map(([k, n]) => n + " " + k).join(", "));
    const body = RF.clear(document.querySelector("#sites tbody"));
    if (!sites.length) body.append(RF.el("tr", {}, RF.el("td", { colspan: 7, className: "empty", text: "No site seen yet." })));
    for (const s of sites) {
      const refusals = Object.entries(s.refusals || {}).map(([code, n]) => n + "× code " + code).join(", ");
      body.append(
        RF.el(
          "tr",
          { "data-site": s.name },
          RF.el("td", { text: s.name }),
          RF.el("td", {}, RF.badge(s.state)),
          RF.el("td", { className: s.reason ? null : "muted", text: s.reason || "–" }),
          RF.el("td", { className: "num", text: s.replies }),
          RF.el("td", { className: "num", text: s.failures }),
          RF.el("td", { text: refusals || "–" }),
          RF.el("td", { className: "nowrap", text: RF.time(s.last_seen, true) }),
        ),
      );
    }
    const rounds = d.rounds || [];
    const last = rounds[rounds.length - 1];
    if (last) {
      const dropped = Object.entries(last.dropped || {}).map(([site, why]) => site + " (" + why + ")").join(", ");
      RF.setText(
        "round-line",
        "Latest phase: round " + last.round + " " + last.phase + ", " + (last.ended_at ? last.replied + " of " + last.asked + " sites replied" : "asked of " + last.asked + " sites, in progress") + (dropped ? "; dropped: " + dropped : ""),
      );
    }
  }

  /* ---------------------------------------------------------------- events */

  async function loadEvents() {
    const events = await RF.getJson(RF.apiRun(runId) + "/events?after=" + state.lastSeq + "&limit=" + EVENT_BATCH);
    if (!events.length) return;
    const box = RF.byId("events-box");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const body = document.querySelector("#events tbody");
    if (state.lastSeq >= 0 && events.length === EVENT_BATCH) {
      body.append(RF.el("tr", {}, RF.el("td", { colspan: 5, className: "empty", text: "… earlier events left out (reload the page to see the newest " + EVENT_BATCH + ")" })));
    }
    for (const e of events) {
      const level = String(e.level || "info").toLowerCase();
      body.append(
        RF.el(
          "tr",
          { className: "ev-" + RF.slug(level), "data-seq": e.seq },
          RF.el("td", { className: "time", text: RF.time(e.at, true) }),
          RF.el("td", { className: "num", text: e.round === null ? "" : e.round }),
          RF.el("td", { className: "level" }, RF.badge(level)),
          RF.el("td", { text: e.site || "" }),
          RF.el("td", { className: "message", text: e.message }),
        ),
      );
      state.lastSeq = Math.max(state.lastSeq, e.seq);
    }
    while (body.rows.length > MAX_EVENT_ROWS) body.deleteRow(0);
    RF.setText("events-caption", "newest last, " + body.rows.length + " shown");
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  /* ---------------------------------------------------------------- loop */

  function showError(error) {
    if (error && error.status === 404) {
      RF.problem("This run is no longer in the store.");
    } else {
      RF.problem("Could not update the page: " + (error && error.message ? error.message : error));
    }
    RF.live("not updating", false);
  }

  async function refresh() {
    let next = REFRESH_MS;
    try {
      const d = await RF.getJson(RF.apiRun(runId));
      const changed = !state.detail || state.detail.updated_at !== d.updated_at;
      state.detail = d;
      if (changed) {
        renderHead(d);
        renderBias(d);
        renderSelectors(d);
        renderLatest(d);
        renderSites(d);
      }
      await renderCurves(d, false);
      await loadEvents();
      RF.problem("");
      if (d.status === "running") {
        RF.live("live · updated " + RF.time(new Date().toISOString(), true), true);
      } else {
        RF.live("run " + d.status + ": the page no longer updates", false);
        next = null;
      }
    } catch (error) {
      showError(error);
      next = error && error.status === 404 ? null : RETRY_MS;
    }
    if (next !== null) window.setTimeout(refresh, next);
  }

  function onSelect() {
    state.split = RF.byId("split").value;
    state.metric = RF.byId("metric").value;
    renderSelectors(state.detail);
    renderLatest(state.detail);
    renderCurves(state.detail, true).catch(showError);
  }

  RF.forgetToken();
  RF.byId("split").addEventListener("change", onSelect);
  RF.byId("metric").addEventListener("change", onSelect);
  refresh();
})();
