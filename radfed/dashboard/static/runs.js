/* radfed dashboard: the runs page, refreshed every few seconds. */
"use strict";

(function () {
  const REFRESH_MS = 3000;

  function pooledCell(run) {
    const p = run.pooled;
    if (!p || p.value === null || p.value === undefined) {
      return RF.el("td", { className: "muted", text: p ? p.metric + ": not available" : "–" });
    }
    return RF.el(
      "td",
      { className: "nowrap" },
      RF.el("strong", { text: p.metric + " " + RF.num(p.value) }),
      RF.el("div", { className: "muted small", text: p.split + " · round " + p.round + " · n " + RF.count(p.n) }),
    );
  }

  function verdictCell(counts) {
    const td = RF.el("td", { className: "verdict-cell" });
    if (!counts || Object.keys(counts).length === 0) {
      td.append(RF.el("span", { className: "muted", text: "no report yet" }));
      return td;
    }
    const f = counts.flagged || 0;
    const i = counts.inconclusive || 0;
    const w = counts["within margin"] || 0;
    td.append(
      RF.badge(f + " flagged", f ? "flagged" : "muted"),
      " ",
      RF.badge(i + " inconclusive", i ? "inconclusive" : "muted"),
      " ",
      RF.badge(w + " within margin", w ? "within margin" : "muted"),
    );
    return td;
  }

  function row(run) {
    const planned = run.rounds_planned || 0;
    const rounds = RF.el(
      "td",
      { className: "nowrap" },
      RF.el("span", { text: run.rounds_done + " / " + planned + " " }),
      RF.el("progress", { max: Math.max(planned, 1), value: Math.min(run.rounds_done, planned) }),
    );
    const status = RF.el("td", { title: run.status_reason || null }, RF.badge(run.status));
    return RF.el(
      "tr",
      { "data-run-id": run.id },
      RF.el(
        "td",
        {},
        RF.el("a", { href: RF.runHref(run.id), className: "run-link", text: run.name }),
        RF.el("div", {
          className: "muted small run-meta",
          title: "run id " + run.id,
          text: run.task + " · " + run.strategy,
        }),
      ),
      status,
      rounds,
      RF.el("td", { className: "num", text: run.sites }),
      pooledCell(run),
      verdictCell(run.verdicts),
      RF.el("td", { className: "nowrap", text: RF.time(run.started_at) }),
    );
  }

  async function refresh() {
    try {
      const runs = await RF.getJson("/api/runs");
      const body = RF.clear(document.querySelector("#runs tbody"));
      if (runs.length === 0) {
        body.append(
          RF.el("tr", {}, RF.el("td", { colspan: 7, className: "empty", text: "No runs in this store yet." })),
        );
      }
      for (const run of runs) body.append(row(run));
      const running = runs.filter((r) => r.status === "running").length;
      RF.setText(
        "runs-count",
        runs.length + (runs.length === 1 ? " run" : " runs") + (running ? ", " + running + " running" : ""),
      );
      RF.problem("");
      RF.live("updated " + RF.time(new Date().toISOString(), true), true);
    } catch (error) {
      RF.problem("Could not load the runs: " + error.message);
      RF.live("not updating", false);
    }
    window.setTimeout(refresh, REFRESH_MS);
  }

  RF.forgetToken();
  refresh();
})();
