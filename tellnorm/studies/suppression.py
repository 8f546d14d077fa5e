"""``tellnorm intervene``: the paper's causal test (PAPER §4) and what a reviewer asks next, on the organism or on
any model with a task (:mod:`tellnorm.tasks`).

Suppression. After each layer l of a layer set, on generated tokens (thinking mode, greedy; the organism's test
split, or a task's problems), a *high-norm* token (``‖x‖₂ > τ_l``) is scaled, ``x' = c·x`` (c = 0.1 by default;
swept over 0.1, 0.25, 0.5 and amplified with c = 2), or clamped, ``x' = x·min(1, (τ_l/4)/‖x‖₂)``. The control
edits a *random* fraction of generated tokens the same way, the fraction matched to what the high-norm rule
actually edited in the same condition (per layer set, edit, factor and difficulty, or task group: edited /
generated token-layers), under several seeds. The same runs at early and middle layer sets (as many layers as the
late set) are the depth controls.

Thresholds. τ_l = Q3 + 1.5·max(IQR, 1e-3) (PAPER §5). Default mode ``calibrated``: fixed per-layer τ from the
pooled generated-token norms of clean thinking-mode responses to calibration prompts (the organism's *validation*
problems, never the test problems; with a task, a calibration task's prompts, else the task's own), written to
``thresholds.json``. Why not the paper code's per-request streaming threshold on the organism: it collects 500
decode steps before thresholding and the organism's responses are shorter (≤ ~200 tokens), so it would never fire.
``exact`` (per request, after ``threshold.warmup`` decode steps: the paper's rule on real models' long responses)
/ ``pooled-p2`` (with ``--warmup``) and ``fixed`` (``--thresholds FILE``) remain; ``interventions.json`` names the
mode and, with a task, the warm-up that ran. The τ/4 clamp runs only with a τ per layer (calibrated or fixed): its
random control needs one.

Measures, per condition and difficulty (or task group): accuracy with n and a bootstrap 95% CI over problems (and
``no_answer``, the share of responses without a parseable answer — ``answer : X`` on the organism, the task's
extractor otherwise: a broken format, not a wrong value); the absolute difference to the clean run with a *paired*
bootstrap CI (the same problems); the fraction of generated token-layers edited; and, on the organism only, Δ log
p, the change in the teacher-forced log-probability of the gold answer token after ``answer :`` when the *gold*
response is the context (the edit acts on the response tokens as in generation), a measure that does not depend on
the edited run's own (possibly broken) trace; and Δ log p of the trace, the mean change over all gold response
tokens. Random seeds are reported one by one and pooled (per problem, the mean over seeds).

With a task. Correctness is the task's (its extractor against the gold answer, or lm-eval's metric) on the decoded
response text. A task has no gold trace and no ``answer :`` format, so both Δ log p columns are NaN, and its
responses have no ground-truth step labels, so ``suppression_hits.csv`` is not written; ``interventions.json``
lists every measure skipped and why (``skipped``), as it does for steering and feature ablation where the model has
no thinking switch or no SAEs.

Note on depth: in pre-norm (RMSNorm) models, scaling the stream after layer L leaves layer L+1's attention keys
and values unchanged (RMSNorm(c·x) = RMSNorm(x), up to ε), so other tokens feel the edit only from layer L+2 on.
With the last quarter of an 8-layer model the late set is layer 6 alone: scaling there changes only the edited
token's own next-token prediction. Clamping keeps the direction too, so the same holds; steering and feature
ablation change the direction and reach other tokens from layer L+1 on.

Also: which tokens the high-norm rule hits (on the organism, share by ground-truth label; always the top tokens,
in the clean run and the edited ones); steering along the mean thinking − non-thinking direction ``v_l =
mean(x | thinking) − mean(x | non-thinking)`` over generated tokens of the calibration contrast corpus (both modes
of the calibration prompts), ``x' = x + s·v_l`` on generated tokens at the late layers for a sweep of s; and
ablating the top-K reasoning features (the paper's contrast, :mod:`tellnorm.features`) at the late layers vs random
features of matched activation mass.

Every problem of every condition is one request; all conditions share the batches, which the per-request edits
make safe (a request's edits and outputs do not depend on its batch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.errors import TellnormError
from tellnorm.features import DEFAULT_TOP_K
from tellnorm.interventions.selection import check_fraction
from tellnorm.organism import task
from tellnorm.organism import task as organism_task  # where a study argument named ``task`` hides the module
from tellnorm.organism.evaluate import EvalConfig
from tellnorm.studies.runners import Replica, Runner, Shard, as_runner, merge_dicts
from tellnorm.tasks import Task, TaskItem
from tellnorm.thresholds import MODES, ThresholdConfig

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pandas as pd
    import plotly.graph_objects as go
    import torch
    from sae_lens import SAE

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import Generation
    from tellnorm.interventions.edits import Edit, EditRecord
    from tellnorm.organism.task import Problem
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.thresholds import FixedThresholds

    # what a generation shard sends back: ({request_id: Generation}, {condition: [(edit name, record), ...]})
    _ShardOutcome = tuple[dict[str, Generation], dict[str, list[tuple[str, EditRecord]]]]

THRESHOLD_MODES = ("calibrated",) + MODES
EXTRA_COLUMNS = ("direction_norm", "n_features", "mass")  # per-condition numbers, averaged over pooled seeds
MASS_TOLERANCE = 0.02  # random feature sets match the top-K's activation mass to within 2%


@dataclass
class InterventionConfig:
    """Every option of ``tellnorm intervene``: the test problems (the organism's per difficulty, or a task's first
    ``n_problems``), the suppression factors, amplification, clamp and random-control seeds (PAPER.md §4), the
    threshold mode and k (PAPER.md §5), the steering scales and feature ablation, the generation budget and batch
    size, the bootstrap seed; validated on construction (one TellnormError line per bad option). Each field's
    comment says where its default comes from."""

    per_difficulty: int = 10  # TELLNORM: test problems per difficulty (keeps the default run to a few minutes)
    difficulties: tuple[int, ...] = tuple(range(task.MIN_DIFFICULTY, task.MAX_DIFFICULTY + 1))
    calibration_per_difficulty: int = 10  # TELLNORM: validation problems per difficulty for τ, direction, features
    n_problems: int | None = None  # TELLNORM: with a task, its first N problems (None: all); organism: unused
    n_calibration: int | None = None  # TELLNORM: with a task, the first N calibration prompts (None: all)
    factors: tuple[float, ...] = (0.1, 0.25, 0.5)  # PAPER §4: ×0.1 on high-norm tokens; "sweep the suppression ratio"
    amplify: tuple[float, ...] = (2.0,)  # ISSUE 9 §3: amplifying (c > 1) high-norm vs random states
    clamp_fraction: float | None = 0.25  # PAPER §4: the alternative, clamp the norm down to τ/4 (None: skip)
    control_factor: float = 0.1  # PAPER §4's factor, used at the early and middle layer sets
    random_seeds: tuple[int, ...] = (0, 1, 2)  # PAPER §4: "a random matched fraction of tokens (seeded)"; 3 seeds
    threshold_mode: str = "calibrated"  # TELLNORM: fixed τ from validation responses (module docstring)
    thresholds_file: str | None = None  # mode "fixed": a FixedThresholds JSON file
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)  # PAPER §5: k = 1.5, IQR floor, warm-up 500
    steering_scales: tuple[float, ...] = (-1.0, -0.5, -0.2, 0.2, 0.5, 1.0)  # TELLNORM: multiples of v_l (‖v_l‖ is
    #                                                   about half a late-layer norm on the organism, so |s| ≤ 1)
    feature_top_k: int = DEFAULT_TOP_K  # PAPER §2: top-K reasoning features [inferred: K ≈ 10–20]
    feature_seeds: tuple[int, ...] = (0, 1)  # TELLNORM: random matched feature sets
    steering: bool = True
    features: bool = True
    saes: str = "organism"  # any spec tellnorm.saes.load_saes takes; the organism's suite fits only the organism
    max_new_tokens: int = EvalConfig.max_new_tokens  # the organism evaluation's budget (PAPER's code: 2048 on real
    #                                                   models, which callers pass with a task)
    batch_size: int = 50  # TELLNORM: generation batch (requests of all conditions share batches)
    seed: int = 0  # bootstrap seed

    def __post_init__(self) -> None:
        from tellnorm.interventions.edits import check_factor

        for d in self.difficulties:
            task.check_difficulty(d)
        for name, value in (("per_difficulty", self.per_difficulty), ("batch_size", self.batch_size),
                            ("calibration_per_difficulty", self.calibration_per_difficulty),
                            ("max_new_tokens", self.max_new_tokens), ("feature_top_k", self.feature_top_k)):
            if not isinstance(value, int) or value < 1:
                raise TellnormError(f"{name} must be a whole number ≥ 1, got {value!r}")
        for name, value in (("n_problems", self.n_problems), ("n_calibration", self.n_calibration)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TellnormError(f"{name} must be a whole number ≥ 1 or None (all), got {value!r}")
        if not self.factors and not self.amplify:
            raise TellnormError("give at least one suppression factor or amplification")
        for c in self.factors + (self.control_factor,):
            check_factor(c, "suppression factor")
        for c in self.factors:
            if c >= 1:
                raise TellnormError(f"suppression factors must be below 1, got {c}: pass factors above 1 as amplify")
        for c in self.amplify:
            if check_factor(c, "amplification factor") <= 1:
                raise TellnormError(f"amplification factors must be above 1, got {c}")
        if self.clamp_fraction is not None:
            check_fraction(self.clamp_fraction, "clamp fraction of tau")
        if not self.random_seeds:
            raise TellnormError("give at least one random seed for the matched random control")
        for s in self.steering_scales:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s != 0):
                raise TellnormError(f"steering scales must be finite and non-zero, got {s!r}")
        if self.threshold_mode not in THRESHOLD_MODES:
            raise TellnormError(f"unknown threshold mode {self.threshold_mode!r}: choose one of "
                                f"{', '.join(THRESHOLD_MODES)}")
        if (self.threshold_mode == "fixed") != (self.thresholds_file is not None):
            raise TellnormError("threshold mode 'fixed' needs --thresholds FILE, and --thresholds needs mode 'fixed'")


def layer_sets(model: ModelAPI) -> dict[str, list[int]]:
    """The paper code's late layers (PAPER.md §1) and early/middle controls with as many layers (early starts after
    layer 0)."""
    late = model.late_layers()
    n = len(late)
    early = list(range(1, 1 + n)) if n + 1 <= late[0] else list(range(n))
    start = max((model.n_layers - n) // 2, 0)
    return {"early": early, "middle": list(range(start, start + n)), "late": late}


@dataclass
class Condition:
    """One way of running every test problem: its labels in the tables and how to build its edits."""

    name: str
    family: str  # "clean", "suppression", "steering", "features"
    layer_set: str = ""
    layers: tuple[int, ...] = ()
    selection: str = "none"  # "none", "high-norm", "random", "generated"
    edit: str = "none"  # "none", "scale", "clamp", "steer", "ablate"
    factor: float | None = None  # scale factor, clamp fraction of τ, or steering scale
    seed: int | None = None
    features: str = ""  # "top-K", "random-matched"
    build: Callable[[Condition, list[str], dict[str, float]], list[Edit]] | None = None  # -> the condition's edits
    matches: str | None = None  # random controls: the high-norm condition whose edited fraction they match
    extra: dict = field(default_factory=dict)  # more label columns (steering: vector norm; features: count, mass)

    def request_id(self, problem: int) -> str:
        """The request id of test problem number ``problem`` under this condition (``NAME#problem``)."""
        return f"{self.name}#{problem}"


@dataclass
class Context:
    """What the conditions need, computed once from the calibration corpus (the validation contrast corpus on the
    organism)."""

    model: ModelAPI | None  # None in the portable copy sent to shards (each puts its replica's model)
    cfg: InterventionConfig
    sets: dict[str, list[int]]  # layer set name ("early", "middle", "late") -> layers
    thresholds: FixedThresholds | None = None  # calibrated or from a file; None for adaptive modes
    # late layer -> thinking − non-thinking mean difference, float32 [d_model]
    direction: dict[int, torch.Tensor] = field(default_factory=dict)
    saes: Mapping[int, SAE] = field(default_factory=dict)
    feature_sets: dict[str, dict[int, list[int]]] = field(default_factory=dict)  # name -> {layer: [features]}
    feature_mass: dict[str, float] = field(default_factory=dict)  # name -> summed folded mean activation (thinking)


# ------------------------------------------------------------------------------------------------ calibration

class _Identity:
    """``encode`` = identity: :class:`~tellnorm.features.FeatureSumsObserver` then sums the residual stream itself."""

    def encode(self, x):
        return x


def calibrate_suppression(model: ModelAPI, cfg: InterventionConfig, sets: dict[str, list[int]], *,
                          progress: bool = True, corpus: ContrastCorpus | None = None,
                          runner: Runner | None = None, prompts: Sequence[str] | None = None) -> Context:
    """Thresholds (PAPER.md §5), steering direction and reasoning features (PAPER.md §2) from clean responses to
    calibration prompts: ``prompts`` (user texts, a task's), None: the organism's validation problems
    (``corpus``: their contrast corpus when already generated; else generated on ``runner``, None: here). With
    ``prompts``, both modes are generated only when steering or the features need the contrast, thinking mode alone
    when only τ is calibrated, and nothing when nothing needs it (τ fixed or streaming). The calibration pass itself
    runs here: its quantiles and means pool the whole corpus."""
    import numpy as np

    from tellnorm import features as F
    from tellnorm.generation import run_forward
    from tellnorm.norms import NormTracer
    from tellnorm.studies.corpus import contrast_corpus
    from tellnorm.thresholds import FixedThresholds, calibrated_thresholds

    ctx = Context(model, cfg, sets)
    if cfg.features:
        from tellnorm.saes import load_saes

        ctx.saes = load_saes(cfg.saes, model, layers=sets["late"])
    if cfg.threshold_mode == "fixed":
        ctx.thresholds = FixedThresholds.from_json(cfg.thresholds_file)
        missing = sorted({l for ls in sets.values() for l in ls} - set(ctx.thresholds.values))
        if missing:
            raise TellnormError(f"{cfg.thresholds_file} has no threshold for layer(s) {missing}")
    if corpus is None:
        if prompts is None or cfg.steering or cfg.features:
            corpus = contrast_corpus(model, cfg.calibration_per_difficulty, max_new_tokens=cfg.max_new_tokens,
                                     progress=progress, runner=runner,
                                     prompts=None if prompts is None else list(prompts))
        elif cfg.threshold_mode == "calibrated":
            corpus = _thinking_corpus(model, prompts, cfg, as_runner(runner, model))
        else:
            return ctx
    contrast = set(corpus.modes) == {"thinking", "non-thinking"}
    all_layers = sorted({l for ls in sets.values() for l in ls})
    tracer = NormTracer(model, all_layers)
    observers = [tracer]
    if contrast:
        masks = F.contrast_masks(corpus.sequences, corpus.n_prompt, corpus.modes)
        residual = F.FeatureSumsObserver(model, {l: _Identity() for l in sets["late"]}, masks)
        observers.append(residual)
    if cfg.features:
        if not contrast:
            raise TellnormError("the feature ablation needs calibration responses in both modes (the contrast)")
        feature_sums = F.FeatureSumsObserver(model, ctx.saes, masks, fold_decoder_norm=True)
        observers.append(feature_sums)
    run_forward(model, corpus.sequences, request_ids=list(range(len(corpus.sequences))), observers=observers,
                batch_size=cfg.batch_size)
    if cfg.threshold_mode == "calibrated":
        frame = tracer.frame()
        n_prompt = np.asarray(corpus.n_prompt)[frame.request_id.to_numpy(dtype=int)]
        thinking = np.asarray([m == "thinking" for m in corpus.modes])[frame.request_id.to_numpy(dtype=int)]
        pooled = frame[(frame.position.to_numpy() >= n_prompt) & thinking]
        if pooled.empty:
            raise TellnormError("the calibration responses have no generated tokens to calibrate thresholds on")
        ctx.thresholds = calibrated_thresholds({layer: g.norm.to_numpy() for layer, g in pooled.groupby("layer")},
                                               cfg.threshold)
    if contrast:
        for layer in sets["late"]:
            diff = residual.sums.mean(layer, "thinking") - residual.sums.mean(layer, "non-thinking")
            ctx.direction[layer] = diff.float()
    if cfg.features:
        table = F.contrast_table(feature_sums.sums, sets["late"])
        ctx.feature_sets, ctx.feature_mass = matched_feature_sets(table, cfg.feature_top_k, cfg.feature_seeds)
    return ctx


def _thinking_corpus(model: ModelAPI, prompts: Sequence[str], cfg: InterventionConfig,
                     runner: Runner) -> ContrastCorpus:
    """Greedy thinking-mode responses to ``prompts`` as a one-mode corpus: what τ needs when no contrast is asked
    for (or the model has no thinking switch to give one)."""
    from tellnorm.generation import SamplingConfig
    from tellnorm.studies.corpus import ContrastCorpus
    from tellnorm.studies.runners import generate_sharded

    encoded = [model.encode(model.chat_prompt(p, thinking=True)) for p in prompts]
    gens = generate_sharded(runner, encoded, SamplingConfig(max_new_tokens=cfg.max_new_tokens),
                            batch_size=cfg.batch_size)
    return ContrastCorpus([g.ids for g in gens], [len(g.prompt_ids) for g in gens], ["thinking"] * len(gens),
                          [[None] * len(g.ids) for g in gens])


def matched_feature_sets(table: pd.DataFrame, k: int,
                         seeds: Sequence[int]) -> tuple[dict[str, dict[int, list[int]]], dict[str, float]]:
    """Top-K features by Δ per layer, and per seed a random set of other features with the same activation mass:
    non-top features in a seeded random order, each kept when it brings the set's mass closer to the top-K's
    (mass = summed mean decoder-norm-folded activation on thinking tokens), until within 2%. Returns
    ({name: {layer: [features]}}, {name: mass}); the count may differ from K (the top features are the largest)."""
    import numpy as np

    sets = {"top-K": {}}
    sets.update({f"random-matched/{s}": {} for s in seeds})
    mass = {name: 0.0 for name in sets}
    for layer, g in table.groupby("layer"):
        top = g.nsmallest(k, "rank")
        target = float(top.mean_thinking.sum())
        sets["top-K"][int(layer)] = [int(f) for f in top.feature]
        mass["top-K"] += target
        pool = g[~g.feature.isin(top.feature) & (g.mean_thinking > 0)]
        features, masses = pool.feature.to_numpy(), pool.mean_thinking.to_numpy()
        for s in seeds:
            order = np.random.default_rng([s, int(layer)]).permutation(len(features))
            chosen, total = [], 0.0
            for i in order:
                if abs(total + masses[i] - target) < abs(total - target):
                    chosen.append(int(features[i]))
                    total += float(masses[i])
                if abs(total - target) <= MASS_TOLERANCE * target:
                    break
            sets[f"random-matched/{s}"][int(layer)] = sorted(chosen)
            mass[f"random-matched/{s}"] += total
    return sets, mass


# ------------------------------------------------------------------------------------------------- conditions

def _high_norm(ctx: Context):
    from tellnorm.interventions.selection import AboveThreshold

    if ctx.thresholds is not None:
        return AboveThreshold("fixed", fixed=ctx.thresholds)
    return AboveThreshold(ctx.cfg.threshold_mode, cfg=ctx.cfg.threshold)


def _suppression_edit(ctx: Context, cond: Condition, requests, selection):
    from tellnorm.interventions.edits import ClampNorm, Scale, tau_fraction

    if cond.edit == "scale":
        return Scale(ctx.model, cond.layers, cond.factor, selection=selection, requests=requests, name=cond.name)
    if ctx.thresholds is not None:
        target = {l: cond.factor * ctx.thresholds.values[l] for l in cond.layers}
    else:
        target = tau_fraction(selection, cond.factor)
    return ClampNorm(ctx.model, cond.layers, target, selection=selection, requests=requests, name=cond.name)


def build_conditions(ctx: Context) -> list[Condition]:
    """Every condition, clean first; random controls name the high-norm condition they match."""
    from tellnorm.interventions.edits import AddVector, SAEFeatureEdit, Scale
    from tellnorm.interventions.selection import Generated, RandomFraction

    cfg, sets = ctx.cfg, ctx.sets

    def probes(cond, requests, fractions):  # c = 1 changes nothing: records what τ hits in the clean run
        return [Scale(ctx.model, layers, 1.0, selection=_high_norm(ctx), requests=requests, name=f"clean/{name}")
                for name, layers in sets.items()]

    def high_norm(cond, requests, fractions):
        return [_suppression_edit(ctx, cond, requests, _high_norm(ctx))]

    def random_matched(cond, requests, fractions):
        chosen = {rid: f for rid, f in fractions.items() if f > 0}
        if not chosen:
            return []
        return [_suppression_edit(ctx, cond, chosen, RandomFraction(chosen, seed=cond.seed))]

    def steer(cond, requests, fractions):
        return [AddVector(ctx.model, cond.layers, ctx.direction, scale=cond.factor, selection=Generated(),
                          requests=requests, name=cond.name)]

    def ablate(cond, requests, fractions):
        return [SAEFeatureEdit(ctx.model, ctx.saes, ctx.feature_sets[cond.name.split("/", 1)[1]], value=0.0,
                               selection=Generated(), requests=requests, name=cond.name)]

    conds = [Condition("clean", "clean", build=probes)]
    suppressions = [("late", "scale", c) for c in sorted(cfg.factors + cfg.amplify)]
    if cfg.clamp_fraction is not None and ctx.thresholds is not None:  # the random control needs τ per layer
        suppressions.append(("late", "clamp", cfg.clamp_fraction))
    suppressions += [(name, "scale", cfg.control_factor) for name in ("early", "middle")]
    for set_name, edit, factor in suppressions:
        layers = tuple(sets[set_name])
        hn = Condition(f"{set_name}/high-norm/{edit}/{factor:g}", "suppression", set_name, layers, "high-norm", edit,
                       factor, build=high_norm)
        conds.append(hn)
        for s in cfg.random_seeds:
            conds.append(Condition(f"{set_name}/random/{edit}/{factor:g}/{s}", "suppression", set_name, layers,
                                   "random", edit, factor, seed=s, build=random_matched, matches=hn.name))
    if cfg.steering:
        norm = sum(float(ctx.direction[l].norm()) for l in sets["late"]) / len(sets["late"])
        for scale in cfg.steering_scales:
            conds.append(Condition(f"late/steer/{scale:g}", "steering", "late", tuple(sets["late"]), "generated",
                                   "steer", scale, build=steer, extra={"direction_norm": norm}))
    if cfg.features:
        for name in ctx.feature_sets:
            seed = int(name.split("/")[1]) if "/" in name else None
            extra = {"n_features": sum(len(f) for f in ctx.feature_sets[name].values()),
                     "mass": ctx.feature_mass[name]}
            conds.append(Condition(f"features/{name}", "features", "late", tuple(sets["late"]), "generated",
                                   "ablate", 0.0, seed=seed, features=name.split("/")[0], build=ablate, extra=extra))
    return conds


# ------------------------------------------------------------------------------------------------------- runs

@dataclass
class Outcome:
    """Per request of one run: the generation and the edits that acted on it."""

    generations: dict[str, Generation] = field(default_factory=dict)  # request_id -> Generation
    # condition name -> its edits (RecordedEdit when merged from shards)
    edits: dict[str, list[Edit | RecordedEdit]] = field(default_factory=dict)


def run_conditions(model: ModelAPI, conds: list[Condition], problems: Sequence[Problem | TaskItem],
                   prompts: Sequence[list[int]], cfg: InterventionConfig, fractions: dict[str, dict[str, float]],
                   *, progress: bool, desc: str, indices: Sequence[int] | None = None) -> Outcome:
    """Generate every problem under every condition in shared batches (``indices``: the problems' numbers in the
    request ids, default 0, 1, ...; a shard of the problems keeps their original numbers)."""
    from tellnorm.generation import SamplingConfig, generate

    outcome = Outcome()
    observers, all_prompts, rids = [], [], []
    indices = list(indices) if indices is not None else list(range(len(problems)))
    for cond in conds:
        ids = [cond.request_id(i) for i in indices]
        edits = cond.build(cond, ids, fractions.get(cond.name, {})) if cond.build else []
        outcome.edits[cond.name] = edits
        observers += edits
        all_prompts += prompts
        rids += ids
    gens = generate(model, all_prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens), request_ids=rids,
                    batch_size=cfg.batch_size, observers=observers, progress=progress, desc=desc)
    outcome.generations = {g.request_id: g for g in gens}
    return outcome


def answer_logprobs(model: ModelAPI, conds: list[Condition], problems: Sequence[Problem],
                    prompts: Sequence[list[int]], cfg: InterventionConfig, fractions: dict[str, dict[str, float]],
                    *, indices: Sequence[int] | None = None) -> dict[str, tuple[float, float]]:
    """Teacher-forced on prompt + gold response under each condition's edits: {request_id: (log p(gold answer |
    … "answer :"), mean log p of the response tokens)} (``indices`` as in :func:`run_conditions`)."""
    import torch

    from tellnorm.generation import run_forward

    responses = [model.tokenizer(task.response_text(p, thinking=True), add_special_tokens=False)["input_ids"]
                 for p in problems]
    tail = model.token_strings(responses[0][-3:]) if responses else []
    if responses and (tail[:2] != ["answer", ":"] or not tail[2].isdigit()):
        raise TellnormError(f"the gold response does not end with 'answer : X' (got {tail}): the log-probability "
                            "measure needs the organism's answer format")
    sequences, rids, n_prompt, observers = [], [], [], []
    indices = list(indices) if indices is not None else list(range(len(problems)))
    for cond in conds:
        ids = [cond.request_id(i) for i in indices]
        observers += cond.build(cond, ids, fractions.get(cond.name, {})) if cond.build else []
        sequences += [p + r for p, r in zip(prompts, responses)]
        n_prompt += [len(p) for p in prompts]
        rids += ids
    logits = run_forward(model, sequences, request_ids=rids, batch_size=cfg.batch_size, observers=observers,
                         return_logits=True, n_prompt=n_prompt)
    out = {}
    for rid, seq, k in zip(rids, sequences, n_prompt):
        logp = logits[rid][k - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(seq[k:])[:, None])[:, 0]
        out[rid] = (float(logp[-1]), float(logp.mean()))
    return out


SHARD_SAFE_INTERVENTION_MODES = ("calibrated", "fixed", "exact")  # τ fixed, or tracked per request


def check_intervention_shardable(cfg: InterventionConfig) -> None:
    """One TellnormError line, before any work, if ``cfg`` cannot be sharded exactly."""
    if cfg.threshold_mode not in SHARD_SAFE_INTERVENTION_MODES:
        raise TellnormError(f"threshold mode {cfg.threshold_mode!r} pools τ over the requests that share a batch, so "
                            "an edit would depend on its shard: with --ray use --threshold-mode calibrated, fixed or "
                            "exact")


@dataclass
class RecordedEdit:
    """An edit as the study's tables read it after a run: its name and its decision record."""

    name: str
    record: EditRecord


def _shard_context(replica: Replica, ctx: Context, saes) -> Context:
    """The driver's calibration context on the replica's model, with the SAEs of ``saes`` (loaded ones in process;
    a spec a worker loads once, late layers only)."""
    if not ctx.cfg.features:
        return replace(ctx, model=replica.model)
    from collections.abc import Mapping

    late = tuple(ctx.sets["late"])
    if not isinstance(saes, Mapping):
        from tellnorm.saes import load_saes

        spec = saes
        saes = replica.resource(("intervention-saes", str(spec), late),
                                lambda: load_saes(spec, replica.model, layers=list(late)))
    return replace(ctx, model=replica.model, saes=saes)


def _shard_conditions(ctx: Context, names: Sequence[str]) -> list[Condition]:
    by_name = {c.name: c for c in build_conditions(ctx)}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise TellnormError(f"conditions {missing} are not rebuilt on the worker from the calibration")
    return [by_name[n] for n in names]


def intervention_shard(replica: Replica, shard: Shard, items: list[tuple[Problem | TaskItem, list[int]]], *,
                       ctx: Context, saes: Any, names: Sequence[str], cfg: InterventionConfig,
                       fractions: dict[str, dict[str, float]], what: str = "generate", progress: bool = False,
                       desc: str = "") -> _ShardOutcome | dict[str, tuple[float, float]]:
    """One shard of the problems (``(problem, prompt ids)`` items, request ids numbered by their original index)
    under the conditions ``names``, rebuilt from the calibration ``ctx`` on the replica's model:
    ``generate``: ``(generations, {condition: [(edit name, record), ...]})``; ``logprobs``: the answer log-probs."""
    sctx = _shard_context(replica, ctx, saes)
    conds = _shard_conditions(sctx, names)
    problems, prompts = [p for p, _ in items], [ids for _, ids in items]
    if what == "logprobs":
        return answer_logprobs(sctx.model, conds, problems, prompts, cfg, fractions, indices=shard.indices)
    outcome = run_conditions(sctx.model, conds, problems, prompts, cfg, fractions, progress=progress, desc=desc,
                             indices=shard.indices)
    return outcome.generations, {name: [(e.name, e.record) for e in edits] for name, edits in outcome.edits.items()}


def merge_outcomes(results: Sequence[_ShardOutcome], shards: Sequence[Shard]) -> Outcome:
    """Shard outcomes as one: every generation, and per condition its edits' records merged (requests disjoint)."""
    from tellnorm.interventions.edits import EditRecord

    outcome = Outcome()
    for gens, _ in results:
        outcome.generations.update(gens)
    for name, edits in results[0][1].items():
        if len(results) == 1:
            outcome.edits[name] = [RecordedEdit(edit_name, record) for edit_name, record in edits]
            continue
        merged = []
        for j, (edit_name, _) in enumerate(edits):
            record = EditRecord(edit_name)
            for _, shard_edits in results:
                part = shard_edits[name][j][1]
                record.decisions.update(part.decisions)
                record.start.update(part.start)
                record.n_prompt.update(part.n_prompt)
            merged.append(RecordedEdit(edit_name, record))
        outcome.edits[name] = merged
    return outcome


def _on_runner(runner: Runner, ctx: Context, conds, problems, prompts, cfg, fractions, what: str, *,
               progress: bool = False, desc: str = ""):
    """:func:`run_conditions` (``what="generate"``) or :func:`answer_logprobs` (``"logprobs"``) on ``runner``,
    sharded by problem; each shard rebuilds the conditions from the calibration."""
    portable = replace(ctx, model=None, saes={})
    saes = runner.sae_source(ctx.saes, spec=cfg.saes) if cfg.features else None
    merge = merge_outcomes if what == "generate" else merge_dicts
    return runner.map(intervention_shard, list(zip(problems, [list(p) for p in prompts])), merge=merge,
                      ctx=portable, saes=saes, names=[c.name for c in conds], cfg=cfg, fractions=fractions,
                      what=what, progress=progress and runner.in_process, desc=desc)


def _edited_counts(edits) -> dict:
    """request_id -> edited generated token-layers."""
    counts: dict = {}
    for edit in edits:
        for row in edit.record.summary().itertuples():
            counts[row.request_id] = counts.get(row.request_id, 0) + int(row.n_edited_generated)
    return counts


def per_request_table(model: ModelAPI, conds: Sequence[Condition], problems: Sequence[Problem | TaskItem],
                      outcomes: list[Outcome], logps: dict[str, tuple[float, float]], *,
                      task: Task | None = None) -> pd.DataFrame:
    """One row per (condition, problem): correct, answer log-prob, response length, edited token-layers
    (``logps``: :func:`answer_logprobs`'s result). ``task``: ``problems`` are its items, scored by the task on the
    decoded response text (an ``id`` column beside ``problem``; ``difficulty`` holds the item's group); None: the
    organism's problems and answer parser."""
    import pandas as pd

    gens = {rid: g for o in outcomes for rid, g in o.generations.items()}
    edits = {name: e for o in outcomes for name, e in o.edits.items()}
    rows = []
    for cond in conds:
        counts = _edited_counts(edits.get(cond.name, [])) if cond.name != "clean" else {}
        for i, p in enumerate(problems):
            rid = cond.request_id(i)
            g = gens[rid]
            # generated tokens that went through the model (the last one never does), at each edited layer
            token_layers = max(len(g.generated_ids) - 1, 0) * len(cond.layers)
            if task is None:
                predicted = organism_task.parse_answer(model.token_strings(g.generated_ids))
                head = {"condition": cond.name, "problem": i, "difficulty": p.difficulty, "answer": p.answer,
                        "predicted": predicted, "correct": float(predicted == p.answer)}
            else:
                text = model.tokenizer.decode(g.generated_ids, skip_special_tokens=True)
                predicted = task.extract(text)
                head = {"condition": cond.name, "problem": i, "id": p.id, "difficulty": p.group, "answer": p.answer,
                        "predicted": predicted, "correct": float(task.is_correct(p, text))}
            rows.append({**head, "no_answer": float(predicted is None), "logp": logps[rid][0],
                         "logp_trace": logps[rid][1], "n_generated": len(g.generated_ids),
                         "n_edited": counts.get(rid, 0), "n_token_layers": token_layers})
    return pd.DataFrame(rows)


def problem_group(problem: Problem | TaskItem) -> int | str:
    """A problem's rows in the tables: the organism's difficulty, a task item's group."""
    return problem.group if isinstance(problem, TaskItem) else problem.difficulty


def matched_fractions(cond: Condition, per_request: pd.DataFrame,
                      problems: Sequence[Problem | TaskItem]) -> dict[str, float]:
    """{request_id of the random control: the high-norm rule's edited fraction at that problem's difficulty (a
    task's: its group)}."""
    hn = per_request[per_request.condition == cond.matches]
    by_difficulty = hn.groupby("difficulty")[["n_edited", "n_token_layers"]].sum()
    rate = (by_difficulty.n_edited / by_difficulty.n_token_layers.where(by_difficulty.n_token_layers > 0)).fillna(0)
    return {cond.request_id(i): float(min(rate.get(problem_group(p), 0.0), 1.0)) for i, p in enumerate(problems)}


# ----------------------------------------------------------------------------------------------------- tables

def _summary_row(group, clean, seed: int) -> dict:
    """n, accuracy + CI, paired difference to clean + CI, Δ log p + CI, edited fraction, mean length."""
    import numpy as np

    from tellnorm.stats import bootstrap_ci

    per_problem = group.groupby("problem").agg(correct=("correct", "mean"), logp=("logp", "mean"),
                                               logp_trace=("logp_trace", "mean"), n_generated=("n_generated", "mean"),
                                               no_answer=("no_answer", "mean"))
    base = clean.set_index("problem").loc[per_problem.index]
    acc = per_problem.correct.to_numpy()
    diff = acc - base.correct.to_numpy()
    dlogp = per_problem.logp.to_numpy() - base.logp.to_numpy()
    dtrace = per_problem.logp_trace.to_numpy() - base.logp_trace.to_numpy()
    lo, hi = bootstrap_ci(acc, seed=seed)
    dlo, dhi = bootstrap_ci(diff, seed=seed)
    llo, lhi = bootstrap_ci(dlogp, seed=seed)
    tlo, thi = bootstrap_ci(dtrace, seed=seed)
    token_layers = group.n_token_layers.sum()
    return {"n": len(acc), "accuracy": acc.mean(), "ci_low": lo, "ci_high": hi, "diff_vs_clean": diff.mean(),
            "diff_ci_low": dlo, "diff_ci_high": dhi,
            "fraction_edited": group.n_edited.sum() / token_layers if token_layers else np.nan,
            "delta_logp": dlogp.mean(), "delta_logp_ci_low": llo, "delta_logp_ci_high": lhi,
            "delta_logp_trace": dtrace.mean(), "delta_logp_trace_ci_low": tlo, "delta_logp_trace_ci_high": thi,
            "no_answer": per_problem.no_answer.mean(), "mean_generated": per_problem.n_generated.mean()}


def summarise(conds: list[Condition], per_request: pd.DataFrame, cfg: InterventionConfig,
              families: tuple[str, ...], groups: Sequence[int | str] | None = None) -> pd.DataFrame:
    """Rows per condition of ``families`` (random seeds also pooled) × difficulty (``groups``, default
    ``cfg.difficulties``: a task's groups) and "all": accuracy with its bootstrap CI, the paired difference to the
    clean run, Δ log p and the edited fraction (module docstring)."""
    import pandas as pd

    clean = per_request[per_request.condition == "clean"]
    rows_by_label: list[tuple[dict, object]] = []
    pooled: dict = {}
    for cond in conds:
        if cond.family not in families:
            continue
        label = {"layer_set": cond.layer_set or "none", "layers": " ".join(map(str, cond.layers)),
                 "selection": cond.selection, "edit": cond.edit, "factor": cond.factor,
                 "seed": "" if cond.seed is None else str(cond.seed), "features": cond.features, **cond.extra}
        rows = per_request[per_request.condition == cond.name]
        rows_by_label.append((label, rows))
        if cond.seed is not None:  # seeds pooled: per problem, the mean over seeds; extras averaged
            key = (cond.family, cond.layer_set, cond.edit, cond.factor, cond.features)
            pooled.setdefault(key, ([], []))
            pooled[key][0].append(label)
            pooled[key][1].append(rows)
    for labels, parts in pooled.values():
        extras = [k for k in labels[0] if k in EXTRA_COLUMNS]
        label = dict(labels[0], seed="pooled", **{k: sum(l[k] for l in labels) / len(labels) for k in extras})
        rows_by_label.append((label, pd.concat(parts)))
    out, groups = [], list(cfg.difficulties if groups is None else groups)
    for label, rows in rows_by_label:
        for difficulty in groups + ["all"]:
            sub = rows if difficulty == "all" else rows[rows.difficulty == difficulty]
            base = clean if difficulty == "all" else clean[clean.difficulty == difficulty]
            out.append({**label, "difficulty": difficulty, **_summary_row(sub, base, cfg.seed)})
    table = pd.DataFrame(out)
    if "features" not in families:
        table = table.drop(columns="features")
    return table


def hits_tables(model: ModelAPI, conds: list[Condition],
                outcomes: list[Outcome]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What the high-norm rule hits: share by ground-truth label, and the most edited tokens, per condition
    (clean = the probes of the clean run, factor 1); returns ``(by_label, top_tokens)``."""
    import pandas as pd

    from tellnorm.interventions.edits import edited_tokens

    gens = {rid: g for o in outcomes for rid, g in o.generations.items()}
    edits = {name: e for o in outcomes for name, e in o.edits.items()}
    jobs = [(e.name.split("/")[1], "clean", 1.0, e) for e in edits.get("clean", [])]
    jobs += [(c.layer_set, c.edit, c.factor, e) for c in conds if c.selection == "high-norm" for e in edits[c.name]]
    by_label, top = [], []
    for layer_set, edit_kind, factor, edit in jobs:
        rids = sorted(edit.record.requests())
        table = edited_tokens(model, [edit], [gens[r] for r in rids])
        table = table[table.is_generated]
        if table.empty:
            continue
        table = table.assign(label=table.label.fillna("unlabelled"))
        labels = table.groupby("label").agg(n_tokens=("edited", "size"), n_edited=("edited", "sum")).reset_index()
        labels["hit_rate"] = labels.n_edited / labels.n_tokens
        labels["share_of_edited"] = labels.n_edited / max(int(labels.n_edited.sum()), 1)
        labels["share_of_tokens"] = labels.n_tokens / labels.n_tokens.sum()
        by_label.append(labels.assign(layer_set=layer_set, edit=edit_kind, factor=factor))
        tokens = table.groupby("token").agg(n_tokens=("edited", "size"), n_edited=("edited", "sum"),
                                            label=("label", lambda s: s.mode().iloc[0])).reset_index()
        tokens["hit_rate"] = tokens.n_edited / tokens.n_tokens
        tokens = tokens[tokens.n_edited > 0].sort_values(["n_edited", "token"], ascending=[False, True]).head(10)
        top.append(tokens.assign(layer_set=layer_set, edit=edit_kind, factor=factor))
    front = ["layer_set", "edit", "factor"]
    by_label = pd.concat(by_label, ignore_index=True) if by_label else pd.DataFrame(columns=front)
    top = pd.concat(top, ignore_index=True) if top else pd.DataFrame(columns=front)
    by_label = by_label[front + [c for c in by_label.columns if c not in front]]
    top = top[front + [c for c in top.columns if c not in front]]
    return by_label, top


# ----------------------------------------------------------------------------------------------------- figures

def suppression_figure(table: pd.DataFrame, sets: dict[str, list[int]], control_factor: float, *,
                       subject: str = "organism test split") -> go.Figure:
    """The suppression test (PAPER.md §4) from :func:`summarise`'s table. Left: late layers, accuracy vs factor,
    high-norm vs random (seeds pooled), 95% CIs, clean as a band. Right: the paper's factor at the early, middle
    and late layer sets, and the τ/4 clamp at the late layers. ``subject``: the problems, for the title."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR, NON_THINKING_COLOR, THINKING_COLOR, style

    t = table[(table.difficulty.astype(str) == "all") & (table.seed.isin(["", "pooled"]))]
    clean = t[t.selection == "none"].iloc[0]
    colors = {"high-norm": THINKING_COLOR, "random": NEUTRAL_COLOR}
    names = {"high-norm": "high-norm tokens (norm > τ)", "random": "random tokens, matched fraction"}
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.09,
                        subplot_titles=(f"Late layers ({' '.join(map(str, sets['late']))}): x' = c·x",
                                        f"Layer sets at c = {control_factor:g}, and clamping"))

    def errors(g):
        return {"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                "arrayminus": g.accuracy - g.ci_low}

    order = {"early": 0, "middle": 1, "late": 2}
    panel = t[((t.edit == "scale") & (t.factor == control_factor)) | (t.edit == "clamp")]
    panel = panel.assign(o=panel.layer_set.map(order) + 3 * (panel.edit == "clamp")).sort_values("o")
    category = {(r.layer_set, r.edit): f"{r.layer_set} ({r.layers})" + ("<br>clamp to τ/4" if r.edit == "clamp" else "")
                + f"<br>{r.fraction_edited:.1%} edited" for r in panel[panel.selection == "high-norm"].itertuples()}
    for selection in ("high-norm", "random"):
        rows = t[(t.selection == selection) & (t.layer_set == "late") & (t.edit == "scale")].sort_values("factor")
        fig.add_trace(go.Scatter(x=rows.factor, y=rows.accuracy, mode="lines+markers", name=names[selection],
                                 legendgroup=selection, line={"color": colors[selection]}, error_y=errors(rows),
                                 customdata=rows[["n", "fraction_edited"]].to_numpy(),
                                 hovertemplate="c=%{x}: %{y:.3f} (n=%{customdata[0]}, edited "
                                               "%{customdata[1]:.3f})<extra></extra>"), row=1, col=1)
        bars = panel[panel.selection == selection]
        x = [category[(r.layer_set, r.edit)] for r in bars.itertuples()]
        fig.add_trace(go.Bar(x=x, y=bars.accuracy, name=names[selection], legendgroup=selection, showlegend=False,
                             marker_color=colors[selection], error_y=errors(bars)), row=1, col=2)
    for col in (1, 2):
        fig.add_hrect(y0=clean.ci_low, y1=clean.ci_high, fillcolor=NON_THINKING_COLOR, opacity=0.12, line_width=0,
                      layer="below", row=1, col=col)
        fig.add_hline(y=clean.accuracy, line={"color": NON_THINKING_COLOR, "dash": "dash"}, row=1, col=col)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"clean, n={int(clean.n)} (band: 95% CI)",
                             line={"color": NON_THINKING_COLOR, "dash": "dash"}), row=1, col=1)
    factors = sorted(set(t[(t.edit == "scale") & (t.layer_set == "late")].factor))
    fig.update_xaxes(type="log", title_text="factor c (log scale; c > 1 amplifies)", tickvals=factors,
                     ticktext=[f"{c:g}" for c in factors], row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="accuracy (95% bootstrap CI)", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    fig.update_layout(barmode="group")
    style(fig, title=f"Suppressing high-norm vs random generated tokens ({subject}, thinking mode)",
          width=1080, height=500)
    return fig.update_layout(margin={"b": 95})  # room for three-line category labels


def extras_figure(steering: pd.DataFrame | None, features: pd.DataFrame | None) -> go.Figure:
    """Steering accuracy vs scale; ablating the top-K reasoning features vs random features of matched mass
    (:func:`summarise`'s tables of the two families; None or empty: that panel stays empty)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR, NON_THINKING_COLOR, THINKING_COLOR, style

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("Steering: x' = x + s·(mean thinking − mean non-thinking)",
                                        "Ablating reasoning features (error term kept)"))
    for frame, col in ((steering, 1), (features, 2)):
        if frame is None or frame.empty:
            continue
        t = frame[(frame.difficulty.astype(str) == "all") & frame.seed.isin(["", "pooled"])]
        errors = {"type": "data", "symmetric": False, "array": t.ci_high - t.accuracy,
                  "arrayminus": t.accuracy - t.ci_low}
        if col == 1:
            t = t.sort_values("factor")
            fig.add_trace(go.Scatter(x=t.factor, y=t.accuracy, mode="lines+markers", showlegend=False,
                                     line={"color": THINKING_COLOR}, error_y=errors), row=1, col=1)
        else:
            labels = [f"top {n:.0f} by Δ" if f == "top-K" else f"random, same mass<br>(~{n:.0f} features, seeds pooled)"
                      for f, n in zip(t.features, t.n_features)]
            fig.add_trace(go.Bar(x=labels, y=t.accuracy, showlegend=False, error_y=errors,
                                 marker_color=[THINKING_COLOR if f == "top-K" else NEUTRAL_COLOR for f in t.features]),
                          row=1, col=2)
        clean = float((t.accuracy - t.diff_vs_clean).iloc[0])
        fig.add_hline(y=clean, line={"color": NON_THINKING_COLOR, "dash": "dash"}, row=1, col=col,
                      annotation_text="clean", annotation_position="bottom right")
    fig.update_xaxes(title_text="scale s", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="accuracy (95% bootstrap CI)", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    return style(fig, title="What a reviewer asks next: steering and reasoning-feature ablation (late layers)",
                 width=1000)


# ------------------------------------------------------------------------------------------------------- main

@dataclass
class StudyInputs:
    """What one run of the study works on, all checked before any generation: the problems (the organism's, or a
    task's items), their thinking-mode chat prompts, the table's groups, the calibration prompts, the config as it
    runs (steering / features off where skipped) and every measure skipped with its reason."""

    problems: list[Problem | TaskItem]
    prompts: list[list[int]]
    groups: list[int | str]  # the difficulty column's rows besides "all"
    cfg: InterventionConfig
    task: Task | None = None
    calibration: Task | None = None  # its prompts calibrate τ, the direction and the features; None: the organism's
    skipped: dict[str, str] = field(default_factory=dict)  # measure -> why it is not in the tables


def organism_inputs(model: ModelAPI, cfg: InterventionConfig) -> StudyInputs:
    """The organism's test problems of ``cfg.difficulties`` (``cfg.per_difficulty`` each); any other model is one
    TellnormError line saying to pass a task."""
    from tellnorm.organism.evaluate import problem_prompts

    if getattr(model, "source", "") != "organism":
        raise TellnormError(f"the suppression study needs a task for {model.name}: pass task= (tellnorm.tasks."
                            "load_task) or --task FILE.jsonl[=EXTRACTOR] / lm-eval:NAME (without one it runs the "
                            "organism's test problems, which only the organism answers)")
    problems = [p for p in organism_task.test_split(cfg.per_difficulty).problems if p.difficulty in cfg.difficulties]
    return StudyInputs(problems, problem_prompts(model, problems, "thinking"), list(cfg.difficulties), cfg)


def _chat_ids(model: ModelAPI, task: Task, thinking: bool) -> list[list[int]]:
    """Chat-prompt ids of every item of ``task``; a prompt that leaves no room to generate is one error line."""
    out = []
    for item in task.items:
        try:
            ids = model.encode(model.chat_prompt(item.prompt, thinking=thinking))
        except TellnormError as exc:  # which problem: the backend's message cannot say
            raise TellnormError(f"problem {item.id!r} of {task.name}: {exc}") from None
        if len(ids) >= model.max_positions:  # equal leaves no position to generate into
            raise TellnormError(f"problem {item.id!r} of {task.name} has a {len(ids)}-token prompt, over "
                                f"{model.name}'s context of {model.max_positions}: drop or shorten it")
        out.append(ids)
    return out


def load_calibration(spec: str) -> Task:
    """Calibration prompts by spec: ``lm-eval:NAME[=EXTRACTOR]`` (that task's prompts) or a JSONL of ``{"prompt"}``
    lines, answers optional (they are never used). A bad file is one TellnormError line."""
    from tellnorm.tasks import LM_EVAL_PREFIX, load_task, read_task_rows

    source = spec.partition("=")[0]
    if source.startswith(LM_EVAL_PREFIX):
        return load_task(spec)
    rows = read_task_rows(source, need_answers=False)
    items = [TaskItem(str(row.get("id", i)), row["prompt"], str(row.get("answer", "")), str(row.get("group", "all")))
             for i, row in enumerate(rows)]
    return Task(Path(source).stem, items, source=source)


def task_inputs(model: ModelAPI, cfg: InterventionConfig, task: Task, calibration: Task | None = None) -> StudyInputs:
    """A task's first ``cfg.n_problems`` items on ``model`` (thinking-mode prompts, rows by the items' groups) and
    the calibration prompts (``calibration``'s, else the task's own; first ``cfg.n_calibration``): every prompt
    checked against the context, and what cannot run on this model or task skipped with the reason."""
    from tellnorm.thinking import switch_for

    if not task.items:
        raise TellnormError(f"task {task.name} has no problems")
    task = task.head(cfg.n_problems)
    groups = task.groups
    if len(groups) > 1 and "all" in groups:
        raise TellnormError(f'task {task.name} gives some problems a "group" and not others ("all", the name of '
                            "the overall rows): give every problem a group, or none")
    prompts = _chat_ids(model, task, thinking=True)
    skipped = {
        "delta_logp": "organism only: the log-probability of the gold answer token after 'answer :' needs the "
                      f"organism's answer format; {task.name} has none",
        "delta_logp_trace": f"organism only: it teacher-forces the gold response, and {task.name} has no gold "
                            "response (only answers)",
        "hits_by_label": f"organism only: ground-truth step labels exist for the organism's responses, not for "
                         f"{task.name}'s (suppression_hits.csv not written; suppression_top_tokens.csv is)",
    }
    steering, features = cfg.steering, cfg.features
    switch = switch_for(model)
    no_switch = (f"{model.name} has no thinking switch ({switch.display or switch.family or 'none found'}): the "
                 "thinking − non-thinking contrast needs both modes from one model")
    if not steering:
        skipped["steering"] = "turned off (steering=False)"
    elif not switch.has_switch:
        skipped["steering"], steering = no_switch, False
    if not features:
        skipped["features"] = "turned off (features=False)"
    elif not switch.has_switch:
        skipped["features"], features = no_switch, False
    elif cfg.saes == "organism" and getattr(model, "source", "") != "organism":
        skipped["features"], features = (f"no SAEs for {model.name}: the organism's suite fits only the organism; "
                                         "pass saes=SPEC (--saes) with SAEs of its late layers"), False
    if cfg.clamp_fraction is not None and cfg.threshold_mode not in ("calibrated", "fixed"):
        skipped["clamp"] = (f"threshold mode {cfg.threshold_mode} sets τ per request as it streams; the τ/4 clamp's "
                            "random control needs one τ per layer (calibrated or fixed)")
    calibration = (calibration or task).head(cfg.n_calibration)
    if not calibration.items:
        raise TellnormError(f"calibration task {calibration.name} has no prompts")
    run_cfg = replace(cfg, steering=steering, features=features)
    if steering or features or cfg.threshold_mode == "calibrated":  # what calibrate_suppression will generate
        _chat_ids(model, calibration, thinking=True)
        if steering or features:
            _chat_ids(model, calibration, thinking=False)
    return StudyInputs(task.items, prompts, [] if groups == ["all"] else groups, run_cfg, task, calibration, skipped)


THRESHOLD_RULES = {
    "calibrated": "one τ per layer, Q3 + k·max(IQR, floor) of the pooled generated-token norms of clean thinking-mode "
                  "calibration responses",
    "fixed": "one τ per layer from a thresholds file",
    "exact": "per request, Q3 + k·max(IQR, floor) of that request's earlier generated-token norms, after the warm-up",
    "pooled-p2": "the paper code's P² streaming quartiles of the per-step batch-mean norm, pooled over requests, "
                 "after the warm-up",
}


def run_intervene(model: ModelAPI, cfg: InterventionConfig, out: Path, *, task: Task | None = None,
                  calibration: Task | None = None, progress: bool = True,
                  runner: Runner | None = None) -> dict[str, Any]:
    """The whole study: calibration, both generation phases, log-probs, tables and figures in ``out``.

    ``task``: the problems (:class:`tellnorm.tasks.Task`, its first ``cfg.n_problems``) on any model tellnorm
    loads, scored by the task; None: the organism's test problems (the organism only; another model is one error
    line). ``calibration``: the task whose prompts calibrate τ, the steering direction and the feature contrast
    (answers unused; None: the task's own prompts, first ``cfg.n_calibration``). Bad input (no problems, a prompt
    over the context, SAEs that do not fit) fails before any generation.

    ``runner``: where the per-problem work runs (None: here, on ``model``; a Ray pool shards the calibration
    corpus, both generation phases and the log-probs by problem, ``cfg`` checked up front by
    :func:`check_intervention_shardable`). Each shard rebuilds the conditions and their edits from the calibration;
    request ids, random selections and per-request τ are keyed by the problem's original index, so answers and edit
    decisions do not depend on the sharding. What needs the whole run stays here: the calibration pass (pooled τ
    quantiles, the steering direction, the feature contrast) and the matched fractions between the phases."""
    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv, write_json

    if task is None and calibration is not None:
        raise TellnormError("a calibration task needs a task: the organism calibrates on its validation problems")
    inputs = organism_inputs(model, cfg) if task is None else task_inputs(model, cfg, task, calibration)
    run_cfg, problems, prompts = inputs.cfg, inputs.problems, inputs.prompts
    out = Path(out)
    started = time.perf_counter()
    sets = layer_sets(model)
    runner = as_runner(runner, model)
    if not runner.in_process:
        check_intervention_shardable(run_cfg)  # before any work
    calibration_prompts = None if task is None else [item.prompt for item in inputs.calibration.items]
    ctx = calibrate_suppression(model, run_cfg, sets, progress=progress, runner=runner, prompts=calibration_prompts)
    conds = build_conditions(ctx)
    first = [c for c in conds if c.matches is None]
    second = [c for c in conds if c.matches is not None]
    phase1 = _on_runner(runner, ctx, first, problems, prompts, run_cfg, {}, "generate", progress=progress,
                        desc="interventions (1/2)")
    partial = per_request_table(model, first, problems, [phase1], _zero_logps(first, problems), task=task)
    fractions = {c.name: matched_fractions(c, partial, problems) for c in second}
    phase2 = _on_runner(runner, ctx, second, problems, prompts, run_cfg, fractions, "generate", progress=progress,
                        desc="random controls (2/2)")
    if task is None:
        logps = _on_runner(runner, ctx, conds, problems, prompts, run_cfg, fractions, "logprobs")
    else:  # no gold response to teacher-force (inputs.skipped says so)
        logps = _zero_logps(conds, problems)
    per_request = per_request_table(model, conds, problems, [phase1, phase2], logps, task=task)
    suppression = summarise(conds, per_request, run_cfg, ("clean", "suppression"), inputs.groups)
    hits, top = hits_tables(model, conds, [phase1, phase2])
    written = [write_csv(suppression, out / "suppression.csv")]
    if task is None:
        written.append(write_csv(hits, out / "suppression_hits.csv"))
    else:  # every token would be "unlabelled": no ground truth for a task's responses
        hits, top = None, top.drop(columns="label", errors="ignore")
    written += [write_csv(top, out / "suppression_top_tokens.csv"), write_csv(per_request, out / "per_problem.csv")]
    subject = "organism test split" if task is None else task.name
    written += write_figure(suppression_figure(suppression, sets, cfg.control_factor, subject=subject),
                            out / "suppression")
    steering = summarise(conds, per_request, run_cfg, ("steering",), inputs.groups) if run_cfg.steering else None
    features = summarise(conds, per_request, run_cfg, ("features",), inputs.groups) if run_cfg.features else None
    if steering is not None:
        written.append(write_csv(steering, out / "steering.csv"))
    if features is not None:
        written.append(write_csv(features, out / "feature_ablation.csv"))
    if steering is not None or features is not None:
        written += write_figure(extras_figure(steering, features), out / "steering_features")
    if ctx.thresholds is not None:
        ctx.thresholds.to_json(out / "thresholds.json")
        written.append(out / "thresholds.json")
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    if task is None:  # task-only options: the organism's interventions.json stays as it was
        config.pop("n_problems")
        config.pop("n_calibration")
    meta = {"config": config, "layer_sets": sets, "threshold_mode": cfg.threshold_mode,
            "thresholds": ctx.thresholds.to_dict()["layers"] if ctx.thresholds is not None else None,
            "steering_direction_norm": {str(l): float(v.norm()) for l, v in ctx.direction.items()},
            "feature_sets": {name: {str(l): f for l, f in s.items()} for name, s in ctx.feature_sets.items()},
            "feature_mass": ctx.feature_mass, "n_problems": len(problems), "n_conditions": len(conds)}
    if task is not None:
        streaming = cfg.threshold_mode in ("exact", "pooled-p2")
        meta.update({
            "threshold_rule": THRESHOLD_RULES[cfg.threshold_mode], "threshold_k": cfg.threshold.k,
            "threshold_warmup": cfg.threshold.warmup_steps if streaming else None,  # decode steps before τ exists
            "max_new_tokens": cfg.max_new_tokens,
            "task": {"name": task.name, "source": task.source, "extractor": task.extractor,
                     "n_problems": len(problems), "groups": inputs.groups or ["all"]},
            "calibration": {"name": inputs.calibration.name, "source": inputs.calibration.source,
                            "n_prompts": len(inputs.calibration.items),
                            "own_prompts": calibration is None},
            "skipped": inputs.skipped})
    written.append(write_json(meta, out / "interventions.json"))
    seconds = time.perf_counter() - started
    return {"suppression": suppression, "hits": hits, "top_tokens": top, "steering": steering,
            "features": features, "per_request": per_request, "meta": meta, "written": written, "seconds": seconds}


def _zero_logps(conds, problems) -> dict:
    return {c.request_id(i): (float("nan"), float("nan")) for c in conds for i in range(len(problems))}


def format_suppression(table: pd.DataFrame) -> str:
    """The all-difficulty rows (random seeds pooled) as a compact text table for the terminal."""
    t = table[(table.difficulty.astype(str) == "all") & table.seed.isin(["", "pooled"])]
    lines = [f"{'layers':<12}{'selection':<11}{'edit':<7}{'c':>6}{'n':>5}{'acc':>7}  {'95% CI':<16}"
             f"{'Δ vs clean':>10}  {'paired 95% CI':<17}{'edited':>7}{'Δlogp ans':>10}{'Δlogp trace':>12}"]
    for r in t.itertuples():
        factor = "" if r.factor != r.factor else f"{r.factor:g}"
        lines.append(f"{(r.layer_set + ' ' + r.layers).strip():<12}{r.selection:<11}{r.edit:<7}{factor:>6}{r.n:>5}"
                     f"{r.accuracy:>7.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}]{r.diff_vs_clean:>+10.3f}  "
                     f"[{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]{r.fraction_edited:>7.3f}{r.delta_logp:>+10.4f}"
                     f"{r.delta_logp_trace:>+12.4f}")
    return "\n".join(lines)
