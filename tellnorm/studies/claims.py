"""The paper's claims, each judged from ``tellnorm reproduce``'s tables by an explicit rule.

A :class:`Claim` reads its stage table from the output folder and returns a :class:`Verdict`: what was measured
(the numbers the rule used, with n), the verdict — ``reproduced``, ``partly``, ``not reproduced`` or ``not testable
here`` — and why. The rules are written down here, next to the paper statement they test, so a reader can check a
verdict without rerunning anything; claims whose tables a run did not produce are ``not testable here``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE = "reproduced", "partly", "not reproduced", "not testable here"
MEAN_OVER_TASKS = "mean over tasks"  # the evaluation's average row of a run on several tasks (no CI: not judged)


@dataclass(frozen=True)
class Verdict:
    """One claim judged: the paper statement, what was measured (the numbers the rule used, with n), the verdict
    (:data:`REPRODUCED`, :data:`PARTLY`, :data:`NOT_REPRODUCED` or :data:`NOT_TESTABLE`) and the reason."""

    claim: str
    measured: str
    verdict: str
    reason: str


def _read(out: Path, name: str) -> pd.DataFrame | None:
    import pandas as pd

    path = out / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def _late(layers: list[int]) -> list[int]:
    n = len(layers)
    return layers[n - max(1, n // 4):]  # the last quarter (PAPER §1's "late layers")


@dataclass(frozen=True)
class Claim:
    """A paper statement, the stage table it is judged on, and the rule: ``judge(table) -> (measured, verdict,
    reason)``. A run that did not write the table makes the claim not testable."""

    text: str
    table: str
    judge: Callable[[pd.DataFrame], tuple[str, str, str]]

    def __call__(self, out: Path) -> Verdict:
        """The verdict on the tables in the output folder ``out`` (not testable when the table is missing). A table
        with a ``task`` column (a run on several tasks) is judged task by task: reproduced when it is on every
        task, not reproduced when on none, partly otherwise."""
        table = _read(Path(out), self.table)
        if table is None:
            return Verdict(self.text, "—", NOT_TESTABLE, f"this run wrote no {self.table}.csv")
        if "task" not in table.columns:
            return Verdict(self.text, *self.judge(table))
        tasks = [t for t in dict.fromkeys(table.task.astype(str)) if t != MEAN_OVER_TASKS]
        judged = {task: self.judge(table[table.task.astype(str) == task]) for task in tasks}
        if len(judged) == 1:
            return Verdict(self.text, *next(iter(judged.values())))
        verdicts = [v for _, v, _ in judged.values() if v != NOT_TESTABLE]
        verdict = (NOT_TESTABLE if not verdicts else REPRODUCED if all(v == REPRODUCED for v in verdicts)
                   else NOT_REPRODUCED if all(v == NOT_REPRODUCED for v in verdicts) else PARTLY)
        measured = "; ".join(f"{task}: {m}" for task, (m, _, _) in judged.items())
        reason = "; ".join(f"{task}: {v} ({r})" for task, (_, v, r) in judged.items())
        return Verdict(self.text, measured, verdict, reason)


def _norm_gap(profile) -> tuple:
    table = profile.pivot(index="layer", columns="mode", values="mean_norm")
    ratio = (table["thinking"] / table["non-thinking"]).round(3)
    layers = list(ratio.index)
    late = _late(layers)
    widest = int(ratio.idxmax())
    measured = (f"thinking / non-thinking mean norm per layer {', '.join(f'{v:.2f}' for v in ratio)} "
                f"(n = {int(profile.n_requests.max())} problems per mode)")
    if (ratio[late] > 1).all() and widest in late:
        return (measured, REPRODUCED, f"every late layer > 1 and the widest gap at layer {widest}")
    if (ratio > 1).mean() > 0.5:
        return (measured, PARTLY, f"larger in most layers, but the widest gap is at layer {widest} and "
                f"late layers {late} have ratios {', '.join(f'{ratio[l]:.2f}' for l in late)}")
    return (measured, NOT_REPRODUCED, "thinking norms are not larger in most layers")


def _peaks_mark_steps(table) -> tuple:
    steps = table[table.target == "step token"]
    measured = (f"recall of step tokens {steps.recall.min():.2f}–{steps.recall.max():.2f}, AUROC of the norm "
                f"{steps.auroc_norm.min():.2f}–{steps.auroc_norm.max():.2f} over layers "
                f"({int(steps.n_targets.iloc[0]):,} step tokens among {int(steps.n_tokens.iloc[0]):,})")
    if steps.auroc_norm.max() >= 0.7 and steps.recall.max() >= 0.5:
        return (measured, REPRODUCED, "some layer's peaks find most step tokens (AUROC ≥ 0.7)")
    return (measured, NOT_REPRODUCED, "no layer's peaks find the step tokens (rule: AUROC ≥ 0.7 and "
            "recall ≥ 0.5 at some layer)")


def _features_rise_late(trend) -> tuple:
    values = trend.set_index("layer")["thinking"]
    layers = list(values.index)
    late, first_half = _late(layers), layers[: len(layers) // 2]
    rise = values[late].mean() / values[layers[: len(layers) - len(late)]].mean()
    early = values[first_half]
    flat = (early.max() - early.min()) / early.mean() < 0.2
    measured = (f"mean top-{int(trend.k.iloc[0])} contrast-feature activation (thinking) per layer "
                f"{', '.join(f'{v:.2f}' for v in values)}; late / earlier = {rise:.2f}")
    rule = "rule: late mean ≥ 1.5× the earlier mean, and the first half within ±20%"
    if rise >= 1.5 and flat:
        return (measured, REPRODUCED, rule)
    if rise >= 1.5 or values.idxmax() in late:
        return (measured, PARTLY, f"{'a late rise' if rise >= 1.5 else 'the maximum is late'}, but "
                f"{'no flat early phase' if not flat else 'a weak rise'} ({rule})")
    return (measured, NOT_REPRODUCED, rule)


def _bound_holds(bounds) -> tuple:
    checks, violations = int(bounds.n_checked.sum()), int(bounds.violations.sum())
    measured = (f"{violations} violations in {checks:,} (token, feature) checks; median tightness "
                f"{bounds.median_tightness.min():.2f}–{bounds.median_tightness.max():.2f}")
    if violations == 0:
        return (measured, REPRODUCED, "the per-feature bound holds on every check (it is Cauchy–Schwarz); "
                "it is loose")
    return (measured, NOT_REPRODUCED, "the bound is violated")


def _suppression_is_causal(table) -> tuple:
    rows = table[(table.difficulty.astype(str) == "all") & (table.layer_set == "late") & (table.edit == "scale")
                 & (table.factor == 0.1)]
    high = rows[rows.selection == "high-norm"]
    random = rows[(rows.selection == "random") & (rows.seed.astype(str) == "pooled")]
    if high.empty or random.empty:
        return ("—", NOT_TESTABLE, "the run has no late ×0.1 high-norm and pooled random rows")
    h, r = high.iloc[0], random.iloc[0]
    measured = (f"Δ accuracy vs clean: high-norm {h.diff_vs_clean:+.2f} "
                f"[{h.diff_ci_low:+.2f}, {h.diff_ci_high:+.2f}], "
                f"random matched fraction {r.diff_vs_clean:+.2f} [{r.diff_ci_low:+.2f}, {r.diff_ci_high:+.2f}] "
                f"(n = {int(h.n)} problems)")
    if h.diff_ci_high < r.diff_ci_low:
        return (measured, REPRODUCED, "high-norm suppression hurts more (CIs apart)")
    if r.diff_ci_high < h.diff_ci_low:
        return (measured, NOT_REPRODUCED, "random suppression hurts more (CIs apart)")
    return (measured, PARTLY, "the two overlap: no clear difference")


def _profiles_align(table) -> tuple:
    norm = table[table.signal == "norm"].iloc[0]
    measured = (f"Spearman ×100 {norm.spearman_x100:.1f} [{norm.ci_low:.1f}, {norm.ci_high:.1f}] "
                f"over {int(norm.n)} layers")
    if norm.ci_low >= 80:
        return (measured, REPRODUCED, f"aligned; with {int(norm.n)} layers a rank correlation is coarse")
    return (measured, NOT_REPRODUCED, "rule: the CI's lower end ≥ 80")


def _technique(method: str, paper: str) -> Claim:
    def judge(table) -> tuple:
        rows = table[(table.method == method) & (table.difficulty.astype(str) == "all")]
        if rows.empty:
            return ("—", NOT_TESTABLE, f"{method} was not evaluated in this run")
        row = rows.iloc[0]
        measured = (f"{100 * row.accuracy:.1f}% vs greedy {100 * (row.accuracy - row.delta_vs_greedy):.1f}%: "
                    f"Δ {100 * row.delta_vs_greedy:+.1f} "
                    f"[{100 * row.delta_ci_low:+.1f}, {100 * row.delta_ci_high:+.1f}] "
                    f"points (n = {int(row.n)} problems, compute-matched baselines in the report)")
        if row.delta_ci_low > 0:
            return (measured, REPRODUCED, "the gain's CI excludes 0")
        if row.delta_ci_high < 0:
            return (measured, NOT_REPRODUCED, "it lowers accuracy (CI below 0)")
        return (measured, NOT_REPRODUCED, "no gain: the CI includes 0")

    text = f"{method.split('@')[0].upper()} improves accuracy (Qwen3-4B, 7 benchmarks: {paper}; §6–7)"
    return Claim(text, "evaluation", judge)


def _loops_collapse(table) -> tuple:
    loops = table[table.sweep == "alrr forced loops"]
    greedy = table[table.sweep == "reference"]
    if loops.empty or greedy.empty:
        return ("—", NOT_TESTABLE, "the run skipped the loop sweep")
    base = float(greedy.accuracy.iloc[0])
    acc = dict(zip(loops.setting.astype(str), loops.accuracy))
    measured = (f"forced loops {', '.join(acc)}: {', '.join(f'{100 * a:.1f}' for a in acc.values())}% "
                f"(greedy {100 * base:.1f}%, n = {int(loops.n.iloc[0])})")
    last = list(acc.values())[-1]
    if base - last >= 0.1:
        return (measured, REPRODUCED, "accuracy falls by ≥ 10 points with the most loops")
    return (measured, NOT_REPRODUCED, "rule: a fall of ≥ 10 points")


norm_gap = Claim(
    "thinking states have larger ℓ2 norms than non-thinking ones, the gap widest in late layers (§1)",
    "norm_profile", _norm_gap)
peaks_mark_steps = Claim(
    "norm peaks (above Q3 + 1.5·IQR) mark the critical reasoning steps (§1)",
    "norm_peaks_vs_steps", _peaks_mark_steps)
features_rise_late = Claim(
    "reasoning-feature activation is flat in early layers and rises sharply in the last quarter (§2)",
    "feature_trend", _features_rise_late)
bound_holds = Claim("the norm bounds reasoning-feature activation (the theorem, §3)", "bounds", _bound_holds)
suppression_is_causal = Claim(
    "suppressing high-norm states (×0.1, late layers) hurts accuracy far more than suppressing random ones (§4)",
    "suppression", _suppression_is_causal)
profiles_align = Claim(
    "the norm profile and the reasoning-feature profile align across layers (Spearman ×100 84–88, §4)",
    "correlation", _profiles_align)
loops_collapse = Claim(
    "forcing 8 recursion loops collapses accuracy (AIME24 70.0 → 36.7, §6)",
    "evaluation_sensitivity", _loops_collapse)


def real_benchmarks(out: Path) -> Verdict:
    """The real-benchmark claim (PAPER.md §7): always not testable here, whatever ``out`` holds."""
    return Verdict("the techniques' gains on AIME / MATH500 / GPQA with Qwen3, R1-Distill and Qwen2.5 models (§7)",
                   "—", NOT_TESTABLE, "no machine here can download their weights or datasets; `tellnorm harness` "
                   "and notebook 05 run that path where they are present")


CLAIMS = (norm_gap, peaks_mark_steps, features_rise_late, bound_holds, suppression_is_causal, profiles_align,
          _technique("alrr", "70.56 → 73.72"), _technique("erss", "→ 73.37"),
          _technique("lrs-D@late@8", "→ 73.25"),
          loops_collapse, real_benchmarks)


def judge_all(out: Path) -> list[Verdict]:
    """Every claim of :data:`CLAIMS` judged on the tables in the output folder ``out``, in that order."""
    return [claim(Path(out)) for claim in CLAIMS]


def claims_markdown(verdicts: list[Verdict]) -> str:
    """The verdicts as a Markdown table: paper claim, measured here, verdict (bold), why (the rule)."""
    import pandas as pd

    from tellnorm.io import markdown_table

    rows = [[v.claim, v.measured, f"**{v.verdict}**", v.reason] for v in verdicts]
    return markdown_table(pd.DataFrame(rows, columns=["paper claim", "measured here", "verdict", "why (the rule)"]))
