"""Self-contained HTML feature dashboards from :class:`~tellnorm.apps.dashboards.data.FeatureDashboardData`.

``render_dashboard(data_list, path)`` writes one browsable page: a feature navigator (with a filter box) and one
card per feature with its scores, top-activating contexts (activation as background intensity, hover for the
value), the activation histogram (plotly), the promoted / suppressed output tokens and the correlation with the
layer norm. plotly.js is embedded inline once, so the page opens with no network; nothing is loaded from a URL.
``dashboard_html(data_list)`` returns the same content as an HTML fragment for ``IPython.display.HTML``.
"""

from __future__ import annotations

import html
import json
import math
import uuid
from collections.abc import Sequence
from pathlib import Path

from tellnorm.apps.dashboards.data import ContextExample, FeatureDashboardData, LogitEffect
from tellnorm.errors import TellnormError
from tellnorm.figures import FONT

ACT_RGB = (234, 88, 12)  # activation highlight (orange)
PROMOTE_COLOR = "#2f9e44"
SUPPRESS_COLOR = "#e03131"
SCORE_LABELS = {"reason_score": "ReasonScore", "differential": "Differential", "differential_score": "Differential"}
DEFAULT_TITLE = "tellnorm feature dashboards"

CSS = """
.tn-dash { --tn-bg:#f6f7f9; --tn-card:#fff; --tn-border:#e3e6ea; --tn-text:#1f2328; --tn-muted:#667085;
  --tn-accent:#d9480f; --tn-green:#2f9e44; --tn-red:#e03131;
  display:grid; grid-template-columns:230px minmax(0,1fr); gap:0; background:var(--tn-bg); color:var(--tn-text);
  font-family:%(font)s; font-size:14px; line-height:1.45; text-align:left; }
.tn-dash *, .tn-dash *::before, .tn-dash *::after { box-sizing:border-box; }
.tn-nav { position:sticky; top:0; align-self:start; max-height:100vh; overflow-y:auto; padding:18px 12px;
  border-right:1px solid var(--tn-border); background:#fff; }
.tn-brand { font-weight:700; font-size:15px; margin:0 4px 10px; }
.tn-filter { width:100%%; padding:6px 9px; border:1px solid var(--tn-border); border-radius:6px; font:inherit;
  font-size:13px; margin-bottom:10px; background:#fbfbfc; }
.tn-nav-item { display:flex; justify-content:space-between; gap:8px; padding:5px 8px; border-radius:6px;
  color:var(--tn-text); text-decoration:none; font-size:13px; }
.tn-nav-item:hover { background:#f1f3f5; }
.tn-nav-item.tn-active { background:#fff4e6; color:var(--tn-accent); font-weight:600; }
.tn-nav-score { color:var(--tn-muted); font-variant-numeric:tabular-nums; }
.tn-main { padding:22px 28px 60px; min-width:0; }
.tn-page-head h1 { font-size:22px; margin:0 0 4px; }
.tn-meta { color:var(--tn-muted); margin:0 0 6px; }
.tn-legend { color:var(--tn-muted); font-size:12.5px; margin:0 0 18px; max-width:980px; }
.tn-card { background:var(--tn-card); border:1px solid var(--tn-border); border-radius:10px; margin:0 0 22px;
  box-shadow:0 1px 2px rgba(16,24,40,.04); scroll-margin-top:12px; }
.tn-card-head { display:flex; flex-wrap:wrap; align-items:baseline; justify-content:space-between; gap:8px 16px;
  padding:14px 18px 12px; border-bottom:1px solid var(--tn-border); }
.tn-card-head h2 { font-size:17px; margin:0; }
.tn-card-head h2 .tn-sub { color:var(--tn-muted); font-weight:400; font-size:13px; margin-left:8px; }
.tn-badges { display:flex; flex-wrap:wrap; gap:6px; }
.tn-badge { border:1px solid var(--tn-border); background:#f8f9fa; border-radius:999px; padding:2px 10px;
  font-size:12.5px; white-space:nowrap; }
.tn-badge b { font-weight:600; font-variant-numeric:tabular-nums; }
.tn-badge.tn-score { background:#fff4e6; border-color:#ffd8a8; }
.tn-grid { display:grid; grid-template-columns:minmax(0,1.5fr) minmax(320px,1fr); gap:0; }
.tn-panel { padding:12px 18px 14px; min-width:0; }
.tn-side { border-left:1px solid var(--tn-border); }
.tn-col { min-width:0; }
.tn-col .tn-panel + .tn-panel { border-top:1px solid var(--tn-border); }
.tn-panel h3 { font-size:12px; text-transform:uppercase; letter-spacing:.05em; color:var(--tn-muted); margin:0 0 8px; }
.tn-note { color:var(--tn-muted); font-size:12px; margin:6px 0 0; }
.tn-ex { display:grid; grid-template-columns:84px minmax(0,1fr); gap:10px; padding:6px 0;
  border-bottom:1px dashed #eef0f2; }
.tn-ex:last-child { border-bottom:none; }
.tn-ex-val { font-variant-numeric:tabular-nums; font-weight:600; color:var(--tn-accent); text-align:right; }
.tn-ex-loc { display:block; color:var(--tn-muted); font-size:11px; font-weight:400; white-space:nowrap; }
.tn-ctx { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; line-height:1.9; }
.tn-tok { white-space:pre; border-radius:3px; padding:1px 2px; margin:0 1px; cursor:default; }
.tn-tok:hover { outline:1px solid #868e96; }
.tn-tok-max { box-shadow:inset 0 -2px 0 var(--tn-accent); font-weight:700; }
.tn-tok-na { color:#adb5bd; }
.tn-ws { color:#868e96; }
.tn-plot { width:100%%; height:210px; }
.tn-empty { color:var(--tn-muted); font-style:italic; padding:6px 0; }
.tn-logits { display:grid; grid-template-columns:1fr 1fr; gap:18px; max-width:560px; }
.tn-logits table { width:100%%; border-collapse:collapse; font-size:12.5px; }
.tn-logits th { text-align:left; font-weight:600; font-size:12px; padding:2px 4px 4px;
  border-bottom:1px solid var(--tn-border); }
.tn-logits td { padding:2px 4px; border-bottom:1px solid #f1f3f5; }
.tn-logits td.tn-v { text-align:right; font-variant-numeric:tabular-nums; width:1%%; white-space:nowrap; }
.tn-chip { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; white-space:pre; border-radius:3px;
  padding:0 3px; }
.tn-up .tn-chip { background:rgba(47,158,68,var(--a)); }
.tn-down .tn-chip { background:rgba(224,49,49,var(--a)); }
.tn-up th { color:var(--tn-green); } .tn-down th { color:var(--tn-red); }
.tn-corr { display:flex; align-items:center; gap:14px; }
.tn-corr-r { font-size:24px; font-weight:700; font-variant-numeric:tabular-nums; min-width:74px; }
.tn-gauge { position:relative; flex:1; height:10px; border-radius:5px;
  background:linear-gradient(90deg,#a5d8ff,#f1f3f5 50%%,#ffc9c9); }
.tn-gauge::after { content:""; position:absolute; left:50%%; top:-3px; width:1px; height:16px; background:#adb5bd; }
.tn-gauge-mark { position:absolute; top:-4px; width:4px; height:18px; margin-left:-2px; border-radius:2px;
  background:var(--tn-text); }
.tn-gauge-labels { display:flex; justify-content:space-between; color:var(--tn-muted); font-size:11px; margin-top:3px; }
.tn-hidden { display:none !important; }
@media (max-width:900px) { .tn-dash { grid-template-columns:1fr; } .tn-nav { position:static; max-height:none; }
  .tn-grid { grid-template-columns:1fr; } .tn-side { border-left:none; border-top:1px solid var(--tn-border); } }
""" % {"font": FONT}  # noqa: UP031 (CSS braces would all need doubling in a format string)

JS = """
(function () {
  var root = document.getElementById(__ROOT__);
  if (!root) return;
  var figs = JSON.parse(document.getElementById(__FIGS__).textContent);
  figs.forEach(function (f) {
    var el = document.getElementById(f.id);
    if (!el) return;
    if (window.Plotly) { window.Plotly.newPlot(el, f.data, f.layout, f.config); }
    else { el.classList.add("tn-plot-missing"); el.textContent = "plotly.js did not load"; }
  });
  var cards = Array.prototype.slice.call(root.querySelectorAll(".tn-card"));
  var links = Array.prototype.slice.call(root.querySelectorAll(".tn-nav-item"));
  var filter = root.querySelector(".tn-filter");
  if (filter) filter.addEventListener("input", function () {
    var q = filter.value.trim().toLowerCase();
    cards.concat(links).forEach(function (el) {
      el.classList.toggle("tn-hidden", q !== "" && el.getAttribute("data-search").indexOf(q) < 0);
    });
  });
  if ("IntersectionObserver" in window) {
    var byId = {};
    links.forEach(function (a) { byId[a.getAttribute("href").slice(1)] = a; });
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) {
        if (e.isIntersecting && byId[e.target.id]) {
          links.forEach(function (a) { a.classList.remove("tn-active"); });
          byId[e.target.id].classList.add("tn-active");
        }
      });
    }, {rootMargin: "0px 0px -70% 0px"});
    cards.forEach(function (c) { io.observe(c); });
  }
})();
"""


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 10 ** -(digits - 1)):
        return f"{v:.{digits - 1}e}" if abs(v) < 1e-2 or abs(v) >= 1e6 else f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _fmt_r(r) -> str:
    if r is None:
        return "—"
    return "0.00" if abs(r) < 0.005 else f"{r:+.2f}".replace("-", "−")


def _token_html(text: str) -> str:
    """Escape a token's text and make whitespace visible: newline ↵, tab →, a lone space ␣, empty ∅."""
    if text == "":
        return '<span class="tn-ws">∅</span>'
    if text.strip(" ") == "" and "\n" not in text:
        return '<span class="tn-ws">' + "␣" * len(text) + "</span>"
    out = []
    for ch in text:
        if ch == "\n":
            out.append('<span class="tn-ws">↵</span>')
        elif ch == "\t":
            out.append('<span class="tn-ws">→</span>')
        elif ch == "\r":
            out.append('<span class="tn-ws">␍</span>')
        elif ord(ch) < 32 or ch == "\x7f":
            out.append(f'<span class="tn-ws">\\x{ord(ch):02x}</span>')
        else:
            out.append(html.escape(ch))
    return "".join(out)


def _attr(text: str) -> str:
    return html.escape(text, quote=True).replace("\n", "&#10;")


def _context_html(ex: ContextExample, scale: float) -> str:
    spans = []
    for i, (tok, act) in enumerate(zip(ex.tokens, ex.activations)):
        pos = ex.start + i
        if act is None:
            title = f"{tok!r} · pos {pos} · position 0 (excluded)"
            spans.append(f'<span class="tn-tok tn-tok-na" title="{_attr(title)}">{_token_html(tok)}</span>')
            continue
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale)) * 0.85
        style = f' style="background:rgba({ACT_RGB[0]},{ACT_RGB[1]},{ACT_RGB[2]},{alpha:.3f})"' if alpha > 0.004 else ""
        cls = "tn-tok tn-tok-max" if i == ex.center else "tn-tok"
        title = f"{tok!r} · pos {pos} · act {act:.4g}"
        spans.append(f'<span class="{cls}"{style} title="{_attr(title)}" data-act="{act:.6g}">'
                     f'{_token_html(tok)}</span>')
    return "".join(spans)


def _examples_html(d: FeatureDashboardData) -> str:
    if not d.examples:
        return f'<div class="tn-empty">Never active on the {d.n_tokens:,} tokens seen.</div>'
    scale = d.max_activation if d.max_activation > 0 else max(e.activation for e in d.examples)
    rows = []
    for ex in d.examples:
        rows.append(
            f'<div class="tn-ex"><div class="tn-ex-val">{_fmt(ex.activation)}'
            f'<span class="tn-ex-loc">seq {ex.sequence} · pos {ex.position}</span></div>'
            f'<div class="tn-ctx">{_context_html(ex, scale)}</div></div>'
        )
    return "".join(rows)


def _logit_table(effects: list[LogitEffect], kind: str, label: str) -> str:
    if not effects:
        return f'<table class="tn-{kind}"><tr><th colspan="2">{label}</th></tr></table>'
    top = max(abs(e.value) for e in effects) or 1.0
    rows = "".join(
        f'<tr><td><span class="tn-chip" style="--a:{0.12 + 0.5 * abs(e.value) / top:.3f}" '
        f'title="{_attr(f"id {e.token_id} · {e.token!r}")}">{_token_html(e.token)}</span></td>'
        f'<td class="tn-v">{"+" if e.value > 0 else ""}{_fmt(e.value)}</td></tr>'
        for e in effects
    )
    return f'<table class="tn-{kind}"><tr><th colspan="2">{label}</th></tr>{rows}</table>'


def _corr_html(d: FeatureDashboardData) -> str:
    c = d.norm_correlation
    r = c.r
    mark = "" if r is None else f'<div class="tn-gauge-mark" style="left:{50 + 50 * r:.1f}%"></div>'
    return (
        f'<div class="tn-corr"><div class="tn-corr-r" title="Pearson r">r = {_fmt_r(r)}</div>'
        f'<div style="flex:1"><div class="tn-gauge">{mark}</div>'
        f'<div class="tn-gauge-labels"><span>−1</span><span>0</span><span>+1</span></div></div></div>'
        f'<p class="tn-note">Pearson r between the activation and ‖h‖₂ at '
        f'<code>{html.escape(d.hook_name)}</code> '
        f'over {c.n:,} tokens{" (undefined: constant activation or norm)" if r is None else ""}. '
        f'Mean ‖h‖₂ where the feature fires: <b>{_fmt(c.mean_norm_active)}</b>; '
        f'where it is off: <b>{_fmt(c.mean_norm_inactive)}</b>.</p>'
    )


def _histogram_figure(d: FeatureDashboardData, div_id: str) -> dict | None:
    h = d.histogram
    if not h.counts:
        return None
    centers = [(a + b) / 2 for a, b in zip(h.edges[:-1], h.edges[1:])]
    width = h.edges[1] - h.edges[0]
    ranges = [f"[{a:.3g}, {b:.3g})" for a, b in zip(h.edges[:-1], h.edges[1:])]
    return {
        "id": div_id,
        "data": [{
            "type": "bar", "x": centers, "y": h.counts, "width": [width] * len(centers), "customdata": ranges,
            "marker": {"color": "rgba({},{},{},0.8)".format(*ACT_RGB), "line": {"width": 0}},
            "hovertemplate": "activation %{customdata}<br>%{y:,} tokens<extra></extra>",
        }],
        "layout": {
            "height": 210, "autosize": True, "margin": {"l": 52, "r": 12, "t": 8, "b": 40}, "bargap": 0.04,
            "font": {"family": FONT, "size": 12, "color": "#1f2328"}, "paper_bgcolor": "#fff", "plot_bgcolor": "#fff",
            "xaxis": {"title": {"text": "activation (> 0)"}, "gridcolor": "#eef0f2", "zeroline": False,
                      "rangemode": "tozero"},
            "yaxis": {"title": {"text": "tokens"}, "gridcolor": "#eef0f2", "zeroline": False},
            "showlegend": False,
        },
        "config": {"displayModeBar": False, "responsive": True},
    }


def _score_badges(d: FeatureDashboardData) -> str:
    badges = [f'<span class="tn-badge tn-score">{html.escape(SCORE_LABELS.get(k, k))} <b>{_fmt(v)}</b></span>'
              for k, v in d.scores.items()]
    badges += [
        f'<span class="tn-badge" title="fraction of tokens where the feature is &gt; 0">density '
        f'<b>{100 * d.density:.3g}%</b> of {d.n_tokens:,}</span>',
        f'<span class="tn-badge">max act <b>{_fmt(d.max_activation)}</b></span>',
        f'<span class="tn-badge" title="Pearson r with the layer norm ‖h‖₂">corr(‖h‖) '
        f'<b>{_fmt_r(d.norm_correlation.r)}</b></span>',
    ]
    return "".join(badges)


def _card_html(d: FeatureDashboardData, card_id: str, plot_id: str, has_plot: bool) -> str:
    search = f"l{d.layer} layer {d.layer} #{d.feature} f{d.feature} feature {d.feature}".lower()
    h = d.histogram
    hist_note = (f'Positive activations; the feature is off on {h.n_zero:,} of {h.total:,} tokens '
                 f'({100 * h.n_zero / h.total:.3g}%).' if h.total else "")
    sub = f"{html.escape(d.sae_name)} · {html.escape(d.hook_name)}"
    logits = _logit_table(d.promoted, "up", "Promoted") + _logit_table(d.suppressed, "down", "Suppressed")
    hist = f'<div class="tn-plot" id="{plot_id}"></div>' if has_plot else \
        f'<div class="tn-empty">Never active on the {d.n_tokens:,} tokens seen.</div>'
    return f"""
<section class="tn-card" id="{card_id}" data-search="{_attr(search)}" data-layer="{d.layer}" data-feature="{d.feature}">
  <div class="tn-card-head">
    <h2>Layer {d.layer} · feature {d.feature}<span class="tn-sub">{sub}</span></h2>
    <div class="tn-badges">{_score_badges(d)}</div>
  </div>
  <div class="tn-grid">
    <div class="tn-col">
      <div class="tn-panel tn-examples"><h3>Top activations</h3>{_examples_html(d)}</div>
      <div class="tn-panel"><h3>Logit effects</h3>
        <div class="tn-logits">{logits}</div>
        <p class="tn-note">Decoder direction through the unembedding, W_dec[f] · W_U (final RMSNorm ignored).</p>
      </div>
    </div>
    <div class="tn-col tn-side">
      <div class="tn-panel"><h3>Activation histogram</h3>{hist}<p class="tn-note">{hist_note}</p></div>
      <div class="tn-panel"><h3>Correlation with the layer norm</h3>{_corr_html(d)}</div>
    </div>
  </div>
</section>"""


def _nav_item(d: FeatureDashboardData, card_id: str) -> str:
    score = d.scores.get("reason_score", d.scores.get("differential"))
    label = "RS" if "reason_score" in d.scores else "Δ"
    right = f'<span class="tn-nav-score">{label} {_fmt(score)}</span>' if score is not None else ""
    search = f"l{d.layer} layer {d.layer} #{d.feature} f{d.feature} feature {d.feature}".lower()
    return (f'<a class="tn-nav-item" href="#{card_id}" data-search="{_attr(search)}">'
            f"<span>L{d.layer} · #{d.feature}</span>{right}</a>")


def _json_script(obj, element_id: str) -> str:
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _plotly_script() -> str:
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().replace("</script", "<\\/script")
    return ("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>\n"
            f"<script>{js}</script>")


def _body(data_list: Sequence[FeatureDashboardData], title: str, prefix: str) -> tuple[str, str]:
    """(markup, script) of the dashboard root ``prefix``."""
    figures, cards, nav = [], [], []
    for i, d in enumerate(data_list):
        card_id, plot_id = f"{prefix}-card-{i}", f"{prefix}-hist-{i}"
        fig = _histogram_figure(d, plot_id)
        if fig is not None:
            figures.append(fig)
        cards.append(_card_html(d, card_id, plot_id, fig is not None))
        nav.append(_nav_item(d, card_id))
    models = sorted({d.model_name for d in data_list})
    layers = sorted({d.layer for d in data_list})
    n_seq = max(d.n_sequences for d in data_list)
    n_tok = max(d.n_tokens for d in data_list)
    meta = (f"{html.escape(', '.join(models))} · layer{'s' if len(layers) > 1 else ''} "
            f"{', '.join(map(str, layers))} · {len(data_list)} feature{'s' if len(data_list) != 1 else ''} · "
            f"{n_seq:,} sequences, {n_tok:,} tokens")
    legend = ("Contexts: background intensity is the activation relative to the feature's maximum; hover a token "
              "for its value; the example token is underlined; ↵ marks a newline, ␣ a space. Padding and "
              "position 0 (massive activations) are excluded from every statistic.")
    markup = f"""
<div class="tn-dash" id="{prefix}">
  <aside class="tn-nav">
    <div class="tn-brand">{html.escape(title)}</div>
    <input class="tn-filter" type="search" placeholder="Filter: L12, #345 …" aria-label="filter features">
    <nav>{"".join(nav)}</nav>
  </aside>
  <main class="tn-main">
    <header class="tn-page-head"><h1>{html.escape(title)}</h1><p class="tn-meta">{meta}</p>
      <p class="tn-legend">{legend}</p></header>
    {"".join(cards)}
  </main>
</div>"""
    js = JS.replace("__ROOT__", json.dumps(prefix)).replace("__FIGS__", json.dumps(f"{prefix}-figs"))
    script = _json_script(figures, f"{prefix}-figs") + f"\n<script>{js}</script>"
    return markup, script


def _check(data_list) -> list[FeatureDashboardData]:
    if isinstance(data_list, FeatureDashboardData):
        data_list = [data_list]
    data_list = list(data_list)
    if not data_list:
        raise TellnormError("nothing to render: pass the FeatureDashboardData of at least one feature")
    for d in data_list:
        if not isinstance(d, FeatureDashboardData):
            raise TellnormError(f"cannot render {type(d).__name__}: pass FeatureDashboardData from "
                                "collect_dashboard_data (or load_dashboard_data)")
    return data_list


def dashboard_page(data_list: Sequence[FeatureDashboardData], title: str = DEFAULT_TITLE) -> str:
    """The full self-contained HTML document."""
    data_list = _check(data_list)
    markup, script = _body(data_list, title, "tn")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>body {{ margin:0; background:#f6f7f9; }} .tn-dash > .tn-nav {{ height:100vh; }}{CSS}</style>
{_plotly_script()}
</head>
<body>
{markup}
{script}
</body>
</html>
"""


def render_dashboard(data_list: Sequence[FeatureDashboardData], path: str | Path, title: str = DEFAULT_TITLE) -> Path:
    """Write one self-contained HTML page for all features in ``data_list`` (atomically); return its path."""
    from tellnorm.io import atomic_path

    page = dashboard_page(data_list, title)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def dashboard_html(data_list: Sequence[FeatureDashboardData], title: str = DEFAULT_TITLE) -> str:
    """An HTML fragment for notebooks: ``IPython.display.HTML(dashboard_html(data))`` (plotly.js inline)."""
    data_list = _check(data_list)
    markup, script = _body(data_list, title, f"tn-{uuid.uuid4().hex[:8]}")
    return f"<style>{CSS}</style>\n{_plotly_script()}\n{markup}\n{script}"
