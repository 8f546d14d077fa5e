"""``tellnorm reproduce --model M --saes S --task T``: the paper's study on any supported model and its tasks.

The stages of :mod:`tellnorm.apps.reproduce` with the organism's specifics replaced by the task's: problems and
gold answers from :mod:`tellnorm.tasks`, matched positions = the tokens that write the stated answer (the task's
extractor), generation budgets and sampling of the paper's code (4,096 tokens for the responses, 2,048 for
suppression, 1,024 for the techniques; temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05), and the
paper's per-request streaming thresholds with their warm-ups for the suppression study.

The responses are generated once (on ``--backend``: vLLM for real models) and every analysis that reads them runs
teacher-forced on the HF backend: norms, SAE features, the bound, the correlation. What needs the organism's step
labels (do norm peaks mark the steps?) is skipped with the reason in the report.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tellnorm.studies.claims import MEAN_OVER_TASKS

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import SamplingConfig
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.tasks import Task


class Context(Protocol):
    """What a task stage reads from ``tellnorm.apps.reproduce.Context`` (named here, not imported: the stage list
    there imports this module)."""

    cfg: Any  # tellnorm.apps.reproduce.ReproduceConfig
    out: Path
    report: Any  # tellnorm.apps.reproduce.Report: .add(title, body)

    @property
    def model(self) -> ModelAPI:
        """The model on the HF backend (teacher-forced passes, SAEs)."""

    @property
    def saes(self) -> dict[int, Any]:
        """``{layer: SAE}`` checked against the model."""

    @property
    def tasks(self) -> list[Task]:
        """The run's tasks."""

    @property
    def generator(self) -> ModelAPI:
        """The model on the generation backend."""

    @property
    def contrast(self) -> ModelAPI | None:
        """The non-thinking model, if any."""

    @property
    def corpus(self) -> ContrastCorpus:
        """The features stage's contrast corpus."""

RESPONSES_FILE = "responses.parquet"
SKIPPED_FILE = "skipped_stages.json"


def sampling_config(cfg: Any, max_new_tokens: int, seed: int = 0) -> SamplingConfig:
    """The paper code's sampling (or greedy, ``cfg.sampling``) with ``max_new_tokens``."""
    from tellnorm.generation import SamplingConfig

    if cfg.sampling == "greedy":
        return SamplingConfig(max_new_tokens=max_new_tokens)
    return SamplingConfig.paper(max_new_tokens=max_new_tokens, seed=seed)


def _code(text: str) -> str:
    return "```\n" + text + "\n```"


def _responses(ctx: Context) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(ctx.out / RESPONSES_FILE)


def check_run(ctx: Context) -> None:
    """Everything that can fail before generation, one TellnormError line each: the tasks, both modes (switch or
    contrast model), the SAEs against the model."""
    from tellnorm.studies.responses import mode_models

    ctx.tasks  # noqa: B018 (loads and checks every task file)
    mode_models(ctx.model, None if ctx.cfg.contrast_model is None else ctx.contrast)
    ctx.saes  # noqa: B018 (SAEs of another model, width or hook fail here)


def stage_task_accuracy(ctx: Context) -> None:
    """Every problem of every task in both modes, generated once and stored; accuracy per task, mode and group."""
    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv, write_parquet
    from tellnorm.studies.responses import accuracy_table, generate_responses, mode_models

    cfg = ctx.cfg
    models = mode_models(ctx.generator, ctx.contrast)
    responses = generate_responses(models, ctx.tasks, sampling_config(cfg, cfg.max_new_tokens),
                                   batch_size=16, progress=True)
    write_parquet(responses, ctx.out / RESPONSES_FILE)
    table = accuracy_table(responses, ctx.model.name)
    write_csv(table, ctx.out / "accuracy.csv")
    write_figure(task_accuracy_figure(table), ctx.out / "accuracy")
    how = ("greedy" if cfg.sampling == "greedy" else "the paper code's sampling (temperature 0.7, top-p 0.8, top-k "
           "20, repetition penalty 1.05, seed 0)")
    non_thinking = (f"`{cfg.contrast_model}` (the contrast model)" if cfg.contrast_model is not None
                    else "the model's own switch (registry: `tellnorm/data/thinking_switches.yaml`)")
    view = table[["task", "mode", "group", "n", "accuracy", "ci_low", "ci_high", "answered", "mean_generated",
                  "hit_budget"]]
    ctx.report.add("Accuracy per task, thinking vs non-thinking", "\n\n".join([
        f"Responses of {ctx.model.name} to every problem, {how}, at most {cfg.max_new_tokens} new tokens, on the "
        f"{cfg.backend} backend; non-thinking mode from {non_thinking}. Accuracy with a bootstrap 95% CI over "
        "problems; `answered` = share where the extractor found an answer; `hit_budget` = share cut at the budget.",
        _code(view.round(3).to_string(index=False)), "![accuracy](accuracy.png)"]))


def task_accuracy_figure(table: pd.DataFrame) -> go.Figure:
    """Accuracy per task (whole task) and mode with 95% CIs, grouped bars."""
    import plotly.graph_objects as go

    from tellnorm.figures import MODE_COLORS, style

    whole = table[table.group == "all"]
    fig = go.Figure()
    for mode, g in whole.groupby("mode", sort=False):
        fig.add_bar(x=g.task, y=g.accuracy, name=mode, marker_color=MODE_COLORS.get(mode),
                    error_y={"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                             "arrayminus": g.accuracy - g.ci_low})
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.05])
    return style(fig, title="Accuracy per task and mode (95% CI over problems)", x_title="task",
                 y_title="accuracy")


def stage_task_profile(ctx: Context) -> None:
    """The norm profile per layer from teacher-forced passes over the stored responses: all generated tokens, the
    answer tokens both modes write, token by token."""
    from tellnorm.studies.profile import format_matched, profile_study
    from tellnorm.studies.responses import trace_responses

    trace = trace_responses(ctx.model, _responses(ctx), ctx.tasks, limit=ctx.cfg.problems)
    _, profile, matched = profile_study(None, [], ctx.out, trace=trace, token_sets=("all tokens", "answer"))
    body = ["Mean ‖h‖₂ of generated tokens per layer (position 0 excluded), teacher-forced on the HF backend over the "
            "stored responses of problems answered in both modes; 95% CI over responses.",
            _code(profile.pivot(index="layer", columns="mode", values="mean_norm").round(3).to_string()),
            "![norm trend](norm_trend.png)", "One thinking response token by token:", "![heatmap](norm_heatmap.png)"]
    if matched is not None:
        body += ["Like with like: the tokens that write the stated answer (located by the task's extractor) in both "
                 "modes, paired by problem:", _code(format_matched(matched)),
                 "![matched](norm_trend_matched.png)"]
    else:
        body.append("Matched positions: no problem has an extracted answer in both modes, so none are compared.")
    ctx.report.add("Hidden-state L2 norm by layer (generated tokens, position 0 excluded)", "\n\n".join(body))


def skip_peaks(ctx: Context) -> None:
    """The ground-truth stage needs per-token step labels, which only the organism has: recorded as skipped."""
    skipped(ctx, "peaks", "needs per-token step labels (which token computes a reasoning step): only the organism's "
            "task has them")


def skipped(ctx: Context, stage: str, reason: str) -> None:
    """Record ``stage`` as skipped for ``reason`` in the report and in ``skipped_stages.json``."""
    from tellnorm.io import atomic_path

    path = ctx.out / SKIPPED_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    found[stage] = reason
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    ctx.report.add(f"Skipped: {stage}", f"Not run on this model: {reason}.")


def response_corpus_for(ctx: Context) -> ContrastCorpus:
    """The features stage's contrast corpus: the stored responses of problems answered in both modes."""
    from tellnorm.studies.responses import response_corpus

    return response_corpus(ctx.model, _responses(ctx), ctx.tasks, limit=ctx.cfg.problems)


def stage_task_interventions(ctx: Context) -> None:
    """The suppression study on each task (high-norm vs random matched fraction, the paper's factors and layer
    sets, its per-request streaming τ with the warm-up), scored by the task's answers; one table with a task column."""
    import pandas as pd

    from tellnorm.io import write_csv
    from tellnorm.studies.suppression import InterventionConfig, format_suppression, run_intervene
    from tellnorm.thresholds import ThresholdConfig

    cfg = ctx.cfg
    quick = dict(factors=(0.1,), amplify=(), random_seeds=(0,), feature_seeds=(0,),
                 steering_scales=(-1.0, 1.0)) if cfg.quick else {}
    icfg = InterventionConfig(saes=cfg.saes if isinstance(cfg.saes, str) else "organism",
                              max_new_tokens=cfg.suppression_max_new_tokens, threshold_mode="exact",
                              threshold=ThresholdConfig(), **quick)
    tables = []
    for task in ctx.tasks:
        folder = ctx.out / "suppression" / task.name
        result = run_intervene(ctx.generator, icfg, folder, task=task, progress=True)
        tables.append(result["suppression"].assign(task=task.name))
    table = pd.concat(tables, ignore_index=True)
    table = table[["task"] + [c for c in table.columns if c != "task"]]
    write_csv(table, ctx.out / "suppression.csv")
    warmup = ThresholdConfig().warmup_steps
    ctx.report.add("Interventions: does suppressing high-norm states hurt reasoning?", "\n\n".join([
        "After each layer of a set, on generated tokens, thinking mode: high-norm states (‖h‖ > τ, the paper code's "
        f"per-request streaming τ = Q3 + 1.5·IQR with a warm-up of {warmup} decode steps) scaled by c or clamped to "
        "τ/4, against a random matched fraction of tokens; scored by each task's answers. Per task: "
        "`suppression/<task>/`.",
        *[f"**{task.name}**\n\n" + _code(format_suppression(t.drop(columns="task")))
          for task, t in zip(ctx.tasks, tables)]]))


def stage_task_evaluation(ctx: Context) -> None:
    """ALRR, ERSS and LRS against the compute-matched baselines on each task, and their mean over tasks (the
    paper's tables average benchmarks)."""
    from tellnorm.io import write_csv
    from tellnorm.studies.evaluation import EvaluateConfig, run_evaluate

    cfg = ctx.cfg
    quick = dict(calibration_per_difficulty=2, sample_sizes=(cfg.n_samples,), sensitivity=False,
                 controls=False) if cfg.quick else {}
    tables = []
    for task, spec in zip(ctx.tasks, cfg.tasks):
        ecfg = EvaluateConfig(task=spec.partition("=")[0], extractor=task.extractor,
                              max_new_tokens=cfg.evaluation_max_new_tokens, n_samples=cfg.n_samples,
                              batch_size=16, **quick)
        result = run_evaluate(ctx.generator, ecfg, ctx.out / "evaluation" / task.name, progress=True, task=task)
        tables.append(result["summary"].assign(task=task.name))
    table = mean_over_tasks(tables)
    write_csv(table, ctx.out / "evaluation.csv")
    whole = table[table.difficulty.astype(str) == "all"]
    view = whole.pivot_table(index="method", columns="task", values="accuracy", sort=False)
    ctx.report.add("Test-time techniques: ALRR, ERSS, LRS against compute-matched baselines", "\n\n".join([
        f"Greedy single-pass methods and N = {cfg.n_samples} samples per problem for the selectors, at most "
        f"{cfg.evaluation_max_new_tokens} new tokens; accuracy per task and the unweighted mean over tasks (the "
        "paper's `avg` column). Per-task tables, CIs and compute: `evaluation/<task>/`, all rows in `evaluation.csv`.",
        _code((100 * view).round(1).to_string())]))


def mean_over_tasks(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-task summaries (each with a ``task`` column) and, per method, the unweighted mean over tasks of the
    whole-task rows (accuracy and Δ vs greedy; n summed), as the paper's tables average benchmarks."""
    import pandas as pd

    table = pd.concat(tables, ignore_index=True)
    table = table[["task"] + [c for c in table.columns if c != "task"]]
    whole = table[table.difficulty.astype(str) == "all"]
    if len(tables) > 1:
        mean = (whole.groupby(["method", "family", "n_samples", "seeds"], sort=False, dropna=False)
                .agg(n=("n", "sum"), accuracy=("accuracy", "mean"), delta_vs_greedy=("delta_vs_greedy", "mean"),
                     n_tasks=("task", "nunique")).reset_index())
        mean = mean[mean.n_tasks == len(tables)].drop(columns="n_tasks").assign(task=MEAN_OVER_TASKS,
                                                                                 difficulty="all")
        table = pd.concat([table, mean], ignore_index=True)
    return table


def stage_task_explorer(ctx: Context) -> None:
    """The feature explorer over a few stored responses of each mode (every feature of every SAE layer, streamed one
    layer at a time)."""
    from tellnorm.apps.explorer import iter_explorer_docs, write_site
    from tellnorm.studies.corpus import ContrastCorpus

    corpus = ctx.corpus
    n = max(1, min(ctx.cfg.explorer_per_difficulty, len(corpus.thinking)))
    keep = corpus.thinking[:n] + [i for i, m in enumerate(corpus.modes) if m != "thinking"][:n]
    small = ContrastCorpus(**{k: [v[i] for i in keep] if isinstance(v, list) else v
                              for k, v in asdict(corpus).items()})
    docs = iter_explorer_docs(ctx.model, ctx.saes, small, max_new_tokens=ctx.cfg.evaluation_max_new_tokens)
    index = write_site(docs, ctx.out / "explorer", title=f"tellnorm explorer: {ctx.model.name}")
    ctx.report.add("Feature explorer", f"Offline site (not in git: {sum(1 for _ in index.parent.rglob('*'))} files): "
                   "[explorer/index.html](explorer/index.html) — every feature of every SAE layer over "
                   f"{n} stored response(s) per mode.")
