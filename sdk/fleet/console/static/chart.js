/* edgeship console charts: a few dozen lines of SVG, shipped with the package.
 * No CDN and no build step: the console must work on a workstation or a
 * device with no internet. Two kinds:
 *   {type: "line", series: [{name, points: [[t_seconds, value], ...]}], threshold, percent}
 *   {type: "bars", bars: [{label, value, cls}], threshold}
 * Values of null are gaps. Colours come from console.css (classes s0..s5).
 */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) { if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]); }
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, cls, anchor) {
    var t = el("text", {x: x, y: y, "class": cls || "lbl", "text-anchor": anchor || "start"}, parent);
    t.textContent = s;
    return t;
  }
  function fmt(v, percent) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    if (percent) return (100 * v).toFixed(Math.abs(v) < 0.1 ? 1 : 0) + "%";
    var a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e4) return String(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(1);
    return v.toPrecision(2);
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }
  function clock(t) {
    var d = new Date(t * 1000);
    return ("0" + d.getUTCHours()).slice(-2) + ":" + ("0" + d.getUTCMinutes()).slice(-2) + ":" + ("0" + d.getUTCSeconds()).slice(-2);
  }

  function line(host, spec) {
    var W = host.clientWidth || 420, H = host.clientHeight || 180, L = 44, R = 10, T = 10, B = 24;
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "chart-svg", role: "img"});
    var xs = [], ys = [];
    (spec.series || []).forEach(function (s) {
      (s.points || []).forEach(function (p) { if (p[1] !== null) { xs.push(p[0]); ys.push(p[1]); } });
    });
    if (spec.threshold !== null && spec.threshold !== undefined) ys.push(spec.threshold);
    if (!xs.length) { text(svg, W / 2, H / 2, "no data yet", "empty", "middle"); host.appendChild(svg); return; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    var ymax = niceMax(Math.max.apply(null, ys.concat([0])))
    if (spec.percent && !(Math.max.apply(null, ys.concat([0])) > 0)) ymax = 0.01;  // all zero: 0-1 %, not 0-100 %
    var sx = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    var sy = function (y) { return H - B - y / ymax * (H - T - B); };
    for (var i = 0; i <= 4; i++) {
      var yv = ymax * i / 4, yy = sy(yv);
      el("line", {x1: L, x2: W - R, y1: yy, y2: yy, "class": "gridline"}, svg);
      text(svg, L - 4, yy + 4, fmt(yv, spec.percent), "lbl", "end");
    }
    text(svg, L, H - 6, clock(x0), "lbl", "start");
    text(svg, W - R, H - 6, clock(x1), "lbl", "end");
    if (spec.threshold !== null && spec.threshold !== undefined) {
      var ty = sy(spec.threshold);
      el("line", {x1: L, x2: W - R, y1: ty, y2: ty, "class": "threshold"}, svg);
      text(svg, W - R - 2, ty - 3, "threshold " + fmt(spec.threshold, spec.percent), "lbl thr", "end");
    }
    (spec.series || []).forEach(function (s, k) {
      var d = "", pen = false;
      (s.points || []).forEach(function (p) {
        if (p[1] === null) { pen = false; return; }
        d += (pen ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1);
        pen = true;
      });
      var cls = s.cls || ("s" + (k % 6));
      var path = el("path", {d: d, "class": "series " + cls}, svg);
      var t = document.createElementNS(NS, "title"); t.textContent = s.name; path.appendChild(t);
      (s.points || []).forEach(function (p) {
        if (p[1] === null) return;
        var c = el("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.2, "class": "pt " + cls}, svg);
        var tt = document.createElementNS(NS, "title"); tt.textContent = s.name + " " + clock(p[0]) + ": " + fmt(p[1], spec.percent); c.appendChild(tt);
      });
    });
    host.appendChild(svg);
    if ((spec.series || []).length > 1) legend(host, spec.series.map(function (s, k) { return {label: s.name, cls: s.cls || ("s" + (k % 6))}; }));
  }

  function bars(host, spec) {
    var items = spec.bars || [];
    var W = host.clientWidth || 320, H = host.clientHeight || 160, L = 44, R = 10, T = 12, B = 24;
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: W, height: H, "class": "chart-svg", role: "img"});
    var vals = items.map(function (b) { return b.value; }).filter(function (v) { return v !== null && isFinite(v); });
    if (spec.threshold !== null && spec.threshold !== undefined) vals.push(spec.threshold);
    if (!items.length) { text(svg, W / 2, H / 2, "no data yet", "empty", "middle"); host.appendChild(svg); return; }
    var ymax = niceMax(Math.max.apply(null, vals.concat([0])));
    if (spec.percent && !(Math.max.apply(null, vals.concat([0])) > 0)) ymax = 0.01;
    var sy = function (y) { return H - B - y / ymax * (H - T - B); };
    for (var i = 0; i <= 4; i++) {
      var yv = ymax * i / 4, yy = sy(yv);
      el("line", {x1: L, x2: W - R, y1: yy, y2: yy, "class": "gridline"}, svg);
      text(svg, L - 4, yy + 4, fmt(yv, spec.percent), "lbl", "end");
    }
    var slot = (W - L - R) / items.length, bw = Math.min(60, slot * 0.6);
    items.forEach(function (b, k) {
      var x = L + slot * k + (slot - bw) / 2;
      if (b.value !== null && isFinite(b.value)) {
        var y = sy(b.value);
        var r = el("rect", {x: x.toFixed(1), y: y.toFixed(1), width: bw.toFixed(1), height: Math.max(0, H - B - y).toFixed(1),
                            "class": "bar " + (b.cls || "s" + (k % 6))}, svg);
        var t = document.createElementNS(NS, "title"); t.textContent = b.label + ": " + fmt(b.value, spec.percent); r.appendChild(t);
        text(svg, x + bw / 2, y - 3, fmt(b.value, spec.percent), "lbl val", "middle");
      } else {
        text(svg, x + bw / 2, H - B - 4, "–", "lbl", "middle");
      }
      text(svg, x + bw / 2, H - 8, b.label, "lbl", "middle");
    });
    if (spec.threshold !== null && spec.threshold !== undefined) {
      var ty = sy(spec.threshold);
      el("line", {x1: L, x2: W - R, y1: ty, y2: ty, "class": "threshold"}, svg);
      text(svg, W - R - 2, ty - 3, "threshold " + fmt(spec.threshold, spec.percent), "lbl thr", "end");
    }
    host.appendChild(svg);
  }

  function legend(host, entries) {
    var div = document.createElement("div");
    div.className = "legend";
    entries.forEach(function (e) {
      var sp = document.createElement("span");
      sp.className = "key " + e.cls;
      sp.textContent = e.label;
      div.appendChild(sp);
    });
    host.appendChild(div);
  }

  function render(host) {
    var spec;
    try { spec = JSON.parse(host.getAttribute("data-chart")); } catch (e) { return; }
    while (host.firstChild) host.removeChild(host.firstChild);
    if (spec.type === "bars") bars(host, spec); else line(host, spec);
    host.setAttribute("data-rendered", "1");
  }

  window.EdgeChart = {
    render: render,
    renderAll: function (root) {
      (root || document).querySelectorAll("[data-chart]").forEach(render);
    }
  };
})();
