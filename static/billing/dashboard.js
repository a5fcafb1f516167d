/* The cost dashboard's charts: Chart.js (static/vendor/chartjs) drawing the data the page embeds
 * with json_script (#dashboard-data). Tables are server-rendered beside each chart; this file
 * only reads JSON and never evaluates anything from it, so a strict CSP (script-src 'self')
 * is enough. When done it sets <body data-charts-ready="N"> (N charts drawn). */
(function () {
  "use strict";

  var PALETTE = ["#417690", "#79aec8", "#e0a458", "#5b8c5a", "#b56576", "#6d597a", "#3d5a80", "#c9a227",
                 "#98c1d9", "#8d99ae", "#ee6c4d", "#52796f", "#a26769", "#577590", "#f4a261"];

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name);
    return (value && value.trim()) || fallback;
  }

  function num(text) {
    return text === null || text === undefined ? null : parseFloat(text);
  }

  function usd(value) {
    if (value === null || value === undefined || isNaN(value)) { return "—"; }
    return value.toLocaleString("en-US", { minimumFractionDigits: value >= 1 ? 2 : 6,
                                           maximumFractionDigits: value >= 1 ? 2 : 6 });
  }

  function usdTick(value) {
    var v = Number(value);
    if (v === 0) { return "0"; }
    return Math.abs(v) >= 1 ? v.toLocaleString("en-US", { maximumFractionDigits: 2 }) : v.toPrecision(2);
  }

  function tooltipUsd(context) {
    var label = context.dataset.label ? context.dataset.label + ": " : "";
    var y = context.chart.options.indexAxis === "y" ? context.parsed.x : context.parsed.y;
    return label + usd(y) + " USD";
  }

  function draw(canvasId, config) {
    var canvas = document.getElementById(canvasId);
    if (!canvas) { return 0; }
    new window.Chart(canvas, config);
    return 1;
  }

  function barChart(canvasId, section, title) {
    if (!section || !section.labels.length) { return 0; }
    var values = section.cost.map(num);
    // As tall as its bars need: a few agents should not get a 300-pixel chart.
    var canvas = document.getElementById(canvasId);
    if (canvas && canvas.parentNode) {
      canvas.parentNode.style.height = Math.min(Math.max(56 + 34 * section.labels.length, 150), 420) + "px";
    }
    return draw(canvasId, {
      type: "bar",
      data: { labels: section.labels, datasets: [{ label: title, data: values, borderRadius: 3, maxBarThickness: 30,
        backgroundColor: section.labels.map(function (_, i) { return PALETTE[i % PALETTE.length]; }) }] },
      options: {
        indexAxis: "y",
        plugins: { legend: { display: false }, tooltip: { callbacks: { label: tooltipUsd } },
                   subtitle: { display: !!section.more, position: "bottom",
                               text: section.more ? "+" + section.more + " more in the table's CSV" : "" } },
        scales: { x: { beginAtZero: true, ticks: { callback: usdTick }, title: { display: true, text: "USD" } },
                  y: { ticks: { autoSkip: false } } }
      }
    });
  }

  function dailyChart(daily) {
    if (!daily) { return 0; }
    return draw("chart-daily", {
      type: "bar",
      data: {
        labels: daily.labels,
        datasets: [
          { type: "bar", label: "USD", data: daily.cost.map(num), backgroundColor: PALETTE[0], borderRadius: 2, maxBarThickness: 48,
            yAxisID: "y", order: 2 },
          { type: "line", label: "Requests", data: daily.requests, borderColor: PALETTE[2],
            backgroundColor: PALETTE[2], pointRadius: daily.labels.length > 45 ? 0 : 2, borderWidth: 2,
            tension: 0.25, yAxisID: "requests", order: 1 }
        ]
      },
      options: {
        interaction: { mode: "index", intersect: false },
        plugins: { tooltip: { callbacks: { label: function (c) {
          return c.dataset.yAxisID === "y" ? tooltipUsd(c) : "Requests: " + c.parsed.y.toLocaleString("en-US");
        } } } },
        scales: {
          x: { ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 10 } },
          y: { beginAtZero: true, position: "left", ticks: { callback: usdTick }, title: { display: true, text: "USD" } },
          requests: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false },
                      title: { display: true, text: "Requests" } }
        }
      }
    });
  }

  function burndownChart(b) {
    var limit = num(b.limit);
    var datasets = [
      { label: "Spent (cumulative)", data: b.cumulative.map(num), borderColor: PALETTE[0],
        backgroundColor: "rgba(65, 118, 144, 0.15)", fill: true, pointRadius: b.labels.length > 40 ? 0 : 2,
        borderWidth: 2, tension: 0 },
      { label: "Limit", data: b.labels.map(function () { return limit; }), borderColor: "#ba2121",
        borderDash: [6, 4], borderWidth: 1.5, pointRadius: 0, fill: false }
    ];
    if (b.projection) {
      datasets.splice(1, 0, { label: "Projection", data: b.projection.map(num), borderColor: PALETTE[2],
        borderDash: [3, 3], borderWidth: 1.5, pointRadius: 0, fill: false });
    }
    return draw(b.id, {
      type: "line",
      data: { labels: b.labels, datasets: datasets },
      options: {
        interaction: { mode: "index", intersect: false },
        plugins: { legend: { labels: { boxWidth: 14 } }, tooltip: { callbacks: { label: tooltipUsd } } },
        scales: { x: { ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 8 } },
                  y: { beginAtZero: true, ticks: { callback: usdTick } } }
      }
    });
  }

  function start() {
    var node = document.getElementById("dashboard-data");
    if (!node) { return; }
    if (!window.Chart) {
      document.body.setAttribute("data-charts-ready", "error: Chart.js did not load");
      return;
    }
    var data = JSON.parse(node.textContent);
    var Chart = window.Chart;
    Chart.defaults.color = cssVar("--body-quiet-color", "#666");
    Chart.defaults.borderColor = cssVar("--hairline-color", "#e8e8e8");
    Chart.defaults.font.family = cssVar("--font-family-primary", "sans-serif");
    Chart.defaults.animation = false;
    Chart.defaults.responsive = true;
    Chart.defaults.maintainAspectRatio = false;

    var drawn = 0;
    drawn += dailyChart(data.daily);
    drawn += barChart("chart-agents", data.agents, "USD");
    drawn += barChart("chart-models", data.models, "USD");
    drawn += barChart("chart-keys", data.keys, "USD");
    (data.burndowns || []).forEach(function (b) { drawn += burndownChart(b); });
    document.body.setAttribute("data-charts-ready", String(drawn));
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
