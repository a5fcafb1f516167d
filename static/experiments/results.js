/* An experiment's results charts: Chart.js (static/vendor/chartjs) drawing the data the page embeds
 * with json_script (#experiment-data). The tables beside them are server-rendered; this file only
 * reads JSON, so the page's strict CSP (script-src 'self') is enough. When done it sets
 * <body data-charts-ready="N"> (N charts drawn). */
(function () {
  "use strict";

  var PALETTE = ["#417690", "#e0a458", "#5b8c5a", "#b56576", "#6d597a", "#3d5a80", "#c9a227", "#98c1d9"];

  function num(value) {
    return value === null || value === undefined ? null : parseFloat(value);
  }

  function bar(id, labels, datasets, title) {
    var canvas = document.getElementById(id);
    if (!canvas || !labels.length) { return 0; }
    new window.Chart(canvas, {
      type: "bar",
      data: { labels: labels, datasets: datasets },
      options: { responsive: true, maintainAspectRatio: false, animation: false,
                 plugins: { title: { display: true, text: title }, legend: { display: datasets.length > 1 } },
                 scales: { y: { beginAtZero: true } } }
    });
    return 1;
  }

  function colours(labels) {
    return labels.map(function (_, i) { return PALETTE[i % PALETTE.length]; });
  }

  function start() {
    var node = document.getElementById("experiment-data");
    if (!node || !window.Chart) { return; }
    var data = JSON.parse(node.textContent);
    var labels = data.labels;
    var drawn = 0;
    drawn += bar("chart-error-rate", labels, [{ label: "Error rate", data: data.error_rate.map(num),
      backgroundColor: colours(labels) }], "Error rate");
    drawn += bar("chart-latency", labels, [
      { label: "p50 ms", data: data.latency_p50_ms.map(num), backgroundColor: "#79aec8" },
      { label: "p95 ms", data: data.latency_p95_ms.map(num), backgroundColor: "#417690" }], "Latency (ms)");
    drawn += bar("chart-cost", labels, [{ label: "USD per request", data: data.cost_per_request_usd.map(num),
      backgroundColor: colours(labels) }], "Cost per request (USD)");
    drawn += bar("chart-feedback", labels, [{ label: "Positive rate", data: data.positive_rate.map(num),
      backgroundColor: colours(labels) }], "Positive feedback rate");
    document.body.setAttribute("data-charts-ready", String(drawn));
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
