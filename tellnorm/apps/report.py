"""``tellnorm report``: the paper's result tables across models, merged from the folders ``tellnorm reproduce`` wrote.

Each input folder is one run (one model) and holds the contract files: ``accuracy.csv`` (or the organism's
``organism_accuracy.csv``), ``evaluation.csv``, ``correlation.csv``, ``norm_profile.csv``, optionally
``claims.csv`` and ``manifest.json`` (whose ``config.model`` names the model; the folder name otherwise). The pure
functions below merge DataFrames keyed by the run's label; :func:`build_report` is the thin file layer: it reads
and checks every folder before it writes anything, then writes

* ``cross_model_accuracy.csv``: task × mode × model (group "all" where the run has it, else every group);
* ``cross_model_spearman.csv``: the paper's Spearman table (PAPER.md §4), signal rows × model columns;
* ``cross_model_techniques.csv``: method × task × model, accuracy and Δ vs greedy with CIs and compute, plus a
  "mean over tasks" row per model with two or more tasks (the run's own, else the unweighted mean, said so in
  ``source``);
* ``cross_model_claims.csv`` when any run has ``claims.csv``: claim × model verdicts;
* ``REPORT.md`` (and ``report.html``) with those tables and two figures: accuracy per benchmark and model, and the
  normalised norm profile per model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

ORGANISM_TASK = "organism"  # the task of a run whose tables have no task column
ALL = "all"  # the group / difficulty value of a whole task
MEAN_OVER_TASKS = "mean over tasks"
MEASURED = "measured"
GIVEN_MEAN = "mean over tasks as written by the run"

# file -> the columns this report reads from it (other columns are ignored)
ACCURACY_COLUMNS = ("task", "mode", "group", "n", "accuracy", "ci_low", "ci_high")
ORGANISM_ACCURACY_COLUMNS = ("mode", "difficulty", "n", "accuracy", "ci_low", "ci_high")
EVALUATION_COLUMNS = ("method", "difficulty", "n", "accuracy", "ci_low", "ci_high", "delta_vs_greedy",
                      "delta_ci_low", "delta_ci_high")
CORRELATION_COLUMNS = ("signal", "basis", "spearman_x100", "ci_low", "ci_high")
NORM_PROFILE_COLUMNS = ("mode", "layer", "mean_norm")
CLAIMS_COLUMNS = ("claim", "verdict")
REQUIRED_FILES = {"evaluation.csv": EVALUATION_COLUMNS, "correlation.csv": CORRELATION_COLUMNS,
                  "norm_profile.csv": NORM_PROFILE_COLUMNS}
ACCURACY_FILES = {"accuracy.csv": ACCURACY_COLUMNS, "organism_accuracy.csv": ORGANISM_ACCURACY_COLUMNS}

COMPUTE_COLUMNS = ("generated_tokens", "extra_block_passes", "block_passes")
TECHNIQUE_COLUMNS = ("task", "method", "family", "n_samples", "model", "n", "accuracy", "ci_low", "ci_high",
                     "delta_vs_greedy", "delta_ci_low", "delta_ci_high", *COMPUTE_COLUMNS, "source")
# the methods REPORT.md shows (the CSV has them all): evaluation's key methods, whatever N the run sampled
REPORT_METHODS = re.compile(r"(greedy|alrr|erss|alrr\+erss|sample|majority@\d+|lrs-D@late@\d+|self-certainty@\d+"
                            r"|deepconf-lowest-filter10@\d+|pass@\d+)")
MODEL_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


# --- pure functions over DataFrames -----------------------------------------------------------------------------

def organism_accuracy_rows(table: pd.DataFrame, model: str) -> pd.DataFrame:
    """The organism's ``organism_accuracy.csv`` rows in ``accuracy.csv``'s columns: task "organism", group = the
    difficulty. No "all" row is made up: the organism's file has none, and its CI could not be rebuilt from it."""
    out = table.rename(columns={"difficulty": "group"})[[c for c in ACCURACY_COLUMNS if c != "task"]].copy()
    out.insert(0, "task", ORGANISM_TASK)
    out.insert(0, "model", model)
    out["group"] = out["group"].astype(str)
    return out


def cross_model_accuracy(accuracy: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows task × mode × model (``accuracy``: label → that run's ``accuracy.csv`` rows, in report order): the
    whole task (group "all") where the run has it, else every group. Columns task, mode, model, group, n, accuracy,
    ci_low, ci_high; tasks in order of first appearance, thinking before non-thinking, models in ``accuracy``'s
    order."""
    import pandas as pd

    parts = []
    for label, table in accuracy.items():
        t = table.assign(model=label, group=table["group"].astype(str), task=table["task"].astype(str))
        whole = t.groupby(["task", "mode"], sort=False)["group"].transform(lambda g: (g == ALL).any())
        parts.append(t[~whole | (t["group"] == ALL)])
    merged = pd.concat(parts, ignore_index=True)[["task", "mode", "model", "group", "n", "accuracy", "ci_low",
                                                  "ci_high"]]
    return _order(merged, {"task": _first_seen(merged["task"]), "mode": _modes(merged["mode"]),
                           "model": list(accuracy)})


def spearman_text(rho: float, lo: float, hi: float) -> str:
    """``"ρ×100 [lo, hi]"`` to one decimal, as the paper's table reads; "—" when ρ is undefined, no bracket
    without a CI."""
    if _missing(rho):
        return "—"
    return f"{rho:.1f}" if _missing(lo) or _missing(hi) else f"{rho:.1f} [{lo:.1f}, {hi:.1f}]"


def cross_model_spearman(correlation: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's Spearman table (PAPER.md §4): one row per (signal, basis) any run measured, the paper's value
    where it reported one for that basis, then per model its text cell ``"ρ×100 [lo, hi]"`` (column = the label)
    and the numbers behind it (``LABEL: rho_x100``, ``LABEL: ci_low``, ``LABEL: ci_high``). Rows no run could
    compute (ρ undefined everywhere) are left out."""
    import pandas as pd

    from tellnorm.signals import FINAL
    from tellnorm.studies.correlation import PAPER_SPEARMAN_X100

    keys: list[tuple[str, str]] = []
    for table in correlation.values():
        keys += [k for k in zip(table["signal"].astype(str), table["basis"].astype(str)) if k not in keys]
    rows = []
    for signal, basis in keys:
        # the paper's one basis per signal, as tellnorm.studies.correlation.paper_table picks it
        paper_basis = "problems" if signal == FINAL else "layers"
        row: dict[str, object] = {"signal": signal, "basis": basis,
                                  "paper": PAPER_SPEARMAN_X100.get(signal, "") if basis == paper_basis else ""}
        values: dict[str, float] = {}
        for label, table in correlation.items():
            hit = table[(table["signal"].astype(str) == signal) & (table["basis"].astype(str) == basis)]
            rho, lo, hi = (float(hit.iloc[0][c]) for c in ("spearman_x100", "ci_low", "ci_high")) if len(hit) else \
                (math.nan,) * 3
            row[label] = spearman_text(rho, lo, hi)
            values.update({f"{label}: rho_x100": rho, f"{label}: ci_low": lo, f"{label}: ci_high": hi})
        if all(_missing(values[f"{label}: rho_x100"]) for label in correlation):
            continue
        rows.append({**row, **values})
    return pd.DataFrame(rows)


def task_rows(evaluation: pd.DataFrame) -> pd.DataFrame:
    """One run's whole-task rows of ``evaluation.csv`` (difficulty "all"), with a ``task`` column ("organism" when
    the file has none) and ``source`` = "measured", or the run's own mean-over-tasks wording for its
    "mean over tasks" rows."""
    t = evaluation.copy()
    if "task" not in t.columns:
        t.insert(0, "task", ORGANISM_TASK)
    t["task"] = t["task"].astype(str)
    t = t[t["difficulty"].astype(str) == ALL]
    return t.assign(source=[GIVEN_MEAN if task == MEAN_OVER_TASKS else MEASURED for task in t["task"]])


def mean_over_tasks(rows: pd.DataFrame) -> pd.DataFrame:
    """The unweighted mean over tasks of :func:`task_rows`' rows, one row per method measured on every task (a
    method missing from a task has no comparable mean, so it gets none). Accuracy, Δ vs greedy and compute are
    means over tasks; ``n`` is the total number of problems; CIs are left empty, since a CI of the mean would need
    the per-problem outcomes these tables do not hold. Empty for fewer than two tasks."""
    import pandas as pd

    measured = rows[rows["task"] != MEAN_OVER_TASKS]
    tasks = _first_seen(measured["task"])
    if len(tasks) < 2:
        return measured.iloc[:0]
    out = []
    for method, g in measured.groupby("method", sort=False):
        if set(g["task"]) != set(tasks):
            continue
        row = {"task": MEAN_OVER_TASKS, "method": method, "difficulty": ALL, "n": int(g["n"].sum()),
               "source": f"unweighted mean over {len(tasks)} tasks, computed by tellnorm report (CIs not combined)"}
        for column in ("family", "n_samples"):
            if column in g.columns:
                row[column] = g[column].iloc[0]
        for column in ("accuracy", "delta_vs_greedy", *COMPUTE_COLUMNS):
            if column in g.columns:
                row[column] = float(g[column].astype(float).mean())
        row.update({c: math.nan for c in ("ci_low", "ci_high", "delta_ci_low", "delta_ci_high")})
        out.append(row)
    return pd.DataFrame(out, columns=list(rows.columns))


def cross_model_techniques(evaluation: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows method × task × model (``evaluation``: label → that run's ``evaluation.csv``): the whole-task accuracy
    and Δ vs greedy with their CIs, n and compute per problem, and per model with two or more tasks a
    "mean over tasks" row: the run's own if it wrote one, else :func:`mean_over_tasks` (``source`` says which).
    Tasks in order of first appearance with "mean over tasks" last; methods in order of first appearance."""
    import pandas as pd

    parts = []
    for label, table in evaluation.items():
        rows = task_rows(table)
        mean = mean_over_tasks(rows) if not (rows["task"] == MEAN_OVER_TASKS).any() else rows.iloc[:0]
        if len(mean):  # pandas warns on concatenating an empty frame
            rows = pd.concat([rows, mean], ignore_index=True)
        parts.append(rows.assign(model=label))
    merged = pd.concat(parts, ignore_index=True)
    for column in TECHNIQUE_COLUMNS:
        if column not in merged.columns:
            merged[column] = math.nan
    merged = merged[list(TECHNIQUE_COLUMNS)]
    tasks = [t for t in _first_seen(merged["task"]) if t != MEAN_OVER_TASKS]
    tasks += [MEAN_OVER_TASKS] if (merged["task"] == MEAN_OVER_TASKS).any() else []
    return _order(merged, {"task": tasks, "method": _first_seen(merged["method"]), "model": list(evaluation)})


def cross_model_claims(claims: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Claim rows × model columns of verdicts (``claims``: label → that run's ``claims.csv``; runs without one are
    left out), with each model's measured numbers beside its verdict (``LABEL: measured``) when the file has them.
    Claims in order of first appearance; a claim a run did not judge is empty there."""
    import pandas as pd

    order = _first_seen(pd.concat([t["claim"].astype(str) for t in claims.values()]))
    out = pd.DataFrame({"claim": order})
    for label, table in claims.items():
        by_claim = table.assign(claim=table["claim"].astype(str)).drop_duplicates("claim").set_index("claim")
        out[label] = out["claim"].map(by_claim["verdict"]).fillna("")
        if "measured" in by_claim.columns:
            out[f"{label}: measured"] = out["claim"].map(by_claim["measured"]).fillna("")
    return out


def normalized_profile(profile: pd.DataFrame) -> pd.DataFrame:
    """One run's ``norm_profile.csv`` with ``depth`` = layer / last layer (0 = first block, 1 = last; so models of
    different depth share an axis) and ``relative_norm`` = mean norm / the run's largest mean norm over both modes
    (so the thinking / non-thinking gap stays visible). The last layer is the largest in the file: a profile of a
    subset of layers is stretched over 0..1."""
    last = max(int(profile["layer"].max()), 1)
    top = float(profile["mean_norm"].max())
    out = profile.assign(depth=profile["layer"].astype(float) / last, relative_norm=profile["mean_norm"] / top)
    for column in ("ci_low", "ci_high"):
        if column in out.columns:
            out[f"relative_{column}"] = out[column] / top
    return out.sort_values(["mode", "layer"], kind="stable").reset_index(drop=True)


def accuracy_figure(table: pd.DataFrame) -> go.Figure:
    """Accuracy per benchmark and model as grouped bars with their 95% CIs, one panel per mode (``table``:
    :func:`cross_model_accuracy`'s rows; a run without a whole-task row shows each group as ``task [group]``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import style

    t = table.assign(benchmark=[task if group == ALL else f"{task} [{group}]"
                                for task, group in zip(table["task"], table["group"])])
    modes = _modes(t["mode"])
    benchmarks = _first_seen(t["benchmark"])
    fig = make_subplots(rows=len(modes), cols=1, shared_xaxes=True, subplot_titles=modes, vertical_spacing=0.12)
    for i, model in enumerate(_first_seen(t["model"])):
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        for row, mode in enumerate(modes, 1):
            g = t[(t["model"] == model) & (t["mode"] == mode)]
            fig.add_trace(go.Bar(
                x=g["benchmark"], y=g["accuracy"], name=model, legendgroup=model, showlegend=row == 1,
                marker={"color": color},
                error_y={"type": "data", "symmetric": False, "array": g["ci_high"] - g["accuracy"],
                         "arrayminus": g["accuracy"] - g["ci_low"], "thickness": 1},
                customdata=g[["n", "ci_low", "ci_high"]].to_numpy(),
                hovertemplate=f"{model}<br>%{{x}}: %{{y:.3f}} [%{{customdata[1]:.3f}}, %{{customdata[2]:.3f}}]"
                              "<br>n = %{customdata[0]}<extra></extra>"), row=row, col=1)
    fig.update_xaxes(categoryorder="array", categoryarray=benchmarks)
    fig.update_yaxes(range=[0, 1.05], title_text="accuracy (95% CI)")
    fig.update_layout(barmode="group", bargap=0.25)
    models = _first_seen(t["model"])
    width = min(1600, max(720, 160 + 26 * len(benchmarks) * len(models)))
    style(fig, title="Accuracy per benchmark and model", height=300 + 260 * len(modes), width=width)
    # plotly turns the benchmark names when they do not fit side by side (about 8 px a character at this size)
    longest = max(len(b) for b in benchmarks)
    turned = 8 * longest * len(benchmarks) > width - 160
    return _legend_at_bottom(fig, labels_below=7 * longest if turned else 30)


def norm_profile_figure(profiles: Mapping[str, pd.DataFrame]) -> go.Figure:
    """The normalised norm profile per model (:func:`normalized_profile`): depth 0..1 on x, norm / the model's
    largest norm on y; one colour per model, thinking solid, non-thinking dashed (``profiles``: label →
    ``norm_profile.csv`` rows)."""
    import plotly.graph_objects as go

    from tellnorm.figures import style

    fig = go.Figure()
    for i, (label, profile) in enumerate(profiles.items()):
        p = normalized_profile(profile)
        color = MODEL_COLORS[i % len(MODEL_COLORS)]
        for mode in _modes(p["mode"]):
            g = p[p["mode"] == mode]
            fig.add_trace(go.Scatter(
                x=g["depth"], y=g["relative_norm"], mode="lines+markers", name=f"{label} · {mode}",
                line={"color": color, "dash": "solid" if mode == "thinking" else "dash"}, marker={"size": 5},
                customdata=g[["layer", "mean_norm"]].to_numpy(),
                hovertemplate=f"{label} · {mode}<br>layer %{{customdata[0]}} (depth %{{x:.2f}})"
                              "<br>mean ‖h‖ %{customdata[1]:.1f} (%{y:.3f} of the largest)<extra></extra>"))
    fig.update_xaxes(range=[-0.02, 1.02])
    fig.update_yaxes(rangemode="tozero")
    style(fig, title="Norm profile per model, normalised (thinking solid, non-thinking dashed)",
          x_title="layer depth (layer / last layer)", y_title="mean ‖h‖₂ / the model's largest", height=520, width=860)
    return _legend_at_bottom(fig, labels_below=60)


@dataclass
class Run:
    """One input folder, read and checked: its label in the report, its model, and the tables the report uses."""

    folder: Path
    model: str
    label: str
    accuracy: pd.DataFrame
    evaluation: pd.DataFrame
    correlation: pd.DataFrame
    norm_profile: pd.DataFrame
    claims: pd.DataFrame | None = None
    accuracy_file: str = "accuracy.csv"


@dataclass
class CrossModel:
    """The merged tables (:func:`merge_runs`): each one a DataFrame as written to its CSV."""

    runs: list[Run]
    accuracy: pd.DataFrame
    spearman: pd.DataFrame
    techniques: pd.DataFrame
    claims: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def merge_runs(runs: Sequence[Run]) -> CrossModel:
    """Every cross-model table of ``runs`` (in their order)."""
    accuracy = cross_model_accuracy({r.label: r.accuracy for r in runs})
    with_claims = {r.label: r.claims for r in runs if r.claims is not None}
    notes = [f"{r.label}: no claims.csv" for r in runs if r.claims is None] if with_claims else []
    notes += [f"{r.label}: accuracy from {r.accuracy_file} has no whole-task row; every group is shown"
              for r in runs if not (r.accuracy["group"].astype(str) == ALL).any()]
    return CrossModel(runs=list(runs), accuracy=accuracy,
                      spearman=cross_model_spearman({r.label: r.correlation for r in runs}),
                      techniques=cross_model_techniques({r.label: r.evaluation for r in runs}),
                      claims=cross_model_claims(with_claims) if with_claims else None, notes=notes)


def report_markdown(merged: CrossModel) -> str:
    """``REPORT.md``: the runs, then each table (techniques: the key methods, one table per task) and the
    figures, in markdown through :func:`tellnorm.io.markdown_table`."""
    import pandas as pd

    from tellnorm.io import markdown_table

    runs = pd.DataFrame([{"model": r.label, "folder": str(r.folder), "accuracy from": r.accuracy_file,
                          "tasks": ", ".join(_first_seen(task_rows(r.evaluation)["task"]))} for r in merged.runs])
    labels = [r.label for r in merged.runs]
    a = merged.accuracy
    cells = a.assign(cell=[f"{_ci_cell(v, lo, hi)} (n={n})" for v, lo, hi, n in
                           zip(a.accuracy, a.ci_low, a.ci_high, a.n)])
    keys = ["task", "mode", "group"]
    acc = cells.pivot(index=keys, columns="model", values="cell")
    acc = acc.reindex(index=list(dict.fromkeys(zip(*(a[k] for k in keys)))),
                      columns=[m for m in labels if m in acc.columns]).fillna("—").reset_index()
    spearman = merged.spearman[["signal", "basis", *labels, "paper"]]
    parts = ["# Cross-model report (generated by `tellnorm report`)\n",
             "## Runs\n", markdown_table(runs.astype(str)), "",
             "## Accuracy per benchmark and model\n",
             "Accuracy % [95% CI] (n problems): the whole task where the run reports it, else every group (the "
             "organism: every difficulty).\n",
             markdown_table(acc.astype(str)), "", "![accuracy](cross_model_accuracy.png)\n",
             "## Spearman ρ ×100 with the SAE reasoning activation (PAPER.md §4)\n",
             "Bootstrap 95% CIs in brackets; basis `layers` = across layers, `problems` = across thinking-mode "
             "problems. Numbers behind the cells in `cross_model_spearman.csv`.\n",
             markdown_table(spearman.astype(str)), "",
             "## Test-time techniques per task (PAPER.md §7)\n",
             "Accuracy % [95% CI] (Δ vs greedy in points); the key methods here, every method in "
             "`cross_model_techniques.csv`. A computed mean over tasks has no CI.\n"]
    for task, g in merged.techniques.groupby("task", sort=False):
        keep = g[[bool(REPORT_METHODS.fullmatch(str(m))) or f in ("base", "technique")
                  for m, f in zip(g["method"], g["family"])]]
        g = keep if len(keep) else g
        cells = g.assign(cell=[f"{_ci_cell(a, lo, hi)} ({_points(d)})" for a, lo, hi, d in
                               zip(g.accuracy, g.ci_low, g.ci_high, g.delta_vs_greedy)])
        table = cells.pivot(index="method", columns="model", values="cell")
        table = table.reindex(index=_first_seen(g["method"]), columns=[m for m in labels if m in table.columns])
        sources = [f"{model}: {source}" for model, source in
                   g[g["source"] != MEASURED].drop_duplicates("model")[["model", "source"]].itertuples(index=False)]
        parts += [f"### {task}\n", *(f"- {s}" for s in sources), *([""] if sources else []),
                  markdown_table(table.fillna("—").reset_index()), ""]
    if merged.claims is not None:
        verdicts = merged.claims[["claim", *[m for m in labels if m in merged.claims.columns]]]
        parts += ["## The paper's claims, judged per model\n", markdown_table(verdicts.astype(str)), ""]
    parts += ["## Norm profile per model\n",
              "Depth = layer / last layer; norm / the model's largest mean norm; thinking solid, non-thinking "
              "dashed.\n", "![norm profile](cross_model_norm_profile.png)\n"]
    if merged.notes:
        parts += ["## Notes\n", *(f"- {note}" for note in merged.notes), ""]
    return "\n".join(parts)


# --- the file layer ----------------------------------------------------------------------------------------------

def model_name(folder: Path) -> str:
    """The run's model: ``manifest.json``'s ``config.model`` when it is a string, else the folder's name."""
    manifest = folder / "manifest.json"
    try:
        model = json.loads(manifest.read_text()).get("config", {}).get("model") if manifest.is_file() else None
    except (json.JSONDecodeError, AttributeError, OSError) as err:
        raise TellnormError(f"{folder}: cannot read manifest.json ({err})") from None
    return model.rstrip("/") if isinstance(model, str) and model.strip() else folder.resolve().name


def run_labels(models: Sequence[str], folders: Sequence[Path]) -> list[str]:
    """Each run's name in the tables: its model, or ``model (folder name)`` when two runs share the model (the
    folder's path when the names clash too)."""
    labels = list(models)
    for make in (lambda m, f: f"{m} ({f.name})", lambda m, f: f"{m} ({f})"):
        clash = {label for label in labels if labels.count(label) > 1}
        labels = [make(m, f) if label in clash else label for label, m, f in zip(labels, models, folders)]
    return labels


def missing_inputs(folder: Path) -> list[str]:
    """What ``folder`` lacks to be a run: the missing files (``accuracy.csv`` stands for either accuracy file)."""
    if not folder.is_dir():
        return ["the folder itself"]
    missing = [] if any((folder / name).is_file() for name in ACCURACY_FILES) else ["accuracy.csv"]
    return missing + [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def read_run(folder: Path) -> Run:
    """One folder's tables, each checked for the columns the report reads (a TellnormError names the file).
    ``label`` is the model name here; :func:`read_runs` makes it unique."""
    import pandas as pd

    def read(name: str, columns: Sequence[str]) -> pd.DataFrame:
        path = folder / name
        try:
            # group / difficulty / task hold "all" beside numbers: kept as text so 1 and "1" are one group
            table = pd.read_csv(path, dtype={"group": str, "difficulty": str, "task": str, "method": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise TellnormError(f"{folder}: cannot read {name} ({str(err).splitlines()[0]})") from None
        lacking = [c for c in columns if c not in table.columns]
        if lacking:
            raise TellnormError(f"{folder}: {name} lacks the column(s) {', '.join(lacking)}")
        return table

    model = model_name(folder)
    accuracy_file = next(name for name in ACCURACY_FILES if (folder / name).is_file())
    accuracy = read(accuracy_file, ACCURACY_FILES[accuracy_file])
    if accuracy_file == "organism_accuracy.csv":
        accuracy = organism_accuracy_rows(accuracy, model)
    claims = read("claims.csv", CLAIMS_COLUMNS) if (folder / "claims.csv").is_file() else None
    return Run(folder=folder, model=model, label=model, accuracy=accuracy,
               evaluation=read("evaluation.csv", EVALUATION_COLUMNS),
               correlation=read("correlation.csv", CORRELATION_COLUMNS),
               norm_profile=read("norm_profile.csv", NORM_PROFILE_COLUMNS), claims=claims,
               accuracy_file=accuracy_file)


def read_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every folder read and checked before anything is written: one TellnormError line names each folder with
    what it lacks; a folder given twice is refused too."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise TellnormError("give at least one run folder (written by tellnorm reproduce)")
    resolved = [f.resolve() for f in folders]
    twice = sorted({str(f) for f, r in zip(folders, resolved) if resolved.count(r) > 1})
    if twice:
        raise TellnormError(f"run folder(s) given twice: {', '.join(twice)}")
    problems = [f"{folder} lacks {', '.join(missing)}" for folder in folders if (missing := missing_inputs(folder))]
    if problems:
        raise TellnormError("not a run folder of tellnorm reproduce: " + "; ".join(problems))
    runs = [read_run(folder) for folder in folders]
    for run, label in zip(runs, run_labels([r.model for r in runs], folders)):
        run.label = label
    return runs


def build_report(folders: Sequence[str | Path], out: str | Path, *, png: bool = True) -> list[Path]:
    """Read and check every run folder, merge, and write the tables, figures, ``REPORT.md`` and ``report.html``
    to ``out`` (each file atomically; nothing is written when an input is bad). Returns the files written."""
    import contextlib

    from tellnorm.apps.reproduce import report_html
    from tellnorm.figures import png_session, write_figure
    from tellnorm.io import atomic_path, check_output_dir, write_csv

    out = check_output_dir(out)
    runs = read_runs(folders)
    inside = [str(r.folder) for r in runs if r.folder.resolve() == out.resolve()]
    if inside:
        raise TellnormError(f"--out {out} is one of the run folders ({inside[0]}): its REPORT.md would be replaced; "
                            "give another folder")
    merged = merge_runs(runs)
    figures = {"cross_model_accuracy": accuracy_figure(merged.accuracy),
               "cross_model_norm_profile": norm_profile_figure({r.label: r.norm_profile for r in runs})}
    markdown = report_markdown(merged)
    written = [write_csv(merged.accuracy, out / "cross_model_accuracy.csv"),
               write_csv(merged.spearman, out / "cross_model_spearman.csv"),
               write_csv(merged.techniques, out / "cross_model_techniques.csv")]
    if merged.claims is not None:
        written.append(write_csv(merged.claims, out / "cross_model_claims.csv"))
    else:  # an earlier report's claims table would pass for this one's
        (out / "cross_model_claims.csv").unlink(missing_ok=True)
    with png_session() if png else contextlib.nullcontext():
        for stem, fig in figures.items():
            written += write_figure(fig, out / stem, png=png)
    for name, text in (("REPORT.md", markdown), ("report.html", report_html(markdown))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    return written


# --- helpers -----------------------------------------------------------------------------------------------------

def _legend_at_bottom(fig: go.Figure, *, labels_below: int) -> go.Figure:
    """The legend under the plot: style()'s legend row above the plot runs into the title once the model names
    wrap it over several lines. ``labels_below``: pixels the x axis's labels take (plotly makes room for the legend
    itself)."""
    fig.update_layout(legend={"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom", "x": 0.0},
                      margin={"t": 80, "b": labels_below + 10})
    return fig


def _missing(value: object) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def _modes(values: pd.Series) -> list:
    """Thinking first, then non-thinking, then any other mode in order of appearance (files differ in order)."""
    seen = _first_seen(values)
    return [m for m in ("thinking", "non-thinking") if m in seen] + [m for m in seen
                                                                     if m not in ("thinking", "non-thinking")]


def _first_seen(values: pd.Series) -> list:
    return list(dict.fromkeys(values))


def _order(table: pd.DataFrame, orders: Mapping[str, list]) -> pd.DataFrame:
    """``table`` sorted by each column's position in its given order; stable, so the groups of one task keep the
    file's order."""
    keys = table.assign(**{f"_{c}": table[c].map({v: i for i, v in enumerate(o)}) for c, o in orders.items()})
    return (keys.sort_values([f"_{c}" for c in orders], kind="stable").drop(columns=[f"_{c}" for c in orders])
            .reset_index(drop=True))


def _ci_cell(value: float, lo: float, hi: float) -> str:
    if _missing(value):
        return "—"
    return f"{100 * value:.1f}" if _missing(lo) else f"{100 * value:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _points(delta: float) -> str:
    return "Δ —" if _missing(delta) else f"Δ {100 * delta:+.1f}"
