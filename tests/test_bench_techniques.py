"""``tellnorm bench techniques``: outputs that agree with each other and with independent runs. No timing assertions
(standards: ratios come from one interleaved run and are reported, never asserted)."""

from __future__ import annotations

import json
import math
import statistics

import pandas as pd
import pytest
import torch

from tellnorm.apps.bench.norms import build_model
from tellnorm.apps.bench.techniques import TARGETS, VARIANTS, Setup, TechniqueBenchConfig, bench_prompts, run_variant
from tellnorm.apps.cli import main
from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig, generate
from tellnorm.norms import NormTracer
from tellnorm.techniques import build_edits
from tellnorm.thresholds import FixedThresholds

N_LAYERS, PROMPTS, NEW, REPEATS = 2, 3, 12, 2  # NEW < ERSS's LOW_K = 40: ERSS cannot trigger


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small run through the CLI on the organism's shape (random init, 2 layers): (folder, JSON, exit code)."""
    out = tmp_path_factory.mktemp("bench_techniques")
    code = main(["bench", "techniques", "--config", "organism", "--layers", str(N_LAYERS), "--prompts", str(PROMPTS),
                 "--max-new-tokens", str(NEW), "--repeats", str(REPEATS), "--threads", "1", "--out", str(out)])
    return out, json.loads((out / "bench_techniques.json").read_text()), code


@pytest.fixture(scope="module")
def model():
    return build_model("organism", N_LAYERS, 0)  # the bench's model: same shape, same seed, same weights


def test_cli_writes_every_variant_with_sane_ratios(run):
    out, data, code = run
    assert code == 0
    assert list(data["variants"]) == list(VARIANTS)
    csv = pd.read_csv(out / "bench_techniques.csv")
    assert list(csv["variant"]) == list(VARIANTS)
    for s in data["variants"].values():
        assert len(s["times_s"]) == REPEATS and all(t > 0 for t in s["times_s"])
        assert s["n_tokens"] == PROMPTS * NEW  # EOS ignored: every request runs to max_new_tokens
        for key in ("median_s", "median_s_per_token", "ratio_to_plain"):
            assert math.isfinite(s[key]) and s[key] > 0
            assert math.isfinite(s["cpu"][key]) and s["cpu"][key] > 0
        rr = s["round_ratio"]
        assert rr["min"] <= rr["q1"] <= rr["median"] <= rr["q3"] <= rr["max"]
        assert s["deterministic"]
    assert data["variants"]["plain"]["ratio_to_plain"] == 1.0
    for v in ("alrr", "alrr+erss"):
        s = data["variants"][v]
        assert math.isfinite(s["ratio_beyond_passes"]) and math.isfinite(s["ratio_beyond_passes_estimate"])
        assert s["ratio_beyond_passes"] <= s["ratio_to_plain"] + 1e-12  # a cost ≥ 0 is subtracted
    for v, key in TARGETS.items():
        t = data["targets"][v]
        assert t["value"] == data["variants"][v][key] and t["met"] == (t["value"] <= t["target"])
        assert t["cpu_value"] == data["variants"][v]["cpu"][key] and t["cpu_met"] == (t["cpu_value"] <= t["target"])
        assert bool(csv.set_index("variant").loc[v, "met"]) == t["met"]
    machine = data["machine"]
    assert machine["torch_threads"] == 1 and machine["threads_set"] == 1
    assert "load_average_1m_start" in machine and "load_average_1m_end" in machine
    assert data["model"]["weights"] == "random-init" and data["model"]["n_layers"] == N_LAYERS


def test_alrr_really_fires_with_the_reported_thresholds(run):
    _, data, _ = run
    details = data["threshold_details"]
    assert set(details) == set(data["thresholds"]) == {str(x) for x in data["inputs"]["late_layers"]}
    for layer, d in details.items():
        assert d["tau"] == data["thresholds"][layer]
        assert d["n_tokens"] == PROMPTS * (NEW - 1)  # the last generated token never goes through the model
        assert d["in_band"] > 0  # the calibration run has band tokens (the 90th-percentile fallback if needed)
        if d["source"] == "Q3 + 1.5·IQR":
            assert d["tau"] == d["calibrated_tau"]
    alrr = data["checks"]["alrr"]
    assert alrr["alrr_band_tokens"] > 0 and alrr["alrr_extra_passes"] == alrr["alrr_band_tokens"]  # one pass each
    assert data["checks"]["alrr"]["extra_pass_calls"] > 0
    assert data["variants"]["alrr"]["extra_pass_s"] > 0


def test_ratios_are_ratios_of_medians_of_the_raw_interleaved_rounds(run):
    _, data, _ = run
    rounds = data["rounds"]
    assert [r["order"] for r in rounds] == [list(VARIANTS), list(VARIANTS[1:] + VARIANTS[:1])]
    per_token = {v: [r[v] / r["n_tokens"][v] for r in rounds] for v in VARIANTS}
    for v in VARIANTS:
        s = data["variants"][v]
        assert s["times_s"] == [r[v] for r in rounds]
        assert s["median_s_per_token"] == pytest.approx(statistics.median(per_token[v]), rel=1e-12)
        assert s["ratio_to_plain"] == pytest.approx(
            statistics.median(per_token[v]) / statistics.median(per_token["plain"]), rel=1e-12)
        assert s["round_ratios"] == pytest.approx([a / b for a, b in zip(per_token[v], per_token["plain"])])
    alrr = data["variants"]["alrr"]
    plain = statistics.median(per_token["plain"])
    beyond = statistics.median(t - r["extra_pass_s"]["alrr"] / r["n_tokens"]["alrr"]
                               for t, r in zip(per_token["alrr"], rounds))
    assert alrr["ratio_beyond_passes"] == pytest.approx(beyond / plain, rel=1e-9)
    cpu_per_token = {v: [r["cpu_s"][v] / r["n_tokens"][v] for r in rounds] for v in VARIANTS}
    for v in VARIANTS:
        assert data["variants"][v]["cpu"]["ratio_to_plain"] == pytest.approx(
            statistics.median(cpu_per_token[v]) / statistics.median(cpu_per_token["plain"]), rel=1e-12)
    beyond_cpu = statistics.median(t - r["extra_pass_cpu_s"]["alrr"] / r["n_tokens"]["alrr"]
                                   for t, r in zip(cpu_per_token["alrr"], rounds))
    assert alrr["cpu"]["ratio_beyond_passes"] == pytest.approx(
        beyond_cpu / statistics.median(cpu_per_token["plain"]), rel=1e-9)
    estimate = alrr["alrr_extra_passes"] * plain / N_LAYERS / alrr["n_tokens"]
    assert alrr["ratio_beyond_passes_estimate"] == pytest.approx(
        (alrr["median_s_per_token"] - estimate) / plain, rel=1e-9)


def test_bookkeeping_variants_keep_the_plain_tokens_checked_independently(run, model):
    """ERSS (reference constants, responses shorter than its 40-token streak) and LRS bookkeeping generate exactly
    the plain tokens; checked here with separate generate calls on the same model and thresholds."""
    _, data, _ = run
    for v in ("erss", "lrs"):
        assert data["checks"][v]["same_tokens_as_plain"]
    assert data["checks"]["erss"]["erss_injections"] == 0
    prompts, _ = bench_prompts(model, PROMPTS)
    assert data["inputs"]["prompt_lengths"] == [len(p) for p in prompts]
    taus = FixedThresholds({int(k): v for k, v in data["thresholds"].items()})
    sampling = SamplingConfig(max_new_tokens=NEW, ignore_eos=True)
    plain = generate(model, prompts, sampling)
    erss = build_edits(["erss"], model, fixed=taus)
    steered = generate(model, prompts, sampling, observers=erss)
    alrr = build_edits(["alrr"], model, fixed=taus)
    generate(model, prompts, sampling, observers=alrr)
    assert [g.generated_ids for g in steered] == [g.generated_ids for g in plain]
    assert all(len(g.generated_ids) == NEW for g in plain)
    # the bench's firing counts are those of an independent run with the same τ
    assert int(erss[0].report().erss_banked.sum()) == data["checks"]["erss"]["erss_banked"]
    assert int(alrr[0].report().alrr_extra_passes.sum()) == data["checks"]["alrr"]["alrr_extra_passes"]


def test_timing_the_extra_passes_changes_nothing_and_counts_every_call(model):
    """With a low τ ALRR fires; the timed variant reports the time and the calls of its extra passes, and its tokens
    and counts are those of the untimed variant."""
    prompts, _ = bench_prompts(model, 2)
    layer = model.late_layers()[0]
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    tracer = NormTracer(model, [layer])
    generate(model, prompts, sampling, observers=[tracer])
    norms = torch.tensor(tracer.frame().norm.to_numpy())
    # τ at the lower quartile of the norms: many tokens lie in the band τ < ‖x‖ < 1.5·τ
    setup = Setup(prompts, sampling, 2, [layer], FixedThresholds({layer: float(norms.quantile(0.25))}))
    plain_alrr = run_variant("alrr", model, setup)
    timed = run_variant("alrr", model, setup)
    lrs = run_variant("lrs", model, setup)
    passes = int(timed["edits"][0].report().alrr_extra_passes.sum())
    assert passes > 0 and passes == int(plain_alrr["edits"][0].report().alrr_extra_passes.sum())
    assert 0 < timed["extra_pass"]["calls"] <= passes
    assert timed["extra_pass"]["wall_s"] > 0 and timed["extra_pass"]["cpu_s"] >= 0
    assert [g.generated_ids for g in timed["generations"]] == [g.generated_ids for g in plain_alrr["generations"]]
    assert all(len(g.generated_ids) == 8 for g in timed["generations"])  # ignore_eos: every request runs to the end
    assert len(lrs["lrs_scores"]) == len(prompts) and lrs["lrs_scores"].ge(0).all()


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be"),
    (["--config", "gpt2"], "unknown bench config"),
    (["--prompts", "0"], "--prompts must be"),
    (["--layers", "0"], "--layers must be"),
    (["--config", "organism", "--layers", "1", "--max-new-tokens", "400"], "exceeds the model's context"),
])
def test_bad_input_gives_one_error_line(argv, message, tmp_path, capsys):
    code = main(["bench", "techniques", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tellnorm: error:") and message in err[0]


def test_config_validation():
    with pytest.raises(TellnormError, match="warmup"):
        TechniqueBenchConfig(warmup=0)
    assert TechniqueBenchConfig().weights == "trained"
    assert TechniqueBenchConfig(n_layers=2).weights == "random-init"
    assert TechniqueBenchConfig(config="qwen3-0.6b").weights == "random-init"
