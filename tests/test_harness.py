"""``--model tellnorm`` in lm-eval (tellnorm.apps.harness), offline on the organism.

References, each computed without the harness: ``tellnorm.organism.evaluate`` for accuracy (its own prompts, its own
token-level answer parser); ``tellnorm.generation.generate`` with ``build_edits`` for firing counts; LRS's statistic
and tellnorm's selectors on directly generated samples for selection. The in-process runs index tellnorm's tasks
only; the command-line runs index all of lm-eval's (several seconds each).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tellnorm.errors import TellnormError

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval>=0.4.13' math-verify)")

MAX_TOKENS = 240  # the organism's response budget: the task YAML's max_gen_toks and organism.evaluate's default
BATCH = 16


@pytest.fixture(scope="module")
def organism():
    from tellnorm.backends import load_model

    return load_model("organism")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    from tellnorm.apps.harness import TASK_DIR

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # tellnorm's tasks only: fast


@pytest.fixture(scope="module")
def calibrated(organism):
    """τ computed here as ``tellnorm evaluate`` does (validation problems, greedy, every layer, Q3 + 1.5·IQR)."""
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts
    from tellnorm.techniques import calibrated_thresholds, calibration_norms

    prompts = problem_prompts(organism, task.validation_split(1).problems, "thinking")
    norms = calibration_norms(organism, prompts, list(range(organism.n_layers)), max_new_tokens=MAX_TOKENS,
                              batch_size=BATCH)
    return calibrated_thresholds(norms)


def run_lm_eval(lm, task_manager, *, limit=None):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=["tellnorm_organism"], task_manager=task_manager, limit=limit,
                                   bootstrap_iters=0, log_samples=True)


def test_committed_task_data_is_the_organism_test_split():
    from tellnorm.apps.harness.tasks import COMMITTED_PER_DIFFICULTY, ORGANISM_JSONL, organism_rows

    rows = [json.loads(line) for line in ORGANISM_JSONL.read_text().splitlines()]
    assert rows == organism_rows(COMMITTED_PER_DIFFICULTY)
    assert len(rows) == 10 * COMMITTED_PER_DIFFICULTY


def test_lm_eval_accuracy_equals_organism_evaluate(organism, task_manager):
    from tellnorm.apps.harness.model import TellnormLM
    from tellnorm.apps.harness.tasks import COMMITTED_PER_DIFFICULTY, math_results, organism_results
    from tellnorm.organism.evaluate import EvalConfig, evaluate

    lm = TellnormLM(pretrained=organism, thresholds="off", batch_size=BATCH)
    out = run_lm_eval(lm, task_manager)
    samples = sorted(out["samples"]["tellnorm_organism"], key=lambda s: s["doc_id"])

    per_problem, _ = evaluate(organism, EvalConfig(per_difficulty=COMMITTED_PER_DIFFICULTY, modes=("thinking",),
                                                   max_new_tokens=MAX_TOKENS), progress=False)
    assert len(samples) == len(per_problem) == 30
    assert [s["acc"] for s in samples] == per_problem.correct.astype(float).tolist()
    assert out["results"]["tellnorm_organism"]["acc,none"] == per_problem.correct.mean()
    assert [r["n_generated"] for r in lm.records] == per_problem.n_generated.tolist()
    # math-verify reads every one of these responses as the organism's parser does ...
    for s in samples:
        response = s["resps"][0][0]
        assert math_results(s["doc"], [response]) == organism_results(s["doc"], [response])
    # ... but not a response that never gives its answer (the trace's last number): hence the organism's checker.
    unanswered = "<think> \n f = 8 . e = f - 7 = 8 - 7 = 1 . \n </think>"
    assert organism_results({"answer": "1"}, [unanswered]) == {"acc": 0.0, "answered": 0.0}
    assert math_results({"answer": "1"}, ["f = 8 . e = f - 7 = 8 - 7 = 1 ."])["acc"] == 1.0
    info = out["config"]["tellnorm"]
    assert info["responses"] == 30 and info["technique"] == "none" and info["thresholds"] is None


def test_technique_firing_counts_equal_direct_generation(organism, task_manager, calibrated, tmp_path):
    from tellnorm.apps.harness.model import TellnormLM
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts
    from tellnorm.techniques import build_edits, firing_report

    stats = tmp_path / "alrr.jsonl"
    lm = TellnormLM(pretrained=organism, technique="alrr", calibration_per_difficulty=1, batch_size=BATCH,
                    stats=str(stats))
    assert lm.thresholds.values == calibrated.values
    limit = 12
    out = run_lm_eval(lm, task_manager, limit=limit)
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(records) == limit and records == json.loads(json.dumps(lm.records))

    problems = task.test_split(3).problems[:limit]
    request_ids = [r["request_id"] for r in records]
    edits = build_edits(["alrr"], organism, fixed=calibrated)
    gens = generate(organism, problem_prompts(organism, problems, "thinking"),
                    SamplingConfig(max_new_tokens=MAX_TOKENS), request_ids=request_ids, observers=edits,
                    batch_size=BATCH)
    direct = firing_report(edits, request_ids).set_index("request_id")
    counters = ["alrr_band_tokens", "alrr_extra_passes", "alrr_kept_passes"]
    harness = {r["request_id"]: [r[c] for c in counters] for r in records}
    assert harness == {rid: direct.loc[rid, counters].astype(int).tolist() for rid in request_ids}
    assert direct.alrr_extra_passes.sum() > 0  # it fired
    assert [r["n_generated"] for r in records] == [len(g.generated_ids) for g in gens]
    correct = [float(task.parse_answer(organism.token_strings(g.generated_ids)) == p.answer)
               for g, p in zip(gens, problems)]
    samples = sorted(out["samples"]["tellnorm_organism"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == correct
    info = out["config"]["tellnorm"]
    assert info["alrr_extra_passes_mean"] == direct.alrr_extra_passes.mean()
    assert all(0 <= r["frac_above_tau"] <= 1 and r["late_norm_max"] >= r["late_norm_mean"] > 0 for r in records)


@pytest.mark.parametrize("select", ["lrs", "majority", "self-certainty"])
def test_selection_over_samples_matches_tellnorms_selectors(organism, task_manager, calibrated, tmp_path, select):
    import numpy as np

    from tellnorm.apps.harness.model import TellnormLM
    from tellnorm.generation import SamplingConfig, generate
    from tellnorm.norms import NormTracer
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts
    from tellnorm.techniques import confidence as C
    from tellnorm.techniques import lrs as L

    taus = tmp_path / "taus.json"
    calibrated.to_json(taus)
    n, limit = 3, 4
    lm = TellnormLM(pretrained=organism, select=select, n=n, thresholds=str(taus), batch_size=BATCH)
    out = run_lm_eval(lm, task_manager, limit=limit)
    records = lm.records
    assert len(records) == n * limit

    problems = task.test_split(3).problems[:limit]
    prompts = [p for p in problem_prompts(organism, problems, "thinking") for _ in range(n)]
    request_ids = [r["request_id"] for r in records]
    tracer = NormTracer(organism, organism.late_layers())
    gens = generate(organism, prompts, SamplingConfig.paper(max_new_tokens=MAX_TOKENS, seed=0),
                    request_ids=request_ids, observers=[tracer], batch_size=BATCH, token_stats=True)
    frame = tracer.frame()
    frame = frame[frame.position >= frame.request_id.map({g.request_id: len(g.prompt_ids) for g in gens})]
    score = L.scores(L.statistics_table(frame, calibrated.values), L.LRSConfig(), organism.late_layers())
    answers = [task.parse_answer(organism.token_strings(g.generated_ids)) for g in gens]
    conf = C.ConfidenceConfig.scaled(float(np.median([len(g.generated_ids) for g in gens])))
    samples = sorted(out["samples"]["tellnorm_organism"], key=lambda s: s["doc_id"])
    for q in range(limit):
        group = range(q * n, (q + 1) * n)
        if select == "lrs":
            expected = L.pick([score[request_ids[j]] for j in group])
        else:
            _, expected = C.select([answers[j] for j in group], [gens[j].meta for j in group], select, conf,
                                   vocab_size=organism.hf_model.config.vocab_size, key=request_ids[q * n].split("#")[0])
        assert [records[j]["selected"] for j in group] == [k == expected for k in range(n)]
        chosen = gens[q * n + expected]
        assert chosen.finish_reason == "eos"  # the response is its text up to the end-of-turn token
        assert samples[q]["resps"][0][0].rstrip() == organism.tokenizer.decode(chosen.generated_ids[:-1])
        assert samples[q]["acc"] == float(answers[q * n + expected] == problems[q].answer)
    assert [r["lrs_D"] for r in records] == pytest.approx([score[rid] for rid in request_ids], rel=1e-12)


def test_bad_model_args_are_one_line(organism, tiny_model_dir):
    from tellnorm.apps.harness.model import TellnormLM

    for kwargs, message in [({"technique": "foo"}, "unknown decode-time technique 'foo'"),
                            ({"select": "best"}, "model arg select='best'"),
                            ({"bogus": 1}, "unknown model arg(s) bogus"),
                            ({"thresholds": "calibrate", "pretrained": str(tiny_model_dir())},
                             "thresholds=calibrate uses the organism's validation problems"),
                            ({"technique": "alrr", "pretrained": str(tiny_model_dir())}, "needs per-layer thresholds")]:
        with pytest.raises(TellnormError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            TellnormLM(**{"pretrained": organism, **kwargs})
        assert "\n" not in str(err.value)
    lm = TellnormLM(pretrained=organism, thresholds="off")
    with pytest.raises(TellnormError, match="generate_until only") as err:
        lm.loglikelihood([])
    assert "\n" not in str(err.value)


def test_chat_template_and_think_end_token(organism):
    from tellnorm.apps.harness.model import TellnormLM
    from tellnorm.generation import Generation

    question = "f = 8 ; e = f - 7 ; what is e ?"
    lm = TellnormLM(pretrained=organism, thresholds="off", thinking=False)
    assert lm.apply_chat_template([{"role": "user", "content": question}]) == organism.chat_prompt(question, False)
    two = lm.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": question}])
    assert two.startswith("<|im_start|>system\nbe brief<|im_end|>") and two.endswith("<think>\n\n</think>\n\n")

    response = "<think> \n e = f - 7 = 8 - 7 = 1 . \n </think> \n \n answer : 1 <|im_end|>"
    gen = Generation("r", [1], organism.encode(response), "eos")
    eos = ["<|im_end|>"]
    assert TellnormLM(pretrained=organism, thresholds="off")._text(gen, eos) == response[:-len(eos[0])]
    assert TellnormLM(pretrained=organism, thresholds="off", think_end_token="</think>")._text(gen, eos) == \
        "answer : 1 "


def test_cli_bad_input_is_one_line(capsys, organism, task_manager, tmp_path):
    import lm_eval

    from tellnorm.apps.harness import ORGANISM_TASK_YAML
    from tellnorm.apps.harness.cli import main, offline_dataset_message
    from tellnorm.apps.harness.model import TellnormLM

    assert main(["--model", "tellnorm", "--model_args", "pretrained=organism,technique=foo",
                 "--tasks", str(ORGANISM_TASK_YAML)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tellnorm harness: error: unknown decode-time technique 'foo': choose from alrr, erss, "
                       "combined with '+'")

    # A task whose data is not in the offline cache: the CLI prints offline_dataset_message's line for it.
    task = {"task": "tellnorm_offline_probe", "dataset_path": "tellnorm-tests/no-such-dataset", "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "q", "doc_to_target": "a"}
    with pytest.raises(Exception) as raised:
        lm_eval.simple_evaluate(model=TellnormLM(pretrained=organism, thresholds="off"), tasks=[task],
                                task_manager=task_manager, bootstrap_iters=0)
    line = offline_dataset_message(raised.value)
    assert line.startswith("task tellnorm_offline_probe needs the dataset tellnorm-tests/no-such-dataset, which is "
                           "not in this machine's Hugging Face cache")
    assert "datasets.load_dataset('tellnorm-tests/no-such-dataset')" in line and "\n" not in line

    from tellnorm.apps.harness.tasks import organism_dataset

    with pytest.raises(TellnormError, match="does not exist"):
        organism_dataset(organism_jsonl=str(tmp_path / "missing.jsonl"))


@pytest.mark.slow  # a fresh process that indexes all of lm-eval's tasks: ~20 s
def test_literal_lm_eval_command_writes_results_with_norm_statistics(tmp_path):
    """``lm_eval --model tellnorm`` itself: tellnorm's task YAML imports tellnorm.apps.harness before the model is
    made."""
    from pathlib import Path

    from tellnorm.apps.harness import ORGANISM_TASK_YAML

    lm_eval = Path(sys.executable).with_name("lm_eval")
    stats = tmp_path / "requests.jsonl"
    run = subprocess.run([str(lm_eval), "--model", "tellnorm", "--model_args",
                          f"pretrained=organism,technique=erss,calibration_per_difficulty=1,stats={stats}",
                          "--tasks", str(ORGANISM_TASK_YAML), "--limit", "3", "--batch_size", "8",
                          "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["tellnorm"]["technique"] == "erss"
    assert results["config"]["tellnorm"]["responses"] == 3
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(records) == 3 and all("erss_injections" in r and "late_norm_mean" in r for r in records)
