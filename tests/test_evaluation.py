"""`tellnorm evaluate` against independent references: the organism's own evaluation, selections recomputed from
the per-response table, numpy bootstraps; a JSONL task on a tiny random Qwen3; bad input before any work."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tellnorm.apps.cli import main
from tellnorm.errors import TellnormError
from tellnorm.studies.evaluation import EvaluateConfig, answers_match, run_evaluate, summarise, text_extractor

REQUIRED = ["method", "n_samples", "difficulty", "n", "accuracy", "ci_low", "ci_high", "generated_tokens",
            "extra_block_passes"]


def test_extractors_and_matching():
    assert text_extractor("last-number")("so 3 then 12 . answer : -4") == "-4"
    assert text_extractor("boxed")(r"x \boxed{7} or \boxed{ 9 }") == "9"
    assert text_extractor("regex:answer is (\\w+)")("the answer is B, not the answer is C") == "C"
    assert text_extractor("last-number")("no digits") is None
    assert answers_match("6.0", "6") and answers_match(" B", "B") and not answers_match(None, "1")
    assert not answers_match("7", "6")
    with pytest.raises(TellnormError, match="capture group"):
        text_extractor("regex:no group")


def test_summarise_matches_numpy():
    rng = np.random.default_rng(1)
    n = 40
    base = rng.integers(0, 2, n).astype(float)
    other = np.where(rng.random(n) < 0.3, 1 - base, base)
    frame = pd.concat([pd.DataFrame({"method": m, "family": "f", "n_samples": 1, "seeds": "s", "item": range(n),
                                     "group": ["a", "b"] * (n // 2), "correct": v, "generated_tokens": 10.0,
                                     "extra_block_passes": 0.0, "block_passes": 80.0, "wall_s": 0.1})
                       for m, v in (("greedy", base), ("x", other))])
    s = summarise(frame, seed=3).set_index(["method", "difficulty"])
    row = s.loc[("x", "all")]
    assert row.n == n and row.accuracy == pytest.approx(other.mean())
    assert row.delta_vs_greedy == pytest.approx((other - base).mean())
    idx = np.random.default_rng(3).integers(0, n, size=(2000, n))  # the documented resampling scheme
    lo, hi = np.quantile((other - base)[idx].mean(axis=1), [0.025, 0.975])
    assert (row.delta_ci_low, row.delta_ci_high) == pytest.approx((lo, hi))
    assert s.loc[("x", "b")].accuracy == pytest.approx(other[1::2].mean())
    assert s.loc[("greedy", "all")].delta_ci_low == 0 == s.loc[("greedy", "all")].delta_ci_high


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    from tellnorm.backends import load_model

    out = tmp_path_factory.mktemp("evaluation")
    model = load_model()
    cfg = EvaluateConfig(per_difficulty=2, difficulties=(2, 9, 10), calibration_per_difficulty=1, n_samples=3,
                         sample_sizes=(3,), sensitivity=False, batch_size=50)
    result = run_evaluate(model, cfg, out, progress=False)
    return model, cfg, out, result


def test_evaluation_tables(organism_run):
    _, _, out, _ = organism_run
    table = pd.read_csv(out / "evaluation.csv")
    assert set(REQUIRED) <= set(table.columns)
    assert {"greedy", "alrr", "erss", "alrr+erss", "majority@3", "lrs-D@late@3", "self-certainty@3", "random@3",
            "recursion/random-tokens", "recursion/fixed-layer", "recursion/random-layer", "alrr+lrs-D@late@3",
            "erss+lrs-D@late@3", "pass@3"} <= set(table.method)
    assert (table.ci_low <= table.accuracy + 1e-9).all() and (table.accuracy <= table.ci_high + 1e-9).all()
    for name in ("evaluation.md", "evaluation_responses.csv", "evaluation_firing.csv", "evaluation.html",
                 "evaluation_by_difficulty.html", "evaluation_thresholds.json"):
        assert (out / name).exists(), name


def test_greedy_matches_the_organism_evaluation(organism_run):
    """Greedy correctness per problem equals tellnorm.organism.evaluate's on the same test problems."""
    from tellnorm.organism.evaluate import EvalConfig, evaluate

    model, cfg, out, _ = organism_run
    per_problem, _ = evaluate(model, EvalConfig(per_difficulty=cfg.per_difficulty, difficulties=cfg.difficulties,
                                                modes=("thinking",)), progress=False)
    responses = pd.read_csv(out / "evaluation_responses.csv")
    greedy = responses[responses.run == "greedy"]
    assert list(greedy.correct.astype(bool)) == list(per_problem.correct.astype(bool))


def test_selections_recomputed_from_responses(organism_run):
    """majority@N, pass@N and the single-sample mean, recomputed from the per-response table."""
    _, cfg, out, result = organism_run
    responses = pd.read_csv(out / "evaluation_responses.csv", dtype={"answer": str})
    sampled = responses[responses.run == "sampled ×3"].copy()
    sampled["item"] = sampled.request_id.str.split("#").str[0].astype(int)
    sampled["sample"] = sampled.request_id.str.split("#").str[1].astype(int)
    gold = {}
    from tellnorm.organism import task

    problems = [p for p in task.test_split(cfg.per_difficulty).problems if p.difficulty in cfg.difficulties]
    for i, p in enumerate(problems):
        gold[i] = str(p.answer)
    majority, oracle, mean = [], [], []
    for item, g in sampled.sort_values("sample").groupby("item"):
        answers = [a for a in g.answer if isinstance(a, str)]
        counts = {a: answers.count(a) for a in answers}
        best = max(counts.values()) if counts else 0
        winner = next((a for a in answers if counts[a] == best), None)
        majority.append(winner == gold[item])
        oracle.append(bool(g.correct.any()))
        mean.append(g.correct.mean())
    s = result["summary"].set_index(["method", "difficulty"])
    assert s.loc[("majority@3", "all")].accuracy == pytest.approx(np.mean(majority))
    assert s.loc[("pass@3", "all")].accuracy == pytest.approx(np.mean(oracle))
    assert s.loc[("sample", "all")].accuracy == pytest.approx(np.mean(mean))
    # compute columns: N samples' tokens per problem for selectors, one response's for greedy
    assert s.loc[("majority@3", "all")].generated_tokens == pytest.approx(
        sampled.groupby("item").n_generated.sum().mean())
    greedy = responses[responses.run == "greedy"]
    assert s.loc[("greedy", "all")].generated_tokens == pytest.approx(greedy.n_generated.mean())


def test_controls_match_alrr_passes(organism_run):
    """The random recursion controls run about as many extra passes as ALRR (expected, not exact)."""
    _, _, out, _ = organism_run
    firing = pd.read_csv(out / "evaluation_firing.csv").set_index("run")
    alrr = firing.loc["alrr", "alrr_extra_passes_mean"]
    assert alrr > 0
    for name in ("recursion/random-tokens", "recursion/fixed-layer", "recursion/random-layer"):
        assert 0.4 * alrr < firing.loc[name, "alrr_extra_passes_mean"] < 2.5 * alrr


def test_jsonl_task_on_a_tiny_qwen3(tmp_path, tiny_loaded_model):
    model = tiny_loaded_model("qwen3", 3)
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1}", "answer": f"w{i + 2}", "group": g})
                              for i, g in zip(range(6), "ababab")) + "\n")
    cfg = EvaluateConfig(task=str(task), extractor="regex:(w\\d+)", techniques=("alrr",), n_samples=2,
                         sample_sizes=(2,), sensitivity=False, max_new_tokens=8, controls=True,
                         sampled_techniques=())
    result = run_evaluate(model, cfg, tmp_path / "out", progress=False)
    table = pd.read_csv(tmp_path / "out" / "evaluation.csv")
    assert set(table.difficulty) == {"all", "a", "b"}
    assert (table[table.difficulty == "all"].n == 6).all()
    assert result["thresholds"] is not None and set(result["thresholds"]) == set(range(3))


@pytest.mark.parametrize("argv, message", [
    (["--techniques", "lrs"], "LRS selects"),
    (["--techniques", "alrr+foo"], "unknown decode-time technique"),
    (["--n-samples", "1"], "N ≥ 2"),
    (["--layers", "12"], "out of range"),
    (["--k", "inf"], "finite"),
    (["--threshold-mode", "fixed"], "--thresholds FILE"),
    (["--extractor", "regex:("], "not a valid regular expression"),
])
def test_bad_input_one_line_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["evaluate", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_jsonl_without_answers_and_bad_thresholds(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "a = 1 ; what is a ?"}) + "\n")
    out = tmp_path / "out"
    assert main(["evaluate", "--task", str(task), "--out", str(out)]) == 2
    assert 'no "answer"' in capsys.readouterr().err
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"layers": {str(layer): 100.0 for layer in range(8)} | {"6": -1}}))
    assert main(["evaluate", "--threshold-mode", "fixed", "--thresholds", str(thresholds), "--out", str(out)]) == 2
    assert "threshold" in capsys.readouterr().err
    assert not out.exists()
