"""``tellnorm evaluate``: the test-time techniques against compute-matched baselines (PAPER §6–7).

One harness over a task (the organism's test set by default, or any :mod:`tellnorm.tasks` task: a JSONL of prompts
and answers, or an lm-eval task scored by lm-eval's own metric):

* single-pass decoding, greedy: the base, ALRR, ERSS, ALRR+ERSS, and recursion controls with ALRR's own number of
  extra passes per response — at random tokens of ALRR's layers, at one fixed middle layer, at random layers —
  so "does the norm gate matter?" is answered at equal compute;
* N sampled responses per problem (the paper's sampling), from which every selector picks one answer at the same
  N: a random pick, majority vote, DeepConf confidences (best-of-N, weighted and filtered votes), self-certainty
  best-of-N, and LRS with its ablations; plus N samples under ALRR and ERSS for the ALRR+LRS / ERSS+LRS
  combinations, and pass@N as an upper bound.

Every accuracy comes with n, the sampling seed and a bootstrap 95% CI over problems; differences are absolute
points with paired bootstrap CIs; compute columns count generated tokens, block passes (layers × tokens, plus
every extra pass) and wall time. Firing statistics are reported per response.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tellnorm import tasks as task_specs
from tellnorm.errors import TellnormError
from tellnorm.generation import SamplingConfig
from tellnorm.organism import task as organism_task
from tellnorm.studies.runners import InProcess, Replica, Runner, Shard, as_runner, concat_frames
from tellnorm.techniques import THRESHOLD_MODES, ALRRConfig, ERSSConfig, parse_techniques
from tellnorm.techniques.confidence import ConfidenceConfig
from tellnorm.techniques.lrs import LRSConfig
from tellnorm.thresholds import ThresholdConfig

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from tellnorm.backends.base import ModelAPI
    from tellnorm.generation import Generation
    from tellnorm.interventions.edits import Edit
    from tellnorm.thresholds import FixedThresholds

EXTRACTORS = ("organism", "last-number", "boxed")
LRS_VARIANTS = tuple(LRSConfig(statistic=s, per_token=p, layers=layers)
                     for layers in ("late", "middle") for s in ("D", "A", "B", "C") for p in (False, True))
CONTROL_NAMES = ("recursion/random-tokens", "recursion/fixed-layer", "recursion/random-layer")
SHARD_SAFE_THRESHOLD_MODES = ("calibrated", "fixed")  # τ frozen before decoding: a response is independent of others


@dataclass
class EvaluateConfig:
    """Every option of ``tellnorm evaluate``: the task, the techniques and controls (PAPER §6), N and the sampling
    seed, the threshold mode and k (PAPER §5), the sensitivity sweeps; validated on construction (one
    TellnormError line per bad option)."""

    task: str = "organism"  # "organism", FILE.jsonl of {"prompt", "answer"[, "group", "id"]}, or lm-eval:NAME
    per_difficulty: int = 20  # TELLNORM: organism test problems per difficulty (200 in all)
    difficulties: tuple[int, ...] = tuple(range(organism_task.MIN_DIFFICULTY, organism_task.MAX_DIFFICULTY + 1))
    extractor: str = "organism"  # answer extractor: organism, or one of tellnorm.tasks (last-number, boxed, ...)
    thinking: bool = True  # JSONL prompts: the chat template's thinking switch
    calibration: str | None = None  # JSONL of calibration prompts (default: the task's own prompts, answers unused)
    calibration_per_difficulty: int = 10  # TELLNORM: organism validation problems for τ
    techniques: tuple[str, ...] = ("alrr", "erss", "alrr+erss")  # PAPER §6 and its one helpful combination
    controls: bool = True  # ISSUE 10: recursion at random tokens / a fixed layer / random layers, ALRR's passes
    n_samples: int = 8  # PAPER §6: N was not recovered [inferred: 4–8]
    sample_sizes: tuple[int, ...] = (4, 8, 16)  # ISSUE 10 §3: the N sweep (the largest is what gets sampled)
    sampled_techniques: tuple[str, ...] = ("alrr", "erss")  # N samples under each, for ALRR+LRS and ERSS+LRS
    sampling_seed: int = 0  # every sample's seed derives from this and its request id
    threshold_mode: str = "calibrated"  # TELLNORM: one τ per layer from calibration responses (techniques doc)
    thresholds_file: str | None = None  # mode "fixed": a JSON of per-layer τ
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)  # PAPER §5: k = 1.5, IQR floor 1e-3
    alrr: ALRRConfig = field(default_factory=ALRRConfig)  # PAPER §6 constants
    erss: ERSSConfig = field(default_factory=ERSSConfig)  # PAPER §6 constants
    confidence: ConfidenceConfig | None = None  # None: DeepConf's windows scaled to the responses' length
    sensitivity: bool = True  # ISSUE 10 §3: k, a global τ, ALRR loops, ERSS streak, LRS scorers, N
    max_new_tokens: int = organism_task.RESPONSE_BUDGET
    batch_size: int = 100
    seed: int = 0  # bootstrap seed

    def __post_init__(self) -> None:
        for d in self.difficulties:
            organism_task.check_difficulty(d)
        for name in ("per_difficulty", "calibration_per_difficulty", "n_samples", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TellnormError(f"{name.replace('_', '-')} must be a whole number ≥ 1, got {value!r}")
        for spec in self.techniques + self.sampled_techniques:
            parse_techniques(spec)
        if self.n_samples < 2:
            raise TellnormError(f"selecting among samples (LRS, majority, confidence) needs N ≥ 2, got "
                                f"--n-samples {self.n_samples}")
        if any(not isinstance(n, int) or n < 2 for n in self.sample_sizes):
            raise TellnormError(f"every N in the sample-size sweep must be ≥ 2, got {self.sample_sizes}")
        self.sample_sizes = tuple(sorted(set(self.sample_sizes) | {self.n_samples}))
        if self.threshold_mode not in THRESHOLD_MODES:
            raise TellnormError(f"unknown threshold mode {self.threshold_mode!r}: choose one of "
                                f"{', '.join(THRESHOLD_MODES)}")
        if (self.threshold_mode == "fixed") != (self.thresholds_file is not None):
            raise TellnormError("threshold mode 'fixed' needs --thresholds FILE, and --thresholds needs mode 'fixed'")
        check_extractor(self.extractor)
        if self.task != "organism":
            if self.extractor == "organism":
                self.extractor = "last-number"
            if not self.task.startswith(task_specs.LM_EVAL_PREFIX):
                path = Path(self.task)
                if path.suffix != ".jsonl" or not path.is_file():
                    raise TellnormError(f"--task {self.task}: give 'organism', an existing .jsonl file of "
                                        '{"prompt": ..., "answer": ...} lines, or lm-eval:NAME')

    @property
    def max_samples(self) -> int:
        """The largest N of the sample-size sweep: how many responses per item get sampled."""
        return max(self.sample_sizes)


# ------------------------------------------------------------------------------------------------------ tasks

@dataclass
class EvalItem:
    """One problem: its id, chat-prompt token ids, gold answer and group (a row of the accuracy table)."""

    id: str
    prompt_ids: list[int]
    answer: str
    group: str  # the accuracy table's rows: the organism's difficulty, or a JSONL's "group"


@dataclass
class EvalTask:
    """The problems to evaluate, how to read an answer off a generation, and the prompts τ is calibrated on."""

    name: str
    items: list[EvalItem]
    extract: Callable[[ModelAPI, Generation], str | None]  # (model, Generation) -> answer string or None
    calibration_prompts: list[list[int]]
    group_title: str = "difficulty"
    # (model, Generation, item index) -> correct; None: the extracted answer against the gold one
    score: Callable[[ModelAPI, Generation, int], bool] | None = None
    matches: Callable[[str | None, str], bool] | None = None  # (answer, gold) -> equal; None: answers_match

    def is_correct(self, model: ModelAPI, gen: Generation, index: int, answer: str | None) -> bool:
        """Whether generation ``gen`` of item ``index`` (its extracted ``answer``) is correct."""
        if self.score is not None:
            return self.score(model, gen, index)
        return (self.matches or answers_match)(answer, self.items[index].answer)


def check_extractor(spec: str) -> None:
    """Raise one TellnormError line unless ``spec`` is ``organism`` or an extractor of :mod:`tellnorm.tasks`."""
    if spec != "organism":
        task_specs.check_extractor(spec)


def text_extractor(spec: str) -> Callable[[str], str | None]:
    """Answer extraction from a response's text by a :mod:`tellnorm.tasks` extractor."""
    task_specs.check_extractor(spec)

    def extract(text: str) -> str | None:
        found = task_specs.find_answer(text, spec)
        return None if found is None else found[0]

    return extract


def answers_match(predicted: str | None, gold: str) -> bool:
    """Equal as numbers when both parse as numbers, else as stripped strings (:func:`tellnorm.tasks.answers_match`)."""
    return task_specs.answers_match(predicted, gold)


def organism_eval_task(model: ModelAPI, cfg: EvaluateConfig) -> EvalTask:
    """The organism's test problems of ``cfg.difficulties`` (thinking-mode prompts, grouped by difficulty), its
    answer parser, and validation problems as calibration prompts."""
    from tellnorm.organism.evaluate import problem_prompts

    problems = [p for p in organism_task.test_split(cfg.per_difficulty).problems if p.difficulty in cfg.difficulties]
    prompts = problem_prompts(model, problems, "thinking")
    items = [EvalItem(f"test/{i}", ids, str(p.answer), str(p.difficulty))
             for i, (p, ids) in enumerate(zip(problems, prompts))]
    calibration = problem_prompts(model, organism_task.validation_split(cfg.calibration_per_difficulty).problems,
                                  "thinking")

    def extract(model, gen):
        value = organism_task.parse_answer(model.token_strings(gen.generated_ids))
        return None if value is None else str(value)

    return EvalTask("organism test set (thinking mode)", items, extract, calibration)


def read_jsonl(path: str | Path, *, need_answers: bool = True) -> list[dict[str, Any]]:
    """The rows of a JSONL task file (:func:`tellnorm.tasks.read_task_rows`)."""
    return task_specs.read_task_rows(path, need_answers=need_answers)


def spec_eval_task(model: ModelAPI, cfg: EvaluateConfig, task: task_specs.Task | None = None) -> EvalTask:
    """A :mod:`tellnorm.tasks` task (``task``, else the one ``cfg.task`` names with ``cfg.extractor``): chat prompts
    (thinking switch ``cfg.thinking``), gold answers, groups and ids; its scorer (lm-eval's metric) or its extractor;
    calibration prompts from ``cfg.calibration`` or the task's own prompts."""
    task = task or task_specs.load_task(cfg.task, cfg.extractor)

    def encode(text):
        ids = model.encode(model.chat_prompt(text, thinking=cfg.thinking))
        if len(ids) >= model.max_positions:
            raise TellnormError(f"a prompt of {task.name} has {len(ids)} tokens, over {model.name}'s context of "
                                f"{model.max_positions}")
        return ids

    items = [EvalItem(item.id, encode(item.prompt), item.answer, item.group) for item in task.items]
    calibration = ([encode(r["prompt"]) for r in read_jsonl(cfg.calibration, need_answers=False)]
                   if cfg.calibration else [item.prompt_ids for item in items])

    def response_text(model, gen):
        return model.tokenizer.decode(gen.generated_ids, skip_special_tokens=True)

    def extract(model, gen):
        return task.extract(response_text(model, gen))

    score = None
    if task.scorer is not None:
        def score(model, gen, index):
            return task.is_correct(task.items[index], response_text(model, gen))

    def matches(answer, gold):
        return task_specs.answers_match(answer, gold, task.extractor)

    return EvalTask(task.name, items, extract, calibration, group_title="group", score=score, matches=matches)


def load_task(model: ModelAPI, cfg: EvaluateConfig, task: task_specs.Task | None = None) -> EvalTask:
    """The organism's test set when ``cfg.task`` is "organism" (and no ``task`` is given), else the task named."""
    if task is None and cfg.task == "organism":
        return organism_eval_task(model, cfg)
    return spec_eval_task(model, cfg, task)


# ------------------------------------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One decoding of every item (``n_samples`` times): its responses with answers and firing counts."""

    name: str
    n_samples: int
    greedy: bool
    responses: pd.DataFrame  # item, sample, request_id, answer, correct, n_generated, firing counters
    wall_s: float
    norms: pd.DataFrame | None = None  # generated-token norms (request_id, layer, position, norm) when traced
    token_stats: dict[str, dict] = field(default_factory=dict)  # request_id -> {stat: array}


@dataclass
class Setup:
    """What every decoding of one evaluation shares: the model, options, task, τ (PAPER §5), calibration norms, the
    late and middle layers, and where decoding runs."""

    model: ModelAPI | None  # None in the portable copy decode() sends to shards (each puts its replica's model)
    cfg: EvaluateConfig
    task: EvalTask
    thresholds: FixedThresholds | None  # the file's, or calibrated (then also LRS's τ in the adaptive modes)
    calibration: dict[int, np.ndarray]  # layer -> norms [tokens] (recalibrating with another k); empty if "fixed"
    late: list[int]
    middle: list[int]
    runner: Runner | None = None  # where decode() runs (e.g. a Ray pool); None: in this process, on ``model``


def middle_layers(model: ModelAPI, late: list[int]) -> list[int]:
    """As many layers as ``late``, centred in the stack (the paper's "middle layers" ablation, PAPER §6 LRS)."""
    n = len(late)
    start = max((model.n_layers - n) // 2, 0)
    return list(range(start, start + n))


def setup(model: ModelAPI, cfg: EvaluateConfig, *, progress: bool = True,
          task: task_specs.Task | None = None) -> Setup:
    """Validate every option against the model, then calibrate τ = Q3 + k·IQR per layer (PAPER §5) on the task's
    calibration prompts (before any evaluation generation), or read it from ``cfg.thresholds_file``. ``task``: a
    loaded :class:`tellnorm.tasks.Task` to evaluate instead of the one ``cfg.task`` names."""
    from tellnorm.techniques import calibrated_thresholds, calibration_norms, check_thresholds
    from tellnorm.thresholds import FixedThresholds

    for c in (cfg.alrr, cfg.erss):
        for layer in c.layers or ():
            model.hook_name(layer)  # one clear line for a layer out of range
    task = load_task(model, cfg, task)
    late = model.late_layers()
    middle = middle_layers(model, late)
    calibration, thresholds = {}, None
    if cfg.threshold_mode == "fixed":
        thresholds = FixedThresholds.from_json(cfg.thresholds_file)
        check_thresholds(thresholds.values, sorted(set(late) | set(middle) | set(cfg.alrr.layers or ())
                                                   | set(cfg.erss.layers or ())))
    else:  # calibrated τ also serves LRS (a score after generation) when the techniques track τ themselves
        calibration = calibration_norms(model, task.calibration_prompts, list(range(model.n_layers)),
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                        progress=progress)
        thresholds = calibrated_thresholds(calibration, cfg.threshold)
    return Setup(model, cfg, task, thresholds, calibration, late, middle)


def check_evaluation_shardable(cfg: EvaluateConfig) -> None:
    """One TellnormError line, before any work, if ``cfg`` cannot be sharded exactly (τ must be frozen before
    decoding when techniques or their controls run)."""
    uses_edits = bool(cfg.techniques or cfg.sampled_techniques or cfg.sensitivity)  # controls follow techniques
    if uses_edits and cfg.threshold_mode not in SHARD_SAFE_THRESHOLD_MODES:
        raise TellnormError(f"threshold mode {cfg.threshold_mode!r} tracks τ over the run's own tokens, so a "
                            "response would depend on its shard: with --ray use --threshold-mode calibrated or fixed")


def decode(st: Setup, name: str, *, techniques: tuple[str, ...] = (), n_samples: int = 1,
           edits: Callable | None = None, trace: bool = False, thresholds: FixedThresholds | None = None,
           alrr: ALRRConfig | None = None, erss: ERSSConfig | None = None, progress: bool = True,
           item_indices: Sequence[int] | None = None) -> Run:
    """Decode every item ``n_samples`` times (greedy when 1, else the paper's sampling) with the techniques'
    edits (or ``edits(request_ids)`` → list of edits), tracing norms after the edits when ``trace``.

    ``item_indices``: only these items (ids and rows keep the items' own indices). The items are decoded on
    ``st.runner`` (None: here), sharded by item: a response does not depend on its shard as long as τ is frozen
    before decoding (threshold modes calibrated and fixed; the others are refused on a Ray pool). Edits with a
    recipe (:func:`control_edits`) are rebuilt by each shard; other ``edits`` run here."""
    runner = st.runner if st.runner is not None else InProcess(st.model)
    control = getattr(edits, "control", None)
    if edits is not None and control is None and not runner.in_process:
        runner = InProcess(st.model)  # a plain callable of edits cannot travel to the workers
    if not runner.in_process and (techniques or edits is not None):
        check_evaluation_shardable(st.cfg)
    chosen = list(range(len(st.task.items))) if item_indices is None else list(item_indices)
    portable = replace(st, model=None, runner=None, calibration={}, task=replace(st.task, calibration_prompts=[]))
    return runner.map(decode_shard, chosen, merge=merge_runs, st=portable, name=name,
                      edits=edits if control is None else None, control=control, techniques=techniques,
                      n_samples=n_samples, trace=trace, thresholds=thresholds, alrr=alrr, erss=erss,
                      progress=progress and runner.in_process)


def decode_shard(replica: Replica, shard: Shard, chosen: list[int], *, st: Setup, name: str,
                 edits: Callable | None = None, control: tuple | None = None, **options: Any) -> Run:
    """:func:`decode` of one shard's items on the replica's model (a control's edits rebuilt from its recipe)."""
    st = replace(st, model=replica.model)
    if control is not None:
        edits = control_edits(st, control[1], control[0])
    return _decode_items(st, name, chosen, edits=edits, **options)


def merge_runs(results: Sequence[Run], shards: Sequence[Shard]) -> Run:
    """Shard runs as one: responses in item/sample order, norms per request, token statistics joined, the wall
    time of the slowest shard (one shard's run is returned as is)."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    responses = concat_frames([r.responses for r in results], sort_by=("item", "sample"))
    for column in responses.columns[responses.dtypes.eq(object)]:  # e.g. a shard whose answers were all None
        responses[column] = responses[column].infer_objects()
    norms = None
    if first.norms is not None:
        norms = concat_frames([r.norms for r in results])
        order = {rid: i for i, rid in enumerate(responses.request_id)}
        norms = (norms.assign(_order=norms.request_id.map(order)).sort_values(["_order", "layer", "position"],
                                                                               kind="stable")
                 .drop(columns="_order").reset_index(drop=True))
    stats = {rid: value for r in results for rid, value in r.token_stats.items()}
    return Run(first.name, first.n_samples, first.greedy, responses, max(r.wall_s for r in results), norms, stats)


def _decode_items(st: Setup, name: str, chosen: list[int], *, techniques: tuple[str, ...] = (), n_samples: int = 1,
                  edits: Callable | None = None, trace: bool = False, thresholds: FixedThresholds | None = None,
                  alrr: ALRRConfig | None = None, erss: ERSSConfig | None = None, progress: bool = True) -> Run:
    """The items ``chosen`` decoded on ``st.model`` (what :func:`decode` runs on every shard)."""
    import pandas as pd

    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer, generated_rows
    from tellnorm.techniques import build_edits, firing_report

    cfg, model, items = st.cfg, st.model, st.task.items
    request_ids = [f"{i}#{s}" for i in chosen for s in range(n_samples)]
    prompts = [items[i].prompt_ids for i in chosen for _ in range(n_samples)]
    if edits is not None:
        observers = edits(request_ids)
    else:
        observers = build_edits(techniques, model, threshold_mode=cfg.threshold_mode,
                                fixed=thresholds if thresholds is not None else st.thresholds,
                                threshold_cfg=cfg.threshold, alrr=alrr or cfg.alrr, erss=erss or cfg.erss)
    tracer = NormTracer(model, sorted(set(st.late) | set(st.middle))) if trace else None
    sampling = (SamplingConfig(max_new_tokens=cfg.max_new_tokens) if n_samples == 1
                else SamplingConfig.paper(max_new_tokens=cfg.max_new_tokens, seed=cfg.sampling_seed))
    start = time.perf_counter()
    gens = generate(model, prompts, sampling, request_ids=request_ids, batch_size=cfg.batch_size,
                    observers=list(observers) + ([tracer] if tracer else []), progress=progress, desc=name,
                    token_stats=n_samples > 1)
    wall = time.perf_counter() - start
    answers = [st.task.extract(model, g) for g in gens]
    responses = pd.DataFrame({
        "request_id": request_ids,
        "item": [i for i in chosen for _ in range(n_samples)],
        "sample": [s for _ in chosen for s in range(n_samples)],
        "answer": answers,
        "correct": [st.task.is_correct(model, g, int(r.split("#")[0]), a)
                    for g, a, r in zip(gens, answers, request_ids)],
        "n_generated": [len(g.generated_ids) for g in gens],
    })
    responses = responses.merge(firing_report(observers, request_ids), on="request_id", how="left")
    norms = None
    if tracer is not None:
        norms = generated_rows(tracer.frame(), gens)
    stats = {g.request_id: g.meta for g in gens} if n_samples > 1 else {}
    return Run(name, n_samples, n_samples == 1, responses, wall, norms, stats)


def extra_passes(responses: pd.DataFrame) -> np.ndarray:
    """ALRR's extra block passes per response, shape [len(responses)] (column ``alrr_extra_passes``; zeros when the
    run had no ALRR, PAPER §6)."""
    column = "alrr_extra_passes"
    return responses[column].to_numpy() if column in responses else np.zeros(len(responses), dtype=int)


def control_edits(st: Setup, alrr_run: Run, kind: str) -> Callable[[Sequence[str]], list[Edit]]:
    """Recursion at random tokens with ALRR's extra passes per response: ``kind`` = random-tokens (ALRR's layers),
    fixed-layer (the middle of the stack) or random-layer (every layer equally likely). The keep rule is ALRR's."""
    from tellnorm.interventions.selection import RandomFraction
    from tellnorm.techniques import ALRR, threshold_for

    cfg = st.cfg
    alrr_layers = list(cfg.alrr.layers or st.late)
    layers = {"random-tokens": alrr_layers, "fixed-layer": [st.model.n_layers // 2],
              "random-layer": list(range(st.model.n_layers))}[kind]
    r = alrr_run.responses
    # Expected passes match ALRR's per response: p per token and layer, p·n_generated·|layers| = ALRR's passes
    # (exact for one extra pass per token, ALRR's default).
    rate = extra_passes(r) / (np.maximum(r.n_generated.to_numpy(), 1) * len(layers))
    per_request = {rid: float(min(p, 1.0)) for rid, p in zip(r.request_id, rate)}

    def build(request_ids):
        threshold = threshold_for(cfg.threshold_mode, fixed=st.thresholds, cfg=cfg.threshold)
        selection = RandomFraction({rid: per_request.get(rid, 0.0) for rid in request_ids}, seed=cfg.seed)
        return [ALRR(st.model, threshold, replace(cfg.alrr, layers=tuple(layers)), selection=selection)]

    build.control = (kind, alrr_run)  # lets a sharded decoder rebuild these edits on its workers
    return build


# ------------------------------------------------------------------------------------------- methods per item

def _per_item(st: Setup, run: Run, *, samples: int | None = None):
    """The first ``samples`` responses of each item (all when None), in sample order."""
    r = run.responses
    if samples is not None:
        r = r[r["sample"] < samples]
    return r.sort_values(["item", "sample"])


def _compute(st: Setup, run: Run, r, n_used: int):
    """Per item: generated tokens, block passes (layers × (prompt + generated) + extra) and wall time of the
    responses in ``r`` (``n_used`` per item)."""
    prompt = np.array([len(st.task.items[i].prompt_ids) for i in r.item])
    g = r.assign(passes=st.model.n_layers * (prompt + r.n_generated.to_numpy()) + extra_passes(r))
    agg = g.groupby("item").agg(generated_tokens=("n_generated", "sum"), block_passes=("passes", "sum"))
    agg["extra_block_passes"] = g.assign(e=extra_passes(g)).groupby("item").e.sum()
    agg["wall_s"] = run.wall_s / len(st.task.items) * n_used / run.n_samples
    return agg


def single_pass_method(st: Setup, run: Run, method: str, family: str) -> pd.DataFrame:
    """Per item (one row each): the correctness of a single-pass run's one response and its compute, labelled with
    ``method``, ``family`` and the item's group."""
    r = _per_item(st, run)
    out = _compute(st, run, r, 1)
    out["correct"] = r.groupby("item").correct.first().astype(float)
    return _label(st, out, method, family, 1, "greedy")


def _label(st: Setup, per_item, method: str, family: str, n_samples: int, seeds: str, **extra):
    per_item = per_item.reset_index()
    per_item["group"] = [st.task.items[i].group for i in per_item.item]
    return per_item.assign(method=method, family=family, n_samples=n_samples, seeds=seeds, **extra)


def sampled_methods(st: Setup, run: Run, n: int, *, prefix: str = "", family: str = "selection",
                    selectors: tuple[str, ...] | None = None,
                    lrs_variants: Sequence[LRSConfig] = LRS_VARIANTS) -> pd.DataFrame:
    """Every selector at N = ``n`` over the first n samples of each item (the same responses for all): one per-item
    frame of the mean sample, pass@n, the confidence selectors and the LRS variants (PAPER §6 LRS)."""
    import pandas as pd

    from tellnorm.techniques import confidence as C
    from tellnorm.techniques import lrs as L

    cfg = st.cfg
    r = _per_item(st, run, samples=n)
    compute = _compute(st, run, r, n)
    seeds = f"{cfg.sampling_seed}"
    parts = []
    single = compute.copy()
    single[["generated_tokens", "block_passes", "extra_block_passes", "wall_s"]] /= n
    single["correct"] = r.groupby("item").correct.mean()
    parts.append(_label(st, single, f"{prefix}sample", family if prefix else "sampled", 1, f"{seeds} (mean of {n})"))
    oracle = compute.copy()
    oracle["correct"] = r.groupby("item").correct.max().astype(float)
    parts.append(_label(st, oracle, f"{prefix}pass@{n}", "upper bound", n, seeds))
    conf_cfg = cfg.confidence or C.ConfidenceConfig.scaled(float(run.responses.n_generated.median()))
    names = selectors if selectors is not None else C.method_names(conf_cfg)
    vocab = st.model.vocab_size
    items = st.task.items
    groups = {i: g for i, g in r.groupby("item")}
    for name in names:
        correct, chosen_tokens = [], []
        for i, g in groups.items():
            per_token = [run.token_stats[rid] for rid in g.request_id]
            answer, index = C.select(list(g.answer), per_token, name, conf_cfg, vocab_size=vocab,
                                     seed=cfg.seed, key=f"{prefix}{i}")
            # a scored task (lm-eval's metric): the chosen response's own score; else the voted answer vs the gold
            correct.append(float(g.correct.iloc[index]) if st.task.score is not None
                           else float((st.task.matches or answers_match)(answer, items[i].answer)))
            chosen_tokens.append(int(g.n_generated.iloc[index]))
        out = compute.copy()
        out["correct"], out["selected_tokens"] = correct, chosen_tokens
        parts.append(_label(st, out, f"{prefix}{name}@{n}", family, n, seeds))
    if lrs_variants and run.norms is not None:
        taus = st.thresholds.values
        table = L.statistics_table(run.norms[run.norms.request_id.isin(set(r.request_id))],
                                   {layer: taus[layer] for layer in set(st.late) | set(st.middle)})
        for variant in lrs_variants:
            score = L.scores(table, variant, st.late if variant.layers == "late" else st.middle)
            correct, chosen_tokens = [], []
            for _i, g in groups.items():
                index = L.pick(score.reindex(g.request_id).fillna(-np.inf).to_numpy())
                correct.append(float(g.correct.iloc[index]))
                chosen_tokens.append(int(g.n_generated.iloc[index]))
            out = compute.copy()
            out["correct"], out["selected_tokens"] = correct, chosen_tokens
            parts.append(_label(st, out, f"{prefix}{variant.name}@{n}", family, n, seeds))
    for part in parts:
        part["pool_tokens"] = part.item.map(r.groupby("item").n_generated.mean())
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------------- summaries

SUMMARY_COLUMNS = ["method", "family", "n_samples", "seeds", "difficulty", "n", "accuracy", "ci_low", "ci_high",
                   "delta_vs_greedy", "delta_ci_low", "delta_ci_high", "generated_tokens", "extra_block_passes",
                   "block_passes", "wall_s", "selected_tokens", "pool_tokens"]


def summarise(per_item: pd.DataFrame, reference: str = "greedy", seed: int = 0) -> pd.DataFrame:
    """Accuracy with bootstrap CIs per method and group (and "all"), the paired difference to ``reference`` in
    absolute points, and mean compute per problem."""
    import pandas as pd

    from tellnorm.stats import percentile_interval, resample_indices

    ref = per_item[per_item.method == reference].set_index("item").correct
    rows = []
    for method, m in per_item.groupby("method", sort=False):
        for group, g in [("all", m)] + list(m.groupby("group", sort=False)):
            values = g.correct.to_numpy(dtype=float)
            idx = resample_indices(len(values), seed=seed)
            lo, hi = percentile_interval(values[idx].mean(axis=1))
            diff = values - ref.reindex(g.item).to_numpy(dtype=float)
            dlo, dhi = percentile_interval(diff[idx].mean(axis=1))
            rows.append({
                "method": method, "family": g.family.iloc[0], "n_samples": int(g.n_samples.iloc[0]),
                "seeds": g.seeds.iloc[0], "difficulty": group, "n": len(values), "accuracy": values.mean(),
                "ci_low": lo, "ci_high": hi, "delta_vs_greedy": diff.mean(), "delta_ci_low": dlo,
                "delta_ci_high": dhi, "generated_tokens": g.generated_tokens.mean(),
                "extra_block_passes": g.extra_block_passes.mean(), "block_passes": g.block_passes.mean(),
                "wall_s": g.wall_s.mean(),
                "selected_tokens": g.selected_tokens.mean() if "selected_tokens" in g else float("nan"),
                "pool_tokens": g.pool_tokens.mean() if "pool_tokens" in g else float("nan")})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def firing_summary(runs: list[Run]) -> pd.DataFrame:
    """Per run: responses, and for each counter its mean per response and the share of responses where it fired."""
    import pandas as pd

    rows = []
    for run in runs:
        r = run.responses
        counters = [c for c in r.columns if c.startswith(("alrr_", "erss_"))]
        row = {"run": run.name, "n_responses": len(r), "generated_tokens_mean": r.n_generated.mean()}
        for c in counters:
            row[f"{c}_mean"] = r[c].mean()
            row[f"{c}_fired"] = (r[c] > 0).mean()
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ sensitivity

SENSITIVITY_K = (0.5, 1.5, 3.0, 6.0)  # PAPER §5: k ∈ {0.5, 1.5, 3, 6}
SENSITIVITY_LOOPS = (1, 2, 4, 8)  # PAPER §6: forced loop counts
SENSITIVITY_LOW_K = (40, 20, 10, 5)  # TELLNORM: ERSS's streak length (40 never triggers on short responses)
SENSITIVITY_SELECTORS = ("majority", "deepconf-lowest-filter10", "self-certainty", "random")


def sensitivity(st: Setup, greedy_items: pd.DataFrame, sampled: Run | None, *,
                progress: bool = True, main_runs: Mapping[str, Run] | None = None) -> pd.DataFrame:
    """The paper's ablations (ISSUE 10 §3; k and a global τ: PAPER §5, ALRR loops and ERSS streak: PAPER §6), one
    per-item frame with a ``sweep`` and ``setting`` column. ``main_runs`` (technique -> its main greedy run): a sweep
    setting that decodes exactly what a main run decoded (the default k with calibrated τ, ERSS's default streak)
    reads that run instead of decoding it again."""
    import pandas as pd

    from tellnorm.techniques import calibrated_thresholds
    from tellnorm.thresholds import FixedThresholds

    cfg = st.cfg
    parts = []

    main_runs = main_runs or {}

    def single(name, sweep, setting, *, same_as: str | None = None, **kwargs):
        run = main_runs.get(same_as) if same_as else None
        run = run if run is not None else decode(st, name, progress=progress, **kwargs)
        seeds = f"erss {cfg.erss.seed}" if "erss" in kwargs.get("techniques", ()) else "greedy"
        part = single_pass_method(st, run, name, "sensitivity").assign(sweep=sweep, setting=setting, seeds=seeds)
        fired = run.responses.filter(regex="^(alrr_extra_passes|alrr_kept_passes|erss_injections)$")
        for column in fired.columns:
            part[column] = part.item.map(run.responses.groupby("item")[column].sum())
        parts.append(part)

    if st.calibration:
        for k in SENSITIVITY_K:
            thresholds = calibrated_thresholds(st.calibration, replace(cfg.threshold, k=k))
            default = k == cfg.threshold.k and cfg.threshold_mode == "calibrated"  # the main runs' own τ
            for technique in ("alrr", "erss"):
                single(f"{technique} k={k:g}", "k", f"{k:g}", techniques=(technique,), thresholds=thresholds,
                       same_as=technique if default else None)
        base = calibrated_thresholds(st.calibration, cfg.threshold)
        glob = float(np.median(list(base.values.values())))
        thresholds = FixedThresholds({layer: glob for layer in base.values}, source="one global threshold")
        for technique in ("alrr", "erss"):
            single(f"{technique} global τ={glob:.4g}", "global threshold", f"{glob:.4g}", techniques=(technique,),
                   thresholds=thresholds)
    for loops in SENSITIVITY_LOOPS:
        single(f"alrr forced×{loops}", "alrr forced loops", str(loops), techniques=("alrr",),
               alrr=replace(cfg.alrr, forced_loops=loops))
    for low_k in SENSITIVITY_LOW_K:
        single(f"erss low_k={low_k}", "erss streak", str(low_k), techniques=("erss",),
               erss=replace(cfg.erss, low_k=low_k), same_as="erss" if low_k == cfg.erss.low_k else None)
    if sampled is not None:
        for n in cfg.sample_sizes:
            part = sampled_methods(st, sampled, n, selectors=SENSITIVITY_SELECTORS,
                                   lrs_variants=(LRSConfig(), LRSConfig(per_token=True)))
            parts.append(part.assign(sweep="N", setting=str(n)))
    frame = pd.concat([greedy_items.assign(sweep="reference", setting="greedy")] + parts, ignore_index=True)
    return frame


def sensitivity_table(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Overall accuracy of every sweep setting with its paired difference to greedy and what fired."""
    import pandas as pd

    greedy = frame[frame.sweep == "reference"]
    parts = [summarise(greedy, seed=seed).query("difficulty == 'all'").assign(sweep="reference", setting="greedy")]
    for (sweep, setting), g in frame[frame.sweep != "reference"].groupby(["sweep", "setting"], sort=False):
        s = summarise(pd.concat([greedy, g]), seed=seed)
        s = s[(s.method != "greedy") & (s.difficulty == "all")].assign(sweep=sweep, setting=setting)
        for column in ("alrr_extra_passes", "alrr_kept_passes", "erss_injections"):
            if column in g:
                s[f"{column}_per_response"] = s.method.map(g.groupby("method")[column].mean())
        parts.append(s)
    out = pd.concat(parts, ignore_index=True)
    first = ["sweep", "setting", "method"]
    return out[first + [c for c in out.columns if c not in first and c not in ("difficulty", "wall_s")]]


# ---------------------------------------------------------------------------------------------------- figures

FAMILY_COLORS = {"base": "#555555", "technique": "#c0392b", "control": "#e67e22", "sampled": "#7f8c8d",
                 "selection": "#2471a3", "lrs": "#8e44ad", "technique+selection": "#16a085", "upper bound": "#bbbbbb"}


def main_methods(summary: pd.DataFrame, n: int) -> list[str]:
    """The methods of the headline figure: every single-pass method, DeepConf's recommended filtered votes, the
    paper's LRS rule and its per-token variant, the combinations; the other LRS ablations have their own figure."""
    keep = []
    for method in summary.method.unique():
        base = method.split("+")[-1]
        if base.startswith("lrs-") and base not in (f"lrs-D@late@{n}", f"lrs-D/len@late@{n}"):
            continue
        if base.startswith("deepconf-") and not base.endswith(f"filter10@{n}"):
            continue
        keep.append(method)
    return keep


def accuracy_figure(summary: pd.DataFrame, title: str, methods: list[str] | None = None) -> go.Figure:
    """Overall accuracy per method with its 95% CI, greedy as a reference line, compute in the hover."""
    import plotly.graph_objects as go

    from tellnorm.figures import style

    s = summary[summary.difficulty == "all"]
    if methods is not None:
        s = s[s.method.isin(methods)]
    s = s.iloc[::-1]
    fig = go.Figure()
    for family, g in s.groupby("family", sort=False):
        fig.add_trace(go.Scatter(
            x=g.accuracy, y=g.method, mode="markers", name=family,
            marker={"color": FAMILY_COLORS.get(family, "#333333"), "size": 8},
            error_x={"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                     "arrayminus": g.accuracy - g.ci_low},
            customdata=np.stack([g.n, g.block_passes, g.delta_vs_greedy * 100], axis=-1),
            hovertemplate="%{y}: %{x:.3f} (n=%{customdata[0]})<br>block passes/problem %{customdata[1]:.0f}"
                          "<br>Δ vs greedy %{customdata[2]:+.1f} points<extra></extra>"))
    greedy = summary[(summary.method == "greedy") & (summary.difficulty == "all")].accuracy
    if len(greedy):
        fig.add_vline(x=float(greedy.iloc[0]), line={"color": "#555555", "dash": "dot"})
    style(fig, title=title, x_title="accuracy (95% bootstrap CI over problems; dotted: greedy)",
          height=max(420, 22 * len(s) + 200), width=860)
    fig.update_layout(margin={"l": 250, "t": 70, "b": 120}, legend={"y": -60 / max(420, 22 * len(s) + 200),
                                                                     "yanchor": "top"})
    return fig


def difficulty_figure(summary: pd.DataFrame, methods: list[str], title: str, group_title: str) -> go.Figure:
    """Accuracy per group (difficulty, or a JSONL's group) of each of ``methods``, with 95% CIs."""
    import plotly.graph_objects as go

    from tellnorm.figures import style

    fig = go.Figure()
    for method in methods:
        g = summary[(summary.method == method) & (summary.difficulty != "all")]
        if g.empty:
            continue
        order = sorted(g.difficulty, key=lambda d: (float(d) if d.replace(".", "", 1).isdigit() else math.inf, d))
        g = g.set_index("difficulty").loc[order]
        fig.add_trace(go.Scatter(x=order, y=g.accuracy, mode="lines+markers", name=method,
                                 error_y={"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                                          "arrayminus": g.accuracy - g.ci_low, "thickness": 1}))
    style(fig, title=title, x_title=group_title, y_title="accuracy (95% CI; equal methods overlap)", width=900,
          height=560)
    fig.update_layout(margin={"t": 70, "b": 170}, legend={"y": -0.18, "yanchor": "top"})
    return fig


def sensitivity_figure(table: pd.DataFrame) -> go.Figure:
    """One panel per sweep of :func:`sensitivity_table` (k and τ: PAPER §5; ALRR loops, ERSS streak: PAPER §6; N):
    accuracy per setting with 95% CIs, greedy dotted."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tellnorm.figures import style

    panels = [("k", "τ = Q3 + k·IQR"), ("alrr forced loops", "ALRR forced loops"), ("erss streak", "ERSS LOW_K"),
              ("N", "samples N")]
    panels = [(sweep, label) for sweep, label in panels if sweep in set(table.sweep)]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[label for _, label in panels], shared_yaxes=True)
    greedy = table[table.method == "greedy"].accuracy
    for col, (sweep, _) in enumerate(panels, start=1):
        t = table[table.sweep == sweep]
        t = t.assign(series=t.method.str.replace(r"( k=| forced×| low_k=)\S+$", "", regex=True).str.replace(
            r"@\d+$", "", regex=True))
        for series, g in t.groupby("series", sort=False):
            fig.add_trace(go.Scatter(x=g.setting, y=g.accuracy, mode="lines+markers",
                                     name=series if sweep == "N" else f"{series} ({sweep})",
                                     error_y={"type": "data", "symmetric": False, "array": g.ci_high - g.accuracy,
                                              "arrayminus": g.accuracy - g.ci_low, "thickness": 1}),
                          row=1, col=col)
        if len(greedy):
            fig.add_hline(y=float(greedy.iloc[0]), line={"color": "#555555", "dash": "dot"}, row=1, col=col)
    style(fig, title="Sensitivity (dotted: greedy)", y_title="accuracy (95% CI)", width=1200, height=480)
    fig.update_layout(margin={"t": 90, "b": 130}, legend={"y": -0.2, "yanchor": "top"})
    return fig


# --------------------------------------------------------------------------------------------------- markdown

def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


SUMMARY_MARKDOWN_COLUMNS = ["method", "N", "n", "accuracy % [95% CI]", "Δ vs greedy, points [paired CI]",
                            "generated tokens", "extra block passes", "block passes"]


def summary_markdown(summary: pd.DataFrame) -> str:
    """The overall ("all") rows of :func:`summarise` as a GitHub markdown table: accuracy in % with its CI, the
    paired Δ to greedy in points, and compute per problem (cells formatted here, rendered by
    :func:`tellnorm.io.markdown_table`)."""
    import pandas as pd

    from tellnorm.io import markdown_table

    s = summary[summary.difficulty == "all"]
    rows = [[f"{r.method}", f"{r.n_samples}", f"{r.n}", f"{_pct(r.accuracy)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}]",
             f"{100 * r.delta_vs_greedy:+.1f} [{100 * r.delta_ci_low:+.1f}, {100 * r.delta_ci_high:+.1f}]",
             f"{r.generated_tokens:.0f}", f"{r.extra_block_passes:.1f}", f"{r.block_passes:.0f}"]
            for _, r in s.iterrows()]
    return markdown_table(pd.DataFrame(rows, columns=SUMMARY_MARKDOWN_COLUMNS, dtype=object))


# ------------------------------------------------------------------------------------------------------- main

KEY_METHODS = ("greedy", "alrr", "erss", "sample", "majority@{n}", "lrs-D@late@{n}", "self-certainty@{n}",
               "deepconf-lowest-filter10@{n}", "pass@{n}")


def run_evaluate(model: ModelAPI, cfg: EvaluateConfig, out: Path, *, progress: bool = True,
                 runner: Runner | None = None, task: task_specs.Task | None = None) -> dict[str, Any]:
    """Everything ``tellnorm evaluate`` does; writes tables, figures and ``evaluation.md`` to ``out`` (``task``: a
    loaded task instead of the one ``cfg.task`` names).

    ``runner``: where every decoding runs (None: here; a Ray pool shards the items over its workers, and ``cfg`` is
    checked up front: see :func:`check_evaluation_shardable`). Calibration runs here."""
    import pandas as pd

    from tellnorm.figures import write_figure
    from tellnorm.io import write_csv, write_json

    runner = as_runner(runner, model)
    if not runner.in_process:
        check_evaluation_shardable(cfg)  # before any work
    st = setup(model, cfg, progress=progress, task=task)
    st.runner = runner
    n = cfg.n_samples
    runs: list[Run] = []
    items = []

    greedy = decode(st, "greedy", progress=progress)
    runs.append(greedy)
    greedy_items = single_pass_method(st, greedy, "greedy", "base")
    items.append(greedy_items)
    by_name = {}
    for spec in cfg.techniques:
        names = parse_techniques(spec)
        run = decode(st, spec, techniques=names, progress=progress)
        runs.append(run)
        by_name[spec] = run
        seeds = f"erss {cfg.erss.seed}" if "erss" in names else "greedy"
        items.append(single_pass_method(st, run, spec, "technique").assign(seeds=seeds))
    if cfg.controls and "alrr" in by_name:
        for name in CONTROL_NAMES:
            run = decode(st, name, edits=control_edits(st, by_name["alrr"], name.split("/")[1]), progress=progress)
            runs.append(run)
            items.append(single_pass_method(st, run, name, "control").assign(seeds=f"random {cfg.seed}"))
    sampled = decode(st, f"sampled ×{cfg.max_samples}", n_samples=cfg.max_samples, trace=True, progress=progress)
    runs.append(sampled)
    items.append(sampled_methods(st, sampled, n))
    for spec in cfg.sampled_techniques:
        names = parse_techniques(spec)
        run = decode(st, f"sampled ×{n} + {spec}", techniques=names, n_samples=n, trace=True, progress=progress)
        runs.append(run)
        items.append(sampled_methods(st, run, n, prefix=f"{spec}+", family="technique+selection",
                                     selectors=("majority",), lrs_variants=(LRSConfig(),)))
    per_item = pd.concat(items, ignore_index=True)
    summary = summarise(per_item, seed=cfg.seed)
    is_lrs = summary.method.str.contains(r"(?:^|\+)lrs-")
    summary.loc[is_lrs & (summary.family == "selection"), "family"] = "lrs"

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Wall time depends on the machine: its own file (git-ignored), so a rerun elsewhere leaves the tables unchanged.
    write_csv(summary.drop(columns="wall_s"), out / "evaluation.csv")
    write_csv(summary[["method", "n_samples", "difficulty", "n", "wall_s"]], out / "evaluation_wall_time.csv")
    responses = pd.concat([r.responses.assign(run=r.name) for r in runs], ignore_index=True)
    responses["group"] = [st.task.items[i].group for i in responses.item]
    write_csv(responses[["run", "request_id", "group", "answer", "correct", "n_generated"]
                        + [c for c in responses.columns if c.startswith(("alrr_", "erss_"))]],
              out / "evaluation_responses.csv")
    firing = firing_summary(runs)
    write_csv(firing, out / "evaluation_firing.csv")
    if st.thresholds is not None:
        write_json({"source": cfg.thresholds_file if cfg.threshold_mode == "fixed" else "calibrated",
                    "techniques_use": cfg.threshold_mode, "k": cfg.threshold.k,
                    "layers": {str(k): round(v, 4) for k, v in sorted(st.thresholds.values.items())}},
                   out / "evaluation_thresholds.json")
    title = f"{st.task.name}: accuracy of every method (N = {n} for selectors)"
    figures = {"evaluation": accuracy_figure(summary, title, main_methods(summary, n)),
               "evaluation_lrs": accuracy_figure(
                   summary, f"LRS statistics and layers vs the other selectors (N = {n})",
                   [m for m in summary.method.unique() if "+" not in m and ("@" in m or m == "greedy")])}
    methods = [m.format(n=n) for m in KEY_METHODS]
    figures["evaluation_by_difficulty"] = difficulty_figure(summary, methods, f"{st.task.name}: accuracy by "
                                                            f"{st.task.group_title}", st.task.group_title)
    sens = None
    if cfg.sensitivity:
        sens_items = sensitivity(st, greedy_items, sampled, progress=progress, main_runs=by_name)
        sens = sensitivity_table(sens_items, seed=cfg.seed)
        write_csv(sens, out / "evaluation_sensitivity.csv")
        figures["evaluation_sensitivity"] = sensitivity_figure(sens)
    for stem, fig in figures.items():
        write_figure(fig, out / stem)
    report = evaluation_markdown(st, summary, firing, sens)
    (out / "evaluation.md").write_text(report)
    return {"summary": summary, "firing": firing, "sensitivity": sens, "markdown": report,
            "thresholds": None if st.thresholds is None else dict(st.thresholds.values)}


def evaluation_markdown(st: Setup, summary: pd.DataFrame, firing: pd.DataFrame,
                        sens: pd.DataFrame | None) -> str:
    """``evaluation.md``: the setup in a paragraph (sampling as in PAPER §7, τ as in PAPER §5), the overall accuracy
    table, what fired per run, and the sensitivity table when ``sens`` is given."""
    from tellnorm.io import markdown_table as frame_markdown

    cfg = st.cfg
    lines = [f"# Evaluation: {st.task.name}", "",
             f"{len(st.task.items)} problems; greedy single-pass methods; selectors over N = {cfg.n_samples} samples "
             f"(temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05; sampling seed {cfg.sampling_seed}); "
             f"thresholds: {cfg.threshold_mode} (k = {cfg.threshold.k:g}); late layers {st.late}, middle "
             f"{st.middle}. Bootstrap 95% CIs over problems; Δ in absolute points, paired. Compute per problem: "
             "generated tokens and block passes (layers × (prompt + generated tokens) per sample, plus every extra "
             "pass); wall time is in evaluation_wall_time.csv (machine-dependent).", "",
             summary_markdown(summary), "", "## What fired (mean per response; share of responses where it fired)", "",
             frame_markdown(firing)]
    if sens is not None:
        cols = ["sweep", "setting", "method", "n", "accuracy", "ci_low", "ci_high", "delta_vs_greedy"]
        lines += ["", "## Sensitivity", "", frame_markdown(sens[cols], float_format="{:.3f}")]
    return "\n".join(lines) + "\n"
