"""``tellnorm bench norms``: what norm tracing costs, next to a plain forward pass and ``run_with_cache``.

On a random-init model of a real shape (weights do not matter for speed; fp32, CPU), three variants run on the
same model object and the same inputs (``batch`` × ``seq`` random token ids, no padding), under ``torch.no_grad``:

* (a) ``plain``: a plain forward pass, :func:`tellnorm.generation.run_forward` with no observer;
* (b) ``traced``: the same call with a :class:`tellnorm.norms.NormTracer` on ``resid_post`` of every layer;
* (c) ``cached``: ``bridge.run_with_cache`` of every layer's ``resid_post``, then the per-token norms of the cache.

All three build their input tensors with the same ``left_pad``, hand HF the same attention mask and position ids,
and compute the logits; (c) is the call a user writes (``names_filter`` = the ``resid_post`` names, defaults
otherwise). The bridge's ``run_with_cache`` asks HF for ``output_attentions``; with the bridge's wrapped attention
HF returns no attention tensors, so this costs (c) nothing (measured: same profiled peak with
``output_attentions=False``).

Wall time (standards: ratios side by side in one run, never a timed unit test). After ``warmup`` untimed rounds
(which also check that (b) and (c) give the same norms, to ``1e-5`` relative), each of ``repeats`` rounds runs
every variant once, interleaved; round ``r`` starts at variant ``r mod 3`` (a,b,c / b,c,a / c,a,b, ...), so CPU
speed drift and any order effect hit all variants alike. Each call is timed with ``perf_counter`` after a
``gc.collect()``, with the garbage collector off during the call (as ``timeit`` does); a variant's result is
dropped before the next variant runs. Reported: each variant's median, the ratio of medians to (a), and the
per-round ratios (median, min, max).

Memory. torch's CPU allocator exposes no peak statistics and ``tracemalloc`` does not see torch, so two exact
quantities are reported, not RSS (which glibc's caching of freed pages makes unreliable within one process):

* bytes retained after the pass: the unique storages (deduplicated by address) of every tensor the variant's
  result holds: the tracer's per-layer norm scalars plus the token metadata shared by all its layers, or the
  cache's activations plus their norms. Computed from tensor sizes; (a) retains nothing.
* peak bytes during the pass: one extra, untimed call of each variant inside ``torch.profiler.profile(
  profile_memory=True)``. With memory profiling on, the CPU allocator reports every allocation and free with its
  running total of bytes allocated inside the window; the peak of that total, minus its value at the start of
  the window, is the most tensor memory the variant held at once. It counts torch tensor storage only (not
  Python objects, not BLAS scratch buffers, not allocator overhead), which is what activations cost. The extra
  memory of (b) and (c) is their peak minus (a)'s peak; the total at the end of the window (result still alive)
  cross-checks the retained bytes.

Targets (the issue): (b)/(a) ≤ 1.03 in wall time (ratio of medians), and (b)'s extra memory ≤ 10% of (c)'s,
judged on both the extra peak and the retained bytes (the peak fraction is left out when (c)'s extra peak is not
positive: on tiny shapes the peak can come early in the pass, before the cache has grown).
Outputs: a printed table, ``OUT/bench_norms.json`` (everything, raw round times and machine info included) and
``OUT/bench_norms.csv`` (one row per variant).
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.apps.bench import timing
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import pandas as pd
    import torch

CONFIGS = ("qwen3-0.6b", "organism")
# Qwen/Qwen3-0.6B's config.json (the shape only; weights are random).
QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
VARIANTS = ("plain", "traced", "cached")
LABELS = {"plain": "(a) plain forward", "traced": "(b) NormTracer, all layers",
          "cached": "(c) run_with_cache + norms"}
POINT = "resid_post"
TIME_TARGET = 1.03  # (b)/(a), ratio of medians
MEMORY_TARGET = 0.10  # (b)'s extra peak memory as a fraction of (c)'s
NORM_TOLERANCE = 1e-5  # relative, (b) vs (c)


@dataclass
class BenchConfig:
    """Settings of ``tellnorm bench norms`` (the CLI's flags)."""

    config: str = "qwen3-0.6b"  # model shape: "qwen3-0.6b" or "organism"
    n_layers: int | None = None  # override the shape's depth (same width), for faster runs
    batch: int = 4
    seq: int = 256
    repeats: int = 5  # timed rounds
    out: str | Path = "figures/bench"
    warmup: int = 1  # untimed rounds first (≥ 1: the first checks that (b) and (c) agree)
    threads: int | None = None  # torch.set_num_threads; None keeps torch's setting
    seed: int = 0
    memory: bool = True  # the profiled peak-memory passes
    progress: bool = True

    def __post_init__(self) -> None:
        check_shape_settings(self, ("batch", "seq", "repeats"))
        if self.warmup < 1:
            raise TellnormError(f"warmup must be ≥ 1 (the first warm-up round checks correctness), got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise TellnormError(f"threads must be ≥ 1, got {self.threads}")


def check_shape_settings(cfg: Any, counts: Sequence[str]) -> None:
    """One TellnormError line unless ``cfg.config`` names a shape, ``cfg.n_layers`` is None or ≥ 1 and each field
    in ``counts`` is ≥ 1 (named as its CLI flag)."""
    if cfg.config not in CONFIGS:
        raise TellnormError(f"unknown bench config {cfg.config!r}: choose one of {', '.join(CONFIGS)}")
    for name in counts:
        if getattr(cfg, name) < 1:
            raise TellnormError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.n_layers is not None and cfg.n_layers < 1:
        raise TellnormError(f"--layers must be ≥ 1, got {cfg.n_layers}")


# --------------------------------------------------------------------------------------------- model and inputs

def build_model(config: str = "qwen3-0.6b", n_layers: int | None = None, seed: int = 0) -> Any:
    """A random-init fp32 Qwen3 of the named shape, wrapped by :func:`tellnorm.backends.load_model`.

    Both shapes use the organism's tokenizer: a benchmark feeds token ids, and the bridge only needs a tokenizer.
    """
    from tellnorm.backends import load_model

    model = load_model(build_hf_model(config, n_layers, seed))
    model.name = f"random-init {config}" + (f" ({n_layers} layers)" if n_layers is not None else "")
    return model


def build_hf_model(config: str = "qwen3-0.6b", n_layers: int | None = None, seed: int = 0) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` behind :func:`build_model`, unwrapped (so it can be saved for vLLM)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tellnorm.organism.tokenizer import build_tokenizer
    from tellnorm.organism.train import OrganismModelConfig

    tok = build_tokenizer()
    if config == "organism":
        shape = OrganismModelConfig()
        if n_layers is not None:
            shape.n_layers = n_layers
        hf_config = shape.hf_config(len(tok), tok.pad_token_id, tok.eos_token_id)
    elif config == "qwen3-0.6b":
        dims = dict(QWEN3_06B)
        if n_layers is not None:
            dims["num_hidden_layers"] = n_layers
        hf_config = Qwen3Config(**dims, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                bos_token_id=None)
    else:
        raise TellnormError(f"unknown bench config {config!r}: choose one of {', '.join(CONFIGS)}")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(hf_config).to(torch.float32).eval(), tok


def make_sequences(model: Any, batch: int, seq: int, seed: int = 0) -> list[list[int]]:
    """``batch`` sequences of ``seq`` random token ids (same length: no padding)."""
    import torch

    if seq > model.max_positions:
        raise TellnormError(f"--seq {seq} exceeds the model's context of {model.max_positions}")
    vocab = model.hf_model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).tolist()


# --------------------------------------------------------------------------------------------------- variants

def plain_forward(model: Any, sequences: list[list[int]]) -> None:
    """(a) A plain forward pass (logits computed, then dropped); retains nothing."""
    from tellnorm.generation import run_forward

    run_forward(model, sequences, batch_size=len(sequences))
    return None


def traced_forward(model: Any, sequences: list[list[int]]) -> Any:
    """(b) The same forward pass with a :class:`NormTracer` on every layer; returns the tracer."""
    from tellnorm.generation import run_forward
    from tellnorm.norms import NormTracer

    tracer = NormTracer(model, None, POINT)
    run_forward(model, sequences, batch_size=len(sequences), observers=[tracer])
    return tracer


def cached_forward(model: Any, sequences: list[list[int]]) -> tuple[Any, list]:
    """(c) ``run_with_cache`` of every layer's ``resid_post``, then their norms; returns ``(cache, norms)``.

    ``norms`` is a list of ``[batch, seq]`` float32 tensors, one per layer, computed as the tracer computes them.
    """
    import torch

    from tellnorm.backends.hf import left_pad

    names = [model.hook_name(layer, POINT) for layer in range(model.n_layers)]
    input_ids, attention, positions = left_pad(model, sequences)
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(
            input_ids, names_filter=names, attention_mask=attention, position_ids=positions, use_cache=False)
        del logits
        norms = [torch.linalg.vector_norm(cache[name], dim=-1, dtype=torch.float32) for name in names]
    return cache, norms


def traced_norms(tracer: Any) -> torch.Tensor:
    """The tracer's norms as one ``[n_layers, batch, seq]`` tensor (layer order of the tracer)."""
    import torch

    by_layer = {layer: norms for layer, _ids, _pos, _valid, norms in tracer._records}
    if sorted(by_layer) != sorted(tracer.layers) or len(tracer._records) != len(tracer.layers):
        raise TellnormError("the tracer recorded one pass per layer more or less than once: cannot compare")
    return torch.stack([by_layer[layer] for layer in tracer.layers])


def cached_norms(result: tuple) -> torch.Tensor:
    """The cached variant's norms as one ``[n_layers, batch, seq]`` tensor (layer order)."""
    import torch

    return torch.stack(result[1])


def _storage_bytes(tensors) -> int:
    """Bytes of the unique storages behind ``tensors`` (views and aliases counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def retained_bytes(variant: str, result: Any) -> tuple[int, dict]:
    """Tensor bytes the variant's result holds after the pass: ``(total, breakdown)``, from tensor sizes."""
    if variant == "plain":
        return 0, {}
    if variant == "traced":
        norms = [rec[4] for rec in result._records]
        meta = [t for rec in result._records for t in (rec[2], rec[3])]  # positions, valid: shared by all layers
        detail = {"norms": _storage_bytes(norms), "token_metadata": _storage_bytes(meta)}
        return _storage_bytes(norms + meta), detail
    if variant == "cached":
        cache, norms = result
        activations = [t for t in cache.cache_dict.values() if t is not None]  # resid_post aliases share storage
        detail = {"cache": _storage_bytes(activations), "norms": _storage_bytes(norms)}
        return _storage_bytes(activations + list(norms)), detail
    raise ValueError(variant)


# ----------------------------------------------------------------------------------------------- measurements

def _call(variant: str, model, sequences):
    return {"plain": plain_forward, "traced": traced_forward, "cached": cached_forward}[variant](model, sequences)


def profile_memory(fn: Callable[[], Any]) -> tuple[dict, object]:
    """Run ``fn()`` once under the memory profiler: ``({peak_bytes, end_bytes, n_events}, fn's result)``.

    Both are net bytes of torch CPU tensor storage allocated inside the window: the most held at once, and what
    is still held when ``fn`` returns (its result is alive then).
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory(prefix="tellnorm-bench-") as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not memory:
        return {"peak_bytes": 0, "end_bytes": 0, "n_events": 0}, result
    memory.sort(key=lambda a: a.get("Ev Idx", 0))
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    totals = [a["Total Allocated"] - base for a in memory]
    return {"peak_bytes": max(0, max(totals)), "end_bytes": totals[-1], "n_events": len(memory)}, result


# ------------------------------------------------------------------------------------------------------- main

def bench_norms(cfg: BenchConfig) -> dict:
    """Run the benchmark, write ``bench_norms.json`` and ``bench_norms.csv`` to ``cfg.out``, print the table.

    Returns the JSON summary as a dict.
    """
    from tqdm.auto import tqdm

    machine = timing.bench_machine(cfg.threads)
    t0 = time.perf_counter()
    model = build_model(cfg.config, cfg.n_layers, cfg.seed)
    build_s = time.perf_counter() - t0
    sequences = make_sequences(model, cfg.batch, cfg.seq, cfg.seed)
    hf_cfg = model.hf_model.config
    n_tokens = cfg.batch * cfg.seq

    # Warm-up rounds, untimed; the first also checks that (b) and (c) measure the same norms.
    correctness = None
    for _ in range(cfg.warmup):
        results = {v: _call(v, model, sequences) for v in VARIANTS}
        if correctness is None:
            correctness = _compare(traced_norms(results["traced"]), cached_norms(results["cached"]))
        del results
    if not correctness["ok"]:
        raise TellnormError(f"traced norms differ from run_with_cache norms (max relative difference "
                            f"{correctness['max_rel_diff']:.2e} > {NORM_TOLERANCE:g}): the benchmark would time "
                            "a wrong tracer")

    # Timed rounds, interleaved, rotating the starting variant.
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = []
    for r in tqdm(range(cfg.repeats), desc="bench rounds", unit="round", disable=not cfg.progress):
        order = timing.round_order(VARIANTS, r)
        row = {"round": r, "order": list(order)}
        for v in order:
            elapsed = timing.timed(_call, v, model, sequences).wall_s  # the result is dropped before the next variant
            times[v].append(elapsed)
            row[v] = elapsed
        rounds.append(row)

    # Memory: exact retained bytes from tensor sizes, and a profiled peak per variant (untimed).
    memory: dict[str, dict] = {}
    for v in VARIANTS:
        if cfg.memory:
            prof, result = profile_memory(lambda v=v: _call(v, model, sequences))
        else:
            prof, result = {}, _call(v, model, sequences)
        total, detail = retained_bytes(v, result)
        del result
        memory[v] = {"retained_bytes": total, "retained_detail": detail,
                     "peak_bytes": prof.get("peak_bytes"), "retained_bytes_profiler": prof.get("end_bytes")}
    if cfg.memory:
        for v in VARIANTS:
            memory[v]["peak_extra_bytes"] = memory[v]["peak_bytes"] - memory["plain"]["peak_bytes"]
    gc.collect()

    medians = {v: statistics.median(times[v]) for v in VARIANTS}
    variants = {}
    for v in VARIANTS:
        per_round = [row[v] / row["plain"] for row in rounds]
        variants[v] = {
            "label": LABELS[v],
            "times_s": times[v],
            "median_s": medians[v],
            "ratio_to_plain": medians[v] / medians["plain"],
            "round_ratios": per_round,
            "round_ratio": timing.ratio_stats(per_round),
            **memory[v],
        }
    time_ratio = variants["traced"]["ratio_to_plain"]
    targets = {"time_ratio_traced_to_plain": time_ratio, "time_target": TIME_TARGET,
               "time_ok": bool(time_ratio <= TIME_TARGET)}
    retained_b, retained_c = variants["traced"]["retained_bytes"], variants["cached"]["retained_bytes"]
    targets.update({"memory_target": MEMORY_TARGET,
                    "retained_fraction_traced_to_cached": retained_b / retained_c if retained_c > 0 else None})
    if cfg.memory:
        # On tiny shapes the peak can come before the cache has grown (then (c)'s extra is ~0 and no fraction).
        extra_b, extra_c = variants["traced"]["peak_extra_bytes"], variants["cached"]["peak_extra_bytes"]
        targets["peak_fraction_traced_to_cached"] = extra_b / extra_c if extra_c > 0 else None
    fractions = [targets.get(k) for k in ("retained_fraction_traced_to_cached", "peak_fraction_traced_to_cached")]
    fractions = [f for f in fractions if f is not None]
    targets["memory_ok"] = bool(all(f <= MEMORY_TARGET for f in fractions)) if fractions else None
    if (load := timing.load_average()) is not None:
        machine["load_average_1m_end"] = load

    summary = {
        "benchmark": "norms",
        "config": timing.config_dict(cfg),
        "model": {"name": model.name, "shape": cfg.config, "architecture": model.architecture,
                  "n_layers": model.n_layers, "d_model": model.d_model,
                  "n_heads": hf_cfg.num_attention_heads, "n_kv_heads": hf_cfg.num_key_value_heads,
                  "head_dim": hf_cfg.head_dim, "d_mlp": hf_cfg.intermediate_size, "vocab_size": hf_cfg.vocab_size,
                  "tie_word_embeddings": bool(hf_cfg.tie_word_embeddings), **timing.model_info(model),
                  "build_s": build_s},
        "inputs": {"batch": cfg.batch, "seq": cfg.seq, "n_tokens": n_tokens, "point": POINT, "padding": False},
        "machine": machine,
        "method": {
            "timing": "interleaved rounds (round r starts at variant r mod 3), perf_counter per call after "
                      "gc.collect() with gc off during the call, torch.no_grad; warm-up rounds untimed; "
                      "medians, ratio of medians, per-round ratios",
            "retained_bytes": "unique tensor storages held by the variant's result after the pass (exact)",
            "peak_bytes": "torch.profiler profile_memory=True: peak of the CPU allocator's net allocated bytes "
                          "inside one untimed call (tensor storage only); extra = peak - plain's peak",
        },
        "correctness": correctness,
        "variants": variants,
        "targets": targets,
        "rounds": rounds,
    }
    timing.write_results(summary, Path(cfg.out) / "bench_norms", summary_frame(summary), format_table(summary))
    return summary


def _compare(traced, cached) -> dict:
    import torch

    if traced.shape != cached.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "max_rel_diff": float("inf"),
                "tolerance": NORM_TOLERANCE, "shape": list(traced.shape)}
    diff = (traced.double() - cached.double()).abs()
    rel = diff / cached.double().abs().clamp_min(torch.finfo(torch.float32).tiny)
    max_rel = float(rel.max())
    return {"ok": bool(max_rel <= NORM_TOLERANCE), "max_abs_diff": float(diff.max()), "max_rel_diff": max_rel,
            "tolerance": NORM_TOLERANCE, "shape": list(traced.shape)}


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per variant: the CSV and the printed table."""
    import pandas as pd

    rows = []
    for v, s in summary["variants"].items():
        rows.append({
            "variant": v, "label": s["label"], "median_s": s["median_s"], "ratio_to_plain": s["ratio_to_plain"],
            "round_ratio_median": s["round_ratio"]["median"], "round_ratio_min": s["round_ratio"]["min"],
            "round_ratio_max": s["round_ratio"]["max"], "n_rounds": len(s["times_s"]),
            "retained_bytes": s["retained_bytes"], "peak_bytes": s.get("peak_bytes"),
            "peak_extra_bytes": s.get("peak_extra_bytes"),
        })
    return pd.DataFrame(rows)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024


def format_table(summary: dict) -> str:
    """The printed table: model and inputs, one row per variant, the targets and the correctness check."""
    m, inp, mach = summary["model"], summary["inputs"], summary["machine"]
    lines = [
        f"norm tracing benchmark: {m['name']} — {m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['parameters'] / 1e6:.0f}M params, {m['dtype']}, {m['device']}, attention {m['attn_implementation']}",
        f"inputs: batch {inp['batch']} × seq {inp['seq']} = {inp['n_tokens']} tokens; "
        f"{len(summary['rounds'])} interleaved rounds after {summary['config']['warmup']} warm-up; "
        f"torch {mach['torch_version']}, {mach['torch_threads']} threads, {mach['cpu_count']} CPUs",
        "",
    ]
    header = ("variant", "median s", "×(a)", "per-round ×(a): median [min, max]", "retained", "peak extra vs (a)")
    rows = []
    for s in summary["variants"].values():
        rr = s["round_ratio"]
        rows.append((s["label"], f"{s['median_s']:.4f}", f"{s['ratio_to_plain']:.3f}",
                     f"{rr['median']:.3f} [{rr['min']:.3f}, {rr['max']:.3f}]", _fmt_bytes(s["retained_bytes"]),
                     _fmt_bytes(s.get("peak_extra_bytes"))))
    lines += timing.table_lines(header, rows)
    t, c = summary["targets"], summary["correctness"]
    lines.append("")
    lines.append(f"time: (b)/(a) = {t['time_ratio_traced_to_plain']:.3f} (target ≤ {t['time_target']}: "
                 f"{'met' if t['time_ok'] else 'NOT met'})")
    def pct(f):
        return "n/a" if f is None else f"{100 * f:.2f}%"

    verdict = "n/a" if t["memory_ok"] is None else ("met" if t["memory_ok"] else "NOT met")
    peak = f"extra peak {pct(t['peak_fraction_traced_to_cached'])}, " if "peak_fraction_traced_to_cached" in t else ""
    lines.append(f"memory: (b) vs (c): {peak}retained {pct(t['retained_fraction_traced_to_cached'])} "
                 f"(target ≤ {100 * t['memory_target']:.0f}%: {verdict})")
    lines.append(f"correctness: traced vs cached norms, max relative difference {c['max_rel_diff']:.1e} "
                 f"(tolerance {c['tolerance']:g})")
    return "\n".join(lines)
