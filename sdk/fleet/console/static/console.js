/* edgeship console: confirmation of actions and live refresh by polling.
 * The server renders every page; live refresh re-fetches the same URL with
 * X-Console-Partial: 1 and swaps the <main> element's content, so pages and
 * their live updates come from one template. Polling (not SSE) keeps the
 * server stateless and works through any proxy.
 */
(function () {
  "use strict";
  var main, timer = null, busy = false, pending = null;

  function confirmThen(form) {
    var dlg = document.getElementById("confirm-dialog");
    var msg = form.getAttribute("data-confirm");
    if (!dlg || typeof dlg.showModal !== "function") {
      if (window.confirm(msg)) form.submit();
      return;
    }
    pending = form;
    document.getElementById("confirm-text").textContent = msg;
    dlg.returnValue = "";
    dlg.showModal();
  }

  function onSubmit(ev) {
    var form = ev.target;
    if (!form || !form.hasAttribute || !form.hasAttribute("data-confirm")) return;
    if (form.getAttribute("data-confirmed") === "1") return;
    ev.preventDefault();
    confirmThen(form);
  }

  function dialogClosed() {
    var dlg = document.getElementById("confirm-dialog");
    var form = pending;
    pending = null;
    if (form && dlg.returnValue === "ok") {
      form.setAttribute("data-confirmed", "1");
      // requestSubmit keeps the submit event path; the mark above lets it through.
      if (form.requestSubmit) form.requestSubmit(); else form.submit();
    }
  }

  function setLive(state) {
    var dot = document.getElementById("live");
    if (dot) dot.className = "live " + state;
  }

  function refresh() {
    var dlg = document.getElementById("confirm-dialog");
    if (busy || (dlg && dlg.open) || document.hidden) return;
    // Do not replace a form the user is typing into.
    var active = document.activeElement;
    if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA/.test(active.tagName)) return;
    busy = true;
    var ctrl = new AbortController();
    var t = setTimeout(function () { ctrl.abort(); }, 10000);
    fetch(window.location.href, {headers: {"X-Console-Partial": "1"}, credentials: "same-origin", signal: ctrl.signal})
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("logged out"); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        main.innerHTML = html;
        window.EdgeChart && window.EdgeChart.renderAll(main);
        main.setAttribute("data-updated", String(Date.now()));
        setLive("ok");
      })
      .catch(function () { setLive("stale"); })
      .then(function () { clearTimeout(t); busy = false; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    main = document.getElementById("main");
    document.addEventListener("submit", onSubmit, true);
    var dlg = document.getElementById("confirm-dialog");
    if (dlg) dlg.addEventListener("close", dialogClosed);
    window.EdgeChart && window.EdgeChart.renderAll(document);
    var every = main ? parseFloat(main.getAttribute("data-refresh") || "0") : 0;
    if (every > 0) { timer = setInterval(refresh, every * 1000); setLive("ok"); }
  });
})();
