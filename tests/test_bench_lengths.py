"""``tellnorm bench lengths``: a tiny run on the organism's shape (1 layer, random init), checked for what it reports,
never for speed (the CPUs here are shared): the outputs and their columns, the tokens against an independent greedy
loop, windows that partition the positions, EOS really ignored, and bad settings refused before any model loads
with nothing written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from tellnorm.apps.bench import lengths as bench
from tellnorm.apps.bench.lengths import VARIANTS, LengthsBenchConfig, build_models, run_variant, windows
from tellnorm.apps.bench.norms import build_hf_model
from tellnorm.apps.cli import main
from tellnorm.errors import TellnormError

LENGTHS, WINDOW, PROMPT_LEN = (32, 64), 16, 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run through the CLI (HTML figure only: no browser start): (folder, JSON, exit code)."""
    out = tmp_path_factory.mktemp("bench_lengths")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tellnorm.figures.chromium_path", lambda: None)
        with pytest.warns(UserWarning, match="no Chromium"):
            code = main(["bench", "lengths", "--config", "organism", "--layers", "1", "--lengths",
                         *map(str, LENGTHS), "--window", str(WINDOW), "--repeats", "1", "--prompt-len",
                         str(PROMPT_LEN), "--threads", "1", "--out", str(out)])
    return out, json.loads((out / "bench_lengths.json").read_text()), code


def test_the_outputs_exist_with_their_columns(run):
    out, _, code = run
    assert code == 0
    assert (out / "bench_lengths.html").is_file()
    csv = pd.read_csv(out / "bench_lengths.csv")
    assert list(zip(csv["length"], csv["variant"])) == [(n, v) for n in LENGTHS for v in VARIANTS]
    assert {"mean_ms_per_token", "first_window_ms", "last_window_ms", "overhead_first_ms", "overhead_last_ms",
            "overhead_growth", "overhead_slope_ms_per_1k", "ratio_to_hf_first", "ratio_to_hf_last",
            "ratio_to_hf_growth", "peak_mb", "same_tokens_as_hf", "alrr_band_tokens", "erss_injections"} <= set(csv)
    per_window = pd.read_csv(out / "bench_lengths_windows.csv")
    assert list(per_window.columns) == ["length", "variant", "window", "start", "end", "ms_per_token", "overhead_ms",
                                        "ratio_to_hf"]
    assert len(per_window) == sum(len(windows(n, WINDOW)) for n in LENGTHS) * len(VARIANTS)
    assert (per_window["ms_per_token"] > 0).all()


def test_every_variant_generated_the_tokens_of_an_independent_greedy_loop(run):
    """The reference: the raw HF model of the same shape and seed, no cache, argmax at every step."""
    _, data, _ = run
    hf, tokenizer = build_hf_model("organism", 1, 0)
    ids = torch.tensor([bench.bench_prompt(SimpleNamespace(tokenizer=tokenizer), PROMPT_LEN, 0)])
    with torch.no_grad():
        for _ in range(LENGTHS[-1]):
            ids = torch.cat([ids, hf(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, PROMPT_LEN:].tolist()
    for n in LENGTHS:
        block = data["lengths"][str(n)]
        assert block["hf_tokens_sha256"] == bench.tokens_digest(expected[:n])
        assert block["hf_tokens_head"] == expected[:16]
        assert all(s["same_tokens_as_hf"] for s in block["variants"].values())
    counts = data["lengths"][str(LENGTHS[-1])]["variants"]
    assert counts["alrr"]["counts"]["alrr_kept_passes"] == 0  # warm-up 500 > 64 tokens: pure bookkeeping
    assert counts["erss"]["counts"]["erss_injections"] == 0


def test_windows_partition_the_positions_and_the_summary_follows_from_them(run):
    for length, window in ((64, 16), (50, 16), (16, 16), (8192, 512), (1000, 7)):
        spans = windows(length, window)
        covered = [p for start, end in spans for p in range(start, end)]
        assert covered == list(range(length))
        assert all(0 < end - start <= window for start, end in spans)
    _, data, _ = run
    for n in LENGTHS:
        block = data["lengths"][str(n)]
        assert block["windows"] == [list(s) for s in windows(n, WINDOW)]
        base, hf = block["variants"]["tellnorm"], block["variants"]["hf-generate"]
        for v, s in block["variants"].items():
            assert len(s["window_ms"]) == len(block["windows"]) and len(s["rounds"]) == 1
            assert s["first_window_ms"] == s["window_ms"][0] and s["last_window_ms"] == s["window_ms"][-1]
            if v == "hf-generate":
                assert s["overhead_ms"] is None and s["ratio_to_hf"] is None
                continue
            # one round: medians over rounds are that round's own values
            assert s["overhead_ms"] == pytest.approx([a - b for a, b in zip(s["window_ms"], base["window_ms"])])
            assert s["ratio_to_hf"] == pytest.approx([a / b for a, b in zip(s["window_ms"], hf["window_ms"])])
            assert s["ratio_to_hf_growth"] == pytest.approx(s["ratio_to_hf"][-1] / s["ratio_to_hf"][0])
            assert s["mean_ms_per_token"] * n / 1000 <= s["wall_s"]
        assert base["overhead_first_ms"] is None  # tellnorm is the baseline of every overhead


def test_eos_is_ignored_even_when_it_is_the_argmax():
    cfg = LengthsBenchConfig(config="organism", n_layers=1, lengths=(16,), window=16)
    models = build_models(cfg)
    tokenizer = models.tellnorm.tokenizer
    prompt = bench.bench_prompt(models.tellnorm, PROMPT_LEN, 0)
    first = run_variant("hf-generate", models, prompt, 1)["tokens"][0]
    with torch.no_grad():  # tied embeddings: EOS's logit becomes 3x the first token's, the argmax
        for hf in (models.hf, models.tellnorm.hf_model):
            embed = hf.get_input_embeddings().weight
            embed[tokenizer.eos_token_id] = 3 * embed[first]
    results = {v: run_variant(v, models, prompt, 16) for v in ("hf-generate", "tellnorm")}
    assert tokenizer.eos_token_id in results["hf-generate"]["tokens"]
    assert results["tellnorm"]["tokens"] == results["hf-generate"]["tokens"]
    assert all(len(r["intervals"]) == 16 for r in results.values())


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "8", "64"], "shorter than one --window"),
    (["--variants", "hf-generate", "tellnorm", "lrs"], "unknown variant"),
    (["--variants", "hf-generate", "alrr"], "must include hf-generate and tellnorm"),
    (["--lengths", "0", "64"], "--lengths must be positive"),
    (["--lengths", "-32"], "--lengths must be positive"),
    (["--window", "0"], "--window must be ≥ 1"),
    (["--lengths", "512"], "exceeds the organism shape's context"),
])
def test_bad_settings_fail_in_one_line_before_any_model_loads(flags, message, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for settings that should have been refused")

    monkeypatch.setattr(bench, "build_models", refuse)
    monkeypatch.setattr("tellnorm.apps.bench.norms.build_hf_model", refuse)
    out = tmp_path / "out"
    code = main(["bench", "lengths", "--config", "organism", "--layers", "1", "--window", str(WINDOW), *flags,
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tellnorm: error:") and message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_a_failed_check_leaves_no_file_behind(tmp_path, monkeypatch):
    real = bench.run_variant

    def tracing_edits_the_stream(variant, *args, **kwargs):
        result = real(variant, *args, **kwargs)
        if variant == "tracing":
            result["tokens"] = [t + 1 for t in result["tokens"]]
        return result

    monkeypatch.setattr(bench, "run_variant", tracing_edits_the_stream)
    out = tmp_path / "out"
    cfg = LengthsBenchConfig(config="organism", n_layers=1, lengths=(16,), window=16, repeats=1, variants=(
        "hf-generate", "tellnorm", "tracing"), out=out, progress=False)
    with pytest.raises(TellnormError, match="'tracing' generated other tokens than hf-generate") as err:
        bench.bench_lengths(cfg)
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())
