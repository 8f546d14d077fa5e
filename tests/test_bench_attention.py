"""``tellnorm bench attention``: a small run on the organism's shape (1 layer, random init), checked for what it
reports, never for speed (the CPUs here are shared): the backend's logits equal raw HF's, the medians and ratios
follow from the rounds, the eager bridge holds more memory than sdpa, and the outputs are written."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from tellnorm.apps.bench.attention import (
    AttentionBenchConfig,
    bench_attention,
    build_models,
    decode_step,
    peak_prefill_bytes,
    prefill,
)
from tellnorm.backends.fastpath import GQA_SDPA
from tellnorm.errors import TellnormError

CONTEXTS = (16, 64)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-attention")
    cfg = AttentionBenchConfig(config="organism", n_layers=1, contexts=CONTEXTS, decode_steps=2, repeats=2,
                               eager_up_to=64, out=out, progress=False)
    return out, bench_attention(cfg)


def test_the_outputs_are_the_summary(run):
    out, summary = run
    assert json.loads((out / "bench_attention.json").read_text()) == json.loads(json.dumps(summary))
    csv = pd.read_csv(out / "bench_attention.csv")
    assert list(csv["context"]) == list(CONTEXTS)
    assert (out / "bench_attention.html").is_file()
    # tellnorm's sdpa passes grouped key/value heads to torch's CPU kernel uncopied (backends/fastpath.py)
    assert summary["model"]["kernels"] == {"hf": "sdpa", "tellnorm": GQA_SDPA, "bridge": "eager"}


def test_the_backend_computed_raw_hfs_logits(run):
    _, summary = run
    assert all(row["tellnorm"] <= 1e-4 for row in summary["checks"].values())


def test_ratios_and_slopes_follow_from_the_rows(run):
    _, summary = run
    for row in summary["rows"]:
        for kind in ("prefill", "decode"):
            assert row[f"{kind}_ms:hf"] > 0 and row[f"{kind}_ms:tellnorm"] > 0
            assert row[f"{kind}_ratio_q1:tellnorm"] <= row[f"{kind}_ratio:tellnorm"] <= row[f"{kind}_ratio_q3:tellnorm"]
    first, second = summary["rows"]
    slope = math.log(second["peak_mb:tellnorm"] / first["peak_mb:tellnorm"]) / math.log(CONTEXTS[1] / CONTEXTS[0])
    assert second["peak_growth:tellnorm"] == pytest.approx(slope, rel=1e-9)
    worst = max(max(r["prefill_ratio:tellnorm"], r["decode_ratio:tellnorm"]) for r in summary["rows"])
    assert summary["targets"]["time_ratio_max"] == worst


def test_the_bridge_as_booted_holds_the_score_matrix_and_sdpa_does_not():
    cfg = AttentionBenchConfig(config="organism", n_layers=1, contexts=(256,), eager_up_to=256)
    models = build_models(cfg)
    ids = torch.randint(0, 30, (1, 256), generator=torch.Generator().manual_seed(0))
    peaks = {variant: peak_prefill_bytes(model, ids, "cpu") for variant, model in models.items()}
    heads = models["hf"].config.num_attention_heads
    assert peaks["tellnorm"] == peaks["hf"]
    assert peaks["bridge"] - peaks["hf"] >= heads * 256 * 256 * 4  # at least one float32 [heads, T, T] matrix


def test_a_decode_step_leaves_the_cache_as_it_found_it():
    models = build_models(AttentionBenchConfig(config="organism", n_layers=1, eager_up_to=0))
    ids = torch.randint(0, 30, (1, 20), generator=torch.Generator().manual_seed(1))
    reference, _ = prefill(models["hf"], ids)
    _, cache = prefill(models["tellnorm"], ids[:, :19])
    first = decode_step(models["tellnorm"], cache, ids[:, 19:], 19)
    again = decode_step(models["tellnorm"], cache, ids[:, 19:], 19)
    assert cache.get_seq_length() == 19
    assert torch.equal(first, again) and (first - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kwargs, message", [
    ({"contexts": ()}, "--contexts must be positive"),
    ({"repeats": 0}, "--repeats must be ≥ 1"),
    ({"dtype": "int8"}, "--dtype must be"),
    ({"config": "gpt2"}, "unknown bench config"),
])
def test_bad_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(TellnormError, match=message) as err:
        AttentionBenchConfig(**kwargs)
    assert "\n" not in str(err.value)
