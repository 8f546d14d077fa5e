"""Norm–feature correlation: Spearman against scipy, every signal against a numpy recomputation on cached
activations, the reasoning profile against features.top_k_scores, the bootstrap over problems, shard merging."""

import math

import numpy as np
import pytest
import torch
from test_bounds import make_corpus, model_saes, reference

from tellnorm import features as F
from tellnorm import signals as S
from tellnorm.errors import TellnormError
from tellnorm.studies import correlation as C


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for n in (3, 8, 36):
        for _ in range(20):
            x, y = rng.integers(0, 4, size=n).astype(float), rng.normal(size=n)  # x has ties
            if np.ptp(x) == 0:
                continue
            assert math.isclose(C.spearman(x, y), spearmanr(x, y).statistic, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isnan(C.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(C.spearman([1], [2]))
    with pytest.raises(TellnormError, match="paired"):
        C.spearman([1, 2], [1, 2, 3])


def _np_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def _np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_entropies_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(700, 50)) * 4  # more rows than one chunk
    np.testing.assert_allclose(S.entropy_from_logits(torch.tensor(logits, dtype=torch.float32)).numpy(),
                               _np_entropy(_np_softmax(logits.astype(np.float32))), rtol=1e-6)
    h = rng.normal(size=(30, 64))
    h[0] = 0.0
    sq = h ** 2
    ref = _np_entropy(sq / np.where(sq.sum(1, keepdims=True) > 0, sq.sum(1, keepdims=True), 1))
    np.testing.assert_allclose(S.hidden_state_entropy(torch.tensor(h)).numpy(), ref, rtol=1e-12)
    rows = _np_softmax(rng.normal(size=(10, 4, 12)))
    rows[:, :, 8:] = 0.0  # keys a causal mask hides
    rows /= rows.sum(-1, keepdims=True)
    np.testing.assert_allclose(S.attention_entropy(torch.tensor(rows)).numpy(), _np_entropy(rows).mean(-1),
                               rtol=1e-12)


def _setup(model, seed=0):
    saes = model_saes(model, ("standard", "topk", "gated"), seed=seed)
    corpus = make_corpus(model, n=5, seed=seed)
    reasoning, contrast = F.reasoning_features(model, saes, corpus, top_k=5)
    thinking = [i for i, m in enumerate(corpus.modes) if m == "thinking"]
    return saes, corpus, reasoning, contrast, thinking


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_signals_match_numpy_on_cached_activations(tiny_loaded_model, hf_reference, arch):
    model = tiny_loaded_model(arch)
    saes, corpus, reasoning, _, thinking = _setup(model)
    observer = C.collect_signals(model, saes, reasoning, [corpus.sequences[i] for i in thinking],
                                 {i: corpus.n_prompt[i] for i in thinking}, request_ids=thinking, batch_size=3)
    assert observer.attention_seen == {0, 1, 2}
    ref = hf_reference(arch)  # an independent HF copy: its final norm and unembedding, read as plain arrays
    norm_w = ref.model.norm.weight.detach().double().numpy()
    eps = ref.model.norm.variance_epsilon
    unembed = ref.lm_head.weight.detach().double().numpy()
    names = [model.hook_name(layer) for layer in saes] + [f"blocks.{layer}.attn.hook_pattern" for layer in saes]
    for i in thinking:
        seq, k = corpus.sequences[i], corpus.n_prompt[i]
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=names)
        got = observer.sums.problems[i]
        assert got["count"] == len(seq) - k
        final = _np_entropy(_np_softmax(logits[0, k:].double().numpy())).sum()
        assert math.isclose(got[C.FINAL], final, rel_tol=1e-5)
        for j, (layer, sae) in enumerate(saes.items()):
            h = cache[model.hook_name(layer)][0, k:].float()
            hn = h.double().numpy()
            acts, _ = reference(sae, h)
            fold = np.linalg.norm(sae.W_dec.detach().double().numpy(), axis=1)
            R = reasoning[layer]
            lens = hn / np.sqrt((hn ** 2).mean(1, keepdims=True) + eps) * norm_w @ unembed.T
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, :, k:].double().numpy()  # [heads, q, keys]
            expected = {"norm": np.linalg.norm(hn, axis=1).sum(),
                        C.REFERENCE: (acts[:, R] * fold[R]).sum() / len(R),
                        "layer_output_entropy": _np_entropy(_np_softmax(lens)).sum(),
                        "hidden_state_entropy": _np_entropy(hn ** 2 / (hn ** 2).sum(1, keepdims=True)).sum(),
                        "attention_entropy": _np_entropy(pattern).mean(0).sum()}
            for signal, value in expected.items():
                assert math.isclose(got[signal][j], value, rel_tol=2e-4), (arch, i, layer, signal)


@pytest.fixture(scope="module")
def qwen3_signals(tiny_loaded_model):
    model = tiny_loaded_model("qwen3")
    saes, corpus, reasoning, contrast, thinking = _setup(model, seed=1)
    starts = {i: corpus.n_prompt[i] for i in thinking}
    observer = C.collect_signals(model, saes, reasoning, [corpus.sequences[i] for i in thinking], starts,
                                 request_ids=thinking, batch_size=1)
    return model, saes, corpus, reasoning, contrast, thinking, observer


def test_reasoning_profile_equals_top_k_scores_and_lens_ends_at_the_output(qwen3_signals):
    from tellnorm.features import top_k_scores

    _, _, _, _, contrast, _, observer = qwen3_signals
    values = C.layer_values(observer.sums)
    trend = top_k_scores(contrast, k=5)
    np.testing.assert_allclose(values[C.REFERENCE].to_numpy(), trend["thinking"].to_numpy(), rtol=1e-5)
    last = values.iloc[-1]  # the logit lens at the last layer is the model's own output distribution
    assert math.isclose(last["layer_output_entropy"], last[C.FINAL], rel_tol=1e-5)


def test_bootstrap_resamples_problems(qwen3_signals):
    from tellnorm.stats import BOOTSTRAP_RESAMPLES

    *_, observer = qwen3_signals
    table = C.correlation_table(observer.sums, seed=0)
    _, counts, sums, _ = observer.sums.arrays()
    n = len(counts)
    idx = np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    reps = [C.spearman(sums["norm"][r].sum(0) / counts[r].sum(), sums[C.REFERENCE][r].sum(0) / counts[r].sum())
            for r in idx]
    row = table[(table.signal == "norm") & (table.basis == "layers")].iloc[0]
    point = C.spearman(sums["norm"].sum(0), sums[C.REFERENCE].sum(0))
    assert math.isclose(row.spearman_x100, 100 * point)
    assert math.isclose(row.ci_low, 100 * np.quantile(reps, 0.025), abs_tol=1e-9)
    assert math.isclose(row.ci_high, 100 * np.quantile(reps, 0.975), abs_tol=1e-9)


def test_table_rows_and_the_undefined_final_entropy(qwen3_signals):
    model, *_, observer = qwen3_signals
    table = C.correlation_table(observer.sums)
    assert {"signal", "basis", "spearman_x100", "ci_low", "ci_high", "n", "note"} <= set(table)
    final = table[(table.signal == C.FINAL) & (table.basis == "layers")].iloc[0]
    assert math.isnan(final.spearman_x100) and "not per layer" in final.note
    assert not math.isnan(table[(table.signal == C.FINAL) & (table.basis == "problems")].spearman_x100.iloc[0])
    assert "adjacent ranks" in table[table.signal == "norm"].note.iloc[0]
    shaped = C.paper_table(table, model.name)
    assert list(shaped.signal) == list(C.LAYER_SIGNALS) + [C.FINAL] and "paper" in shaped


def test_signal_sums_merge_over_shards(qwen3_signals):
    model, saes, corpus, reasoning, _, thinking, observer = qwen3_signals
    parts = [C.collect_signals(model, saes, reasoning, [corpus.sequences[i] for i in part],
                               {i: corpus.n_prompt[i] for i in part}, request_ids=part, batch_size=1).sums
             for part in (thinking[:2], thinking[2:])]
    merged = parts[0].merge(parts[1])
    ids, counts, sums, final = merged.arrays()
    ids_w, counts_w, sums_w, final_w = observer.sums.arrays()
    order = [ids.index(i) for i in ids_w]
    assert np.array_equal(counts[order], counts_w)
    for signal in C.PROFILE_SIGNALS:
        np.testing.assert_allclose(sums[signal][order], sums_w[signal], rtol=1e-12)
    np.testing.assert_allclose(final[order], final_w, rtol=1e-12)


def test_chunked_encoding_gives_the_same_sums(qwen3_signals, monkeypatch):
    model, saes, corpus, reasoning, _, thinking, observer = qwen3_signals
    monkeypatch.setattr(S, "ENTROPY_CHUNK", 5)
    chunked = C.collect_signals(model, saes, reasoning, [corpus.sequences[i] for i in thinking],
                                {i: corpus.n_prompt[i] for i in thinking}, request_ids=thinking, batch_size=1).sums
    for i in thinking:
        for signal in C.PROFILE_SIGNALS:
            np.testing.assert_allclose(chunked.problems[i][signal], observer.sums.problems[i][signal], rtol=1e-5)


def test_correlation_study_writes_its_tables(qwen3_signals, tmp_path):
    import pandas as pd

    model, saes, corpus, *_ = qwen3_signals
    result = C.correlation_study(model, saes, corpus, tmp_path, top_k=5, figures=False)
    written = pd.read_csv(tmp_path / "correlation.csv")
    assert {"signal", "spearman_x100", "ci_low", "ci_high"} <= set(written)
    assert len(pd.read_csv(tmp_path / "correlation_layers.csv")) == 3
    assert model.name in pd.read_csv(tmp_path / "correlation_table.csv")
    assert result["layers"].n_tokens.iloc[0] == sum(len(corpus.sequences[i]) - corpus.n_prompt[i]
                                                    for i, m in enumerate(corpus.modes) if m == "thinking")
    with pytest.raises(TellnormError, match="at least 3 layers"):
        C.correlation_study(model, saes, corpus, tmp_path, layers=[0, 1])
