"""``tellnorm bench techniques``: the wall time of generation with each technique, next to plain cached generation.

The issue's targets: ≤ 1.05× plain for ERSS and for LRS's bookkeeping; ALRR ≤ 1.05× *beyond the extra block passes
it reports* (those passes are the technique, not overhead). Everything measured is reported, met or not.

Model and prompts. ``organism``: the trained organism (``data/organism``); with ``n_layers`` a random-init model of
the organism's shape with that many layers (the trained weights have 8). ``qwen3-0.6b``: a random-init fp32 model of
Qwen3-0.6B's shape (:func:`tellnorm.apps.bench.norms.build_model`; weights do not matter for speed), optionally
with fewer layers. Prompts: the organism's thinking-mode prompts of held-out test problems
(:func:`tellnorm.organism.task.test_split`, :func:`tellnorm.organism.evaluate.problem_prompts`), taken round-robin
over the difficulties, so there is one of every difficulty among the first ten; their token ids are valid for both
shapes (both use the organism's tokenizer). ``prompt_len`` replaces them by random non-special token ids of that
length. Greedy decoding, CPU, fp32, one batch of all prompts unless ``batch_size`` says otherwise.

Fixed token counts. With ``stop_at_eos=False`` (the default) the bench samples with
``SamplingConfig(ignore_eos=True)`` (vLLM's ``ignore_eos``): every request then generates exactly
``max_new_tokens`` tokens in every variant (checked; ``prompt + max_new_tokens`` must fit the context), so all
variants do the same base work. On the trained organism, tokens after its natural EOS are the model continuing past
its answer: realistic for speed, off-distribution for norms. With
``stop_at_eos=True`` requests stop at EOS and lengths may differ between variants (ALRR and ERSS change the tokens).
Times are always also reported per generated token (wall time / tokens generated), and every ratio is a ratio of
medians of the per-token time (equal to the ratio of per-run times when the counts are fixed).

Variants (each call builds its technique objects fresh, as a run would, and includes that in its time):

* ``plain`` — :func:`tellnorm.generation.generate`, KV cache, no observer.
* ``alrr`` — + ALRR at the late layers with calibrated fixed τ (below), so it really fires. ALRR times its own
  calls of :func:`tellnorm.techniques.alrr.extra_block_pass` (wall and process CPU): the cost of the extra passes.
* ``erss`` — + ERSS at the late layers, reference constants, the same τ. With reference constants it may never
  inject (a streak of 40 low tokens is needed first): then it is pure bookkeeping and its tokens must equal the
  plain run's (checked).
* ``lrs`` — LRS's bookkeeping on one response: a :class:`~tellnorm.norms.NormTracer` over the late layers,
  ``token_stats=True`` (the confidence baselines' per-token statistics), then
  :func:`tellnorm.techniques.lrs.statistics_table` and the D scores from the tracer's norms of generated tokens.
  Tokens must equal the plain run's (checked).
* ``alrr+erss`` — both edits (ALRR first at a shared layer).

Thresholds. Before timing, one clean traced greedy run of the same prompts (same EOS rule) gives the norms of the
generated tokens at the late layers, and τ_l = Q3 + 1.5·IQR per layer
(:func:`tellnorm.thresholds.calibrated_thresholds`), the techniques' default ``calibrated`` mode. A random-init
model's norms can be so regular that no token of that run lies in ALRR's band τ < ‖x‖ < 1.5·τ, and ALRR would
then cost only its bookkeeping; at such a layer τ_l is the 90th percentile of the same norms instead (about one
token in ten above τ; on the trained organism the calibrated τ puts about 9% of the tokens in the band). The JSON
says which rule gave each τ (``threshold_details``).

Timing (as ``bench norms``). ``warmup`` untimed rounds run every variant once (the first also checks tokens and
firing counts); then each of ``repeats`` rounds runs every variant once, interleaved, round r starting at variant
r mod 6, so CPU drift and order effects hit all variants alike. Each call is timed with ``perf_counter`` after
``gc.collect()``, with the garbage collector off during the call. Reported per variant: the median time per run and
per generated token, the ratio of medians to ``plain``, and the per-round ratios (median, quartiles, min, max).
The targets are judged on wall time (the issue's measure). The same ratios in process CPU time
(``time.process_time``, every thread of the process) are reported next to them (``cpu``): on a shared machine
they leave out the time spent waiting for a core that another process holds, which wall time cannot; they also
leave out time the process spends off the CPU for other reasons (none here: no I/O inside a call). With more
than one torch thread, worker threads' spin-waiting counts as CPU time too (``--threads 1`` avoids it).

ALRR beyond its extra passes. Two estimates of what the extra passes cost, both reported:

* measured (the one the target is judged on): the time ALRR itself measured inside ``extra_block_pass`` in the same
  call. ``ratio_beyond_passes`` = (median over rounds of (ALRR time − its extra-pass time) per token) / median plain
  time per token; the timer (a ``perf_counter`` and a ``process_time`` pair per batched call) stays in the total.
* per-token estimate: (extra block passes ALRR reports, summed over tokens and layers) × (plain time per generated
  token / n_layers), i.e. one extra token-pass costs one layer's share of a plain decode step per token. This is
  biased: the plain time also pays for the embedding, the LM head and sampling (an overestimate, large for a big
  vocabulary on few layers), while one extra-pass call on a few rows costs more per token than a layer inside the
  batched step (an underestimate when calls are overhead-bound, as on CPU with small models).

For ``alrr+erss`` the same holds with that run's own measured extra-pass time.

Outputs: a printed table, ``OUT/bench_techniques.json`` (everything: raw round times, firing counts, thresholds,
machine info with threads and load average) and ``OUT/bench_techniques.csv`` (one row per variant).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.apps.bench import timing
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

CONFIGS = ("organism", "qwen3-0.6b")
VARIANTS = ("plain", "alrr", "erss", "lrs", "alrr+erss")
LABELS = {"plain": "plain cached generate", "alrr": "+ ALRR",
          "erss": "+ ERSS", "lrs": "+ LRS bookkeeping", "alrr+erss": "+ ALRR + ERSS"}
TECHNIQUES = {"alrr": ("alrr",), "erss": ("erss",), "alrr+erss": ("alrr", "erss")}
TARGET = 1.05
FALLBACK_QUANTILE = 0.9  # τ where Q3 + 1.5·IQR leaves ALRR's band empty (random-init models): ~10% of tokens above
# variant -> which ratio the target is judged on
TARGETS = {"erss": "ratio_to_plain", "lrs": "ratio_to_plain", "alrr": "ratio_beyond_passes"}


@dataclass
class TechniqueBenchConfig:
    """Settings of ``tellnorm bench techniques`` (the CLI's flags)."""

    config: str = "organism"  # "organism" (trained; random-init with n_layers) or "qwen3-0.6b" (random-init)
    n_layers: int | None = None  # override the depth (same width): a random-init model
    prompts: int = 10  # number of prompts (organism test problems, round-robin over difficulties)
    prompt_len: int | None = None  # None: the organism's prompts; n: random token ids of n tokens instead
    max_new_tokens: int = 128
    batch_size: int | None = None  # None: every prompt in one batch
    repeats: int = 5  # timed rounds
    warmup: int = 1  # untimed rounds first (≥ 1: the first checks tokens and firing counts)
    threads: int | None = None  # torch.set_num_threads; None keeps torch's setting
    seed: int = 0
    stop_at_eos: bool = False  # False: EOS ignored, every request generates exactly max_new_tokens tokens
    out: str | Path = "figures/bench"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise TellnormError(f"unknown bench config {self.config!r}: choose one of {', '.join(CONFIGS)}")
        for name, flag in (("prompts", "--prompts"), ("max_new_tokens", "--max-new-tokens"),
                           ("repeats", "--repeats")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TellnormError(f"{flag} must be a whole number ≥ 1, got {value!r}")
        for name, flag in (("n_layers", "--layers"), ("prompt_len", "--prompt-len"), ("batch_size", "--batch-size"),
                           ("threads", "--threads")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise TellnormError(f"{flag} must be a whole number ≥ 1, got {value!r}")
        if self.warmup < 1:
            raise TellnormError(f"warmup must be ≥ 1 (the first warm-up round checks tokens), got {self.warmup}")

    @property
    def weights(self) -> str:
        """``"trained"`` for the trained organism, else ``"random-init"``."""
        return "trained" if self.config == "organism" and self.n_layers is None else "random-init"


# --------------------------------------------------------------------------------------------- model and inputs

def bench_model(cfg: TechniqueBenchConfig) -> Any:
    """The trained organism, or a random-init fp32 model of the named shape
    (:func:`tellnorm.apps.bench.norms.build_model`)."""
    if cfg.weights == "trained":
        from tellnorm.backends import load_model

        model = load_model("organism")
        model.name = "organism (trained)"
        return model
    from tellnorm.apps.bench.norms import build_model

    return build_model(cfg.config, cfg.n_layers, cfg.seed)


def bench_prompts(model: Any, n: int, prompt_len: int | None = None, seed: int = 0) -> tuple[list[list[int]], list]:
    """``(prompts, descriptions)``: organism thinking prompts round-robin over difficulties, or random token ids."""
    if prompt_len is not None:
        import torch

        special = set(model.tokenizer.all_special_ids)
        allowed = torch.tensor([i for i in range(len(model.tokenizer)) if i not in special])
        g = torch.Generator().manual_seed(seed)
        picks = torch.randint(0, len(allowed), (n, prompt_len), generator=g)
        return allowed[picks].tolist(), [f"random/{i}" for i in range(n)]
    from tellnorm.organism import task
    from tellnorm.organism.evaluate import problem_prompts

    levels = task.MAX_DIFFICULTY - task.MIN_DIFFICULTY + 1
    split = task.test_split(math.ceil(n / levels))
    by_level: dict = {}
    for p in split.problems:
        by_level.setdefault(p.difficulty, []).append(p)
    problems = [by_level[d][i] for i in range(split.per_difficulty) for d in sorted(by_level)][:n]
    return problem_prompts(model, problems, "thinking"), [f"test/d{p.difficulty}/{p.key()}" for p in problems]


# --------------------------------------------------------------------------------------------------- variants

@dataclass
class Setup:
    """What every variant call shares: the prompts, the sampling, the late layers and their calibrated τ."""

    prompts: list
    sampling: object
    batch_size: int
    layers: list
    thresholds: object  # FixedThresholds


def bench_thresholds(model: Any, setup_prompts: list[list[int]], layers: list[int], max_new_tokens: int,
              batch_size: int) -> tuple[Any, dict]:
    """``(FixedThresholds, per-layer details)``: τ_l = Q3 + 1.5·IQR of the generated tokens' norms of a clean greedy
    traced run; where that puts no token in ALRR's band (τ, 1.5·τ), the 90th percentile instead (see the module
    docstring)."""
    import numpy as np

    from tellnorm.techniques import calibration_norms
    from tellnorm.techniques.alrr import BLOWUP_RATIO
    from tellnorm.thresholds import FixedThresholds, calibrated_thresholds

    norms = calibration_norms(model, setup_prompts, layers, max_new_tokens=max_new_tokens, batch_size=batch_size)
    calibrated = calibrated_thresholds(norms).values
    values, details = {}, {}
    for layer in layers:
        x = np.asarray(norms[layer], dtype=np.float64)

        def band(tau: float, x: np.ndarray = x) -> int:
            return int(((x > tau) & (x < BLOWUP_RATIO * tau)).sum())

        tau, source = calibrated[layer], "Q3 + 1.5·IQR"
        if band(tau) == 0:
            tau = float(np.quantile(x, FALLBACK_QUANTILE))
            source = f"quantile {FALLBACK_QUANTILE} (Q3 + 1.5·IQR = {calibrated[layer]:.6g} puts no token in the band)"
        values[layer] = tau
        details[str(layer)] = {"tau": tau, "source": source, "calibrated_tau": calibrated[layer],
                               "n_tokens": int(x.size), "above_tau": int((x > tau).sum()), "in_band": band(tau)}
    return FixedThresholds(values, source="bench calibration (same prompts, clean greedy run)"), details


def run_variant(variant: str, model: Any, setup: Setup) -> dict:
    """Run one variant once: ``{"generations", "edits", "extra_pass", "lrs_scores"}``."""
    from tellnorm.generation import generate

    result = {"edits": [], "extra_pass": None, "lrs_scores": None}
    if variant == "plain":
        result["generations"] = generate(model, setup.prompts, setup.sampling, batch_size=setup.batch_size)
    elif variant in TECHNIQUES:
        from tellnorm.techniques import build_edits

        edits = build_edits(TECHNIQUES[variant], model, threshold_mode="calibrated", fixed=setup.thresholds)
        result["edits"] = edits
        result["generations"] = generate(model, setup.prompts, setup.sampling, batch_size=setup.batch_size,
                                         observers=edits)
        if "alrr" in TECHNIQUES[variant]:  # ALRR times its own extra passes (wall and process CPU)
            alrr = edits[0]
            result["extra_pass"] = {"wall_s": alrr.extra_pass_seconds, "cpu_s": alrr.extra_pass_cpu_seconds,
                                    "calls": alrr.extra_pass_calls}
    elif variant == "lrs":
        from tellnorm.norms import NormTracer, generated_rows
        from tellnorm.techniques.lrs import LRSConfig, scores, statistics_table

        tracer = NormTracer(model, setup.layers)
        gens = generate(model, setup.prompts, setup.sampling, batch_size=setup.batch_size, observers=[tracer],
                        token_stats=True)
        table = statistics_table(generated_rows(tracer.frame(), gens), setup.thresholds.values)
        result["generations"] = gens
        result["lrs_scores"] = scores(table, LRSConfig(), setup.layers)
    else:
        raise ValueError(variant)
    return result


def firing_counts(result: dict) -> dict:
    """What the variant's techniques did, summed over requests and layers (plus the timed extra-pass calls)."""
    counts = {}
    for edit in result["edits"]:
        report = edit.report()
        for column in report.columns:
            if column not in ("request_id", "layer"):
                counts[column] = int(report[column].sum())
    if result["extra_pass"] is not None:
        counts["extra_pass_calls"] = result["extra_pass"]["calls"]
    return counts


def _tokens(result: dict) -> list[list[int]]:
    return [list(g.generated_ids) for g in result["generations"]]


# ------------------------------------------------------------------------------------------------------- main

def bench_techniques(cfg: TechniqueBenchConfig) -> dict:
    """Run the benchmark, write ``bench_techniques.json`` and ``.csv`` to ``cfg.out``, print the table.

    Returns the JSON summary as a dict."""
    import torch
    from tqdm.auto import tqdm

    from tellnorm.generation import SamplingConfig

    machine = timing.bench_machine(cfg.threads)
    t0 = time.perf_counter()
    model = bench_model(cfg)
    build_s = time.perf_counter() - t0
    prompts, prompt_names = bench_prompts(model, cfg.prompts, cfg.prompt_len, cfg.seed)
    longest = max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > model.max_positions:
        raise TellnormError(f"the longest prompt ({longest} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds "
                            f"the model's context of {model.max_positions}: lower --max-new-tokens to at most "
                            f"{model.max_positions - longest}")
    layers = model.late_layers()
    batch_size = cfg.batch_size or len(prompts)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=not cfg.stop_at_eos)

    with torch.no_grad():
        t0 = time.perf_counter()
        thresholds, threshold_details = bench_thresholds(model, prompts, layers, cfg.max_new_tokens, batch_size)
        calibrate_s = time.perf_counter() - t0
        setup = Setup(prompts, sampling, batch_size, layers, thresholds)

        # Warm-up, untimed; the first round's tokens and firing counts are the reference for every timed round.
        reference = {}
        for w in range(cfg.warmup):
            for v in VARIANTS:
                result = run_variant(v, model, setup)
                if w == 0:
                    reference[v] = {"tokens": _tokens(result), "counts": firing_counts(result)}
                del result
        checks = _check_tokens(reference, cfg)

        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        rounds = []
        for r in tqdm(range(cfg.repeats), desc="bench rounds", unit="round", disable=not cfg.progress):
            order = timing.round_order(VARIANTS, r)
            row = {"round": r, "order": list(order), "cpu_s": {}, "n_tokens": {}, "deterministic": {},
                   "extra_pass_s": {}, "extra_pass_cpu_s": {}, "extra_pass_calls": {}}
            for v in order:
                call = timing.timed(run_variant, v, model, setup)
                elapsed, cpu, result = call.wall_s, call.cpu_s, call.result
                del call
                tokens = _tokens(result)
                row[v] = elapsed
                row["cpu_s"][v] = cpu
                row["n_tokens"][v] = sum(len(t) for t in tokens)
                row["deterministic"][v] = tokens == reference[v]["tokens"]
                if result["extra_pass"] is not None:
                    row["extra_pass_s"][v] = result["extra_pass"]["wall_s"]
                    row["extra_pass_cpu_s"][v] = result["extra_pass"]["cpu_s"]
                    row["extra_pass_calls"][v] = result["extra_pass"]["calls"]
                del result, tokens
                times[v].append(elapsed)
            rounds.append(row)
    gc.collect()
    if (load := timing.load_average()) is not None:
        machine["load_average_1m_end"] = load

    variants = _summarise(rounds, checks, model.n_layers)
    hf_cfg = model.hf_model.config
    summary = {
        "benchmark": "techniques",
        "config": timing.config_dict(cfg),
        "model": {"name": model.name, "shape": cfg.config, "weights": cfg.weights, "n_layers": model.n_layers,
                  "d_model": model.d_model, "vocab_size": hf_cfg.vocab_size, **timing.model_info(model),
                  "build_s": build_s},
        "inputs": {"n_prompts": len(prompts), "prompts": prompt_names, "prompt_lengths": [len(p) for p in prompts],
                   "max_new_tokens": cfg.max_new_tokens, "stop_at_eos": cfg.stop_at_eos, "batch_size": batch_size,
                   "sampling": "greedy", "late_layers": layers},
        "thresholds": {str(k): v for k, v in thresholds.values.items()},
        "threshold_details": threshold_details,
        "calibrate_s": calibrate_s,
        "machine": machine,
        "method": {
            "timing": "interleaved rounds (round r starts at variant r mod 6), perf_counter per call after "
                      "gc.collect() with gc off during the call, torch.no_grad; warm-up rounds untimed; medians of "
                      "the time per generated token, ratio of medians to plain, per-round ratios",
            "fixed_token_count": "EOS ignored (SamplingConfig.ignore_eos)"
                                 if not cfg.stop_at_eos else "requests stop at EOS: token counts may differ",
            "thresholds": "calibrated: Q3 + 1.5·IQR of a clean greedy traced run's generated-token norms per late "
                          "layer, same prompts",
            "cpu_time": "time.process_time per call (all threads of the process): the same ratios without the "
                        "time spent waiting for a CPU other processes hold",
            "alrr_beyond_passes": "measured: time ALRR spent inside extra_block_pass in the same call (median "
                                  "over rounds) subtracted; estimate: reported extra block passes × plain time per "
                                  "token / n_layers subtracted",
        },
        "checks": checks,
        "variants": variants,
        "targets": _targets(variants),
        "rounds": rounds,
    }
    timing.write_results(summary, Path(cfg.out) / "bench_techniques", summary_frame(summary), format_table(summary))
    return summary


def _check_tokens(reference: dict, cfg: TechniqueBenchConfig) -> dict:
    """Token agreement with the plain run; the fixed token count; observation-only variants must not change tokens."""
    plain = reference["plain"]["tokens"]
    checks = {}
    for v, ref in reference.items():
        same = [a == b for a, b in zip(ref["tokens"], plain)]
        checks[v] = {"same_tokens_as_plain": all(same), "requests_same_as_plain": sum(same),
                     "n_requests": len(same), "n_tokens": sum(len(t) for t in ref["tokens"]), **ref["counts"]}
        if not cfg.stop_at_eos and any(len(t) != cfg.max_new_tokens for t in ref["tokens"]):
            raise TellnormError(f"variant {v!r}: a request stopped before {cfg.max_new_tokens} tokens although EOS is "
                                "ignored: the benchmark would compare unequal work")
    if not checks["lrs"]["same_tokens_as_plain"]:
        raise TellnormError("LRS bookkeeping (norm tracing + token statistics) changed the generated tokens: an "
                            "observer is editing the stream")
    if checks["erss"].get("erss_injections", 0) == 0 and not checks["erss"]["same_tokens_as_plain"]:
        raise TellnormError("ERSS injected nothing but changed the generated tokens: its bookkeeping edits the stream")
    return checks


def _clock_metrics(rounds: list[dict], checks: dict, n_layers: int, clock: str) -> dict:
    """Per variant, for one clock ("wall": perf_counter, "cpu": process CPU time): medians per token, ratios of
    medians to plain, per-round ratios, and for ALRR variants the ratios beyond the extra passes."""
    def seconds(row, v):
        return row[v] if clock == "wall" else row["cpu_s"][v]

    extra_key = "extra_pass_s" if clock == "wall" else "extra_pass_cpu_s"
    per_token = {v: [seconds(row, v) / row["n_tokens"][v] for row in rounds] for v in VARIANTS}
    plain_rounds = per_token["plain"]
    med = {v: statistics.median(per_token[v]) for v in VARIANTS}
    plain = med["plain"]
    out = {}
    for v in VARIANTS:
        ratios = [t / p for t, p in zip(per_token[v], plain_rounds)]
        m = {"median_s": statistics.median(seconds(row, v) for row in rounds), "median_s_per_token": med[v],
             "ratio_to_plain": med[v] / plain, "round_ratios": ratios,
             "round_ratio": timing.ratio_stats(ratios, with_quartiles=True)}
        passes = checks[v].get("alrr_extra_passes")
        if passes is not None:
            n_tokens = checks[v]["n_tokens"]
            extra_rounds = [row[extra_key][v] / row["n_tokens"][v] for row in rounds]  # this call's own passes
            extra = statistics.median(extra_rounds)
            beyond = [(t - e) / p for t, e, p in zip(per_token[v], extra_rounds, plain_rounds)]
            estimate = passes * plain / n_layers / n_tokens  # passes × (plain s per token / n_layers), per token
            m.update({"extra_pass_s_per_token": extra, "extra_pass_s": extra * n_tokens,
                      "ratio_beyond_passes": statistics.median(t - e for t, e in zip(per_token[v], extra_rounds))
                      / plain,
                      "round_ratio_beyond_passes": timing.ratio_stats(beyond, with_quartiles=True),
                      "extra_pass_s_per_token_estimate": estimate,
                      "ratio_beyond_passes_estimate": (med[v] - estimate) / plain})
        out[v] = m
    return out


def _summarise(rounds: list[dict], checks: dict, n_layers: int) -> dict:
    wall = _clock_metrics(rounds, checks, n_layers, "wall")
    cpu = _clock_metrics(rounds, checks, n_layers, "cpu")
    variants = {}
    for v in VARIANTS:
        variants[v] = {"label": LABELS[v], "times_s": [row[v] for row in rounds],
                       "cpu_times_s": [row["cpu_s"][v] for row in rounds], "n_tokens": checks[v]["n_tokens"],
                       **wall[v], "cpu": {k: x for k, x in cpu[v].items() if k != "round_ratios"},
                       "deterministic": all(row["deterministic"][v] for row in rounds), **checks[v]}
    return variants


def _targets(variants: dict) -> dict:
    """Judged on wall time (the issue); the same ratio in process CPU time is reported next to it."""
    out = {}
    for v, key in TARGETS.items():
        value, cpu_value = variants[v][key], variants[v]["cpu"][key]
        out[v] = {"ratio": key, "value": value, "target": TARGET, "met": bool(value <= TARGET),
                  "cpu_value": cpu_value, "cpu_met": bool(cpu_value <= TARGET)}
    return out


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per variant: the CSV."""
    import pandas as pd

    rows = []
    for v, s in summary["variants"].items():
        target = summary["targets"].get(v)
        rr = s["round_ratio"]
        rows.append({
            "variant": v, "label": s["label"], "n_tokens": s["n_tokens"], "median_s": s["median_s"],
            "median_s_per_token": s["median_s_per_token"], "ratio_to_plain": s["ratio_to_plain"],
            "round_ratio_median": rr["median"], "round_ratio_q1": rr["q1"], "round_ratio_q3": rr["q3"],
            "round_ratio_min": rr["min"], "round_ratio_max": rr["max"], "n_rounds": len(s["times_s"]),
            "alrr_extra_passes": s.get("alrr_extra_passes"), "extra_pass_s": s.get("extra_pass_s"),
            "ratio_beyond_passes": s.get("ratio_beyond_passes"),
            "ratio_beyond_passes_estimate": s.get("ratio_beyond_passes_estimate"),
            "cpu_median_s_per_token": s["cpu"]["median_s_per_token"], "cpu_ratio_to_plain": s["cpu"]["ratio_to_plain"],
            "cpu_round_ratio_q1": s["cpu"]["round_ratio"]["q1"], "cpu_round_ratio_q3": s["cpu"]["round_ratio"]["q3"],
            "cpu_ratio_beyond_passes": s["cpu"].get("ratio_beyond_passes"),
            "erss_injections": s.get("erss_injections"), "same_tokens_as_plain": s["same_tokens_as_plain"],
            "target_on": target["ratio"] if target else None, "target": target["target"] if target else None,
            "met": target["met"] if target else None, "cpu_met": target["cpu_met"] if target else None,
        })
    return pd.DataFrame(rows)


def format_table(summary: dict) -> str:
    """The printed table: model, inputs and machine, one row per variant, the targets, firing counts and τ."""
    m, inp, mach = summary["model"], summary["inputs"], summary["machine"]
    load = [mach.get("load_average_1m_start"), mach.get("load_average_1m_end")]
    load_text = " → ".join(f"{x:.2f}" for x in load if x is not None) or "n/a"
    lines = [
        f"technique benchmark: {m['name']} — {m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['parameters'] / 1e6:.1f}M params, {m['dtype']}, {m['device']}; late layers {inp['late_layers']}",
        f"inputs: {inp['n_prompts']} prompts (batch {inp['batch_size']}) × {inp['max_new_tokens']} new tokens, "
        f"greedy, {'stop at EOS' if inp['stop_at_eos'] else 'EOS ignored'}; {len(summary['rounds'])} interleaved "
        f"rounds after {summary['config']['warmup']} warm-up",
        f"machine: torch {mach['torch_version']}, {mach['torch_threads']} threads, {mach['cpu_count']} CPUs, "
        f"load average (1 min) {load_text}",
        "",
    ]
    header = ("variant", "median s", "ms/token", "×plain", "per-round ×plain: median [IQR]", "×plain CPU",
              "extra passes", "beyond passes: wall (est.) / CPU", "same tokens", "target (wall)")
    rows = []
    for v, s in summary["variants"].items():
        rr = s["round_ratio"]
        beyond = "-"
        if "ratio_beyond_passes" in s:
            beyond = (f"{s['ratio_beyond_passes']:.3f} ({s['ratio_beyond_passes_estimate']:.3f}) / "
                      f"{s['cpu']['ratio_beyond_passes']:.3f}")
        t = summary["targets"].get(v)
        target = "-" if t is None else f"≤ {t['target']} {'met' if t['met'] else 'NOT met'}"
        passes = s.get("alrr_extra_passes")
        rows.append((f"{v}: {s['label']}", f"{s['median_s']:.3f}", f"{1e3 * s['median_s_per_token']:.3f}",
                     f"{s['ratio_to_plain']:.3f}", f"{rr['median']:.3f} [{rr['q1']:.3f}, {rr['q3']:.3f}]",
                     f"{s['cpu']['ratio_to_plain']:.3f}", "-" if passes is None else str(passes), beyond,
                     f"{s['requests_same_as_plain']}/{s['n_requests']}", target))
    lines += timing.table_lines(header, rows)
    lines.append("")
    for v, t in summary["targets"].items():
        what = "beyond its extra passes (measured)" if t["ratio"] == "ratio_beyond_passes" else "raw"
        lines.append(f"{v}: {t['value']:.3f}× plain in wall time, {what} (target ≤ {t['target']}: "
                     f"{'met' if t['met'] else 'NOT met'}); {t['cpu_value']:.3f}× in process CPU time "
                     f"({'met' if t['cpu_met'] else 'NOT met'})")
    c = summary["checks"]
    fired = c["alrr"].get("alrr_band_tokens", 0)
    lines.append(f"ALRR: {fired} band tokens, {c['alrr'].get('alrr_extra_passes', 0)} extra passes "
                 f"({c['alrr'].get('extra_pass_calls', 0)} calls), {c['alrr'].get('alrr_kept_passes', 0)} kept; "
                 f"ERSS: {c['erss'].get('erss_banked', 0)} banked, {c['erss'].get('erss_triggers', 0)} triggers, "
                 f"{c['erss'].get('erss_injections', 0)} injections")
    lines.append("τ: " + "; ".join(f"layer {k} {d['tau']:.4g} ({d['source']}; {d['in_band']} of {d['n_tokens']} "
                                    "calibration tokens in ALRR's band)"
                                    for k, d in summary["threshold_details"].items()))
    return "\n".join(lines)
