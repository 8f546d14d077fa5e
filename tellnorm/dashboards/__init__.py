"""Feature dashboards: data from one streaming pass (:mod:`.data`), rendered as self-contained HTML (:mod:`.html`).

    data = collect_dashboard_data(model, sae, layer, feature_ids, sequences, scores=scores)
    render_dashboard(data, "dashboards/layer12.html")          # one page, opens with no network
    IPython.display.HTML(dashboard_html(data))                 # inline in a notebook
"""

from tellnorm.dashboards.data import (
    ContextExample,
    FeatureActivationObserver,
    FeatureDashboardData,
    Histogram,
    LogitEffect,
    NormCorrelation,
    collect_dashboard_data,
    load_dashboard_data,
    logit_effects,
    save_dashboard_data,
    top_feature_ids,
)
from tellnorm.dashboards.html import dashboard_html, dashboard_page, render_dashboard

__all__ = [
    "ContextExample",
    "FeatureActivationObserver",
    "FeatureDashboardData",
    "Histogram",
    "LogitEffect",
    "NormCorrelation",
    "collect_dashboard_data",
    "dashboard_html",
    "dashboard_page",
    "load_dashboard_data",
    "logit_effects",
    "render_dashboard",
    "save_dashboard_data",
    "top_feature_ids",
]
