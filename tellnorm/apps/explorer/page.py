"""Page code of the explorer (CSS and JavaScript), kept as text here and written to ``assets/`` by site.py."""

CSS = r"""
:root { --bg:#f6f7f9; --card:#fff; --border:#e3e6ea; --text:#1f2328; --muted:#667085; --accent:#d9480f;
  --green:#2f9e44; --red:#e03131; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--text); font-family:Inter,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  font-size:14px; line-height:1.45; }
.tn-top { display:flex; align-items:center; gap:20px; padding:10px 22px; background:#fff; border-bottom:1px solid var(--border);
  position:sticky; top:0; z-index:5; }
.tn-brand { font-weight:700; color:var(--text); text-decoration:none; }
.tn-top nav a { color:var(--muted); text-decoration:none; margin-right:14px; padding:4px 8px; border-radius:6px; }
.tn-top nav a.tn-on { background:#fff4e6; color:var(--accent); font-weight:600; }
.tn-meta { color:var(--muted); font-size:12.5px; margin-left:auto; }
main { padding:18px 22px 60px; }
.tn-controls { display:flex; flex-wrap:wrap; gap:10px; align-items:center; margin-bottom:12px; }
.tn-controls input, .tn-controls select { padding:6px 9px; border:1px solid var(--border); border-radius:6px; font:inherit; }
.tn-controls input[type=search] { width:280px; }
.tn-count { color:var(--muted); font-size:12.5px; }
table.tn-table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--border); font-size:13px; }
.tn-table th { position:sticky; top:45px; background:#f8f9fa; text-align:left; padding:6px 8px; border-bottom:1px solid var(--border);
  cursor:pointer; user-select:none; white-space:nowrap; font-weight:600; }
.tn-table th.tn-sorted { color:var(--accent); }
.tn-table td { padding:4px 8px; border-bottom:1px solid #f1f3f5; font-variant-numeric:tabular-nums; }
.tn-table td.tn-num { text-align:right; }
.tn-table tbody tr { cursor:pointer; }
.tn-table tbody tr:hover { background:#fff4e6; }
.tn-chip { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; white-space:pre; border-radius:3px;
  padding:0 4px; background:#f1f3f5; margin-right:3px; font-size:12px; }
.tn-more { margin:10px 0; padding:6px 12px; border:1px solid var(--border); background:#fff; border-radius:6px; cursor:pointer; }
.tn-card { background:#fff; border:1px solid var(--border); border-radius:10px; margin:0 0 18px; padding:14px 18px; }
.tn-card h2 { margin:0 0 6px; font-size:18px; }
.tn-card h3 { font-size:12px; text-transform:uppercase; letter-spacing:.05em; color:var(--muted); margin:0 0 8px; }
.tn-badges { display:flex; flex-wrap:wrap; gap:6px; margin:6px 0; }
.tn-badge { border:1px solid var(--border); background:#f8f9fa; border-radius:999px; padding:2px 10px; font-size:12.5px; }
.tn-badge b { font-variant-numeric:tabular-nums; }
.tn-grid { display:grid; grid-template-columns:minmax(0,1.5fr) minmax(320px,1fr); gap:18px; }
.tn-ex { display:grid; grid-template-columns:80px minmax(0,1fr); gap:10px; padding:5px 0; border-bottom:1px dashed #eef0f2; }
.tn-ex-val { text-align:right; font-weight:600; color:var(--accent); font-variant-numeric:tabular-nums; }
.tn-ex-loc { display:block; color:var(--muted); font-size:11px; font-weight:400; }
.tn-ctx, .tn-strip { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; line-height:1.95; }
.tn-tok { white-space:pre; border-radius:3px; padding:1px 1px; margin:0 1px; cursor:default; }
.tn-tok:hover { outline:1px solid #868e96; }
.tn-ctx .tn-tok, .tn-strip .tn-tok { display:inline-block; }
.tn-tok-max { box-shadow:inset 0 -2px 0 var(--accent); font-weight:700; }
.tn-tok-na { color:#adb5bd; }
.tn-tok-prompt { opacity:.55; }
.tn-peak { outline:2px solid #c92a2a; font-weight:700; }
.tn-ws { color:#868e96; }
.tn-plot { width:100%; height:220px; }
.tn-logits { display:grid; grid-template-columns:1fr 1fr; gap:16px; }
.tn-logits table { width:100%; border-collapse:collapse; font-size:12.5px; }
.tn-logits td { padding:2px 4px; border-bottom:1px solid #f1f3f5; }
.tn-up th { color:var(--green); text-align:left; } .tn-down th { color:var(--red); text-align:left; }
.tn-resp { background:#fff; border:1px solid var(--border); border-radius:8px; padding:8px 12px; margin:0 0 10px; }
.tn-resp-head { color:var(--muted); font-size:12.5px; margin-bottom:4px; }
.tn-resp-head b { color:var(--text); }
.tn-legend { color:var(--muted); font-size:12.5px; margin:0 0 12px; max-width:1000px; }
.tn-tech-legend { color:var(--text); background:#fff; border:1px solid var(--border); border-radius:8px; padding:8px 12px; }
.tn-swatches { display:flex; flex-wrap:wrap; gap:6px 18px; margin-top:6px; }
.tn-sw { white-space:nowrap; }
.tn-sw .tn-tok { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; display:inline-block; }
.tn-tech { margin:6px 0 0; padding:2px 0 0 10px; border-left:3px solid #dee2e6; }
.tn-tech-alrr { border-left-color:#e8590c; } .tn-tech-erss { border-left-color:#2b8a3e; } .tn-tech-suppression { border-left-color:#7048e8; }
.tn-tech-head { color:var(--muted); font-size:12px; }
.tn-tech-head b { color:var(--text); }
.tn-tech .tn-strip { line-height:1.8; }
.tn-m-kept { background:#e8590c; color:#fff; font-weight:700; }
.tn-m-tried { box-shadow:inset 0 0 0 2px #e8590c; background:#fff4e6; }
.tn-m-injected { background:#2b8a3e; color:#fff; font-weight:700; }
.tn-m-scaled { background:#7048e8; color:#fff; font-weight:700; }
.tn-diff { text-decoration:underline dotted #495057; text-underline-offset:3px; }
.tn-empty { color:var(--muted); font-style:italic; }
.tn-error { color:var(--red); }
@media (max-width:900px) { .tn-grid { grid-template-columns:1fr; } }
"""

JS = r"""
(function () {
  "use strict";
  var store = {}, waiting = {}, app = document.getElementById("tn-app");
  var META = null;
  var state = {layer: "all", q: "", sort: "reason_score", desc: true, shown: 200, normLayer: null, techRows: "all"};
  var COLS = [
    ["layer", "layer", 0], ["id", "feature", 0], ["density", "density", 1], ["mean", "mean act", 1],
    ["delta", "Δ", 1], ["relative_delta", "relative Δ", 1], ["reason_score", "ReasonScore", 1],
    ["corr", "r(act, ‖h‖)", 1], ["top_tokens", "top input tokens", 0]];

  window.tnData = function (name, doc) {
    store[name] = doc;
    var cbs = waiting[name] || [];
    delete waiting[name];
    cbs.forEach(function (cb) { cb(doc); });
    if (name === "meta") { META = doc; start(); }
  };
  function load(names, cb) {
    var left = names.length, out = {};
    if (!left) { cb(out); return; }
    names.forEach(function (n) {
      function got(doc) { out[n] = doc; if (--left === 0) cb(out); }
      if (store[n]) { got(store[n]); return; }
      if (waiting[n]) { waiting[n].push(got); return; }
      waiting[n] = [got];
      var s = document.createElement("script");
      s.src = "data/" + n + ".js";
      s.onerror = function () { app.innerHTML = '<p class="tn-error">cannot load data/' + esc(n) + '.js</p>'; };
      document.head.appendChild(s);
    });
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]; });
  }
  function tokHtml(t) {
    if (t === "" || t === null || t === undefined) return '<span class="tn-ws">∅</span>';
    var out = "";
    for (var i = 0; i < t.length; i++) {
      var c = t[i];
      if (c === "\n") out += '<span class="tn-ws">↵</span>';
      else if (c === "\t") out += '<span class="tn-ws">→</span>';
      else if (c === " " && t.trim() === "") out += '<span class="tn-ws">␣</span>';
      else out += esc(c);
    }
    return out;
  }
  function fmt(v, d) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "—";
    if (typeof v !== "number") return esc(v);
    d = d || 3;
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(d - 1);
    return Number(v.toPrecision(d)).toString();
  }
  function layers() { return META.layers.map(function (l) { return l.layer; }); }

  function start() {
    document.getElementById("tn-meta").textContent = META.model + " · " + META.layers.length + " layers · " +
      META.n_sequences + " responses · " + META.n_tokens.toLocaleString() + " tokens";
    var total = META.layers.reduce(function (a, l) { return a + l.d_sae; }, 0);
    if (total > 50000) state.layer = String(META.layers[0].layer);
    window.addEventListener("hashchange", route);
    route();
  }
  function route() {
    var h = location.hash.replace(/^#\/?/, "").split("/");
    document.querySelectorAll(".tn-top nav a").forEach(function (a) {
      a.classList.toggle("tn-on", a.getAttribute("data-route") === (h[0] === "norms" ? "norms" : "index")); });
    if (h[0] === "feature" && h.length >= 3) featurePage(parseInt(h[1], 10), parseInt(h[2], 10));
    else if (h[0] === "norms") normView(h[1] !== undefined && h[1] !== "" ? parseInt(h[1], 10) : null);
    else indexPage();
  }

  // ------------------------------------------------------------------ feature index
  function indexPage() {
    var opts = '<option value="all">all layers</option>' + layers().map(function (l) {
      return '<option value="' + l + '"' + (String(l) === state.layer ? " selected" : "") + '>layer ' + l + '</option>'; }).join("");
    app.innerHTML = '<div class="tn-controls"><select id="tn-layer" aria-label="layer">' + opts + '</select>' +
      '<input id="tn-search" type="search" placeholder="search top tokens (e.g. answer, +, =)" value="' + esc(state.q) + '">' +
      '<span class="tn-count" id="tn-count"></span></div>' +
      '<p class="tn-legend">Every feature of every layer. Density: share of tokens where it fires; mean act: over all tokens; ' +
      'Δ: mean(thinking) − mean(non-thinking) on generated tokens (decoder norm folded, as <code>tellnorm features</code>); ' +
      'ReasonScore (Galichin et al.); r: Pearson correlation with ‖h‖₂ of the vector the SAE reads. Click a column to sort, a row to open the feature.</p>' +
      '<table class="tn-table" id="tn-index"><thead><tr>' + COLS.map(function (c) {
        return '<th data-col="' + c[0] + '"' + (c[0] === state.sort ? ' class="tn-sorted"' : "") + '>' + c[1] +
          (c[0] === state.sort ? (state.desc ? " ▼" : " ▲") : "") + '</th>'; }).join("") +
      '</tr></thead><tbody id="tn-rows"></tbody></table><button class="tn-more" id="tn-more">show more</button>';
    document.getElementById("tn-layer").addEventListener("change", function (e) { state.layer = e.target.value; state.shown = 200; fillIndex(); });
    document.getElementById("tn-search").addEventListener("input", function (e) { state.q = e.target.value; state.shown = 200; fillIndex(); });
    document.getElementById("tn-more").addEventListener("click", function () { state.shown += 500; fillIndex(); });
    document.querySelectorAll("#tn-index th").forEach(function (th) {
      th.addEventListener("click", function () {
        var c = th.getAttribute("data-col");
        if (c === "top_tokens") return;
        if (state.sort === c) state.desc = !state.desc; else { state.sort = c; state.desc = c !== "layer" && c !== "id"; }
        indexPage();
      });
    });
    document.getElementById("tn-rows").addEventListener("click", function (e) {
      var tr = e.target.closest("tr");
      if (tr) location.hash = "#/feature/" + tr.getAttribute("data-layer") + "/" + tr.getAttribute("data-id");
    });
    fillIndex();
  }
  function fillIndex() {
    var want = state.layer === "all" ? layers() : [parseInt(state.layer, 10)];
    load(want.map(function (l) { return "index_L" + l; }), function (docs) {
      var rows = [], q = state.q.trim().toLowerCase();
      want.forEach(function (l) {
        var f = docs["index_L" + l].features;
        for (var i = 0; i < f.id.length; i++) {
          var toks = f.top_tokens[i];
          if (q && !toks.some(function (t) { return t.toLowerCase().indexOf(q) >= 0; })) continue;
          rows.push({layer: l, id: f.id[i], density: f.density[i], mean: f.mean[i], delta: f.delta[i],
            relative_delta: f.relative_delta[i], reason_score: f.reason_score[i], corr: f.corr[i], top_tokens: toks});
        }
      });
      var k = state.sort, s = state.desc ? -1 : 1;
      rows.sort(function (a, b) {
        var x = a[k], y = b[k];
        if (x === null) return y === null ? 0 : 1;
        if (y === null) return -1;
        return x < y ? -s : x > y ? s : (a.layer - b.layer) || (a.id - b.id);
      });
      var tbody = document.getElementById("tn-rows");
      if (!tbody) return;
      tbody.innerHTML = rows.slice(0, state.shown).map(function (r) {
        return '<tr data-layer="' + r.layer + '" data-id="' + r.id + '"><td class="tn-num">' + r.layer + '</td><td class="tn-num">' + r.id +
          '</td><td class="tn-num">' + fmt(r.density) + '</td><td class="tn-num">' + fmt(r.mean) + '</td><td class="tn-num">' +
          fmt(r.delta) + '</td><td class="tn-num">' + fmt(r.relative_delta) + '</td><td class="tn-num">' + fmt(r.reason_score) +
          '</td><td class="tn-num">' + fmt(r.corr, 2) + '</td><td>' + r.top_tokens.map(function (t) {
            return '<span class="tn-chip">' + tokHtml(t) + '</span>'; }).join("") + '</td></tr>';
      }).join("");
      tbody.setAttribute("data-total", rows.length);
      document.getElementById("tn-count").textContent = rows.length.toLocaleString() + " features" +
        (rows.length > state.shown ? " (showing " + state.shown + ")" : "");
      document.getElementById("tn-more").style.display = rows.length > state.shown ? "" : "none";
    });
  }

  // ------------------------------------------------------------------ feature page
  function actColor(a, scale) {
    var alpha = scale > 0 ? Math.max(0, Math.min(1, a / scale)) * 0.85 : 0;
    return alpha > 0.004 ? ' style="background:rgba(234,88,12,' + alpha.toFixed(3) + ')"' : "";
  }
  function featurePage(layer, id) {
    var lm = META.layers.filter(function (l) { return l.layer === layer; })[0];
    if (!lm || !(id >= 0 && id < lm.d_sae)) {
      app.innerHTML = '<p class="tn-error">no feature ' + esc(id) + ' at layer ' + esc(layer) + '</p>'; return;
    }
    app.innerHTML = '<p class="tn-empty">Loading layer ' + layer + '…</p>';
    var shardName = "features_L" + layer + "_" + Math.floor(id / (META.shard || 1e9));
    load(["index_L" + layer, shardName, "corpus"], function (d) {
      var sh = d[shardName], f = sh.features[id - sh.start], ix = d["index_L" + layer].features, corpus = d.corpus;
      var scale = f.examples.length ? f.examples[0].act : 0;
      var badge = function (k, v) { return '<span class="tn-badge">' + k + ' <b>' + v + '</b></span>'; };
      var html = '<div class="tn-card"><h2>Layer ' + layer + ' · feature ' + id + '</h2><div class="tn-badges">' +
        badge("ReasonScore", fmt(ix.reason_score[id])) + badge("Δ", fmt(ix.delta[id])) + badge("relative Δ", fmt(ix.relative_delta[id])) +
        badge("density", fmt(100 * ix.density[id]) + "%") + badge("mean act", fmt(ix.mean[id])) +
        badge("mean when active", fmt(ix.mean_active[id])) + badge("max", fmt(ix.max[id])) + badge("r(act, ‖h‖)", fmt(ix.corr[id], 2)) +
        badge("mean ‖h‖ when active", fmt(f.norm_active)) + '</div><p class="tn-legend">' + esc(lm.sae) + ' · ' +
        esc(d["index_L" + layer].hook_name) + ' · <a href="#/">back to the index</a></p></div>';
      html += '<div class="tn-grid"><div class="tn-card"><h3>Top-activating contexts</h3>';
      if (!f.examples.length) html += '<p class="tn-empty">Never active on the tokens seen.</p>';
      f.examples.forEach(function (ex) {
        var toks = corpus.tokens[ex.seq];
        html += '<div class="tn-ex"><div class="tn-ex-val">' + fmt(ex.act) + '<span class="tn-ex-loc">' + esc(corpus.modes[ex.seq]) +
          ' · #' + ex.seq + ':' + ex.pos + '</span></div><div class="tn-ctx">' + ex.acts.map(function (a, i) {
            var p = ex.start + i, t = toks[p];
            if (a === null) return '<span class="tn-tok tn-tok-na" title="position 0 (excluded)">' + tokHtml(t) + '</span>';
            return '<span class="tn-tok' + (p === ex.pos ? " tn-tok-max" : "") + '"' + actColor(a, scale) + ' title="' +
              esc(JSON.stringify(t) + " · pos " + p + " · act " + a) + '">' + tokHtml(t) + '</span>';
          }).join("") + '</div></div>';
      });
      html += '</div><div><div class="tn-card"><h3>Activation histogram</h3><div class="tn-plot" id="tn-hist"></div>' +
        (f.histogram ? '<p class="tn-legend">Positive activations; off on ' + f.histogram.n_zero.toLocaleString() + ' tokens.</p>' : '<p class="tn-empty">never active</p>') +
        '</div><div class="tn-card"><h3>Output tokens (W_dec · W_U)</h3><div class="tn-logits">' +
        logitTable(f.promoted, "up", "Promoted") + logitTable(f.suppressed, "down", "Suppressed") + '</div></div></div></div>';
      html += '<div class="tn-card"><h3>Along example responses</h3>';
      if (!f.strips.length) html += '<p class="tn-empty">Not active on the norm view\'s example responses.</p>';
      f.strips.forEach(function (s) {
        var toks = corpus.tokens[s.seq], acts = {}, mx = 0;
        s.acts.forEach(function (pa) { acts[pa[0]] = pa[1]; mx = Math.max(mx, pa[1]); });
        html += '<div class="tn-resp"><div class="tn-resp-head"><b>' + esc(corpus.modes[s.seq]) + '</b> · difficulty ' +
          fmt(corpus.difficulties[s.seq]) + ' · response #' + s.seq + '</div><div class="tn-strip">' + toks.map(function (t, p) {
            var a = acts[p] || 0;
            return '<span class="tn-tok' + (p < corpus.n_prompt[s.seq] ? " tn-tok-prompt" : "") + '"' + actColor(a, mx) +
              ' title="' + esc(JSON.stringify(t) + " · pos " + p + " · act " + a) + '">' + tokHtml(t) + '</span>';
          }).join("") + '</div></div>';
      });
      html += '</div>';
      app.innerHTML = html;
      if (f.histogram && window.Plotly) {
        var e = f.histogram.edges, c = [], w = e[1] - e[0];
        for (var i = 0; i + 1 < e.length; i++) c.push((e[i] + e[i + 1]) / 2);
        window.Plotly.newPlot("tn-hist", [{type: "bar", x: c, y: f.histogram.counts, width: c.map(function () { return w; }),
          marker: {color: "rgba(234,88,12,0.8)"}, hovertemplate: "act %{x:.3g}<br>%{y} tokens<extra></extra>"}],
          {height: 220, margin: {l: 48, r: 10, t: 8, b: 38}, xaxis: {title: {text: "activation (> 0)"}},
           yaxis: {title: {text: "tokens"}}, showlegend: false}, {displayModeBar: false, responsive: true});
      }
    });
  }
  function logitTable(rows, kind, label) {
    return '<table class="tn-' + kind + '"><tr><th colspan="2">' + label + '</th></tr>' + rows.map(function (r) {
      return '<tr><td><span class="tn-chip">' + tokHtml(r[0]) + '</span></td><td class="tn-num">' + fmt(r[1]) + '</td></tr>'; }).join("") + '</table>';
  }

  // ------------------------------------------------------------------ norm view
  var TECH_KINDS = {kept: "extra pass kept", tried: "extra pass run, rejected", injected: "injection (x ← x + β·(v* − x))",
    scaled: "scaled ×"};
  function techRow(t, run, T) {
    var head = '<b>' + esc(t.label) + '</b> · ' + t.layers.map(function (l) {
      return "L" + l + " (τ " + fmt(T.thresholds[String(l)], 4) + ")"; }).join(", ");
    if (t.error) return '<div class="tn-tech" data-tech="' + esc(t.key) + '"><div class="tn-tech-head">' + head +
      ' · <span class="tn-error">not run: ' + esc(t.error) + '</span></div></div>';
    if (!run) return "";
    var at = {}, counts = {};
    run.marks.forEach(function (m) { (at[m[0]] = at[m[0]] || []).push(m); counts[m[2]] = (counts[m[2]] || 0) + 1; });
    var what = Object.keys(counts).length ? Object.keys(counts).map(function (k) {
      return counts[k] + " " + (k === "scaled" ? "scaled ×" + fmt(t.settings.factor) : TECH_KINDS[k]); }).join(", ") :
      "acted on no token" + (t.key === "erss" ? " (it needs " + t.settings.low_k + " tokens in a row below " + fmt(t.settings.gamma) + "·τ after a banked peak)" : "");
    var same = run.same ? "same tokens as the plain response" :
      'own response differs from the plain one from position ' + run.first_diff + ' on (dotted)';
    var strip = run.tokens.map(function (tok, j) {
      var p = run.n_prompt + j, ms = at[p], cls = "tn-tok", title = JSON.stringify(tok) + " · pos " + p, extra = "";
      if (!run.same && run.first_diff !== null && p >= run.first_diff) cls += " tn-diff";
      if (ms) {
        var kind = ms.some(function (m) { return m[2] === "kept"; }) ? "kept" : ms[0][2];
        cls += " tn-mark tn-m-" + kind;
        extra = ' data-kind="' + kind + '" data-pos="' + p + '"';
        title += ms.map(function (m) { return " · " + t.label + " at L" + m[1] + ": " +
          (m[2] === "scaled" ? "scaled ×" + fmt(t.settings.factor) : TECH_KINDS[m[2]] + (m[2] === "kept" ? " (" + m[3] + ")" : "")); }).join("");
      }
      return '<span class="' + cls + '"' + extra + ' title="' + esc(title) + '">' + tokHtml(tok) + '</span>';
    }).join("");
    return '<div class="tn-tech tn-tech-' + esc(t.key) + '" data-tech="' + esc(t.key) + '"><div class="tn-tech-head" title="' +
      esc(JSON.stringify(t.settings || {})) + '">' + head + ' · ' + what + ' · ' + same + '</div><div class="tn-strip">' + strip + '</div></div>';
  }
  function techLegend(T) {
    if (!T.techniques.length) return "";
    var has = function (k) { return T.techniques.some(function (t) { return t.key === k && !t.error; }); };
    var supp = T.techniques.filter(function (t) { return t.key === "suppression"; })[0];
    var sw = function (cls, text) { return '<span class="tn-sw"><span class="tn-tok ' + cls + '">ab</span> ' + text + '</span>'; };
    return '<div class="tn-legend tn-tech-legend"><b>Where the techniques acted.</b> Under each response, one row per technique: ' +
      'the same prompt decoded again (' + esc(T.decoding) + ', at most ' + T.max_new_tokens + ' new tokens) with the technique on, at its layers, ' +
      'with the same τ as the peaks above. A technique changes the residual stream, so its response can differ from the plain one: ' +
      'each row shows <i>the technique\'s own generated tokens</i>, and marks the tokens whose residual vector it acted on (the decisions ' +
      'its edit recorded). Tokens from the first difference on are underlined with dots.<div class="tn-swatches">' +
      (has("alrr") ? sw("tn-m-kept", "ALRR: extra pass of the block kept") + sw("tn-m-tried", "ALRR: extra pass run, rejected (norm did not grow enough or left the band)") : "") +
      (has("erss") ? sw("tn-m-injected", "ERSS: injection towards a banked high-norm state") : "") +
      (has("suppression") ? sw("tn-m-scaled", "high-norm suppression: x′ = " + fmt(supp.settings.factor) + "·x on a token above τ") : "") +
      sw("tn-diff", "differs from the plain response") + '</div></div>';
  }
  function normView(layer) {
    if (layer === null || isNaN(layer)) layer = state.normLayer;
    load(["norms", "corpus", "techniques"], function (d) {
      var n = d.norms, corpus = d.corpus, T = d.techniques;
      if (layer === null || n.layers.indexOf(layer) < 0) layer = n.layers[n.layers.length - 1];
      state.normLayer = layer;
      var tau = n.thresholds[String(layer)], all = [];
      n.responses.forEach(function (r) { r.norms[String(layer)].forEach(function (v, p) {
        if (v !== null && p > 0) all.push(v); }); });
      all.sort(function (a, b) { return a - b; });
      var lo = all.length ? all[Math.floor(0.05 * (all.length - 1))] : 0, hi = all.length ? all[Math.floor(0.99 * (all.length - 1))] : 0;
      var opts = n.layers.map(function (l) { return '<option value="' + l + '"' + (l === layer ? " selected" : "") + '>layer ' + l + '</option>'; }).join("");
      var topts = [["all", "all techniques"], ["none", "no techniques"]].concat(T.techniques.map(function (t) { return [t.key, t.label + " only"]; }))
        .map(function (o) { return '<option value="' + o[0] + '"' + (o[0] === state.techRows ? " selected" : "") + '>' + esc(o[1]) + '</option>'; }).join("");
      var html = '<div id="tn-normview"><div class="tn-controls"><label>Layer <select id="tn-norm-layer">' + opts + '</select></label>' +
        (T.techniques.length ? '<label>Rows <select id="tn-tech-rows">' + topts + '</select></label>' : '') +
        '<span class="tn-count">threshold τ = ' + fmt(tau) + ' (Q3 + k·IQR of the corpus\'s generated-token norms)</span></div>' +
        '<p class="tn-legend">Each token\'s background is ‖h‖₂ at the chosen layer (white = 5th percentile or below, dark blue = 99th percentile or above, over these responses); ' +
        'a red outline marks a peak above τ; hover a token for its norm' + (META.organism ? " and its ground-truth label" : "") +
        '. Prompt tokens are faded; position 0 (massive activation) is excluded.</p>' + techLegend(T);
      var runs = {};
      T.techniques.forEach(function (t) { runs[t.key] = {}; t.runs.forEach(function (r) { runs[t.key][r.seq] = r; }); });
      var shown = T.techniques.filter(function (t) { return state.techRows === "all" || state.techRows === t.key; });
      n.responses.forEach(function (r) {
        var toks = corpus.tokens[r.seq], norms = r.norms[String(layer)], peaks = 0;
        var strip = toks.map(function (t, p) {
          var v = norms[p], label = r.labels[p];
          if (p === 0 || v === null) return '<span class="tn-tok tn-tok-na">' + tokHtml(t) + '</span>';
          var a = hi > lo ? Math.max(0, Math.min(1, (v - lo) / (hi - lo))) : 0, peak = tau !== null && v > tau && p >= r.n_prompt;
          if (peak) peaks++;
          return '<span class="tn-tok' + (peak ? " tn-peak" : "") + (p < r.n_prompt ? " tn-tok-prompt" : "") +
            '" style="background:rgba(28,126,214,' + (0.85 * a).toFixed(3) + ')' + (a > 0.6 ? ';color:#fff' : '') + '" title="' +
            esc(JSON.stringify(t) + " · pos " + p + " · ‖h‖ " + fmt(v, 4) + (label ? " · " + label : "")) + '">' + tokHtml(t) + '</span>';
        }).join("");
        html += '<div class="tn-resp" data-mode="' + esc(r.mode) + '" data-seq="' + r.seq + '"><div class="tn-resp-head"><b>' + esc(r.mode) + '</b> · difficulty ' +
          fmt(r.difficulty) + ' · response #' + r.seq + ' · ' + peaks + ' peak' + (peaks === 1 ? "" : "s") + ' above τ</div>' +
          '<div class="tn-strip">' + strip + '</div>' + shown.map(function (t) { return techRow(t, runs[t.key][r.seq], T); }).join("") + '</div>';
      });
      app.innerHTML = html + '</div>';
      document.getElementById("tn-norm-layer").addEventListener("change", function (e) { location.hash = "#/norms/" + e.target.value; });
      var rowSel = document.getElementById("tn-tech-rows");
      if (rowSel) rowSel.addEventListener("change", function (e) { state.techRows = e.target.value; normView(layer); });
    });
  }
})();
"""
