"""Like-with-like comparisons of the two modes: the shared closing, paired norms, the token-matched contrast."""

import numpy as np
import pandas as pd
import torch

from tellnorm import features as F
from tellnorm.organism import task
from tellnorm.studies.profile import matched_comparison


def test_closing_roles_find_the_last_closing_of_the_response_only():
    prompt = ["<|im_start|>", "user", "answer", ":", "3", "<|im_end|>"]
    response = ["4", "+", "1", "=", "5", ".", "answer", ":", "7", ".", "answer", ":", "5", "<|im_end|>"]
    roles = task.closing_roles(prompt + response, len(prompt))
    start = len(prompt) + response.index("answer", 7)
    assert roles == {start: "answer_word", start + 1: "answer_colon", start + 2: "answer_value"}
    # the prompt's closing is not a match
    assert task.closing_roles(prompt + ["4", "+", "1", "=", "5"], len(prompt)) == {}
    assert task.closing_roles(prompt + ["answer", ":"], len(prompt)) == {len(prompt): "answer_word",
                                                                        len(prompt) + 1: "answer_colon"}


def _synthetic_frame(seed=0):
    """Two layers, 6 problems, both modes; the non-thinking response of problem 5 has no closing."""
    rng = np.random.default_rng(seed)
    rows = []
    for problem in range(6):
        for mode, length in (("thinking", 9), ("non-thinking", 4)):
            for layer in (0, 1):
                for pos in range(length):
                    role = {length - 2: "answer_word", length - 1: "answer_value"}.get(pos)
                    if problem == 5 and mode == "non-thinking":
                        role = None
                    rows.append({"mode": mode, "prompt_index": problem, "layer": layer, "position": pos,
                                 "norm": rng.lognormal() * (1.5 if mode == "thinking" else 1.0), "matched_role": role})
    return pd.DataFrame(rows)


def test_matched_comparison_pairs_problems_and_matches_a_direct_computation():
    frame = _synthetic_frame()
    table = matched_comparison(frame, seed=3).set_index(["tokens", "layer"])
    for layer in (0, 1):
        f = frame[frame.layer == layer]
        # all tokens: per-response means, every problem paired
        means = f.groupby(["prompt_index", "mode"]).norm.mean().unstack()
        row = table.loc[("all tokens", layer)]
        assert row.n_pairs == 6
        np.testing.assert_allclose(row.thinking, means["thinking"].mean())
        np.testing.assert_allclose(row.difference, (means["thinking"] - means["non-thinking"]).mean())
        np.testing.assert_allclose(row.ratio, means["thinking"].mean() / means["non-thinking"].mean())
        # a matched role: one position per response, problem 5 has no non-thinking closing and drops out
        value = f[f.matched_role == "answer_value"].pivot(index="prompt_index", columns="mode", values="norm").dropna()
        row = table.loc[("answer_value", layer)]
        assert row.n_pairs == 5 == len(value)
        diff = (value["thinking"] - value["non-thinking"]).to_numpy()
        np.testing.assert_allclose(row.difference, diff.mean())
        assert row.difference_ci_low <= diff.mean() <= row.difference_ci_high
        rng = np.random.default_rng(3)  # the bootstrap over pairs, recomputed independently
        boot = diff[rng.integers(0, diff.size, size=(2000, diff.size))].mean(1)
        np.testing.assert_allclose([row.difference_ci_low, row.difference_ci_high], np.quantile(boot, [0.025, 0.975]))


def test_matched_contrast_uses_only_matched_positions_and_agrees_with_numpy():
    from helpers import tiny_organism_like
    from sae_lens import StandardSAE, StandardSAEConfig

    model = tiny_organism_like(n_layers=2)
    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=48))
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0)
        sae.b_enc.fill_(-0.05)
    rng = __import__("random").Random(4)
    seqs, n_prompt, modes, matched = [], [], [], []
    for i in range(6):
        problem = task.make_problem(rng, 1 + i % 3)
        thinking = i % 2 == 0
        prompt = model.encode(model.chat_prompt(problem.prompt_text(), thinking=thinking))
        response = model.encode(task.response_text(problem, thinking) + "<|im_end|>")
        seq = prompt + response
        seqs.append(seq)
        n_prompt.append(len(prompt))
        modes.append("thinking" if thinking else "non-thinking")
        matched.append(sorted(task.closing_roles(model.token_strings(seq), len(prompt))))
    assert all(len(m) == 3 for m in matched)
    masks = F.matched_contrast_masks(matched, [len(s) for s in seqs], modes)
    sums = F.collect_feature_sums(model, {1: sae}, seqs, masks, batch_size=4)
    table = F.contrast_table(sums, [1], buckets=("thinking@matched", "non-thinking@matched")).sort_values("feature")
    ref = {"thinking": [], "non-thinking": []}
    for seq, positions, mode in zip(seqs, matched, modes):
        _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=[model.hook_name(1)])
        acts = sae.encode(cache[model.hook_name(1)][0].float()).detach().double().numpy()
        ref[mode].append(acts[positions])
    think, nothink = np.concatenate(ref["thinking"]).mean(0), np.concatenate(ref["non-thinking"]).mean(0)
    np.testing.assert_allclose(table.mean_thinking, think, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(table.delta, think - nothink, rtol=1e-5, atol=1e-8)
    assert sums.counts[(1, "thinking@matched")] == 9


def test_matched_feature_trend_cis_resample_problems():
    """Per-problem sums give the matched trend's bootstrap CIs; checked against a direct numpy recomputation."""
    from tellnorm.studies.features import matched_feature_trend

    rng = np.random.default_rng(0)
    n_problems, d_sae, k = 12, 30, 4
    modes = ["thinking"] * n_problems + ["non-thinking"] * n_problems
    sums, acts = F.FeatureSums(), {}
    for i, mode in enumerate(modes):
        a = torch.tensor(rng.gamma(1.0, 1.0 if mode == "non-thinking" else 2.0, size=(3, d_sae)))
        acts[i] = a.numpy()
        for bucket in (mode, mode + F.MATCHED_SUFFIX, F.MATCHED_REQUEST_BUCKET.format(i)):
            sums.add(0, bucket, a)
    contrast_tab = F.contrast_table(sums, [0])
    trend = matched_feature_trend(sums, contrast_tab, [0], k, modes, seed=5).iloc[0]
    matched_tab = F.contrast_table(sums, [0], buckets=("thinking@matched", "non-thinking@matched"))
    top = sorted(matched_tab.nsmallest(k, "rank").feature)
    think = np.stack([acts[i][:, top].mean(1).sum() for i in range(n_problems)])
    nothink = np.stack([acts[n_problems + i][:, top].mean(1).sum() for i in range(n_problems)])
    np.testing.assert_allclose(trend.thinking, think.sum() / (3 * n_problems))
    idx = np.random.default_rng(5).integers(0, n_problems, size=(2000, n_problems))
    diff = think[idx].sum(1) / (3 * n_problems) - nothink[idx].sum(1) / (3 * n_problems)
    np.testing.assert_allclose([trend.delta_ci_low, trend.delta_ci_high], np.quantile(diff, [0.025, 0.975]))
    assert trend.n_problems == n_problems and trend.thinking_ci_low <= trend.thinking <= trend.thinking_ci_high
