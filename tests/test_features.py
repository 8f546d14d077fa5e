"""Reasoning features: the contrast and ReasonScore against float64 numpy references on cached activations."""

import math
import random

import numpy as np
import pytest
import torch
from helpers import organism_prompts, tiny_organism_like

from tellnorm import features as F
from tellnorm.errors import TellnormError


@pytest.fixture(scope="module")
def setup():
    from sae_lens import StandardSAE, StandardSAEConfig

    model = tiny_organism_like(n_layers=2)
    torch.manual_seed(0)
    saes = {}
    for layer in range(2):
        sae = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=96))
        with torch.no_grad():  # random weights with a bias that leaves features sparse but alive
            sae.W_enc.normal_(0, 1.0)
            sae.W_dec.normal_(0, 0.3)
            sae.b_enc.fill_(-0.05)
        saes[layer] = sae
    rng = random.Random(0)
    # Organism-like text with reasoning words in it; some prompts thinking, some not.
    words = [w for w in ("so", "therefore", "wait", "hmm", "let", "me", "but") if w]
    seqs = []
    for p in organism_prompts(model, 8, seed=3):
        extra = [model.tokenizer.convert_tokens_to_ids(rng.choice(words + ["a", "=", "5", "."])) for _ in range(20)]
        seqs.append(p + extra)
    return model, saes, seqs


def _cached_acts(model, sae, layer, seq):
    _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=[model.hook_name(layer)])
    return sae.encode(cache[model.hook_name(layer)][0].float()).detach().double().numpy()


def test_contrast_matches_numpy_reference(setup):
    model, saes, seqs = setup
    n_prompt = [len(s) - 20 for s in seqs]
    modes = ["thinking" if i % 2 == 0 else "non-thinking" for i in range(len(seqs))]
    sums = F.collect_feature_sums(model, saes, seqs, F.contrast_masks(seqs, n_prompt, modes), batch_size=3)
    table = F.contrast_table(sums, [0, 1])
    for layer in (0, 1):
        per_mode = {m: [] for m in ("thinking", "non-thinking")}
        for seq, k, mode in zip(seqs, n_prompt, modes):
            per_mode[mode].append(_cached_acts(model, saes[layer], layer, seq)[k:])
        think = np.concatenate(per_mode["thinking"]).mean(0)
        nothink = np.concatenate(per_mode["non-thinking"]).mean(0)
        t = table[table.layer == layer].sort_values("feature")
        np.testing.assert_allclose(t.delta, think - nothink, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(t.relative_delta, (think - nothink) / (nothink + 1e-6), rtol=1e-4, atol=1e-6)
        assert list(t.sort_values("rank").feature[:5]) == list(np.argsort(-(think - nothink), kind="stable")[:5])
    top = F.top_k_scores(table, k=5)
    assert (top["thinking"] - top["non-thinking"] - top["mean_delta"]).abs().max() < 1e-9


def _reference_reason_score(acts_list, seqs, vocab, alpha=0.7):
    """Straightforward numpy ReasonScore: explicit windows per occurrence, then the formula."""
    groups = list(vocab)
    pos_tokens, neg_tokens, group_tokens = [], [], {g: [] for g in groups}
    for acts, seq in zip(acts_list, seqs):
        in_group = {g: set() for g in groups}
        for g, patterns in vocab.items():
            for pat in patterns:
                for s in range(1, len(seq) - len(pat) + 1):
                    if tuple(seq[s:s + len(pat)]) == pat:
                        in_group[g].update(range(max(0, s - 1), min(len(seq), s + len(pat) + 2)))
        for p in range(1, len(seq)):
            hit = [g for g in groups if p in in_group[g]]
            (pos_tokens if hit else neg_tokens).append(acts[p])
            for g in hit:
                group_tokens[g].append(acts[p])
    mu_pos, mu_neg = np.mean(pos_tokens, 0), np.mean(neg_tokens, 0)
    present = [g for g in groups if group_tokens[g]]
    mu_r = np.stack([np.mean(group_tokens[g], 0) for g in present])
    p = mu_r / np.where(mu_r.sum(0) > 0, mu_r.sum(0), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0), axis=0) / math.log(len(present))
    return (mu_pos / mu_pos.sum()) * h ** alpha - mu_neg / mu_neg.sum()


def test_reason_score_matches_numpy_reference(setup):
    model, saes, seqs = setup
    vocab = F.vocabulary_token_ids(model.tokenizer, ["wait", "therefore", "let me", "so", "hmm"])
    assert (model.tokenizer.convert_tokens_to_ids("let"),
            model.tokenizer.convert_tokens_to_ids("me")) in vocab["let me"]
    sums = F.collect_feature_sums(model, saes, seqs, F.reason_score_masks(seqs, vocab), batch_size=4)
    table = F.reason_score_table(sums, [0, 1], list(vocab))
    for layer in (0, 1):
        acts = [_cached_acts(model, saes[layer], layer, s) for s in seqs]
        ref = _reference_reason_score(acts, seqs, vocab)
        ours = table[table.layer == layer].sort_values("feature").reason_score.to_numpy()
        # batch_size=4 pads the shorter sequences; sdpa's masked kernel moves float32 activations by ~1e-7 relative
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_reason_score_single_group_has_unit_entropy():
    score, entropy = F.reason_score(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(entropy, torch.ones(2, dtype=torch.float64))
    np.testing.assert_allclose(score.numpy(), [1 / 3 - 0.5, 2 / 3 - 0.5])


def test_windows_are_one_left_two_right_and_skip_position_zero():
    vocab = {"wait": [(7,)], "let me": [(3, 4)]}
    seq = [7, 1, 3, 4, 1, 1, 1, 7, 1]
    m = F.reason_score_masks([seq], vocab)[0]
    assert [i for i, v in enumerate(m["group:let me"]) if v] == [1, 2, 3, 4, 5]
    assert [i for i, v in enumerate(m["group:wait"]) if v] == [6, 7, 8]  # position 0's "wait" is not data
    assert not m["P"][0] and not m["N"][0]
    assert all(p != n for p, n in zip(m["P"][1:], m["N"][1:]))


def test_decoder_norm_folding_scales_activations(setup):
    model, saes, seqs = setup
    masks = F.contrast_masks(seqs, [1] * len(seqs), ["thinking"] * len(seqs))
    plain = F.collect_feature_sums(model, {0: saes[0]}, seqs, masks)
    folded = F.collect_feature_sums(model, {0: saes[0]}, seqs, masks, fold_decoder_norm=True)
    norms = saes[0].W_dec.detach().norm(dim=-1).double()
    torch.testing.assert_close(folded.sums[(0, "thinking")], plain.sums[(0, "thinking")] * norms)


def test_feature_sums_merge_equals_one_pass(setup):
    model, saes, seqs = setup
    masks = F.contrast_masks(seqs, [1] * len(seqs), ["thinking"] * len(seqs))
    whole = F.collect_feature_sums(model, saes, seqs, masks)
    a = F.collect_feature_sums(model, saes, seqs[:3], {i: masks[i] for i in range(3)})
    b = F.collect_feature_sums(model, saes, seqs[3:], {i: masks[i + 3] for i in range(len(seqs) - 3)})
    merged = a.merge(b)
    for key in whole.sums:
        torch.testing.assert_close(merged.sums[key], whole.sums[key])
        assert merged.counts[key] == whole.counts[key]


def test_unencodable_vocabulary_word_warns_and_is_skipped(setup):
    model, _, _ = setup
    with pytest.warns(UserWarning, match="cannot encode 'alternatively'"):
        vocab = F.vocabulary_token_ids(model.tokenizer, ["alternatively", "wait"])
    assert list(vocab) == ["wait"]
    with pytest.raises(TellnormError, match="none of the vocabulary"), pytest.warns(UserWarning):
        F.vocabulary_token_ids(model.tokenizer, ["alternatively"])


def test_bad_feature_lists_are_one_clear_error(setup):
    _, saes, _ = setup
    with pytest.raises(TellnormError, match="empty"):
        F.check_features(saes, {})
    with pytest.raises(TellnormError, match="d_sae=96"):
        F.check_features(saes, {0: [96]})
    with pytest.raises(TellnormError, match="no SAE for layer 5"):
        F.check_features(saes, {5: [1]})


def test_inject_words_positions():
    rng = random.Random(0)
    out, pos = F.inject_words([9, 1, 2, 3, 4, 5, 6], [(7,), (3, 4)], every=2, start=1, rng=rng)
    assert len(pos) == 2
    for p in pos:
        assert out[p] in (7, 3)
    assert [t for i, t in enumerate(out) if not any(p <= i < p + 2 and out[p] == 3 for p in pos)
            and i not in pos][:2] == [9, 1]
