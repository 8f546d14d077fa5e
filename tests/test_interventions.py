"""Residual-stream edits against independent references: clean runs (c = 1, earlier layers), a no-cache reference
that recomputes the whole prefix with the same edits, hand-computed SAE and threshold decisions, alone vs batch."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from helpers import active_hook_count, organism_prompts, tiny_organism_like

from tellnorm.backends.hf import eos_ids
from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig, generate, run_forward
from tellnorm.interventions import (
    AboveThreshold,
    AddVector,
    All,
    ClampNorm,
    Edit,
    Generated,
    Mask,
    Prompt,
    RandomFraction,
    SAEFeatureEdit,
    Scale,
    edited_tokens,
    tau_fraction,
)
from tellnorm.norms import NormTracer
from tellnorm.thresholds import ExactThreshold, ThresholdConfig

GREEDY = SamplingConfig(max_new_tokens=10)
SMALL_WARMUP = ThresholdConfig(k=0.5, warmup=2)  # fires within a few tokens on tiny random models


@pytest.fixture(scope="module")
def model():
    return tiny_organism_like(n_layers=3)


def _frames_equal(a, b):
    key = ["request_id", "layer", "position"]
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key])
    return a, b


def _cache(model, ids, hooks=()):
    names = [n for layer in range(model.n_layers)
             for n in (model.hook_name(layer, "resid_pre"), model.hook_name(layer, "resid_mid"),
                       model.hook_name(layer))]
    with model.bridge.hooks(fwd_hooks=list(hooks)), torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=names)
    return {name: cache[name][0].clone() for name in names}


def _no_cache_edited_greedy(model, prompt, rid, make_edits, max_new):
    """Reference: every step re-runs the whole prefix (teacher-forced, no cache, no padding) with the same edits."""
    edits, ids, stop = make_edits(), list(prompt), eos_ids(model)
    for _ in range(max_new):
        logits = run_forward(model, [ids], request_ids=[rid], n_prompt=[len(prompt)], observers=edits,
                             return_logits=True)[rid]
        ids.append(int(logits[-1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):], edits


# ---------------------------------------------------------------------------------------------- identity, layers

def test_scale_by_one_changes_nothing_bit_for_bit(model):
    prompts = organism_prompts(model, 4, seed=1)
    clean_tracer = NormTracer(model)
    clean = generate(model, prompts, GREEDY, observers=[clean_tracer], batch_size=4)
    edit = Scale(model, range(model.n_layers), 1.0)
    tracer = NormTracer(model)
    edited = generate(model, prompts, GREEDY, observers=[edit, tracer], batch_size=4)
    assert [g.generated_ids for g in edited] == [g.generated_ids for g in clean]
    a, b = _frames_equal(clean_tracer.frame(), tracer.frame())
    assert np.array_equal(a.norm.to_numpy(), b.norm.to_numpy())
    assert edit.record.frame().edited.all()  # every token went through the edit
    seqs = [g.ids for g in clean]
    ref = run_forward(model, seqs, return_logits=True)
    ours = run_forward(model, seqs, observers=[Scale(model, range(model.n_layers), 1.0)], return_logits=True)
    assert all(torch.equal(ref[i], ours[i]) for i in ref)


def test_an_edit_at_layer_l_leaves_every_earlier_hook_untouched(model):
    ids = organism_prompts(model, 1, seed=2)[0]
    clean = _cache(model, ids)
    edit = Scale(model, [1], 0.1)
    edited = _cache(model, ids, edit.hooks())
    assert active_hook_count(model) == 0
    for name, value in clean.items():
        layer = int(name.split(".")[1])
        if layer < 1 or name in (model.hook_name(1, "resid_pre"), model.hook_name(1, "resid_mid")):
            assert torch.equal(edited[name], value), name
    assert torch.equal(edited[model.hook_name(1)], clean[model.hook_name(1)] * 0.1)
    assert not torch.allclose(edited[model.hook_name(2)], clean[model.hook_name(2)])


def test_edits_compose_in_the_declared_order(model):
    ids = organism_prompts(model, 1, seed=3)[0]
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    x = _cache(model, ids)[model.hook_name(1)]
    name = model.hook_name(1)
    first = _cache(model, ids, Scale(model, [1], 2.0).hooks() + AddVector(model, [1], v).hooks())[name]
    second = _cache(model, ids, AddVector(model, [1], v).hooks() + Scale(model, [1], 2.0).hooks())[name]
    torch.testing.assert_close(first, 2 * x + v)
    torch.testing.assert_close(second, 2 * (x + v))


def test_clamp_caps_the_norm_and_keeps_the_direction(model):
    ids = organism_prompts(model, 1, seed=4)[0]
    name = model.hook_name(2)
    x = _cache(model, ids)[name]
    cap = float(x.norm(dim=-1).median())
    y = _cache(model, ids, ClampNorm(model, [2], {2: cap}).hooks())[name]
    expected = torch.minimum(x.norm(dim=-1), torch.tensor(cap))
    torch.testing.assert_close(y.norm(dim=-1), expected, rtol=1e-5, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- KV cache vs no-cache reference

def _tiny_prompts(model, n):
    texts = [" ".join(f"w{(7 * i + j) % 80 + 1}" for j in range(3 + 2 * i)) for i in range(n)]
    return [model.encode(model.chat_prompt(t)) for t in texts]


def _mixed_edits(model):
    """Three kinds at three layers, with a stateful per-request threshold, random and prompt/generated scopes."""
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1)) * 2
    return [
        AddVector(model, [0], v, selection=RandomFraction(0.5, seed=3)),
        Scale(model, [1], 0.3, selection=AboveThreshold("exact", cfg=SMALL_WARMUP)),
        ClampNorm(model, [2], 1.0, selection=Prompt()),
    ]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_kv_cached_edited_generation_equals_a_no_cache_reference(tiny_loaded_model, arch):
    model = tiny_loaded_model(arch)
    prompts = _tiny_prompts(model, 3)
    rids = [f"r{i}" for i in range(3)]
    edits = _mixed_edits(model)
    tracer = NormTracer(model)
    gens = generate(model, prompts, GREEDY, request_ids=rids, observers=edits + [tracer], batch_size=3)
    gen_norms = tracer.frame()
    assert sum(e.record.frame().edited.sum() for e in edits[:2]) > 0
    for prompt, rid, g in zip(prompts, rids, gens):
        ref_ids, ref_edits = _no_cache_edited_greedy(model, prompt, rid, lambda: _mixed_edits(model), 10)
        assert g.generated_ids == ref_ids
        for ours, ref in zip(edits, ref_edits):
            a = ours.record.frame().query("request_id == @rid")
            b = ref.record.frame()
            _frames_equal(a, b)
            assert (list(a.sort_values(["layer", "position"]).edited)
                    == list(b.sort_values(["layer", "position"]).edited))
        # norms of the edited stream: one teacher-forced pass over the final sequence with fresh edits
        ref_tracer = NormTracer(model)
        run_forward(model, [g.ids[:-1]], request_ids=[rid], n_prompt=[len(prompt)],
                    observers=_mixed_edits(model) + [ref_tracer])
        a, b = _frames_equal(gen_norms[gen_norms.request_id == rid], ref_tracer.frame())
        np.testing.assert_allclose(a.norm.to_numpy(), b.norm.to_numpy(), rtol=1e-4, atol=1e-4)


def test_exact_threshold_decisions_match_a_hand_computed_tracker(model):
    """Per request, each generated token is tested against tau of the request's earlier generated tokens."""
    prompts = organism_prompts(model, 2, seed=5)
    cfg = ThresholdConfig(k=0.5, warmup=3)
    edit = Scale(model, [1], 0.5, selection=AboveThreshold("exact", cfg=cfg))
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=20), observers=[edit], batch_size=2)
    record = edit.record.frame()
    for rid, g in enumerate(gens):
        x = _cache(model, g.ids[:-1])[model.hook_name(1)]  # layer-1 norms before the edit: the clean prefix
        norms = x.double().norm(dim=-1).numpy()
        tracker = ExactThreshold([1], cfg)
        expected = [bool(tracker.observe([norms[p]])[0]) for p in range(len(g.prompt_ids), len(g.ids) - 1)]
        ours = record[(record.request_id == rid) & record.is_generated].sort_values("position").edited.tolist()
        assert ours == expected
        assert not record[(record.request_id == rid) & ~record.is_generated].edited.any()
    assert record.edited.any()


def test_pooled_threshold_decides_the_same_in_generation_and_teacher_forcing(model):
    """The reference code's pooled P² mode: one sample per decode step; a lone request sees the same steps either
    way."""
    prompt = organism_prompts(model, 1, seed=16)[0]
    cfg = ThresholdConfig(k=0.5, warmup=3)
    edit = Scale(model, [1, 2], 0.5, selection=AboveThreshold("pooled-p2", cfg=cfg))
    g = generate(model, [prompt], SamplingConfig(max_new_tokens=20), observers=[edit])[0]
    forced = Scale(model, [1, 2], 0.5, selection=AboveThreshold("pooled-p2", cfg=cfg))
    run_forward(model, [g.ids[:-1]], n_prompt=[len(prompt)], observers=[forced])
    a, b = edit.record.frame(), forced.record.frame()
    assert a.edited.any() and a.equals(b)


def test_clamp_to_a_quarter_of_tau_uses_each_tokens_threshold(model):
    ids = organism_prompts(model, 1, seed=6)[0]
    clean = _cache(model, ids)[model.hook_name(2)]
    norms = clean.norm(dim=-1)
    tau = float(norms[1:].median())
    selection = AboveThreshold("fixed", fixed={2: tau}, scope=All())
    edit = ClampNorm(model, [2], tau_fraction(selection, 0.25), selection=selection)
    edited = _cache(model, ids, edit.hooks())[model.hook_name(2)]
    hit = norms > tau
    assert hit.any() and (~hit).any()
    torch.testing.assert_close(edited.norm(dim=-1)[hit], torch.full((int(hit.sum()),), tau / 4), rtol=1e-5, atol=1e-5)
    assert torch.equal(edited[~hit], clean[~hit])


# ----------------------------------------------------------------------------------------------------- SAE edits

def _sae(model, layer, d_sae=96, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=d_sae, metadata=SAEMetadata(
        model_name=model.name, hook_name=model.hook_name(layer))))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g))
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) * 0.3)
        sae.b_enc.fill_(-0.05)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1)
    return sae


def test_sae_clamp_to_the_current_activation_reproduces_the_clean_run(model):
    sae = _sae(model, 1)
    seqs = organism_prompts(model, 3, seed=7)
    clean = run_forward(model, seqs, return_logits=True)
    edit = SAEFeatureEdit(model, {1: sae}, list(range(96)), value=lambda a: a)
    ours = run_forward(model, seqs, observers=[edit], return_logits=True)
    assert all(torch.equal(clean[i], ours[i]) for i in clean)


def test_sae_clamp_changes_exactly_the_features_decoder_contribution(model):
    sae = _sae(model, 1)
    ids = organism_prompts(model, 1, seed=8)[0]
    x = _cache(model, ids)[model.hook_name(1)].double()
    features = [3, 17, 40]
    edited = _cache(model, ids, SAEFeatureEdit(model, {1: sae}, {1: features}, value=0.5).hooks())[model.hook_name(1)]
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)  # ReLU SAE, by hand in float64
    expected = x + (0.5 - acts[:, features]) @ W_dec[features]
    torch.testing.assert_close(edited.double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ selection properties

def _random_record(model, seqs, rids, seed, fraction=0.3, layers=(0, 1, 2)):
    edit = Scale(model, list(layers), 0.5, selection=RandomFraction(fraction, seed=seed))
    run_forward(model, seqs, request_ids=rids, n_prompt=[len(s) // 3 for s in seqs], observers=[edit],
                batch_size=len(seqs))
    return edit.record.frame().sort_values(["request_id", "layer", "position"]).reset_index(drop=True)


def test_random_selection_is_reproducible_hits_the_fraction_and_ignores_the_batch(model):
    seqs = [p + p for p in organism_prompts(model, 8, seed=9)]  # longer sequences, different lengths
    rids = [f"q{i}" for i in range(8)]
    a = _random_record(model, seqs, rids, seed=1)
    b = _random_record(model, seqs, rids, seed=1)
    c = _random_record(model, seqs, rids, seed=2)
    assert a.equals(b)
    assert not a.edited.equals(c.edited)
    generated = a[a.is_generated]
    assert not a[~a.is_generated].edited.any()
    n = len(generated)
    assert n > 500
    assert abs(generated.edited.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # 4 binomial standard deviations
    for i in (0, 5):
        alone = _random_record(model, [seqs[i]], [rids[i]], seed=1)
        assert alone.equals(a[a.request_id == rids[i]].reset_index(drop=True))


def test_prompt_generated_and_mask_selections_pick_their_positions(model):
    seq = organism_prompts(model, 1, seed=10)[0]
    n_prompt = len(seq) - 5
    mask = [p % 3 == 0 for p in range(len(seq) - 2)]
    edits = [Scale(model, [0], 0.5, selection=Prompt(), name="prompt"),
             Scale(model, [0], 0.5, selection=Generated(), name="generated"),
             Scale(model, [0], 0.5, selection=Mask({"x": mask}), name="mask"),
             Scale(model, [0], 0.5, selection=Generated() & Mask({"x": mask}), name="both")]
    run_forward(model, [seq], request_ids=["x"], n_prompt=[n_prompt], observers=edits)
    got = {e.name: e.record.frame().sort_values("position").edited.tolist() for e in edits}
    positions = range(len(seq))
    assert got["prompt"] == [p < n_prompt for p in positions]
    assert got["generated"] == [p >= n_prompt for p in positions]
    assert got["mask"] == [p < len(mask) and mask[p] for p in positions]
    assert got["both"] == [p >= n_prompt and p < len(mask) and mask[p] for p in positions]


def test_a_request_is_edited_the_same_alone_and_in_a_left_padded_batch(model):
    prompts = organism_prompts(model, 6, seed=11)
    assert len({len(p) for p in prompts}) > 3
    rids = [f"p{i}" for i in range(6)]
    cfg = SamplingConfig.paper(max_new_tokens=12, seed=5)

    def edits():
        return [Scale(model, [1], 0.2, selection=AboveThreshold("exact", cfg=SMALL_WARMUP)),
                Scale(model, [2], 0.5, selection=RandomFraction(0.4, seed=9))]

    batch_edits, tracer = edits(), NormTracer(model, [2])
    batch = generate(model, prompts, cfg, request_ids=rids, observers=batch_edits + [tracer], batch_size=6)
    assert batch_edits[0].record.frame().edited.any()
    for i in (0, 2, 5):
        alone_edits, alone_tracer = edits(), NormTracer(model, [2])
        alone = generate(model, [prompts[i]], cfg, request_ids=[rids[i]], observers=alone_edits + [alone_tracer])
        assert alone[0].generated_ids == batch[i].generated_ids
        for ours, ref in zip(batch_edits, alone_edits):
            a = ours.record.frame().query("request_id == @rids[@i]").reset_index(drop=True)
            b = ref.record.frame().reset_index(drop=True)
            assert a.equals(b)
        frame = tracer.frame()
        a, b = _frames_equal(frame[frame.request_id == rids[i]], alone_tracer.frame())
        np.testing.assert_allclose(a.norm.to_numpy(), b.norm.to_numpy(), atol=1e-5, rtol=0)


def test_edits_restricted_to_requests_leave_the_others_alone(model):
    prompts = organism_prompts(model, 3, seed=12)
    clean = generate(model, prompts, GREEDY, request_ids=["a", "b", "c"])
    edit = Scale(model, [0, 1, 2], 0.05, requests={"b"})
    edited = generate(model, prompts, GREEDY, request_ids=["a", "b", "c"], observers=[edit])
    assert set(edit.record.frame().request_id) == {"b"}
    assert edited[0].generated_ids == clean[0].generated_ids and edited[2].generated_ids == clean[2].generated_ids


def test_edited_tokens_carry_the_organism_labels(model):
    from tellnorm.organism import SUBJECT

    # the organism's tokenizer: its labels apply once the model carries the organism's labeler
    organism = dataclasses.replace(model, source="organism", token_labeler=SUBJECT.token_labeler)
    prompts = organism_prompts(organism, 2, seed=13)
    edit = Scale(organism, [1], 0.5, selection=RandomFraction(0.5, seed=0))
    gens = generate(organism, prompts, GREEDY, observers=[edit])
    table = edited_tokens(organism, [edit], gens)
    assert {"token", "label", "edited", "is_generated"} <= set(table.columns)
    assert table.label.notna().all() and (table[~table.is_generated].label == "prompt").all()


# -------------------------------------------------------------------------------------------- cleanup and errors

class _Failing(Edit):
    def apply(self, layer, x, mask, info):
        if info.phase == "decode" and info.step == 2:
            raise RuntimeError("edit failed")
        return x


def test_hooks_are_removed_when_an_edit_raises(model):
    prompts = organism_prompts(model, 2, seed=14)
    with pytest.raises(RuntimeError, match="edit failed"):
        generate(model, prompts, GREEDY, observers=[_Failing(model, [1])])
    assert active_hook_count(model) == 0
    with pytest.raises(TellnormError, match="prompt length"):
        run_forward(model, prompts, observers=[Scale(model, [1], 0.5, selection=Generated())])
    assert active_hook_count(model) == 0


def test_an_edit_object_serves_one_run(model):
    prompts = organism_prompts(model, 1, seed=15)
    edit = Scale(model, [1], 0.5)
    generate(model, prompts, GREEDY, observers=[edit])
    with pytest.raises(TellnormError, match="one edit object serves one run"):
        generate(model, prompts, GREEDY, observers=[edit])
    edit.reset()
    generate(model, prompts, GREEDY, observers=[edit])


@pytest.mark.parametrize("make, message", [
    (lambda m: Scale(m, [1], 0.0), "finite number > 0"),
    (lambda m: Scale(m, [1], -0.5), "finite number > 0"),
    (lambda m: Scale(m, [1], float("nan")), "finite number > 0"),
    (lambda m: Scale(m, [1], float("inf")), "finite number > 0"),
    (lambda m: Scale(m, [1], "0.1"), "finite number > 0"),
    (lambda m: Scale(m, [m.n_layers], 0.1), "out of range"),
    (lambda m: Scale(m, [-1], 0.1), "out of range"),
    (lambda m: Scale(m, [], 0.1), "at least one layer"),
    (lambda m: Scale(m, [1], 0.1, point="resid_nowhere"), "unknown hook point"),
    (lambda m: Scale(m, [1], 0.1, selection=RandomFraction(0.0)), r"in \(0, 1\]"),
    (lambda m: Scale(m, [1], 0.1, selection=RandomFraction(1.5)), r"in \(0, 1\]"),
    (lambda m: Scale(m, [1], 0.1, selection=RandomFraction(float("nan"))), r"in \(0, 1\]"),
    # per-request rates may be 0
    (lambda m: Scale(m, [1], 0.1, selection=RandomFraction({"a": 0.2, "b": 2.0})), r"in \[0, 1\]"),
    (lambda m: Scale(m, [1], 0.1, selection=AboveThreshold("fixed", fixed={0: 3.0})), "no value for layer"),
    (lambda m: Scale(m, [1], 0.1, selection=AboveThreshold("median")), "unknown threshold mode"),
    (lambda m: ClampNorm(m, [1], 0.0), "finite number > 0"),
    (lambda m: AddVector(m, [1], torch.zeros(m.d_model + 1)), "shape"),
    (lambda m: AddVector(m, [1], torch.zeros(m.d_model, dtype=torch.long)), "floating-point"),
    (lambda m: AddVector(m, [1], torch.full((m.d_model,), float("nan"))), "NaN"),
    (lambda m: AddVector(m, [1], [0.0] * m.d_model), "torch tensor"),
    (lambda m: SAEFeatureEdit(m, {1: _sae(m, 1)}, [96]), "d_sae=96"),
    (lambda m: SAEFeatureEdit(m, {1: _sae(m, 1)}, [-1]), "does not exist"),
    (lambda m: SAEFeatureEdit(m, {1: _sae(m, 1)}, {2: [0]}), "no SAE for layer 2"),
    (lambda m: SAEFeatureEdit(m, {2: _sae(m, 1)}, [0]), "another layer"),
])
def test_bad_input_is_one_clear_error_before_any_generation(model, make, message):
    with pytest.raises(TellnormError, match=message) as err:
        make(model)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ the experiment

def test_study_configuration_is_validated_before_any_work():
    from tellnorm.studies.suppression import InterventionConfig

    for bad in (dict(factors=(0.0,)), dict(factors=(1.5,)), dict(amplify=(0.5,)), dict(random_seeds=()),
                dict(threshold_mode="median"), dict(threshold_mode="fixed"), dict(per_difficulty=0),
                dict(clamp_fraction=2.0), dict(steering_scales=(0.0,)), dict(difficulties=(0,))):
        with pytest.raises(TellnormError):
            InterventionConfig(**bad)


def test_random_feature_sets_match_the_top_k_activation_mass():
    import pandas as pd

    from tellnorm.studies.suppression import MASS_TOLERANCE, matched_feature_sets

    rng = np.random.default_rng(0)
    mass = rng.exponential(1.0, 300)
    table = pd.DataFrame({"layer": 6, "feature": range(300), "mean_thinking": mass,
                          "rank": pd.Series(-mass).rank(method="first").astype(int)})
    sets, masses = matched_feature_sets(table, 10, seeds=(0, 1))
    top = sets["top-K"][6]
    assert sorted(top) == sorted(np.argsort(-mass)[:10].tolist())
    for name in ("random-matched/0", "random-matched/1"):
        assert not set(sets[name][6]) & set(top)
        assert abs(masses[name] - masses["top-K"]) <= MASS_TOLERANCE * masses["top-K"]
        assert masses[name] == pytest.approx(mass[sets[name][6]].sum())
    assert sets["random-matched/0"] != sets["random-matched/1"]
    assert matched_feature_sets(table, 10, seeds=(0,))[0]["random-matched/0"] == sets["random-matched/0"]


@pytest.mark.slow
def test_tellnorm_intervene_writes_the_suppression_table_on_the_organism(tmp_path):
    import pandas as pd

    from tellnorm.apps.cli import main

    out = tmp_path / "interventions"
    assert main(["intervene", "--n", "1", "--calibration-n", "1", "--factors", "0.1", "--amplify", "--seeds", "0",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "suppression.csv")
    required = {"layer_set", "selection", "factor", "seed", "difficulty", "n", "accuracy", "ci_low", "ci_high",
                "fraction_edited", "diff_vs_clean", "diff_ci_low", "diff_ci_high", "delta_logp"}
    assert required <= set(table.columns)
    assert {"none", "high-norm", "random"} <= set(table.selection)
    assert {"early", "middle", "late"} <= set(table.layer_set)
    assert (table.n == 1).sum() > 0 and (table[table.difficulty == "all"].n > 1).all()
    for name in ("suppression_hits.csv", "suppression_top_tokens.csv", "suppression.html", "steering.csv",
                 "feature_ablation.csv", "thresholds.json", "interventions.json"):
        assert (out / name).is_file(), name
