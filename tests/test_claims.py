"""The claim verdicts follow their written rules: tables built by hand where the answer is known."""

from __future__ import annotations

import pandas as pd
import pytest

from tellnorm.studies import claims


def write(out, name, rows):
    pd.DataFrame(rows).to_csv(out / f"{name}.csv", index=False)


def profile_rows(ratios):
    rows = []
    for layer, r in enumerate(ratios):
        rows += [{"mode": "non-thinking", "layer": layer, "n_requests": 50, "mean_norm": 100.0},
                 {"mode": "thinking", "layer": layer, "n_requests": 50, "mean_norm": 100.0 * r}]
    return rows


@pytest.mark.parametrize("ratios, verdict", [
    ([1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.2, 1.3], claims.REPRODUCED),
    ([1.01, 1.5, 1.03, 1.04, 1.05, 1.06, 0.8, 1.02], claims.PARTLY),
    ([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.95, 0.9], claims.NOT_REPRODUCED),
])
def test_norm_gap(tmp_path, ratios, verdict):
    write(tmp_path, "norm_profile", profile_rows(ratios))
    assert claims.norm_gap(tmp_path).verdict == verdict


def suppression_rows(high, random):
    base = {"difficulty": "all", "layer_set": "late", "edit": "scale", "factor": 0.1, "n": 100}
    return [{**base, "selection": "high-norm", "seed": None, "diff_vs_clean": high[0], "diff_ci_low": high[1],
             "diff_ci_high": high[2]},
            {**base, "selection": "random", "seed": "pooled", "diff_vs_clean": random[0], "diff_ci_low": random[1],
             "diff_ci_high": random[2]}]


@pytest.mark.parametrize("high, random, verdict", [
    ((-0.6, -0.7, -0.5), (-0.1, -0.2, 0.0), claims.REPRODUCED),
    ((-0.1, -0.2, 0.0), (-0.6, -0.7, -0.5), claims.NOT_REPRODUCED),
    ((-0.3, -0.4, -0.2), (-0.35, -0.45, -0.25), claims.PARTLY),
])
def test_suppression(tmp_path, high, random, verdict):
    write(tmp_path, "suppression", suppression_rows(high, random))
    assert claims.suppression_is_causal(tmp_path).verdict == verdict


@pytest.mark.parametrize("delta, low, high, verdict", [
    (0.03, 0.01, 0.05, claims.REPRODUCED), (0.0, -0.01, 0.01, claims.NOT_REPRODUCED),
    (-0.07, -0.12, -0.02, claims.NOT_REPRODUCED)])
def test_technique_gain(tmp_path, delta, low, high, verdict):
    write(tmp_path, "evaluation", [{"method": "alrr", "difficulty": "all", "n": 200, "accuracy": 0.8 + delta,
                                    "delta_vs_greedy": delta, "delta_ci_low": low, "delta_ci_high": high}])
    result = claims.CLAIMS[6](tmp_path)
    assert result.verdict == verdict and f"{100 * delta:+.1f}" in result.measured


def test_bound_and_missing_tables(tmp_path):
    assert {v.verdict for v in claims.judge_all(tmp_path)} == {claims.NOT_TESTABLE}
    write(tmp_path, "bounds", [{"n_checked": 10, "violations": 0, "median_tightness": 0.1}])
    assert claims.bound_holds(tmp_path).verdict == claims.REPRODUCED
    write(tmp_path, "bounds", [{"n_checked": 10, "violations": 1, "median_tightness": 0.1}])
    assert claims.bound_holds(tmp_path).verdict == claims.NOT_REPRODUCED


def test_the_markdown_has_one_row_per_claim():
    verdicts = [claims.Verdict("a | b", "1", claims.REPRODUCED, "why")]
    text = claims.claims_markdown(verdicts)
    assert text.count("\n") == 2 and "**reproduced**" in text
