"""Feature dashboards: data from one streaming pass (:mod:`.data`), rendered as self-contained HTML (:mod:`.html`).

    data = collect_dashboard_data(model, sae, layer, feature_ids, sequences, scores=scores)
    render_dashboard(data, "dashboards/layer12.html")          # one page, opens with no network
    IPython.display.HTML(dashboard_html(data))                 # inline in a notebook
"""

from pathlib import Path
from typing import Any

from tellnorm.apps.dashboards.data import (
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
from tellnorm.apps.dashboards.html import dashboard_html, dashboard_page, render_dashboard

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
    "dashboard_study",
    "load_dashboard_data",
    "logit_effects",
    "render_dashboard",
    "save_dashboard_data",
    "top_feature_ids",
]


def dashboard_study(model: Any, saes: dict, corpus: Any, features: dict, scores: dict, path: Path) -> Path:
    """One offline HTML page with a dashboard for each chosen feature (default: top features of late layers)."""
    from tellnorm.features import check_features

    features = check_features(saes, features)
    data = []
    for layer, feats in features.items():
        data += collect_dashboard_data(model, saes[layer], layer, list(feats), corpus.sequences,
                                       scores={f: scores.get((layer, f), {}) for f in feats})
    render_dashboard(data, path, title=f"tellnorm feature dashboards: {model.name}")
    return path
