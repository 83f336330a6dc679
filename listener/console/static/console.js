// Live updates for the Zerfaux console. The pages read correctly without this script; it only
// keeps statuses, progress bars and run steps current from /feed (server-sent events, or a
// poll of /feed?once=1 where EventSource is missing or keeps failing).
(function () {
  "use strict";
  var WORDS = {ok: "OK", at_risk: "at risk", violated: "RPO violated", unknown: "unknown"};
  var lastRun = {};

  function duration(s) {
    if (s === null || s === undefined || s === "" || isNaN(s) || s < 0) return "—";
    s = Math.round(Number(s));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60 ? " " + String(s % 60).padStart(2, "0") + "s" : "");
    if (s < 86400) return Math.floor(s / 3600) + "h" + (s % 3600 ? " " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m" : "");
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }
  function size(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0, v = Number(n);
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? v.toFixed(0) + " B" : v.toFixed(1) + " " + units[i];
  }
  function each(selector, fn) { Array.prototype.forEach.call(document.querySelectorAll(selector), fn); }

  function showJob(cell, group) {
    var job = group.job, box = cell.querySelector(".job");
    if (!job) { if (box) box.remove(); return; }
    if (!box || box.getAttribute("data-job-id") !== job.id) {
      if (box) box.remove();
      box = document.createElement("div");
      box.className = "job";
      box.setAttribute("data-job-id", job.id);
      var bar = document.createElement("progress");
      bar.className = "replication";
      bar.setAttribute("data-job-id", job.id);
      bar.setAttribute("data-group-id", group.id);
      var text = document.createElement("span");
      text.className = "job-text";
      box.appendChild(bar); box.appendChild(text);
      var idle = cell.querySelector(".idle");
      if (idle) idle.remove();
      cell.insertBefore(box, cell.firstChild);
    }
    box.setAttribute("data-job-status", job.status);
    var progress = box.querySelector("progress"), label = box.querySelector(".job-text");
    if (job.estimated) {
      var pct = Math.max(0, Math.min(100, Math.floor(job.transferred * 100 / job.estimated)));
      progress.max = 100; progress.value = pct;
      progress.setAttribute("aria-label", "replication " + pct + "%");
      label.textContent = pct + "% · " + size(job.transferred) + " of " + size(job.estimated);
    } else {
      progress.removeAttribute("value");
      label.textContent = job.status + (job.transferred ? " · " + size(job.transferred) : "");
    }
    var rate = cell.querySelector(".rate"), eta = cell.querySelector(".eta");
    if (rate) rate.textContent = job.rate ? size(job.rate) + "/s" : "—";
    if (eta) eta.textContent = job.rate && job.estimated > job.transferred ?
      duration((job.estimated - job.transferred) / job.rate) : "—";
  }

  function refreshSteps(runBox) {
    var id = runBox.getAttribute("data-run-id");
    fetch("/runs/" + encodeURIComponent(id) + "?part=steps", {credentials: "same-origin", headers: {Accept: "text/html"}})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var old = document.getElementById("steps-section");
        var holder = document.createElement("div");
        holder.innerHTML = html;  // our own server's escaped fragment
        var fresh = holder.querySelector("#steps-section");
        if (old && fresh) {
          old.replaceWith(fresh);
          runBox.setAttribute("data-status", fresh.getAttribute("data-status"));
        }
      });
  }

  // The groups page shows one page of groups but counts every group's status: the feed tells
  // of every group the user may read when it connects, so once it has told of as many groups as
  // the page counted, the counts are recounted from the feed.
  var statusOf = {};
  function recount(group) {
    var summary = document.getElementById("summary");
    if (!summary) return;
    statusOf[group.id] = group.status;
    var ids = Object.keys(statusOf);
    if (ids.length < Number(summary.getAttribute("data-total"))) return;
    var n = {};
    ids.forEach(function (id) { n[statusOf[id]] = (n[statusOf[id]] || 0) + 1; });
    each("#summary [data-count-status]", function (el) {
      var s = el.getAttribute("data-count-status"), c = n[s] || 0;
      if (el.getAttribute("data-count") === String(c)) return;
      el.setAttribute("data-count", String(c));
      el.textContent = c + " " + (WORDS[s] || s);
    });
  }

  function apply(group) {
    recount(group);
    each('[data-group-id="' + group.id + '"].group', function (el) {
      el.setAttribute("data-status", group.status);
      el.setAttribute("data-paused", group.paused ? "true" : "false");
      each('[data-group-id="' + group.id + '"].group .status', function (s) {
        s.className = "status " + group.status;
        s.setAttribute("data-status", group.status);
        s.textContent = WORDS[group.status] || group.status;
      });
      var err = el.querySelector(".last-error");
      if (err) err.textContent = group.last_error || "";
      var rpo = el.querySelector(".rpo");
      if (rpo && group.rpo_seconds !== null && group.rpo_seconds !== undefined) {
        rpo.setAttribute("data-seconds", group.rpo_seconds);
        rpo.textContent = duration(group.rpo_seconds);
      }
    });
    each('.progress-cell[data-group-id="' + group.id + '"]', function (cell) { showJob(cell, group); });
    var runBox = document.querySelector('#run[data-group-id="' + group.id + '"]');
    var key = group.run ? group.run.id + "|" + group.run.status + "|" + group.run.steps : "";
    if (runBox && lastRun[group.id] !== undefined && lastRun[group.id] !== key) refreshSteps(runBox);
    lastRun[group.id] = key;
    document.body.setAttribute("data-feed-updated", String(Date.now()));
  }

  // A page whose sign-in ended must say so: figures that silently stop moving look current.
  function signedOut() {
    document.body.setAttribute("data-feed", "signed-out");
    if (document.getElementById("feed-signed-out")) return;
    var note = document.createElement("p");
    note.id = "feed-signed-out";
    note.className = "refusal";
    note.setAttribute("role", "alert");
    note.appendChild(document.createTextNode("Your sign-in has ended: this page is no longer updated. "));
    var link = document.createElement("a");
    link.href = "/login?why=expired";
    link.textContent = "Sign in again";
    note.appendChild(link);
    var main = document.querySelector("main");
    if (main) main.insertBefore(note, main.firstChild);
  }

  function poll() {
    fetch("/feed?once=1", {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (r) {
        if (r.status === 401) { signedOut(); return null; }
        return r.ok ? r.json() : {groups: []};
      })
      .then(function (body) {
        if (body === null) return;
        body.groups.forEach(apply);
        setTimeout(poll, 5000);
      })
      .catch(function () { setTimeout(poll, 5000); });
  }

  function connect() {
    if (!window.EventSource) { poll(); return; }
    var failures = 0, source = new EventSource("/feed");
    source.addEventListener("open", function () {
      failures = 0; document.body.setAttribute("data-feed", "live");
    });
    source.addEventListener("group", function (e) { apply(JSON.parse(e.data)); });
    source.addEventListener("error", function () {
      failures++;
      document.body.setAttribute("data-feed", "reconnecting");
      // A refused stream (401 once the token ended) is closed for good by the browser: poll,
      // which can read the status and say so, instead of waiting for reconnects that never come.
      if (failures > 5 || source.readyState === EventSource.CLOSED) {
        source.close(); document.body.setAttribute("data-feed", "polling"); poll();
      }
    });
  }

  // The RPO grows by itself between refreshes: count it up once a second.
  setInterval(function () {
    each(".rpo[data-seconds]", function (el) {
      var s = el.getAttribute("data-seconds");
      if (s === "") return;
      var next = Number(s) + 1;
      el.setAttribute("data-seconds", String(next));
      el.textContent = duration(next);
    });
  }, 1000);

  if (document.body.getAttribute("data-page") !== "login") connect();
})();
