"""Ground-truth peak analysis: AUROC against brute force, thresholds against numpy quantiles, the controls."""

import numpy as np
import pandas as pd
import pytest

from tellnorm.studies.groundtruth import auroc, peak_composition, peak_mask, peak_table, position_residual


def _brute_auroc(scores, positives):
    pos, neg = scores[positives], scores[~positives]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=300).astype(float)  # many ties
    positives = rng.random(300) < 0.3
    assert auroc(scores, positives) == pytest.approx(_brute_auroc(scores, positives), abs=1e-12)
    assert np.isnan(auroc(scores, np.zeros(300, bool)))


def _frame(rng, n_requests=6, length=60, step_boost=0.0, slope=0.0):
    rows = []
    for r in range(n_requests):
        for p in range(1, length):
            label = "step" if p % 7 == 0 else "operand"
            nxt = "step" if (p + 1) % 7 == 0 else "operand"
            norm = 10 + r + slope * p + rng.normal(0, 1) + (step_boost if label == "step" else 0)
            rows.append({"request_id": r, "position": p, "layer": 0, "norm": norm, "label": label,
                         "next_label": nxt, "token": "7" if label == "step" else rng.choice(["7", "a", "+"]),
                         "mode": "thinking", "is_generated": True, "is_position_zero": False})
    return pd.DataFrame(rows)


def test_peak_mask_uses_each_responses_own_quartiles():
    f = _frame(np.random.default_rng(1))
    mask = peak_mask(f)
    for _, g in f.groupby("request_id"):
        q1, q3 = np.quantile(g.norm, [0.25, 0.75])
        expected = g.norm > q3 + 1.5 * max(q3 - q1, 1e-3)
        assert (mask[g.index] == expected).all()


def test_position_residual_removes_a_linear_position_trend():
    f = _frame(np.random.default_rng(2), slope=0.5)
    f["norm"] = 3.0 + f["request_id"] + 0.5 * f["position"]  # exact linear trend, per-request intercept
    assert np.abs(position_residual(f)).max() < 1e-9


def test_table_finds_a_planted_signal_and_its_absence():
    rng = np.random.default_rng(3)
    planted = peak_table(_frame(rng, step_boost=6.0)).set_index(["target", "layer"])
    assert planted.loc[("step token", 0), "auroc_norm"] > 0.95
    assert planted.loc[("step token", 0), "recall"] > 0.5
    assert planted.loc[("step token", 0), "auroc_same_token"] > 0.9  # restricted to the shared token "7"
    null = peak_table(_frame(rng, step_boost=0.0)).set_index(["target", "layer"])
    assert abs(null.loc[("step token", 0), "auroc_norm"] - 0.5) < 0.12


def test_a_pure_position_effect_is_caught_by_the_control():
    rng = np.random.default_rng(4)
    f = _frame(rng, slope=0.3)
    f.loc[f.label == "step", "position"] += 0  # steps spread over positions; make targets late instead:
    f["label"] = np.where(f.position > 45, "step", "operand")
    t = peak_table(f).set_index(["target", "layer"]).loc[("step token", 0)]
    assert t.auroc_norm > 0.8 and t.auroc_position_only > 0.95
    assert abs(t.auroc_norm_minus_position - 0.5) < 0.15


def test_peak_composition_counts_the_peaks_by_label():
    rng = np.random.default_rng(5)
    f = _frame(rng, step_boost=8.0)
    comp = peak_composition(f).set_index("layer").loc[0]
    mask = peak_mask(f)
    assert comp.n_peaks == mask.sum()
    assert comp.share_step == pytest.approx((f[mask].label == "step").mean())
    assert "'7'" in comp.top_tokens
