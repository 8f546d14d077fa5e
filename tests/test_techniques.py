"""ALRR, ERSS and LRS (PAPER §6) against independent references.

* ALRR/ERSS: the KV-cached run against the cache-free reference (``generate(..., reuse_cache=False)``, fresh edit
  objects); ``extra_block_pass`` against a TransformerLens-hooked forward of the truncated sequence; the keep rule and
  the ERSS trigger/bank/injection rule against plain-python replays of the states the edits saw; per-request state
  (no leakage, alone == in a batch); the KV cache never written; hooks removed on errors; reproducibility.
* LRS: statistics, tables, scores and picks against plain loops over random norms.
* Bad input: one TellnormError with a helpful message.

Thresholds are fixed per layer and sit halfway between two neighbouring norms of the model's own clean run, so that
float noise between two numerically different but equivalent paths cannot flip a decision.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import ExtraPassProbe, active_hook_count, cache_snapshot, organism_prompts

from tellnorm.backends import load_model
from tellnorm.backends.base import HOOK_POINTS
from tellnorm.errors import TellnormError
from tellnorm.generation import LayerHooks, SamplingConfig, StepInfo, generate
from tellnorm.interventions.selection import RandomFraction, token_uniforms
from tellnorm.norms import NormTracer
from tellnorm.techniques import (
    ALRR,
    ERSS,
    ALRRConfig,
    ERSSConfig,
    LRSConfig,
    build_edits,
    firing_report,
    lrs,
    parse_techniques,
    threshold_for,
)
from tellnorm.techniques.alrr import extra_block_pass
from tellnorm.thresholds import ThresholdConfig

ORGANISM_LAYER = 6  # the organism's late layer (8 layers: late_layers() == [6])
TINY_LAYER = 1  # tiny 3-layer models: a middle layer, so the next layer exists

# ------------------------------------------------------------------------------------------------ fixtures, helpers

@pytest.fixture(scope="module")
def load(tiny_model_dir):
    """``(name, dtype) -> LoadedModel`` for "organism" (the shipped data/organism) or a tiny 3-layer arch (cached)."""
    loaded: dict = {}

    def make(name: str = "organism", dtype: str = "float32"):
        key = (name, dtype)
        if key not in loaded:
            spec = "organism" if name == "organism" else tiny_model_dir(name, 3)
            loaded[key] = load_model(spec, dtype=dtype)
        return loaded[key]

    return make


@pytest.fixture(scope="module")
def organism(load):
    return load("organism")


def prompts_for(model, name: str, n: int = 3, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of different lengths (left padding in a batch)."""
    if name == "organism":
        return organism_prompts(model, n, seed=seed)
    rng = np.random.default_rng(seed)
    out = [[int(t) for t in rng.integers(7, 100, size=3 + 3 * i)] for i in range(n)]  # word tokens of the tiny vocab
    bos = model.tokenizer.bos_token_id
    return [[bos] + p for p in out] if model.info.get("prepend_bos") else out


def equal_length(prompts: list[list[int]]) -> list[list[int]]:
    """The prompts cut to the shortest one's length (their last tokens): a batch without padding."""
    m = min(len(p) for p in prompts)
    return [p[-m:] for p in prompts]


def target_layer(name: str) -> int:
    return ORGANISM_LAYER if name == "organism" else TINY_LAYER


def generated_norms(frame, prompts, layer) -> np.ndarray:
    n_prompt = {i: len(p) for i, p in enumerate(prompts)}
    f = frame[(frame.layer == layer) & (frame.position >= frame.request_id.map(n_prompt))]
    return f.norm.to_numpy(dtype=np.float64)


def tau_between(values, q: float) -> float:
    """A threshold near the q-quantile of ``values`` but halfway between two neighbours (never on a value)."""
    v = np.unique(np.asarray(values, dtype=np.float64))
    i = min(max(int(q * (len(v) - 1)), 0), len(v) - 2)
    return float((v[i] + v[i + 1]) / 2)


def clean_norms(model, prompts, layers, n_new):
    """Greedy generations without edits and their norms at ``layers``."""
    tracer = NormTracer(model, layers)
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=n_new), observers=[tracer])
    return gens, tracer.frame()


def by_key(frame) -> pd.Series:
    return frame.set_index(["request_id", "position", "layer"]).norm.astype(np.float64).sort_index()


def assert_same_norms(a, b, rtol: float, atol: float):
    a, b = by_key(a), by_key(b)
    assert list(a.index) == list(b.index)
    diff = np.abs(a.to_numpy() - b.to_numpy())
    assert np.all(diff <= atol + rtol * np.abs(b.to_numpy())), f"max |Δnorm| {diff.max()}"


def tolerances(dtype: str) -> tuple[float, float]:
    return (0.0, 1e-4) if dtype == "float64" else (1e-5, 1e-4)


def report_sums(edit) -> dict:
    r = edit.report()
    return {c: int(r[c].sum()) for c in r.columns if c not in ("request_id", "layer")}


class Recorder(LayerHooks):
    """A copy of the stream vector of every token seen for the first time at ``layer``'s ``point``, by (request,
    position). Placed before an edit at the same hook it sees what the edit sees; placed after, what it wrote."""

    def __init__(self, model, layers, point: str = "resid_post"):
        super().__init__(model, layers, point)
        self.states: dict = {}  # (layer, request_id, position) -> tensor [d_model]

    def hook_for(self, layer):
        def hook(x, hook):
            info = self.info
            for r, c in info.new_tokens.cpu().nonzero().tolist():
                self.states[(layer, info.request_ids[r], int(info.positions[r, c]))] = x[r, c].detach().clone()
            return x

        return hook


def reference_block(model, layer: int, ids, position: int, y):
    """Independent reference for one extra pass: decoder layer ``layer``'s output at ``position`` when the sequence
    ``ids[:position + 1]`` runs alone (no padding, no cache) through the model with TransformerLens hooks, its layer
    input at ``position`` replaced by ``y`` (earlier positions keep their normal input)."""
    seq = torch.tensor([list(ids[:position + 1])], device=model.device)
    out = {}

    def replace(x, hook):
        x = x.clone()
        x[0, position] = y.to(x.dtype)
        return x

    def grab(x, hook):
        out["x"] = x[0, position].detach().clone()
        return x

    hooks = [(model.hook_name(layer, "resid_pre"), replace), (model.hook_name(layer, "resid_post"), grab)]
    with model.bridge.hooks(fwd_hooks=hooks), torch.no_grad():
        model.hf_model(input_ids=seq, use_cache=False)
    return out["x"]


def assert_same_cache(a, b):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        assert ka.shape == kb.shape and va.shape == vb.shape
        assert torch.equal(ka, kb) and torch.equal(va, vb)


# --------------------------------------------------------------------------- 1. ALRR: cached == cache-free reference

def _f64(name):
    return pytest.param(name, "float64")


ALRR_CASES = {  # model -> (config, quantile of the clean generated norms for τ)
    "organism": (ALRRConfig(layers=(ORGANISM_LAYER,)), 0.3),  # the paper's rule fires and keeps passes here
    "qwen3": (ALRRConfig(layers=(TINY_LAYER,), growth_eps=0.05, blowup_ratio=2.0, max_extra_iters=2), 0.3),
    "llama": (ALRRConfig(layers=(TINY_LAYER,), growth_eps=0.05, blowup_ratio=2.0, max_extra_iters=2), 0.3),
}


@pytest.mark.parametrize("name, dtype", [("organism", "float32"), _f64("organism"), ("qwen3", "float32"),
                                         _f64("qwen3"), ("llama", "float32"), _f64("llama")])
def test_alrr_cached_generation_equals_the_cache_free_reference(load, name, dtype):
    model = load(name, dtype)
    cfg, q = ALRR_CASES[name]
    layer = cfg.layers[0]
    layers = list(range(layer, model.n_layers))  # the ALRR layer and every later one
    prompts = prompts_for(model, name)
    n_new = 12
    if dtype == "float64":  # no left padding in float64 (generation refuses it: the bridge's softmax is float32)
        prompts = equal_length(prompts)
    else:
        # A prompt that fills the context after 6 tokens: its row leaves the batch (cache rows dropped) mid-run.
        long = (prompts[-1] * model.max_positions)[:model.max_positions - 6]
        prompts.append(long)
        assert len({len(p) for p in prompts}) == len(prompts)  # left padding
    clean_gens, clean = clean_norms(model, prompts, layers, n_new)
    if dtype != "float64":
        assert len(clean_gens[-1].generated_ids) == 6 < len(clean_gens[0].generated_ids)
    tau = tau_between(generated_norms(clean, prompts, layer), q)

    runs = {}
    for reuse in (True, False):
        alrr = ALRR(model, threshold_for("fixed", fixed={layer: tau}), cfg)
        tracer = NormTracer(model, layers)  # after the ALRR: sees the edited stream
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=n_new), observers=[alrr, tracer],
                        reuse_cache=reuse)
        runs[reuse] = (gens, alrr.report(), tracer.frame())

    (gens, report, frame), (ref_gens, ref_report, ref_frame) = runs[True], runs[False]
    sums = {c: int(report[c].sum()) for c in ("alrr_band_tokens", "alrr_extra_passes", "alrr_kept_passes")}
    assert sums["alrr_extra_passes"] > 0 and sums["alrr_kept_passes"] > 0, sums  # the test is meaningful
    assert [g.generated_ids for g in gens] == [g.generated_ids for g in ref_gens]
    pd.testing.assert_frame_equal(report.sort_values(["request_id", "layer"]).reset_index(drop=True),
                                  ref_report.sort_values(["request_id", "layer"]).reset_index(drop=True))
    assert_same_norms(frame, ref_frame, *tolerances(dtype))
    # Extra passes are invisible to observers: one norm per token fed to the model and layer, no more.
    fed = sum(len(g.prompt_ids) + len(g.generated_ids) - 1 for g in gens)
    assert len(frame) == fed * len(layers) and not frame.duplicated(["request_id", "position", "layer"]).any()

    # The edit is real: the next layer's norms differ from the clean run's somewhere.
    ours, base = by_key(frame), by_key(clean)
    common = ours.index.intersection(base.index)
    nxt = common[common.get_level_values("layer") == layer + 1]
    assert np.abs(ours[nxt].to_numpy() - base[nxt].to_numpy()).max() > 1e-2


@pytest.mark.parametrize("variant", ["two-layers", "random-control", "forced-loops"])
def test_alrr_variants_cached_equal_the_cache_free_reference(organism, variant):
    """ALRR at two layers (the second sees the first's edit), with a random matched control selection instead of the
    band rule, and the paper's forced-loop ablation (K passes, all kept)."""
    model = organism
    prompts = prompts_for(model, "organism", 3)
    layers = [5, ORGANISM_LAYER, ORGANISM_LAYER + 1]
    _, clean = clean_norms(model, prompts, layers, 12)
    taus = {layer: tau_between(generated_norms(clean, prompts, layer), 0.3) for layer in (5, ORGANISM_LAYER)}
    runs = {}
    for reuse in (True, False):
        threshold = threshold_for("fixed", fixed=taus)
        if variant == "two-layers":
            alrr = ALRR(model, threshold, ALRRConfig(layers=(5, ORGANISM_LAYER)))
        elif variant == "random-control":
            alrr = ALRR(model, threshold, ALRRConfig(layers=(ORGANISM_LAYER,), growth_eps=0.0, blowup_ratio=3.0),
                        selection=RandomFraction(0.4, seed=1))
        else:
            alrr = ALRR(model, threshold, ALRRConfig(layers=(5, ORGANISM_LAYER), forced_loops=3))
        tracer = NormTracer(model, layers)
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=12), observers=[alrr, tracer],
                        reuse_cache=reuse)
        runs[reuse] = (gens, alrr.report(), tracer.frame())
    (gens, report, frame), (ref_gens, ref_report, ref_frame) = runs[True], runs[False]
    assert report.alrr_kept_passes.sum() > 0
    if variant == "forced-loops":
        assert (report.alrr_extra_passes == 3 * report.alrr_band_tokens).all()
        assert (report.alrr_kept_passes == report.alrr_extra_passes).all()
    assert [g.generated_ids for g in gens] == [g.generated_ids for g in ref_gens]
    pd.testing.assert_frame_equal(report, ref_report)
    assert_same_norms(frame, ref_frame, *tolerances("float32"))


@pytest.mark.parametrize("names, mode", [(("erss",), "fixed"), (("alrr", "erss"), "fixed"), (("alrr",), "exact"),
                                         (("alrr", "erss"), "exact"), (("alrr", "erss"), "pooled-p2")])
def test_erss_and_combinations_cached_equal_the_cache_free_reference(organism, names, mode):
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 3, seed=3)
    n_new = 16
    _, clean = clean_norms(model, prompts, [layer, layer + 1], n_new)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.6)
    erss_cfg = ERSSConfig(layers=(layer,), low_k=2, p_inject=1.0, cooldown=0, cos_min=0.0, bank_k=4)
    kwargs = dict(threshold_mode=mode, fixed={layer: tau} if mode == "fixed" else None,
                  threshold_cfg={"fixed": None, "exact": ThresholdConfig(k=0.5, warmup=3),
                                 "pooled-p2": ThresholdConfig(k=0.1, warmup=3)}[mode],
                  alrr=ALRRConfig(layers=(layer,), growth_eps=0.0, blowup_ratio=3.0), erss=erss_cfg)
    runs = {}
    for reuse in (True, False):
        edits = build_edits(names, model, **kwargs)
        tracer = NormTracer(model, [layer, layer + 1])
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=n_new), observers=[*edits, tracer],
                        reuse_cache=reuse)
        runs[reuse] = (gens, firing_report(edits, range(len(prompts))), tracer.frame())
    (gens, report, frame), (ref_gens, ref_report, ref_frame) = runs[True], runs[False]
    if "erss" in names:
        assert report.erss_injections.sum() > 0
    if "alrr" in names:
        assert report.alrr_kept_passes.sum() > 0
    assert [g.generated_ids for g in gens] == [g.generated_ids for g in ref_gens]
    pd.testing.assert_frame_equal(report, ref_report)
    assert_same_norms(frame, ref_frame, *tolerances("float32"))


# ------------------------------------------------------- 2. extra_block_pass against a TL-hooked truncated forward

@pytest.mark.parametrize("name, dtype, padded", [
    ("organism", "float32", True), ("organism", "float64", False),

    ("llama", "float32", True), ("qwen3", "float64", False)])
def test_extra_block_pass_equals_a_hooked_forward_of_the_truncated_sequence(load, name, dtype, padded):
    model = load(name, dtype)
    layer = target_layer(name)
    prompts = prompts_for(model, name, 3)
    if not padded:
        prompts = [p[:min(map(len, prompts))] for p in prompts]
    assert (len({len(p) for p in prompts}) > 1) == padded
    probe = ExtraPassProbe(model, [layer], steps=(0, 1, 3))  # prefill (many tokens per row) and decode steps
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=5), observers=[probe])
    assert len(probe.calls) >= 3 * 3 and len(probe.cache_checks) == 3
    # float64: HF's eager attention takes its softmax in float32, so two equivalent float64 paths agree to ~3e-8
    # relative (one float32 ulp of an attention weight), not to 1e-15.
    tol = 1e-6 if dtype == "float64" else 1e-5
    for _, rid, position, y, out, normal, post in probe.calls:
        ids = gens[rid].ids
        ref = reference_block(model, layer, ids, position, y)
        assert (out - ref).norm() <= tol * ref.norm(), (rid, position, float((out - ref).norm() / ref.norm()))
        # With the token's own layer input the extra pass is the normal pass; y really changed the output.
        assert (normal - post).norm() <= tol * post.norm()
        assert (out - post).norm() > 1e-3 * post.norm()
    # 3. the KV cache is never written by an extra pass
    for before, after in probe.cache_checks:
        assert_same_cache(before, after)


# ------------------------------------------------------------------------------- 3. ALRR never writes the KV cache

class CacheSnapshots(LayerHooks):
    """At ``layer``'s resid_post of every pass: a copy of the cache and whether this hook's input differs from the
    input of the previous snapshot observer (an edit ran in between)."""

    def __init__(self, model, layer):
        super().__init__(model, [layer])
        self.snaps: list = []
        self.inputs: list = []

    def hook_for(self, layer):
        def hook(x, hook):
            self.snaps.append(cache_snapshot(self.info.cache))
            self.inputs.append(x.detach().clone())
            return x

        return hook


class HookCounter:
    """Counts calls of every hook point of ``layer``."""

    def __init__(self, model, layer):
        self.names = [model.hook_name(layer, point) for point in HOOK_POINTS]
        self.calls = dict.fromkeys(self.names, 0)

    def hooks(self, model):
        def make(name):
            def hook(x, hook):
                self.calls[name] += 1
                return x
            return hook
        return [(name, make(name)) for name in self.names]

    def on_step(self, info):
        pass


def test_alrr_leaves_the_kv_cache_as_the_normal_pass_wrote_it(organism):
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 3)
    _, clean = clean_norms(model, prompts, [layer], 12)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.3)
    before, after = CacheSnapshots(model, layer), CacheSnapshots(model, layer)
    counter = HookCounter(model, layer)
    alrr = ALRR(model, threshold_for("fixed", fixed={layer: tau}), ALRRConfig(layers=(layer,)))
    generate(model, prompts, SamplingConfig(max_new_tokens=12), observers=[counter, before, alrr, after])
    assert report_sums(alrr)["alrr_kept_passes"] > 0
    # the extra passes run no hook of the layer: every hook point fired once per forward pass
    assert set(counter.calls.values()) == {len(before.snaps)}
    edited_steps = 0
    for snap_b, snap_a, x_b, x_a in zip(before.snaps, after.snaps, before.inputs, after.inputs):
        assert_same_cache(snap_b, snap_a)
        edited_steps += not torch.equal(x_b, x_a)
    assert edited_steps > 0  # ALRR changed the stream in some pass, and the cache stayed as it was


# --------------------------------------------------------------------- ALRR's band and keep rules, from the outside

@pytest.mark.parametrize("cfg", [ALRRConfig(layers=(ORGANISM_LAYER,)), ALRRConfig(layers=(ORGANISM_LAYER,),
                                                                                   forced_loops=2)])
def test_alrr_edits_exactly_the_band_tokens_by_the_keep_rule(organism, cfg):
    """Replay of PAPER §6 from the states ALRR saw: band τ < ‖x‖ < 1.5τ on generated tokens; one extra pass (the
    TL reference block) kept iff ‖h'‖ > τ, ‖h'‖ ≥ 1.2‖x‖ and ‖h'‖ < 1.5τ; forced loops: K passes, all kept."""
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 3)
    _, clean = clean_norms(model, prompts, [layer], 10)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.3)
    pre, post = Recorder(model, [layer]), Recorder(model, [layer])
    alrr = ALRR(model, threshold_for("fixed", fixed={layer: tau}), cfg)
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=10), observers=[pre, alrr, post])
    band = extra = kept = 0
    for (_, rid, position), x in pre.states.items():
        out = post.states[(layer, rid, position)]
        norm = float(x.double().norm())
        if position < len(prompts[rid]) or not tau < norm < cfg.blowup_ratio * tau:
            assert torch.equal(out, x)
            continue
        band += 1
        h = x
        for _ in range(cfg.forced_loops or cfg.max_extra_iters):
            new = reference_block(model, layer, gens[rid].ids, position, h)
            extra += 1
            n_old, n_new = float(h.double().norm()), float(new.double().norm())
            if cfg.forced_loops or (n_new > tau and n_new >= (1 + cfg.growth_eps) * n_old
                                    and n_new < cfg.blowup_ratio * tau):
                h, kept = new, kept + 1
            else:
                break
        torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-4)
    assert band > 0 and kept > 0 and (cfg.forced_loops or kept < extra)  # both branches seen
    assert report_sums(alrr) == {"alrr_band_tokens": band, "alrr_extra_passes": extra, "alrr_kept_passes": kept}


# ----------------------------------------------------------------------------------------------- 4. ERSS per request

ERSS_LAYERS = (5, ORGANISM_LAYER)


def erss_reference(states, layer, rid, n_prompt, tau, cfg, cooldown_blocks: int):
    """PAPER §6 / erss.py's docstring, replayed from the (pre-injection) states the edit saw, in position order.
    After an injection at p the next ``cooldown_blocks`` tokens cannot inject. Returns {position: source position}
    and the counters (banked, triggers, refused by the draw, refused by the cosine)."""
    positions = sorted(p for (l, r, p) in states if l == layer and r == rid and p >= n_prompt)
    bank: list = []  # (norm, position), highest first
    streak, blocked_until, injections = 0, -1, {}
    counts = dict(banked=0, triggers=0, draw_refused=0, cos_refused=0)
    for p in positions:
        x = states[(layer, rid, p)].double()
        norm = float(x.norm())
        if norm > tau:
            bank = sorted(bank + [(norm, p)], key=lambda item: -item[0])[:cfg.bank_k]
            counts["banked"] += 1
            streak = 0
            continue
        streak = streak + 1 if norm < cfg.gamma * tau else 0
        if streak < cfg.low_k or p <= blocked_until or not bank:
            continue
        counts["triggers"] += 1
        if token_uniforms(cfg.seed, rid, layer, [p])[0] >= cfg.p_inject:
            counts["draw_refused"] += 1
            continue
        cos = [float(torch.nn.functional.cosine_similarity(states[(layer, rid, q)].double(), x, dim=0))
               for _, q in bank]
        best = int(np.argmax(cos))
        if cos[best] < cfg.cos_min:
            counts["cos_refused"] += 1
            continue
        injections[p] = bank[best][1]
        blocked_until = p + cooldown_blocks
    return injections, counts


def run_erss(model, cfg, n_new=24, n_prompts=4, seed=3, q=0.6):
    prompts = prompts_for(model, "organism", n_prompts, seed=seed)
    _, clean = clean_norms(model, prompts, list(cfg.layers), n_new)
    taus = {layer: tau_between(generated_norms(clean, prompts, layer), q) for layer in cfg.layers}
    pre, post = Recorder(model, cfg.layers), Recorder(model, cfg.layers)
    erss = ERSS(model, threshold_for("fixed", fixed=taus), cfg)
    gens = generate(model, prompts, SamplingConfig(max_new_tokens=n_new), observers=[pre, erss, post])
    return dict(prompts=prompts, taus=taus, pre=pre.states, post=post.states, erss=erss, gens=gens)


@pytest.fixture(scope="module")
def erss_run(organism):
    cfg = ERSSConfig(layers=ERSS_LAYERS, low_k=2, p_inject=0.7, cooldown=0, cos_min=0.1, bank_k=3)
    return run_erss(organism, cfg)


def test_erss_decisions_match_a_python_replay_of_the_rule(erss_run):
    run, cfg = erss_run, erss_run["erss"].cfg
    report = run["erss"].report().set_index(["request_id", "layer"])
    totals = dict(injections=0, draw_refused=0, cos_refused=0, evicted=0)
    for layer in cfg.layers:
        for rid, prompt in enumerate(run["prompts"]):
            injections, counts = erss_reference(run["pre"], layer, rid, len(prompt), run["taus"][layer], cfg,
                                                cooldown_blocks=cfg.cooldown)
            st = run["erss"].state(rid, layer)
            assert sorted(st["targets"]) == sorted(injections)
            for p, source in injections.items():
                assert torch.equal(st["targets"][p], run["pre"][(layer, rid, source)])
            assert tuple(report.loc[(rid, layer)]) == (counts["banked"], counts["triggers"], len(injections))
            totals["injections"] += len(injections)
            totals["draw_refused"] += counts["draw_refused"]
            totals["cos_refused"] += counts["cos_refused"]
            totals["evicted"] += counts["banked"] > cfg.bank_k
            # the stream written: halfway to the target at injections, untouched elsewhere
            for (l, r, p), x in run["pre"].items():
                if (l, r) != (layer, rid):
                    continue
                out = run["post"][(l, r, p)]
                if p in injections:
                    target = run["pre"][(layer, rid, injections[p])]
                    torch.testing.assert_close(out, x + cfg.beta * (target - x), rtol=1e-6, atol=1e-5)
                else:
                    assert torch.equal(out, x)
    assert totals["injections"] >= 5 and all(totals.values()), totals  # every branch of the rule was taken


def test_erss_injects_only_the_requests_own_earlier_states(erss_run):
    run = erss_run
    checked = 0
    for layer in ERSS_LAYERS:
        for rid in range(len(run["prompts"])):
            for p, target in run["erss"].state(rid, layer)["targets"].items():
                own = [q for (l, r, q), x in run["pre"].items() if l == layer and r == rid and torch.equal(x, target)]
                others = [(r, q) for (l, r, q), x in run["pre"].items()
                          if r != rid and torch.equal(x, target)]
                assert len(own) == 1 and own[0] < p and own[0] >= len(run["prompts"][rid])
                assert not others
                checked += 1
    assert checked > 0
    injected = run["erss"].report().groupby("request_id").erss_injections.sum()
    assert (injected > 0).sum() >= 2  # several requests were steered in the same batches


def test_erss_cooldown_blocks_the_next_cooldown_tokens(organism):
    cfg = ERSSConfig(layers=(ORGANISM_LAYER,), low_k=2, p_inject=1.0, cooldown=1, cos_min=0.0, bank_k=3)
    run = run_erss(organism, cfg, n_new=20, n_prompts=3)
    injected = 0
    for rid, prompt in enumerate(run["prompts"]):
        injections, _ = erss_reference(run["pre"], ORGANISM_LAYER, rid, len(prompt), run["taus"][ORGANISM_LAYER],
                                       cfg, cooldown_blocks=cfg.cooldown)
        positions = sorted(run["erss"].state(rid, ORGANISM_LAYER)["targets"])
        injected += len(positions)
        assert all(b - a > cfg.cooldown for a, b in pairwise(positions)), positions
        assert positions == sorted(injections)
    assert injected > 0


@pytest.mark.parametrize("names", [("erss",), ("alrr", "erss")])
def test_a_request_is_steered_the_same_alone_and_in_a_padded_batch(organism, names):
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 4, seed=5)
    rids = ["a", "b", "c", "d"]
    n_new = 18
    _, clean = clean_norms(model, prompts, [layer], n_new)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.6)
    kwargs = dict(fixed={layer: tau}, alrr=ALRRConfig(layers=(layer,), growth_eps=0.0, blowup_ratio=3.0),
                  erss=ERSSConfig(layers=(layer,), low_k=2, p_inject=0.7, cooldown=2, cos_min=0.0, bank_k=4))

    def run(ps, ids, batch_size=16):
        edits = build_edits(names, model, **kwargs)
        tracer = NormTracer(model, [layer, layer + 1])
        gens = generate(model, ps, SamplingConfig(max_new_tokens=n_new), request_ids=ids, observers=[*edits, tracer],
                        batch_size=batch_size)
        return gens, firing_report(edits, ids), tracer.frame()

    batch = run(prompts, rids)
    assert batch[1].erss_injections.sum() > 0 and batch[1].erss_injections.gt(0).sum() >= 2
    shuffled = run(prompts[::-1], rids[::-1], batch_size=3)
    for i, rid in enumerate(rids):
        alone = run([prompts[i]], [rid])
        for other in (batch, shuffled):
            gen = next(g for g in other[0] if g.request_id == rid)
            assert gen.generated_ids == alone[0][0].generated_ids
            row = other[1][other[1].request_id == rid].reset_index(drop=True)
            pd.testing.assert_frame_equal(row, alone[1])
            assert_same_norms(other[2][other[2].request_id == rid], alone[2], *tolerances("float32"))


# ------------------------------------------------------------------------------------------------------- 5. LRS

def lrs_loop(norms, tau, late_frac):
    """A, B, C, D, n_tokens, n_late of one response by the docstring's definitions, one token at a time."""
    n = len(norms)
    start = int(n * (1 - late_frac))
    a = b = d = 0.0
    c = 0
    for t, x in enumerate(norms):
        a += x
        excess = x - tau if x > tau else 0.0
        b += excess
        c += x > tau
        if t >= start:
            d += excess
    return {"A": a, "B": b, "C": c, "D": d, "n_tokens": n, "n_late": n - start}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 37])
@pytest.mark.parametrize("late_frac", [lrs.LATE_FRAC, 0.5, 1.0])
def test_lrs_response_statistics_match_a_plain_loop(n, late_frac):
    rng = np.random.default_rng(n)
    norms = rng.uniform(50, 150, size=n)
    for tau in (40.0, float(np.median(norms)), 100.0, 200.0):
        got = lrs.response_statistics(norms, tau, late_frac)
        want = lrs_loop(list(norms), tau, late_frac)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
        assert lrs.late_start(n, late_frac) == n - want["n_late"]


def random_norm_frame(rng, lengths, layers):
    rows = []
    for rid, n in enumerate(lengths):
        n_prompt = int(rng.integers(2, 6))
        for layer in layers:
            for t in range(n):
                rows.append({"request_id": rid, "layer": layer, "position": n_prompt + t,
                             "norm": float(rng.uniform(10, 30) * (1 + layer / 10))})
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)  # any order


def test_lrs_statistics_table_and_scores_match_a_plain_loop():
    rng = np.random.default_rng(0)
    layers = [3, 5, 6]
    lengths = [1, 2, 3, 10, 7]
    frame = random_norm_frame(rng, lengths, layers)
    taus = {3: 15.0, 5: 25.0, 6: 22.0}
    for late_frac in (lrs.LATE_FRAC, 0.5):
        table = lrs.statistics_table(frame, taus, late_frac)
        assert len(table) == len(lengths) * len(layers)
        expected = {}
        for rid in range(len(lengths)):
            for layer in layers:
                f = frame[(frame.request_id == rid) & (frame.layer == layer)].sort_values("position")
                expected[(rid, layer)] = lrs_loop(list(f.norm), taus[layer], late_frac)
                row = table[(table.request_id == rid) & (table.layer == layer)].iloc[0]
                for key, value in expected[(rid, layer)].items():
                    assert float(row[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), (rid, layer, key)
        for statistic in lrs.STATISTICS:
            for per_token in (False, True):
                for subset in ([6], [5, 6], layers):
                    cfg = LRSConfig(statistic=statistic, per_token=per_token)
                    got = lrs.scores(table, cfg, subset)
                    for rid in range(len(lengths)):
                        want = 0.0
                        for layer in subset:
                            e = expected[(rid, layer)]
                            denominator = (e["n_late"] if statistic == "D" else e["n_tokens"]) if per_token else 1
                            want += e[statistic] / max(denominator, 1)
                        assert got[rid] == pytest.approx(want, rel=1e-12, abs=1e-12)
    with pytest.raises(TellnormError, match="no norms at layers"):
        lrs.scores(lrs.statistics_table(frame, taus), LRSConfig(), [9])
    with pytest.raises(TellnormError, match=r"no threshold for layer\(s\) \[.*6"):  # (shows np.int64(6))
        lrs.statistics_table(frame, {3: 1.0, 5: 1.0})


def test_lrs_pick_takes_the_highest_score_and_the_first_of_ties():
    rng = np.random.default_rng(1)
    for _ in range(50):
        values = rng.integers(0, 4, size=int(rng.integers(1, 8))).astype(float)  # many ties
        best = max(values)
        assert lrs.pick(values) == next(i for i, v in enumerate(values) if v == best)
    assert lrs.pick([1.0, 3.0, 3.0, 2.0]) == 1
    assert lrs.pick(pd.Series([2.0, 2.0], index=["x", "y"])) == 0
    with pytest.raises(TellnormError, match="at least one response"):
        lrs.pick([])


# ------------------------------------------------------------------------------------- 6. hooks on every exit path

class Exploding:
    """An observer whose hook (at ``layer``, after the techniques) fails on its ``when``-th call."""

    def __init__(self, layer, when=4):
        self.layer, self.when, self.calls = layer, when, 0

    def hooks(self, model):
        def hook(x, hook):
            self.calls += 1
            if self.calls == self.when:
                raise RuntimeError("boom")
            return x

        return [(model.hook_name(self.layer), hook)]

    def on_step(self, info: StepInfo):
        pass


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_hooks_are_removed_when_generation_with_techniques_raises(organism, reuse_cache):
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 3)
    clean_gens, clean = clean_norms(model, prompts, [layer, layer + 1], 10)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.3)
    edits = build_edits(("alrr", "erss"), model, fixed={layer: tau}, alrr=ALRRConfig(layers=(layer,)),
                        erss=ERSSConfig(layers=(layer,), low_k=1, p_inject=1.0, cooldown=0, cos_min=0.0))
    assert active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, prompts, SamplingConfig(max_new_tokens=10), observers=[*edits, Exploding(layer)],
                 reuse_cache=reuse_cache)
    assert report_sums(edits[0])["alrr_extra_passes"] > 0  # the techniques were running when it failed
    assert active_hook_count(model) == 0
    again_gens, again = clean_norms(model, prompts, [layer, layer + 1], 10)
    assert [g.generated_ids for g in again_gens] == [g.generated_ids for g in clean_gens]
    assert by_key(again).equals(by_key(clean))


# ---------------------------------------------------------------------------------------------------- 7. bad input

BAD_INPUT = [
    (lambda m: parse_techniques("foo"), r"unknown decode-time technique 'foo'.*alrr, erss"),
    (lambda m: parse_techniques("lrs"), r"'lrs'.*tellnorm evaluate"),
    (lambda m: parse_techniques("alrr+alrr"), r"names one technique twice"),
    (lambda m: parse_techniques("alrr+"), r"unknown decode-time technique ''"),
    (lambda m: ALRRConfig(blowup_ratio=1.0), r"blowup_ratio must be a finite number > 1"),
    (lambda m: ALRRConfig(blowup_ratio=float("inf")), r"blowup_ratio"),
    (lambda m: ALRRConfig(growth_eps=-0.1), r"growth_eps must be a finite number ≥ 0"),
    (lambda m: ALRRConfig(growth_eps=float("nan")), r"growth_eps"),
    (lambda m: ALRRConfig(max_extra_iters=0), r"max_extra_iters must be a whole number ≥ 1"),
    (lambda m: ALRRConfig(max_extra_iters=1.5), r"max_extra_iters"),
    (lambda m: ALRRConfig(forced_loops=0), r"forced_loops must be a whole number ≥ 1"),
    (lambda m: ALRRConfig(forced_loops=True), r"forced_loops"),
    (lambda m: ERSSConfig(low_k=0), r"low_k must be a whole number ≥ 1"),
    (lambda m: ERSSConfig(bank_k=2.0), r"bank_k"),
    (lambda m: ERSSConfig(cooldown=-1), r"cooldown must be a whole number ≥ 0"),
    (lambda m: ERSSConfig(p_inject=1.5), r"p_inject must be a finite number in \[0, 1\]"),
    (lambda m: ERSSConfig(cos_min=2.0), r"cos_min"),
    (lambda m: ERSSConfig(beta=float("nan")), r"beta"),
    (lambda m: ERSSConfig(gamma=0), r"gamma"),
    (lambda m: LRSConfig(statistic="E"), r"unknown LRS statistic 'E'.*A, B, C, D"),
    (lambda m: LRSConfig(layers="early"), r"unknown LRS layer set 'early'"),
    (lambda m: LRSConfig(late_frac=0), r"late_frac must be in \(0, 1\]"),
    (lambda m: LRSConfig(late_frac=1.5), r"late_frac"),
    (lambda m: lrs.response_statistics([1.0, 2.0], float("nan")), r"finite threshold"),
    (lambda m: threshold_for("fixed", fixed={6: float("nan")}), r"threshold for layer 6 is nan.*finite and > 0"),
    (lambda m: threshold_for("fixed", fixed={6: -1.0}), r"threshold for layer 6.*finite and > 0"),
    (lambda m: threshold_for("fixed"), r"'fixed' needs per-layer thresholds"),
    (lambda m: threshold_for("median"), r"unknown threshold mode 'median'"),
    (lambda m: ALRR(m, threshold_for("fixed", fixed={99: 1.0}), ALRRConfig(layers=(99,))),
     r"layer 99 is out of range.*0\.\.7"),
    (lambda m: ERSS(m, threshold_for("fixed", fixed={-1: 1.0}), ERSSConfig(layers=(-1,))),
     r"layer keys must be whole numbers >= 0"),
    (lambda m: ALRR(m, threshold_for("fixed", fixed={5: 1.0}), ALRRConfig(layers=(6,))),
     r"no value for layer\(s\) \[6\]"),
    (lambda m: ALRR(m, threshold_for("fixed", fixed={6: 1.0}), ALRRConfig(layers=())), r"at least one layer"),
    (lambda m: ERSS(m, threshold_for("fixed", fixed={6: 1.0}), ERSSConfig(layers=(6, 6))), r"names a layer twice"),
    (lambda m: ALRR(m, 100.0), r"needs an AboveThreshold"),
    (lambda m: ERSS(m, {6: 100.0}), r"needs an AboveThreshold"),
    (lambda m: extra_block_pass(m, 6, torch.zeros(1, m.d_model), torch.tensor([0]), torch.tensor([0]), None),
     r"needs the KV cache"),
]


def test_parse_techniques_normalises_names_and_order():
    assert parse_techniques("ERSS + alrr") == ("alrr", "erss")  # applied in this order at a shared layer
    assert parse_techniques("erss") == ("erss",)


@pytest.mark.parametrize("make, message", BAD_INPUT)
def test_bad_technique_input_is_one_clear_error(organism, make, message):
    with pytest.raises(TellnormError, match=message):
        make(organism)


def test_threshold_for_accepts_numpy_scalars_like_fixed_thresholds():
    selection = threshold_for("fixed", fixed={6: np.float32(120.5)})
    assert selection.fixed.values == {6: 120.5}


# -------------------------------------------------------------------------------------------- 8. firing_report

def test_firing_report_sums_the_per_layer_reports_and_lists_idle_requests(organism):
    model = organism
    prompts = prompts_for(model, "organism", 3, seed=3)
    layers = [5, ORGANISM_LAYER]
    _, clean = clean_norms(model, prompts, layers, 16)
    taus = {layer: tau_between(generated_norms(clean, prompts, layer), 0.6) for layer in layers}
    alrr = ALRR(model, threshold_for("fixed", fixed=taus), ALRRConfig(layers=(ORGANISM_LAYER,), growth_eps=0.0,
                                                                      blowup_ratio=3.0), requests=[0, 2])
    erss = ERSS(model, threshold_for("fixed", fixed=taus), ERSSConfig(layers=tuple(layers), low_k=2, p_inject=1.0,
                                                                      cooldown=1, cos_min=0.0))
    generate(model, prompts, SamplingConfig(max_new_tokens=16), observers=[alrr, erss])
    request_ids = [0, 1, 2, "ghost"]
    report = firing_report([alrr, erss], request_ids)
    assert list(report.request_id) == request_ids
    counters = [c for edit in (alrr, erss) for c in edit.report().columns if c not in ("request_id", "layer")]
    assert list(report.columns) == ["request_id"] + counters
    for edit in (alrr, erss):
        per_layer = edit.report()
        for rid in request_ids:
            for column in per_layer.columns[2:]:
                want = sum(int(row[column]) for _, row in per_layer.iterrows() if row.request_id == rid)
                assert int(report.loc[report.request_id == rid, column].iloc[0]) == want
    assert report.loc[report.request_id == 1, list(alrr.report().columns[2:])].eq(0).all(axis=None)  # never ALRR'd
    assert report.loc[report.request_id == "ghost", counters].eq(0).all(axis=None)
    assert report.alrr_extra_passes.sum() > 0 and report.erss_injections.sum() > 0
    assert len(erss.report()) == len(layers) * len(prompts)


# --------------------------------------------------------------------------------------------- 9. reproducibility

def test_alrr_erss_runs_are_bit_reproducible(organism):
    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 3, seed=7)
    sampling = SamplingConfig.paper(max_new_tokens=16, seed=11)
    _, clean = clean_norms(model, prompts, [layer], 16)
    tau = tau_between(generated_norms(clean, prompts, layer), 0.5)

    def run():
        edits = build_edits(("alrr", "erss"), model, fixed={layer: tau},
                            alrr=ALRRConfig(layers=(layer,), growth_eps=0.0, blowup_ratio=3.0),
                            erss=ERSSConfig(layers=(layer,), low_k=2, p_inject=0.5, cooldown=1, cos_min=0.0))
        tracer = NormTracer(model, [layer, layer + 1])
        gens = generate(model, prompts, sampling, observers=[*edits, tracer], batch_size=2)
        return gens, [e.report() for e in edits], firing_report(edits, range(len(prompts))), tracer.frame()

    a, b = run(), run()
    assert a[2].alrr_kept_passes.sum() > 0 and a[2].erss_injections.sum() > 0
    assert [g.generated_ids for g in a[0]] == [g.generated_ids for g in b[0]]
    for ra, rb in zip(a[1], b[1]):
        pd.testing.assert_frame_equal(ra, rb)
    pd.testing.assert_frame_equal(a[2], b[2])
    pd.testing.assert_frame_equal(a[3], b[3], check_exact=True)


def test_finished_requests_let_go_of_their_working_state_and_nothing_else_changes(organism, monkeypatch):
    """When a request finishes, its exact-mode τ tracker, its recorded τ and ERSS's bank go; a run that keeps them
    (release switched off) makes the same tokens, decisions and reports."""
    import tellnorm.backends.hf as hf

    model, layer = organism, ORGANISM_LAYER
    prompts = prompts_for(model, "organism", 4, seed=5)

    def run():
        edits = build_edits(("alrr", "erss"), model, threshold_mode="exact",
                            threshold_cfg=ThresholdConfig(k=0.5, warmup=3),
                            alrr=ALRRConfig(layers=(layer,), growth_eps=0.0, blowup_ratio=3.0),
                            erss=ERSSConfig(layers=(layer,), low_k=2, p_inject=1.0, cooldown=0, cos_min=0.0))
        gens = generate(model, prompts, SamplingConfig(max_new_tokens=24), observers=edits, batch_size=4)
        return gens, edits

    gens, edits = run()
    with monkeypatch.context() as patch:
        patch.setattr(hf, "release_finished", lambda observers, request_ids: None)
        kept_gens, kept_edits = run()
    assert [g.generated_ids for g in gens] == [g.generated_ids for g in kept_gens]
    for edit, kept in zip(edits, kept_edits):
        pd.testing.assert_frame_equal(edit.record.frame(), kept.record.frame())
        pd.testing.assert_frame_equal(edit.report(), kept.report())
        assert edit.threshold._trackers == {} and edit.threshold._taus == {}
        assert kept.threshold._trackers and kept.threshold._taus  # the reference did keep them
    erss = edits[1]
    assert erss.report().erss_injections.sum() > 0 and erss.report().erss_banked.sum() > 0
    assert all(state["bank"] == [] for state in erss._states.values())
    assert any(state["bank"] for state in kept_edits[1]._states.values())


def test_float64_left_padding_runs_on_sdpa_and_is_refused_under_eager_attention(load):
    """sdpa masks padding exactly in float64: a left-padded batch equals each request alone. Eager attention takes
    its softmax in float32, where a float64 padding mask turns NaN: refused up front there."""
    model = load("organism", "float64")
    prompts = prompts_for(model, "organism", 2)
    assert len({len(p) for p in prompts}) == 2 and model.info["attention"] == "sdpa"
    batched_norms = NormTracer(model)
    alone_norms = NormTracer(model)
    batch = generate(model, prompts, SamplingConfig(max_new_tokens=4), observers=[batched_norms])
    alone = generate(model, prompts, SamplingConfig(max_new_tokens=4), observers=[alone_norms], batch_size=1)
    assert [g.generated_ids for g in batch] == [g.generated_ids for g in alone]
    left, right = (t.frame().sort_values(["request_id", "position", "layer"]) for t in (batched_norms, alone_norms))
    assert left["norm"].to_numpy() == pytest.approx(right["norm"].to_numpy(), rel=1e-12, abs=0)
    eager = load_model("organism", dtype="float64", attn_implementation="eager")
    with pytest.raises(TellnormError, match="float64 model cannot run left-padded batches under eager attention"):
        generate(eager, prompts, SamplingConfig(max_new_tokens=2))
    gens = generate(eager, prompts, SamplingConfig(max_new_tokens=2), batch_size=1)  # one at a time works
    assert all(len(g.generated_ids) == 2 for g in gens)
