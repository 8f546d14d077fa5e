"""The theorem checker: the exact bound against float64 references for every SAE architecture, 0 violations on tiny
random models, planted violations caught, streaming = one pass, the paired fit and assumptions against numpy."""

import copy
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tellnorm import bounds as B
from tellnorm import features as F
from tellnorm.errors import TellnormError
from tellnorm.organism.task import ORGANISM_MARKERS
from tellnorm.studies import bounds as BS

ARCHS = ("standard", "topk", "jumprelu", "gated")


def random_sae(arch, *, d_in=16, d_sae=48, apply_b_dec=True, normalize="none", rescale=False, k=8, hook=None,
               seed=0):
    """An sae_lens SAE of ``arch`` with random weights: mixed-sign biases (so max(b, 0) matters), decoder rows of
    unequal norms, positive JumpReLU thresholds, random gated r_mag."""
    from sae_lens import (
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    common = dict(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec, normalize_activations=normalize)
    sae = {"standard": lambda: StandardSAE(StandardSAEConfig(**common)),
           "topk": lambda: TopKSAE(TopKSAEConfig(k=k, rescale_acts_by_decoder_norm=rescale, **common)),
           "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common)),
           "gated": lambda: GatedSAE(GatedSAEConfig(**common))}[arch]()
    if hook:
        sae.cfg.metadata.hook_name = hook
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "W_enc":
                p.copy_(noise * 1.5 / math.sqrt(d_in))
            elif name == "W_dec":
                p.copy_(noise / math.sqrt(d_in) * (0.5 + 1.5 * torch.rand(d_sae, 1, generator=g)))
            elif name == "threshold":
                p.copy_(noise.abs() * 0.3)
            else:  # b_enc, b_dec, b_gate, b_mag, r_mag
                p.copy_(noise * 0.3)
    return sae


def reference(sae, x, input_scale=1.0):
    """Independent float64 numpy encoder and bound, written from each architecture's formula."""
    P = {n: p.detach().double().numpy() for n, p in sae.named_parameters()}
    cfg = sae.cfg
    x = x.double().numpy() * input_scale
    if cfg.normalize_activations == "constant_norm_rescale":
        x = x * math.sqrt(cfg.d_in) / np.linalg.norm(x, axis=1, keepdims=True)
    elif cfg.normalize_activations == "layer_norm":
        x = x - x.mean(1, keepdims=True)
        x = x / (x.std(1, ddof=1, keepdims=True) + 1e-5)
    z = x - P["b_dec"] * float(cfg.apply_b_dec_to_input)
    w, arch = P["W_enc"], cfg.architecture()
    if arch == "gated":
        u, c = w * np.exp(P["r_mag"]), P["b_mag"]
        acts = (z @ w + P["b_gate"] > 0) * np.maximum(z @ u + c, 0)
    else:
        u, c = w, P["b_enc"]
        if arch == "topk" and cfg.rescale_acts_by_decoder_norm:
            dn = np.linalg.norm(P["W_dec"], axis=1)
            u, c = u * dn, c * dn
        pre = z @ u + c
        acts = np.maximum(pre, 0)
        if arch == "jumprelu":
            acts = acts * (pre > P["threshold"])
        if arch == "topk":
            kth = np.sort(pre, axis=1)[:, -cfg.k][:, None]
            acts = acts * (pre >= kth)
    bound = np.linalg.norm(u, axis=0)[None] * np.linalg.norm(z, axis=1)[:, None] + np.maximum(c, 0)[None]
    return acts, bound


VARIANTS = [("none", 1.0), ("none", 2.5), ("constant_norm_rescale", 1.0), ("layer_norm", 1.0)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("normalize, scale", VARIANTS)
def test_bound_matches_float64_reference(arch, apply_b_dec, normalize, scale):
    seed = zlib.crc32(f"{arch}:{normalize}".encode()) % 1000
    sae = random_sae(arch, apply_b_dec=apply_b_dec, normalize=normalize, seed=seed)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3 + 1
    check = B.check_tokens(sae, x, input_scale=scale)
    acts, bound = reference(sae, x, scale)
    np.testing.assert_allclose(check.bound.numpy(), bound, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(check.acts.numpy(), acts, rtol=1e-4, atol=1e-5)  # the derivation reads encode right
    assert (acts > 0).sum() > 20
    assert int(check.violations.sum()) == 0 and (acts <= bound * (1 + 1e-12)).all()
    ratio = np.where(acts > 0, acts / bound, 0)
    np.testing.assert_allclose(check.tightness.numpy(), ratio, rtol=1e-4, atol=1e-6)


def test_topk_rescaled_by_decoder_norm_matches_reference():
    sae = random_sae("topk", rescale=True)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    check = B.check_tokens(sae, x)
    acts, bound = reference(sae, x)
    np.testing.assert_allclose(check.bound.numpy(), bound, rtol=1e-9)
    np.testing.assert_allclose(check.acts.numpy(), acts, rtol=1e-4, atol=1e-5)
    assert int(check.violations.sum()) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_input_scale_gives_the_same_bound(arch):
    sae = random_sae(arch, seed=3)
    folded = copy.deepcopy(sae)
    folded.fold_activation_norm_scaling_factor(2.5)  # what sae_lens does at save for expected_average_only_in
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(4))
    outside, inside = B.check_tokens(sae, x, input_scale=2.5), B.check_tokens(folded, x)
    np.testing.assert_allclose(inside.bound.numpy(), outside.bound.numpy(), rtol=1e-5)
    np.testing.assert_allclose(inside.acts.numpy(), outside.acts.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_bound_is_attained_along_the_value_path(arch):
    """x = b_dec + t·u_i puts z parallel to feature i's value path: tightness 1 up to rounding, never a violation
    (for gated it is the magnitude path e^{r}·w that is tight, not the gate)."""
    sae = random_sae(arch, seed=5)
    i = 7
    with torch.no_grad():
        for name in ("b_enc", "b_mag", "b_gate"):
            if getattr(sae, name, None) is not None:
                getattr(sae, name)[i] = 0.4
    geom = B.sae_geometry(sae)
    direction = sae.W_enc[:, i].detach()
    x = (sae.b_dec.detach() + 5.0 * direction / direction.norm())[None]
    check = B.check_tokens(sae, x, geometry=geom)
    assert float(check.acts[0, i]) > 0
    assert abs(float(check.tightness[0, i]) - 1.0) < 1e-5
    assert not bool(check.violations.any())


def test_planted_wrong_bound_is_reported():
    sae = random_sae("standard")
    check = B.check_tokens(sae, torch.randn(30, 16, generator=torch.Generator().manual_seed(6)) * 4)
    assert int(check.violations.sum()) == 0
    wrong = B.TokenCheck(check.acts, check.bound * 0.05, check.tol, check.recon)
    assert int(wrong.violations.sum()) > 0


def test_histogram_quantiles_and_merge():
    rng = np.random.default_rng(0)
    values = rng.beta(2, 5, size=5001)
    values[:3] = [1.0, 0.0, 1.5]  # edges, and an overflow (a violation's tightness)
    h = B.Histogram()
    h.add(values[:2000])
    other = B.Histogram()
    other.add(values[2000:])
    merged = h.merge(other)
    whole = B.Histogram()
    whole.add(values)
    assert np.array_equal(merged.counts, whole.counts) and merged.max == whole.max == 1.5
    for q in (0.5, 0.9, 0.99):
        exact = np.sort(values)[math.ceil(q * values.size) - 1]
        assert exact <= whole.quantile(q) <= exact + 1 / B.TIGHTNESS_BINS
    assert whole.quantile(1.0) == 1.5 and math.isnan(B.Histogram().quantile(0.5))


def test_point_sample_is_order_and_shard_independent():
    pri = np.random.default_rng(1).random(500)
    a = B.PointSample(k=50)
    a.add(pri, v=np.arange(500))
    b, c = B.PointSample(k=50), B.PointSample(k=50)
    b.add(pri[::-1][:200], v=np.arange(500)[::-1][:200])
    c.add(pri[::-1][200:], v=np.arange(500)[::-1][200:])
    assert a.frame().equals(b.merge(c).frame())
    assert sorted(a.frame().v) == sorted(np.argsort(pri)[:50])


def test_coactive_cosines_match_brute_force():
    rng = np.random.default_rng(2)
    dec = rng.normal(size=(30, 8))
    unit = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    active = rng.random((25, 30)) < 0.2
    active[0] = False
    active[1, :] = False
    active[1, 3] = True
    mean, top, pairs = B.coactive_cosines(torch.as_tensor(active), torch.as_tensor(unit))
    for t in range(25):
        idx = np.flatnonzero(active[t])
        cos = [abs(unit[i] @ unit[j]) for i in idx for j in idx if i != j]
        assert int(pairs[t]) == len(cos)
        if cos:
            assert math.isclose(float(mean[t]), np.mean(cos), rel_tol=1e-5)
            assert math.isclose(float(top[t]), np.max(cos), rel_tol=1e-5)
        else:
            assert math.isnan(float(mean[t]))


# --- pairs --------------------------------------------------------------------------------------------------------

def test_markers_and_pair_positions():
    think = ["<|im_start|>", "assistant", "<think>", "a", "=", "5", ".", "</think>", "answer", ":", "5", "<|im_end|>"]
    direct = ["<|im_start|>", "assistant", "5", "+", "3", "=", "8", ".", "answer", ":", "8", "<|im_end|>"]
    pairs = B.pair_positions(think, direct, ORGANISM_MARKERS, start_t=2, start_n=2)
    assert pairs == [("answer", 8, 8), ("colon", 9, 9), ("value", 10, 10)]
    assert B.find_marker(["answer", ":", "3", "answer", ":", "4"], ORGANISM_MARKERS[2]) == 5  # the last closing
    assert B.find_marker(["x", "answer", ":"], ORGANISM_MARKERS[2]) is None  # value missing
    assert B.find_marker(["answer", ":", "1", "x"], ORGANISM_MARKERS[0], start=1) is None  # before start
    assert B.problem_pairs(["thinking", "thinking", "non-thinking", "non-thinking"]) == [(0, 2), (1, 3)]
    with pytest.raises(TellnormError, match="both modes"):
        B.problem_pairs(["thinking", "non-thinking", "thinking"])


def test_fit_band_matches_numpy_reference():
    rng = np.random.default_rng(3)
    delta = rng.normal(50, 60, size=200)
    r = rng.integers(0, 6, size=200)
    s = np.where(r > 0, np.sqrt(np.abs(delta)) * rng.uniform(0.5, 2, size=200), 0.0)
    fit = B.fit_band(delta, s, r, B.BandConfig(0.1, 0.9))
    pos = delta > 0
    d, sv, rv = delta[pos], s[pos], r[pos]
    c1 = np.quantile(sv / np.sqrt(d), 0.1)
    up = rv > 0
    c2 = np.quantile(sv[up] / np.sqrt(rv[up] * d[up]), 0.9)
    inside = [(c1 * math.sqrt(di) <= si) and (si <= (c2 * math.sqrt(ri * di) if ri > 0 else 0.0))
              for di, si, ri in zip(d, sv, rv)]
    ideal = [(math.sqrt(di) <= si) and (si <= (math.sqrt(ri * di) if ri > 0 else 0.0)) for di, si, ri in zip(d, sv, rv)]
    assert fit["n_pairs"] == 200 and fit["n_delta_positive"] == int(pos.sum())
    assert math.isclose(fit["frac_delta_nonpositive"], 1 - pos.mean())
    assert math.isclose(fit["c1"], c1) and math.isclose(fit["c2"], c2)
    assert math.isclose(fit["in_band"], np.mean(inside)) and math.isclose(fit["in_band_ideal"], np.mean(ideal))
    empty = B.fit_band([-1.0], [0.0], [0])
    assert empty["n_pairs"] == 1 and math.isnan(empty["c1"]) and empty["frac_delta_nonpositive"] == 1.0


def test_pair_frame_from_states():
    def state(norm_sq, total, active, u, recon):
        return B.PairState(norm_sq, total, np.array(active), np.array(u, float), np.array(recon, float))

    states = {("t", 5, 0): state(9.0, 3.0, [True, False], [3, 0], [1, 0]),
              ("n", 4, 0): state(4.0, 1.0, [False, True], [2, 0], [0, 0])}
    frame = B.pair_frame(states, [(0, "answer", "t", 5, "n", 4), (1, "answer", "t", 9, "n", 4)], [0])
    assert len(frame) == 1  # the second pair has no captured state
    row = frame.iloc[0]
    assert (row.delta, row.reasoning_delta, row.r_active) == (5.0, 2.0, 2)
    assert math.isclose(row.base_vs_nonthinking, 0.0)  # (3 − 1) − 2 = 0


# --- on tiny random models ----------------------------------------------------------------------------------------

def make_corpus(model, n=6, seed=0):
    """Random token sequences with a prompt part, the first half 'thinking', the second 'non-thinking'."""
    rng = np.random.default_rng(seed)
    sequences, n_prompt, modes = [], [], []
    for i in range(2 * n):
        length, k = int(rng.integers(12, 30)), int(rng.integers(4, 8))
        sequences.append([int(t) for t in rng.integers(7, 100, size=length)])
        n_prompt.append(k)
        modes.append("thinking" if i < n else "non-thinking")
    return SimpleNamespace(sequences=sequences, n_prompt=n_prompt, modes=modes, labels=None)


def model_saes(model, archs, seed=0):
    return {layer: random_sae(arch, d_in=model.d_model, d_sae=96, hook=model.hook_name(layer), seed=seed + layer)
            for layer, arch in zip(range(model.n_layers), archs)}


def cached_resid(model, layer, seq):
    _, cache = model.bridge.run_with_cache(torch.tensor([seq]), names_filter=[model.hook_name(layer)])
    return cache[model.hook_name(layer)][0].float()


@pytest.mark.parametrize("arch, sae_archs", [("qwen2", ("standard", "topk", "jumprelu")),
                                             ("qwen3", ("gated", "standard", "topk")),
                                             ("llama", ("jumprelu", "gated", "standard"))])
def test_exact_bound_holds_on_tiny_models(tiny_loaded_model, arch, sae_archs):
    from tellnorm.features import contrast_masks

    model = tiny_loaded_model(arch)
    saes = model_saes(model, sae_archs)
    corpus = make_corpus(model)
    reasoning, _ = F.reasoning_features(model, saes, corpus, top_k=5)
    masks = contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    sums = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning, batch_size=4)
    table = B.bounds_table(sums, {layer: B.sae_geometry(s) for layer, s in saes.items()})
    n_tokens = sum(len(s) - k for s, k in zip(corpus.sequences, corpus.n_prompt))
    assert (table.violations == 0).all() and (table.sum_violations == 0).all()
    assert (table.norm_line_violations == 0).all()
    assert (table.n_tokens == n_tokens).all() and (table.n_checked == n_tokens * 96).all()
    for layer, sae in saes.items():  # the streamed numbers against a float64 recomputation on cached activations
        acts, bound = zip(*(reference(sae, cached_resid(model, layer, s)[k:]) for s, k in
                            zip(corpus.sequences, corpus.n_prompt)))
        acts, bound = np.concatenate(acts), np.concatenate(bound)
        row = table[table.layer == layer].iloc[0]
        assert abs(int(row.n_active) - int((acts > 0).sum())) <= 2
        assert math.isclose(row.max_tightness, (acts / bound).max(), rel_tol=1e-4)
        assert row.max_tightness < 1


def test_planted_encoder_corruption_is_reported(tiny_loaded_model):
    """An SAE whose encode no longer matches its stored weights (a hook scales its pre-activations 20×)."""
    from tellnorm.features import contrast_masks

    model = tiny_loaded_model("qwen3")
    saes = model_saes(model, ("standard", "topk", "gated"), seed=10)
    corpus = make_corpus(model, n=3)
    masks = contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    reasoning = {layer: list(range(5)) for layer in saes}
    saes[1].hook_sae_acts_pre.add_hook(lambda x, hook: x * 20)
    try:
        sums = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning)
    finally:
        saes[1].hook_sae_acts_pre.remove_hooks()
    violations = {layer: b.violations for layer, b in sums.bounds.items()}
    assert violations[1] > 0 and violations[0] == violations[2] == 0
    assert sums.bounds[1].tightness.max > 1


@pytest.fixture(scope="module")
def qwen3_run(tiny_loaded_model):
    from tellnorm.features import contrast_masks

    model = tiny_loaded_model("qwen3")
    saes = model_saes(model, ("standard", "topk", "gated"), seed=20)
    corpus = make_corpus(model, n=5, seed=1)
    masks = contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
    reasoning = {layer: [0, 3, 5, 8, 13] for layer in saes}
    capture = {i: {len(s) - 2} for i, s in enumerate(corpus.sequences)}
    return model, saes, corpus, masks, reasoning, capture


def test_streaming_shards_merge_to_one_pass(qwen3_run):
    model, saes, corpus, masks, reasoning, capture = qwen3_run
    ids = list(range(len(corpus.sequences)))
    whole = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning, capture=capture, batch_size=1)
    shards = [ids[::2], ids[1::2]]  # each shard holds both modes
    parts = [B.collect_bounds(model, saes, [corpus.sequences[i] for i in part], {i: masks[i] for i in part},
                              reasoning, capture={i: capture[i] for i in part}, request_ids=part, batch_size=1)
             for part in shards]
    merged = parts[0].merge(parts[1])
    geometry = {layer: B.sae_geometry(s) for layer, s in saes.items()}
    assert B.bounds_table(merged, geometry).equals(B.bounds_table(whole, geometry))
    a, b = B.assumptions_table(merged, reasoning), B.assumptions_table(whole, reasoning)
    np.testing.assert_allclose(a.select_dtypes("number").to_numpy(), b.select_dtypes("number").to_numpy(), rtol=1e-12)
    for layer in saes:
        assert merged.bounds[layer].sample.frame().equals(whole.bounds[layer].sample.frame())
    assert merged.states.keys() == whole.states.keys()


def test_token_chunks_give_the_same_sums(qwen3_run, monkeypatch):
    model, saes, corpus, masks, reasoning, capture = qwen3_run
    whole = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning, capture=capture, batch_size=4)
    monkeypatch.setattr(B, "TOKEN_CHUNK", 7)  # the hook encodes a batch's tokens 7 at a time
    chunked = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning, capture=capture, batch_size=4)
    geometry = {layer: B.sae_geometry(s) for layer, s in saes.items()}
    for table in (lambda s: B.bounds_table(s, geometry), lambda s: B.assumptions_table(s, reasoning)):
        a, b = table(chunked), table(whole)
        assert a.select_dtypes(exclude="number").equals(b.select_dtypes(exclude="number"))
        np.testing.assert_allclose(a.select_dtypes("number").to_numpy(float), b.select_dtypes("number").to_numpy(float),
                                   rtol=1e-5)
    assert chunked.states.keys() == whole.states.keys()
    key = next(iter(whole.states))
    np.testing.assert_allclose(chunked.states[key].sae_input, whole.states[key].sae_input, rtol=1e-6)


def test_assumptions_match_numpy_reference(qwen3_run):
    model, saes, corpus, masks, reasoning, capture = qwen3_run
    sums = B.collect_bounds(model, saes, corpus.sequences, masks, reasoning, capture=capture, batch_size=3)
    table = B.assumptions_table(sums, reasoning)
    for layer, sae in saes.items():
        P = {n: p.detach().double().numpy() for n, p in sae.named_parameters()}
        dec_norm = np.linalg.norm(P["W_dec"], axis=1)
        unit = P["W_dec"] / dec_norm[:, None]
        xs, acts, modes = [], [], []
        for s, k, mode in zip(corpus.sequences, corpus.n_prompt, corpus.modes):
            x = cached_resid(model, layer, s)[k:]
            xs.append(x.double().numpy())
            acts.append(reference(sae, x)[0])
            modes += [mode] * len(x)
        x, a, modes = np.concatenate(xs), np.concatenate(acts), np.array(modes)
        coef = a * dec_norm  # standard / gated / topk without rescale
        recon = a @ P["W_dec"] + P["b_dec"]
        rel = np.mean(np.linalg.norm(x - recon, axis=1) / np.linalg.norm(x, axis=1))
        fvu = ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        cos_means, energies, a3 = [], [], []
        R = reasoning[layer]
        for t in range(len(x)):
            idx = np.flatnonzero(a[t] > 0)
            if len(idx) >= 2:
                g = np.abs(unit[idx] @ unit[idx].T)
                cos_means.append((g.sum() - np.trace(g)) / (len(idx) * (len(idx) - 1)))
            e = (coef[t] ** 2).sum()
            if e > 0:
                energies.append(abs(((coef[t] @ unit) ** 2).sum() - e) / e)
            vr = coef[t, R] @ unit[R]
            base = coef[t] @ unit + P["b_dec"] - vr
            if modes[t] == "thinking" and np.linalg.norm(vr) > 0:
                a3.append(abs(vr @ base) / (np.linalg.norm(vr) * np.linalg.norm(base)))
        rate = {m: (a[modes == m] > 0).mean(0) for m in ("thinking", "non-thinking")}
        act_t, act_n = rate["thinking"] >= 0.01, rate["non-thinking"] >= 0.01
        row = table[table.layer == layer].iloc[0]
        assert math.isclose(row.a2_rel_error, rel, rel_tol=1e-4)
        assert math.isclose(row.a2_fvu, fvu, rel_tol=1e-4)
        assert math.isclose(row.a1_mean_cos, np.mean(cos_means), rel_tol=1e-4)
        assert math.isclose(row.a1_energy_cross_ratio, np.mean(energies), rel_tol=1e-3)
        assert math.isclose(row.a3_mean_abs_cos, np.mean(a3), rel_tol=1e-4)
        assert math.isclose(row.a4_jaccard, (act_t & act_n).sum() / (act_t | act_n).sum(), rel_tol=1e-9)
        assert math.isclose(row.a4_reasoning_active_in_non_thinking, act_n[R].mean())
        assert row.a1_verdict in ("holds", "partly", "fails")


def test_verdicts_follow_thresholds():
    assert [B.verdict(v, (0.1, 0.3)) for v in (0.05, 0.1, 0.2, 0.31, math.nan)] == \
           ["holds", "holds", "partly", "fails", "n/a"]


# --- bad input ----------------------------------------------------------------------------------------------------

def test_bad_inputs_are_one_clear_error(tiny_loaded_model, tmp_path):
    from sae_lens.saes.abstopk_sae import AbsTopKSAE, AbsTopKSAEConfig

    model = tiny_loaded_model("qwen3")
    saes = model_saes(model, ("standard", "topk", "gated"))
    with pytest.raises(TellnormError, match="no SAE for layer 5"):
        F.select_saes(model, saes, top_k=5, layers=[0, 5])
    with pytest.raises(TellnormError, match="only d_sae=96"):
        F.select_saes(model, saes, top_k=97)
    with pytest.raises(TellnormError, match="K ≥ 1"):
        F.select_saes(model, saes, top_k=0)
    with pytest.raises(TellnormError, match="no SAEs"):
        F.select_saes(model, {}, top_k=5)
    elsewhere = random_sae("standard", d_in=64, hook="blocks.7.hook_resid_post")
    with pytest.raises(TellnormError, match="does not have"):
        F.select_saes(model, {2: elsewhere}, top_k=5)
    pre = random_sae("standard", d_in=64, hook="blocks.1.hook_resid_pre")
    with pytest.raises(TellnormError, match="resid_post"):
        F.select_saes(model, {1: pre}, top_k=5)
    odd = AbsTopKSAE(AbsTopKSAEConfig(d_in=64, d_sae=96, k=4))
    odd.cfg.metadata.hook_name = model.hook_name(0)
    with pytest.raises(TellnormError, match="derived for"):
        F.select_saes(model, {0: odd}, top_k=5, architectures=B.SUPPORTED_ARCHITECTURES)
    with pytest.raises(TellnormError, match="at least 3 layers"):
        F.select_saes(model, saes, top_k=5, layers=[0, 1], min_layers=3)
    with pytest.raises(TellnormError, match="corpus is empty"):
        F.check_corpus(SimpleNamespace(sequences=[], n_prompt=[], modes=[]))
    one_mode = SimpleNamespace(sequences=[[1, 2, 3]], n_prompt=[1], modes=["thinking"])
    with pytest.raises(TellnormError, match="no non-thinking response tokens"):
        F.check_corpus(one_mode)
    afile = tmp_path / "f.csv"
    afile.write_text("x")
    with pytest.raises(TellnormError, match="is a file"):
        BS.bounds_study(model, saes, make_corpus(model), afile)


@pytest.mark.parametrize("argv, match", [
    (["bounds", "--top-k", "0"], "--top-k must be ≥ 1"),
    (["bounds", "--n", "0"], "corpus would be empty"),
    (["correlate", "--layers", "3", "4"], "at least 3 layers"),
    (["bounds", "--layers", "42"], "no SAE for layer 42"),
    (["bounds", "--top-k", "100000"], "only d_sae="),
])
def test_cli_bad_arguments(capsys, tmp_path, argv, match):
    from tellnorm.apps.cli import main

    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tellnorm: error:") and "\n" not in err and match in err, err
    assert not (tmp_path / "out").exists()


def test_cli_out_naming_a_file(capsys, tmp_path):
    from tellnorm.apps.cli import main

    afile = tmp_path / "taken"
    afile.write_text("")
    for command in ("bounds", "correlate"):
        assert main([command, "--out", str(afile)]) == 2
        assert "is a file" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_on_the_organism(tmp_path):
    import pandas as pd

    from tellnorm.apps.cli import main

    out = tmp_path / "run"
    assert main(["bounds", "--n", "1", "--top-k", "5", "--out", str(out)]) == 0
    assert main(["correlate", "--n", "1", "--top-k", "5", "--out", str(out)]) == 0
    bounds = pd.read_csv(out / "bounds.csv")
    assert {"layer", "n_checked", "violations", "max_tightness", "median_tightness", "p99_tightness"} <= set(bounds)
    assert (bounds.violations == 0).all() and len(bounds) == 8
    assumptions = pd.read_csv(out / "bounds_assumptions.csv")
    assert {f"a{i}_verdict" for i in range(1, 5)} <= set(assumptions)
    assert {"layer", "c1", "c2", "in_band", "n_pairs"} <= set(pd.read_csv(out / "bounds_pairs.csv"))
    corr = pd.read_csv(out / "correlation.csv")
    assert {"signal", "spearman_x100", "ci_low", "ci_high"} <= set(corr)
    assert set(corr.signal) == {"norm", "layer_output_entropy", "hidden_state_entropy", "attention_entropy",
                                "final_output_entropy"}
    assert len(pd.read_csv(out / "correlation_layers.csv")) == 8
    for stem in ("bounds_norm_vs_reasoning", "bounds_pairs", "correlation_alignment"):
        assert (out / f"{stem}.html").is_file()
