"""``tellnorm bench norms``: outputs that agree with each other and with independent counts, and a tracer that
measures what ``run_with_cache`` measures. No timing assertions (standards: ratios come from one interleaved run).
"""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest
import torch
from helpers import active_hook_count, hf_layer_norms_float64

from tellnorm.apps.bench.norms import (
    VARIANTS,
    BenchConfig,
    bench_norms,
    build_model,
    cached_forward,
    cached_norms,
    make_sequences,
    plain_forward,
    traced_forward,
    traced_norms,
)
from tellnorm.apps.cli import main
from tellnorm.errors import TellnormError
from tellnorm.io import CSV_SIGNIFICANT_DIGITS

N_LAYERS, BATCH, SEQ, REPEATS = 2, 2, 16, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small benchmark run on the organism's shape: (output folder, returned summary, written JSON)."""
    out = tmp_path_factory.mktemp("bench")
    summary = bench_norms(BenchConfig(config="organism", n_layers=N_LAYERS, batch=BATCH, seq=SEQ, repeats=REPEATS,
                                      out=out, progress=False))
    return out, summary, json.loads((out / "bench_norms.json").read_text())


def test_json_is_the_returned_summary_and_csv_is_its_table(run):
    out, summary, data = run
    assert data == json.loads(json.dumps(summary, default=float))
    csv = pd.read_csv(out / "bench_norms.csv")
    assert list(csv["variant"]) == list(VARIANTS)
    def written(x):  # the CSV holds what is reported: CSV_SIGNIFICANT_DIGITS significant digits
        return float(f"{x:.{CSV_SIGNIFICANT_DIGITS}g}")

    for row in csv.itertuples():
        v = data["variants"][row.variant]
        assert row.median_s == written(v["median_s"])
        assert row.ratio_to_plain == written(v["ratio_to_plain"])
        assert (row.round_ratio_median, row.round_ratio_min, row.round_ratio_max) == tuple(
            written(x) for x in (v["round_ratio"]["median"], v["round_ratio"]["min"], v["round_ratio"]["max"]))
        assert row.n_rounds == REPEATS
        assert (row.retained_bytes, row.peak_bytes, row.peak_extra_bytes) == (
            v["retained_bytes"], v["peak_bytes"], v["peak_extra_bytes"])
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["torch_version"] == torch.__version__
    assert data["model"]["n_layers"] == N_LAYERS and data["inputs"]["n_tokens"] == BATCH * SEQ


def test_medians_and_ratios_follow_from_the_raw_interleaved_rounds(run):
    _, _, data = run
    rounds = data["rounds"]
    assert len(rounds) == REPEATS
    assert rounds[0]["order"] == ["plain", "traced", "cached"] and rounds[1]["order"] == ["traced", "cached", "plain"]
    medians = {}
    for v in VARIANTS:
        s = data["variants"][v]
        times = [r[v] for r in rounds]
        assert s["times_s"] == times and all(t > 0 for t in times)
        medians[v] = statistics.median(times)
        assert s["median_s"] == pytest.approx(medians[v], rel=1e-12)
        per_round = [r[v] / r["plain"] for r in rounds]
        assert s["round_ratios"] == pytest.approx(per_round, rel=1e-12)
        assert (s["round_ratio"]["median"], s["round_ratio"]["min"], s["round_ratio"]["max"]) == pytest.approx(
            (statistics.median(per_round), min(per_round), max(per_round)), rel=1e-12)
    for v in VARIANTS:  # the ratio of medians, not the median of ratios
        assert data["variants"][v]["ratio_to_plain"] == pytest.approx(medians[v] / medians["plain"], rel=1e-12)
    targets = data["targets"]
    assert targets["time_ratio_traced_to_plain"] == data["variants"]["traced"]["ratio_to_plain"]
    assert targets["time_ok"] == (targets["time_ratio_traced_to_plain"] <= targets["time_target"])


def test_retained_bytes_match_independent_counts_and_the_profiler(run):
    _, _, data = run
    n_tokens, d_model = BATCH * SEQ, data["model"]["d_model"]
    plain, traced, cached = (data["variants"][v] for v in VARIANTS)
    assert plain["retained_bytes"] == 0
    # The tracer keeps one fp32 scalar per token and layer, plus positions (int64) and the mask (bool) of the batch,
    # shared by all layers.
    assert traced["retained_detail"] == {"norms": n_tokens * N_LAYERS * 4, "token_metadata": n_tokens * (8 + 1)}
    assert traced["retained_bytes"] == n_tokens * N_LAYERS * 4 + n_tokens * 9
    # The cache keeps every layer's [tokens, d_model] fp32 activations (aliases counted once), plus their norms.
    assert cached["retained_detail"] == {"cache": n_tokens * N_LAYERS * d_model * 4, "norms": n_tokens * N_LAYERS * 4}
    assert cached["retained_bytes"] == sum(cached["retained_detail"].values())
    assert cached["retained_bytes"] > traced["retained_bytes"]
    # Independent method: the allocator's net bytes at the end of the profiled call (result still alive).
    for s in (plain, traced, cached):
        assert s["retained_bytes_profiler"] == s["retained_bytes"]
        assert s["peak_extra_bytes"] == s["peak_bytes"] - plain["peak_bytes"]
    assert plain["peak_bytes"] > 0
    targets = data["targets"]
    assert targets["retained_fraction_traced_to_cached"] == pytest.approx(
        traced["retained_bytes"] / cached["retained_bytes"])


def test_benchmark_checked_that_traced_and_cached_norms_agree(run):
    _, _, data = run
    c = data["correctness"]
    assert c["ok"] and c["max_rel_diff"] <= 1e-5 and c["shape"] == [N_LAYERS, BATCH, SEQ]


@pytest.fixture(scope="module")
def model():
    return build_model("organism", n_layers=3, seed=1)


def test_traced_norms_equal_cached_norms_and_hf_reference(model):
    sequences = make_sequences(model, 3, 20, seed=2)
    traced = traced_norms(traced_forward(model, sequences))
    cached = cached_norms(cached_forward(model, sequences))
    assert traced.shape == cached.shape == (3, 3, 20)
    torch.testing.assert_close(traced, cached, rtol=1e-5, atol=0)
    torch.testing.assert_close(traced.double(), hf_layer_norms_float64(model, sequences), rtol=1e-5, atol=0)
    assert plain_forward(model, sequences) is None
    assert active_hook_count(model) == 0  # a leaked hook would slow every later variant


def test_bad_configs_fail_in_one_line(model):
    with pytest.raises(TellnormError, match="unknown bench config"):
        BenchConfig(config="gpt-9")
    with pytest.raises(TellnormError, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(TellnormError, match="context"):
        make_sequences(model, 1, model.max_positions + 1)


def test_cli_writes_the_outputs(tmp_path, capsys):
    assert main(["bench", "norms", "--config", "organism", "--layers", "1", "--batch", "1", "--seq", "8",
                 "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench_norms.json").is_file() and (tmp_path / "bench_norms.csv").is_file()
    printed = capsys.readouterr().out
    assert "(b) NormTracer, all layers" in printed and "(b)/(a) =" in printed
    assert main(["bench", "norms", "--config", "nope", "--out", str(tmp_path / "x")]) == 2
