"""Accuracy of a model on the organism's held-out test set, by difficulty and thinking mode."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError
from tellnorm.organism import task

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from tellnorm.backends.base import ModelAPI

MODES = ("thinking", "non-thinking")


@dataclass
class EvalConfig:
    """What :func:`evaluate` runs: problems per difficulty, difficulties, modes, token budget, batch, seed."""

    per_difficulty: int = 100  # test problems per level and mode
    difficulties: tuple[int, ...] = tuple(range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
    modes: tuple[str, ...] = MODES
    max_new_tokens: int = task.RESPONSE_BUDGET
    batch_size: int = 50
    seed: int = 0  # bootstrap seed

    def __post_init__(self):
        for d in self.difficulties:
            task.check_difficulty(d)
        for m in self.modes:
            check_mode(m)
        if self.per_difficulty < 1:
            raise TellnormError(f"per_difficulty must be ≥ 1, got {self.per_difficulty}")


def check_mode(mode: str) -> bool:
    """Validate a mode name and return its ``enable_thinking`` value."""
    if mode not in MODES:
        raise TellnormError(f"unknown mode {mode!r}: choose 'thinking' or 'non-thinking'")
    return mode == "thinking"


def problem_prompts(model: ModelAPI, problems: Sequence[task.Problem], mode: str) -> list[list[int]]:
    """Token ids of each problem's chat prompt in ``mode`` ("thinking" or "non-thinking")."""
    thinking = check_mode(mode)
    return [model.encode(model.chat_prompt(p.prompt_text(), thinking=thinking)) for p in problems]


def evaluate(model: ModelAPI, cfg: EvalConfig | None = None, progress: bool = True,
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Greedy generations on the test split; returns ``(per_problem, summary)`` DataFrames."""
    import pandas as pd

    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.stats import grouped_mean_with_ci

    cfg = cfg or EvalConfig()
    split = task.test_split(cfg.per_difficulty)
    problems = [p for p in split.problems if p.difficulty in cfg.difficulties]
    majority = majority_answers()
    rows = []
    for mode in cfg.modes:
        prompts = problem_prompts(model, problems, mode)
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens),
                        request_ids=[f"{mode}/{i}" for i in range(len(problems))], batch_size=cfg.batch_size,
                        progress=progress, desc=f"evaluating ({mode})")
        for i, (p, g) in enumerate(zip(problems, gens)):
            predicted = task.parse_answer(model.token_strings(g.generated_ids))
            rows.append({
                "problem": i, "difficulty": p.difficulty, "mode": mode, "answer": p.answer, "predicted": predicted,
                "correct": predicted == p.answer, "majority_correct": majority[p.difficulty] == p.answer,
                "n_generated": len(g.generated_ids), "finish_reason": g.finish_reason,
            })
    per_problem = pd.DataFrame(rows)
    summary = grouped_mean_with_ci(per_problem.assign(correct=per_problem.correct.astype(float)),
                                   ["mode", "difficulty"], "correct", seed=cfg.seed)
    summary = summary.rename(columns={"mean": "accuracy"})
    baseline = per_problem[per_problem["mode"] == cfg.modes[0]].groupby("difficulty")["majority_correct"].mean()
    summary["majority_baseline"] = summary["difficulty"].map(baseline)
    return per_problem, summary


def majority_answers(samples_per_level: int = 2000, seed: int = 7) -> dict[int, int]:
    """Most frequent answer per level in the *training* distribution: the baseline a guesser can reach."""
    rng = random.Random(seed)
    return {d: Counter(task.make_problem(rng, d).answer for _ in range(samples_per_level)).most_common(1)[0][0]
            for d in range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1)}


def format_summary(summary: pd.DataFrame) -> str:
    """The summary of :func:`evaluate` as a plain-text table (accuracy, CI, majority baseline per mode and level)."""
    lines = [f"{'mode':<13}{'steps':>5}{'n':>6}{'accuracy':>10}   95% CI (bootstrap)   majority"]
    for r in summary.itertuples():
        lines.append(f"{r.mode:<13}{r.difficulty:>5}{r.n:>6}{r.accuracy:>10.3f}   [{r.ci_low:.3f}, {r.ci_high:.3f}]"
                     f"{r.majority_baseline:>15.3f}")
    return "\n".join(lines)


def accuracy_figure(summary: pd.DataFrame,
                    title: str = "Organism accuracy by number of steps (greedy, held-out test set)") -> go.Figure:
    """Accuracy per difficulty and mode with bootstrap CIs and the majority-answer baseline."""
    import plotly.graph_objects as go

    from tellnorm.figures import MODE_COLORS, NEUTRAL_COLOR, style

    fig = go.Figure()
    for mode, g in summary.groupby("mode", sort=False):
        g = g.sort_values("difficulty")
        fig.add_trace(go.Scatter(
            x=g.difficulty, y=g.accuracy, mode="lines+markers", name=mode, line={"color": MODE_COLORS.get(mode)},
            error_y={"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                     "arrayminus": g.accuracy - g.ci_low},
            customdata=g[["n"]].to_numpy(), hovertemplate="%{x} steps: %{y:.3f} (n=%{customdata[0]})<extra></extra>"))
    base = summary.drop_duplicates("difficulty").sort_values("difficulty")
    fig.add_trace(go.Scatter(x=base.difficulty, y=base.majority_baseline, mode="lines", name="majority answer",
                             line={"color": NEUTRAL_COLOR, "dash": "dash"}))
    fig.update_yaxes(range=[0, 1.02])
    return style(fig, title=title, x_title="difficulty (reasoning steps)", y_title="accuracy (95% bootstrap CI)")
