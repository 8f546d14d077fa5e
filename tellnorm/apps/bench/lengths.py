"""``tellnorm bench lengths``: the time of every generated token against its position, up to long responses.

Long reasoning traces run to thousands of tokens; any bookkeeping whose per-step cost grows with the number of
tokens seen so far (a list scanned per step, a statistic recomputed over the whole history) is invisible in a
128-token benchmark and dominant at 8,192. This benchmark generates ``L`` tokens per request (batch 1, greedy,
EOS ignored, a short random prompt) on a random-init model of a real shape (Qwen3-0.6B by default, depth cut with
``--layers``) and times each token separately. Variants, on separate copies of the same weights, same kernel
(sdpa):

* ``hf-generate``: HF's own ``model.generate`` on the raw HF model: the reference;
* ``tellnorm``: :func:`tellnorm.generation.generate` on tellnorm's HF backend, no observer;
* ``tracing``: + a :class:`~tellnorm.norms.NormTracer` on every layer (the observer the studies use);
* ``alrr``: + ALRR at the paper's settings (PAPER.md §6: the late layers by depth, band (τ, 1.5·τ), one extra pass,
  growth 20%) with per-request τ = Q3 + 1.5·IQR after a warm-up of 500 decode steps (``exact`` mode, §5);
* ``erss``: + ERSS at the paper's settings (bank 32, streak 40, γ 1, p 0.2, cos 0.5, β 0.5, cooldown 32) with
  per-request τ after 200 decode steps (the paper's ERSS warm-up).

Per-token time. A clock records ``perf_counter`` once per step and nothing else: for the tellnorm variants an
observer whose ``on_step`` runs before every forward pass (and once more when ``generate`` returns); for
``hf-generate`` the streamer HF's loop calls with the prompt before the prefill and with each new token. Both give
``L + 1`` stamps, so token ``i``'s time is the interval from the stamp before it to the stamp after it (token 0
includes the prefill of the prompt; the tellnorm variants' last interval includes ``generate``'s return). The
clock is an append to a list per step, so timing adds no cost that grows with position. The garbage collector runs
once before each call and is off during it (as in every bench: :func:`tellnorm.apps.bench.timing.timed`).

Windows. Positions (generated-token indices 0..L−1) are cut into windows of ``--window`` tokens (the last one
shorter when ``L`` is not a multiple). Per window: the median time per token. Overhead of a variant over
``tellnorm`` in a window: its window median minus ``tellnorm``'s in the same round. Growth: the ratio last window
/ first window of that overhead and of the variant's ratio to ``hf-generate``, and the least-squares slope of the
overhead against the window's middle position (ms per token per 1,000 positions). Every figure is the median over
the interleaved rounds (round ``r`` starts at variant ``r mod n``; lengths in increasing order within a round).

Peak memory, in the timed call itself (free to read, nothing added per step). GPU: ``torch.cuda.max_memory_allocated``
above what was allocated before the call (GPU tensors only: the observers' records on the host are not in it).
CPU: the process's peak resident set (``VmHWM``, reset before the call by writing 5 to ``/proc/self/clear_refs``,
after ``malloc_trim(0)`` has returned the heap's free memory to the system) above its resident set at the start,
less what the file-backed part grew by during the call (library code paged back in after other processes' memory
pressure evicted it, which is not the call's memory): everything the call held at once, tensors and Python objects
and the allocator's slack, at page granularity (torch's CPU allocator keeps no peak statistics, and the memory
profiler's event trace of thousands of steps is too large to keep). ``None`` where the platform has neither.

Checks: ``tellnorm`` and ``tracing`` must generate exactly ``hf-generate``'s tokens (same weights, greedy); so must
``alrr`` and ``erss`` where they kept no extra pass / injected nothing (their firing counts are reported).
Outputs: ``bench_lengths.json`` (everything, per-round window medians included), ``bench_lengths.csv`` (one row
per length and variant), ``bench_lengths_windows.csv`` (one row per length, variant and window) and the figure
``bench_lengths.html`` / ``.png``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tellnorm.apps.bench import timing
from tellnorm.apps.bench.norms import QWEN3_06B, check_shape_settings
from tellnorm.errors import TellnormError

if TYPE_CHECKING:
    import pandas as pd

VARIANTS = ("hf-generate", "tellnorm", "tracing", "alrr", "erss")
REQUIRED = ("hf-generate", "tellnorm")  # the reference and the baseline every overhead is measured against
LABELS = {"hf-generate": "HF model.generate (raw HF, sdpa)", "tellnorm": "tellnorm generate, no observer",
          "tracing": "+ NormTracer, every layer", "alrr": "+ ALRR (paper settings, per-request τ)",
          "erss": "+ ERSS (paper settings, per-request τ)"}
LENGTHS = (512, 2048, 8192)
WINDOW = 512
PROMPT_LEN = 16


def _max_positions(config: str) -> int:
    """The context of a bench shape, known without building the model."""
    if config == "organism":
        from tellnorm.organism.train import OrganismModelConfig

        return OrganismModelConfig().max_positions
    return QWEN3_06B["max_position_embeddings"]


@dataclass
class LengthsBenchConfig:
    """Settings of ``tellnorm bench lengths`` (the CLI's flags). Checked when built, before any model loads."""

    config: str = "qwen3-0.6b"  # model shape: "qwen3-0.6b" or "organism" (random init)
    n_layers: int | None = 2
    lengths: tuple[int, ...] = LENGTHS  # generated tokens per request
    window: int = WINDOW  # tokens per window of positions
    variants: tuple[str, ...] = VARIANTS
    repeats: int = 3  # interleaved rounds
    prompt_len: int = PROMPT_LEN  # random non-special token ids
    device: str = "cpu"
    threads: int | None = None  # torch.set_num_threads; None keeps torch's setting
    seed: int = 0
    out: str | Path = "figures/bench"
    progress: bool = True

    def __post_init__(self) -> None:
        check_shape_settings(self, ("window", "repeats", "prompt_len"))
        lengths = tuple(self.lengths)
        bad = [x for x in lengths if not isinstance(x, int) or isinstance(x, bool) or x < 1]
        if not lengths or bad:
            raise TellnormError(f"--lengths must be positive token counts, got {list(lengths)}")
        self.lengths = tuple(sorted(set(lengths)))
        if self.lengths[0] < self.window:
            raise TellnormError(f"--lengths {self.lengths[0]} is shorter than one --window of {self.window} tokens: "
                                "lower --window or raise the lengths")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise TellnormError(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
        missing = [v for v in REQUIRED if v not in self.variants]
        if missing:
            raise TellnormError(f"--variants must include {' and '.join(REQUIRED)} (the reference and the baseline of "
                                f"every overhead), missing {missing}")
        self.variants = tuple(v for v in VARIANTS if v in self.variants)  # a fixed order: rounds rotate it
        if self.threads is not None and self.threads < 1:
            raise TellnormError(f"--threads must be ≥ 1, got {self.threads}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise TellnormError(f"--device must be cpu or cuda, got {self.device!r}")
        context = _max_positions(self.config)
        if self.prompt_len + self.lengths[-1] > context:
            raise TellnormError(f"--prompt-len {self.prompt_len} + the longest length {self.lengths[-1]} exceeds the "
                                f"{self.config} shape's context of {context} tokens")


def windows(length: int, window: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: positions ``0..length-1`` cut into consecutive windows of ``window`` tokens (the
    last one shorter when ``window`` does not divide ``length``); they partition the positions."""
    if length < 1 or window < 1:
        raise TellnormError(f"windows need a length and a window ≥ 1, got {length} and {window}")
    return [(start, min(start + window, length)) for start in range(0, length, window)]


# ------------------------------------------------------------------------------------------- clock and memory

class StepClock:
    """``perf_counter`` stamps, one per generation step: a tellnorm observer (``on_step`` before every forward
    pass, no hooks) and an HF streamer (``put`` before the prefill and after each new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def hooks(self, model: Any = None) -> list[tuple[str, Any]]:
        """No hooks: the clock only needs to know when a step starts."""
        return []

    def on_step(self, info: Any) -> None:
        """Stamp the start of a forward pass (tellnorm's generation loop)."""
        self.stamps.append(time.perf_counter())

    def put(self, value: Any) -> None:
        """Stamp a token handed over by HF's generation loop (the prompt first)."""
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        """HF's streamer protocol: generation is over (nothing to stamp: the last token was)."""

    def intervals(self) -> list[float]:
        """Seconds between consecutive stamps: one per generated token."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


_LIBC: Any = None


def _malloc_trim() -> None:
    """Hand glibc's free heap memory back to the system, so the resident set starts at what is live."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """The most memory one call held at once, above what was held before it (bytes; see the module docstring):
    ``start()`` right before the call, ``stop()`` right after."""

    def __init__(self, device: str):
        self.device = device
        self.method = self._method()
        self._base: int | None = None
        self._file = 0

    def _method(self) -> str | None:
        if self.device.startswith("cuda"):
            return ("torch.cuda.max_memory_allocated above memory_allocated before the call (GPU tensors only, not "
                    "the host-side records of observers)")
        if _status_kb("VmHWM") is None:
            return None
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            return None
        return ("peak resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim(0)) above the "
                "resident set before the call, less the growth of its file-backed part (RssFile) during the call")

    def start(self) -> None:
        """Reset the peak and remember the current level."""
        if self.method is None:
            return
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        self._base = 1024 * (_status_kb("VmRSS") or 0)
        self._file = 1024 * (_status_kb("RssFile") or 0)

    def stop(self) -> int | None:
        """Peak bytes since :meth:`start` above the level then; None where it cannot be measured."""
        if self.method is None or self._base is None:
            return None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self._base)
        paged_in = max(0, 1024 * (_status_kb("RssFile") or 0) - self._file)
        return max(0, 1024 * (_status_kb("VmHWM") or 0) - self._base - paged_in)


# ---------------------------------------------------------------------------------------------- models and calls

@dataclass
class Models:
    """The two copies of the same weights: the raw HF model (``hf-generate``) and tellnorm's loaded model."""

    hf: Any  # transformers PreTrainedModel
    tellnorm: Any  # tellnorm.backends.hf.LoadedModel


def build_models(cfg: LengthsBenchConfig) -> Models:
    """Separate copies of one random-init model (same seed, same weights) on ``cfg.device``, float32, sdpa."""
    from tellnorm.apps.bench.norms import build_hf_model
    from tellnorm.backends import load_model

    hf, tokenizer = build_hf_model(cfg.config, cfg.n_layers, cfg.seed)
    hf = hf.to(cfg.device)
    # EOS is ignored: HF's loop stops at the generation config's EOS, so the reference copy has none.
    hf.generation_config.eos_token_id = None
    copy, tokenizer = build_hf_model(cfg.config, cfg.n_layers, cfg.seed)
    model = load_model((copy.to(cfg.device), tokenizer), device=cfg.device)
    model.name = f"random-init {cfg.config}" + (f" ({cfg.n_layers} layers)" if cfg.n_layers is not None else "")
    return Models(hf, model)


def bench_prompt(model: Any, length: int, seed: int = 0) -> list[int]:
    """``length`` random non-special token ids of the model's tokenizer (one request's prompt)."""
    import torch

    special = set(model.tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(len(model.tokenizer)) if i not in special])
    picks = torch.randint(0, len(allowed), (length,), generator=torch.Generator().manual_seed(seed))
    return allowed[picks].tolist()


def variant_observers(variant: str, model: Any) -> list:
    """Fresh observers of one tellnorm variant (``tellnorm``: none), built as a run builds them."""
    if variant == "tellnorm":
        return []
    if variant == "tracing":
        from tellnorm.norms import NormTracer

        return [NormTracer(model, None)]
    from tellnorm.techniques import ALRR, ERSS, ALRRConfig, ERSSConfig, threshold_for
    from tellnorm.thresholds import WARMUP_ERSS, WARMUP_SUPPRESSION, ThresholdConfig

    if variant == "alrr":
        return [ALRR(model, threshold_for("exact", cfg=ThresholdConfig(warmup=WARMUP_SUPPRESSION)), ALRRConfig())]
    if variant == "erss":
        return [ERSS(model, threshold_for("exact", cfg=ThresholdConfig(warmup=WARMUP_ERSS)), ERSSConfig())]
    raise TellnormError(f"unknown variant {variant!r}: choose from {', '.join(VARIANTS)}")


def firing_counts(observers: list) -> dict:
    """What the technique observers did, summed over their layers (empty for the others)."""
    counts: dict = {}
    for obs in observers:
        if hasattr(obs, "report"):
            report = obs.report()
            for column in report.columns:
                if column not in ("request_id", "layer"):
                    counts[column] = counts.get(column, 0) + int(report[column].sum())
    return counts


def edited(counts: dict) -> bool:
    """Whether a technique changed the stream (a kept ALRR pass or an ERSS injection)."""
    return counts.get("alrr_kept_passes", 0) > 0 or counts.get("erss_injections", 0) > 0


def run_variant(variant: str, models: Models, prompt: list[int], length: int, memory: PeakMemory | None = None,
                ) -> dict:
    """Generate ``length`` tokens after ``prompt`` with one variant: ``{"tokens", "intervals" (s, one per token),
    "wall_s", "peak_bytes", "counts"}``."""
    import torch

    clock = StepClock()
    observers: list = []
    if memory is not None:
        memory.start()
    if variant == "hf-generate":
        from transformers import GenerationConfig

        ids = torch.tensor([prompt], device=models.hf.device)
        settings = GenerationConfig(max_new_tokens=length, do_sample=False, eos_token_id=None,
                                    pad_token_id=models.tellnorm.tokenizer.pad_token_id)
        start = time.perf_counter()
        out = models.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings,
                                 streamer=clock)
        wall = time.perf_counter() - start
        tokens = out[0, len(prompt):].tolist()
    else:
        from tellnorm.generation import SamplingConfig, generate

        observers = variant_observers(variant, models.tellnorm)
        sampling = SamplingConfig(max_new_tokens=length, ignore_eos=True)
        start = time.perf_counter()
        gens = generate(models.tellnorm, [prompt], sampling, batch_size=1, observers=[clock, *observers])
        clock.stamps.append(time.perf_counter())  # the end of the last token's step
        wall = time.perf_counter() - start
        tokens = gens[0].generated_ids
    peak = memory.stop() if memory is not None else None
    intervals = clock.intervals()
    if len(tokens) != length or len(intervals) != length:
        raise TellnormError(f"variant {variant!r} produced {len(tokens)} tokens and {len(intervals)} step times for "
                            f"{length} requested: the clock or the EOS rule is wrong")
    return {"tokens": tokens, "intervals": intervals, "wall_s": wall, "peak_bytes": peak,
            "counts": firing_counts(observers)}


def tokens_digest(tokens: list[int]) -> str:
    """A short SHA-256 of a token list (the JSON keeps it, not thousands of ids, for checks against a reference)."""
    import hashlib

    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]


def window_medians(intervals: list[float], spans: list[tuple[int, int]]) -> list[float]:
    """Median of ``intervals`` (seconds per token) in each ``(start, end)`` span, in milliseconds."""
    return [1000 * statistics.median(intervals[start:end]) for start, end in spans]


# ------------------------------------------------------------------------------------------------------- main

def bench_lengths(cfg: LengthsBenchConfig) -> dict:
    """Run the benchmark, write ``bench_lengths.json`` / ``.csv`` / ``_windows.csv`` and the figure to ``cfg.out``,
    print the table. Returns the JSON summary as a dict."""
    from tqdm.auto import tqdm

    machine = timing.bench_machine(cfg.threads, cfg.device)
    t0 = time.perf_counter()
    models = build_models(cfg)
    build_s = time.perf_counter() - t0
    prompt = bench_prompt(models.tellnorm, cfg.prompt_len, cfg.seed)
    memory = PeakMemory(cfg.device)

    warm = min(cfg.window, 32)  # untimed: first calls pay for lazy initialisation
    for variant in cfg.variants:
        run_variant(variant, models, prompt, warm)

    spans = {length: windows(length, cfg.window) for length in cfg.lengths}
    records: dict = {length: {v: [] for v in cfg.variants} for length in cfg.lengths}
    checks: dict = {length: {} for length in cfg.lengths}
    hf_tokens: dict = {}  # length -> hf-generate's tokens in the first round (its digest: a test's reference)
    bar = tqdm(total=cfg.repeats * len(cfg.lengths) * len(cfg.variants), desc="bench lengths",
               disable=not cfg.progress)
    for r in range(cfg.repeats):
        for length in cfg.lengths:
            results = {}
            for variant in timing.round_order(cfg.variants, r):
                result = timing.timed(run_variant, variant, models, prompt, length, memory).result
                results[variant] = result
                bar.update(1)
            reference = results["hf-generate"]["tokens"]
            hf_tokens.setdefault(length, reference)
            for variant, result in results.items():
                same = result["tokens"] == reference
                checks[length].setdefault(variant, []).append(same)
                if not same and not edited(result["counts"]):
                    raise TellnormError(f"variant {variant!r} generated other tokens than hf-generate at length "
                                        f"{length} without editing the stream: the benchmark would compare unequal "
                                        "work")
                records[length][variant].append({
                    "round": r, "wall_s": result["wall_s"], "peak_bytes": result["peak_bytes"],
                    "window_ms": window_medians(result["intervals"], spans[length]),
                    "mean_ms": 1000 * sum(result["intervals"]) / length, "counts": result["counts"],
                    "same_tokens_as_hf": same})
            del results
    bar.close()

    hf_cfg = models.hf.config
    summary = {
        "benchmark": "lengths",
        "config": timing.config_dict(cfg),
        "machine": machine,
        "model": {"name": models.tellnorm.name, "shape": cfg.config, "n_layers": hf_cfg.num_hidden_layers,
                  "d_model": hf_cfg.hidden_size, "vocab_size": hf_cfg.vocab_size,
                  "parameters": sum(p.numel() for p in models.hf.parameters()), "dtype": "float32",
                  "device": cfg.device, "build_s": build_s,
                  "kernels": {"hf-generate": models.hf.config._attn_implementation,
                              "tellnorm": models.tellnorm.hf_model.config._attn_implementation},
                  "late_layers": models.tellnorm.late_layers()},
        "inputs": {"prompt_len": cfg.prompt_len, "batch": 1, "sampling": "greedy", "eos": "ignored",
                   "warmup_tokens": warm},
        "method": {
            "per_token_time": "perf_counter stamps once per step: a tellnorm observer's on_step before each forward "
                              "pass (+ once after generate returns); HF's streamer put (prompt, then each token)",
            "windows": f"positions cut into windows of {cfg.window} generated tokens; median ms/token per window; "
                       "overhead = variant − tellnorm window median in the same round; medians over rounds",
            "rounds": "interleaved, round r starts at variant r mod n; gc.collect() before each call, gc off during "
                      "it",
            "thresholds": "exact per-request τ = Q3 + 1.5·IQR, warm-up 500 decode steps (ALRR) / 200 (ERSS)",
            "peak_memory": memory.method,
        },
        "lengths": {str(length): {**_summarise_length(records[length], spans[length], cfg.variants, checks[length]),
                                  "hf_tokens_sha256": tokens_digest(hf_tokens[length]),
                                  "hf_tokens_head": hf_tokens[length][:16]} for length in cfg.lengths},
        "load_average_1m_end": timing.load_average(),
    }
    summary["rows"] = _rows(summary["lengths"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "bench_lengths"
    from tellnorm.io import write_csv

    write_csv(window_frame(summary), stem.with_name("bench_lengths_windows.csv"))
    timing.write_results(summary, stem, summary_frame(summary), format_table(summary))
    write_lengths_figure(summary, stem)
    return summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``ys`` on ``xs``; None with fewer than two points."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else None


def _growth(first: float | None, last: float | None) -> float | None:
    """last / first, only where first is a positive amount (a ratio of noise around zero means nothing)."""
    if first is None or last is None or first <= 0:
        return None
    return last / first


def _summarise_length(records: dict, spans: list[tuple[int, int]], variants: tuple[str, ...], checks: dict) -> dict:
    """Per variant: per-window medians over rounds, overheads over ``tellnorm``, ratios to ``hf-generate``, their
    growth first → last window, peak memory and the token checks."""
    n_rounds = len(records["tellnorm"])
    several = len(spans) > 1  # growth from the first window to the last needs two windows
    middles = [(start + end - 1) / 2 for start, end in spans]
    out = {"windows": [list(s) for s in spans], "variants": {}}
    for v in variants:
        rounds = records[v]
        per_round_ms = [r["window_ms"] for r in rounds]
        window_ms = [statistics.median(row[w] for row in per_round_ms) for w in range(len(spans))]
        overhead = ratio = None
        if v != "hf-generate":
            overhead = [statistics.median(records[v][i]["window_ms"][w] - records["tellnorm"][i]["window_ms"][w]
                                          for i in range(n_rounds)) for w in range(len(spans))]
            ratio = [statistics.median(records[v][i]["window_ms"][w] / records["hf-generate"][i]["window_ms"][w]
                                       for i in range(n_rounds)) for w in range(len(spans))]
        peak = _median([r["peak_bytes"] for r in rounds])
        counts = rounds[0]["counts"]
        s = {
            "label": LABELS[v],
            "mean_ms_per_token": statistics.median(r["mean_ms"] for r in rounds),
            "wall_s": statistics.median(r["wall_s"] for r in rounds),
            "first_window_ms": window_ms[0], "last_window_ms": window_ms[-1],
            "window_growth": window_ms[-1] / window_ms[0] if several else None,
            "overhead_first_ms": overhead[0] if overhead and v != "tellnorm" else None,
            "overhead_last_ms": overhead[-1] if overhead and v != "tellnorm" else None,
            "overhead_growth": (_growth(overhead[0], overhead[-1]) if overhead and v != "tellnorm" and several
                                else None),
            "overhead_slope_ms_per_1k": (1000 * _slope(middles, overhead)
                                         if overhead and v != "tellnorm" and several else None),
            "ratio_to_hf_first": ratio[0] if ratio else None, "ratio_to_hf_last": ratio[-1] if ratio else None,
            "ratio_to_hf_growth": ratio[-1] / ratio[0] if ratio and several else None,
            "peak_mb": peak / 2**20 if peak is not None else None,
            "same_tokens_as_hf": all(checks[v]),
            "counts": counts,
            "window_ms": window_ms, "overhead_ms": overhead, "ratio_to_hf": ratio,
            "rounds": rounds,
        }
        out["variants"][v] = s
    return out


def _rows(lengths: dict) -> list[dict]:
    """One flat row per (length, variant): the scalar fields and the firing counts (the CSV and the docs table)."""
    rows = []
    for length, block in lengths.items():
        for v, s in block["variants"].items():
            scalars = {k: x for k, x in s.items() if k not in ("counts", "rounds", "label") and not isinstance(x, list)}
            rows.append({"length": int(length), "variant": v, **scalars, **s["counts"]})
    return rows


def summary_frame(summary: dict) -> pd.DataFrame:
    """One row per (length, variant): ms/token, first and last window, overhead and ratio growth, peak memory."""
    import pandas as pd

    return pd.DataFrame(summary["rows"])


def window_frame(summary: dict) -> pd.DataFrame:
    """One row per (length, variant, window): the window's span, median ms/token, overhead over ``tellnorm`` and
    ratio to ``hf-generate`` (medians over rounds)."""
    import pandas as pd

    rows = []
    for length, block in summary["lengths"].items():
        for v, s in block["variants"].items():
            for w, (start, end) in enumerate(block["windows"]):
                rows.append({"length": int(length), "variant": v, "window": w, "start": start, "end": end,
                             "ms_per_token": s["window_ms"][w],
                             "overhead_ms": s["overhead_ms"][w] if s["overhead_ms"] else None,
                             "ratio_to_hf": s["ratio_to_hf"][w] if s["ratio_to_hf"] else None})
    return pd.DataFrame(rows)


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(summary: dict) -> str:
    """The table printed at the end of a run (and pasted into docs/benchmarks.md)."""
    m, c = summary["model"], summary["config"]
    lines = [f"tellnorm bench lengths: {m['name']}, {m['dtype']}, {m['device']}, batch 1, "
             f"greedy, EOS ignored, {c['repeats']} interleaved rounds, windows of {c['window']} tokens; kernels "
             f"{m['kernels']}; peak memory: {summary['method']['peak_memory']}"]
    header = ["length", "variant", "ms/token", "first win ms", "last win ms", "×hf first", "×hf last", "last/first",
              "overhead ms first", "last", "last/first", "slope ms/1k", "peak MB", "same tokens", "fired"]
    rows = []
    for length, block in summary["lengths"].items():
        for v, s in block["variants"].items():
            fired = ", ".join(f"{k.split('_', 1)[1]} {n}" for k, n in s["counts"].items()) or "—"
            cells = [(s["mean_ms_per_token"], ".2f"), (s["first_window_ms"], ".2f"), (s["last_window_ms"], ".2f"),
                     (s["ratio_to_hf_first"], ".3f"), (s["ratio_to_hf_last"], ".3f"), (s["ratio_to_hf_growth"], ".2f"),
                     (s["overhead_first_ms"], "+.3f"), (s["overhead_last_ms"], "+.3f"), (s["overhead_growth"], ".2f"),
                     (s["overhead_slope_ms_per_1k"], "+.3f"), (s["peak_mb"], ".1f")]
            rows.append([f"{int(length):,}", v, *(_cell(x, spec) for x, spec in cells),
                         "yes" if s["same_tokens_as_hf"] else "no", fired])
    lines += timing.table_lines(header, rows)
    return "\n".join(lines)


def write_lengths_figure(summary: dict, stem: Path) -> list[Path]:
    """Per-token time against position (longest length), the overhead over ``tellnorm`` against position, and
    peak memory against length, one line per variant."""
    from plotly.subplots import make_subplots

    from tellnorm.figures import NEUTRAL_COLOR, NON_THINKING_COLOR, THINKING_COLOR, style, write_figure

    colors = {"hf-generate": NEUTRAL_COLOR, "tellnorm": NON_THINKING_COLOR, "tracing": "#27ae60",
              "alrr": THINKING_COLOR, "erss": "#8e44ad"}
    dashes = {"hf-generate": "solid", "tellnorm": "dot", "tracing": "dash", "alrr": "dashdot", "erss": "longdash"}
    longest = max(summary["lengths"], key=int)
    block = summary["lengths"][longest]
    middles = [(start + end - 1) / 2 for start, end in block["windows"]]
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"median ms per token by position ({int(longest):,} tokens)", "overhead over tellnorm (ms per token)",
        "peak memory of one request (MB)"))
    for v, s in block["variants"].items():
        line = {"color": colors[v], "dash": dashes[v]}
        fig.add_scatter(x=middles, y=s["window_ms"], mode="lines+markers", name=LABELS[v], legendgroup=v, line=line,
                        row=1, col=1)
        if s["overhead_ms"] and v != "tellnorm":
            fig.add_scatter(x=middles, y=s["overhead_ms"], mode="lines+markers", name=LABELS[v], legendgroup=v,
                            showlegend=False, line=line, row=1, col=2)
        points = [(int(length), b["variants"][v]["peak_mb"]) for length, b in summary["lengths"].items()
                  if b["variants"][v]["peak_mb"] is not None]
        if points:
            fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=LABELS[v],
                            legendgroup=v, showlegend=False, line=line, row=1, col=3)
    fig.update_xaxes(title_text="generated token position", row=1, col=1)
    fig.update_xaxes(title_text="generated token position", row=1, col=2)
    fig.update_xaxes(title_text="tokens generated", type="log", row=1, col=3)
    fig.add_hline(y=0, line={"color": "#999999", "width": 1}, row=1, col=2)
    m = summary["model"]
    style(fig, title=f"Per-token time by position: random-init {m['shape']}, {m['n_layers']} layers, float32, "
                     f"{m['device']}, batch 1, greedy", height=460, width=1350)
    return write_figure(fig, stem)
