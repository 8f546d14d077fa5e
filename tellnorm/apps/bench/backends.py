"""``tellnorm bench backends``: tokens/s of plain vLLM and vLLM with tellnorm's observers in each engine mode, and
the HF backend.

Engine modes (``--engines``), each a vLLM engine of the same weights loaded side by side:

* ``in-process`` — vLLM's engine core in this process (tellnorm's default);
* ``multi-process`` — vLLM's engine core in its own process (vLLM's default): observers travel as specs and their
  records come back at the end of the run;
* ``tp2`` — multi-process with ``tensor_parallel_size=2``: rank 0 decides and broadcasts, rank 1 follows.

Variants in every engine mode, each a full generation of the same prompts (greedy, float32, EOS ignored so every
request generates exactly ``max_new_tokens`` tokens in every variant):

* ``vllm`` — the engine with nothing attached (the tapped model class adds no hook while idle, so this is vLLM's
  own forward), the baseline of that mode's ratios;
* ``vllm+trace`` — a :class:`~tellnorm.norms.NormTracer` on every layer;
* ``vllm+alrr`` / ``vllm+erss`` — each technique at the late layers with calibrated τ (as ``bench techniques``);
  ALRR times its own extra passes, and its bookkeeping ratio is judged beyond them;
* ``vllm+lrs`` — LRS's bookkeeping: a tracer on the late layers, then the per-response D scores;

and once, ``hf`` — the HF backend's batched ``generate`` (every prompt in one batch).

Targets (the issue), in every engine mode: tracing ≤ 1.05× that mode's plain vLLM; each technique ≤ 1.05× beyond
the extra passes it reports. Timing as ``bench techniques``: warm-up rounds untimed, then interleaved rounds over
every (mode, variant) cell (round r starts at cell r mod cells), wall time per call with the garbage collector off;
ratios of medians and per-round ratios. Before timing, every mode is checked against the HF backend
(:func:`compare_backends`: tokens equal and every layer's norms within 1e-4).

A multi-process run's wall time includes what crossing processes costs: pickling the observers to the workers, the
caller's poll every few steps, and the records coming back. An ALRR extra pass's time is measured where it runs (in
the worker, on rank 0) and comes back with the records.

Shapes: the trained organism, or a random-init float32 Qwen3 of Qwen3-0.6B's shape (optionally fewer layers),
saved to a temporary folder for vLLM to load (removed on every exit path).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.apps.bench.timing import config_dict, machine_info, ratio_stats, round_order, timed, write_results
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

ENGINES = {  # --engines names → load_model's engine options
    "in-process": {"engine": "in-process"},
    "multi-process": {"engine": "multi-process"},
    "tp2": {"engine": "multi-process", "tensor_parallel_size": 2},
}
VLLM_VARIANTS = ("vllm", "vllm+trace", "vllm+alrr", "vllm+erss", "vllm+lrs")
TARGETS = {"trace": "vllm+trace", "alrr_beyond_passes": "vllm+alrr", "erss": "vllm+erss", "lrs": "vllm+lrs"}
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
    engines: tuple[str, ...] = tuple(ENGINES)  # engine modes, each loaded side by side
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
        self.engines = tuple(self.engines)
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown or not self.engines or len(set(self.engines)) != len(self.engines):
            raise TellnormError(f"--engines {','.join(self.engines)!r}: give distinct engine modes among "
                                f"{', '.join(ENGINES)}")


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


def _weights(cfg: BackendBenchConfig, folder: Path) -> str | Path:
    """What every backend loads: the organism, or random-init weights of the asked shape saved into ``folder``."""
    if cfg.config == "organism" and cfg.n_layers is None:
        return "organism"
    from tellnorm.apps.bench.norms import build_hf_model

    weights, tokenizer = build_hf_model(cfg.config, cfg.n_layers)
    weights.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextmanager
def cpu_threads_bind(ranks: int) -> Iterator[str]:
    """Where vLLM runs on CPUs and ``VLLM_CPU_OMP_THREADS_BIND`` is unset, split this process's cores evenly over
    ``ranks`` tensor-parallel ranks while an engine starts (vLLM's automatic binding gives rank N the N-th NUMA node,
    and these machines have one); otherwise leave the setting alone. Yields the setting the engine starts with
    (vLLM's ``"auto"`` where unset: an engine core in its own process then keeps one core for the caller; an
    in-process engine uses torch's threads)."""
    import os

    from vllm.platforms import current_platform

    key = "VLLM_CPU_OMP_THREADS_BIND"
    if ranks == 1 or key in os.environ or not current_platform.is_cpu():
        yield os.environ.get(key, "auto")
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise TellnormError(f"tensor parallelism over {ranks} ranks needs {ranks} CPU cores, this process has "
                            f"{len(cores)}: drop tp{ranks} from --engines")
    share = len(cores) // ranks
    os.environ[key] = "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(ranks))
    try:
        yield os.environ[key]
    finally:
        os.environ.pop(key, None)


def _run(cell: tuple[str, str], models: dict, setup) -> dict:
    from tellnorm.generation import generate
    from tellnorm.norms import NormTracer, generated_rows
    from tellnorm.techniques import build_edits

    engine, variant = cell
    model = models[engine]
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


def _timed_run(cell: tuple[str, str], models: dict, setup) -> dict:
    """One timed run of ``cell``: its result with the wall time added as ``seconds``."""
    call = timed(_run, cell, models, setup)
    call.result["seconds"] = call.wall_s
    return call.result


def label(cell: tuple[str, str]) -> str:
    """A cell's name in the outputs: ``"hf"``, or ``"<engine mode>/<variant>"``."""
    engine, variant = cell
    return variant if engine == "hf" else f"{engine}/{variant}"


def bench_backends(cfg: BackendBenchConfig) -> dict:
    """Run the benchmark, write ``bench_backends.json`` / ``.csv`` into ``cfg.out``, print the table."""
    from tqdm.auto import tqdm

    from tellnorm.apps.bench.techniques import Setup, bench_prompts, bench_thresholds
    from tellnorm.backends import load_model
    from tellnorm.generation import SamplingConfig

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TellnormError(f"--out {out} is a file: give a folder")
    folder = Path(tempfile.mkdtemp(prefix="tellnorm-bench-backends-"))
    models: dict[str, Any] = {}
    binds: dict[str, str] = {}
    try:
        start = time.perf_counter()
        weights = _weights(cfg, folder)
        models["hf"] = load_model(weights, dtype=cfg.dtype)
        build_s = {"hf": time.perf_counter() - start}
        for engine in cfg.engines:
            start = time.perf_counter()
            with cpu_threads_bind(ENGINES[engine].get("tensor_parallel_size", 1)) as bind:
                models[engine] = load_model(weights, backend="vllm", dtype=cfg.dtype, **ENGINES[engine])
            binds[engine] = bind
            build_s[engine] = time.perf_counter() - start
        first = models[cfg.engines[0]]
        prompts, names = bench_prompts(models["hf"], cfg.prompts)
        if max(map(len, prompts)) + cfg.max_new_tokens > first.max_positions:
            raise TellnormError(f"the longest prompt + --max-new-tokens {cfg.max_new_tokens} exceeds the context of "
                                f"{first.max_positions}: lower --max-new-tokens")
        layers = first.late_layers()
        thresholds, _ = bench_thresholds(first, prompts, layers, cfg.max_new_tokens, len(prompts))
        setup = Setup(prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens, ignore_eos=True), len(prompts),
                      layers, thresholds)
        agreement = {engine: compare_backends(models["hf"], models[engine], prompts, setup.sampling)
                     for engine in cfg.engines}
        cells = [(engine, variant) for engine in cfg.engines for variant in VLLM_VARIANTS] + [("hf", "hf")]
        reference: dict[tuple[str, str], dict] = {}
        for _ in range(cfg.warmup):
            for cell in cells:
                reference.setdefault(cell, _run(cell, models, setup))
        checks = _checks(reference, cfg.engines, cfg.max_new_tokens)
        rounds = []
        for r in tqdm(range(cfg.repeats), desc="bench rounds", unit="round", disable=not cfg.progress):
            rounds.append({cell: _timed_run(cell, models, setup) for cell in round_order(cells, r)})
    finally:
        for model in models.values():
            if getattr(model, "backend", None) == "vllm":
                model.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    n_tokens = len(prompts) * cfg.max_new_tokens
    variants = _summarise(rounds, cells, n_tokens)
    summary = {
        "benchmark": "backends",
        "config": config_dict(cfg),
        "model": {"name": (cfg.config if cfg.config == "organism" and cfg.n_layers is None
                           else f"random-init {cfg.config}"),
                  "n_layers": first.n_layers, "d_model": first.d_model, "dtype": cfg.dtype,
                  "vllm_version": first.info["vllm_version"], "build_s": build_s},
        "engines": {engine: {**ENGINES[engine], "cpu_threads_bind": binds[engine]} for engine in cfg.engines},
        "inputs": {"n_prompts": len(prompts), "prompts": names, "max_new_tokens": cfg.max_new_tokens,
                   "tokens_per_run": n_tokens, "late_layers": layers, "sampling": "greedy, EOS ignored"},
        "thresholds": {str(k): v for k, v in thresholds.values.items()},
        "machine": machine_info(None),
        "agreement": agreement,
        "checks": checks,
        "variants": variants,
        "targets": {engine: {name: variants[f"{engine}/{variant}"][_target_ratio(variant)] <= TARGET_RATIO
                             for name, variant in TARGETS.items()}
                    for engine in cfg.engines},
        "rounds": [{label(cell): {"seconds": row[cell]["seconds"], "extra_pass_s": row[cell]["extra_pass_s"]}
                    for cell in row} for row in rounds],
    }
    write_results(summary, out / "bench_backends", summary_frame(summary), format_table(summary))
    return summary


def _target_ratio(variant: str) -> str:
    return "ratio_beyond_passes" if variant == "vllm+alrr" else "ratio_to_vllm"


def _checks(reference: dict, engines: Sequence[str], max_new_tokens: int) -> dict:
    """Per cell: its tokens against its own mode's plain vLLM and against the first mode's same variant (the modes
    must make the same decisions); one clear error where a read-only variant changed the tokens."""
    for cell, r in reference.items():
        if any(len(t) != max_new_tokens for t in r["tokens"]):
            raise TellnormError(f"{label(cell)} stopped a request early although EOS is ignored")
    checks = {}
    for cell, r in reference.items():
        engine, variant = cell
        plain = reference[(engines[0], "vllm") if engine == "hf" else (engine, "vllm")]["tokens"]
        same_variant = reference.get((engines[0], variant), r)["tokens"]
        checks[label(cell)] = {"same_tokens_as_vllm": r["tokens"] == plain,
                               "same_tokens_as_first_engine": r["tokens"] == same_variant,
                               **{k: r[k] for k in ("extra_passes", "erss_injections") if k in r}}
        if variant in ("vllm+trace", "vllm+lrs", "hf") and r["tokens"] != plain:
            raise TellnormError(f"{label(cell)} generated other tokens than plain vLLM: an observer edits the stream "
                                "or the backends disagree")
    return checks


def _summarise(rounds: list[dict], cells: Sequence[tuple[str, str]], n_tokens: int) -> dict:
    """Per cell: median time, tokens/s, ratio of medians to its mode's plain vLLM (HF: to the first mode's), per-round
    ratios, ALRR's extra-pass time and the ratio beyond it; plain rows also get their ratio to the first mode's."""
    baseline_engine = cells[0][0]
    out = {}
    for cell in cells:
        engine, variant = cell
        plain_cell = (baseline_engine if engine == "hf" else engine, "vllm")
        plain = [row[plain_cell]["seconds"] for row in rounds]
        seconds = [row[cell]["seconds"] for row in rounds]
        extra = [row[cell]["extra_pass_s"] for row in rounds]
        first = [row[(baseline_engine, "vllm")]["seconds"] for row in rounds]
        out[label(cell)] = {
            "engine": engine, "variant": variant,
            "median_s": statistics.median(seconds), "tokens_per_s": n_tokens / statistics.median(seconds),
            "ratio_to_vllm": statistics.median(seconds) / statistics.median(plain),
            **{f"round_ratio_{k}": x for k, x in ratio_stats([s / p for s, p in zip(seconds, plain)]).items()},
            "extra_pass_s": statistics.median(extra),
            "ratio_beyond_passes": statistics.median(s - e for s, e in zip(seconds, extra)) / statistics.median(plain),
            "ratio_to_first_engine": statistics.median(seconds) / statistics.median(first)}
    return out


SUMMARY_COLUMNS = ("engine", "variant", "median_s", "tokens_per_s", "ratio_to_vllm", "round_ratio_median",
                   "round_ratio_min", "round_ratio_max", "extra_pass_s", "ratio_beyond_passes", "ratio_to_first_engine")


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per (engine mode, variant): the CSV."""
    import pandas as pd

    return pd.DataFrame([{k: m[k] for k in SUMMARY_COLUMNS} for m in summary["variants"].values()])


def format_table(summary: dict) -> str:
    """The printed table: agreement of each mode with HF, one row per (mode, variant), the targets per mode."""
    from tellnorm.apps.bench.timing import table_lines

    engines = list(summary["engines"])
    lines = [f"bench backends — {summary['model']['name']} ({summary['model']['n_layers']} layers), "
             f"{summary['inputs']['n_prompts']} prompts × {summary['inputs']['max_new_tokens']} tokens, "
             f"{summary['config']['repeats']} interleaved rounds, vLLM {summary['model']['vllm_version']}"]
    for engine, a in summary["agreement"].items():
        lines.append(f"agreement {engine} vLLM vs HF (float32): tokens equal on {a['requests_same_tokens']}/"
                     f"{a['requests']} requests, max relative norm difference "
                     f"{a['max_relative_norm_difference']:.1e} over {a['norms_compared']} norms")
    rows = []
    for name, m in summary["variants"].items():
        beyond = f"{m['ratio_beyond_passes']:.3f}" if m["variant"] == "vllm+alrr" else ""
        rows.append((name, f"{m['tokens_per_s']:.1f}", f"{m['ratio_to_vllm']:.3f}",
                     f"{m['round_ratio_min']:.3f}–{m['round_ratio_max']:.3f}", beyond,
                     f"{m['ratio_to_first_engine']:.3f}"))
    lines += table_lines(("mode/variant", "tokens/s", "× its vLLM", "rounds (min–max)", "beyond passes",
                          f"× {engines[0]} vLLM"), rows)
    for engine, targets in summary["targets"].items():
        lines.append(f"targets (≤ 1.05×), {engine}: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}"
                                                               for k, ok in targets.items()))
    return "\n".join(lines)
