"""The suppression study on a non-organism model with a task, against references the test computes itself: greedy
outputs scored by the task, edited counts from a clean trace and the thresholds the study wrote (fixed and
per-request streaming τ), the random control's draws, calibrated τ from the calibration prompts' own norms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig, generate, run_forward
from tellnorm.norms import NormTracer
from tellnorm.tasks import Task, TaskItem, jsonl_task
from tellnorm.thresholds import ThresholdConfig

MAX_NEW = 24
WORDS = "a = 3 . b = a + 4 . what is b ?", "c = 7 . d = c * 2 . what is d ?", "e = 1 . f = e - 6 . what is f ?"
PROMPTS = [WORDS[0], WORDS[1], WORDS[2], f"{WORDS[1]} {WORDS[0]}", f"{WORDS[2]} {WORDS[1]}"]
CALIBRATION = ["g = 5 . h = g + g . what is h ?", "i = 2 . j = i * 9 . what is j ?", "k = 8 . what is k ?"]
# one condition of each kind, one seed: the study's bookkeeping, not its statistics, is under test
SMALL = dict(factors=(0.1,), amplify=(), random_seeds=(0,), steering_scales=(1.0,), max_new_tokens=MAX_NEW,
             batch_size=64)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A random-init 4-layer Qwen3 (the organism's tokenizer and thinking switch), a 5-problem task whose answers
    make problems 0, 2 and 4 right by construction, the clean greedy run traced, and fixed τ between two norms."""
    from tellnorm.backends import load_model
    from tellnorm.organism.standins import tiny_model
    from tellnorm.studies.suppression import layer_sets

    root = tmp_path_factory.mktemp("suppression_task")
    model = load_model(str(tiny_model(root / "model", "qwen3", n_layers=4)))
    sets = layer_sets(model)
    layers = sorted({l for ls in sets.values() for l in ls})
    prompts = [model.encode(model.chat_prompt(p, thinking=True)) for p in PROMPTS]
    tracer = NormTracer(model, layers)
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=MAX_NEW), observers=[tracer], batch_size=8)
    texts = [model.tokenizer.decode(g.generated_ids, skip_special_tokens=True) for g in gens]
    probe = Task("probe", [TaskItem(str(i), p, "0") for i, p in enumerate(PROMPTS)])
    stated = [probe.extract(t) for t in texts]
    answers = [(s if i % 2 == 0 and s is not None else "12345") for i, s in enumerate(stated)]
    path = root / "arith.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a, "group": "odd" if i % 2 else "even"}) + "\n"
                            for i, (p, a) in enumerate(zip(PROMPTS, answers))))
    task = jsonl_task(path, "last-number")
    frame = tracer.frame()
    n_prompt = {i: len(p) for i, p in enumerate(prompts)}
    frame = frame[frame.position >= frame.request_id.map(n_prompt)]  # generated tokens that went through the model
    tau = {}
    for layer, g in frame.groupby("layer"):  # midway between two norms near the 70th percentile: no ties at τ
        values = np.sort(g.norm.to_numpy())
        k = int(0.7 * len(values))
        tau[int(layer)] = float((values[k - 1] + values[k]) / 2)
    thresholds = root / "thresholds.json"
    thresholds.write_text(json.dumps({"layers": {str(l): t for l, t in tau.items()}}))
    return {"model": model, "task": task, "gens": gens, "texts": texts, "frame": frame, "sets": sets, "tau": tau,
            "thresholds": thresholds, "root": root, "n_prompt": n_prompt}


@pytest.fixture(scope="module")
def fixed_run(study):
    from tellnorm.studies.suppression import InterventionConfig, run_intervene

    cfg = InterventionConfig(threshold_mode="fixed", thresholds_file=str(study["thresholds"]), **SMALL)
    return run_intervene(study["model"], cfg, study["root"] / "fixed", task=study["task"], progress=False)


def _rows(result, condition):
    t = result["per_request"]
    return t[t.condition == condition].sort_values("problem").reset_index(drop=True)


def _above(study, layer, tau_of):
    """Per problem, generated tokens whose clean norm at ``layer`` exceeds ``tau_of(problem, norms)``."""
    f = study["frame"]
    out = []
    for i in range(len(PROMPTS)):
        norms = f[(f.request_id == i) & (f.layer == layer)].sort_values("position").norm.to_numpy()
        out.append(int((norms > tau_of(i, norms)).sum()))
    return out


def test_clean_accuracy_is_the_task_score_of_plain_greedy_outputs(study, fixed_run):
    task = study["task"]
    expected = [float(task.is_correct(item, text)) for item, text in zip(task.items, study["texts"])]
    assert 0 < sum(expected) < len(expected)  # the construction: some right, some wrong
    clean = _rows(fixed_run, "clean")
    assert clean.correct.tolist() == expected
    assert clean.n_generated.tolist() == [len(g.generated_ids) for g in study["gens"]]
    assert clean.difficulty.tolist() == [item.group for item in task.items]
    table = fixed_run["suppression"]
    row = table[(table.selection == "none") & (table.difficulty == "all")].iloc[0]
    assert row.accuracy == pytest.approx(np.mean(expected))
    assert row.no_answer == pytest.approx(np.mean([task.extract(t) is None for t in study["texts"]]))
    for group in ("even", "odd"):
        g = table[(table.selection == "none") & (table.difficulty == group)].iloc[0]
        members = [e for e, item in zip(expected, task.items) if item.group == group]
        assert g.accuracy == pytest.approx(np.mean(members)) and g.n == len(members)


def test_late_high_norm_edits_are_the_clean_norms_above_the_fixed_tau(study, fixed_run):
    # The late set is the last layer: scaling or clamping its output leaves the final RMSNorm's input direction,
    # hence every token, unchanged, so the edited runs visit the clean run's states.
    late = study["sets"]["late"]
    assert late == [3]
    expected = _above(study, 3, lambda i, norms: study["tau"][3])
    assert 0 < sum(expected) < len(study["frame"][study["frame"].layer == 3])
    n_layers = [len(g.generated_ids) - 1 for g in study["gens"]]
    for name in ("late/high-norm/scale/0.1", "late/high-norm/clamp/0.25"):
        rows = _rows(fixed_run, name)
        assert rows.n_edited.tolist() == expected, name
        assert rows.n_token_layers.tolist() == n_layers, name
    table = fixed_run["suppression"]
    row = table[(table.layer_set == "late") & (table.selection == "high-norm") & (table.edit == "scale")
                & (table.difficulty == "all")].iloc[0]
    assert row.fraction_edited == pytest.approx(sum(expected) / sum(n_layers))
    assert json.loads((study["root"] / "fixed" / "thresholds.json").read_text())["layers"]["3"] == study["tau"][3]


def test_random_control_edits_the_matched_fraction_by_its_own_draws(study, fixed_run):
    from tellnorm.interventions.selection import token_uniforms

    task, n_prompt = study["task"], study["n_prompt"]
    above = _above(study, 3, lambda i, norms: study["tau"][3])
    n_layers = [len(g.generated_ids) - 1 for g in study["gens"]]
    rate = {}
    for group in task.groups:
        members = [i for i, item in enumerate(task.items) if item.group == group]
        rate[group] = sum(above[i] for i in members) / sum(n_layers[i] for i in members)
    name = "late/random/scale/0.1/0"
    expected = []
    for i, item in enumerate(task.items):
        positions = np.arange(n_prompt[i], n_prompt[i] + n_layers[i])
        expected.append(int((token_uniforms(0, f"{name}#{i}", 3, positions) < rate[item.group]).sum()))
    assert _rows(fixed_run, name).n_edited.tolist() == expected
    table = fixed_run["suppression"]
    pick = (table.layer_set == "late") & (table.edit == "scale") & (table.difficulty == "all")
    random_row = table[pick & (table.selection == "random") & (table.seed == "0")].iloc[0]
    assert random_row.fraction_edited == pytest.approx(sum(expected) / sum(n_layers))
    high = table[pick & (table.selection == "high-norm")].iloc[0]
    assert abs(random_row.fraction_edited - high.fraction_edited) < 0.2  # matched in expectation, ~100 draws


def test_organism_only_measures_are_nan_with_reasons_and_steering_runs(study, fixed_run):
    table = fixed_run["suppression"]
    for column in ("delta_logp", "delta_logp_ci_low", "delta_logp_trace"):
        assert table[column].isna().all(), column
    assert fixed_run["per_request"][["logp", "logp_trace"]].isna().all().all()
    meta = json.loads((study["root"] / "fixed" / "interventions.json").read_text())
    skipped = meta["skipped"]
    assert {"delta_logp", "delta_logp_trace", "hits_by_label", "features"} <= set(skipped)
    assert "no SAEs" in skipped["features"] and all(skipped.values())
    assert "steering" not in skipped and fixed_run["steering"] is not None  # a thinking switch: the contrast runs
    assert fixed_run["hits"] is None and not (study["root"] / "fixed" / "suppression_hits.csv").exists()
    assert "label" not in fixed_run["top_tokens"].columns
    assert meta["task"]["name"] == "arith" and meta["task"]["groups"] == ["even", "odd"]
    assert meta["calibration"]["own_prompts"] and meta["threshold_mode"] == "fixed"
    assert meta["threshold_warmup"] is None and meta["max_new_tokens"] == MAX_NEW
    assert set(table.difficulty) == {"even", "odd", "all"}


def test_streaming_exact_tau_after_the_warm_up_matches_a_hand_computed_tracker(study):
    from tellnorm.studies.suppression import InterventionConfig, run_intervene

    warmup, k = 4, 1.5
    cfg = InterventionConfig(threshold_mode="exact", threshold=ThresholdConfig(warmup=warmup), steering=False,
                             features=False, **SMALL)
    result = run_intervene(study["model"], cfg, study["root"] / "exact", task=study["task"], progress=False)

    def streaming(i, norms):  # each token against τ of the request's strictly earlier tokens
        tau = np.full(len(norms), np.inf)
        for t in range(warmup, len(norms)):
            q1, q3 = np.quantile(norms[:t], (0.25, 0.75))
            tau[t] = q3 + k * max(q3 - q1, 1e-3)
        return tau

    expected = _above(study, 3, streaming)
    assert sum(expected) > 0
    assert _rows(result, "late/high-norm/scale/0.1").n_edited.tolist() == expected
    meta = result["meta"]
    assert meta["threshold_mode"] == "exact" and meta["threshold_warmup"] == warmup
    assert "per request" in meta["threshold_rule"] and meta["thresholds"] is None
    assert "clamp" in meta["skipped"] and "steering" in meta["skipped"]
    assert not (result["suppression"].edit == "clamp").any()


def test_calibrated_tau_comes_from_the_calibration_prompts(study):
    from tellnorm.studies.suppression import InterventionConfig, run_intervene

    model = study["model"]
    calibration = Task("calib", [TaskItem(str(i), p, "") for i, p in enumerate(CALIBRATION)])
    cfg = InterventionConfig(steering=False, features=False, **SMALL)
    result = run_intervene(model, cfg, study["root"] / "calibrated", task=study["task"], calibration=calibration,
                           progress=False)
    prompts = [model.encode(model.chat_prompt(p, thinking=True)) for p in CALIBRATION]
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=MAX_NEW), batch_size=8)
    tracer = NormTracer(model, [1, 3])  # every response token, the last one too: the responses' norms
    run_forward(model, [g.ids for g in gens], request_ids=list(range(len(gens))), observers=[tracer])
    f = tracer.frame()
    f = f[f.position >= f.request_id.map(dict(enumerate(map(len, prompts))))]
    for layer, g in f.groupby("layer"):
        q1, q3 = np.quantile(g.norm.to_numpy(), (0.25, 0.75))
        assert result["meta"]["thresholds"][str(layer)] == pytest.approx(q3 + 1.5 * max(q3 - q1, 1e-3), rel=1e-5)
    assert result["meta"]["calibration"] == {"name": "calib", "source": "", "n_prompts": 3, "own_prompts": False}


def test_bad_input_is_one_line_before_any_generation(study, monkeypatch):
    import tellnorm.generation
    from tellnorm.studies.suppression import InterventionConfig, run_intervene

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the input")

    monkeypatch.setattr(tellnorm.generation, "generate", no_generation)
    model, task, out = study["model"], study["task"], study["root"] / "refused"
    cfg = InterventionConfig(**SMALL)
    long = Task("long", [TaskItem("huge", " ".join(["a"] * 600), "1")])
    empty = Task("empty", [TaskItem("0", "a", "1")])
    empty.items.clear()
    mixed = Task("mixed", [TaskItem("0", "a", "1", "x"), TaskItem("1", "b", "1")])
    for kwargs, message in ((dict(), "needs a task"), (dict(task=long), "'huge' of long.*context of 512"),
                            (dict(task=empty), "has no problems"), (dict(task=task, calibration=long), "context"),
                            (dict(task=mixed), 'some problems a "group"')):
        with pytest.raises(TellnormError, match=message) as err:
            run_intervene(model, cfg, out, progress=False, **kwargs)
        assert "\n" not in str(err.value)
    assert not out.exists()


def test_the_organism_still_runs_without_a_task():
    from tellnorm.backends import load_model
    from tellnorm.organism import task as organism_task
    from tellnorm.studies.suppression import InterventionConfig, organism_inputs

    model = load_model("organism")
    cfg = InterventionConfig(per_difficulty=1, difficulties=(1, 5))
    inputs = organism_inputs(model, cfg)
    assert [p.difficulty for p in inputs.problems] == [1, 5] and inputs.groups == [1, 5]
    assert inputs.task is None and inputs.skipped == {} and inputs.cfg is cfg
    assert inputs.problems == [p for p in organism_task.test_split(1).problems if p.difficulty in (1, 5)]
    assert len(inputs.prompts) == 2
