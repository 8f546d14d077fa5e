"""``tellnorm bench backends``: tokens/s of plain vLLM, vLLM with tellnorm's observers, and the HF backend.

Variants, each a full generation of the same prompts (greedy, float32, EOS ignored so every request generates
exactly ``max_new_tokens`` tokens in every variant):

* ``vllm`` — tellnorm's vLLM engine with nothing attached (the tapped model class adds no hook while idle, so this
  is vLLM's own forward), the baseline of every ratio;
* ``vllm+trace`` — a :class:`~tellnorm.norms.NormTracer` on every layer;
* ``vllm+alrr`` / ``vllm+erss`` — each technique at the late layers with calibrated τ (as ``bench techniques``);
  ALRR times its own extra passes, and its bookkeeping ratio is judged beyond them;
* ``vllm+lrs`` — LRS's bookkeeping: a tracer on the late layers, then the per-response D scores;
* ``hf`` — the HF backend's batched ``generate`` (every prompt in one batch).

Targets (the issue): tracing ≤ 1.05× plain vLLM; each technique ≤ 1.05× beyond the extra passes it reports. Timing
as ``bench techniques``: warm-up rounds untimed (the first checks tokens), then interleaved rounds (round r starts
at variant r mod 6), wall time per call with the garbage collector off; ratios of medians and per-round ratios.
The first warm-up round also checks that the backends agree (:func:`compare_backends`): tokens equal and every
layer's norms within 1e-4.

Shapes: the trained organism, or a random-init float32 Qwen3 of Qwen3-0.6B's shape (optionally fewer layers),
saved to a temporary folder for vLLM to load (removed on every exit path).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.apps.bench.timing import config_dict, machine_info, ratio_stats, round_order, timed, write_results
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

VARIANTS = ("vllm", "vllm+trace", "vllm+alrr", "vllm+erss", "vllm+lrs", "hf")
TARGET_RATIO = 1.05  # ISSUE / PAPER §6: "< 5% latency"
NORM_RTOL = 1e-4  # the float32 agreement the vLLM backend is tested to


@dataclass
class BackendBenchConfig:
    """Settings of ``tellnorm bench backends`` (the CLI's flags)."""

    config: str = "organism"  # "organism" (trained) or "qwen3-0.6b" (random init)
    n_layers: int | None = None  # random-init depth override
    prompts: int = 10
    max_new_tokens: int = 96
    repeats: int = 5
    warmup: int = 1
    dtype: str = "float32"
    out: str | Path = "figures/bench"
    progress: bool = True

    def __post_init__(self) -> None:
        from tellnorm.apps.bench.norms import CONFIGS

        if self.config not in CONFIGS:
            raise TellnormError(f"unknown bench config {self.config!r}: choose one of {', '.join(CONFIGS)}")
        for name in ("prompts", "max_new_tokens", "repeats", "warmup"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TellnormError(f"--{name.replace('_', '-')} must be a whole number ≥ 1, got {value!r}")
        if self.dtype != "float32":
            raise TellnormError(f"bench backends compares the backends in float32, but --dtype is {self.dtype}: "
                                "bfloat16 vLLM diverges from HF after a few dozen tokens, so its tokens and norms "
                                "are not comparable; drop --dtype")


def compare_backends(reference: Any, other: Any, prompts: Sequence[Sequence[int]], sampling: Any,
                     layers: Sequence[int] | None = None) -> dict:
    """Run ``prompts`` on both models with a tracer and compare: tokens per request, every traced norm.

    Both must run float32 (one clear line otherwise): in lower precision the backends legitimately diverge."""
    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer

    for model in (reference, other):
        dtype = getattr(model, "dtype", None) or str(next(model.hf_model.parameters()).dtype).replace("torch.", "")
        if dtype != "float32":
            raise TellnormError(f"a float32 comparison was asked but the {model.backend} model runs {dtype}: load "
                                "both with dtype='float32'")
    frames, tokens = [], []
    for model in (reference, other):
        tracer = NormTracer(model, layers)
        tokens.append([g.generated_ids for g in generate(model, prompts, sampling, observers=[tracer])])
        frames.append(tracer.frame())
    merged = frames[0].merge(frames[1], on=["request_id", "position", "layer"], how="outer", indicator=True)
    both = merged[merged._merge == "both"]
    relative = ((both.norm_x - both.norm_y).abs() / both.norm_x).to_numpy()
    same = [a == b for a, b in zip(*tokens)]
    return {"requests": len(same), "requests_same_tokens": sum(same), "norms_compared": len(both),
            "norms_missing": int((merged._merge != "both").sum()),
            "max_relative_norm_difference": float(relative.max()) if len(relative) else None,
            "agree": all(same) and (merged._merge == "both").all() and float(relative.max()) < NORM_RTOL}


def _models(cfg: BackendBenchConfig, folder: Path):
    """``(hf_model, vllm_model)`` of the same weights."""
    from tellnorm.backends import load_model

    if cfg.config == "organism" and cfg.n_layers is None:
        return load_model("organism"), load_model("organism", backend="vllm")
    from tellnorm.apps.bench.norms import build_hf_model

    weights, tokenizer = build_hf_model(cfg.config, cfg.n_layers)
    weights.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del weights
    return load_model(folder), load_model(folder, backend="vllm")


def _run(variant: str, models: dict, setup) -> dict:
    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer, generated_rows
    from tellnorm.techniques import build_edits

    model = models["hf" if variant == "hf" else "vllm"]
    observers, result = [], {"extra_pass_s": 0.0}
    if variant == "vllm+trace":
        observers = [NormTracer(model)]
    elif variant in ("vllm+alrr", "vllm+erss"):
        observers = build_edits([variant.split("+")[1]], model, fixed=setup.thresholds)
    elif variant == "vllm+lrs":
        observers = [NormTracer(model, setup.layers)]
    gens = generate(model, setup.prompts, setup.sampling, observers=observers)
    if variant == "vllm+lrs":
        from tellnorm.techniques.lrs import LRSConfig, scores, statistics_table

        scores(statistics_table(generated_rows(observers[0].frame(), gens), setup.thresholds.values), LRSConfig(),
               setup.layers)
    if variant == "vllm+alrr":
        result["extra_pass_s"] = observers[0].extra_pass_seconds
        result["extra_passes"] = int(observers[0].report().alrr_extra_passes.sum())
    if variant == "vllm+erss":
        result["erss_injections"] = int(observers[0].report().erss_injections.sum())
    result["tokens"] = [list(g.generated_ids) for g in gens]
    return result


def _timed_run(variant: str, models: dict, setup) -> dict:
    """One timed run of ``variant``: its result with the wall time added as ``seconds``."""
    call = timed(_run, variant, models, setup)
    call.result["seconds"] = call.wall_s
    return call.result


def bench_backends(cfg: BackendBenchConfig) -> dict:
    """Run the benchmark, write ``bench_backends.json`` / ``.csv`` into ``cfg.out``, print the table."""
    from tqdm.auto import tqdm

    from tellnorm.apps.bench.techniques import Setup, bench_prompts, bench_thresholds
    from tellnorm.generation import SamplingConfig

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TellnormError(f"--out {out} is a file: give a folder")
    folder = Path(tempfile.mkdtemp(prefix="tellnorm-bench-backends-"))
    try:
        start = time.perf_counter()
        hf_model, vllm_model = _models(cfg, folder)
        build_s = time.perf_counter() - start
        models = {"hf": hf_model, "vllm": vllm_model}
        prompts, names = bench_prompts(hf_model, cfg.prompts)
        if max(map(len, prompts)) + cfg.max_new_tokens > vllm_model.max_positions:
            raise TellnormError(f"the longest prompt + --max-new-tokens {cfg.max_new_tokens} exceeds the context of "
                                f"{vllm_model.max_positions}: lower --max-new-tokens")
        layers = vllm_model.late_layers()
        thresholds, _ = bench_thresholds(vllm_model, prompts, layers, cfg.max_new_tokens, len(prompts))
        setup = Setup(prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True), len(prompts),
                      layers, thresholds)
        agreement = compare_backends(hf_model, vllm_model, prompts, setup.sampling)
        reference = {}
        for _ in range(cfg.warmup):
            for v in VARIANTS:
                result = _run(v, models, setup)
                reference.setdefault(v, result)
        checks = _checks(reference, cfg.max_new_tokens)
        rounds = []
        for r in tqdm(range(cfg.repeats), desc="bench rounds", unit="round", disable=not cfg.progress):
            rounds.append({v: _timed_run(v, models, setup) for v in round_order(VARIANTS, r)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    n_tokens = len(prompts) * cfg.max_new_tokens
    variants = _summarise(rounds, n_tokens)
    summary = {
        "benchmark": "backends",
        "config": config_dict(cfg),
        "model": {"name": (cfg.config if cfg.config == "organism" and cfg.n_layers is None
                           else f"random-init {cfg.config}"),
                  "n_layers": vllm_model.n_layers, "d_model": vllm_model.d_model, "dtype": cfg.dtype,
                  "vllm_version": vllm_model.info["vllm_version"], "build_s": build_s},
        "inputs": {"n_prompts": len(prompts), "prompts": names, "max_new_tokens": cfg.max_new_tokens,
                   "tokens_per_run": n_tokens, "late_layers": layers, "sampling": "greedy, EOS ignored"},
        "thresholds": {str(k): v for k, v in thresholds.values.items()},
        "machine": machine_info(None),
        "agreement": agreement,
        "checks": checks,
        "variants": variants,
        "targets": {
            "trace_le_1.05x_vllm": variants["vllm+trace"]["ratio_to_vllm"] <= TARGET_RATIO,
            "alrr_beyond_passes_le_1.05x": variants["vllm+alrr"]["ratio_beyond_passes"] <= TARGET_RATIO,
            "erss_le_1.05x": variants["vllm+erss"]["ratio_to_vllm"] <= TARGET_RATIO,
            "lrs_le_1.05x": variants["vllm+lrs"]["ratio_to_vllm"] <= TARGET_RATIO,
        },
        "rounds": [{v: {"seconds": row[v]["seconds"], "extra_pass_s": row[v]["extra_pass_s"]} for v in row}
                   for row in rounds],
    }
    write_results(summary, out / "bench_backends", summary_frame(summary), format_table(summary))
    return summary


def _checks(reference: dict, max_new_tokens: int) -> dict:
    plain = reference["vllm"]["tokens"]
    checks = {v: {"same_tokens_as_vllm": r["tokens"] == plain, **{k: r[k] for k in ("extra_passes", "erss_injections")
                                                                   if k in r}}
              for v, r in reference.items()}
    for v, r in reference.items():
        if any(len(t) != max_new_tokens for t in r["tokens"]):
            raise TellnormError(f"variant {v!r} stopped a request early although EOS is ignored")
    for v in ("vllm+trace", "vllm+lrs", "hf"):
        if not checks[v]["same_tokens_as_vllm"]:
            raise TellnormError(f"{v} generated other tokens than plain vLLM: an observer edits the stream or the "
                                "backends disagree")
    return checks


def _summarise(rounds: list[dict], n_tokens: int) -> dict:
    plain = [row["vllm"]["seconds"] for row in rounds]
    plain_median = statistics.median(plain)
    out = {}
    for v in VARIANTS:
        seconds = [row[v]["seconds"] for row in rounds]
        extra = [row[v]["extra_pass_s"] for row in rounds]
        ratios = [s / p for s, p in zip(seconds, plain)]
        out[v] = {"median_s": statistics.median(seconds), "tokens_per_s": n_tokens / statistics.median(seconds),
                  "ratio_to_vllm": statistics.median(seconds) / plain_median,
                  **{f"round_ratio_{k}": x for k, x in ratio_stats(ratios).items()},
                  "extra_pass_s": statistics.median(extra),
                  "ratio_beyond_passes": statistics.median(s - e for s, e in zip(seconds, extra)) / plain_median}
    return out


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per variant: the CSV."""
    import pandas as pd

    rows = [{"variant": v, **{k: m[k] for k in ("median_s", "tokens_per_s", "ratio_to_vllm", "round_ratio_median",
                                                "round_ratio_min", "round_ratio_max", "extra_pass_s",
                                                "ratio_beyond_passes")}}
            for v, m in summary["variants"].items()]
    return pd.DataFrame(rows)


def format_table(summary: dict) -> str:
    """The printed table: agreement of the backends, one row per variant, the targets."""
    a = summary["agreement"]
    lines = [f"bench backends — {summary['model']['name']} ({summary['model']['n_layers']} layers), "
             f"{summary['inputs']['n_prompts']} prompts × {summary['inputs']['max_new_tokens']} tokens, "
             f"{summary['config']['repeats']} interleaved rounds, vLLM {summary['model']['vllm_version']}",
             f"agreement vLLM vs HF (float32): tokens equal on {a['requests_same_tokens']}/{a['requests']} requests, "
             f"max relative norm difference {a['max_relative_norm_difference']:.1e} over {a['norms_compared']} norms",
             f"{'variant':<12}{'tokens/s':>10}{'× vLLM':>9}{'rounds (min–max)':>20}{'beyond passes':>15}"]
    for v, m in summary["variants"].items():
        beyond = f"{m['ratio_beyond_passes']:.3f}" if v == "vllm+alrr" else ""
        lines.append(f"{v:<12}{m['tokens_per_s']:>10.1f}{m['ratio_to_vllm']:>9.3f}"
                     f"{m['round_ratio_min']:>11.3f}–{m['round_ratio_max']:.3f}{beyond:>15}")
    lines.append("targets (≤ 1.05×): " + ", ".join(f"{k} {'met' if ok else 'NOT met'}"
                                                   for k, ok in summary["targets"].items()))
    return "\n".join(lines)
