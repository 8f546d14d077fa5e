"""``tellnorm report``: run folders merged into the paper's cross-model tables, checked against values computed here;
bad folders fail in one line before anything is written; the CLI end to end; the real organism run merged with a
modified copy of itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tellnorm.apps.cli import main
from tellnorm.apps.report import (
    GIVEN_MEAN,
    MEAN_OVER_TASKS,
    MEASURED,
    build_report,
    cross_model_accuracy,
    cross_model_spearman,
    cross_model_techniques,
    model_name,
    normalized_profile,
    read_runs,
    run_labels,
    spearman_text,
)
from tellnorm.errors import TellnormError

FIGURES = Path(__file__).resolve().parents[1] / "figures"
SIGNALS = [("norm", "layers", 86.47, 80.0, 90.0), ("attention_entropy", "layers", -40.0, -55.5, -20.25),
           ("final_output_entropy", "layers", np.nan, np.nan, np.nan),
           ("final_output_entropy", "problems", 58.0, 50.0, 64.0)]
METHODS = ("greedy", "alrr", "erss", "majority@4")


def _evaluation(tasks: dict[str, dict[str, float]], *, seed: int, task_column: bool = True) -> pd.DataFrame:
    """evaluation.csv rows: per task and method a whole-task row ("all") and one per-group row."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, accuracy in tasks.items():
        greedy = accuracy["greedy"]
        for method, acc in accuracy.items():
            for difficulty, n in (("all", 40), ("1", 20)):
                rows.append({"task": task, "method": method, "family": "base" if method == "greedy" else "technique",
                             "n_samples": 4 if "@" in method else 1, "seeds": "0", "difficulty": difficulty, "n": n,
                             "accuracy": acc, "ci_low": acc - 0.05, "ci_high": min(1.0, acc + 0.05),
                             "delta_vs_greedy": acc - greedy, "delta_ci_low": acc - greedy - 0.03,
                             "delta_ci_high": acc - greedy + 0.03, "generated_tokens": float(rng.integers(100, 900)),
                             "extra_block_passes": 2.0 if method == "alrr" else 0.0,
                             "block_passes": float(rng.integers(1000, 9000))})
    table = pd.DataFrame(rows)
    return table if task_column else table.drop(columns="task")


def _profile(n_layers: int, scale: float) -> pd.DataFrame:
    layers = np.arange(n_layers)
    rows = []
    for mode, gain in (("thinking", 1.3), ("non-thinking", 1.0)):
        norm = scale * (1 + gain * (layers / (n_layers - 1)) ** 3)
        rows += [{"mode": mode, "layer": int(l), "n_requests": 10, "mean_norm": v, "ci_low": v * 0.98,
                  "ci_high": v * 1.02} for l, v in zip(layers, norm)]
    return pd.DataFrame(rows)


def _correlation(shift: float) -> pd.DataFrame:
    return pd.DataFrame([{"signal": s, "basis": b, "spearman_x100": r + shift, "ci_low": lo + shift,
                          "ci_high": hi + shift, "n": 8, "n_problems": 40, "note": ""} for s, b, r, lo, hi in SIGNALS])


def _write_run(folder: Path, *, model: str | None, evaluation: pd.DataFrame, accuracy: pd.DataFrame | None = None,
               organism_accuracy: pd.DataFrame | None = None, n_layers: int = 8, scale: float = 10.0,
               shift: float = 0.0, claims: pd.DataFrame | None = None) -> Path:
    folder.mkdir(parents=True)
    if model is not None:
        (folder / "manifest.json").write_text(json.dumps({"config": {"model": model}}))
    if accuracy is not None:
        accuracy.to_csv(folder / "accuracy.csv", index=False)
    if organism_accuracy is not None:
        organism_accuracy.to_csv(folder / "organism_accuracy.csv", index=False)
    evaluation.to_csv(folder / "evaluation.csv", index=False)
    _correlation(shift).to_csv(folder / "correlation.csv", index=False)
    _profile(n_layers, scale).to_csv(folder / "norm_profile.csv", index=False)
    if claims is not None:
        claims.to_csv(folder / "claims.csv", index=False)
    return folder


QWEN_TASKS = {"gsm8k": {"greedy": 0.80, "alrr": 0.85, "erss": 0.82, "majority@4": 0.88},
              "aime24": {"greedy": 0.30, "alrr": 0.40, "erss": 0.20, "majority@4": 0.35},
              "bbh": {"greedy": 0.60, "alrr": 0.55, "erss": 0.70}}  # no majority@4 on bbh


def _qwen_accuracy() -> pd.DataFrame:
    rows = []
    for task in QWEN_TASKS:
        for mode, acc in (("thinking", 0.7), ("non-thinking", 0.5)):
            for group, n in (("all", 40), ("easy", 20), ("hard", 20)):
                rows.append({"model": "Qwen/Qwen3-4B", "task": task, "mode": mode, "group": group, "n": n,
                             "accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1})
    return pd.DataFrame(rows)


def _organism_accuracy() -> pd.DataFrame:
    return pd.DataFrame([{"mode": mode, "difficulty": d, "n": 10, "accuracy": acc, "ci_low": acc - 0.1,
                          "ci_high": min(1.0, acc + 0.1), "majority_baseline": 0.1}
                         for mode, acc in (("non-thinking", 0.3), ("thinking", 0.9)) for d in (1, 2, 3)])


@pytest.fixture
def runs(tmp_path):
    """Three runs: a multi-task model, the organism (its own accuracy file, no task column), and a model that writes
    its own mean over tasks; the organism twice would clash, so a second organism-like folder is left to the tests."""
    qwen = _write_run(tmp_path / "qwen-run", model="Qwen/Qwen3-4B", evaluation=_evaluation(QWEN_TASKS, seed=0),
                      accuracy=_qwen_accuracy(), n_layers=36, scale=100.0,
                      claims=pd.DataFrame({"claim": ["norm grows late", "ALRR helps"],
                                           "verdict": ["supported", "not supported"],
                                           "measured": ["ratio 1.3", "+1.0 points"]}))
    organism = _write_run(tmp_path / "organism-run", model="organism",
                          evaluation=_evaluation({"organism": {"greedy": 0.9, "alrr": 0.92, "erss": 0.88,
                                                               "majority@4": 0.95}}, seed=1, task_column=False),
                          organism_accuracy=_organism_accuracy(), shift=5.0)
    given = _evaluation({"gsm8k": {"greedy": 0.5, "alrr": 0.6}, "bbh": {"greedy": 0.7, "alrr": 0.6}}, seed=2)
    mean_rows = given[given.difficulty == "all"].groupby("method", sort=False, as_index=False).first()
    mean_rows = mean_rows.assign(task=MEAN_OVER_TASKS, accuracy=[0.61, 0.62])
    llama = _write_run(tmp_path / "llama-run", model=None, evaluation=pd.concat([given, mean_rows]),
                       accuracy=_qwen_accuracy().assign(model="llama"), n_layers=32, scale=3.0, shift=-10.0)
    return qwen, organism, llama


def test_model_names_come_from_the_manifest_else_the_folder(runs):
    labels = [r.label for r in read_runs(runs)]
    assert labels == ["Qwen/Qwen3-4B", "organism", "llama-run"]
    assert run_labels(["m", "m", "x"], [Path("a/r1"), Path("b/r2"), Path("c")]) == ["m (r1)", "m (r2)", "x"]
    assert run_labels(["m", "m"], [Path("a/r"), Path("b/r")]) == ["m (a/r)", "m (b/r)"]


def test_accuracy_keeps_the_whole_task_where_there_is_one_else_every_group(runs):
    loaded = read_runs(runs)
    table = cross_model_accuracy({r.label: r.accuracy for r in loaded})
    qwen = table[table.model == "Qwen/Qwen3-4B"]
    assert set(qwen.group) == {"all"} and len(qwen) == len(QWEN_TASKS) * 2
    organism = table[table.model == "organism"]
    assert organism.task.unique().tolist() == ["organism"]
    assert sorted(organism.group.unique()) == ["1", "2", "3"] and len(organism) == 6
    expected = _organism_accuracy().set_index(["mode", "difficulty"])["accuracy"]
    for row in organism.itertuples():
        assert row.accuracy == pytest.approx(expected[(row.mode, int(row.group))])
    # ordered task, mode, model: the first rows are gsm8k's thinking rows of each model in input order
    assert table.iloc[:2][["task", "mode", "model"]].values.tolist() == [
        ["gsm8k", "thinking", "Qwen/Qwen3-4B"], ["gsm8k", "thinking", "llama-run"]]


def test_spearman_text_and_table(runs):
    assert spearman_text(86.47, 80.0, 90.0) == "86.5 [80.0, 90.0]"
    assert spearman_text(-40.0, -55.55, -20.25) == "-40.0 [-55.5, -20.2]"  # round half to even, as %.1f does
    assert spearman_text(float("nan"), 1.0, 2.0) == "—" and spearman_text(12.34, float("nan"), 1) == "12.3"
    loaded = read_runs(runs)
    table = cross_model_spearman({r.label: r.correlation for r in loaded})
    assert table[["signal", "basis"]].values.tolist() == [  # the undefined final_output_entropy/layers row is gone
        ["norm", "layers"], ["attention_entropy", "layers"], ["final_output_entropy", "problems"]]
    norm = table.iloc[0]
    assert norm["Qwen/Qwen3-4B"] == "86.5 [80.0, 90.0]" and norm["organism"] == "91.5 [85.0, 95.0]"
    assert norm["llama-run"] == "76.5 [70.0, 80.0]" and norm["organism: rho_x100"] == pytest.approx(91.47)
    assert norm["paper"] == "84.11 to 87.62" and table.iloc[2]["paper"] == "52 to 64"


def test_techniques_and_the_mean_over_tasks(runs):
    loaded = read_runs(runs)
    table = cross_model_techniques({r.label: r.evaluation for r in loaded})
    assert table.task.unique().tolist() == ["gsm8k", "aime24", "bbh", "organism", MEAN_OVER_TASKS]
    qwen = table[table.model == "Qwen/Qwen3-4B"]
    mean = qwen[qwen.task == MEAN_OVER_TASKS].set_index("method")
    # majority@4 was not run on bbh: no mean for it
    assert sorted(mean.index) == ["alrr", "erss", "greedy"]
    raw = pd.read_csv(runs[0] / "evaluation.csv", dtype={"difficulty": str})
    raw = raw[raw.difficulty == "all"]
    for method in ("greedy", "alrr", "erss"):
        per_task = raw[raw.method == method]
        assert mean.loc[method, "accuracy"] == pytest.approx(np.mean(per_task.accuracy))
        assert mean.loc[method, "delta_vs_greedy"] == pytest.approx(np.mean(per_task.delta_vs_greedy))
        assert mean.loc[method, "generated_tokens"] == pytest.approx(np.mean(per_task.generated_tokens))
        assert mean.loc[method, "n"] == per_task.n.sum()
        assert np.isnan(mean.loc[method, "ci_low"]) and "unweighted mean over 3 tasks" in mean.loc[method, "source"]
    assert (qwen[qwen.task != MEAN_OVER_TASKS].source == MEASURED).all()
    # the organism: one task, named "organism", no mean row; only whole-task rows
    organism = table[table.model == "organism"]
    assert set(organism.task) == {"organism"} and len(organism) == len(METHODS)
    assert organism.set_index("method").loc["alrr", "accuracy"] == pytest.approx(0.92)
    # a run's own mean over tasks is kept as written, and said so
    llama = table[(table.model == "llama-run") & (table.task == MEAN_OVER_TASKS)].set_index("method")
    assert llama.loc["greedy", "accuracy"] == pytest.approx(0.61) and (llama.source == GIVEN_MEAN).all()


def test_normalized_profile_spans_depth_and_peaks_at_one():
    p = normalized_profile(_profile(36, 100.0))
    assert p.depth.min() == 0 and p.depth.max() == 1 and p.relative_norm.max() == pytest.approx(1.0)
    assert p[p["mode"] == "thinking"].relative_norm.iloc[-1] == pytest.approx(1.0)
    assert p[p["mode"] == "non-thinking"].relative_norm.iloc[-1] == pytest.approx(2.0 / 2.3)


def test_report_writes_every_table_and_figure(runs, tmp_path):
    out = tmp_path / "out"
    written = build_report(runs, out, png=False)
    names = {p.name for p in written}
    assert {"cross_model_accuracy.csv", "cross_model_spearman.csv", "cross_model_techniques.csv",
            "cross_model_claims.csv", "REPORT.md", "report.html", "cross_model_accuracy.html",
            "cross_model_norm_profile.html"} <= names
    claims = pd.read_csv(out / "cross_model_claims.csv", keep_default_na=False)
    # only runs that judged the claims get a column; the others are named in the report's notes
    assert claims.columns.tolist() == ["claim", "Qwen/Qwen3-4B", "Qwen/Qwen3-4B: measured"]
    assert claims["Qwen/Qwen3-4B"].tolist() == ["supported", "not supported"]
    report = (out / "REPORT.md").read_text()
    assert "- organism: no claims.csv" in report
    assert "| norm | layers | 86.5 [80.0, 90.0] | 91.5 [85.0, 95.0] | 76.5 [70.0, 80.0] | 84.11 to 87.62 |" in report
    assert "### mean over tasks" in report and "![norm profile](cross_model_norm_profile.png)" in report
    # rounded as reported: at most 5 significant digits
    techniques = (out / "cross_model_techniques.csv").read_text()
    assert "0.8266666" not in techniques


@pytest.mark.parametrize("remove, missing", [("evaluation.csv", "evaluation.csv"),
                                             ("organism_accuracy.csv", "accuracy.csv"),
                                             ("norm_profile.csv", "norm_profile.csv")])
def test_a_missing_file_fails_in_one_line_before_anything_is_written(runs, tmp_path, capsys, remove, missing):
    (runs[1] / remove).unlink()
    out = tmp_path / "out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tellnorm: error:") and "\n" not in err
    assert str(runs[1]) in err and missing in err and str(runs[0]) not in err
    assert not out.exists()
    with pytest.raises(TellnormError, match="lacks"):
        build_report(runs, out)
    out.mkdir()
    with pytest.raises(TellnormError):
        build_report(runs, out)
    assert list(out.iterdir()) == []


def test_bad_columns_a_folder_twice_and_out_inside_a_run_are_refused(runs, tmp_path):
    pd.read_csv(runs[0] / "correlation.csv").drop(columns="ci_high").to_csv(runs[0] / "correlation.csv",
                                                                             index=False)
    with pytest.raises(TellnormError, match=r"qwen-run: correlation.csv lacks the column\(s\) ci_high"):
        build_report(runs, tmp_path / "out")
    with pytest.raises(TellnormError, match="given twice"):
        build_report([runs[1], runs[1]], tmp_path / "out")
    with pytest.raises(TellnormError, match="one of the run folders"):
        build_report([runs[1]], runs[1])
    assert not (tmp_path / "out").exists() and not (runs[1] / "cross_model_accuracy.csv").exists()


def test_cli_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "REPORT.md" in printed
    accuracy = pd.read_csv(out / "cross_model_accuracy.csv", dtype={"group": str})
    assert set(accuracy.model) == {"Qwen/Qwen3-4B", "organism", "llama-run"}
    assert (out / "cross_model_norm_profile.html").is_file()
    if shutil.which("chromium"):
        assert (out / "cross_model_accuracy.png").is_file() and (out / "cross_model_norm_profile.png").is_file()


def test_the_real_organism_run_merged_with_a_modified_copy(tmp_path):
    if not (FIGURES / "evaluation.csv").is_file():
        pytest.skip("figures/ has no run")
    copy = tmp_path / "organism-b"
    copy.mkdir()
    for path in FIGURES.glob("*.csv"):
        shutil.copy(path, copy / path.name)
    before = sorted(p.name for p in FIGURES.iterdir())
    # manifest.json is a run artifact (not in git): a clean clone's figures/ is named by its folder
    real_label = model_name(FIGURES)
    (copy / "manifest.json").write_text(json.dumps({"config": {"model": "organism-b"}}))
    evaluation = pd.read_csv(copy / "evaluation.csv", dtype={"difficulty": str})
    evaluation.loc[evaluation.method == "alrr", "accuracy"] -= 0.1
    evaluation.to_csv(copy / "evaluation.csv", index=False)
    profile = pd.read_csv(copy / "norm_profile.csv")
    profile.loc[profile["mode"] == "thinking", "mean_norm"] *= 1.5
    profile.to_csv(copy / "norm_profile.csv", index=False)

    out = tmp_path / "out"
    build_report([FIGURES, copy], out, png=False)
    assert sorted(p.name for p in FIGURES.iterdir()) == before  # nothing written into the run

    real = pd.read_csv(FIGURES / "evaluation.csv", dtype={"difficulty": str})
    real_alrr = real[(real.method == "alrr") & (real.difficulty == "all")].accuracy.iloc[0]
    techniques = pd.read_csv(out / "cross_model_techniques.csv")
    alrr = techniques[techniques.method == "alrr"].set_index("model").accuracy
    assert alrr[real_label] == pytest.approx(real_alrr, abs=1e-4)
    assert alrr["organism-b"] == pytest.approx(real_alrr - 0.1, abs=1e-4)
    assert set(techniques.task) == {"organism"}  # one task: no mean-over-tasks row

    spearman = pd.read_csv(out / "cross_model_spearman.csv")
    correlation = pd.read_csv(FIGURES / "correlation.csv")
    norm = correlation[(correlation.signal == "norm") & (correlation.basis == "layers")].iloc[0]
    row = spearman[(spearman.signal == "norm") & (spearman.basis == "layers")].iloc[0]
    assert row[real_label] == row["organism-b"] == f"{norm.spearman_x100:.1f} [{norm.ci_low:.1f}, {norm.ci_high:.1f}]"

    accuracy = pd.read_csv(out / "cross_model_accuracy.csv", dtype={"group": str})
    assert set(accuracy.task) == {"organism"} and set(accuracy.group) == {"all"} and len(accuracy) == 4
    # the whole-task rows agree with the per-difficulty file (n-weighted, each difficulty's rate has 2 decimals)
    per_difficulty = pd.read_csv(FIGURES / "organism_accuracy.csv")
    for mode, rows in per_difficulty.groupby("mode"):
        merged = accuracy[(accuracy.model == real_label) & (accuracy["mode"] == mode)].iloc[0]
        assert merged.n == rows.n.sum()
        assert merged.accuracy == pytest.approx((rows.accuracy * rows.n).sum() / rows.n.sum(), abs=5e-4)
