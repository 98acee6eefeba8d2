/* radfed dashboard: metric curves over rounds as inline SVG (no chart library). */
"use strict";

(function () {
  const W = 880;
  const H = 330;
  const M = { left: 56, right: 18, top: 14, bottom: 42 };
  const MAX_MARKED_ROUNDS = 60; // beyond this, lines without a marker per point
  const PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1",
    "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#8cd17d",
  ];
  const POOLED = "ALL";
  const POOLED_COLOUR = "#14213d";

  /** A stable colour per site: the palette, then hues spaced by the golden angle. */
  RF.colour = function (name, index) {
    if (name === POOLED) return POOLED_COLOUR;
    if (index < PALETTE.length) return PALETTE[index];
    const hue = Math.round((index * 137.508) % 360);
    return "hsl(" + hue + ", 55%, 45%)";
  };

  /** About `count` round numbers spanning [low, high]. */
  function ticks(low, high, count) {
    if (!(high > low)) return [low];
    const raw = (high - low) / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(low / step - 1e-9) * step; v <= high + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  function decimals(values) {
    const span = Math.max(...values) - Math.min(...values);
    if (span === 0) return 2;
    return Math.max(0, Math.min(4, 1 - Math.floor(Math.log10(span / 4))));
  }

  /**
   * Draw `series` ({name, colour, points: [[round, value|null], ...]}) into `box`.
   * Hidden series are left out; a null value breaks the line.
   */
  RF.plot = function (box, series, options) {
    const opts = options || {};
    RF.clear(box);
    const shown = series.filter((s) => !s.hidden);
    const points = shown.flatMap((s) => s.points.filter((p) => p[1] !== null));
    const svg = RF.svg("svg", {
      viewBox: "0 0 " + W + " " + H,
      role: "img",
      "aria-label": (opts.metric || "metric") + " over rounds",
      class: "curves",
    });
    box.append(svg);
    if (points.length === 0) {
      const text = RF.svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "no-data" });
      text.textContent = opts.empty || "No values for this split and metric yet.";
      svg.append(text);
      return svg;
    }
    const rounds = points.map((p) => p[0]);
    const values = points.map((p) => p[1]);
    let x0 = Math.min(...rounds);
    let x1 = Math.max(...rounds);
    if (x0 === x1) {
      x0 -= 0.5;
      x1 += 0.5;
    }
    let y0 = Math.min(...values);
    let y1 = Math.max(...values);
    const pad = (y1 - y0) * 0.08 || Math.max(Math.abs(y0) * 0.05, 0.05);
    y0 -= pad;
    y1 += pad;
    if (Math.min(...values) >= 0 && y0 < 0) y0 = 0; // rates and scores never go below 0
    if (Math.max(...values) <= 1 && y1 > 1 && Math.min(...values) >= 0) y1 = 1;
    const px = (x) => M.left + ((x - x0) / (x1 - x0)) * (W - M.left - M.right);
    const py = (y) => H - M.bottom - ((y - y0) / (y1 - y0)) * (H - M.top - M.bottom);

    const axis = RF.svg("g", { class: "axis" });
    svg.append(axis);
    const digits = decimals(values);
    for (const v of ticks(y0, y1, 5)) {
      axis.append(
        RF.svg("line", { class: "grid-line", x1: M.left, x2: W - M.right, y1: py(v), y2: py(v) }),
      );
      const label = RF.svg("text", { x: M.left - 8, y: py(v) + 4, "text-anchor": "end" });
      label.textContent = RF.num(v, digits);
      axis.append(label);
    }
    const xTicks = ticks(Math.ceil(x0), Math.floor(x1), Math.min(10, Math.floor(x1) - Math.ceil(x0) + 1))
      .filter((v) => Number.isInteger(v));
    for (const v of xTicks) {
      axis.append(RF.svg("line", { x1: px(v), x2: px(v), y1: H - M.bottom, y2: H - M.bottom + 5 }));
      const label = RF.svg("text", { x: px(v), y: H - M.bottom + 18, "text-anchor": "middle" });
      label.textContent = String(v);
      axis.append(label);
    }
    axis.append(
      RF.svg("line", { x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }),
      RF.svg("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom }),
    );
    const xLabel = RF.svg("text", { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" });
    xLabel.textContent = "round";
    const yLabel = RF.svg("text", {
      x: 14,
      y: (M.top + H - M.bottom) / 2,
      "text-anchor": "middle",
      class: "axis-label",
      transform: "rotate(-90 14 " + (M.top + H - M.bottom) / 2 + ")",
    });
    yLabel.textContent = opts.metric || "";
    svg.append(xLabel, yLabel);

    // the pool last, so that it is drawn on top
    const ordered = shown.filter((s) => s.name !== POOLED).concat(shown.filter((s) => s.name === POOLED));
    for (const s of ordered) {
      const group = RF.svg("g", { class: "series-group", "data-site": s.name });
      let d = "";
      let pen = false;
      for (const [round, value] of s.points) {
        if (value === null) {
          pen = false;
          continue;
        }
        d += (pen ? "L" : "M") + px(round).toFixed(1) + " " + py(value).toFixed(1);
        pen = true;
      }
      const pooled = s.name === POOLED;
      const path = RF.svg("path", { d: d, stroke: s.colour, class: "series" + (pooled ? " pooled" : "") });
      const title = RF.svg("title", {});
      title.textContent = pooled ? "ALL (pooled over sites)" : s.name;
      path.append(title);
      group.append(path);
      if (s.points.length <= MAX_MARKED_ROUNDS) {
        for (const [round, value] of s.points) {
          if (value === null) continue;
          const dot = RF.svg("circle", {
            cx: px(round).toFixed(1),
            cy: py(value).toFixed(1),
            r: pooled ? 4 : 3,
            fill: s.colour,
            class: "point",
          });
          const tip = RF.svg("title", {});
          tip.textContent = s.name + " · round " + round + " · " + (opts.metric || "") + " " + RF.num(value);
          dot.append(tip);
          group.append(dot);
        }
      }
      svg.append(group);
    }
    return svg;
  };

  /** Fade every series but `name` (null: show all alike). */
  RF.focusSeries = function (box, name) {
    const svg = box.querySelector("svg");
    if (!svg) return;
    const groups = [...svg.querySelectorAll(".series-group")];
    const shown = groups.some((group) => group.dataset.site === name);
    svg.classList.toggle("focusing", name !== null && shown); // a hidden site fades nothing
    for (const group of groups) group.classList.toggle("focus", group.dataset.site === name);
  };
})();
