"""End to end: the main job on the shipped organism and SAEs (quick sizes), every artifact written."""

import pytest


@pytest.mark.slow
def test_reproduce_quick_writes_every_artifact(tmp_path):
    import pandas as pd

    from tellnorm.reproduce import ReproduceConfig, reproduce

    reproduce(ReproduceConfig(out=str(tmp_path), quick=True))
    expected = ["organism_accuracy.csv", "organism_accuracy.html", "norm_profile.csv", "norm_trend.html",
                "norm_heatmap.html", "norms_per_token.parquet", "norm_peaks_vs_steps.csv", "sae_quality.csv",
                "feature_trend.csv", "feature_trend.html", "features_reasonscore_top100.csv",
                "features_token_injection.csv", "dashboard.html", "REPORT.md", "norm_profile_matched.csv",
                "feature_trend_matched.csv", "bounds.csv", "bounds_assumptions.csv", "bounds_pairs.csv",
                "correlation.csv", "suppression.csv", "suppression.html", "evaluation.csv", "evaluation.md",
                "evaluation_responses.csv", "evaluation.html", "report.html"]
    missing = [name for name in expected if not (tmp_path / name).is_file()]
    assert not missing
    assert not list(tmp_path.glob(".*partial*"))  # no half-written file left behind
    acc = pd.read_csv(tmp_path / "organism_accuracy.csv")
    assert set(acc["mode"]) == {"thinking", "non-thinking"} and (acc["n"] == 4).all()
    assert ((acc.ci_low <= acc.accuracy) & (acc.accuracy <= acc.ci_high)).all()
    report = (tmp_path / "REPORT.md").read_text()
    for section in ("Organism accuracy", "L2 norm by layer", "norm peaks", "SAEs and reasoning features",
                    "The theorem, checked", "Correlation", "Interventions", "Test-time techniques"):
        assert section in report
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Test-time techniques" in html and html.count("<table>") >= report.count("\n|---") > 0
